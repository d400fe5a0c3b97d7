"""``cytoagent optimize TASK ...``: run (or resume) a preprocessing-optimisation loop."""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "optimize", help="optimise a preprocessing function for a task (automl | random | llm proposers)",
        description="Rollouts x iterations x functions per iteration, evaluated in the sandbox in parallel, "
                    "stored in a SQLite bank (rerun the same command to resume after a crash or kill). Writes "
                    "OUT/report.json, OUT/functions/*.py and learning curves.")
    p.add_argument("task", help="task name (see the preprocess server's list_tasks, or --list)", nargs="?")
    p.add_argument("--list", action="store_true", help="list the tasks and exit")
    p.add_argument("--proposer", choices=["automl", "random", "llm"], default="automl")
    p.add_argument("--rollouts", type=int, default=2)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--functions-per-iteration", type=int, default=3)
    p.add_argument("--top-k", type=int, default=10, help="top functions by val score evaluated on test")
    p.add_argument("--out", default="optimize-out", help="output folder (report, functions, bank.sqlite)")
    p.add_argument("--bank", default=None, help="bank file (default OUT/bank.sqlite)")
    p.add_argument("--run-id", default=None, help="default TASK-PROPOSER-seedN")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="parallel evaluations (default: config workers)")
    p.add_argument("--timeout-s", type=float, default=60.0, help="per-function sandbox time limit")
    p.add_argument("--min-steps", type=int, default=2, help="automl/random: fewest primitives per pipeline")
    p.add_argument("--max-steps", type=int, default=4, help="automl/random: most primitives per pipeline")
    p.add_argument("--no-bank", action="store_true", help="llm: never show bank samples in the prompt")
    p.add_argument("--bank-start", type=int, default=5, help="llm: first iteration that shows bank samples")
    p.add_argument("--bank-k", type=int, default=3, help="llm: best/worst functions shown")
    p.add_argument("--provider", default=None, help="llm: anthropic | openai | openai-compatible")
    p.add_argument("--model", default=None, help="llm: model name")
    p.add_argument("--base-url", default=None, help="llm: endpoint for openai-compatible providers")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_optimize)


def cmd_optimize(args: argparse.Namespace) -> int:
    if args.list:
        from servers.preprocess.tasks import all_tasks

        for t in all_tasks().values():
            s = t.summary()
            print(f"{s['name']:18s} {s['kind']:7s} {s['metric']:8s} {'ok' if s['available'] else 'unavailable'}"
                  f"  {s['description'][:70]}")
        return 0
    if not args.task:
        print("optimize: give a TASK (see --list).", file=sys.stderr)
        return 2
    from evals.optimize.loop import OptimizeConfig, run_optimization

    cfg = OptimizeConfig(task=args.task, proposer=args.proposer, rollouts=args.rollouts, iterations=args.iterations,
                         functions_per_iteration=args.functions_per_iteration, top_k=args.top_k, seed=args.seed,
                         min_steps=args.min_steps, max_steps=args.max_steps, use_bank=not args.no_bank,
                         bank_start=args.bank_start, bank_k=args.bank_k, timeout_s=args.timeout_s, out=args.out,
                         run_id=args.run_id, workers=args.workers, bank_path=args.bank, provider=args.provider,
                         model=args.model)
    provider = None
    if args.proposer == "llm":
        from client.providers import get_provider

        if not args.provider:
            print("optimize: --proposer llm needs --provider (anthropic | openai | openai-compatible).",
                  file=sys.stderr)
            return 2
        provider = get_provider(args.provider, model=args.model, base_url=args.base_url)

    def progress(done, total=None, message=None):
        if not args.quiet:
            print(f"[{done}/{total}] {message or ''}", file=sys.stderr, flush=True)

    report = run_optimization(cfg, progress=progress, provider=provider)
    this = report[cfg.proposer]
    short = {"task": report["task"], "metric": report["metric"], "proposer": cfg.proposer,
             "expert": report["baselines"]["expert"], "best_val": this["best_val"], "best_test": this["best_test"],
             "top_k_test_max": this["top_k_test_max"], "beats_expert_on_test": report["beats_expert_on_test"],
             "evaluations_per_minute": report["timing"]["evaluations_per_minute"],
             "report": f"{cfg.out}/report.json", "learning_curves": report["files"]["learning_curves"]}
    print(json.dumps(short, indent=1))
    return 0
