"""The eval runner end to end: scripted reference plans through real MCP servers (stdio), scoring,
resume, reports, the ablation modes, skipping; the whole shipped set's plans score 1.0 (slow)."""

from __future__ import annotations

import csv
import json

import pytest

from evals.runner import EvalConfig, run_eval
from evals.schema import Question, load_questions

FAST_GENERATED = ["spatialqa_generated_composition", "patchqa_generated_spot_counts"]
FAST_SHARED = ["dataqa_cmu_dimensions", "spatialqa_cosmx_tx_per_fov", "dataqa_dsb_annotated_counts"]


@pytest.fixture(scope="module")
def gen_root(tmp_path_factory):
    from evals import generate

    return generate.generate_all(tmp_path_factory.mktemp("evgen"))


COMPOSITION_CODE = ("import pandas as pd\ndf = pd.read_csv(f'{DATA}/cells/random3.csv')\nvc = df.cell_type.value_counts()\n"
                    "[{'cell_type': k, 'n_cells': int(v), 'fraction': v / len(df)} for k, v in vc.items()]")


def _code_plan_question(qid: str, code: str) -> Question:
    q = next(q for q in load_questions() if q.id == "spatialqa_generated_composition")
    return q.model_copy(update={"id": qid, "reference_plan": [{"code": code}, {"answer": "{{last.value}}"}]})


def _wrong_plan_question() -> Question:
    # same computation, but the fractions are reported in percent (a classic unit slip)
    return _code_plan_question("wrong_units", COMPOSITION_CODE.replace("v / len(df)", "100 * v / len(df)"))


