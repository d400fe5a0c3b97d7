"""Sandbox: persistent, isolated Python kernels to run code against the data (numpy, scipy, scikit-image, the project's library).

Each session is a separate Python process under bubblewrap: no network, read-only data root,
read-write workspace, private /tmp, scrubbed environment, CPU/memory/process/file-size limits.
"""

from __future__ import annotations

import atexit
import json
import threading
from pathlib import Path

from fastmcp import Context
from fastmcp.tools import ToolResult

from cytoagent.mcpkit import create_server, image, run_blocking
from servers.common.errors import ToolError
from servers.common.workspace import INDEX_DIR

INSTRUCTIONS = """\
Run Python code in persistent sandboxed sessions (like notebook kernels: variables, imports and
loaded data survive between `execute` calls in the same session).

- Files: the workspace (read-write) is the working directory, also reachable as /workspace; the
  data root is read-only at its own path and at /data. Files you write in the workspace are
  registered as artifacts (ids returned) that other tools can use.
- numpy, scipy, pandas, scikit-image, matplotlib and the project's own library (`import servers.spatial…`,
  `servers.common.synthetic` …) are importable; call environment_info to see exactly what is there.
- matplotlib figures left open at the end of a call are returned as images.
- There is no network. Limits on CPU, memory, processes, file size and output apply; a call that
  exceeds its timeout is interrupted, and if the kernel must be killed the result says
  `restarted: true` (all state lost — re-run your setup code).
"""

mcp = create_server("sandbox", INSTRUCTIONS)

_manager = None
_manager_lock = threading.Lock()


def get_manager():
    """The process-wide SessionManager (rebuilt if the configured workspace/data root changed)."""
    global _manager
    from servers.common.config import get_config
    from servers.sandbox.sessions import SessionManager

    cfg = get_config()
    with _manager_lock:
        m = _manager
        if m is not None and (m.workspace != Path(cfg.workspace) or m.data_root != Path(cfg.data_root)):
            m.close_all()
            m = None
        if m is None:
            m = SessionManager()
            _manager = m
        return m


@atexit.register
def _shutdown() -> None:
    if _manager is not None:
        _manager.close_all()


def _render(res, artifacts: list, figure_ids: list[str], session: str) -> str:
    lines = []
    for w in res.warnings:
        lines.append(f"WARNING: {w}")
    if res.restarted:
        lines.append("NOTE: the kernel was restarted; all variables and imports of this session were lost.")
    if res.stdout:
        lines.append("--- stdout ---\n" + res.stdout.rstrip("\n"))
    if res.stderr:
        lines.append("--- stderr ---\n" + res.stderr.rstrip("\n"))
    if res.value is not None:
        lines.append("--- value ---\n" + res.value)
    if res.error:
        lines.append("--- error ---\n" + res.error)
    if res.truncated_chars:
        lines.append(f"[output capped: {res.truncated_chars} characters were cut]")
    if artifacts:
        lines.append("files written: " + ", ".join(f"{a.path} ({a.id})" for a in artifacts))
    if figure_ids:
        lines.append("figures: " + ", ".join(figure_ids))
    status = "ok" if res.ok else "error"
    lines.append(f"[session {session}: {status}, {res.duration_s:.3f} s, isolation={res.isolation}]")
    return "\n".join(lines)


def _execute(session: str, code: str, timeout_s: float, progress=None) -> dict:
    from servers.common.workspace import get_workspace
    from servers.sandbox.outputs import register_files

    res = get_manager().execute(session, code, timeout_s=timeout_s, progress=progress)
    ws = get_workspace()
    prov = {"tool": "sandbox.execute", "args": {"session": session, "code": code[:2000]}}
    arts = register_files(ws, res.files, prov)
    fig_ids = []
    for i, png in enumerate(res.figures):
        fig_ids.append(ws.save_bytes(png, kind="figure", ext="png", name=f"{session}_figure{i + 1}",
                                     provenance=prov).id)
    return {"res": res, "artifacts": arts, "figure_ids": fig_ids}


