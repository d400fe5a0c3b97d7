"""The main job: an analysis tour across all four servers, through MCP, with a report.

``cytoagent demo`` asks one question that needs every server — whole-slide metadata, tissue and
nuclei (wsi), cell-type neighbourhoods and co-occurrence in a multiplexed table and transcript
counts in CosMx (spatial), scoring a preprocessing function on the smFISH task (preprocess), and
custom Python over the resulting artifacts (sandbox). With an LLM key the bundled agent answers it
with the tools; with no key the reference plan (``demo_plan.yaml``) drives the same client code
path. Either way the run writes ``report.html`` / ``report.md`` with the figures the tools
returned, a JSONL transcript, and ``summary.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

PLAN = Path(__file__).with_name("demo_plan.yaml")
SERVERS = ["wsi", "spatial", "preprocess", "sandbox"]
REQUIRED_DATA = [
    "wsi/cmu-1-small-region.svs",
    "spatial/scimap_example.h5ad",
    "spatial/cosmx_lung12_mini/Lung12_tx_file.csv",
    "spots/smfish.png",
]

QUESTION = """Give me a quantitative tour of the demo data (paths are relative to the data root):
1. Slide wsi/cmu-1-small-region.svs: its size and microns per pixel, the tissue area in mm², and the
   number of nuclei and their mean area (µm²) in the 512×512-pixel level-0 region at x=900, y=1300.
2. Multiplexed table spatial/scimap_example.h5ad (cell types in obs 'phenotype'): the most enriched
   pair of cell types in neighbourhood enrichment and its z-score, and a co-occurrence curve.
3. CosMx folder spatial/cosmx_lung12_mini: the number of cells and transcripts in cells per FOV.
4. The 'smfish' spot-detection preprocessing task: the validation F1 of the expert baseline (min-max
   normalisation) and of an unsharp mask (sigma 1.371 px, amount 2.272) followed by scaling by 0.00228.
5. In Python, the distribution of nucleus areas from step 1 as a histogram.
Answer as JSON with keys slide, nuclei, enrichment, cosmx, smfish_f1."""


def pick_provider(name: str | None) -> str:
    """``auto``: Anthropic if ANTHROPIC_API_KEY is set, else OpenAI if OPENAI_API_KEY, else scripted."""
    if name and name != "auto":
        return name
    if os.environ.get("ANTHROPIC_API_KEY"):
        return "anthropic"
    if os.environ.get("OPENAI_API_KEY"):
        return "openai"
    return "scripted"


def check_data(data_root: Path) -> None:
    from servers.common.errors import ToolError

    missing = [p for p in REQUIRED_DATA if not (data_root / p).is_file()]
    if missing:
        raise ToolError(f"The demo data is not under {data_root}: missing {', '.join(missing)}.",
                        hint="Run `cytoagent data fetch` (or `--mirror DIR`), or pass --data PATH.")


def run_demo(out_dir: str | os.PathLike = "report", *, provider: str | None = "auto", model: str | None = None,
             base_url: str | None = None, data_root: str | os.PathLike | None = None, max_steps: int = 40,
             quiet: bool = False):
    """Run the tour and write the report; returns the client's RunResult."""
    from client.agent import run_agent_sync
    from client.providers import get_provider
    from servers.common.config import get_config

    root = Path(data_root).expanduser().resolve() if data_root else get_config().data_root
    check_data(root)
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    workspace = out / "workspace"
    name = pick_provider(provider)
    prov = get_provider(name, plan=str(PLAN)) if name == "scripted" else get_provider(name, model=model,
                                                                                        base_url=base_url)
    from client.cli import LiveView

    with LiveView(quiet) as view:
        res = run_agent_sync(QUESTION, prov, servers=SERVERS, mode="tools", max_steps=max_steps, out_dir=out,
                             data_root=root, workspace=workspace, json_answer=True, on_event=view)
    summary = {"provider": name, "ok": res.ok, "stop_reason": res.stop_reason, "steps": res.steps,
               "tool_calls": res.tool_calls, "duration_s": round(res.duration_s, 1), "answer": res.answer,
               "report_html": str(res.html_path), "report_md": str(res.report_path),
               "transcript": str(res.transcript_path), "error": res.error}
    from servers.common.atomic import atomic_write_text

    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=str))
    return res


def _cmd_demo(args) -> int:
    res = run_demo(args.out, provider=args.provider, model=args.model, base_url=args.base_url,
                   data_root=args.data, max_steps=args.max_steps, quiet=args.quiet)
    print(json.dumps({"ok": res.ok, "answer": res.answer, "report": str(res.html_path)}, default=str))
    if not res.ok:
        print(f"[demo] the run did not finish: {res.stop_reason} {res.error or ''}", file=sys.stderr)
        return 1
    print(f"[demo] report: {res.html_path}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="the main job: an analysis tour across all servers, with a report")
    p.add_argument("--out", default="report", help="output folder (report.html, report.md, transcript.jsonl)")
    p.add_argument("--provider", default="auto",
                   help="auto (LLM if a key is set, else scripted), anthropic, openai, openai-compatible, scripted")
    p.add_argument("--model")
    p.add_argument("--base-url")
    p.add_argument("--data", help="data root (default: the configured one)")
    p.add_argument("--max-steps", type=int, default=40)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_demo)
