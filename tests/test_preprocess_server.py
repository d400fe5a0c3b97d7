"""The preprocess MCP server in memory: tools, errors, bank, test evaluation, task folders."""

from __future__ import annotations

import json

import pytest
from fastmcp.exceptions import ToolError as MCPToolError


@pytest.fixture(autouse=True)
def _close_kernels():
    yield
    from servers.preprocess.evaluate import close_runners

    close_runners()


GOOD = """import numpy as np
import cv2

def preprocess_images(images):
    out = []
    for img in images:
        x = np.asarray(img, dtype=np.float32)
        x = cv2.GaussianBlur(x, (0, 0), 1.0)
        x = x - cv2.GaussianBlur(x, (0, 0), 10.0)
        lo, hi = np.percentile(x, [1, 99.9])
        out.append(np.clip((x - lo) / (hi - lo + 1e-6), 0, 1))
    return out
"""


async def test_list_and_describe(mcp_client):
    async with mcp_client("preprocess") as c:
        names = {t.name for t in await c.list_tools()}
        assert {"list_tasks", "describe_task", "evaluate_preprocessing", "bank_top", "bank_bottom", "bank_history",
                "evaluate_on_test", "add_task", "get_function", "list_artifacts"} <= names
        r = await c.call_tool("list_tasks", {})
        tasks = {t["name"]: t for t in r.structured_content["tasks"]}
        assert tasks["spots_synthetic"]["available"] is True
        assert tasks["spots_synthetic"]["metric"] == "spot_f1"
        d = (await c.call_tool("describe_task", {"task": "spots_synthetic"})).structured_content
        assert d["splits"]["val"]["n_images"] == 8 and d["splits"]["test"]["n_images"] == 8
        assert d["downstream"]["settings"]["threshold"] == 0.1
        assert "preprocess_images" in d["signature"]
        assert any(p["name"] == "clahe" for p in d["primitives"])
        assert d["bank"]["best"] == []
        with pytest.raises(MCPToolError, match="Unknown task"):
            await c.call_tool("describe_task", {"task": "nope"})


async def test_evaluate_record_bank_and_test(mcp_client):
    async with mcp_client("preprocess") as c:
        r = await c.call_tool("evaluate_preprocessing", {"task": "spots_synthetic", "code": GOOD})
        s = r.structured_content
        assert s["status"] == "ok" and 0.5 < s["score"] <= 1.0 and len(s["per_image"]) == 8
        assert any(getattr(b, "type", "") == "image" for b in r.content)
        bad = await c.call_tool("evaluate_preprocessing", {"task": "spots_synthetic",
                                                           "code": "def preprocess_images(x):\n    return 1/0\n"})
        assert bad.is_error is False  # a scored failure, not a tool error
        assert bad.structured_content["status"] == "error" and "ZeroDivisionError" in bad.structured_content["error"]
        again = await c.call_tool("evaluate_preprocessing", {"task": "spots_synthetic", "code": GOOD,
                                                             "preview": False})
        assert again.structured_content["cached"] is True and again.structured_content["score"] == s["score"]
        top = (await c.call_tool("bank_top", {"task": "spots_synthetic", "k": 5})).structured_content
        assert [f["code_hash"] for f in top["functions"]] == [s["code_hash"]]
        worst = (await c.call_tool("bank_bottom", {"task": "spots_synthetic", "include_failures": True}))
        assert worst.structured_content["functions"][0]["status"] == "error"
        hist = (await c.call_tool("bank_history", {"task": "spots_synthetic"})).structured_content
        assert [h["status"] for h in hist["evaluations"]] == ["ok", "error"]
        code = (await c.call_tool("get_function", {"code_hash": s["code_hash"]})).structured_content["code"]
        assert code == GOOD
        t = (await c.call_tool("evaluate_on_test", {"task": "spots_synthetic", "k": 3})).structured_content
        assert t["expert"]["which"] == "expert" and t["expert"]["test"] is not None
        assert t["best_val_function_test"] > t["expert"]["test"]
        d = (await c.call_tool("describe_task", {"task": "spots_synthetic"})).structured_content
        assert d["bank"]["best"][0]["code_hash"] == s["code_hash"]
        with pytest.raises(MCPToolError, match="Unknown split"):
            await c.call_tool("evaluate_preprocessing", {"task": "spots_synthetic", "code": GOOD, "split": "train"})
        with pytest.raises(MCPToolError, match="timeout_s"):
            await c.call_tool("evaluate_preprocessing", {"task": "spots_synthetic", "code": GOOD, "timeout_s": 0})


async def test_add_task_folder(mcp_client, data_root):
    from test_preprocess import _write_spot_folder

    _write_spot_folder(data_root / "mine" / "spots_a")
    async with mcp_client("preprocess") as c:
        r = (await c.call_tool("add_task", {"folder": "mine/spots_a"})).structured_content
        assert r["name"] == "my_spots" and r["splits"] == {"val": 2, "test": 2}
        names = [t["name"] for t in (await c.call_tool("list_tasks", {})).structured_content["tasks"]]
        assert "my_spots" in names
        ev = (await c.call_tool("evaluate_preprocessing", {"task": "my_spots", "code": GOOD,
                                                          "preview": False})).structured_content
        assert ev["status"] == "ok"
        with pytest.raises(MCPToolError, match="No such file|No task file"):
            await c.call_tool("add_task", {"folder": "mine/missing"})
    assert json.loads((data_root.parent / "workspace" / "preprocess" / "task_folders.json").read_text()) == [
        "mine/spots_a"]


async def test_stdio_server_evaluates_and_survives_bad_code(stdio_client):
    async with stdio_client("preprocess") as c:
        bad = await c.call_tool("evaluate_preprocessing", {
            "task": "spots_synthetic", "code": "def preprocess_images(images):\n    while True:\n        pass\n",
            "timeout_s": 1, "preview": False})
        assert bad.structured_content["status"] == "timeout"
        ok = await c.call_tool("evaluate_preprocessing", {"task": "spots_synthetic", "code": GOOD, "preview": False})
        assert ok.structured_content["status"] == "ok" and ok.structured_content["score"] > 0.5


def test_cli_lists_tasks(capsys):
    from cytoagent.cli import main

    assert main(["optimize", "--list"]) == 0
    out = capsys.readouterr().out
    assert "spots_synthetic" in out and "smfish" in out
    assert main(["optimize"]) == 2
