"""A persistent, isolated Python kernel: start it, run code in it, get output, values and figures.

    from servers.sandbox.kernel import Kernel, SandboxPolicy
    k = Kernel(policy=SandboxPolicy(memory_mb=2048))
    r = k.execute("import numpy as np\\nx = np.arange(5)\\nx.sum()")
    r.value  # '10'
    k.execute("x * 2").value  # state persists between calls
    k.close()

The kernel is a separate process (under bubblewrap when it works, see ``isolation``); it talks to
this object over two private pipes with length-prefixed JSON. Wall-clock timeouts first interrupt
the code inside the kernel (state kept); a kernel that does not answer within a grace period, or
that dies (memory, signals, ``os._exit``), is killed and restarted and the result says
``restarted=True`` (state lost).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import select
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

from servers.common.errors import Cancelled, ToolError
from servers.sandbox.isolation import (
    REPO_ROOT,
    PidsCgroup,
    SandboxPolicy,
    bwrap_argv,
    choose_isolation,
    sandbox_env,
)

__all__ = ["Kernel", "ExecResult", "SandboxPolicy", "KernelDied"]

log = logging.getLogger("cytoagent.sandbox")

DRIVER = Path(__file__).resolve().parent / "driver.py"
GRACE_S = 2.0  # after the in-kernel timeout fires, how long to wait before killing the kernel
MAX_REPLY_BYTES = 256 * 1024 * 1024
MAX_TIMEOUT_S = 24 * 3600
_SYSTEM_DIRS = {"/usr", "/etc", "/bin", "/sbin", "/lib", "/lib64", "/proc", "/sys", "/dev", "/root", "/home",
                "/var", "/boot", "/tmp", "/run"}


class KernelDied(RuntimeError):
    """The kernel process ended or stopped answering."""


@dataclass
class ExecResult:
    """What one ``Kernel.execute`` call produced.

    Attributes:
        ok: No exception escaped the code and the kernel survived.
        stdout / stderr: Captured output (Python-level and file-descriptor level), capped.
        value: ``repr`` of the last expression (None when the code does not end in an expression
            or it evaluated to None).
        error: Readable traceback (or a message about a timeout / killed kernel) when not ok.
        error_type: Exception class name, "Timeout", "KernelDied" …
        figures: PNG bytes of matplotlib figures open at the end (they are then closed).
        files: Workspace-relative paths of regular files created or modified by this call.
        restarted: The kernel was killed and started again; all session state was lost.
        isolation: "bubblewrap" or "none".
        warnings: Messages the caller must see (e.g. the missing-isolation warning).
        duration_s: Wall time of the call as seen by the host.
        truncated_chars: Characters of output/value cut to respect the output cap.
    """

    ok: bool
    stdout: str = ""
    stderr: str = ""
    value: str | None = None
    error: str | None = None
    error_type: str | None = None
    figures: list[bytes] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    restarted: bool = False
    isolation: str = "none"
    warnings: list[str] = field(default_factory=list)
    duration_s: float = 0.0
    truncated_chars: int = 0

    def to_dict(self, *, figures: bool = False) -> dict:
        d = asdict(self)
        d["n_figures"] = len(self.figures)
        if figures:
            d["figures"] = [base64.b64encode(f).decode() for f in self.figures]
        else:
            d.pop("figures")
        return d


class Kernel:
    """One persistent sandboxed Python process.

    Args:
        policy: Limits and isolation settings (defaults: ``SandboxPolicy()``).
        workspace: Read-write directory (default: the configured workspace).
        data_root: Read-only data directory (default: the configured data root).
        extra_ro_paths: More files/directories mounted read-only at the same path.
        track_files: Report workspace files each call created/modified (inotify; a directory walk
            per call where inotify is unavailable).
        preload: Modules imported when the kernel starts (e.g. ``["numpy"]``), to make the first
            call fast.
    """

    def __init__(
        self,
        policy: SandboxPolicy | None = None,
        workspace: str | os.PathLike | None = None,
        data_root: str | os.PathLike | None = None,
        extra_ro_paths: list[str | os.PathLike] | tuple = (),
        *,
        track_files: bool = True,
        preload: list[str] | tuple = (),
    ):
        from servers.common.config import get_config

        cfg = get_config()
        self.policy = policy or SandboxPolicy(max_output_chars=cfg.limits.max_output_chars)
        self.policy.validate()
        require = cfg.require_isolation if self.policy.require_isolation is None else self.policy.require_isolation
        self.isolation, self._warnings = choose_isolation(self.policy, bool(require))
        self.workspace = Path(workspace or cfg.workspace).expanduser().resolve()
        self.data_root = Path(data_root or cfg.data_root).expanduser().resolve()
        self.workspace.mkdir(parents=True, exist_ok=True)
        if not self.data_root.exists():
            try:  # the default data root may not exist yet: an empty one is harmless
                self.data_root.mkdir(parents=True, exist_ok=True)
            except OSError:
                pass
        if not self.data_root.is_dir():
            raise ToolError(f"Data root {self.data_root} is not a directory.",
                            hint="Set CYTOAGENT_DATA_ROOT to an existing folder.")
        for what, p in (("workspace", self.workspace), ("data root", self.data_root)):
            if p == Path("/") or str(p) in _SYSTEM_DIRS or p == Path.home().resolve():
                raise ToolError(f"The {what} {p} is a system or home directory; the sandbox would expose it whole.",
                                hint=f"Point the {what} at a dedicated folder.")
        self.extra_ro_paths = [Path(p).resolve() for p in extra_ro_paths]
        self.track_files = track_files
        self._tracker = None
        if track_files:
            from servers.sandbox.filewatch import FileTracker

            self._tracker = FileTracker(self.workspace)
        self.preload = list(preload)
        self._lock = threading.RLock()
        self._proc: subprocess.Popen | None = None
        self._wfd: int | None = None
        self._rfd: int | None = None
        self._cgroup: PidsCgroup | None = None
        self._stderr_file = None
        self.pid_inside: int | None = None
        self.uid_inside: int | None = None
        self.python_version: str | None = None
        self.started_at = 0.0
        self.last_used = time.time()
        self.n_calls = 0
        self.n_restarts = 0
        self._closed = False
        self.busy = False
        self.seccomp_active = False
        self._tick = None
        self._finalizer = weakref.finalize(self, Kernel._cleanup, {"proc": None, "cg": None})
        try:
            self._start()
        except BaseException:
            if self._tracker is not None:
                self._tracker.close()
            raise

    # -- lifecycle ------------------------------------------------------------------------------------
    @staticmethod
    def _cleanup(state: dict) -> None:
        proc, cg = state.get("proc"), state.get("cg")
        if proc is not None and proc.poll() is None:
            try:
                proc.kill()
                proc.wait(timeout=5)
            except Exception:  # noqa: BLE001
                pass
        if cg is not None:
            cg.remove()

    @property
    def warnings(self) -> list[str]:
        return list(self._warnings)

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and not self._closed

    def _driver_config(self, rfd: int, wfd: int) -> dict:
        p = self.policy
        nproc = None
        if self._cgroup is None or self._cgroup.path is None:
            # RLIMIT_NPROC counts every process of the (outside) user; give headroom over the current count
            if os.getuid() != 0:
                nproc = _count_user_tasks(os.getuid()) + p.max_processes + 16
        return {
            "rfd": rfd, "wfd": wfd, "memory_mb": p.memory_mb, "max_file_mb": p.max_file_mb,
            "cpu_seconds": p.cpu_seconds, "max_output_chars": p.max_output_chars, "nproc": nproc,
            "max_figures": p.max_figures, "figure_dpi": p.figure_dpi, "preload": self.preload,
            "sys_path": [str(REPO_ROOT)],
        }

    def _start(self) -> None:
        p = self.policy
        h2k_r, h2k_w = os.pipe()
        k2h_r, k2h_w = os.pipe()
        # 8 = bwrap's two processes, the driver and a few runtime threads
        self._cgroup = PidsCgroup(p.max_processes + 8)
        cfg = self._driver_config(h2k_r, k2h_w)
        py = [sys.executable, "-I", str(DRIVER), json.dumps(cfg)]
        env = sandbox_env(p, self.workspace, self.data_root, self.isolation)
        pass_fds = [h2k_r, k2h_w]
        self.seccomp_active = False
        if self.isolation == "bubblewrap":
            from servers.sandbox import seccomp

            sfd = None
            if p.seccomp and seccomp.supported():
                sfd = _readable_fd(seccomp.program())
                pass_fds.append(sfd)
                self.seccomp_active = True
            argv = bwrap_argv(p, self.workspace, self.data_root, self.extra_ro_paths, seccomp_fd=sfd) + py
        else:
            argv = py
        if self._cgroup.procs_file:
            # join the cgroup before exec, so no child escapes the cap
            argv = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', self._cgroup.procs_file, *argv]
        self._stderr_file = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr_file,
                pass_fds=tuple(pass_fds), env=env, cwd=str(self.workspace), start_new_session=True,
                close_fds=True,
            )
        finally:
            for fd in pass_fds:
                os.close(fd)
        self._wfd, self._rfd = h2k_w, k2h_r
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, Kernel._cleanup, {"proc": self._proc, "cg": self._cgroup})
        try:
            hello = self._recv(time.monotonic() + p.startup_timeout_s)
        except KernelDied as e:
            err = self._stderr_text()
            self._kill()
            raise ToolError(f"The sandbox kernel failed to start: {e}. {err}".strip()) from None
        self.pid_inside = hello.get("pid")
        self.uid_inside = hello.get("uid")
        self.python_version = hello.get("python")
        self.started_at = time.time()

    def _stderr_text(self) -> str:
        f = self._stderr_file
        if f is None:
            return ""
        try:
            f.seek(0)
            return f.read(4000).decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""

    def _kill(self) -> None:
        proc, cg = self._proc, self._cgroup
        if proc is not None:
            try:
                os.killpg(proc.pid, 9)
            except OSError:
                pass
            try:
                proc.kill()
            except OSError:
                pass
        if cg is not None:
            cg.kill_all()
        if proc is not None:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("sandbox: kernel %s did not exit after SIGKILL", proc.pid)
        if cg is not None:
            cg.remove()
        for fd in (self._wfd, self._rfd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wfd = self._rfd = None
        if self._stderr_file is not None:
            self._stderr_file.close()
            self._stderr_file = None
        self._proc = None
        self._cgroup = None

    def close(self) -> None:
        """Stop the kernel (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._kill()
            if self._tracker is not None:
                self._tracker.close()
            self._finalizer.detach()

    def reset(self) -> None:
        """Restart the kernel with a fresh interpreter (all variables and imports are lost)."""
        with self._lock:
            if self._closed:
                raise ToolError("This kernel was closed.", hint="Create a new session.")
            self._kill()
            self._start()

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- protocol -------------------------------------------------------------------------------------
    def _send(self, obj: dict) -> None:
        data = json.dumps(obj).encode()
        buf = memoryview(struct.pack(">I", len(data)) + data)
        try:
            while buf:
                n = os.write(self._wfd, buf)
                buf = buf[n:]
        except (OSError, TypeError) as e:
            raise KernelDied(f"could not send to the kernel ({e})") from None

    def _read_exact(self, n: int, deadline: float) -> bytes:
        chunks, got = [], 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([self._rfd], [], [], min(left, 0.5))
            if not ready:
                if self._tick is not None:
                    self._tick()
                if self._proc is None or self._proc.poll() is not None:
                    raise KernelDied(self._exit_reason())
                continue
            b = os.read(self._rfd, min(n - got, 1 << 20))
            if not b:
                try:
                    self._proc.wait(timeout=2)
                except (subprocess.TimeoutExpired, AttributeError):
                    pass
                raise KernelDied(self._exit_reason())
            chunks.append(b)
            got += len(b)
        return b"".join(chunks)

    def _recv(self, deadline: float) -> dict:
        (n,) = struct.unpack(">I", self._read_exact(4, deadline))
        if n > MAX_REPLY_BYTES:
            raise KernelDied(f"the kernel sent an oversized reply ({n} bytes)")
        try:
            return json.loads(self._read_exact(n, deadline))
        except (ValueError, UnicodeDecodeError) as e:
            raise KernelDied(f"the kernel sent a malformed reply ({e})") from None

    def _exit_reason(self) -> str:
        rc = self._proc.poll() if self._proc is not None else None
        if rc is None:
            return "the kernel closed its reply channel"
        sig = -rc if rc < 0 else (rc - 128 if self.isolation == "bubblewrap" and 128 < rc < 160 else 0)
        if sig:  # bubblewrap reports a child killed by signal N as exit status 128 + N
            import signal

            try:
                name = signal.Signals(sig).name
            except ValueError:
                name = str(sig)
            return f"the kernel was killed by {name}"
        return f"the kernel exited with status {rc}"

    # -- execution ------------------------------------------------------------------------------------
    def execute(self, code: str, timeout_s: float = 30, progress=None, *,
                max_output_chars: int | None = None) -> ExecResult:
        """Run ``code`` in the kernel and return what it produced (see ``ExecResult``).

        Args:
            code: Python source; if it ends in an expression, its ``repr`` is returned as ``value``.
            timeout_s: Wall-clock limit. The code is interrupted inside the kernel first (state kept);
                if the kernel does not answer within a 2 s grace it is killed and restarted.
            progress: Optional ``progress(done_s, total_s, message)`` called about every 0.5 s while
                the code runs; if it raises ``Cancelled`` the kernel is killed and restarted (state
                lost) and ``Cancelled`` propagates.
            max_output_chars: Override the policy's output cap for this call.
        """
        if not isinstance(code, str):
            raise ToolError(f"code must be a string of Python source, not {type(code).__name__}.")
        try:
            timeout_s = float(timeout_s)
        except (TypeError, ValueError):
            raise ToolError(f"timeout_s must be a number of seconds, not {timeout_s!r}.") from None
        if not (0 < timeout_s <= MAX_TIMEOUT_S):
            raise ToolError(f"timeout_s={timeout_s} is out of range.", hint=f"Pass 0 < timeout_s <= {MAX_TIMEOUT_S}.")
        with self._lock:
            if self._closed:
                raise ToolError("This kernel was closed.", hint="Create a new session.")
            t0 = time.perf_counter()
            self.last_used = time.time()
            self.n_calls += 1
            restarted = False
            if not self.alive:
                self._kill()
                self._start()
                restarted = True
                self.n_restarts += 1
            if self._tracker is not None:
                self._tracker.begin()
            if progress is not None:
                started = time.monotonic()

                def tick() -> None:
                    progress(round(time.monotonic() - started, 1), timeout_s, "running")

                self._tick = tick
            self.busy = True
            req = {"op": "exec", "code": code, "timeout_s": timeout_s, "cpu_s": self.policy.cpu_seconds,
                   "max_output_chars": int(max_output_chars or self.policy.max_output_chars)}
            try:
                self._send(req)
                reply = self._recv(time.monotonic() + timeout_s + GRACE_S)
                res = self._result_from_reply(reply)
                if res.error_type == "ExecutionTimeout":
                    res.error_type = "Timeout"
                    res.error = (f"{res.error}\nTimeoutError: the code ran longer than timeout_s={timeout_s:g} s and "
                                 "was interrupted; the session state is kept.")
                elif res.error_type == "CPUTimeExceeded":
                    res.error = (f"{res.error}\nThe code used more than cpu_seconds={self.policy.cpu_seconds:g} s of "
                                 "CPU and was interrupted; the session state is kept.")
            except TimeoutError:
                self._kill()
                self._start()
                self.n_restarts += 1
                res = ExecResult(ok=False, error_type="Timeout", restarted=True, error=(
                    f"TimeoutError: the code ran longer than timeout_s={timeout_s:g} s and did not respond to the "
                    "interrupt, so the kernel was killed and restarted. All session state (variables, imports) "
                    "was lost."))
            except Cancelled:
                self._kill()
                self._start()
                self.n_restarts += 1
                raise
            except KernelDied as e:
                reason = str(e)
                self._kill()
                self._start()
                self.n_restarts += 1
                res = ExecResult(ok=False, error_type="KernelDied", restarted=True, error=(
                    f"KernelDied: {reason} (likely a resource limit: memory_mb={self.policy.memory_mb}, "
                    f"max_processes={self.policy.max_processes}, or the code ended the process). The kernel "
                    "was restarted; all session state (variables, imports) was lost."))
            finally:
                self._tick = None
                self.busy = False
            res.restarted = res.restarted or restarted
            res.isolation = self.isolation
            res.warnings = [*self._warnings, *res.warnings]
            if self._tracker is not None:
                res.files = self._tracker.end()
            res.duration_s = time.perf_counter() - t0
            self.last_used = time.time()
            return res

    @staticmethod
    def _result_from_reply(reply: dict) -> ExecResult:
        figs = []
        for f in reply.get("figures") or []:
            try:
                figs.append(base64.b64decode(f))
            except (ValueError, TypeError):
                continue
        return ExecResult(
            ok=bool(reply.get("ok")),
            stdout=str(reply.get("stdout") or ""),
            stderr=str(reply.get("stderr") or ""),
            value=reply.get("value") if isinstance(reply.get("value"), str) else None,
            error=reply.get("error") if isinstance(reply.get("error"), str) else None,
            error_type=reply.get("error_type") if isinstance(reply.get("error_type"), str) else None,
            figures=figs,
            truncated_chars=int(reply.get("truncated_chars") or 0),
        )

    def ping(self, timeout_s: float = 5) -> bool:
        """True when the kernel answers."""
        with self._lock:
            if not self.alive:
                return False
            try:
                self._send({"op": "ping"})
                return bool(self._recv(time.monotonic() + timeout_s).get("ok"))
            except (KernelDied, TimeoutError):
                return False

    def info(self) -> dict:
        return {
            "alive": self.alive, "isolation": self.isolation, "workspace": str(self.workspace),
            "data_root": str(self.data_root), "python": self.python_version, "uid_inside": self.uid_inside,
            "process_cap": "cgroup" if (self._cgroup and self._cgroup.path) else "rlimit",
            "seccomp": self.seccomp_active,
            "calls": self.n_calls, "restarts": self.n_restarts, "started_at": self.started_at,
            "last_used": self.last_used, "policy": asdict(self.policy), "warnings": self.warnings,
        }


def _readable_fd(data: bytes) -> int:
    """A file descriptor from which ``data`` can be read (a pipe when it fits, else a temp file)."""
    if len(data) < 60_000:
        r, w = os.pipe()
        os.write(w, data)
        os.close(w)
        return r
    f = tempfile.TemporaryFile()
    f.write(data)
    f.flush()
    f.seek(0)
    fd = os.dup(f.fileno())
    f.close()
    return fd


def _count_user_tasks(uid: int) -> int:
    """Processes + threads of ``uid`` (Linux /proc; elsewhere a generous guess)."""
    if not os.path.isdir("/proc/self/task"):
        return 2048
    n = 0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{d}")
            if st.st_uid == uid:
                n += len(os.listdir(f"/proc/{d}/task"))
        except OSError:
            continue
    return n
