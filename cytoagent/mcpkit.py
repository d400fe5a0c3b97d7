"""What every cytoagent MCP server shares: creation, error translation, artifacts as resources,
image content, and running blocking library code with MCP progress and cancellation.

Server modules stay thin::

    from cytoagent.mcpkit import create_server, run_blocking, tool_result
    mcp = create_server("spatial", "Spatial single-cell analysis …")

    @mcp.tool
    async def co_occurrence(dataset: str, ctx: Context) -> ToolResult:
        res = await run_blocking(ctx, lib.co_occurrence, dataset)
        return tool_result(res.summary, images=[res.png])
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from fastmcp import Context, FastMCP
from fastmcp.exceptions import ToolError as MCPToolError
from fastmcp.exceptions import ValidationError as MCPValidationError
from fastmcp.server.middleware import Middleware
from fastmcp.tools import ToolResult
from fastmcp.utilities.types import Image

from cytoagent import __version__
from servers.common.errors import Cancelled
from servers.common.errors import ToolError as LibToolError
from servers.common.progress import CancelToken, make_progress

log = logging.getLogger("cytoagent")


class _QuietExpectedErrors(logging.Filter):
    """A library ``ToolError`` is a bad input the client is told about, not a crash: FastMCP's
    "Error calling tool" record keeps one line with the message instead of a full traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, LibToolError):
            record.msg = f"{record.getMessage()}: {exc}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_QUIET = _QuietExpectedErrors()


def _setup_logging() -> None:
    server_log = logging.getLogger("fastmcp.server.server")
    if _QUIET not in server_log.filters:
        server_log.addFilter(_QUIET)
    root = logging.getLogger("cytoagent")
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)  # never stdout: it is the MCP channel
        h.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        root.addHandler(h)
        root.setLevel(logging.INFO)


def _find_lib_error(exc: BaseException | None) -> LibToolError | None:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, LibToolError):
            return exc
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


def _argument_errors(tool: str, exc: BaseException | None) -> str | None:
    """Pydantic argument-validation errors as one short message naming each bad argument, what it
    should be and what was given (no pydantic boilerplate or URLs); None if ``exc`` is not one."""
    errors = getattr(exc, "errors", None)
    if exc is None or not callable(errors):
        return None
    try:
        items = errors(include_url=False)
    except Exception:  # noqa: BLE001 - not a pydantic ValidationError after all
        return None
    parts = []
    for err in items[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "call") or "arguments"
        msg = str(err.get("msg", "invalid"))
        if err.get("type") in ("missing_argument", "missing"):
            parts.append(f"{loc}: required argument missing")
            continue
        given = repr(err.get("input"))
        if len(given) > 80:
            given = given[:77] + "..."
        parts.append(f"{loc}: {msg} (got {given})")
    more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
    return (f"Invalid arguments for tool '{tool}': " + "; ".join(parts) + more
            + ". Fix these arguments (the tool's input schema lists the types and allowed values) and call again.")


class ErrorTranslation(Middleware):
    """Library ``ToolError``s become MCP tool errors with their exact message; anything unexpected
    is logged with its traceback to stderr and summarised to the client (type + message)."""

    async def on_call_tool(self, context, call_next):
        try:
            return await call_next(context)
        except MCPToolError as e:
            lib = _find_lib_error(e)
            if lib is not None:
                raise MCPToolError(str(lib)) from None
            if e.__cause__ is not None and not isinstance(e.__cause__, MCPToolError):
                cause = e.__cause__
                name = getattr(context.message, "name", "?")
                log.exception("tool %s failed", name, exc_info=cause)
                raise MCPToolError(
                    f"Internal error in tool '{name}': {type(cause).__name__}: {cause}. "
                    "This is a bug or an unsupported input; the server log has the traceback."
                ) from None
            raise
        except LibToolError as e:
            raise MCPToolError(str(e)) from None
        except MCPValidationError as e:
            message = _argument_errors(getattr(context.message, "name", "?"), e.__cause__)
            if message is None:
                raise
            raise MCPToolError(message) from None
        except Cancelled as e:
            raise MCPToolError(f"Cancelled: {e}") from None


def create_server(name: str, instructions: str, *, artifacts: bool = True, **kwargs: Any) -> FastMCP:
    """A FastMCP server with cytoagent's error handling and (by default) artifact tools/resources."""
    _setup_logging()
    mcp = FastMCP(name, instructions=instructions, **kwargs)
    mcp.add_middleware(ErrorTranslation())

    @mcp.tool(annotations={"readOnlyHint": True})
    def ping() -> dict:
        """Health check: the server's name and cytoagent version (cheap; use to test a connection)."""
        return {"server": name, "version": __version__}

    if artifacts:
        add_artifact_interface(mcp)
    return mcp


