"""The agent loop with in-memory test servers: tools and code modes, failure paths the model must
hear about (unknown tool, bad arguments, timeouts, malformed JSON answers, step limit, provider
errors), transcripts, reports and secret redaction."""

from __future__ import annotations

import json

import pytest

from client.agent import extract_answer, extract_code, run_agent, wants_json
from client.providers.base import Message, ProviderError, ProviderResponse, ToolCall, Usage
from client.providers.scripted import ScriptedProvider
from client.servers import ServerConfig
from client.testing import load_source
from client.transcript import load_transcript


def servers(*names):
    return {n: ServerConfig.in_memory(n, load_source(n)) for n in names}


class Replay:
    """An LLM stand-in: returns canned turns and records what it was sent."""

    name = "replay"
    model = "claude-sonnet-4-5"

    def __init__(self, turns):
        self.turns = list(turns)
        self.seen: list[list[Message]] = []
        self.tools_seen: list[list] = []
        self.choices: list[str] = []

    async def complete(self, system, messages, tools, tool_choice="auto"):
        self.seen.append(list(messages))
        self.tools_seen.append(list(tools))
        self.choices.append(tool_choice)
        t = self.turns.pop(0)
        if isinstance(t, Exception):
            raise t
        if isinstance(t, str):
            t = ProviderResponse(text=t)
        t.usage = Usage(input_tokens=100, output_tokens=10, requests=1, cost_usd=0.0)
        return t


def call(name, args, cid="c1", text=""):
    return ProviderResponse(text=text, tool_calls=[ToolCall(cid, name, args)])


def last_tool_text(p: Replay) -> str:
    return p.seen[-1][-1].results[-1].text


# -- extraction helpers -------------------------------------------------------------------------
def test_extract_answer_and_code():
    assert extract_answer("blah <answer> 42 </answer>") == (42, "42", True)
    assert extract_answer("<answer>-1.5e3</answer>")[0] == -1500.0
    assert extract_answer("<answer>42 cells</answer>")[0] == "42 cells"
    assert extract_answer('<answer>{"a": 1}</answer>', want_json=True) == ({"a": 1}, '{"a": 1}', True)
    assert extract_answer('Result:\n```json\n{"a": [1, 2]}\n```', want_json=True)[0] == {"a": [1, 2]}
    assert extract_answer('The counts are {"T": 3, "B": 4} in total.', want_json=True)[0] == {"T": 3, "B": 4}
    assert extract_answer("<answer>{'a': 1}</answer>", want_json=True)[2] is False
    assert extract_answer('<answer>[1, 2]</answer>')[0] == [1, 2]  # JSON-looking answers are parsed
    assert extract_answer("") == (None, None, True)
    assert extract_answer("<answer>first</answer> then <answer>second</answer>")[0] == "second"
    assert extract_code("Let me look.\n```python\nx = 1\n```\nand\n```\nx + 1\n```") == "x = 1\nx + 1"
    assert extract_code("```bash\nls\n```") is None
    assert extract_code("no code") is None
    assert wants_json("Answer as JSON with keys a, b") and not wants_json("how many cells?")


