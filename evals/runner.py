"""Run a question set through the agent client and score it (NOVA's SlideQuest runner, over MCP).

Modes mirror the NOVA ablations:

``llm-only``  the model answers without any tool (no servers; one turn)
``code``      LLM + Python: code actions run in the sandbox server; ``retries`` extra turns let the
              model fix failing code (0 = single shot, "LLM with PI"; N = "LLM with PI and retries")
``tools``     the full toolset (all discovered servers, sandbox included), up to ``max_steps`` turns

Each question runs with a fresh workspace and its own server processes (nothing leaks between
questions), questions run ``parallel`` at a time, and finished questions are appended to
``results.jsonl`` as they complete, so an interrupted run resumes where it stopped. At the end the
runner writes ``results.json`` (records + per-category summary), ``results.csv``, ``summary.md``
and ``scores_by_category.png``.

Questions whose data is absent (the shared data folder is not there) are reported ``skipped``;
with the scripted provider, questions without a reference plan are skipped too.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from evals.schema import Question
from evals.scorer import QuestionScore, aggregate, score_answer
from servers.common.atomic import atomic_write_bytes, atomic_write_text
from servers.common.errors import ToolError

MODES = ("tools", "code", "llm-only")
REPO = Path(__file__).resolve().parent.parent
DEFAULT_SHARED = Path(os.environ.get("CYTOAGENT_SHARED_DATA", REPO.parent / "shared" / "data"))


@dataclass
class EvalConfig:
    provider: str = "scripted"
    mode: str = "tools"
    out_dir: Path = Path("eval-results")
    model: str | None = None
    base_url: str | None = None
    retries: int = 0
    max_steps: int | None = None  # default: tools 20, code 1 + retries, llm-only 1
    parallel: int = 2
    shared_root: Path | None = None  # data root for data="shared" questions
    generated_root: Path | None = None  # evals.generate root for data="generated" questions
    servers: list[str] | None = None  # tools mode: restrict to these servers
    step_timeout_s: float = 600
    question_timeout_s: float = 1800

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ToolError(f"Unknown eval mode {self.mode!r}.", hint=f"Use one of: {', '.join(MODES)}.")
        if self.retries < 0 or self.parallel < 1:
            raise ToolError("retries must be >= 0 and parallel >= 1.")
        self.out_dir = Path(self.out_dir)

    def steps_for(self, q: Question) -> int:
        if self.max_steps:
            return self.max_steps
        if self.provider == "scripted" and q.reference_plan:
            return len(q.reference_plan) + 2
        return {"tools": 20 + self.retries, "code": 1 + self.retries, "llm-only": 1}[self.mode]


@dataclass
class Record:
    id: str
    category: str
    status: str
    score: float
    mode: str
    provider: str
    model: str | None = None
    n_values: int = 0
    n_correct: int = 0
    answer: Any = None
    error: str | None = None
    message: str = ""
    duration_s: float = 0.0
    steps: int = 0
    tool_calls: int = 0
    cost_usd: float | None = None
    run_dir: str | None = None
    details: list[dict] = field(default_factory=list)


# -- data roots -------------------------------------------------------------------------------
def data_root_for(q: Question, cfg: EvalConfig) -> tuple[Path | None, str]:
    """(root, reason): the data root for ``q``, or None and why it is unavailable."""
    if q.data == "generated":
        from evals import generate

        root = generate.data_dir(generate.generate_all(cfg.generated_root))
    else:
        root = cfg.shared_root if cfg.shared_root is not None else DEFAULT_SHARED
        if not Path(root).is_dir():
            return None, f"shared data not found at {root}"
    missing = [p for p in q.data_paths if not (Path(root) / p).exists()]
    if missing:
        return None, f"data missing under {root}: {', '.join(missing)}"
    return Path(root).resolve(), ""


def plan_servers(plan: list[dict]) -> list[str]:
    """Servers a reference plan needs (from ``<server>_<tool>`` names; code steps need the sandbox)."""
    from cytoagent.discovery import discover

    known = sorted(discover(), key=len, reverse=True)
    need: list[str] = []
    for step in plan:
        name = step.get("call")
        if name:
            srv = next((s for s in known if name.startswith(s + "_")), None)
            if srv is None:
                raise ToolError(f"Plan step calls {name!r}, which belongs to no known server.",
                                hint=f"Known servers: {', '.join(sorted(known))}.")
            need.append(srv)
        elif "code" in step:
            need.append("sandbox")
    return list(dict.fromkeys(need)) or ["sandbox"]


def _no_tool_servers() -> dict:
    from fastmcp import FastMCP

    from client.servers import ServerConfig

    return {"none": ServerConfig.in_memory("none", FastMCP("no-tools", instructions="No tools."))}


# -- one question -----------------------------------------------------------------------------
def make_provider(q: Question, cfg: EvalConfig):
    from client.providers import get_provider

    if cfg.provider == "scripted":
        return get_provider("scripted", plan=q.reference_plan)
    return get_provider(cfg.provider, model=cfg.model, base_url=cfg.base_url)


async def run_question(q: Question, cfg: EvalConfig, *, provider_factory: Callable | None = None) -> Record:
    """Run and score one question (never raises for a failed run: the record says what happened)."""
    from client.agent import run_agent

    base = dict(id=q.id, category=q.category, mode=cfg.mode, provider=cfg.provider, model=cfg.model)
    root, why = data_root_for(q, cfg)
    if root is None:
        return Record(**base, status="skipped", score=0.0, message=why)
    if cfg.provider == "scripted" and provider_factory is None and not q.reference_plan:
        return Record(**base, status="skipped", score=0.0, message=f"no reference plan: {q.plan_pending or 'missing'}")
    run_dir = cfg.out_dir / "runs" / q.id
    workspace = run_dir / "workspace"
    workspace.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        provider = (provider_factory or make_provider)(q, cfg)
        if cfg.mode == "llm-only":
            servers: Any = _no_tool_servers()
            mode = "tools"
        elif cfg.mode == "code":
            servers, mode = ["sandbox"], "code"
        else:
            mode = "tools"
            servers = cfg.servers or (plan_servers(q.reference_plan) if cfg.provider == "scripted"
                                      and q.reference_plan else None)
        res = await asyncio.wait_for(run_agent(
            q.prompt(), provider, servers=servers, mode=mode, max_steps=cfg.steps_for(q),
            step_timeout_s=cfg.step_timeout_s, out_dir=run_dir, data_root=root, workspace=workspace,
            json_answer=True), timeout=cfg.question_timeout_s)
    except Exception as e:  # a crashed run scores 0 and the sweep goes on
        return Record(**base, status="error", score=0.0, error=f"{type(e).__name__}: {e}",
                      duration_s=round(time.monotonic() - t0, 3), run_dir=str(run_dir))
    answer = res.answer if res.answer is not None else res.answer_text
    s: QuestionScore = score_answer(q, answer)
    return Record(**base, status=s.status, score=s.score, n_values=s.n_values, n_correct=s.n_correct,
                  answer=answer, error=res.error, message=s.message, duration_s=round(res.duration_s, 3),
                  steps=res.steps, tool_calls=res.tool_calls, cost_usd=getattr(res.usage, "cost_usd", None),
                  run_dir=str(run_dir), details=s.details)


# -- the sweep --------------------------------------------------------------------------------
def load_done(path: Path) -> dict[str, dict]:
    """Finished records in ``results.jsonl`` (the last one per id wins; a torn last line from a crash is
    ignored). Runs that crashed (status ``error``: provider outage, server failure, timeout) are not
    finished and are run again on resume."""
    done: dict[str, dict] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if rec.get("status") in ("skipped", "error"):
                done.pop(rec.get("id"), None)
            else:
                done[rec["id"]] = rec
    return done


async def run_eval(questions: list[Question], cfg: EvalConfig, *, provider_factory: Callable | None = None,
                   on_record: Callable[[dict], None] | None = None) -> dict[str, Any]:
    """Run every question (``cfg.parallel`` at a time), resume from ``results.jsonl``, write reports."""
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = cfg.out_dir / "results.jsonl"
    done = load_done(jsonl)
    todo = [q for q in questions if q.id not in done]
    if any(q.data == "generated" for q in todo):
        from evals import generate

        generate.generate_all(cfg.generated_root)  # once, before the parallel runs
    sem = asyncio.Semaphore(cfg.parallel)
    lock = asyncio.Lock()
    new: dict[str, dict] = {}

    async def one(q: Question) -> None:
        async with sem:
            rec = asdict(await run_question(q, cfg, provider_factory=provider_factory))
        async with lock:
            new[q.id] = rec
            if rec["status"] != "skipped":
                with open(jsonl, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec, default=str) + "\n")
                    fh.flush()
            if on_record:
                on_record(rec)

    await asyncio.gather(*(one(q) for q in todo))
    order = [q.id for q in questions]
    records = [done.get(i) or new[i] for i in order]
    summary = aggregate(records)
    ran = [r for r in records if r["status"] != "skipped"]
    costs = [r.get("cost_usd") for r in ran]
    summary["run"] = {
        "n_questions": len(records), "n_run": len(ran),
        "n_errors": sum(r["status"] == "error" for r in ran),
        "total_duration_s": round(sum(r.get("duration_s") or 0 for r in ran), 3),
        "total_cost_usd": None if any(c is None for c in costs) else round(sum(costs), 6),
    }
    write_reports(records, summary, cfg)
    return {"summary": summary, "records": records, "out_dir": str(cfg.out_dir)}


# -- reports ----------------------------------------------------------------------------------
CSV_FIELDS = ["id", "category", "status", "score", "n_correct", "n_values", "mode", "provider", "model",
              "duration_s", "steps", "tool_calls", "cost_usd", "error", "message"]


def summary_table(summary: dict[str, Any]) -> str:
    lines = ["| category | n | score | failure rate | skipped |", "|---|---|---|---|---|"]

    def fmt(v: float | None) -> str:
        return "—" if v is None else f"{v:.3f}"

    for c, s in summary["categories"].items():
        lines.append(f"| {c} | {s['n']} | {fmt(s['score'])} | {fmt(s['failure_rate'])} | {s['skipped']} |")
    o = summary["overall"]
    lines.append(f"| **overall** | {o['n']} | {fmt(o['score'])} | {fmt(o['failure_rate'])} | {o['skipped']} |")
    run = summary.get("run")
    if run:
        cost = "unknown" if run["total_cost_usd"] is None else f"${run['total_cost_usd']:.4f}"
        lines.append(f"\n{run['n_run']} of {run['n_questions']} questions run, {run['n_errors']} errors, "
                     f"{run['total_duration_s']:.0f} s in total, cost {cost}.")
    return "\n".join(lines)


def bar_chart_png(summary: dict[str, Any], title: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cats = [c for c, s in summary["categories"].items() if s["score"] is not None]
    vals = [summary["categories"][c]["score"] for c in cats]
    ns = [summary["categories"][c]["n"] for c in cats]
    if summary["overall"]["score"] is not None:
        cats, vals, ns = cats + ["Average"], vals + [summary["overall"]["score"]], ns + [summary["overall"]["n"]]
    fig, ax = plt.subplots(figsize=(1.3 * max(3, len(cats)) + 1, 3.6))
    bars = ax.bar(range(len(cats)), vals, color=["#4C72B0"] * (len(cats) - 1) + ["#DD8452"] if cats else [])
    for b, v in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, v + 0.02, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(cats)), [f"{c}\n(n={n})" for c, n in zip(cats, ns)], fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("mean score")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_reports(records: list[dict], summary: dict[str, Any], cfg: EvalConfig) -> None:
    out = cfg.out_dir
    conf = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
    atomic_write_text(out / "results.json", json.dumps({"config": conf, "summary": summary, "results": records},
                                                       indent=2, default=str))
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in records:
        w.writerow({k: r.get(k) for k in CSV_FIELDS})
    atomic_write_text(out / "results.csv", buf.getvalue())
    label = f"{cfg.provider}{'/' + cfg.model if cfg.model else ''}, mode={cfg.mode}"
    if cfg.retries:
        label += f", retries={cfg.retries}"
    body = [f"# Eval results ({label})", "", summary_table(summary), "", "| id | category | status | score |",
            "|---|---|---|---|"]
    body += [f"| {r['id']} | {r['category']} | {r['status']} | {r['score']:.3f} |" for r in records]
    atomic_write_text(out / "summary.md", "\n".join(body) + "\n")
    atomic_write_bytes(out / "scores_by_category.png", bar_chart_png(summary, label))
