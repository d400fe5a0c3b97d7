'''Small MCP servers for testing the client (and plans) without the real domain servers.

``write_test_servers(folder)`` writes drop-in server folders (``calc``, ``pysession``, ``crashy``)
that ``cytoagent serve NAME`` can start over stdio when ``folder`` is on ``CYTOAGENT_SERVER_PATH``
(or passed as ``server_dirs``). ``SOURCES`` holds their code, so the same servers can also be
loaded in memory with ``load_source``.

- calc: ``add(a, b)``, ``stats(values)`` (exact mean/min/max/sum), ``make_table(n)`` (writes a CSV
  to the workspace and returns its path), ``plot(n)`` (a PNG of an n×n checkerboard), ``count(n)``
  (reports MCP progress n times), ``sleep(s)``.
- pysession: ``execute(code, session, timeout_s)`` — a plain in-process Python session (no
  isolation: a test double for the sandbox's execute contract: stdout, value = repr of the last
  expression, error).
- crashy: ``echo(x)`` and ``crash()`` (the process exits at once) to test restarts.
'''

from __future__ import annotations

import types
from pathlib import Path

CALC = '''"""Calculator test server: exact arithmetic, a table artifact, a figure, a slow tool."""
import io
import json
import os
import time
from pathlib import Path

from fastmcp import Context, FastMCP
from fastmcp.exceptions import ToolError
from fastmcp.tools import ToolResult
from fastmcp.utilities.types import Image

mcp = FastMCP("calc")


@mcp.tool
def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


@mcp.tool
def stats(values: list[float]) -> dict:
    """Mean, min, max and sum of a list of numbers."""
    if not values:
        raise ToolError("values is empty; pass at least one number.")
    return {"n": len(values), "mean": sum(values) / len(values), "min": min(values), "max": max(values),
            "sum": sum(values)}


@mcp.tool
def make_table(n: int) -> dict:
    """Write a CSV with columns i and sq (= i*i) for i < n into the workspace; returns its path."""
    ws = Path(os.environ["CYTOAGENT_WORKSPACE"])
    ws.mkdir(parents=True, exist_ok=True)
    p = ws / f"table_{n}.csv"
    p.write_text("i,sq\\n" + "".join(f"{i},{i * i}\\n" for i in range(n)))
    return {"path": str(p), "rows": n}


@mcp.tool
def plot(n: int = 4) -> ToolResult:
    """A PNG of an n x n checkerboard (for figure handling)."""
    import numpy as np
    from PIL import Image as PILImage

    board = (np.indices((n, n)).sum(0) % 2 * 255).astype("uint8").repeat(8, 0).repeat(8, 1)
    buf = io.BytesIO()
    PILImage.fromarray(board).save(buf, format="PNG")
    img = Image(data=buf.getvalue(), format="png").to_image_content()
    return ToolResult(content=[json.dumps({"side_px": n * 8}), img], structured_content={"side_px": n * 8})


@mcp.tool
async def count(n: int, ctx: Context) -> int:
    """Count to n, reporting MCP progress at each step."""
    for i in range(n):
        await ctx.report_progress(i + 1, n, f"item {i + 1}")
    return n


@mcp.tool
def sleep(s: float) -> str:
    """Sleep s seconds."""
    time.sleep(s)
    return "slept"
'''

PYSESSION = '''"""Test double for the sandbox: persistent plain-Python sessions (no isolation)."""
import ast
import contextlib
import io
import traceback

from fastmcp import FastMCP

mcp = FastMCP("pysession")
SESSIONS: dict[str, dict] = {}


@mcp.tool
def execute(code: str, session: str = "default", timeout_s: float = 30) -> dict:
    """Run Python in a persistent session; returns stdout, the repr of the last expression, error."""
    ns = SESSIONS.setdefault(session, {"__name__": "__session__"})
    out = io.StringIO()
    value = None
    try:
        tree = ast.parse(code)
        last = tree.body[-1] if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        if last is not None:
            tree.body = tree.body[:-1]
        with contextlib.redirect_stdout(out):
            exec(compile(tree, "<cell>", "exec"), ns)
            if last is not None:
                v = eval(compile(ast.Expression(last.value), "<cell>", "eval"), ns)
                value = None if v is None else repr(v)
    except Exception as e:
        tb = traceback.format_exception_only(type(e), e)
        return {"ok": False, "stdout": out.getvalue(), "value": None, "error": "".join(tb).strip()}
    return {"ok": True, "stdout": out.getvalue(), "value": value, "error": None}
'''

CRASHY = '''"""Crash test server."""
import os

from fastmcp import FastMCP

mcp = FastMCP("crashy")


@mcp.tool
def echo(x: int) -> int:
    """Return x."""
    return x


@mcp.tool
def crash() -> str:
    """Exit the server process at once."""
    os._exit(3)
'''

SOURCES = {"calc": CALC, "pysession": PYSESSION, "crashy": CRASHY}


def write_test_servers(folder: str | Path, names: list[str] | None = None) -> Path:
    """Write ``<folder>/<name>/server.py`` for the test servers; returns ``folder``."""
    folder = Path(folder)
    for name in names or list(SOURCES):
        d = folder / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "server.py").write_text(SOURCES[name], encoding="utf-8")
    return folder


def load_source(name: str):
    """The FastMCP object of a test server, loaded in this process (for in-memory connections)."""
    mod = types.ModuleType(f"cytoagent_testserver_{name}")
    exec(compile(SOURCES[name], f"<{name}>", "exec"), mod.__dict__)
    return mod.mcp
