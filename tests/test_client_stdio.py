"""The client over real stdio subprocesses: drop-in servers, external servers from an mcpServers
JSON, a server that crashes mid-run (restarted, model told), and the ``cytoagent ask`` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from client.agent import run_agent
from client.providers.scripted import ScriptedProvider
from client.servers import ServerPool, cytoagent_servers, load_mcp_servers_json
from client.testing import write_test_servers
from client.transcript import load_transcript

REPO = Path(__file__).resolve().parent.parent


def _ext_config(tmp_path: Path, ext_dir: Path, workspace_dir: Path) -> Path:
    """A Claude-Desktop-style config that starts the calc test server as an *external* server."""
    cfg = {"mcpServers": {"calc": {"command": sys.executable, "args": ["-m", "cytoagent", "serve", "calc"],
                                   "env": {"CYTOAGENT_SERVER_PATH": str(ext_dir), "PYTHONPATH": str(REPO),
                                           "CYTOAGENT_WORKSPACE": str(workspace_dir),
                                           "FASTMCP_SHOW_SERVER_BANNER": "false",
                                           "FASTMCP_CHECK_FOR_UPDATES": "off"},
                                   "cwd": str(REPO)},
                          "off": {"command": "nonexistent", "disabled": True}}}
    p = tmp_path / "mcp.json"
    p.write_text(json.dumps(cfg))
    return p


async def test_crash_restart_and_external_servers_over_stdio(tmp_path, workspace_dir):
    ext = write_test_servers(tmp_path / "ext")
    mcp_json = _ext_config(tmp_path, ext, workspace_dir)
    plan = [{"call": "calc_make_table", "args": {"n": 6}},
            {"code": "import pandas as pd\nint(pd.read_csv('{{steps[0].structured.path}}').sq.sum())"},
            {"call": "crashy_crash", "allow_error": True},
            {"call": "crashy_echo", "args": {"x": "{{steps[1].value}}"}},
            {"answer": {"sum_sq": "{{steps[3].structured.result}}", "crash_msg": "{{steps[2].text}}"}}]
    res = await run_agent("sum of squares below 6", ScriptedProvider(plan), servers=["pysession", "crashy"],
                          server_dirs=[str(ext)], mcp_config=mcp_json, out_dir=tmp_path / "run")
    assert res.ok, res.error
    assert res.answer["sum_sq"] == sum(i * i for i in range(6)) == 55
    msg = res.answer["crash_msg"]
    assert "Server 'crashy' stopped (crashed) while running 'crashy_crash'" in msg and "restarted" in msg
    recs = load_transcript(res.transcript_path)
    start = recs[0]
    assert start["servers"] == ["pysession", "crashy", "calc"]
    assert {c["name"]: c["source"] for c in start["server_configs"]} == {
        "pysession": "cytoagent", "crashy": "cytoagent", "calc": "external"}
    assert all("env" not in c for c in start["server_configs"])  # only env *names* are recorded
    errors = [r for r in recs if r["type"] == "tool_result" and r["is_error"]]
    assert [r["name"] for r in errors] == ["crashy_crash"]
    assert (tmp_path / "run" / "server-logs" / "crashy.stderr.log").is_file()


async def test_restart_limit(tmp_path):
    ext = write_test_servers(tmp_path / "ext", ["crashy"])
    cfgs = cytoagent_servers(["crashy"], server_dirs=[str(ext)])
    async with ServerPool(cfgs, max_restarts=0) as pool:
        o = await pool.call("crashy_crash", {})
        assert o.is_error and "not restarted again" in o.text
        o2 = await pool.call("crashy_echo", {"x": 1})
        assert o2.is_error and "unavailable for the rest of this run (it crashed 1 times)" in o2.text


def test_mcp_servers_json_validation(tmp_path):
    import pytest

    from servers.common.errors import ToolError

    p = tmp_path / "c.json"
    p.write_text(json.dumps({"mcpServers": {"a": {"command": "x", "args": ["-y"], "env": {"K": 1}},
                                            "b": {"url": "http://127.0.0.1:1/mcp"},
                                            "c": {"command": "z", "disabled": True}}}))
    cfgs = load_mcp_servers_json(p)
    assert set(cfgs) == {"a", "b"} and cfgs["a"].env == {"K": "1"} and cfgs["a"].source == "external"
    for bad, msg in [({"servers": {}}, "no 'mcpServers'"), ({"mcpServers": {"a": {}}}, "needs a 'command'"),
                     ({"mcpServers": {"a": {"command": "x", "args": "-y"}}}, "list of strings")]:
        p.write_text(json.dumps(bad))
        with pytest.raises(ToolError, match=msg):
            load_mcp_servers_json(p)
    p.write_text("{nope")
    with pytest.raises(ToolError, match="not valid JSON"):
        load_mcp_servers_json(p)
    with pytest.raises(ToolError, match="does not exist"):
        load_mcp_servers_json(tmp_path / "missing.json")


def test_cytoagent_ask_cli_scripted(tmp_path, data_root, workspace_dir):
    ext = write_test_servers(tmp_path / "ext", ["calc"])
    plan = tmp_path / "plan.yaml"
    plan.write_text("- call: calc_stats\n  args: {values: [2, 4, 9]}\n"
                    "- answer: {mean: '{{steps[0].structured.mean}}', max: '{{steps[0].structured.max}}'}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "ANTHROPIC_API_KEY": "sk-ant-never-written-123456"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cytoagent", "ask", "mean and max as JSON", "--provider", "scripted",
           "--plan", str(plan), "--servers", "calc", "--server-dir", str(ext), "--data", str(data_root),
           "--workspace", str(workspace_dir), "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"mean": 5.0, "max": 9.0}
    assert "calc_stats" in r.stderr  # live progress went to stderr
    for name in ("transcript.jsonl", "report.md", "report.html"):
        text = (out / name).read_text()
        assert "sk-ant-never-written" not in text
    assert load_transcript(out / "transcript.jsonl")[0]["data_root"] == str(data_root)


def test_ask_without_key_is_a_clear_error(monkeypatch, capsys):
    from cytoagent.cli import main

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    assert main(["ask", "q", "--provider", "anthropic", "--servers", "calc", "--quiet"]) == 2
    assert "ANTHROPIC_API_KEY" in capsys.readouterr().err


async def test_server_that_cannot_start_is_a_clear_error(tmp_path):
    from client.servers import ServerConfig

    for cfg in (ServerConfig("bad", command=str(tmp_path / "no-such-binary")),
                ServerConfig("bad", command=sys.executable, args=["-c", "import sys; sys.exit(1)"])):
        res = await run_agent("q", ScriptedProvider([{"answer": 1}]), servers={"bad": cfg}, out_dir=tmp_path / "r")
        assert res.stop_reason == "error" and "Could not start MCP server 'bad'" in res.error
        assert "Could not start MCP server 'bad'" in res.report_path.read_text()


def test_chat_and_list_tools_cli(tmp_path, monkeypatch, capsys):
    """In process (the subprocess entry point is covered above): chat over stdin, then --list-tools."""
    import io

    from cytoagent.cli import main

    ext = write_test_servers(tmp_path / "ext", ["calc"])
    plan = tmp_path / "plan.yaml"
    plan.write_text("- call: calc_add\n  args: {a: 2, b: 3}\n- answer: '{{steps[0].structured.result}}'\n")
    common = ["--servers", "calc", "--server-dir", str(ext)]
    monkeypatch.setattr(sys, "stdin", io.StringIO("add 2 and 3\n\n"))
    assert main(["chat", "--provider", "scripted", "--plan", str(plan), "--out", str(tmp_path / "chat")] + common) == 0
    assert "answer 5.0" in capsys.readouterr().err
    recs = load_transcript(tmp_path / "chat" / "turn-001" / "transcript.jsonl")
    assert recs[-1]["answer"] == 5.0
    assert main(["ask", "--list-tools"] + common) == 0
    names = [line.split("\t")[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["calc_add", "calc_stats", "calc_make_table", "calc_plot", "calc_count", "calc_sleep"]



async def test_concurrent_calls_to_a_crashing_server_restart_it_once(tmp_path):
    import asyncio

    ext = write_test_servers(tmp_path / "ext", ["crashy"])
    async with ServerPool(cytoagent_servers(["crashy"], server_dirs=[str(ext)])) as pool:
        outs = await asyncio.gather(pool.call("crashy_crash", {}), *(pool.call("crashy_echo", {"x": i})
                                                                     for i in range(3)))
        assert pool.connections["crashy"].restarts == 1
        assert outs[0].is_error and "restarted" in outs[0].text
        for i, o in enumerate(outs[1:]):
            assert (not o.is_error and o.text == str(i)) or (o.is_error and "restarted" in o.text)
        assert (await pool.call("crashy_echo", {"x": 7})).text == "7"
