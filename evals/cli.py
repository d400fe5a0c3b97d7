"""``cytoagent eval``: run a question set through an assistant and score it (SlideQuest-style)."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="run a question benchmark through the agent (modes: tools, code, llm-only) and score it",
        description="Run questions through the agent client over MCP and score the JSON answers "
                    "(Hungarian row/key matching, 15%% numeric tolerance by default). Resumable: "
                    "questions already in OUT/results.jsonl are not run again.")
    p.add_argument("questions", nargs="?", default="shipped",
                   help="question file or folder (default: the shipped set, evals/questions)")
    p.add_argument("--provider", default="scripted",
                   help="anthropic | openai | openai-compatible | scripted (runs each question's reference plan)")
    p.add_argument("--model")
    p.add_argument("--base-url")
    p.add_argument("--mode", choices=["tools", "code", "llm-only"], default="tools",
                   help="tools: all servers; code: LLM + sandbox Python; llm-only: no tools")
    p.add_argument("--retries", type=int, default=0,
                   help="extra turns to fix failing code/tool calls (code mode: 0 = single shot)")
    p.add_argument("--max-steps", type=int, help="model turns per question (overrides the mode default)")
    p.add_argument("--out", default="eval-results", help="results folder (resumes if it has results.jsonl)")
    p.add_argument("--parallel", type=int, default=2, help="questions run at the same time")
    p.add_argument("--data-root", help="data root for shared-data questions (default: ../shared/data)")
    p.add_argument("--generated-root", help="where generated datasets are written (default: user cache)")
    p.add_argument("--ids", nargs="+", help="only these question ids")
    p.add_argument("--category", action="append", help="only these categories (repeatable)")
    p.add_argument("--servers", nargs="+", help="tools mode: only these servers")
    p.add_argument("--step-timeout", type=float, default=600, help="seconds per tool call / code execution")
    p.add_argument("--list", action="store_true", help="list the questions and exit")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from evals.schema import load_questions
    from servers.common.errors import ToolError

    try:
        qs = load_questions(None if args.questions in ("shipped", "all") else args.questions,
                            ids=args.ids, categories=args.category)
    except (FileNotFoundError, ValueError) as e:
        raise ToolError(f"Cannot load questions: {e}", hint="Pass a question JSON file or folder.") from e
    if args.list:
        for q in qs:
            print(f"{q.id}\t{q.category}\t{q.data}\t{'plan' if q.reference_plan else 'no plan'}")
        return 0
    from evals.runner import EvalConfig, run_eval, summary_table

    cfg = EvalConfig(provider=args.provider, mode=args.mode, out_dir=Path(args.out), model=args.model,
                     base_url=args.base_url, retries=args.retries, max_steps=args.max_steps, parallel=args.parallel,
                     shared_root=Path(args.data_root) if args.data_root else None,
                     generated_root=Path(args.generated_root) if args.generated_root else None,
                     servers=args.servers, step_timeout_s=args.step_timeout)

    def show(rec: dict) -> None:
        print(f"{rec['status']:>8} {rec['score']:.2f}  {rec['id']}"
              + (f"  ({rec['error'] or rec['message']})" if rec["status"] != "ok" else ""), file=sys.stderr)

    out = asyncio.run(run_eval(qs, cfg, on_record=show))
    print(summary_table(out["summary"]))
    print(f"\nresults: {cfg.out_dir}/results.json, results.csv, summary.md, scores_by_category.png")
    return 0
