"""How a sandbox kernel process is confined: the policy, the bubblewrap command line, cgroups.

Two modes:

* ``"bubblewrap"`` — the kernel runs under ``bwrap`` with its own user, PID, network, IPC, UTS and
  cgroup namespaces, all capabilities dropped, no nested user namespaces, a fresh ``/proc``, a
  minimal ``/dev``, a private size-capped ``/tmp``, no home directory, only the system libraries,
  the Python installation, the project's library packages and the data root mounted read-only, and
  the workspace mounted read-write. The environment is rebuilt from scratch (nothing from the
  server's environment — API keys, tokens — reaches the kernel).
* ``"none"`` — bubblewrap cannot run: a plain subprocess with the same rlimits and scrubbed
  environment, and a loud warning in every result. ``require_isolation`` refuses this mode.

Both modes apply rlimits inside the kernel (address space, file size, CPU per call) and, where
the host lets us create one, a ``pids`` cgroup that caps the number of processes and threads
(RLIMIT_NPROC alone does not bind a root-owned kernel).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from servers.common.errors import ToolError
from servers.common.workspace import INDEX_DIR

log = logging.getLogger("cytoagent.sandbox")

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
#: Packages of the repository mounted (read-only) into the kernel so user code can import them.
LIBRARY_PACKAGES = ("servers", "cytoagent", "client", "evals")

NO_ISOLATION_WARNING = (
    "NO ISOLATION: bubblewrap is not available, so this code ran as a plain subprocess with the "
    "server's own user rights — it can read and write any file that user can, and use the network. "
    "Only resource limits apply. Install bubblewrap (apt-get install bubblewrap) or set "
    "CYTOAGENT_REQUIRE_ISOLATION=1 to refuse running code without it."
)


@dataclass(frozen=True)
class SandboxPolicy:
    """Limits and isolation settings of one kernel.

    Attributes:
        cpu_seconds: CPU time one ``execute`` call may use (the call is interrupted with an error).
        memory_mb: Address-space limit of each kernel process (MB); allocations beyond raise MemoryError.
        max_processes: Extra processes + threads the kernel may create (fork bombs stop here).
        max_file_mb: Largest file the kernel may write (MB).
        max_output_chars: stdout/stderr/value characters returned per call; the rest is cut and counted.
        network: Allow network access (default False: own empty network namespace).
        require_isolation: Refuse to start without bubblewrap. ``None`` = take it from the config
            (``CYTOAGENT_REQUIRE_ISOLATION``).
        isolation: ``"auto"`` (bubblewrap when it works), ``"bubblewrap"`` (fail without it), ``"none"``.
        threads: Threads for BLAS/OpenMP/numexpr inside the kernel.
        seccomp: Deny unneeded kernel interfaces (bpf, io_uring, ptrace, mount, keyrings …) with a
            seccomp filter (bubblewrap mode, x86_64/aarch64).
        tmp_mb: Size of the private in-memory ``/tmp`` (and ``/dev/shm``) in MB.
        max_figures: Matplotlib figures returned per call.
        figure_dpi: Resolution of returned figures.
        startup_timeout_s: How long a kernel may take to start.
    """

    cpu_seconds: float = 300.0
    memory_mb: int = 4096
    max_processes: int = 64
    max_file_mb: int = 512
    max_output_chars: int = 20_000
    network: bool = False
    require_isolation: bool | None = None
    isolation: str = "auto"
    threads: int = 1
    tmp_mb: int = 512
    seccomp: bool = True
    max_figures: int = 8
    figure_dpi: int = 100
    startup_timeout_s: float = 60.0
    extra_env: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        if self.isolation not in ("auto", "bubblewrap", "none"):
            raise ToolError(f"Unknown isolation mode {self.isolation!r}.", hint='Use "auto", "bubblewrap" or "none".')
        for name in ("cpu_seconds", "memory_mb", "max_processes", "max_file_mb", "max_output_chars", "threads",
                     "tmp_mb"):
            if getattr(self, name) <= 0:
                raise ToolError(f"Sandbox policy {name} must be > 0 (got {getattr(self, name)}).")
        if self.memory_mb < 256:
            raise ToolError(f"memory_mb={self.memory_mb} is too small to start Python.", hint="Use >= 256.")


# -- bubblewrap ---------------------------------------------------------------------------------------


def bwrap_path() -> str | None:
    return shutil.which("bwrap") or (("/usr/bin/bwrap") if os.path.exists("/usr/bin/bwrap") else None)


BASE_FLAGS = ("--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
              "--cap-drop", "ALL")


@lru_cache(maxsize=4)
def probe_bwrap(network: bool = False) -> tuple[bool, str]:
    """Whether bubblewrap works here with the flags we use (user namespaces etc.): (ok, reason)."""
    exe = bwrap_path()
    if exe is None:
        return False, "bwrap not found on PATH"
    argv = [exe, *BASE_FLAGS, *(["--share-net"] if network else []), "--uid", "1000", "--gid", "1000",
            "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp", "true"]
    try:
        r = subprocess.run(argv, capture_output=True, timeout=20, env={"PATH": "/usr/bin:/bin"})
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"bwrap failed to run: {e}"
    if r.returncode != 0:
        return False, f"bwrap exited {r.returncode}: {r.stderr.decode(errors='replace').strip()[:300]}"
    return True, "ok"


def choose_isolation(policy: SandboxPolicy, require: bool) -> tuple[str, list[str]]:
    """The mode to run in and warnings to attach to every result."""
    if policy.isolation == "none":
        if require:
            raise ToolError(
                "Running code without isolation was requested, but isolation is required "
                "(CYTOAGENT_REQUIRE_ISOLATION=1 / require_isolation=True).",
                hint="Use isolation='auto' or 'bubblewrap', or unset the requirement.",
            )
        return "none", [NO_ISOLATION_WARNING]
    ok, reason = probe_bwrap(policy.network)
    if ok:
        return "bubblewrap", []
    if require or policy.isolation == "bubblewrap":
        raise ToolError(
            f"Refusing to run code: bubblewrap isolation is required but unavailable ({reason}).",
            hint="Install bubblewrap (apt-get install bubblewrap) and allow user namespaces, "
                 "or unset CYTOAGENT_REQUIRE_ISOLATION to accept the unisolated fallback.",
        )
    log.warning("sandbox: %s (%s)", NO_ISOLATION_WARNING, reason)
    return "none", [NO_ISOLATION_WARNING + f" (reason: {reason})"]


def _python_roots() -> list[Path]:
    """Directories the interpreter needs: the venv and the base installation."""
    roots = {Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), Path(sys.exec_prefix).resolve()}
    exe = Path(sys.executable)
    roots.add(exe.resolve().parent.parent)
    return sorted(roots, key=lambda p: len(p.parts))


def _depth_sorted(paths: list[tuple[str, Path, Path]]) -> list[tuple[str, Path, Path]]:
    return sorted(paths, key=lambda t: len(t[2].parts))


def sandbox_env(policy: SandboxPolicy, workspace: Path, data_root: Path, isolation: str) -> dict[str, str]:
    """The kernel's whole environment (built from scratch, nothing inherited)."""
    n = str(policy.threads)
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp" if isolation == "bubblewrap" else str(workspace),
        "USER": "sandbox",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TMPDIR": "/tmp",
        "PYTHONPATH": str(REPO_ROOT),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "MPLBACKEND": "Agg",
        "MPLCONFIGDIR": "/tmp/matplotlib",
        "OMP_NUM_THREADS": n,
        "OPENBLAS_NUM_THREADS": n,
        "MKL_NUM_THREADS": n,
        "NUMEXPR_NUM_THREADS": n,
        "NUMBA_NUM_THREADS": n,
        "CYTOAGENT_DATA_ROOT": str(data_root),
        "CYTOAGENT_WORKSPACE": str(workspace),
        "CYTOAGENT_IN_SANDBOX": "1",
        "CYTOAGENT_CONFIG": "/nonexistent/cytoagent.toml",
    }
    if isolation == "none":
        import tempfile

        env["TMPDIR"] = tempfile.gettempdir()
        env["MPLCONFIGDIR"] = str(Path(tempfile.gettempdir()) / f"cytoagent-mpl-{os.getuid()}")
    # keep the CPU model hints OpenBLAS needs on some hosts (not secrets)
    for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if k in os.environ:
            env[k] = os.environ[k]
    env.update(policy.extra_env)
    return env


