"""Drop-in server discovery, the combined hub, the CLI, and the Claude Desktop config."""

import json
import subprocess
import sys
import textwrap

import pytest
from fastmcp import Client
from fastmcp.client.transports import StdioTransport

from cytoagent.claude_config import claude_desktop_config, merge_into_file
from cytoagent.discovery import build_hub, discover, get_spec, load_server
from servers.common.errors import ToolError
from tests.conftest import REPO, server_env

BUILTINS = {"sandbox", "spatial", "wsi", "preprocess"}

DROPIN = '''
"""Greeter: a drop-in example server."""
from fastmcp import FastMCP
from .helpers import shout

mcp = FastMCP("greeter")

@mcp.tool
def greet(name: str) -> str:
    """Say hello."""
    return shout(f"hello {name}")
'''


@pytest.fixture
def dropin_dir(tmp_path, monkeypatch):
    d = tmp_path / "extra_servers" / "greeter"
    d.mkdir(parents=True)
    (d / "__init__.py").write_text("")
    (d / "helpers.py").write_text("def shout(s):\n    return s.upper()\n")
    (d / "server.py").write_text(textwrap.dedent(DROPIN))
    monkeypatch.setenv("CYTOAGENT_SERVER_PATH", str(d.parent))
    return d.parent


def test_builtin_servers_are_discovered():
    specs = discover()
    assert BUILTINS <= set(specs), f"missing: {BUILTINS - set(specs)}"
    assert all(specs[n].source == "builtin" and specs[n].description for n in BUILTINS)


async def test_dropin_server_is_discovered_and_callable(dropin_dir):
    spec = get_spec("greeter")
    assert spec.source == "path" and spec.description.startswith("Greeter")
    async with Client(load_server(spec)) as c:
        assert (await c.call_tool("greet", {"name": "ada"})).data == "HELLO ADA"


async def test_dropin_server_over_stdio(dropin_dir):
    env = server_env(CYTOAGENT_SERVER_PATH=str(dropin_dir))
    t = StdioTransport(command=sys.executable, args=["-m", "cytoagent", "serve", "greeter"], env=env, cwd=str(REPO))
    async with Client(t, timeout=60) as c:
        assert [x.name for x in await c.list_tools()] == ["greet"]
        assert (await c.call_tool("greet", {"name": "x"})).data == "HELLO X"


async def test_hub_namespaces_tools(dropin_dir):
    hub = build_hub({"greeter": get_spec("greeter")})
    async with Client(hub) as c:
        names = {t.name for t in await c.list_tools()}
        assert "greeter_greet" in names
        assert (await c.call_tool("greeter_greet", {"name": "b"})).data == "HELLO B"


def test_unknown_server():
    with pytest.raises(ToolError, match="Known servers"):
        get_spec("nope")


def test_cli_servers_list_json(dropin_dir):
    out = subprocess.run([sys.executable, "-m", "cytoagent", "servers", "list", "--json"], capture_output=True,
                         text=True, env=server_env(CYTOAGENT_SERVER_PATH=str(dropin_dir)), cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["greeter"]["tools"] == 1
    for name in BUILTINS:
        assert rows[name]["tools"] and rows[name]["tools"] >= 3, rows[name]


def test_claude_config_merge_keeps_other_entries(tmp_path):
    f = tmp_path / "claude_desktop_config.json"
    f.write_text(json.dumps({"mcpServers": {"other": {"command": "x"}}, "theme": "dark"}))
    cfg = claude_desktop_config(data_root=str(tmp_path), workspace=str(tmp_path / "ws"))
    merge_into_file(f, cfg)
    merged = json.loads(f.read_text())
    assert merged["theme"] == "dark" and "other" in merged["mcpServers"]
    assert {f"cytoagent-{n}" for n in BUILTINS} <= set(merged["mcpServers"])
    (tmp_path / "broken.json").write_text("{nope")
    with pytest.raises(ToolError, match="not valid JSON"):
        merge_into_file(tmp_path / "broken.json", cfg)


async def test_claude_config_starts_every_server(tmp_path):
    """Parse the generated config and start each server exactly as Claude Desktop would."""
    cfg = json.loads(json.dumps(claude_desktop_config(data_root=str(tmp_path), workspace=str(tmp_path / "ws"))))
    assert set(cfg) == {"mcpServers"}
    for key, entry in cfg["mcpServers"].items():
        assert set(entry) == {"command", "args", "env"} and isinstance(entry["args"], list)
        assert entry["env"]["CYTOAGENT_DATA_ROOT"] == str(tmp_path.resolve())
        t = StdioTransport(command=entry["command"], args=entry["args"], env=entry["env"])
        async with Client(t, timeout=120) as c:
            tools = await c.list_tools()
            assert len(tools) >= 3, key


async def test_serve_over_streamable_http(dropin_dir):
    """`cytoagent serve NAME --transport http` answers MCP at /mcp on loopback."""
    import asyncio
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cytoagent", "serve", "greeter", "--transport", "http",
                             "--port", str(port)], env=server_env(CYTOAGENT_SERVER_PATH=str(dropin_dir)),
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}/mcp"
        for _ in range(150):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                await asyncio.sleep(0.1)
        async with Client(url, timeout=30) as c:
            assert (await c.call_tool("greet", {"name": "web"})).data == "HELLO WEB"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_hub_of_all_builtins():
    """`serve --all`: every built-in server's tools under its prefix, callable through one process."""
    hub = build_hub({n: s for n, s in discover().items() if n in BUILTINS})
    async with Client(hub) as c:
        names = [t.name for t in await c.list_tools()]
        assert len(names) == len(set(names)) and all(len(n) <= 64 for n in names)
        for server in BUILTINS:
            assert f"{server}_ping" in names
            assert (await c.call_tool(f"{server}_ping", {})).structured_content["server"] == server
        assert {"wsi_slide_info", "spatial_neighborhood_enrichment", "sandbox_execute",
                "preprocess_evaluate_preprocessing"} <= set(names)
