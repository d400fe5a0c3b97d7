"""Scripted plans: loading/validation, templates, literal values, and the turns the provider emits."""

from __future__ import annotations

import json

import pytest

from client.providers.base import Message, ToolOutcome, ToolSpec
from client.providers.scripted import PlanError, ScriptedProvider, load_plan, parse_value, render, step_view

EXEC = ToolSpec("sandbox_execute", "run code", {"type": "object", "properties": {"code": {"type": "string"}}})


def _results():
    a = ToolOutcome("c0", "spatial_load", False, '{"artifact_id": "a1", "n": 42}',
                    structured={"artifact_id": "a1", "n": 42, "rows": [{"cell_type": "T", "n": 7}]})
    b = ToolOutcome("c1", "sandbox_execute", False, "ok", structured={"value": "3.5"}, value=3.5)
    return [step_view(a), step_view(b)]


def test_whole_string_template_is_raw_json_value():
    r = _results()
    assert render("{{steps[0].structured.n}}", r) == 42
    assert render(" {{ steps[1].value }} ", r) == 3.5
    assert render("{{steps[0].structured.rows}}", r) == [{"cell_type": "T", "n": 7}]
    assert render("{{last.value}}", r) == 3.5
    assert render("{{steps[-2].structured.artifact_id}}", r) == "a1"


def test_embedded_templates_are_formatted_and_nested_structures_rendered():
    r = _results()
    assert render("id={{steps[0].structured.artifact_id}} n={{steps[0].structured.n}}", r) == "id=a1 n=42"
    assert render("{{steps[0].structured.rows[0]}}!", r) == '{"cell_type": "T", "n": 7}!'
    out = render({"d": "{{steps[0].structured.artifact_id}}", "xs": ["{{steps[0].structured.rows[0]['cell_type']}}",
                                                                      '{{steps[0].structured.rows[0]["n"]}}', 5]}, r)
    assert out == {"d": "a1", "xs": ["T", 7, 5]}
    assert render("{{steps[0].json.n}}", r) == 42  # text parsed as JSON
    assert render("{{steps[1].is_error}}", r) is False


@pytest.mark.parametrize("tpl,msg", [
    ("{{steps[0].structured.missing}}", "has no 'missing'"),
    ("{{steps[5].text}}", "step 5 has no result"),
    ("{{foo.bar}}", "must start with steps"),
    ("{{steps[0].structured.rows[3]}}", "has no 3"),
    ("{{steps[0].structured..x}}", "cannot parse"),
])
def test_bad_templates_name_the_problem(tpl, msg):
    with pytest.raises(PlanError, match=msg):
        render(tpl, _results())


def test_last_without_results():
    with pytest.raises(PlanError, match="no step has run"):
        render("{{last.text}}", [None])


@pytest.mark.parametrize("raw,expected", [
    ("42", 42), ("'abc'", "abc"), ("{'a': 1.5, 'b': [1, 2]}", {"a": 1.5, "b": [1, 2]}),
    ("np.float64(3.5)", 3.5), ("(1, 2)", [1, 2]), ("None", None), ("array([1, 2])", "array([1, 2])"),
    (7, 7), ("{1, 2}", [1, 2]),
])
def test_parse_value(raw, expected):
    assert parse_value(raw) == expected


def test_load_plan_from_json_yaml_and_mapping(tmp_path):
    steps = [{"call": "calc_add", "args": {"a": 1, "b": 2}}, {"answer": "{{steps[0].structured.result}}"}]
    (tmp_path / "p.json").write_text(json.dumps(steps))
    (tmp_path / "p.yaml").write_text("steps:\n  - call: calc_add\n    args: {a: 1, b: 2}\n"
                                     "  - answer: '{{steps[0].structured.result}}'\n")
    assert load_plan(tmp_path / "p.json") == steps
    assert load_plan(str(tmp_path / "p.yaml")) == steps
    assert load_plan({"steps": steps}) == steps
    assert load_plan(json.dumps(steps)) == steps


