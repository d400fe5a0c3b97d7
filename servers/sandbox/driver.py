"""The program that runs inside a sandbox kernel (standard library only at import time).

Started as ``python -I driver.py CONFIG_JSON``. It applies rlimits, points file descriptors 1 and 2
at in-memory files (so output of C code and subprocesses is captured too), then serves requests:
each request and reply is a 4-byte big-endian length followed by UTF-8 JSON, read from / written
to two private pipe descriptors (never stdout, which user code prints to).

Requests: ``{"op": "exec", "code": str, "timeout_s": float, "cpu_s": float}``, ``{"op": "ping"}``.
"""

from __future__ import annotations

import ast
import base64
import builtins
import io
import json
import linecache
import os
import resource
import signal
import struct
import sys
import time
import traceback

_HERE = os.path.abspath(__file__)
_MAIN_PID = os.getpid()


class ExecutionTimeout(Exception):
    """The wall-clock limit of one call was reached (the kernel and its state are kept)."""


class CPUTimeExceeded(Exception):
    """The CPU-seconds limit of one call was reached (the kernel and its state are kept)."""


class CappedWriter(io.TextIOBase):
    """A text stream that keeps the first ``cap`` characters and counts the rest."""

    def __init__(self, cap: int, name: str):
        self.cap = cap
        self.name = name
        self.parts: list[str] = []
        self.kept = 0
        self.dropped = 0

    def reset(self, cap: int) -> None:
        self.cap, self.parts, self.kept, self.dropped = cap, [], 0, 0

    def writable(self) -> bool:
        return True

    def write(self, s) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        room = self.cap - self.kept
        if room > 0:
            piece = s[:room]
            self.parts.append(piece)
            self.kept += len(piece)
            self.dropped += len(s) - len(piece)
        else:
            self.dropped += len(s)
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    @property
    def encoding(self):
        return "utf-8"

    def fileno(self) -> int:  # C-level writers (faulthandler, subprocess) get the captured fd
        return 1 if self.name == "stdout" else 2

    def getvalue(self) -> str:
        return "".join(self.parts)


def _send(fd: int, obj) -> None:
    data = json.dumps(obj).encode()
    buf = struct.pack(">I", len(data)) + data
    view = memoryview(buf)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes | None:
    chunks = []
    while n:
        b = os.read(fd, n)
        if not b:
            return None
        chunks.append(b)
        n -= len(b)
    return b"".join(chunks)


def _recv(fd: int):
    head = _read_exact(fd, 4)
    if head is None:
        return None
    (n,) = struct.unpack(">I", head)
    body = _read_exact(fd, n)
    return None if body is None else json.loads(body)


def _apply_limits(cfg: dict) -> None:
    mb = 1024 * 1024
    mem = int(cfg["memory_mb"]) * mb
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    fsize = int(cfg["max_file_mb"]) * mb
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    nproc = cfg.get("nproc")
    if nproc:
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (int(nproc), int(nproc)))
        except (ValueError, OSError):
            pass
    # a write past the file-size limit raises OSError(EFBIG) instead of killing the kernel
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


_FORKED: set[int] = set()
_real_fork = os.fork


def _tracking_fork() -> int:
    """``os.fork`` that remembers children, so the kernel can reap the ones that end (a zombie
    would hold one slot of the process cap forever)."""
    pid = _real_fork()
    if pid > 0:
        _FORKED.add(pid)
    else:
        _FORKED.clear()
    return pid


def _reap_forked() -> None:
    if not _FORKED:
        return
    keep = set()
    mp = sys.modules.get("multiprocessing.process")
    if mp is not None:  # multiprocessing waits for its own children
        for p in list(getattr(mp, "_children", ())):
            pid = getattr(getattr(p, "_popen", None), "pid", None)
            if pid:
                keep.add(pid)
    for pid in list(_FORKED):
        if pid in keep:
            continue
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _FORKED.discard(pid)


