"""Kernel and SessionManager library tests (no MCP)."""

from __future__ import annotations

import io
import os
import threading
import time

import numpy as np
import pytest

from servers.common.errors import ToolError
from servers.sandbox import isolation
from servers.sandbox.kernel import ExecResult, Kernel, SandboxPolicy
from servers.sandbox.outputs import kind_for, register_files
from servers.sandbox.sessions import SessionManager

HAS_BWRAP = isolation.probe_bwrap()[0]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    base = tmp_path_factory.mktemp("kernel")
    ws, data = base / "ws", base / "data"
    ws.mkdir()
    data.mkdir()
    np.save(data / "arr.npy", np.arange(12, dtype=np.int16).reshape(3, 4))
    return ws, data


@pytest.fixture(scope="module")
def k(dirs):
    ws, data = dirs
    kern = Kernel(policy=SandboxPolicy(max_output_chars=2000, memory_mb=2048), workspace=ws, data_root=data)
    yield kern
    kern.close()


def test_state_persists_and_last_value(k):
    r = k.execute("x = 40\ny = 2")
    assert isinstance(r, ExecResult) and r.ok and r.value is None and r.stdout == ""
    r = k.execute("print('hello')\nx + y")
    assert r.ok and r.stdout == "hello\n" and r.value == "42"
    assert k.execute("None").value is None
    assert k.execute("_ * 2").value == "84"  # `_` holds the last value, like IPython
    assert r.isolation == ("bubblewrap" if HAS_BWRAP else "none")
    assert r.duration_s > 0 and r.truncated_chars == 0 and not r.restarted


def test_error_traceback_and_session_survives(k):
    k.execute("z = 7")
    r = k.execute("def f(a):\n    return a / 0\n\nf(z)")
    assert not r.ok and r.error_type == "ZeroDivisionError"
    assert 'File "<cell-' in r.error and "return a / 0" in r.error and "ZeroDivisionError: division by zero" in r.error
    assert "driver.py" not in r.error
    r = k.execute("def g(:\n  pass")
    assert not r.ok and r.error_type == "SyntaxError" and "SyntaxError" in r.error
    r = k.execute("raise SystemExit(3)")
    assert not r.ok and "still running" in r.error
    assert k.execute("z").value == "7"


def test_output_cap_counts_cut_chars(dirs):
    ws, data = dirs
    with Kernel(policy=SandboxPolicy(max_output_chars=100), workspace=ws, data_root=data) as kern:
        r = kern.execute("print('a' * 1000)\nimport sys\nsys.stderr.write('b' * 50)\n'c' * 500")
        assert r.stdout == "a" * 100 and r.stderr == "b" * 50
        assert r.value.startswith("'" + "c" * 99) and "chars cut" in r.value
        assert r.truncated_chars == (1001 - 100) + (502 - 100)
        r = kern.execute("import os\nos.write(1, b'd' * 300)\nos.system('echo from-shell')")
        assert r.stdout.startswith("d" * 100) and len(r.stdout) == 100 and r.truncated_chars >= 200


def test_fd_level_and_subprocess_output_captured(k):
    r = k.execute("import subprocess, os\nsubprocess.run(['echo', 'child-out'])\nos.write(2, b'raw-err')\n1")
    assert r.ok and "child-out" in r.stdout and "raw-err" in r.stderr


def test_figures_are_png(k):
    r = k.execute("import matplotlib.pyplot as plt\nfig, ax = plt.subplots(figsize=(3, 2))\nax.plot([1, 3, 2])\n"
                  "plt.figure()\nplt.imshow([[0, 1], [1, 0]])\nlen(plt.get_fignums())")
    assert r.ok and r.value == "2"
    assert len(r.figures) == 2 and all(f.startswith(b"\x89PNG\r\n\x1a\n") for f in r.figures)
    from PIL import Image

    w, h = Image.open(io.BytesIO(r.figures[0])).size
    assert 150 < w < 400 and 100 < h < 300  # 3x2 inches at 100 dpi, tight bbox
    assert k.execute("import matplotlib.pyplot as plt\nlen(plt.get_fignums())").value == "0"  # closed after