@pytest.mark.parametrize("plan,msg", [
    ([], "non-empty list"),
    ([{"call": "x", "code": "y"}], "exactly one of"),
    ([{"args": {}}], "exactly one of"),
    ([{"call": "x", "args": [1]}], "'args' must be a mapping"),
    ([{"code": 3}], "'code' must be a string"),
    (["call x"], "must be a mapping"),
])
def test_invalid_plans(plan, msg):
    with pytest.raises(PlanError, match=msg):
        load_plan(plan)


def test_missing_plan_file(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        load_plan(tmp_path / "nope.yaml")


async def test_provider_emits_tool_calls_code_and_answer():
    plan = [{"call": "calc_stats", "args": {"values": [1, 3]}},
            {"code": "x = {{steps[0].structured.mean}}\nx * 2"},
            {"answer": {"mean": "{{steps[0].structured.mean}}", "twice": "{{steps[1].value}}"}}]
    p = ScriptedProvider(plan)
    tools = [ToolSpec("calc_stats", "", {"type": "object"}), EXEC]
    msgs = [Message("user", text="q")]
    r = await p.complete("", msgs, tools)
    assert [(c.name, c.arguments) for c in r.tool_calls] == [("calc_stats", {"values": [1, 3]})]
    msgs += [Message("assistant", tool_calls=r.tool_calls),
             Message("tool", results=[ToolOutcome(r.tool_calls[0].id, "calc_stats", False, "",
                                                  structured={"mean": 2.0})])]
    r = await p.complete("", msgs, tools)
    assert r.tool_calls[0].name == "sandbox_execute" and r.tool_calls[0].arguments == {"code": "x = 2.0\nx * 2"}
    msgs += [Message("assistant", tool_calls=r.tool_calls),
             Message("tool", results=[ToolOutcome("c", "sandbox_execute", False, "", structured={"value": "4.0"},
                                                  value=4.0)])]
    r = await p.complete("", msgs, tools)
    assert r.tool_calls == [] and r.text == '<answer>{"mean": 2.0, "twice": 4.0}</answer>'


async def test_code_mode_emits_fenced_code_and_rejects_tool_calls():
    p = ScriptedProvider([{"code": "1 + 1"}, {"answer": "{{steps[0].value}}"}])
    r = await p.complete("", [Message("user", text="q")], [])
    assert r.text == "```python\n1 + 1\n```" and not r.tool_calls
    obs = ToolOutcome("c", "x_execute", False, "", structured={"value": "2"}, value=2)
    r = await p.complete("", [Message("user", text="q"), Message("assistant", text=r.text),
                              Message("user", text="obs", outcome=obs)], [])
    assert r.text == "<answer>2</answer>"
    with pytest.raises(PlanError, match="code mode"):
        await ScriptedProvider([{"call": "calc_add"}]).complete("", [Message("user", text="q")], [])


async def test_failed_step_stops_plan_unless_allowed():
    tools = [ToolSpec("calc_add", "", {"type": "object"})]
    err = ToolOutcome("c", "calc_add", True, "bad input: a must be a number")
    hist = [Message("user", text="q"), Message("assistant"), Message("tool", results=[err])]
    with pytest.raises(PlanError, match=r"Plan step 0 \(calc_add\) failed: bad input"):
        await ScriptedProvider([{"call": "calc_add"}, {"answer": "x"}]).complete("", hist, tools)
    r = await ScriptedProvider([{"call": "calc_add", "allow_error": True},
                                {"answer": "{{steps[0].is_error}}"}]).complete("", hist, tools)
    assert r.text == "<answer>true</answer>"


async def test_code_step_needs_an_execute_tool():
    with pytest.raises(PlanError, match="sandbox"):
        await ScriptedProvider([{"code": "1"}]).complete("", [Message("user", text="q")],
                                                         [ToolSpec("calc_add", "", {"type": "object"})])
