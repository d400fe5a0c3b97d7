"""Every shipped reference plan is well formed and calls tools that exist with arguments they accept."""

from __future__ import annotations

import asyncio

import pytest

from evals.runner import plan_servers
from evals.schema import load_questions


@pytest.fixture(scope="module")
def tool_schemas() -> dict[str, dict]:
    from cytoagent.discovery import discover, load_server

    async def collect() -> dict[str, dict]:
        out = {}
        for name, spec in discover().items():
            for t in await load_server(spec).list_tools():
                out[f"{name}_{t.name}"] = t.parameters
        return out

    return asyncio.run(collect())


def test_plans_are_valid_scripted_plans():
    from client.providers.scripted import load_plan

    for q in load_questions():
        if q.reference_plan is None:
            continue
        steps = load_plan(q.reference_plan)
        assert "answer" in steps[-1], q.id
        assert plan_servers(steps), q.id


def test_plan_calls_match_tool_schemas(tool_schemas):
    n_calls = 0
    for q in load_questions():
        for i, step in enumerate(q.reference_plan or []):
            if "call" not in step:
                continue
            n_calls += 1
            assert step["call"] in tool_schemas, f"{q.id} step {i}: no tool {step['call']}"
            schema = tool_schemas[step["call"]]
            args = set(step.get("args", {}))
            props = set(schema.get("properties", {}))
            assert args <= props, f"{q.id} step {i}: unknown args {args - props}"
            assert set(schema.get("required", [])) <= args, f"{q.id} step {i}: missing required args"
    assert n_calls >= 40  # the plans exercise the domain tools, not only the sandbox


def test_plan_servers_and_unknown_tools():
    from servers.common.errors import ToolError

    assert plan_servers([{"call": "wsi_slide_info", "args": {}}, {"code": "1"}, {"answer": 1}]) == ["wsi", "sandbox"]
    with pytest.raises(ToolError, match="no known server"):
        plan_servers([{"call": "nosuchserver_tool"}])