def test_files_created_or_modified_are_reported(k, dirs):
    ws, _ = dirs
    (ws / "old.txt").write_text("unchanged")
    r = k.execute("import numpy as np, os\nos.makedirs('out', exist_ok=True)\n"
                  "np.save('out/a.npy', np.ones((2, 3)))\nopen('b.csv', 'w').write('x,y\\n1,2\\n')\n"
                  "os.symlink('b.csv', 'link.csv')")
    assert r.ok, r.error
    assert r.files == ["b.csv", "out/a.npy"]
    r = k.execute("open('b.csv', 'a').write('3,4\\n')")
    assert r.files == ["b.csv"]
    assert k.execute("1").files == []


def test_data_root_readonly_and_aliases(k, dirs):
    ws, data = dirs
    r = k.execute(f"import numpy as np\na = np.load({str(data / 'arr.npy')!r})\nint(a.sum()), a.shape")
    assert r.ok and r.value == "(66, (3, 4))"
    if HAS_BWRAP:
        r = k.execute("import os\nint(np.load('/data/arr.npy').sum()), os.getcwd() == os.path.realpath('/workspace')")
        assert r.value == "(66, True)"
        r = k.execute("open('/data/new.txt', 'w')")
        assert not r.ok and "Read-only file system" in r.error
    r = k.execute("import os\nos.environ['CYTOAGENT_DATA_ROOT'], os.environ['CYTOAGENT_WORKSPACE'], os.getcwd()")
    assert r.value == repr((str(data), str(ws), str(ws)))


def test_project_library_and_scientific_stack_importable(k):
    from servers.common.synthetic import nuclei_image

    ref = nuclei_image((128, 128), n=9, seed=3)
    labels, centers = ref.labels, ref.centers
    code = ("from servers.common.synthetic import nuclei_image\nimport scipy, skimage, cv2, pandas\n"
            "s = nuclei_image((128, 128), n=9, seed=3)\n"
            "int(s.labels.max()), int((s.labels > 0).sum()), len(s.centers)")
    r = k.execute(code, timeout_s=120)
    assert r.ok, r.error
    assert r.value == repr((int(labels.max()), int((labels > 0).sum()), len(centers)))


def test_environment_is_scrubbed(dirs, monkeypatch):
    ws, data = dirs
    monkeypatch.setenv("CYTOAGENT_TEST_SECRET", "hunter2")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-hunter2")
    with Kernel(workspace=ws, data_root=data) as kern:
        r = kern.execute("import os\n[k for k, v in os.environ.items() if 'hunter2' in v or 'SECRET' in k or 'KEY' in k]")
        assert r.value == "[]"
        assert kern.execute("import os\nos.environ['OMP_NUM_THREADS'], os.environ['MPLBACKEND']").value == "('1', 'Agg')"


def test_timeout_interrupts_and_keeps_state(k):
    k.execute("kept = 'yes'")
    t = time.monotonic()
    r = k.execute("while True:\n    pass", timeout_s=0.5)
    assert time.monotonic() - t < 2.5
    assert not r.ok and r.error_type == "Timeout" and not r.restarted and "state is kept" in r.error
    assert k.execute("kept").value == "'yes'"


def test_unresponsive_kernel_is_restarted(dirs):
    ws, data = dirs
    with Kernel(workspace=ws, data_root=data) as kern:
        kern.execute("gone = 1")
        r = kern.execute("import signal, time\nsignal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGALRM])\n"
                         "time.sleep(30)", timeout_s=0.5)
        assert not r.ok and r.restarted and r.error_type == "Timeout" and "lost" in r.error
        assert kern.alive and kern.n_restarts == 1
        r = kern.execute("'gone' in dir()")
        assert r.ok and r.value == "False" and not r.restarted


def test_cpu_limit_interrupts(dirs):
    ws, data = dirs
    with Kernel(policy=SandboxPolicy(cpu_seconds=1), workspace=ws, data_root=data) as kern:
        kern.execute("a = 5")
        t = time.monotonic()
        r = kern.execute("while True:\n    pass", timeout_s=30)
        assert time.monotonic() - t < 10
        assert not r.ok and r.error_type == "CPUTimeExceeded" and not r.restarted
        assert kern.execute("a").value == "5"  # and the next call gets a fresh CPU budget
        assert kern.execute("sum(range(10**6))").ok


