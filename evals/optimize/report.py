"""Outputs of an optimisation run: JSON report, best functions as files, learning curves PNG.

``report.json`` holds, for the task's val and test splits: the expert baseline (and reference
baselines), this run's proposer (best validation function: its val and test score; top-K on test:
the best and mean test score), every other proposer's run found in the same bank for the task
(so ``automl`` and ``llm`` runs written to one ``--out`` are compared side by side), counts of
evaluations by status, and timing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from servers.common.atomic import atomic_write_bytes, atomic_write_text


def _proposer_summary(bank, fp: str, run_id: str, top_k: int) -> dict[str, Any]:
    rows = bank.proposals(run_id, fp)
    scored = [r for r in rows if r.get("score") is not None]
    statuses: dict[str, int] = {}
    for r in scored:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    top = bank.top(fp, top_k, run_id=run_id)
    test = {}
    for t in top:
        ev = bank.lookup(fp, "test", t["code_hash"])
        test[t["code_hash"]] = ev["score"] if ev and ev["status"] == "ok" else None
    best = top[0] if top else None
    tk = [v for v in test.values() if v is not None]
    return {
        "run_id": run_id, "n_proposals": len(rows), "n_scored": len(scored), "status_counts": statuses,
        "unique_functions": len({r["code_hash"] for r in rows}),
        "best_val": best["score"] if best else None,
        "best_code_hash": best["code_hash"] if best else None,
        "best_test": test.get(best["code_hash"]) if best else None,
        "top_k": len(top), "top_k_test_max": max(tk) if tk else None,
        "top_k_test_mean": float(np.mean(tk)) if tk else None,
        "top": [{"code_hash": t["code_hash"], "val": t["score"], "test": test.get(t["code_hash"])} for t in top],
    }


def learning_curves_png(bank, fp: str, run_id: str, rollouts: int, expert_val: float | None, title: str) -> bytes:
    """Best-so-far validation score per rollout (thin) and their mean (thick) vs iteration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from servers.common.images import figure_png

    rows = bank.proposals(run_id, fp)
    n_it = max((r["iteration"] for r in rows), default=-1) + 1
    curves = []
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for ro in range(rollouts):
        best, ys = -np.inf, []
        for it in range(n_it):
            s = [r["score"] for r in rows if r["rollout"] == ro and r["iteration"] == it and r.get("score") is not None]
            if s:
                best = max(best, max(s))
            ys.append(best if np.isfinite(best) else np.nan)
        curves.append(ys)
        ax.plot(range(1, n_it + 1), ys, lw=0.8, alpha=0.5)
    if curves and n_it:
        ax.plot(range(1, n_it + 1), np.nanmean(np.array(curves, float), axis=0), lw=2.5, color="k",
                label="mean best-so-far")
    if expert_val is not None:
        ax.axhline(expert_val, ls="--", color="tab:red", label=f"expert (val) {expert_val:.3f}")
    ax.set_xlabel("iteration")
    ax.set_ylabel("best validation score so far")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    png = figure_png(fig)
    plt.close(fig)
    return png


def write_outputs(cfg, task, bank, run_id: str, baselines: dict[str, str], timing: dict[str, Any], *,
                  transcript: list | None = None) -> dict[str, Any]:
    from servers.preprocess.evaluate import code_hash

    out = Path(cfg.out)
    fp = task.fingerprint
    base = {}
    for name, code in baselines.items():
        h = code_hash(code)
        v, t = bank.lookup(fp, "val", h), bank.lookup(fp, "test", h)
        base[name] = {"code_hash": h, "val": v["score"] if v else None, "test": t["score"] if t else None}
    base["expert"]["name"] = task.expert
    this = _proposer_summary(bank, fp, run_id, cfg.top_k)
    others = {}
    for r in bank.runs(fp):
        if r["run_id"] != run_id:
            others[r["run_id"]] = {"proposer": r["proposer"], **_proposer_summary(bank, fp, r["run_id"], cfg.top_k)}
    fdir = out / "functions"
    fdir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, t in enumerate(bank.top(fp, cfg.top_k, run_id=run_id), start=1):
        test = bank.lookup(fp, "test", t["code_hash"])
        header = (f"# {task.name}: rank {i} by validation {task.metric} = {t['score']:.4f}"
                  + (f", test = {test['score']:.4f}" if test else "") + f" (run {run_id}, hash {t['code_hash']})\n")
        p = fdir / f"{run_id}-top{i:02d}.py"
        atomic_write_text(p, header + t["code"])
        files.append(str(p))
    if this["best_code_hash"]:
        atomic_write_text(fdir / f"{run_id}-best.py", bank.code(this["best_code_hash"]))
        files.append(str(fdir / f"{run_id}-best.py"))
    atomic_write_text(fdir / "expert.py", baselines["expert"])
    curves = out / f"{run_id}-learning-curves.png"
    atomic_write_bytes(curves, learning_curves_png(bank, fp, run_id, cfg.rollouts, base["expert"]["val"],
                                                   f"{task.name} - {cfg.proposer} ({cfg.rollouts} rollouts x "
                                                   f"{cfg.iterations} iterations x {cfg.functions_per_iteration})"))
    exp_test = base["expert"]["test"]
    report = {
        "task": task.name, "task_fingerprint": fp, "metric": task.metric, "proposer": cfg.proposer, "run_id": run_id,
        "config": cfg.identity(), "splits": {s: len(task.samples(s)) for s in ("val", "test")},
        "baselines": base, cfg.proposer: this, "other_runs": others,
        "beats_expert_on_test": (this["best_test"] is not None and exp_test is not None
                                 and this["best_test"] > exp_test),
        "evaluations": bank.counts(fp), "timing": timing,
        "files": {"functions": files, "learning_curves": str(curves), "bank": str(bank.path)},
    }
    if transcript is not None:
        tp = out / f"{run_id}-transcript.json"
        atomic_write_text(tp, json.dumps(transcript, indent=1))
        report["files"]["transcript"] = str(tp)
    atomic_write_text(out / f"{run_id}-report.json", json.dumps(report, indent=2, default=str))
    atomic_write_text(out / "report.json", json.dumps(report, indent=2, default=str))
    return report