LISTING_OMITS = ("provenance", "meta", "uri")  # per-artifact detail left to artifact_info


def add_artifact_interface(mcp: FastMCP) -> None:
    """``list_artifacts`` / ``artifact_info`` / ``delete_artifact`` tools and ``artifact://{id}`` resources."""
    from servers.common.workspace import get_workspace

    @mcp.tool(annotations={"readOnlyHint": True})
    def list_artifacts(kind: str | None = None, limit: int = 50) -> dict:
        """List artifacts in the shared workspace (newest first): ids, kinds, names, paths, shapes, row
        counts, sizes. Compact: call artifact_info for one artifact's provenance (tool and arguments)
        and metadata.

        Args:
            kind: Only this kind (image, labels, mask, table, anndata, geojson, json, figure, code, text, file).
            limit: Maximum number of artifacts to return.
        """
        ws = get_workspace()
        arts = ws.list(kind=kind, limit=max(1, min(int(limit), 1000)))
        listed = [{k: v for k, v in a.to_dict().items() if k not in LISTING_OMITS} for a in arts]
        return {"workspace": str(ws.root), "n": len(listed), "artifacts": listed}

    @mcp.tool(annotations={"readOnlyHint": True})
    def artifact_info(artifact_id: str) -> dict:
        """Metadata of one artifact: kind, absolute path, shape/dtype or rows, provenance (tool + arguments)."""
        ws = get_workspace()
        art = ws.get(artifact_id)
        return {**art.to_dict(), "abspath": str(ws.abspath(art))}

    @mcp.tool(annotations={"destructiveHint": True})
    def delete_artifact(artifact_id: str) -> dict:
        """Delete an artifact's file and its index entry."""
        art = get_workspace().delete(artifact_id)
        return {"deleted": art.id}

    @mcp.resource("artifact://{artifact_id}", mime_type="application/json")
    def artifact_resource(artifact_id: str) -> str:
        ws = get_workspace()
        art = ws.get(artifact_id)
        return json.dumps({**art.to_dict(), "abspath": str(ws.abspath(art))})

    @mcp.resource("artifact://{artifact_id}/content", mime_type="application/octet-stream")
    def artifact_content(artifact_id: str) -> bytes:
        ws = get_workspace()
        p = ws.abspath(ws.get(artifact_id))
        if not p.is_file():
            raise LibToolError(f"Artifact {artifact_id} is a folder; read its files by path instead.")
        if p.stat().st_size > 50_000_000:
            raise LibToolError(f"Artifact {artifact_id} is larger than 50 MB; read it from {p} instead.")
        return p.read_bytes()


def image(png: bytes) -> Image:
    """MCP image content from PNG bytes."""
    return Image(data=png, format="png")


def tool_result(
    summary: dict[str, Any] | None = None, *, images: list[bytes] | None = None, text: str | None = None
) -> ToolResult:
    """A tool result with a JSON summary (also as structured content), optional text and PNG images."""
    from mcp.types import TextContent

    # explicit TextContent: a list of plain strings would be serialised by fastmcp as one JSON list
    content: list[Any] = []
    if text:
        content.append(TextContent(type="text", text=text))
    if summary is not None:
        content.append(TextContent(type="text", text=json.dumps(summary, default=_default, indent=None)))
    for png in images or []:
        content.append(image(png).to_image_content())
    structured = json.loads(json.dumps(summary, default=_default)) if summary is not None else None
    return ToolResult(content=content, structured_content=structured)


def _default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if not np.isfinite(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    return str(o)


async def run_blocking(ctx: Context | None, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run blocking library code in a worker thread.

    If ``fn`` accepts a ``progress`` keyword it receives one that forwards to MCP progress
    notifications and raises ``Cancelled`` once the request is cancelled.
    """
    import inspect

    loop = asyncio.get_running_loop()
    token = CancelToken()

    def sink(done: float, total: float | None, message: str | None) -> None:
        if ctx is not None:
            asyncio.run_coroutine_threadsafe(ctx.report_progress(done, total, message), loop)

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if "progress" in params and "progress" not in kwargs:
        kwargs["progress"] = make_progress(sink, token)
    call = functools.partial(fn, *args, **kwargs)
    try:
        return await asyncio.to_thread(call)
    except asyncio.CancelledError:
        token.cancel()
        raise
