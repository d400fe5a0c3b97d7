"""Named sandbox sessions: one persistent kernel each, a cap on how many live, idle expiry.

    from servers.sandbox.sessions import SessionManager
    sm = SessionManager()
    sm.execute("default", "x = 41")          # creates the session on first use
    sm.execute("default", "x + 1").value     # '42'
    sm.list(); sm.reset("default"); sm.close("default")

Environment variables (read when the manager is built):
    CYTOAGENT_SANDBOX_IDLE_S       close sessions idle this long (default 1800)
    CYTOAGENT_SANDBOX_MEMORY_MB    per-process address-space limit (default 4096)
    CYTOAGENT_SANDBOX_CPU_S        CPU seconds per execute call (default 300)
    CYTOAGENT_SANDBOX_MAX_PROCS    processes + threads a kernel may add (default 64)
    CYTOAGENT_SANDBOX_NETWORK      "1" gives kernels network access (default: none)
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import replace
from pathlib import Path

from servers.common.errors import ToolError
from servers.sandbox.kernel import ExecResult, Kernel, SandboxPolicy

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DEFAULT_SESSION = "default"


def policy_from_env(environ: dict[str, str] | None = None) -> SandboxPolicy:
    """The default policy, with the config's output cap and the CYTOAGENT_SANDBOX_* overrides."""
    from servers.common.config import get_config

    env = os.environ if environ is None else environ
    cfg = get_config()
    kw: dict = {"max_output_chars": cfg.limits.max_output_chars, "require_isolation": cfg.require_isolation}
    for var, key, typ in (("CYTOAGENT_SANDBOX_MEMORY_MB", "memory_mb", int), ("CYTOAGENT_SANDBOX_CPU_S", "cpu_seconds", float),
                          ("CYTOAGENT_SANDBOX_MAX_PROCS", "max_processes", int)):
        if env.get(var):
            try:
                kw[key] = typ(env[var])
            except ValueError:
                raise ToolError(f"{var}={env[var]!r} is not a number.") from None
    if env.get("CYTOAGENT_SANDBOX_NETWORK", "").strip().lower() in {"1", "true", "yes", "on"}:
        kw["network"] = True
    return SandboxPolicy(**kw)


class Session:
    def __init__(self, name: str, kernel: Kernel, description: str = ""):
        self.name = name
        self.kernel = kernel
        self.description = description
        self.created = time.time()

    def info(self) -> dict:
        k = self.kernel
        return {
            "name": self.name, "description": self.description, "alive": k.alive, "isolation": k.isolation,
            "created": round(self.created, 3), "idle_s": round(time.time() - k.last_used, 1),
            "calls": k.n_calls, "restarts": k.n_restarts, "memory_mb": k.policy.memory_mb,
            "cpu_seconds": k.policy.cpu_seconds, "max_processes": k.policy.max_processes,
            "network": k.policy.network,
        }