def test_dead_kernel_restarts_on_next_call(dirs):
    ws, data = dirs
    with Kernel(workspace=ws, data_root=data) as kern:
        r = kern.execute("import os\nos._exit(3)")
        assert not r.ok and r.restarted and "status 3" in r.error
        assert kern.execute("1 + 1").value == "2"


def test_reset_close_and_bad_input(dirs):
    ws, data = dirs
    kern = Kernel(workspace=ws, data_root=data)
    kern.execute("q = 1")
    kern.reset()
    assert kern.execute("'q' in dir()").value == "False"
    with pytest.raises(ToolError, match="timeout_s"):
        kern.execute("1", timeout_s=-1)
    with pytest.raises(ToolError, match="code must be a string"):
        kern.execute(b"1")  # type: ignore[arg-type]
    kern.close()
    assert not kern.alive
    with pytest.raises(ToolError, match="closed"):
        kern.execute("1")
    kern.close()  # idempotent


def test_preload(dirs):
    ws, data = dirs
    with Kernel(workspace=ws, data_root=data, preload=["numpy", "no_such_module_xyz"]) as kern:
        assert kern.execute("import sys\n'numpy' in sys.modules").value == "True"


def test_policy_validation(dirs):
    ws, data = dirs
    with pytest.raises(ToolError, match="isolation"):
        Kernel(policy=SandboxPolicy(isolation="docker"), workspace=ws, data_root=data)
    with pytest.raises(ToolError, match="memory_mb"):
        Kernel(policy=SandboxPolicy(memory_mb=16), workspace=ws, data_root=data)
    with pytest.raises(ToolError, match="system or home directory"):
        Kernel(workspace="/", data_root=data)
    with pytest.raises(ToolError, match="system or home directory"):
        Kernel(workspace=ws, data_root="/etc")
    (ws / "a-file").write_text("x")
    with pytest.raises(ToolError, match="Data root"):
        Kernel(workspace=ws, data_root=ws / "a-file")


# -- the unisolated fallback -------------------------------------------------------------------------


def test_fallback_warns_in_every_result(dirs):
    ws, data = dirs
    with Kernel(policy=SandboxPolicy(isolation="none", require_isolation=False), workspace=ws, data_root=data) as kern:
        assert kern.isolation == "none"
        for code in ("1 + 1", "1 / 0"):
            r = kern.execute(code)
            assert r.isolation == "none"
            assert len(r.warnings) == 1 and r.warnings[0].startswith("NO ISOLATION")
        # resource limits still apply without bubblewrap
        r = kern.execute("import resource\nresource.getrlimit(resource.RLIMIT_AS)[0] // 2**20")
        assert r.value == "4096"


def test_missing_bwrap_falls_back_or_refuses(dirs, monkeypatch):
    ws, data = dirs
    monkeypatch.setattr(isolation, "probe_bwrap", lambda network=False: (False, "bwrap not found on PATH"))
    with Kernel(policy=SandboxPolicy(require_isolation=False), workspace=ws, data_root=data) as kern:
        r = kern.execute("'ran'")
        assert r.value == "'ran'" and r.isolation == "none"
        assert "NO ISOLATION" in r.warnings[0] and "bwrap not found" in r.warnings[0]
    with pytest.raises(ToolError, match="bubblewrap isolation is required"):
        Kernel(policy=SandboxPolicy(require_isolation=True), workspace=ws, data_root=data)
    # the config switch (CYTOAGENT_REQUIRE_ISOLATION=1) refuses too
    from servers.common.config import reset_config

    monkeypatch.setenv("CYTOAGENT_REQUIRE_ISOLATION", "1")
    reset_config()
    with pytest.raises(ToolError, match="Refusing to run code"):
        Kernel(workspace=ws, data_root=data)
    with pytest.raises(ToolError, match="isolation is required"):
        Kernel(policy=SandboxPolicy(isolation="none"), workspace=ws, data_root=data)


# -- sessions ----------------------------------------------------------------------------------------


