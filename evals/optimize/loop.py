"""The optimisation loop: rollouts × iterations × functions per iteration (paper §3).

Per iteration, every rollout's proposer fills its missing slots; the proposals are written to the
bank *before* evaluation; all unscored proposals of the iteration (across rollouts, deduplicated by
code hash) are evaluated in parallel through ``servers.common.executor`` and each result is written
the moment it arrives. Killing the process (even SIGKILL) and running the same command again skips
every scored slot, evaluates proposed-but-unscored ones, and never re-proposes a slot — no
evaluation lost or repeated (an evaluation in flight at the kill is run again; it was never stored).

After the last iteration the top-K functions by validation score (over all rollouts) are evaluated
on the test split, as are the expert baseline (and a second reference baseline); see
:mod:`evals.optimize.report` for the outputs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from servers.common.errors import ToolError
from servers.common.progress import ProgressFn, noop_progress

log = logging.getLogger("cytoagent.optimize")


@dataclass
class OptimizeConfig:
    """Settings of one run (everything but ``out``/``workers``/``progress`` is part of its identity)."""

    task: str
    proposer: str = "automl"
    rollouts: int = 2
    iterations: int = 10
    functions_per_iteration: int = 3
    top_k: int = 10
    seed: int = 0
    min_steps: int = 2
    max_steps: int = 4
    use_bank: bool = True
    bank_start: int = 5
    bank_k: int = 3
    timeout_s: float = 60.0
    out: str = "optimize-out"
    run_id: str | None = None
    workers: int | None = None
    bank_path: str | None = None
    provider: str | None = None
    model: str | None = None
    extra_baselines: list[str] = field(default_factory=lambda: ["identity", "percentile", "minmax", "normalize99"])

    def identity(self) -> dict[str, Any]:
        keys = ("task", "proposer", "rollouts", "iterations", "functions_per_iteration", "seed", "min_steps",
                "max_steps", "use_bank", "bank_start", "bank_k", "provider", "model")
        return {k: getattr(self, k) for k in keys}

    def validate(self) -> None:
        from evals.optimize.proposers import PROPOSERS

        if self.proposer not in PROPOSERS:
            raise ToolError(f"Unknown proposer {self.proposer!r}.", hint=f"Use one of: {', '.join(PROPOSERS)}.")
        for k in ("rollouts", "iterations", "functions_per_iteration", "top_k"):
            if int(getattr(self, k)) < 1:
                raise ToolError(f"{k} must be >= 1 (got {getattr(self, k)}).")
        if not 1 <= self.min_steps <= self.max_steps:
            raise ToolError(f"Need 1 <= min_steps <= max_steps (got {self.min_steps}, {self.max_steps}).")
        if self.timeout_s <= 0:
            raise ToolError(f"timeout_s must be > 0 (got {self.timeout_s}).")


class Evaluator:
    """Evaluates codes in parallel through the configured executor, recording each result at once."""

    def __init__(self, task, bank, workers: int | None = None, timeout_s: float = 60.0):
        from servers.common.config import get_config
        from servers.common.executor import get_executor

        self.task, self.bank, self.timeout_s = task, bank, timeout_s
        self.cfg = get_config()
        self.executor = get_executor(workers=workers)
        self.n_done = 0
        self.seconds = 0.0

    def run(self, codes: dict[str, str], split: str, origin: str, progress: ProgressFn | None = None) -> dict[str, dict]:
        """``{code_hash: code}`` → ``{code_hash: evaluation dict}``, skipping any already in the bank."""
        from servers.preprocess.evaluate import evaluate_job

        fp = self.task.fingerprint
        done = self.bank.evaluated(fp, split, codes)
        todo = {h: c for h, c in codes.items() if h not in done}
        results = {h: self.bank.lookup(fp, split, h) for h in done}
        if not todo:
            return results
        env = self.cfg.env()
        t0 = time.perf_counter()
        futs = {}
        for h, c in todo.items():
            job = {"task": self.task.to_dict(), "code": c, "split": split, "timeout_s": self.timeout_s,
                   "env": env, "job_id": h}
            futs[self.executor.submit(evaluate_job, job)] = h
        failures = []
        for fut in self.executor.as_completed(list(futs)):
            h = futs[fut]
            try:
                ev = fut.result()
            except Exception as e:  # noqa: BLE001 - infrastructure failure: leave the slot pending
                failures.append(f"{h}: {type(e).__name__}: {e}")
                continue
            ev["code_hash"] = h
            self.bank.record(self.task.name, fp, ev, code=todo[h], origin=origin)
            results[h] = ev
            self.n_done += 1
            if progress:
                progress(len(results), len(codes), f"{split} evaluations")
        self.seconds += time.perf_counter() - t0
        if failures:
            raise ToolError(f"{len(failures)} evaluation(s) failed in the executor (not the candidates' fault): "
                            f"{failures[0]}", hint="Run the same command again to resume.")
        return results

    def close(self) -> None:
        self.executor.close()


def _bank_view(bank, fp: str, run_id: str, rollout: int, k: int) -> dict[str, Any]:
    top = bank.top(fp, k, run_id=run_id, rollout=rollout)
    bottom = bank.top(fp, k, worst=True, run_id=run_id, rollout=rollout)
    rows = bank.proposals(run_id, fp, rollout=rollout)
    failures = [r for r in rows if r.get("status") not in (None, "ok") and r.get("error")][-3:]
    return {"top": top, "bottom": bottom, "failures": failures}


def run_optimization(cfg: OptimizeConfig, *, progress: ProgressFn | None = None, provider: Any = None,
                     describe: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run (or resume) an optimisation and write the report; returns the report dict."""
    from evals.optimize.proposers import describe_via_mcp, make_proposer
    from evals.optimize.report import write_outputs
    from servers.preprocess.bank import get_bank
    from servers.preprocess.evaluate import code_hash
    from servers.preprocess.tasks import get_task

    cfg.validate()
    progress = progress or noop_progress
    task = get_task(cfg.task)
    ok, why = task.available()
    if not ok:
        raise ToolError(f"Task {cfg.task!r} is not available here: {why}.",
                        hint="Point CYTOAGENT_DATA_ROOT at the shared data, or use spots_synthetic.")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    bank = get_bank(cfg.bank_path or out / "bank.sqlite")
    fp = task.fingerprint
    run_id = cfg.run_id or f"{cfg.task}-{cfg.proposer}-seed{cfg.seed}"
    state = bank.start_run(run_id, task.name, fp, cfg.proposer, cfg.identity())
    if cfg.proposer == "llm" and describe is None:
        describe = describe_via_mcp(task.name)
    proposers = [make_proposer(cfg.proposer, seed=cfg.seed, rollout=r, min_steps=cfg.min_steps,
                               max_steps=cfg.max_steps, provider=provider, describe=describe,
                               iterations=cfg.iterations, use_bank=cfg.use_bank, bank_start=cfg.bank_start,
                               timeout_s=cfg.timeout_s) for r in range(cfg.rollouts)]
    # replay what the bank already knows (resume)
    for row in bank.proposals(run_id, fp):
        if row.get("score") is not None:
            proposers[row["rollout"]].observe(row)
    F = cfg.functions_per_iteration
    total = cfg.rollouts * cfg.iterations * F
    evaluator = Evaluator(task, bank, cfg.workers, cfg.timeout_s)
    t_start = time.perf_counter()
    n_proposed_now = 0
    try:
        for it in range(cfg.iterations):
            new_rows = []
            for r in range(cfg.rollouts):
                have = {p["slot"] for p in bank.proposals(run_id, fp, rollout=r, iteration=it)}
                missing = [s for s in range(F) if s not in have]
                if not missing:
                    continue
                view = _bank_view(bank, fp, run_id, r, cfg.bank_k) if cfg.proposer == "llm" else {}
                for p in proposers[r].propose(it, missing, view):
                    new_rows.append({"rollout": r, "iteration": it, "slot": p.slot, "code": p.code,
                                     "code_hash": code_hash(p.code), "params": p.params})
            if new_rows:
                bank.add_proposals(run_id, new_rows, origin=cfg.proposer)
                n_proposed_now += len(new_rows)
            rows = bank.proposals(run_id, fp, iteration=it)
            pending = {r["code_hash"]: r["code"] for r in rows if r.get("status") is None}
            if pending:
                evaluator.run(pending, "val", cfg.proposer)
            for row in bank.proposals(run_id, fp, iteration=it):
                proposers[row["rollout"]].observe(row)
            done_slots = (it + 1) * cfg.rollouts * F
            best = bank.top(fp, 1, run_id=run_id, with_code=False)
            progress(done_slots, total, f"iteration {it + 1}/{cfg.iterations}, best val "
                     f"{best[0]['score']:.4f}" if best else f"iteration {it + 1}/{cfg.iterations}")
        # top-K on test, plus baselines on both splits
        top = bank.top(fp, cfg.top_k, run_id=run_id)
        evaluator.run({t["code_hash"]: t["code"] for t in top}, "test", cfg.proposer)
        baselines = {"expert": task.expert_code()}
        from servers.preprocess.tasks import EXPERTS

        for name in cfg.extra_baselines:
            if name in EXPERTS and name != task.expert:
                baselines[name] = EXPERTS[name]()
        base_codes = {code_hash(c): c for c in baselines.values()}
        for split in ("val", "test"):
            evaluator.run(base_codes, split, "baseline")
        search_seconds = evaluator.seconds
        n_evals_now = evaluator.n_done
    finally:
        evaluator.close()
        for p in proposers:
            p.close()
    bank.finish_run(run_id)
    wall = time.perf_counter() - t_start
    timing = {"wall_s": round(wall, 2), "evaluations_this_process": n_evals_now,
              "proposals_this_process": n_proposed_now, "evaluation_s": round(search_seconds, 2),
              "evaluations_per_minute": round(60 * n_evals_now / search_seconds, 1) if search_seconds > 0 else None,
              "resumed": state["resumed"]}
    transcript = None
    if cfg.proposer == "llm":
        transcript = [t for p in proposers for t in getattr(p, "transcript", [])]
    return write_outputs(cfg, task, bank, run_id, baselines, timing, transcript=transcript)


def config_dict(cfg: OptimizeConfig) -> dict[str, Any]:
    return asdict(cfg)
