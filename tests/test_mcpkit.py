"""The MCP glue every server shares: errors, progress, cancellation, artifacts as resources, images."""

import asyncio
import json
import threading

import numpy as np
import pytest
from fastmcp import Client, Context
from fastmcp.exceptions import ToolError as MCPToolError
from fastmcp.tools import ToolResult
from mcp import MCPError

from cytoagent.mcpkit import create_server, run_blocking, tool_result
from servers.common.errors import ToolError
from servers.common.images import preview_png
from servers.common.workspace import get_workspace

started = threading.Event()
stopped_by_cancel = threading.Event()


def _slow(n: int, progress=None) -> int:
    for i in range(n):
        progress(i + 1, n, f"step {i + 1}")
    return n


def _forever(progress=None) -> None:
    started.set()
    try:
        while True:
            progress(0, None, "spinning")
            threading.Event().wait(0.01)
    except BaseException:
        stopped_by_cancel.set()
        raise


@pytest.fixture
def server():
    mcp = create_server("kit", "test server")

    @mcp.tool
    def needs_positive(x: int) -> int:
        """x must be > 0."""
        if x <= 0:
            raise ToolError(f"x must be > 0, got {x}.", hint="Pass a positive integer.")
        return x

    @mcp.tool
    def crashes() -> int:
        """Always fails unexpectedly."""
        return {}["missing"]

    @mcp.tool
    async def long_job(n: int, ctx: Context) -> dict:
        """Reports progress."""
        return {"n": await run_blocking(ctx, _slow, n)}

    @mcp.tool
    async def spin(ctx: Context) -> dict:
        """Runs until cancelled."""
        await run_blocking(ctx, _forever)
        return {}

    @mcp.tool
    def picture() -> ToolResult:
        """Summary plus a PNG."""
        art = get_workspace().save_array(np.eye(8), name="eye")
        return tool_result({"artifact_id": art.id, "mean": np.float32(0.125)}, images=[preview_png(np.eye(8))])

    return mcp


async def test_tool_errors_reach_the_client(server):
    async with Client(server) as c:
        r = await c.call_tool_mcp("needs_positive", {"x": -1})
        assert r.is_error and r.content[0].text == "x must be > 0, got -1. Pass a positive integer."
        r = await c.call_tool_mcp("crashes", {})
        assert r.is_error and "KeyError" in r.content[0].text and "server log" in r.content[0].text
        assert (await c.call_tool("needs_positive", {"x": 2})).data == 2  # still serving


async def test_bad_argument_types_are_one_clear_message(server):
    """Pydantic validation errors reach the client as one short message naming each bad argument."""
    async with Client(server) as c:
        r = await c.call_tool_mcp("needs_positive", {"x": "many"})
        text = r.content[0].text
        assert r.is_error and text.startswith("Invalid arguments for tool 'needs_positive': x: ")
        assert "(got 'many')" in text and "pydantic.dev" not in text and "validation error for" not in text
        r = await c.call_tool_mcp("needs_positive", {})
        assert r.is_error and "x: required argument missing" in r.content[0].text
        assert (await c.call_tool("needs_positive", {"x": 3})).data == 3  # still serving


async def test_progress_is_forwarded(server):
    seen = []

    async def handler(p, t, m):
        seen.append((p, t, m))

    async with Client(server) as c:
        r = await c.call_tool("long_job", {"n": 5}, progress_handler=handler)
    assert r.structured_content == {"n": 5}
    assert seen[0][0] == 1 and seen[-1] == (5, 5, "step 5")


async def test_cancellation_stops_the_worker_thread(server):
    started.clear()
    stopped_by_cancel.clear()
    async with Client(server) as c:
        with pytest.raises(MCPError, match="timed out"):
            await c.call_tool("spin", {}, timeout=0.5)
        assert started.is_set()
        for _ in range(100):
            if stopped_by_cancel.is_set():
                break
            await asyncio.sleep(0.02)
        assert stopped_by_cancel.is_set()
        assert (await c.call_tool("ping", {})).structured_content["server"] == "kit"


async def test_results_images_and_artifact_resources(server):
    async with Client(server) as c:
        r = await c.call_tool("picture", {})
        assert [b.type for b in r.content] == ["text", "image"] and r.content[1].mime_type == "image/png"
        aid = r.structured_content["artifact_id"]
        assert r.structured_content["mean"] == 0.125
        meta = json.loads((await c.read_resource(f"artifact://{aid}"))[0].text)
        assert meta["kind"] == "image" and meta["shape"] == [8, 8]
        listed = (await c.call_tool("list_artifacts", {})).structured_content["artifacts"]
        assert [a["id"] for a in listed] == [aid]
        assert listed[0]["shape"] == [8, 8]
        with pytest.raises(MCPToolError, match="list_artifacts"):
            await c.call_tool("artifact_info", {"artifact_id": "nope-123"})
        await c.call_tool("delete_artifact", {"artifact_id": aid})
        assert (await c.call_tool("list_artifacts", {})).structured_content["artifacts"] == []
        # the listing is compact: provenance and metadata only through artifact_info
        art = get_workspace().save_json({"a": 1}, name="p", provenance={"tool": "t", "args": {"x": "y" * 500}},
                                        meta={"note": "m"})
        listed = (await c.call_tool("list_artifacts", {})).structured_content
        assert listed["n"] == 1 and listed["artifacts"][0]["id"] == art.id
        assert not {"provenance", "meta"} & set(listed["artifacts"][0])
        info = (await c.call_tool("artifact_info", {"artifact_id": art.id})).structured_content
        assert info["provenance"]["tool"] == "t" and info["meta"] == {"note": "m"}


async def test_text_only_result_is_plain_text():
    mcp = create_server("kit2", "x")

    @mcp.tool
    def summary_only() -> ToolResult:
        """Summary with a caption."""
        return tool_result({"a": 1}, text="caption")

    async with Client(mcp) as c:
        r = await c.call_tool("summary_only", {})
        assert [b.text for b in r.content] == ["caption", '{"a": 1}']
        assert r.structured_content == {"a": 1}


async def test_bad_input_is_logged_in_one_line_but_crashes_keep_their_traceback(server):
    """Expected user errors must not flood server logs with tracebacks; real crashes still log one."""
    import logging

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    log = logging.getLogger("fastmcp.server.server")
    h = Keep(level=logging.DEBUG)
    log.addHandler(h)
    try:
        async with Client(server) as c:
            await c.call_tool_mcp("needs_positive", {"x": -1})
            await c.call_tool_mcp("crashes", {})
    finally:
        log.removeHandler(h)
    bad = [r for r in records if "needs_positive" in r.getMessage()]
    crash = [r for r in records if "crashes" in r.getMessage()]
    assert bad and all(r.exc_info is None and r.levelno == logging.INFO for r in bad)
    assert "x must be > 0, got -1." in bad[0].getMessage()
    assert crash and crash[0].exc_info is not None and crash[0].levelno == logging.ERROR