class SessionManager:
    """Named kernels with a cap (``config.limits.max_sessions``) and idle expiry.

    Args:
        policy: Policy for new kernels (default ``policy_from_env()``).
        max_sessions: Cap on live sessions (default: the config's ``limits.max_sessions``).
        idle_timeout_s: Sessions unused this long are closed (checked on every call and by a
            background thread).
        workspace / data_root: Default: the configured ones.
    """

    def __init__(self, policy: SandboxPolicy | None = None, *, max_sessions: int | None = None,
                 idle_timeout_s: float | None = None, workspace: str | os.PathLike | None = None,
                 data_root: str | os.PathLike | None = None, reaper: bool = True):
        from servers.common.config import get_config

        cfg = get_config()
        self.policy = policy or policy_from_env()
        self.max_sessions = int(max_sessions or cfg.limits.max_sessions)
        if idle_timeout_s is None:
            idle_timeout_s = float(os.environ.get("CYTOAGENT_SANDBOX_IDLE_S") or 1800)
        self.idle_timeout_s = float(idle_timeout_s)
        self.workspace = Path(workspace or cfg.workspace)
        self.data_root = Path(data_root or cfg.data_root)
        # create the artifact index before any kernel starts, so kernels see it read-only
        from servers.common.workspace import get_workspace

        get_workspace(self.workspace)
        self._sessions: dict[str, Session] = {}
        self._expired: dict[str, float] = {}  # name → when it was closed for being idle
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        if reaper:
            self._reaper = threading.Thread(target=self._reap_loop, name="sandbox-reaper", daemon=True)
            self._reaper.start()

    # -- internals ------------------------------------------------------------------------------------
    def _reap_loop(self) -> None:
        interval = max(1.0, min(60.0, self.idle_timeout_s / 4))
        while not self._stop.wait(interval):
            try:
                self.expire_idle()
            except Exception:  # noqa: BLE001 — the reaper must never die
                pass

    @staticmethod
    def _check_name(name: str) -> str:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"Invalid session name {name!r}.",
                            hint="Use 1-64 letters, digits, '_', '-' or '.', starting with a letter or digit.")
        return name

    def expire_idle(self) -> list[str]:
        """Close sessions idle longer than ``idle_timeout_s``; return their names."""
        now = time.time()
        with self._lock:
            stale = [n for n, s in self._sessions.items()
                     if not s.kernel.busy and now - s.kernel.last_used > self.idle_timeout_s]
            sessions = [self._sessions.pop(n) for n in stale]
            for n in stale:
                self._expired[n] = now
        for s in sessions:
            s.kernel.close()
        return stale

    # -- public API -----------------------------------------------------------------------------------
    def create(self, name: str | None = None, *, description: str = "", policy: SandboxPolicy | None = None,
               preload: list[str] | tuple = ()) -> Session:
        """Start a new session (a fresh kernel). ``name`` defaults to ``session-N``."""
        self.expire_idle()
        with self._lock:
            if name is None:
                i = len(self._sessions) + 1
                while f"session-{i}" in self._sessions:
                    i += 1
                name = f"session-{i}"
            self._check_name(name)
            if name in self._sessions:
                raise ToolError(f"A session named {name!r} already exists.",
                                hint="Use it as is, reset_session to clear it, or choose another name.")
            if len(self._sessions) >= self.max_sessions:
                names = ", ".join(f"{n} (idle {time.time() - s.kernel.last_used:.0f} s)"
                                  for n, s in self._sessions.items())
                raise ToolError(f"The cap of {self.max_sessions} live sessions is reached: {names}.",
                                hint="Close a session you no longer need with close_session, then retry.")
            kernel = Kernel(policy=policy or self.policy, workspace=self.workspace, data_root=self.data_root,
                            preload=preload)
            s = Session(name, kernel, description)
            self._sessions[name] = s
            return s

    def get(self, name: str = DEFAULT_SESSION, *, create: bool = True) -> Session:
        """The named session; with ``create`` a missing one is started."""
        self._check_name(name)
        with self._lock:
            s = self._sessions.get(name)
            if s is not None:
                return s
            if not create:
                raise ToolError(f"No session named {name!r}.",
                                hint=f"Existing sessions: {', '.join(self._sessions) or '(none)'}; "
                                     "create one with create_session.")
            return self.create(name)

    def execute(self, name: str, code: str, timeout_s: float = 30, progress=None) -> ExecResult:
        """Run code in the named session (created on first use)."""
        name = name or DEFAULT_SESSION
        for attempt in range(2):
            s = self.get(name, create=True)
            expired = self._expired.pop(name, None)
            try:
                res = s.kernel.execute(code, timeout_s=timeout_s, progress=progress)
            except ToolError:
                if attempt == 0 and s.kernel._closed:  # expired or closed between get() and execute()
                    continue
                raise
            if expired is not None:
                res.restarted = True
                res.warnings.append(f"Session {name!r} had been idle for more than {self.idle_timeout_s:g} s and "
                                    "was closed; this call ran in a fresh session (earlier variables are gone).")
            return res
        raise ToolError(f"Session {name!r} was closed while starting the call.", hint="Retry.")

    def list(self) -> list[dict]:
        self.expire_idle()
        with self._lock:
            return [s.info() for s in self._sessions.values()]

    def reset(self, name: str) -> Session:
        s = self.get(name, create=False)
        s.kernel.reset()
        return s

    def close(self, name: str) -> None:
        self._check_name(name)
        with self._lock:
            s = self._sessions.pop(name, None)
            self._expired.pop(name, None)
        if s is None:
            raise ToolError(f"No session named {name!r}.",
                            hint=f"Existing sessions: {', '.join(self._sessions) or '(none)'}.")
        s.kernel.close()

    def close_all(self) -> None:
        self._stop.set()
        with self._lock:
            sessions = list(self._sessions.values())
            self._sessions.clear()
        for s in sessions:
            s.kernel.close()

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, name: str) -> bool:
        return name in self._sessions

    def with_policy(self, **changes) -> SandboxPolicy:
        return replace(self.policy, **changes)