@mcp.tool(annotations={"openWorldHint": False})
async def execute(code: str, ctx: Context, session: str = "default", timeout_s: float = 60) -> ToolResult:
    """Run Python code in a persistent sandboxed session and return its output.

    Use this for any analysis the other tools do not cover: load files from the data root or
    artifacts from the workspace, compute, plot. State persists between calls of the same session
    (define data once, reuse it). If the code ends in an expression its repr is returned as
    `value` (like a notebook cell). Exceptions come back as a readable traceback and the session
    stays alive. matplotlib figures open at the end are returned as PNG images (and saved as figure
    artifacts). Files the code writes in the workspace (the working directory) are registered as
    artifacts and listed. Output is capped (the number of cut characters is reported).

    Args:
        code: Python source to run, e.g. "import numpy as np\\nx = np.load('/data/a.npy')\\nx.shape".
        session: Session name; created on first use. Use different names for independent work.
        timeout_s: Wall-clock limit in seconds (default 60). On expiry the code is interrupted
            (state kept); if the kernel does not respond it is restarted (state lost, `restarted: true`).

    Returns:
        Text with stdout, stderr, value, error, files and warnings; a structured copy with the same
        fields plus artifact ids; figures as images.
    """
    out = await run_blocking(ctx, _execute, session, code, timeout_s)
    res, arts, fig_ids = out["res"], out["artifacts"], out["figure_ids"]
    structured = {
        "session": session, "ok": res.ok, "stdout": res.stdout, "stderr": res.stderr, "value": res.value,
        "error": res.error, "error_type": res.error_type, "restarted": res.restarted,
        "isolation": res.isolation, "warnings": res.warnings, "duration_s": round(res.duration_s, 4),
        "truncated_chars": res.truncated_chars,
        "files": [{"path": a.path, "artifact_id": a.id, "kind": a.kind, "bytes": a.bytes} for a in arts],
        "figures": fig_ids,
    }
    from mcp.types import TextContent

    content: list = [TextContent(type="text", text=_render(res, arts, fig_ids, session))]
    content += [image(png).to_image_content() for png in res.figures]
    return ToolResult(content=content, structured_content=structured)


@mcp.tool
def create_session(name: str | None = None, description: str = "", preload: list[str] | None = None) -> dict:
    """Start a new, empty Python session (its own sandboxed process).

    Sessions are independent: variables in one are invisible to another. `execute` also creates a
    session on first use, so call this only to get a fresh named session or to preload modules.

    Args:
        name: Session name (letters, digits, '_', '-', '.'); default "session-N".
        description: Free text shown by list_sessions (what the session is for).
        preload: Modules to import at start so the first call is fast, e.g. ["numpy", "pandas"].
    """
    s = get_manager().create(name, description=description, preload=preload or ())
    return {"created": s.info(), "warnings": s.kernel.warnings}


@mcp.tool(annotations={"readOnlyHint": True})
def list_sessions() -> dict:
    """List live sessions: name, idle seconds, calls, restarts, limits. Idle sessions expire."""
    m = get_manager()
    return {"sessions": m.list(), "max_sessions": m.max_sessions, "idle_timeout_s": m.idle_timeout_s}


@mcp.tool(annotations={"destructiveHint": True})
def reset_session(name: str = "default") -> dict:
    """Restart a session's kernel: all its variables and imports are cleared (files stay).

    Args:
        name: The session to reset.
    """
    s = get_manager().reset(name)
    return {"reset": s.info()}


@mcp.tool(annotations={"destructiveHint": True})
def close_session(name: str) -> dict:
    """Stop a session and free its memory (files it wrote stay in the workspace).

    Args:
        name: The session to close.
    """
    get_manager().close(name)
    return {"closed": name}


@mcp.tool(annotations={"readOnlyHint": True})
def list_files(subdir: str = ".", pattern: str = "*", limit: int = 200, root: str = "workspace") -> dict:
    """List files (recursive) in the workspace or the data root, as relative paths with sizes.

    Args:
        subdir: Folder relative to the root, e.g. "artifacts" ("." = everything).
        pattern: Glob on file names, e.g. "*.csv".
        limit: Maximum number of files.
        root: "workspace" (read-write, default) or "data" (read-only data root).
    """
    from servers.common.config import get_config
    from servers.common.paths import confine
    from servers.common.paths import list_files as _list

    cfg = get_config()
    if root not in ("workspace", "data"):
        raise ToolError(f"Unknown root {root!r}.", hint='Use "workspace" or "data".')
    base = Path(cfg.workspace if root == "workspace" else cfg.data_root)
    if subdir not in ("", "."):
        d = confine(base, subdir, what=root)
        if not d.is_dir():
            raise ToolError(f"{subdir!r} is not a folder in the {root}.", hint="Pass a folder path or '.'.")
    limit = max(1, min(int(limit), 5000))
    found = [p for p in _list(base, subdir, pattern, limit=limit + 10)
             if not (root == "workspace" and p.split("/", 1)[0] == INDEX_DIR)]
    paths = found[:limit]
    files = []
    for p in paths:
        try:
            files.append({"path": p, "bytes": (base / p).stat().st_size})
        except OSError:
            continue
    out = {"root": root, "abspath": str(base.resolve()), "files": files, "truncated": len(found) > limit}
    if out["truncated"]:
        out["hint"] = f"More than {limit} files: narrow with subdir= or pattern= (e.g. '*.csv'), or raise limit."
    return out