def bwrap_argv(policy: SandboxPolicy, workspace: Path, data_root: Path, extra_ro_paths: list[Path],
               seccomp_fd: int | None = None) -> list[str]:
    """bubblewrap arguments (ending with ``--``) for a kernel with this policy."""
    exe = bwrap_path()
    assert exe is not None
    a: list[str] = [exe, *BASE_FLAGS]
    if policy.network:
        a.append("--share-net")
    a += ["--uid", "1000", "--gid", "1000", "--hostname", "sandbox"]
    # system: /usr and the merged-usr links, the loader configuration; nothing else of /etc
    for d in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        p = Path(d)
        if p.is_symlink():
            a += ["--symlink", os.readlink(p), d]
        elif p.is_dir():
            a += ["--ro-bind", d, d]
    for f in ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d", "/etc/alternatives", "/etc/localtime",
              "/etc/ssl/certs", "/etc/fonts", "/etc/mime.types"):
        a += ["--ro-bind-try", f, f]
    if policy.network:
        for f in ("/etc/resolv.conf", "/etc/hosts", "/etc/nsswitch.conf", "/etc/gai.conf"):
            a += ["--ro-bind-try", f, f]
    a += ["--proc", "/proc", "--ro-bind", "/proc/sys", "/proc/sys", "--dev", "/dev"]
    size = str(int(policy.tmp_mb) * 1024 * 1024)
    a += ["--size", size, "--tmpfs", "/tmp", "--size", size, "--tmpfs", "/dev/shm"]
    mounts: list[tuple[str, Path, Path]] = []
    for root in _python_roots():
        mounts.append(("--ro-bind", root, root))
    for pkg in LIBRARY_PACKAGES:
        p = REPO_ROOT / pkg
        if p.is_dir():
            mounts.append(("--ro-bind", p, p))
    for p in extra_ro_paths:
        p = Path(p).resolve()
        if not p.exists():
            raise ToolError(f"Extra read-only path {p} does not exist.", hint="Pass existing directories or files.")
        mounts.append(("--ro-bind", p, p))
    mounts.append(("--ro-bind", data_root, data_root))
    mounts.append(("--bind", workspace, workspace))
    for flag, src, dst in _depth_sorted(mounts):
        a += [flag, str(src), str(dst)]
    # the artifact index belongs to the servers: visible read-only at most
    index_dir = workspace / INDEX_DIR
    if index_dir.is_dir():
        a += ["--ro-bind", str(index_dir), str(index_dir)]
    for alias, target in (("/workspace", workspace), ("/data", data_root)):
        if str(target) != alias:
            a += ["--symlink", str(target), alias]
    if seccomp_fd is not None:
        a += ["--seccomp", str(seccomp_fd)]
    a += ["--remount-ro", "/", "--chdir", str(workspace), "--"]
    return a


