"""Escape suite: untrusted code tries to get out of a bubblewrap sandbox kernel.

Every case asserts containment *and* that the kernel still serves the next call (with its state,
unless the case is one where the kernel must be restarted). The whole suite needs bubblewrap and
is skipped where it cannot run: in the unisolated fallback several of these cases would really
escape (and ``os.kill(-1, 9)`` would hit the host).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import pytest

from servers.sandbox.isolation import REPO_ROOT, probe_bwrap
from servers.sandbox.kernel import Kernel, SandboxPolicy

pytestmark = pytest.mark.skipif(not probe_bwrap()[0], reason=f"bubblewrap unavailable: {probe_bwrap()[1]}")

SECRET = "s3cr3t-" + os.urandom(6).hex()
MAX_PROCS = 24


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    base = tmp_path_factory.mktemp("escape")
    ws, data, outside = base / "workspace", base / "data", base / "outside"
    for d in (ws, data, outside):
        d.mkdir()
    (data / "readme.txt").write_text("data file")
    (outside / "secret.txt").write_text(SECRET)
    from servers.common.workspace import Workspace

    Workspace(ws)  # creates index.sqlite, which the kernel must not be able to change
    old = {k: os.environ.get(k) for k in ("CYTOAGENT_TEST_SECRET", "ANTHROPIC_API_KEY")}
    os.environ["CYTOAGENT_TEST_SECRET"] = SECRET
    os.environ["ANTHROPIC_API_KEY"] = SECRET
    policy = SandboxPolicy(memory_mb=1024, max_processes=MAX_PROCS, max_file_mb=32, cpu_seconds=20,
                           max_output_chars=5000, require_isolation=True, isolation="bubblewrap", tmp_mb=64)
    k = Kernel(policy=policy, workspace=ws, data_root=data)
    for key, v in old.items():
        if v is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = v
    assert k.isolation == "bubblewrap"
    yield {"k": k, "ws": ws, "data": data, "outside": outside}
    k.close()


def run(env, code, timeout_s=10):
    if "attempt(" in code:  # (re)define the helper: a restarted kernel has lost it
        code = TRY + code
    return env["k"].execute(code, timeout_s=timeout_s)


def still_serves(env, *, state_kept=True):
    """The next call works; with state_kept the sentinel variable survived."""
    k = env["k"]
    if state_kept:
        r = k.execute("try:\n    _sentinel\nexcept NameError:\n    _sentinel = 0\n_sentinel += 1\n_sentinel")
    else:
        r = k.execute("_sentinel = 1\n21 * 2")
    assert r.ok, r.error
    assert not r.restarted
    if state_kept:
        assert int(r.value) >= 1
        env.setdefault("sentinel", 0)
        assert int(r.value) == env["sentinel"] + 1, "session state was lost"
        env["sentinel"] = int(r.value)
    else:
        assert r.value == "42"
        env["sentinel"] = 1
    assert env["k"].alive


def expect_denied(env, code: str) -> str:
    r = run(env, code)
    assert r.ok, r.error  # the cases print what they saw instead of raising
    return r.stdout


TRY = """
def attempt(fn):
    try:
        out = fn()
        print("ALLOWED", repr(out)[:200])
    except BaseException as e:
        print("DENIED", type(e).__name__, e)