@mcp.tool(annotations={"readOnlyHint": True})
def read_file(path: str, max_chars: int = 5000, root: str = "workspace") -> dict:
    """Read the beginning of a text file from the workspace (or the data root).

    Args:
        path: Path relative to the root, or an artifact id (workspace).
        max_chars: Characters to return (the head of the file; capped by the server's output limit).
        root: "workspace" (default) or "data".
    """
    from servers.common.config import get_config
    from servers.common.paths import confine, resolve_data_path
    from servers.common.workspace import get_workspace

    cfg = get_config()
    if root == "workspace":
        ws = get_workspace()
        try:
            rel = ws.resolve(path).resolve().relative_to(ws.root)
        except ValueError:
            raise ToolError(f"{path!r} resolves outside the workspace.", hint="Pass a path inside it.") from None
        p = confine(ws.root, str(rel), what="workspace")
    elif root == "data":
        p = resolve_data_path(path)
    else:
        raise ToolError(f"Unknown root {root!r}.", hint='Use "workspace" or "data".')
    if not p.is_file():
        raise ToolError(f"{path!r} is a folder, not a file.", hint="Use list_files to see the files in it.")
    cap = max(1, min(int(max_chars), cfg.limits.max_output_chars))
    with open(p, "rb") as f:
        head = f.read(cap * 4 + 4)
    if b"\x00" in head[:8192]:
        raise ToolError(f"{path!r} looks like a binary file.",
                        hint="Read it in the sandbox with `execute` (e.g. numpy.load, tifffile.imread).")
    text = head.decode("utf-8", errors="replace")
    size = p.stat().st_size
    out = text[:cap]
    return {"path": path, "bytes": size, "text": out, "truncated": size > len(out.encode("utf-8"))}


@mcp.tool
def write_file(path: str, content: str, overwrite: bool = False) -> dict:
    """Write a text file into the workspace (atomically) and register it as an artifact.

    Use it for small inputs: a CSV of parameters, a Python module to import in the sandbox, notes.

    Args:
        path: Path relative to the workspace, e.g. "notes/plan.md" (folders are created).
        content: The text to write (UTF-8).
        overwrite: Replace an existing file (default False: an existing file is an error).
    """
    from servers.common.atomic import atomic_write_text
    from servers.common.config import get_config
    from servers.common.paths import resolve_workspace_path
    from servers.common.workspace import get_workspace
    from servers.sandbox.outputs import register_files

    if not isinstance(content, str):
        raise ToolError("content must be text.")
    cfg = get_config()
    if len(content) > 50_000_000:
        raise ToolError(f"content is {len(content)} characters; the limit is 50,000,000.",
                        hint="Write large data from the sandbox with execute instead.")
    p = resolve_workspace_path(path, must_exist=False)
    rel = str(p.relative_to(Path(cfg.workspace).resolve()))
    if rel.split("/", 1)[0] == INDEX_DIR:
        raise ToolError(f"{path!r} is the workspace's artifact index.", hint="Choose another file name.")
    if p.is_dir():
        raise ToolError(f"{path!r} is a folder.", hint="Pass a file path.")
    if p.exists() and not overwrite:
        raise ToolError(f"{path!r} already exists.", hint="Pass overwrite=true to replace it, or another path.")
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, content)
    arts = register_files(get_workspace(), [rel], {"tool": "sandbox.write_file", "args": {"path": path}})
    return {"path": rel, "bytes": p.stat().st_size, "artifact_id": arts[0].id if arts else None}


@mcp.tool(annotations={"readOnlyHint": True})
async def environment_info(ctx: Context, session: str = "default") -> dict:
    """What the sandbox offers: Python version, importable scientific packages with versions, the
    project's library modules (importable from code, e.g. servers.spatial.cooccurrence), the data
    root and workspace paths as seen from inside, limits and the isolation in force.

    Args:
        session: The session to inspect (created if missing).
    """

    def collect() -> dict:
        m = get_manager()
        s = m.get(session, create=True)
        res = s.kernel.execute(
            "import json as _j, servers.sandbox.envinfo as _e\nprint(_j.dumps(_e.collect()))\ndel _j, _e",
            timeout_s=60, max_output_chars=2_000_000)
        try:
            info = json.loads(res.stdout) if res.ok else None
        except ValueError:
            info = None
        if info is None:
            raise ToolError(f"Could not inspect the sandbox: {res.error or res.stdout[:500]}",
                            hint="Reset the session (reset_session) and retry.")
        k = s.kernel
        info["isolation"] = k.isolation
        info["network"] = k.policy.network
        info["process_cap"] = k.info()["process_cap"]
        info["seccomp"] = k.seccomp_active
        info["limits"].update({"cpu_seconds_per_call": k.policy.cpu_seconds, "max_processes": k.policy.max_processes,
                               "max_output_chars": k.policy.max_output_chars, "tmp_mb": k.policy.tmp_mb})
        info["warnings"] = k.warnings
        info["session"] = session
        return info

    return await run_blocking(ctx, collect)