# -- tools mode ---------------------------------------------------------------------------------
async def test_scripted_tools_chain_transcript_and_report(tmp_path):
    plan = [{"call": "calc_stats", "args": {"values": [1, 2, 3, 10]}},
            {"call": "calc_add", "args": {"a": "{{steps[0].structured.mean}}", "b": "{{last.structured.max}}"}},
            {"code": "x = {{steps[1].structured.result}} * 2\nprint('x is', x)\nx"},
            {"call": "calc_plot", "args": {"n": 3}, "note": "a figure"},
            {"answer": {"mean": "{{steps[0].structured.mean}}", "x": "{{steps[2].value}}",
                        "side": "{{steps[3].structured.side_px}}"}}]
    out = tmp_path / "run"
    events = []
    res = await run_agent("Compute things; answer in JSON.", ScriptedProvider(plan), servers=servers("calc", "pysession"),
                          out_dir=out, on_event=lambda k, e: events.append(k))
    assert res.ok and res.stop_reason == "answer" and res.error is None
    assert res.answer == {"mean": 4.0, "x": 28.0, "side": 24}
    assert (res.steps, res.tool_calls, res.usage.requests) == (5, 4, 5)
    assert res.outcomes[2].structured["stdout"] == "x is 28.0\n"
    recs = load_transcript(res.transcript_path)
    kinds = [r["type"] for r in recs]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end" and kinds.count("tool_result") == 4
    assert events == kinds  # live view gets the same events
    fig = next(r for r in recs if r["type"] == "tool_result" and r["name"] == "calc_plot")["figures"][0]
    assert (out / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = res.report_path.read_text()
    assert f"![calc_plot]({fig})" in md and '"x": 28.0' in md and "a figure" in md
    html = res.html_path.read_text()
    assert "data:image/png;base64," in html and "Compute things" in html
    # code steps ran in one persistent session whose name the run chose
    sess = {r["arguments"].get("session") for r in recs if r["type"] == "tool_call" and r["name"] == "pysession_execute"}
    assert len(sess) == 1 and next(iter(sess)).startswith("agent-")


async def test_unknown_tool_and_bad_arguments_are_reported_to_the_model(tmp_path):
    p = Replay([call("calc_ad", {"a": 1, "b": 2}),
                call("calc_add", {"a": "not a number", "b": 2}),
                call("calc_add", '{"a": 1, "b":'),
                call("calc_stats", {"values": []}),
                call("calc_add", {"a": 1, "b": 2}),
                "<answer>3</answer>"])
    res = await run_agent("add 1 and 2", p, servers=servers("calc"), out_dir=tmp_path / "r")
    texts = [m.results[0].text for m in p.seen[-1] if m.role == "tool"]
    assert "Unknown tool 'calc_ad'" in texts[0] and "Did you mean: calc_add" in texts[0]
    assert "validation error" in texts[1].lower() and "a" in texts[1]
    assert "not valid JSON" in texts[2]
    assert "values is empty; pass at least one number." in texts[3]  # the server's ToolError text
    assert texts[4] == "3.0"
    flags = [m.results[0].is_error for m in p.seen[-1] if m.role == "tool"]
    assert flags == [True, True, True, True, False]
    assert res.ok and res.answer == 3
    recs = [r for r in load_transcript(res.transcript_path) if r["type"] == "tool_result"]
    assert [r["is_error"] for r in recs] == flags
    assert {t.name for t in p.tools_seen[0]} == {"calc_add", "calc_stats", "calc_make_table", "calc_plot",
                                                 "calc_count", "calc_sleep"}


async def test_progress_is_forwarded_and_recorded(tmp_path):
    seen = []
    res = await run_agent("q", ScriptedProvider([{"call": "calc_count", "args": {"n": 3}}, {"answer": "done"}]),
                          servers=servers("calc"), out_dir=tmp_path / "r",
                          on_event=lambda k, e: seen.append(e) if k == "progress" else None)
    assert res.ok and seen  # throttled, but the first and the final update always get through
    assert (seen[-1]["name"], seen[-1]["progress"], seen[-1]["total"], seen[-1]["message"]) == ("calc_count", 3, 3,
                                                                                             "item 3")
    assert [r for r in load_transcript(res.transcript_path) if r["type"] == "progress"] == seen


async def test_tool_timeout_is_reported_and_server_stays_usable(tmp_path):
    p = Replay([call("calc_sleep", {"s": 1.5}), call("calc_add", {"a": 2, "b": 2}, "c2"), "<answer>4</answer>"])
    res = await run_agent("q", p, servers=servers("calc"), out_dir=tmp_path / "r", step_timeout_s=0.3)
    tool_msgs = [m for m in p.seen[-1] if m.role == "tool"]
    assert tool_msgs[0].results[0].is_error
    assert "did not finish within the per-step timeout of 0.3 s" in tool_msgs[0].results[0].text
    assert tool_msgs[1].results[0].text == "4.0" and res.answer == 4


async def test_malformed_json_answer_gets_one_correction_turn(tmp_path):
    p = Replay(["<answer>{'n': 3}</answer>", '<answer>{"n": 3}</answer>'])
    res = await run_agent("How many? Answer as JSON.", p, servers=servers("calc"), out_dir=tmp_path / "r")
    assert res.answer == {"n": 3} and res.ok and res.steps == 2
    assert "valid JSON" in p.seen[-1][-1].text
    p2 = Replay(["<answer>not json</answer>", "<answer>still not</answer>"])
    res2 = await run_agent("Answer in JSON", p2, servers=servers("calc"), out_dir=tmp_path / "r2")
    assert not res2.ok and res2.answer == "still not" and res2.stop_reason == "answer"


async def test_step_limit_then_wrap_up_answer(tmp_path):
    p = Replay([call("calc_add", {"a": 1, "b": 1}, f"c{i}") for i in range(3)] + ["<answer>2</answer>"])
    res = await run_agent("q", p, servers=servers("calc"), out_dir=tmp_path / "r", max_steps=3)
    assert res.stop_reason == "max_steps" and res.answer == 2 and not res.ok
    assert "step limit" in p.seen[-1][-1].text.lower()
    assert p.choices == ["auto"] * 3 + ["none"] and len(p.tools_seen[-1]) == 6  # tools declared, none allowed
    # the scripted provider has no wrap-up turn
    res2 = await run_agent("q", ScriptedProvider([{"call": "calc_add", "args": {"a": 1, "b": 1}}] * 3),
                           servers=servers("calc"), out_dir=tmp_path / "r2", max_steps=2)
    assert res2.stop_reason == "max_steps" and res2.answer is None and res2.steps == 2


async def test_provider_error_ends_run_with_report(tmp_path):
    p = Replay([call("calc_add", {"a": 1, "b": 1}), ProviderError("Anthropic API error: AuthenticationError")])
    res = await run_agent("q", p, servers=servers("calc"), out_dir=tmp_path / "r")
    assert not res.ok and res.stop_reason == "error" and "AuthenticationError" in res.error
    assert res.tool_calls == 1 and res.report_path.is_file()
    assert "AuthenticationError" in res.report_path.read_text()
    plan_fail = ScriptedProvider([{"call": "calc_stats", "args": {"values": []}}, {"answer": "x"}])
    res2 = await run_agent("q", plan_fail, servers=servers("calc"), out_dir=tmp_path / "r2")
    assert res2.stop_reason == "error" and "Plan step 0 (calc_stats) failed: values is empty" in res2.error


# -- code mode ----------------------------------------------------------------------------------
async def test_code_mode_llm_fixes_its_error(tmp_path, data_root):
    (data_root / "t.csv").write_text("v\n" + "\n".join(str(i) for i in range(1, 11)) + "\n")
    p = Replay(["I'll read it.\n```python\nimport pandas as pd\ndf = pd.read_csv(DATA + '/t.csv')\ndf.v.summ()\n```",
                "```python\nint(df.v.sum())\n```",
                "<answer>55</answer>"])
    res = await run_agent("Sum of column v in t.csv?", p, servers=servers("pysession"), mode="code",
                          out_dir=tmp_path / "r")
    assert res.ok and res.answer == 55 and res.steps == 3
    assert p.tools_seen[0] == []  # code mode offers no tools
    obs1, obs2 = p.seen[1][-1], p.seen[2][-1]
    assert obs1.role == "user" and obs1.text.startswith("Observation") and "AttributeError" in obs1.text
    assert obs2.outcome.value == 55


async def test_code_mode_scripted_plan_and_system_prompt(tmp_path, data_root):
    (data_root / "t.csv").write_text("v\n2\n5\n")
    plan = [{"code": "import pandas as pd\ndf = pd.read_csv(DATA + '/t.csv')\nlen(df)"},
            {"code": "float(df.v.mean())"},
            {"answer": {"rows": "{{steps[0].value}}", "mean": "{{steps[1].value}}"}}]
    seen_system = []

    class Spy(ScriptedProvider):
        async def complete(self, system, messages, tools):
            seen_system.append(system)
            return await super().complete(system, messages, tools)

    res = await run_agent("rows and mean, JSON", Spy(plan), servers=servers("pysession"), mode="code",
                          out_dir=tmp_path / "r")
    assert res.answer == {"rows": 2, "mean": 3.5} and res.ok
    sys_prompt = seen_system[0]
    assert "persistent Python session" in sys_prompt and str(data_root) in sys_prompt and "Examples" in sys_prompt
    codes = [r["code"] for r in load_transcript(res.transcript_path) if r["type"] == "code"]
    assert codes == [plan[0]["code"], plan[1]["code"]]


async def test_code_mode_reply_without_code_or_answer_gets_one_nudge(tmp_path):
    p = Replay(["Let me think about the data first.", "<answer>7</answer>"])
    res = await run_agent("q", p, servers=servers("pysession"), mode="code", out_dir=tmp_path / "r")
    assert res.answer == 7 and res.steps == 2 and "python" in p.seen[1][-1].text
    p2 = Replay(["Thinking.", "Still just prose: 8"])
    res2 = await run_agent("q", p2, servers=servers("pysession"), mode="code", out_dir=tmp_path / "r2")
    assert res2.answer == "Still just prose: 8" and res2.steps == 2


async def test_code_mode_needs_an_execute_tool(tmp_path):
    res = await run_agent("q", Replay(["<answer>x</answer>"]), servers=servers("calc"), mode="code",
                          out_dir=tmp_path / "r")
    assert res.stop_reason == "error" and "sandbox" in res.error


# -- secrets ------------------------------------------------------------------------------------
async def test_api_keys_never_reach_transcript_or_report(tmp_path, monkeypatch):
    secret = "sk-ant-SECRET-0123456789abcdef"
    monkeypatch.setenv("ANTHROPIC_API_KEY", secret)
    plan = [{"code": "import os\nos.environ['ANTHROPIC_API_KEY']"}, {"answer": "{{steps[0].value}}"}]
    res = await run_agent("leak?", ScriptedProvider(plan), servers=servers("pysession"), out_dir=tmp_path / "r")
    assert res.answer == secret  # the in-process tool really returned it …
    for f in (res.transcript_path, res.report_path, res.html_path):
        text = f.read_text()
        assert secret not in text and "[REDACTED]" in text  # … but nothing on disk holds it
    assert json.loads(res.transcript_path.read_text().splitlines()[-1])["answer"] == "[REDACTED]"


async def test_llm_mode_uses_no_servers(tmp_path):
    p = Replay(["<answer>about 120</answer>"])
    res = await run_agent("How many cells?", p, mode="llm", servers=["no_such_server"], out_dir=tmp_path / "r")
    assert res.ok and res.answer == "about 120" and p.tools_seen == [[]]
    assert load_transcript(res.transcript_path)[0]["servers"] == []
    res2 = await run_agent("q", Replay(["<answer>x</answer>"]), mode="llm-only", out_dir=tmp_path / "r2")
    assert res2.ok and load_transcript(res2.transcript_path)[0]["mode"] == "llm"


async def test_bad_mode_and_unknown_server(tmp_path):
    from servers.common.errors import ToolError

    with pytest.raises(ToolError, match="mode"):
        await run_agent("q", Replay([]), servers=servers("calc"), mode="agentic")
    res = await run_agent("q", Replay([]), servers=["no_such_server"], out_dir=tmp_path / "r")
    assert res.stop_reason == "error" and "Unknown server(s): no_such_server" in res.error