def test_session_manager_lifecycle(workspace_dir, data_root):
    sm = SessionManager(max_sessions=2, reaper=False)
    try:
        assert sm.execute("default", "v = 1\nv").value == "1"  # created on first use
        s = sm.create("b", description="second")
        assert s.name == "b" and len(sm) == 2
        with pytest.raises(ToolError, match="already exists"):
            sm.create("b")
        with pytest.raises(ToolError, match="cap of 2"):
            sm.create("c")
        with pytest.raises(ToolError, match="Invalid session name"):
            sm.get("../x")
        info = {d["name"]: d for d in sm.list()}
        assert set(info) == {"default", "b"} and info["b"]["description"] == "second"
        assert info["default"]["calls"] == 1
        sm.reset("default")
        assert sm.execute("default", "'v' in dir()").value == "False"
        sm.close("b")
        with pytest.raises(ToolError, match="No session named 'b'"):
            sm.close("b")
        assert sm.create().name == "session-2"
    finally:
        sm.close_all()
    assert len(sm) == 0


def test_idle_sessions_expire(workspace_dir, data_root):
    sm = SessionManager(idle_timeout_s=0.3, reaper=True)
    try:
        s = sm.create("idle")
        kern = s.kernel
        deadline = time.monotonic() + 5
        while "idle" in sm and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "idle" not in sm and not kern.alive
        r = sm.execute("idle", "'x' in dir()")  # using it again: a fresh session, and the caller is told
        assert r.ok and r.value == "False" and r.restarted and "idle" in r.warnings[-1]
        assert not sm.execute("idle", "1").restarted
    finally:
        sm.close_all()


def test_two_sessions_run_concurrently_and_independently(workspace_dir, data_root):
    sm = SessionManager(reaper=False)
    try:
        sm.create("a")
        sm.create("b")
        sm.execute("a", "who = 'a'")
        sm.execute("b", "who = 'b'")
        results = {}

        def work(name):
            results[name] = sm.execute(name, "import time\ntime.sleep(1.0)\nwho")

        t0 = time.monotonic()
        threads = [threading.Thread(target=work, args=(n,)) for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        assert results["a"].value == "'a'" and results["b"].value == "'b'"
        assert elapsed < 1.8, elapsed  # ran at the same time, not one after the other
    finally:
        sm.close_all()


# -- outputs -----------------------------------------------------------------------------------------


def test_kind_for_and_register_files(workspace):
    assert [kind_for(n) for n in ("a.png", "b.NPY", "c.ome.tif", "d.csv", "e.h5ad", "f.bin", "g.json")] == [
        "figure", "image", "image", "table", "anndata", "file", "json"]
    np.save(workspace.root / "m.npy", np.zeros((4, 5), np.uint8))
    (workspace.root / "t.csv").write_text("a\n1\n")
    os.symlink("/etc/passwd", workspace.root / "evil.txt")
    arts = register_files(workspace, ["m.npy", "t.csv", "evil.txt"], {"tool": "test"})
    assert [(a.kind, a.path) for a in arts] == [("image", "m.npy"), ("table", "t.csv")]
    assert arts[0].shape == [4, 5] and arts[0].dtype == "uint8"
    again = register_files(workspace, ["m.npy"], {"tool": "test"})
    assert again[0].id == arts[0].id  # re-registering keeps the id


# -- file tracking -----------------------------------------------------------------------------------


@pytest.mark.parametrize("use_inotify", [True, False])
def test_file_tracker_modes(tmp_path, use_inotify):
    from servers.sandbox.filewatch import FileTracker

    root = tmp_path / "w"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "keep.txt").write_text("a")
    (root / "mod.txt").write_text("a")
    tr = FileTracker(root, use_inotify=use_inotify)
    assert tr.mode == ("inotify" if use_inotify else "walk")
    (root / "between.txt").write_text("written between calls")  # not part of the next call
    tr.begin()
    (root / "mod.txt").write_text("changed!")
    (root / "new" / "deep").mkdir(parents=True)
    (root / "new" / "deep" / "f.npy").write_bytes(b"x")
    (root / "tmp.part").write_text("y")
    os.replace(root / "tmp.part", root / "renamed.txt")
    (root / "gone.txt").write_text("z")
    (root / "gone.txt").unlink()
    os.symlink(root / "mod.txt", root / "sub" / "link.txt")
    (root / ".index").mkdir()
    (root / ".index" / "index.sqlite").write_text("ignored")
    assert tr.end() == ["mod.txt", "new/deep/f.npy", "renamed.txt"]
    tr.begin()
    (root / "new" / "deep" / "g.txt").write_text("in a directory created during the last call")
    assert tr.end() == ["new/deep/g.txt"]
    tr.close()