# -- cgroups (process cap) ------------------------------------------------------------------------------


def _own_cgroup(controller: str) -> tuple[Path, str] | None:
    """(mount point, our cgroup path) of a cgroup v1 controller, or of the v2 hierarchy."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    v1 = Path("/sys/fs/cgroup") / controller
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if controller in ctrls.split(",") and v1.is_dir():
            return v1, path
    for line in lines:
        hid, ctrls, path = line.split(":", 2)
        if hid == "0" and ctrls == "":
            for mnt in (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")):
                ctl = mnt / path.lstrip("/") / "cgroup.controllers"
                if ctl.is_file() and controller in ctl.read_text().split():
                    return mnt, path
    return None


def _remove_stale(parent: Path) -> None:
    """Remove empty sandbox cgroups left by server processes that have ended."""
    try:
        entries = list(parent.glob("cytoagent-sandbox-*"))
    except OSError:
        return
    for d in entries:
        try:
            owner = int(d.name.split("-")[2])
        except (IndexError, ValueError):
            continue
        if owner == os.getpid() or Path(f"/proc/{owner}").exists():
            continue
        try:
            d.rmdir()  # fails (EBUSY) while processes are still in it
        except OSError:
            pass


class PidsCgroup:
    """A throwaway pids cgroup capping processes+threads of one kernel (when the host allows it)."""

    _counter = 0
    _lock = threading.Lock()

    def __init__(self, max_pids: int):
        self.path: Path | None = None
        found = _own_cgroup("pids")
        if found is None:
            return
        mnt, rel = found
        _remove_stale(mnt / rel.lstrip("/"))
        with PidsCgroup._lock:
            PidsCgroup._counter += 1
            n = PidsCgroup._counter
        path = mnt / rel.lstrip("/") / f"cytoagent-sandbox-{os.getpid()}-{n}"
        try:
            path.mkdir()
            (path / "pids.max").write_text(str(int(max_pids)))
        except OSError as e:
            log.info("sandbox: no pids cgroup (%s); process cap relies on RLIMIT_NPROC", e)
            try:
                path.rmdir()
            except OSError:
                pass
            return
        self.path = path

    @property
    def procs_file(self) -> str | None:
        return str(self.path / "cgroup.procs") if self.path else None

    def pids(self) -> list[int]:
        if not self.path:
            return []
        try:
            return [int(x) for x in (self.path / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def kill_all(self) -> None:
        if not self.path:
            return
        kill = self.path / "cgroup.kill"
        if kill.exists():
            try:
                kill.write_text("1")
                return
            except OSError:
                pass
        for _ in range(50):  # new processes may appear while we kill (fork bomb): repeat
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            time.sleep(0.01)

    def remove(self) -> None:
        if not self.path:
            return
        self.kill_all()
        for _ in range(100):
            try:
                self.path.rmdir()
                self.path = None
                return
            except FileNotFoundError:
                self.path = None
                return
            except OSError:
                time.sleep(0.02)
        log.warning("sandbox: could not remove cgroup %s", self.path)