def _anon_file(name: str) -> int:
    """An unnamed in-memory file (memfd on Linux; an unlinked temporary file elsewhere)."""
    if hasattr(os, "memfd_create"):
        return os.memfd_create(name)
    import tempfile

    fd, path = tempfile.mkstemp(prefix=f"kernel-{name}-")
    os.unlink(path)
    return fd


def _lift_cpu_limit() -> None:
    """No SIGXCPU while the kernel itself works between calls (the next call sets a new budget)."""
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
    except (ValueError, OSError):
        pass


def _format_error(e: BaseException) -> str:
    if isinstance(e, SyntaxError):
        return "".join(traceback.format_exception_only(type(e), e)).rstrip()
    te = traceback.TracebackException(type(e), e, e.__traceback__, compact=True)
    te.stack = traceback.StackSummary.from_list(
        [f for f in te.stack if os.path.abspath(f.filename) != _HERE])
    return "".join(te.format()).rstrip()


class Kernel:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.ns: dict = {"__name__": "__main__", "__builtins__": builtins}
        self.cell = 0
        self.out = CappedWriter(cfg["max_output_chars"], "stdout")
        self.err = CappedWriter(cfg["max_output_chars"], "stderr")
        # fd-level capture (C extensions, subprocesses): in-memory files behind fds 1 and 2
        self.fd_out = _anon_file("stdout")
        self.fd_err = _anon_file("stderr")
        os.dup2(self.fd_out, 1)
        os.dup2(self.fd_err, 2)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        sys.stdout = self.out
        sys.stderr = self.err
        sys.__stdout__ = self.out
        sys.__stderr__ = self.err
        signal.signal(signal.SIGALRM, self._on_alarm)
        signal.signal(signal.SIGXCPU, self._on_xcpu)

    @staticmethod
    def _on_alarm(signum, frame):
        raise ExecutionTimeout("execution exceeded its wall-clock timeout")

    @staticmethod
    def _on_xcpu(signum, frame):
        raise CPUTimeExceeded("execution exceeded its CPU-seconds limit")

    def _fd_text(self, fd: int, cap: int) -> tuple[str, int]:
        size = os.fstat(fd).st_size
        data = os.pread(fd, max(0, cap * 4), 0) if size else b""
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        text = data.decode("utf-8", errors="replace")
        cut = max(0, size - len(data))
        if len(text) > cap:
            cut += len(text[cap:].encode())
            text = text[:cap]
        return text, cut

    def _figures(self) -> list[str]:
        plt = sys.modules.get("matplotlib.pyplot")
        if plt is None:
            return []
        out = []
        try:
            for num in plt.get_fignums()[: int(self.cfg["max_figures"])]:
                fig = plt.figure(num)
                buf = io.BytesIO()
                fig.savefig(buf, format="png", dpi=int(self.cfg["figure_dpi"]), bbox_inches="tight")
                out.append(base64.b64encode(buf.getvalue()).decode())
        finally:
            plt.close("all")
        return out

    def execute(self, req: dict) -> dict:
        _reap_forked()
        cap = int(req.get("max_output_chars") or self.cfg["max_output_chars"])
        self.out.reset(cap)
        self.err.reset(cap)
        self.cell += 1
        code = req["code"]
        filename = f"<cell-{self.cell}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        value = error = None
        error_type = None
        t0 = time.perf_counter()
        cpu_s = float(req.get("cpu_s") or self.cfg["cpu_seconds"])
        timeout_s = float(req.get("timeout_s") or 30)
        try:
            used = resource.getrusage(resource.RUSAGE_SELF)
            used_s = used.ru_utime + used.ru_stime
            soft = int(used_s + cpu_s) + 1
            _, hard = resource.getrlimit(resource.RLIMIT_CPU)
            if hard != resource.RLIM_INFINITY:
                soft = min(soft, hard)
            resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))
        except (ValueError, OSError):
            pass
        try:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
            try:
                tree = ast.parse(code, filename, "exec")
                last = None
                if tree.body and isinstance(tree.body[-1], ast.Expr):
                    last = ast.Expression(tree.body.pop().value)
                exec(compile(tree, filename, "exec"), self.ns)
                if last is not None:
                    result = eval(compile(last, filename, "eval"), self.ns)
                    if result is not None:
                        self.ns["_"] = result
                        value = repr(result)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                _lift_cpu_limit()
        except BaseException as e:  # noqa: BLE001 — user code may raise anything, even SystemExit
            error_type = type(e).__name__
            error = _format_error(e)
            if isinstance(e, SystemExit):
                error += "\n(SystemExit was caught: the session is still running.)"
        _lift_cpu_limit()  # (also when the alarm fired inside the finally above)
        if os.getpid() != _MAIN_PID:  # a child made by os.fork() in user code must not answer for the kernel
            os._exit(0)
        _reap_forked()
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        figures = []
        try:
            figures = self._figures()
        except BaseException as e:  # noqa: BLE001
            error = (error + "\n" if error else "") + f"Could not render figures: {type(e).__name__}: {e}"
        truncated = 0
        if value is not None and len(value) > cap:
            truncated += len(value) - cap
            value = value[:cap] + f"... [{len(value) - cap} chars cut]"
        stdout = self.out.getvalue()
        stderr = self.err.getvalue()
        truncated += self.out.dropped + self.err.dropped
        fd_out, cut1 = self._fd_text(self.fd_out, max(0, cap - len(stdout)))
        fd_err, cut2 = self._fd_text(self.fd_err, max(0, cap - len(stderr)))
        truncated += cut1 + cut2
        if sys.stdout is not self.out:  # user replaced the streams: put ours back
            sys.stdout = self.out
        if sys.stderr is not self.err:
            sys.stderr = self.err
        return {
            "ok": error is None,
            "stdout": stdout + fd_out,
            "stderr": stderr + fd_err,
            "value": value,
            "error": error,
            "error_type": error_type,
            "figures": figures,
            "truncated_chars": truncated,
            "duration_s": time.perf_counter() - t0,
        }