def test_file_tracker_overflow_falls_back_to_walk(tmp_path):
    from servers.sandbox.filewatch import FileTracker

    root = tmp_path / "w"
    root.mkdir()
    (root / "old.txt").write_text("old")
    os.utime(root / "old.txt", (time.time() - 60, time.time() - 60))
    tr = FileTracker(root)
    if tr.mode != "inotify":
        pytest.skip("inotify unavailable")
    tr.begin()
    (root / "new.txt").write_text("new")
    tr._ino.overflow = True  # as if the kernel's event queue had overflowed
    assert tr.end() == ["new.txt"]
    tr.begin()
    (root / "again.txt").write_text("x")
    assert tr.end() == ["again.txt"]  # inotify re-armed
    tr.close()


# -- cancellation, network switch, CLI ---------------------------------------------------------------


def test_cancellation_kills_and_restarts(dirs):
    from servers.common.errors import Cancelled

    ws, data = dirs
    calls = []

    def progress(done, total, msg):
        calls.append(done)
        if done >= 0.4:
            raise Cancelled("cancelled by the client")

    with Kernel(workspace=ws, data_root=data) as kern:
        kern.execute("v = 1")
        t = time.monotonic()
        with pytest.raises(Cancelled):
            kern.execute("import time\ntime.sleep(20)", timeout_s=30, progress=progress)
        assert time.monotonic() - t < 5 and calls and calls[-1] <= 2.0
        assert kern.n_restarts == 1
        r = kern.execute("'v' in dir()")
        assert r.ok and r.value == "False"


@pytest.mark.skipif(not HAS_BWRAP, reason="bubblewrap unavailable")
def test_network_switch(dirs):
    import socket

    ws, data = dirs
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    code = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.close()\n'connected'"
    try:
        with Kernel(policy=SandboxPolicy(network=False), workspace=ws, data_root=data) as kern:
            assert kern.execute(code).error_type == "ConnectionRefusedError"
        with Kernel(policy=SandboxPolicy(network=True), workspace=ws, data_root=data) as kern:
            assert kern.execute(code).value == "'connected'"  # the switch really controls access
    finally:
        srv.close()


def test_cli_run(capsys):
    import argparse

    from servers.sandbox import cli

    p = argparse.ArgumentParser()
    cli.add_parser(p.add_subparsers())
    args = p.parse_args(["sandbox", "run", "print('out')\n6 * 7"])
    assert args.func(args) == 0
    assert capsys.readouterr().out == "out\n42\n"
    args = p.parse_args(["sandbox", "run", "--json", "1 / 0"])
    assert args.func(args) == 1
    import json

    d = json.loads(capsys.readouterr().out)
    assert d["error_type"] == "ZeroDivisionError" and d["ok"] is False


def test_seccomp_program_layout():
    import struct

    from servers.sandbox import seccomp

    prog = seccomp.program("x86_64")
    insns = [struct.unpack("=HBBI", prog[i:i + 8]) for i in range(0, len(prog), 8)]
    assert insns[0] == (0x20, 0, 0, 4) and insns[1] == (0x15, 1, 0, 0xC000003E)
    assert insns[-2] == (0x06, 0, 0, 0x7FFF0000) and insns[-1][3] == 0x00050000 | 1  # allow, then EPERM
    deny = len(insns) - 1
    checks = insns[4:-2]
    assert {k for op, _, _, k in checks if op == 0x15} == {v[0] for v in seccomp.DENIED.values()}
    assert all(i + 4 + 1 + jt == deny for i, (_, jt, _, _) in enumerate(checks))  # every check jumps to deny
    assert len(seccomp.program("aarch64")) == 8 * (4 + len({v[1] for v in seccomp.DENIED.values()}) + 2)
    with pytest.raises(ValueError):
        seccomp.program("sparc")