"""


def test_00_sentinel(env):
    r = run(env, "_sentinel = 0\nimport os\nos.getuid(), os.getcwd()")
    assert r.ok and r.isolation == "bubblewrap"
    assert r.value == f"(1000, {str(env['ws'])!r})"
    env["sentinel"] = 0
    assert run(env, TRY).ok
    still_serves(env)


def test_read_file_outside_roots(env):
    out = expect_denied(env, f"attempt(lambda: open({str(env['outside'] / 'secret.txt')!r}).read())")
    assert out.startswith("DENIED FileNotFoundError") and SECRET not in out
    still_serves(env)


def test_read_etc(env):
    for f in ("/etc/passwd", "/etc/shadow", "/etc/hostname", "/etc/hosts"):
        assert Path(f).exists() or f in ("/etc/shadow", "/etc/hostname")
        out = expect_denied(env, f"attempt(lambda: open({f!r}).read())")
        assert out.startswith("DENIED FileNotFoundError"), (f, out)
    still_serves(env)


def test_read_root_home(env):
    r = run(env, "import os\nsorted(os.listdir('/root')) if os.path.isdir('/root') else []")
    assert r.ok
    entries = eval(r.value)  # noqa: S307 — a list of names printed by repr
    # only the Python installation may be visible (pyenv lives under /root here); nothing else
    assert set(entries) <= {".pyenv"}, entries
    for f in ("/root/.bashrc", "/root/.ssh/id_rsa", "/root/.config"):
        out = expect_denied(env, f"attempt(lambda: open({f!r}).read())")
        assert out.startswith("DENIED"), out
    still_serves(env)


def test_read_project_files(env):
    for rel in ("pyproject.toml", "tests/conftest.py", ".git/config", "README.md"):
        p = REPO_ROOT / rel
        out = expect_denied(env, f"attempt(lambda: open({str(p)!r}).read())")
        assert out.startswith("DENIED FileNotFoundError"), (rel, out)
    # the library itself is importable (read-only) — that is the point of mounting it
    r = run(env, "import servers.common.synthetic as s\ns.__file__")
    assert r.ok and "synthetic.py" in r.value
    still_serves(env)


def test_host_processes_invisible_in_proc(env):
    code = (
        "import os\nseen = []\n"
        "for d in os.listdir('/proc'):\n"
        "    if d.isdigit():\n"
        "        try:\n"
        "            seen.append(open(f'/proc/{d}/cmdline','rb').read().replace(b'\\0', b' ').decode())\n"
        "        except OSError:\n"
        "            pass\n"
        "seen"
    )
    r = run(env, code)
    cmdlines = eval(r.value)  # noqa: S307
    assert 1 <= len(cmdlines) <= 4, cmdlines  # bwrap's init + the kernel (+ the read itself)
    # only the sandbox's own processes: bubblewrap's init and the kernel driver — not pytest, not the host
    assert all("bwrap" in c.split(" ")[0] or "driver.py" in c for c in cmdlines), cmdlines
    out = expect_denied(env, f"attempt(lambda: open('/proc/{os.getpid()}/environ','rb').read())")
    assert SECRET not in out
    still_serves(env)


def test_secret_not_in_environment(env):
    r = run(env, "import os\nsorted(os.environ)")
    names = eval(r.value)  # noqa: S307
    assert "CYTOAGENT_TEST_SECRET" not in names and "ANTHROPIC_API_KEY" not in names
    r = run(env, "import os, glob\nblob = ''\n"
                 "for p in glob.glob('/proc/*/environ'):\n"
                 "    try:\n        blob += open(p, 'rb').read().decode(errors='replace')\n"
                 "    except OSError:\n        pass\n"
                 f"{SECRET!r} in blob, len(blob) > 0")
    assert r.value == "(False, True)"
    still_serves(env)


def test_write_outside_workspace(env):
    name = f"cyto-escape-{os.getpid()}-{time.time_ns()}"
    # /tmp is private: the write works inside but never reaches the host
    r = run(env, f"open('/tmp/{name}', 'w').write('x')")
    assert r.ok and not Path(f"/tmp/{name}").exists()
    for target in (f"/usr/{name}", f"/etc/{name}", str(REPO_ROOT / "servers" / f"{name}.py"),
                   str(Path(sys.prefix) / name), str(env["outside"] / name), f"/{name}"):
        out = expect_denied(env, f"attempt(lambda: open({target!r}, 'w').write('x'))")
        assert out.startswith("DENIED"), (target, out)
        assert not Path(target).exists()
    still_serves(env)


def test_write_into_data_root(env):
    target = env["data"] / "readme.txt"
    out = expect_denied(env, f"attempt(lambda: open({str(target)!r}, 'a').write('tampered'))")
    assert "DENIED OSError" in out and "Read-only file system" in out, out
    out = expect_denied(env, f"attempt(lambda: open({str(env['data'] / 'new.txt')!r}, 'w').write('x'))")
    assert out.startswith("DENIED")
    out = expect_denied(env, f"import os\nattempt(lambda: os.remove({str(target)!r}))")
    assert out.startswith("DENIED")
    assert target.read_text() == "data file" and not (env["data"] / "new.txt").exists()
    still_serves(env)


def test_workspace_is_writable_and_index_is_not(env):
    r = run(env, "open('result.txt', 'w').write('hello')")
    assert r.ok and r.files == ["result.txt"]
    assert (env["ws"] / "result.txt").read_text() == "hello"
    before = (env["ws"] / ".index" / "index.sqlite").read_bytes()
    out = expect_denied(env, "attempt(lambda: open('.index/index.sqlite', 'ab').write(b'junk'))")
    assert out.startswith("DENIED"), out
    out = expect_denied(env, "import os\nattempt(lambda: os.remove('.index/index.sqlite'))")
    assert out.startswith("DENIED"), out
    assert (env["ws"] / ".index" / "index.sqlite").read_bytes() == before
    still_serves(env)


def test_symlink_out_of_workspace(env):
    secret = env["outside"] / "secret.txt"
    r = run(env, f"import os\nos.symlink({str(secret)!r}, 'link.txt')\n"
                 "attempt(lambda: open('link.txt').read())")
    assert "DENIED FileNotFoundError" in r.stdout and SECRET not in r.stdout
    # the link exists on the host, but the server's confinement refuses it
    from servers.common.errors import ToolError
    from servers.common.paths import confine

    with pytest.raises(ToolError, match="outside"):
        confine(env["ws"], "link.txt", what="workspace")
    assert "link.txt" not in r.files  # symlinks are never reported / registered
    still_serves(env)


def test_socket_to_host_listener(env):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(5)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    try:
        out = expect_denied(env, "import socket\n"
                                 f"attempt(lambda: socket.create_connection(('127.0.0.1', {port}), timeout=2))")
        assert out.startswith("DENIED"), out
        with pytest.raises(BlockingIOError):
            srv.accept()  # nobody connected
    finally:
        srv.close()
    still_serves(env)


def test_no_outside_network(env):
    out = expect_denied(env, "import socket\nattempt(lambda: socket.create_connection(('1.1.1.1', 80), timeout=2))")
    assert out.startswith("DENIED"), out
    out = expect_denied(env, "import socket\nattempt(lambda: socket.getaddrinfo('pypi.org', 443))")
    assert out.startswith("DENIED"), out
    r = run(env, "import socket\nsorted(n for _, n in socket.if_nameindex())")
    assert r.value == "['lo']"
    still_serves(env)


def test_subprocess_bomb_is_capped(env):
    code = (
        "import subprocess\nprocs, err = [], None\n"
        "try:\n"
        "    for _ in range(500):\n"
        "        procs.append(subprocess.Popen(['sleep', '30']))\n"
        "except OSError as e:\n"
        "    err = type(e).__name__\n"
        "n = len(procs)\n"
        "for p in procs:\n    p.kill()\n    p.wait()\n"
        "(n, err)"
    )
    r = run(env, code, timeout_s=30)
    n, err = eval(r.value)  # noqa: S307
    assert err is not None and 1 <= n <= MAX_PROCS + 8, (n, err)
    still_serves(env)


def test_os_system_bomb_is_capped(env):
    code = (
        "import os, time\n"
        "os.system('for i in $(seq 1 400); do sleep 30 & done 2>/dev/null')\n"
        "time.sleep(0.2)\n"
        "pids = [int(d) for d in os.listdir('/proc') if d.isdigit()\n"
        "        and open(f'/proc/{d}/cmdline','rb').read().startswith(b'sleep')]\n"
        "for p in pids:\n    os.kill(p, 9)\n"
        "len(pids)"
    )
    r = run(env, code, timeout_s=30)
    assert r.ok, r.error
    assert 1 <= int(r.value) <= MAX_PROCS + 8, r.value
    still_serves(env)


def test_fork_bomb_is_capped(env):
    code = (
        "import os\nerr = None\nn = 0\n"
        "try:\n"
        "    while True:\n"
        "        pid = os.fork()\n"
        "        n += 1\n"
        "except OSError as e:\n"
        "    err = type(e).__name__\n"
        "err"
    )
    r = run(env, code, timeout_s=30)
    assert r.ok, r.error
    assert r.value in ("'BlockingIOError'", "'OSError'"), r.value
    r = run(env, "import os\nlen([d for d in os.listdir('/proc') if d.isdigit()])")
    assert int(r.value) <= MAX_PROCS + 8  # never more than the cap
    # forked copies of a threaded process can deadlock, so clean up explicitly (kill everything else)
    r = run(env, "import os, signal, time\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept ProcessLookupError:\n"
                 "    pass\ntime.sleep(0.2)")
    assert r.ok, r.error
    r = run(env, "len([d for d in os.listdir('/proc') if d.isdigit()])")  # killed children reaped
    assert int(r.value) == 2, r.value  # bubblewrap's init and the kernel
    still_serves(env)


def test_memory_bomb(env):
    r = run(env, "x = bytearray(8 * 1024**3)")
    assert not r.ok and r.error_type == "MemoryError" and not r.restarted
    r = run(env, "chunks = []\ntry:\n    while True:\n        chunks.append(bytearray(64 * 1024**2))\n"
                 "except MemoryError:\n    n = len(chunks)\n    del chunks\nn")
    assert r.ok and 1 <= int(r.value) <= 1024 // 64
    still_serves(env)


def test_infinite_loop_is_interrupted_state_kept(env):
    t = time.monotonic()
    r = run(env, "while True:\n    pass", timeout_s=1)
    assert time.monotonic() - t < 3
    assert not r.ok and r.error_type == "Timeout" and not r.restarted
    still_serves(env)


def test_loop_ignoring_interrupt_is_killed(env):
    code = ("import signal, time\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n"
            "while True:\n    try:\n        time.sleep(1)\n    except BaseException:\n        pass")
    t = time.monotonic()
    r = env["k"].execute(code, timeout_s=1)
    assert time.monotonic() - t < 8
    assert not r.ok and r.restarted and "state" in r.error
    still_serves(env, state_kept=False)


def test_huge_output_is_capped(env):
    t = time.monotonic()
    r = run(env, "print('x' * 100_000_000)\nimport os\nos.write(2, b'y' * 30_000_000)\n'done'", timeout_s=30)
    assert r.ok and r.value == "'done'"
    assert len(r.stdout) <= 5000 and len(r.stderr) <= 5000
    assert r.truncated_chars >= 100_000_001 + 30_000_000 - 10_000
    assert time.monotonic() - t < 10
    still_serves(env)


def test_file_size_limit(env):
    r = run(env, "f = open('big.bin', 'wb')\nerr = None\ntry:\n    for _ in range(100):\n"
                 "        f.write(b'0' * 1024**2)\n        f.flush()\nexcept OSError as e:\n    err = e.errno\n"
                 "f.close()\nerr")
    import errno

    assert r.value == str(errno.EFBIG)
    assert (env["ws"] / "big.bin").stat().st_size <= 32 * 1024**2
    (env["ws"] / "big.bin").unlink()
    still_serves(env)


def test_ctypes_privileged_calls_fail(env):
    code = (
        "import ctypes, ctypes.util, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        "res = {}\n"
        "res['unshare_user'] = libc.unshare(0x10000000)\n"           # CLONE_NEWUSER
        "res['unshare_ns'] = libc.unshare(0x00020000)\n"             # CLONE_NEWNS
        "res['mount'] = libc.mount(b'none', b'/mnt', b'tmpfs', 0, None)\n"
        "res['setuid0'] = libc.setuid(0)\n"
        f"res['ptrace_server'] = libc.ptrace(16, {os.getpid()}, None, None)\n"  # PTRACE_ATTACH
        "res['chroot'] = libc.chroot(b'/tmp')\n"
        "res['uid'] = os.getuid()\n"
        "res"
    )
    r = run(env, code)
    res = eval(r.value)  # noqa: S307
    for key in ("unshare_user", "unshare_ns", "mount", "setuid0", "ptrace_server", "chroot"):
        assert res[key] == -1, (key, res)
    assert res["uid"] == 1000
    still_serves(env)


def test_ctypes_segfault_restarts_kernel(env):
    r = run(env, "import ctypes\nctypes.string_at(0)")
    assert not r.ok and r.restarted and r.error_type == "KernelDied" and "SIGSEGV" in r.error
    still_serves(env, state_kept=False)


def test_signal_tricks_cannot_reach_the_server(env):
    me = os.getpid()
    code = (
        "import os, signal\nres = {}\n"
        f"try:\n    os.kill({me}, signal.SIGKILL); res['server'] = 'sent'\n"
        "except OSError as e:\n    res['server'] = type(e).__name__\n"
        "for sig in (signal.SIGKILL, signal.SIGTERM):\n"
        "    try:\n        os.kill(1, sig); res.setdefault('init', 'sent')\n"
        "    except OSError as e:\n        res['init'] = type(e).__name__\n"
        "try:\n    os.kill(-1, signal.SIGKILL); res['all'] = 'sent'\n"
        "except OSError as e:\n    res['all'] = type(e).__name__\n"
        "res"
    )
    r = run(env, code)
    assert r.ok, r.error
    assert os.getpid() == me  # we are still here
    res = eval(r.value)  # noqa: S307
    assert res["server"] == "ProcessLookupError" or me < 10  # our pid does not exist in its namespace
    still_serves(env)


def test_killing_own_process_restarts(env):
    r = run(env, "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    assert not r.ok and r.restarted and r.error_type == "KernelDied"
    still_serves(env, state_kept=False)


def test_proc_sys_and_devices(env):
    out = expect_denied(env, "attempt(lambda: open('/proc/sys/kernel/hostname', 'w').write('pwned'))")
    assert out.startswith("DENIED"), out
    assert socket.gethostname() != "pwned"
    r = run(env, "import os\nsorted(os.listdir('/dev'))")
    devs = eval(r.value)  # noqa: S307
    assert not any(d.startswith(("sd", "nvme", "vd", "mem", "kmem", "port")) for d in devs), devs
    out = expect_denied(env, "attempt(lambda: open('/sys/kernel/notes', 'rb').read())")
    assert out.startswith("DENIED FileNotFoundError")
    still_serves(env)


def test_protocol_forgery_does_not_break_the_server(env):
    # garbage on the reply channel: the host notices and restarts the kernel
    r = run(env, "import os\nos.write(1001, b'\\xff\\xff\\xff\\xff garbage')\nimport time\ntime.sleep(0.5)")
    assert r.restarted or r.ok
    still_serves(env, state_kept=not r.restarted)


def test_thread_bomb_is_capped(env):
    code = (
        "import threading, time\nev = threading.Event()\nthreads, err = [], None\n"
        "try:\n"
        "    for _ in range(1000):\n"
        "        t = threading.Thread(target=ev.wait)\n        t.start()\n        threads.append(t)\n"
        "except RuntimeError as e:\n    err = str(e)\n"
        "ev.set()\nfor t in threads:\n    t.join()\n"
        "len(threads), err"
    )
    r = run(env, code, timeout_s=30)
    n, err = eval(r.value)  # noqa: S307
    assert err == "can't start new thread" and n <= MAX_PROCS + 8, (n, err)
    still_serves(env)


def test_private_tmp_is_size_capped(env):
    # many files below the file-size cap: the 64 MB tmpfs fills up (ENOSPC), not the host's RAM
    r = run(env, "import os\nerr, written = None, 0\ntry:\n    for i in range(20):\n"
                 "        with open(f'/tmp/fill{i}', 'wb') as f:\n            for _ in range(16):\n"
                 "                f.write(b'0' * 2**20)\n                written += 1\n"
                 "except OSError as e:\n    err = e.errno\n"
                 "for n in os.listdir('/tmp'):\n    if n.startswith('fill'):\n        os.remove('/tmp/' + n)\n"
                 "err, written")
    import errno

    err, written = eval(r.value)  # noqa: S307
    assert err == errno.ENOSPC and written <= 64, (err, written)
    still_serves(env)


def test_proc_root_links_stay_inside(env):
    for target in ("/proc/1/root/etc/passwd", "/proc/self/root/etc/passwd", "/proc/1/cwd/../../etc/shadow"):
        out = expect_denied(env, f"attempt(lambda: open({target!r}).read())")
        assert out.startswith("DENIED"), (target, out)
    still_serves(env)


def test_no_new_privileges(env):
    r = run(env, "[l for l in open('/proc/self/status').read().splitlines() "
                 "if l.startswith(('NoNewPrivs', 'CapEff', 'CapPrm', 'CapBnd'))]")
    lines = dict(x.split(":\t") for x in eval(r.value))  # noqa: S307
    assert lines["NoNewPrivs"].strip() == "1"
    assert int(lines["CapEff"], 16) == 0 and int(lines["CapPrm"], 16) == 0 and int(lines["CapBnd"], 16) == 0
    still_serves(env)


@pytest.mark.skipif(not __import__("servers.sandbox.seccomp", fromlist=["x"]).supported(),
                    reason="no seccomp filter for this architecture")
def test_seccomp_denies_kernel_attack_surface(env):
    import platform

    from servers.sandbox.seccomp import DENIED

    col = 0 if platform.machine().lower() in ("x86_64", "amd64") else 1
    names = ["bpf", "io_uring_setup", "userfaultfd", "perf_event_open", "keyctl", "add_key", "ptrace",
             "process_vm_readv", "init_module", "fsopen"]
    calls = "\n".join(f"res[{n!r}] = (libc.syscall({DENIED[n][col]}, 0, 0, 0, 0, 0), ctypes.get_errno())"
                      for n in names)
    r = run(env, f"import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\nres = {{}}\n{calls}\n"
                 "res['getpid'] = (libc.syscall(39 if ctypes.sizeof(ctypes.c_void_p) == 8 and "
                 f"{col} == 0 else 172), 0)\n"
                 + ("res['x32_getpid'] = (libc.syscall(0x40000000 + 39), ctypes.get_errno())\n" if col == 0 else "")
                 + "res")
    res = eval(r.value)  # noqa: S307
    import errno

    for n in names:
        assert res[n] == (-1, errno.EPERM), (n, res[n])
    if col == 0:
        assert res["x32_getpid"] == (-1, errno.EPERM)
    assert res["getpid"][0] > 0  # ordinary system calls still work
    still_serves(env)