def main() -> None:
    cfg = json.loads(sys.argv[1])
    rfd, wfd = int(cfg["rfd"]), int(cfg["wfd"])
    # move the protocol pipes out of the way of user code and keep them out of subprocesses
    hi_r, hi_w = os.dup2(rfd, 1000, inheritable=False), os.dup2(wfd, 1001, inheritable=False)
    if rfd != hi_r:
        os.close(rfd)
    if wfd != hi_w:
        os.close(wfd)
    rfd, wfd = hi_r, hi_w
    for p in cfg.get("sys_path", []):
        if p not in sys.path:
            sys.path.insert(0, p)
    os.makedirs(os.environ.get("MPLCONFIGDIR", "/tmp/matplotlib"), exist_ok=True)
    _apply_limits(cfg)
    os.fork = _tracking_fork
    kernel = Kernel(cfg)
    for mod in cfg.get("preload", []):
        try:
            __import__(mod)
        except Exception:  # noqa: BLE001
            pass
    _send(wfd, {"ready": True, "pid": os.getpid(), "uid": os.getuid(), "python": sys.version.split()[0]})
    while True:
        req = _recv(rfd)
        if req is None or req.get("op") == "exit":
            break
        op = req.get("op")
        if op == "exec":
            reply = kernel.execute(req)
        elif op == "ping":
            reply = {"ok": True}
        else:
            reply = {"ok": False, "error": f"unknown op {op!r}"}
        try:
            _send(wfd, reply)
        except (TypeError, ValueError) as e:
            _send(wfd, {"ok": False, "error": f"reply could not be encoded: {e}", "stdout": "", "stderr": ""})
    os._exit(0)


if __name__ == "__main__":
    main()
