"""The optimisation loop: AutoML/random/LLM proposers, report and files, SIGKILL resume."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _close_kernels():
    yield
    from servers.preprocess.evaluate import close_runners

    close_runners()


def _cfg(tmp_path, **kw):
    from evals.optimize.loop import OptimizeConfig

    base = dict(task="spots_synthetic", proposer="automl", rollouts=2, iterations=3, functions_per_iteration=2,
                top_k=3, workers=1, out=str(tmp_path / "out"))
    base.update(kw)
    return OptimizeConfig(**base)


def test_automl_run_report_files_and_consistency(tmp_path):
    from evals.optimize.loop import run_optimization
    from servers.preprocess.bank import Bank

    cfg = _cfg(tmp_path, workers=2)  # the process pool path
    calls = []
    rep = run_optimization(cfg, progress=lambda d, t=None, m=None: calls.append((d, t)))
    assert calls[-1] == (12, 12)
    a = rep["automl"]
    assert a["n_proposals"] == 12 and a["n_scored"] == 12
    b = Bank(Path(cfg.out) / "bank.sqlite")
    fp = rep["task_fingerprint"]
    scores = [r["score"] for r in b.proposals(rep["run_id"], fp)]
    assert a["best_val"] == max(scores)
    # top-K were evaluated on test, and the report's test number is the bank's
    top = a["top"]
    assert len(top) == 3 and all(t["test"] is not None for t in top)
    assert a["best_test"] == b.lookup(fp, "test", a["best_code_hash"])["score"]
    base = rep["baselines"]
    assert base["expert"]["name"] == "minmax" and base["expert"]["val"] is not None and base["expert"]["test"]
    assert set(base) >= {"expert", "identity", "percentile", "normalize99"}
    # files: best function reproduces its score when evaluated again from the file
    best_file = Path(cfg.out) / "functions" / f"{rep['run_id']}-best.py"
    from servers.preprocess.evaluate import evaluate_code
    from servers.preprocess.tasks import get_task

    assert evaluate_code(get_task("spots_synthetic"), best_file.read_text(), "val").score == a["best_val"]
    png = Path(rep["files"]["learning_curves"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((Path(cfg.out) / "report.json").read_text())["run_id"] == rep["run_id"]
    # running the finished config again evaluates nothing new
    rep2 = run_optimization(cfg)
    assert rep2["timing"]["evaluations_this_process"] == 0 and rep2["timing"]["proposals_this_process"] == 0
    assert rep2["automl"]["best_val"] == a["best_val"]


def test_changed_settings_refuse_to_resume(tmp_path):
    from evals.optimize.loop import run_optimization
    from servers.common.errors import ToolError

    run_optimization(_cfg(tmp_path, proposer="random", iterations=1, rollouts=1))
    with pytest.raises(ToolError, match="different settings"):
        run_optimization(_cfg(tmp_path, proposer="random", iterations=2, rollouts=1))
    with pytest.raises(ToolError, match="Unknown proposer"):
        run_optimization(_cfg(tmp_path, proposer="genetic"))
    with pytest.raises(ToolError, match="rollouts must be >= 1"):
        run_optimization(_cfg(tmp_path, rollouts=0))


def _db_rows(path: Path):
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        ev = con.execute("SELECT id, split, code_hash, score, created FROM evaluations").fetchall()
        pr = con.execute("SELECT rollout, iteration, slot, code_hash FROM proposals").fetchall()
    finally:
        con.close()
    return ev, pr


def test_sigkill_resume_loses_and_repeats_nothing(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cytoagent", "optimize", "spots_synthetic", "--proposer", "random", "--rollouts",
           "2", "--iterations", "10", "--functions-per-iteration", "3", "--workers", "1", "--top-k", "2", "--out",
           str(out), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    db = out / "bank.sqlite"
    deadline = time.time() + 120
    before = ([], [])
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                before = _db_rows(db)
            except sqlite3.OperationalError:
                pass
            if len(before[0]) >= 8:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    before = _db_rows(db)
    n_before = len([e for e in before[0] if e[1] == "val"])
    assert 8 <= n_before < 60

    from evals.optimize.loop import OptimizeConfig, run_optimization

    cfg = OptimizeConfig(task="spots_synthetic", proposer="random", rollouts=2, iterations=10,
                         functions_per_iteration=3, top_k=2, workers=1, out=str(out))
    rep = run_optimization(cfg)
    assert rep["timing"]["resumed"] is True
    after_ev, after_pr = _db_rows(db)
    # nothing stored before the kill changed or disappeared
    assert set(before[0]) <= set(after_ev)
    assert set(before[1]) <= set(after_pr)
    # every slot proposed exactly once, every proposal scored exactly once on val
    slots = [(r, i, s) for r, i, s, _ in after_pr]
    assert len(slots) == len(set(slots)) == 60
    val_hashes = [h for _, split, h, _, _ in after_ev if split == "val"]
    assert len(val_hashes) == len(set(val_hashes))
    assert {h for *_, h in after_pr} <= set(val_hashes)
    # the resumed process evaluated only what was missing (+ top-K and baselines on test, baselines on val)
    missing = len({h for *_, h in after_pr} - {e[2] for e in before[0] if e[1] == "val"})
    n_base_val = len({h for _, split, h, _, _ in after_ev if split == "val"} - {h for *_, h in after_pr})
    n_test_new = len([e for e in after_ev if e[1] == "test"]) - len([e for e in before[0] if e[1] == "test"])
    assert rep["timing"]["evaluations_this_process"] == missing + n_base_val + n_test_new
    assert rep["random"]["n_scored"] == 60


def test_extract_functions_and_prompt():
    from evals.optimize.proposers import build_prompt, extract_functions

    reply = """Here you go.