async def test_runner_scores_reference_plans_and_resumes(tmp_path, gen_root):
    qs = load_questions(ids=FAST_GENERATED) + [_wrong_plan_question()]
    nop = qs[0].model_copy(update={"id": "no_plan", "reference_plan": None, "plan_pending": "tool missing"})
    cfg = EvalConfig(provider="scripted", mode="tools", out_dir=tmp_path / "out", parallel=2,
                     generated_root=gen_root, step_timeout_s=120)
    seen: list[str] = []
    out = await run_eval([*qs, nop], cfg, on_record=lambda r: seen.append(r["id"]))
    recs = {r["id"]: r for r in out["records"]}
    for qid in FAST_GENERATED:
        assert recs[qid]["status"] == "ok" and recs[qid]["score"] == 1.0, recs[qid]
        assert recs[qid]["tool_calls"] >= 1
    # n_cells right (3 values), fractions 100x off (3 values wrong)
    assert recs["wrong_units"]["score"] == pytest.approx(0.5)
    assert recs["no_plan"]["status"] == "skipped" and "tool missing" in recs["no_plan"]["message"]
    summ = out["summary"]
    assert summ["overall"]["n"] == 3 and summ["overall"]["skipped"] == 1
    assert summ["overall"]["score"] == pytest.approx(2.5 / 3)
    d = cfg.out_dir
    data = json.loads((d / "results.json").read_text())
    assert data["summary"] == summ and len(data["results"]) == 4
    rows = list(csv.DictReader((d / "results.csv").open()))
    assert [r["id"] for r in rows] == [q.id for q in [*qs, nop]]
    assert (d / "scores_by_category.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (d / "summary.md").read_text()
    assert "| SpatialQA | 2 | 0.750 |" in md and "| PatchQA | 1 | 1.000 |" in md
    assert (d / "runs" / FAST_GENERATED[0] / "transcript.jsonl").is_file()
    assert len((d / "results.jsonl").read_text().splitlines()) == 3  # skipped ones are not stored

    # resume: nothing is run again, the summary is the same
    seen.clear()
    again = await run_eval([*qs, nop], cfg, on_record=lambda r: seen.append(r["id"]))
    assert seen == ["no_plan"] and again["summary"] == summ
    assert len((d / "results.jsonl").read_text().splitlines()) == 3


async def test_code_mode_and_llm_only_mode(tmp_path, gen_root):
    from client.providers.base import ProviderResponse

    q = _code_plan_question("composition_code", COMPOSITION_CODE)
    # code mode: the plan's code step becomes a fenced python code action in the sandbox
    cfg = EvalConfig(provider="scripted", mode="code", out_dir=tmp_path / "code", generated_root=gen_root)
    out = await run_eval([q], cfg)
    assert out["records"][0]["score"] == 1.0, out["records"][0]

    seen_tools: list[int] = []

    class Guesser:  # an "LLM" without tools that guesses an even split
        name, model = "fake", "fake-1"

        async def complete(self, system, messages, tools):
            seen_tools.append(len(tools))
            rows = [{"cell_type": t, "n_cells": 500, "fraction": 1 / 3} for t in ("tumor", "immune", "stroma")]
            return ProviderResponse(text="```json\n" + json.dumps(rows) + "\n```")

    cfg = EvalConfig(provider="fake", mode="llm-only", out_dir=tmp_path / "llm", generated_root=gen_root)
    out = await run_eval([q], cfg, provider_factory=lambda q, c: Guesser())
    rec = out["records"][0]
    assert seen_tools == [0]  # no tools offered
    assert rec["steps"] == 1 and rec["tool_calls"] == 0
    # counts must be exact (534/484/482) and fractions within 1% (0.356/0.323/0.321): all six wrong
    assert rec["score"] == 0.0 and rec["n_values"] == 6


async def test_shared_questions_skip_without_shared_data(tmp_path):
    qs = load_questions(ids=["dataqa_cmu_dimensions"])
    cfg = EvalConfig(out_dir=tmp_path / "o", shared_root=tmp_path / "absent")
    out = await run_eval(qs, cfg)
    assert out["records"][0]["status"] == "skipped" and "shared data not found" in out["records"][0]["message"]
    assert out["summary"]["overall"]["n"] == 0 and out["summary"]["overall"]["skipped"] == 1


@pytest.mark.shared_data
async def test_shared_reference_plans_fast_subset(tmp_path, shared_data):
    cfg = EvalConfig(out_dir=tmp_path / "o", shared_root=shared_data, parallel=2, step_timeout_s=120)
    out = await run_eval(load_questions(ids=FAST_SHARED), cfg)
    assert [r["score"] for r in out["records"]] == [1.0] * len(FAST_SHARED), out["records"]


def test_cli_lists_and_runs(tmp_path, gen_root, capsys):
    from cytoagent.cli import main

    assert main(["eval", "--list"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert len(listed) == len(load_questions()) >= 40
    rc = main(["eval", "--ids", "spatialqa_generated_composition", "--out", str(tmp_path / "o"),
               "--generated-root", str(gen_root), "--mode", "tools", "--provider", "scripted"])
    assert rc == 0
    assert "| **overall** | 1 | 1.000 |" in capsys.readouterr().out
    assert main(["eval", str(tmp_path / "missing.json")]) == 2  # a clear error, not a traceback


@pytest.mark.slow
@pytest.mark.shared_data
async def test_all_reference_plans_score_one(tmp_path, shared_data, gen_root):
    qs = load_questions()
    cfg = EvalConfig(out_dir=tmp_path / "all", shared_root=shared_data, generated_root=gen_root, parallel=2,
                     step_timeout_s=300)
    out = await run_eval(qs, cfg)
    bad = [(r["id"], r["status"], r["score"], r["error"] or r["message"]) for r in out["records"]
           if r["score"] != 1.0 and not (r["status"] == "skipped" and "no reference plan" in r["message"])]
    assert not bad
    assert out["summary"]["overall"]["score"] == 1.0


def test_load_done_retries_crashed_runs(tmp_path):
    from evals.runner import load_done

    p = tmp_path / "results.jsonl"
    lines = [{"id": "a", "status": "ok", "score": 1.0}, {"id": "b", "status": "error", "score": 0.0},
             {"id": "c", "status": "ok", "score": 0.0}, {"id": "c", "status": "error", "score": 0.0},
             {"id": "d", "status": "no_json", "score": 0.0}]
    p.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"id": "e", "sta')  # torn last line
    assert sorted(load_done(p)) == ["a", "d"]
