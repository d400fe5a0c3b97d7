"""The sandbox MCP server: tools over an in-memory client, and one real stdio round trip."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from fastmcp.exceptions import ToolError as MCPToolError

from servers.sandbox.isolation import probe_bwrap


@pytest.fixture(autouse=True)
def _close_sessions():
    yield
    import servers.sandbox.server as srv

    if srv._manager is not None:
        srv._manager.close_all()
        srv._manager = None


def _text(r) -> str:
    return "\n".join(c.text for c in r.content if getattr(c, "type", "") == "text")


async def test_tools_listed(mcp_client):
    async with mcp_client("sandbox") as c:
        names = {t.name for t in await c.list_tools()}
    assert {"execute", "create_session", "list_sessions", "reset_session", "close_session", "list_files",
            "read_file", "write_file", "environment_info", "list_artifacts"} <= names


async def test_execute_state_value_figures_and_artifacts(mcp_client, workspace, data_root):
    np.save(data_root / "img.npy", np.arange(6, dtype=np.uint8).reshape(2, 3))
    async with mcp_client("sandbox") as c:
        r = await c.call_tool("execute", {"code": "import numpy as np\nimg = np.load('/data/img.npy' if "
                                                  "__import__('os').path.exists('/data') else "
                                                  f"{str(data_root / 'img.npy')!r})\nprint(img.shape)"})
        s = r.structured_content
        assert s["ok"] and s["stdout"] == "(2, 3)\n" and s["session"] == "default"
        r = await c.call_tool("execute", {
            "code": "import matplotlib.pyplot as plt\nnp.save('doubled.npy', img * 2)\n"
                    "plt.imshow(img)\nint(img.sum())"})
        s = r.structured_content
        assert s["value"] == "15" and s["ok"]
        assert [f["path"] for f in s["files"]] == ["doubled.npy"]
        aid = s["files"][0]["artifact_id"]
        art = workspace.get(aid)
        assert art.kind == "image" and art.shape == [2, 3] and art.provenance["tool"] == "sandbox.execute"
        assert np.array_equal(workspace.load(aid), np.arange(6).reshape(2, 3) * 2)
        images = [cc for cc in r.content if getattr(cc, "type", "") == "image"]
        assert len(images) == 1 and base64.b64decode(images[0].data).startswith(b"\x89PNG")
        assert len(s["figures"]) == 1 and workspace.get(s["figures"][0]).kind == "figure"
        text = _text(r)
        assert "--- value ---\n15" in text and "doubled.npy" in text
        # errors come back as results with a traceback, and the session keeps its state
        r = await c.call_tool("execute", {"code": "img.undefined_attr"})
        s = r.structured_content
        assert not s["ok"] and s["error_type"] == "AttributeError" and "undefined_attr" in s["error"]
        r = await c.call_tool("execute", {"code": "img.dtype.name"})
        assert r.structured_content["value"] == "'uint8'"


async def test_sessions_tools(mcp_client):
    async with mcp_client("sandbox") as c:
        await c.call_tool("create_session", {"name": "s1", "description": "scratch"})
        await c.call_tool("execute", {"code": "a = 1", "session": "s1"})
        await c.call_tool("execute", {"code": "a = 2", "session": "s2"})
        r = await c.call_tool("execute", {"code": "a", "session": "s1"})
        assert r.structured_content["value"] == "1"
        listed = (await c.call_tool("list_sessions", {})).structured_content
        assert {s["name"] for s in listed["sessions"]} == {"s1", "s2"}
        await c.call_tool("reset_session", {"name": "s1"})
        r = await c.call_tool("execute", {"code": "'a' in dir()", "session": "s1"})
        assert r.structured_content["value"] == "False"
        await c.call_tool("close_session", {"name": "s2"})
        with pytest.raises(MCPToolError, match="No session named 's2'"):
            await c.call_tool("close_session", {"name": "s2"})
        with pytest.raises(MCPToolError, match="already exists"):
            await c.call_tool("create_session", {"name": "s1"})
        with pytest.raises(MCPToolError, match="Invalid session name"):
            await c.call_tool("execute", {"code": "1", "session": "../etc"})
        with pytest.raises(MCPToolError, match="timeout_s"):
            await c.call_tool("execute", {"code": "1", "timeout_s": 0})


async def test_file_tools_confined(mcp_client, workspace, data_root):
    (data_root / "notes.txt").write_text("data notes")
    async with mcp_client("sandbox") as c:
        r = await c.call_tool("write_file", {"path": "dir/plan.md", "content": "# plan\n" + "x" * 100})
        s = r.structured_content
        assert s["path"] == "dir/plan.md" and workspace.get(s["artifact_id"]).kind == "text"
        with pytest.raises(MCPToolError, match="already exists"):
            await c.call_tool("write_file", {"path": "dir/plan.md", "content": "again"})
        r = await c.call_tool("read_file", {"path": "dir/plan.md", "max_chars": 7})
        assert r.structured_content["text"] == "# plan\n" and r.structured_content["truncated"]
        r = await c.call_tool("read_file", {"path": s["artifact_id"]})
        assert r.structured_content["text"].startswith("# plan")
        r = await c.call_tool("read_file", {"path": "notes.txt", "root": "data"})
        assert r.structured_content["text"] == "data notes"
        files = (await c.call_tool("list_files", {})).structured_content["files"]
        assert [f["path"] for f in files] == ["dir/plan.md"]
        files = (await c.call_tool("list_files", {"root": "data", "pattern": "*.txt"})).structured_content["files"]
        assert files == [{"path": "notes.txt", "bytes": 10}]
        for i in range(3):
            (data_root / f"n{i}.txt").write_text("n")
        listing = (await c.call_tool("list_files", {"root": "data", "pattern": "*.txt", "limit": 4})).structured_content
        assert len(listing["files"]) == 4 and listing["truncated"] is False and "hint" not in listing
        listing = (await c.call_tool("list_files", {"root": "data", "pattern": "*.txt", "limit": 3})).structured_content
        assert len(listing["files"]) == 3 and listing["truncated"] is True and "pattern=" in listing["hint"]
        for bad in ("../x.txt", "/etc/passwd", "dir/../../x"):
            with pytest.raises(MCPToolError, match="(Absolute path|climbs out)"):
                await c.call_tool("write_file", {"path": bad, "content": "x"})
            with pytest.raises(MCPToolError, match="(Absolute path|climbs out)"):
                await c.call_tool("read_file", {"path": bad})
        with pytest.raises(MCPToolError, match="artifact index"):
            await c.call_tool("write_file", {"path": ".index/index.sqlite", "content": "x", "overwrite": True})
        (workspace.root / "bin.dat").write_bytes(b"\x00\x01\x02")
        with pytest.raises(MCPToolError, match="binary"):
            await c.call_tool("read_file", {"path": "bin.dat"})
        # a symlink written by sandboxed code cannot be used to read outside the workspace
        await c.call_tool("execute", {"code": "import os\nos.symlink('/etc/hostname', 'h.txt')"})
        with pytest.raises(MCPToolError, match="outside"):
            await c.call_tool("read_file", {"path": "h.txt"})


async def test_environment_info(mcp_client, workspace_dir, data_root):
    async with mcp_client("sandbox") as c:
        r = await c.call_tool("environment_info", {})
    info = r.structured_content
    assert info["python"].startswith("3.11")
    assert {"numpy", "scipy", "skimage", "matplotlib", "pandas"} <= set(info["packages"])
    import numpy

    assert info["packages"]["numpy"] == numpy.__version__
    assert "servers.common.synthetic" in info["project_modules"]
    assert info["data_root"] == str(data_root) and info["workspace"] == str(workspace_dir)
    assert info["cwd"] == str(workspace_dir)
    assert info["isolation"] == ("bubblewrap" if probe_bwrap()[0] else "none")
    assert info["limits"]["memory_mb"] == 4096 and info["network"] is False


@pytest.mark.skipif(not probe_bwrap()[0], reason="bubblewrap unavailable")
async def test_escape_attempt_does_not_stop_the_server(mcp_client):
    async with mcp_client("sandbox") as c:
        r = await c.call_tool("execute", {"code": "import ctypes\nctypes.string_at(0)"})
        s = r.structured_content
        assert s["restarted"] and not s["ok"] and "NOTE: the kernel was restarted" in _text(r)
        r = await c.call_tool("execute", {"code": "open('/etc/passwd').read()"})
        assert r.structured_content["error_type"] == "FileNotFoundError"
        r = await c.call_tool("execute", {"code": "6 * 7"})
        assert r.structured_content["value"] == "42"
        # the artifact index exists before the first kernel starts, and is read-only inside
        r = await c.call_tool("execute", {"code": "open('.index/index.sqlite', 'ab').write(b'x')"})
        assert r.structured_content["error_type"] == "OSError" and "Read-only" in r.structured_content["error"]


async def test_stdio_roundtrip(stdio_client):
    async with stdio_client("sandbox") as c:
        r = await c.call_tool("execute", {"code": "import sys\nprint('hi')\nsys.version_info[:2]"})
        s = r.structured_content
        assert s["ok"] and s["stdout"] == "hi\n" and s["value"] == "(3, 11)"
        r = await c.call_tool("execute", {"code": "while True:\n    pass", "timeout_s": 0.5})
        assert r.structured_content["error_type"] == "Timeout"
        r = await c.call_tool("execute", {"code": "'still' + ' serving'"})
        assert r.structured_content["value"] == "'still serving'"