```python
import numpy as np
import cv2

def helper(x):
    return x * 2

def preprocess_images_1(images):
    return [helper(i) for i in images]

def preprocess_images_2(images):
    return [cv2.GaussianBlur(np.float32(i), (0, 0), 1) for i in images]
```
"""
    f = extract_functions(reply, n=3)
    assert set(f) == {1, 2}
    ns: dict = {}
    exec(f[1], ns)
    assert ns["preprocess_images"]([3]) == [6] and "preprocess_images_1" not in f[1]
    assert "def helper" in f[2] and "import cv2" in f[2]
    assert extract_functions("no code here") == {}
    desc = {"data_description": "DATA-XYZ", "task_description": "TASK-ABC", "metric": "spot_f1",
            "primitives": [{"signature": "clahe(img, clip_limit=2.0)", "doc": "CLAHE.", "params": ["clip_limit"]}]}
    early = build_prompt(desc, n=3, iteration=0, iterations=5, bank_view=None, use_bank=True, bank_start=2)
    assert "DATA-XYZ" in early and "TASK-ABC" in early and "clahe(img" in early
    assert "`preprocess_images_3`" in early and "will be shown from iteration 2" in early
    view = {"top": [{"score": 0.91, "code": "def preprocess_images(images):\n    return images"}], "bottom": [],
            "failures": [{"error": "ValueError: boom"}]}
    late = build_prompt(desc, n=3, iteration=3, iterations=5, bank_view=view, use_bank=True, bank_start=2)
    assert "Best functions so far" in late and "0.9100" in late and "ValueError: boom" in late
    off = build_prompt(desc, n=3, iteration=3, iterations=5, bank_view=view, use_bank=False, bank_start=2)
    assert "0.9100" not in off


class FakeProvider:
    """Stands in for an LLM provider: fixed replies, records the prompts it was sent."""

    name, model = "fake", "fake-1"

    def __init__(self):
        self.prompts: list[str] = []

    async def complete(self, system, messages, tools):
        from client.providers.base import ProviderResponse

        self.prompts.append(messages[-1].text)
        k = len(self.prompts)
        return ProviderResponse(text=f"""```python
import numpy as np

def preprocess_images_1(images):
    out = []
    for img in images:
        x = np.asarray(img, dtype=np.float32)
        x = (x - x.min()) / (x.max() - x.min() + 1e-6) * {1.0 + 0.1 * k}
        out.append(x)
    return out

def preprocess_images_2(images):
    raise ValueError('attempt {k}')
```""")


def test_llm_proposer_over_mcp_with_fake_provider(tmp_path):
    from evals.optimize.loop import run_optimization

    fake = FakeProvider()
    cfg = _cfg(tmp_path, proposer="llm", rollouts=1, iterations=3, functions_per_iteration=3, bank_start=1,
               provider="fake", model="fake-1")
    rep = run_optimization(cfg, provider=fake)
    assert len(fake.prompts) == 3
    # describe_task came from the server over MCP: the data description and primitives are in the prompt
    assert "smFISH-like" in fake.prompts[0] and "percentile_normalize(" in fake.prompts[0]
    assert "Best functions so far" in fake.prompts[1] and "attempt 1" in fake.prompts[1]
    s = rep["llm"]
    assert s["n_proposals"] == 9 and s["status_counts"] == {"ok": 3, "error": 6}
    assert s["best_val"] > 0
    tr = json.loads(Path(rep["files"]["transcript"]).read_text())
    assert len(tr) == 3 and tr[0]["reply"].startswith("```python")


@pytest.mark.shared_data
def test_automl_beats_expert_on_smfish_test(shared_data_root, tmp_path):
    from evals.optimize.loop import run_optimization

    rep = run_optimization(_cfg(tmp_path, task="smfish", rollouts=2, iterations=5, functions_per_iteration=4,
                                top_k=5, workers=1))
    exp, best = rep["baselines"]["expert"]["test"], rep["automl"]["best_test"]
    assert rep["splits"] == {"val": 12, "test": 12}
    assert best > exp + 0.2, (best, exp)
    assert rep["beats_expert_on_test"] is True


def test_automl_on_segmentation_task(tmp_path):
    from evals.optimize.loop import run_optimization

    rep = run_optimization(_cfg(tmp_path, task="nuclei_synthetic", rollouts=1, iterations=2, functions_per_iteration=2,
                                top_k=2))
    a = rep["automl"]
    assert rep["metric"] == "ap50" and a["n_scored"] == 4
    assert 0.0 <= a["best_val"] <= 1.0 and a["best_test"] is not None
    assert rep["baselines"]["expert"]["name"] == "normalize99"
