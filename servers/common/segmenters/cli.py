"""CLI plugin: ``cytoagent segmenters list`` and ``cytoagent segmenters train cellpose|stardist``.

Top-level imports stay light (argparse only); the backends load inside the commands.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> None:
    sp = subparsers.add_parser("segmenters", help="segmentation backends: list them, train Cellpose/StarDist weights")
    ssub = sp.add_subparsers(dest="segmenters_cmd", metavar="ACTION")

    ls = ssub.add_parser("list", help="each backend: whether it is installed, its weights, the device")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_list)

    tr = ssub.add_parser("train", help="train / fine-tune Cellpose or StarDist briefly on local fluorescence nuclei")
    tr.add_argument("backend", choices=["cellpose", "stardist"])
    tr.add_argument("--data", help="fluo_nuclei folder (dsb2018/ + *.tif/*.mask.tif); default <data_root>/fluo_nuclei")
    tr.add_argument("--out", help="output folder; default <workspace>/models/<backend>")
    tr.add_argument("--name", help="model name (file for Cellpose, folder for StarDist)")
    tr.add_argument("--epochs", type=int, default=None, help="default 5 (Cellpose) / 2 (StarDist)")
    tr.add_argument("--steps-per-epoch", type=int, default=10, help="StarDist only")
    tr.add_argument("--limit", type=int, default=None, help="use only the first N training images")
    tr.add_argument("--base-weights", help="fine-tune these weights instead of training from scratch")
    tr.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    tr.add_argument("--json", action="store_true", help="print the result as JSON")
    tr.set_defaults(func=cmd_train)


def _weights_status(backend: str) -> str:
    from servers.common.errors import ToolError
    from servers.common.segmenters.weights import SPECS, find_weights

    if backend not in SPECS:
        return "not needed"
    try:
        return str(find_weights(backend))
    except ToolError:
        return "none found"


def backends_report() -> list[dict]:
    """Rows for ``segmenters list``: name, status, extra, weights, description."""
    from servers.common.segmenters import available_backends

    rows = []
    for name, info in available_backends().items():
        rows.append({"backend": name, "status": info["status"], "extra": info["extra"],
                     "weights": _weights_status(name) if info["status"] == "ready" else "-",
                     "description": info["description"]})
    return rows


def cmd_list(args: argparse.Namespace) -> int:
    rows = backends_report()
    try:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:
        device = "cpu (torch not installed)"
    if args.json:
        print(json.dumps({"device": device, "backends": rows}, indent=2))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"segmentation backends (torch device: {device})")
    for col in ("backend", "status", "weights", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        status = r["status"] if r["status"] == "ready" else f"not installed: pip install 'cytoagent[{r['extra']}]'"
        table.add_row(*(escape(str(v)) for v in (r["backend"], status, r["weights"], r["description"])))
    Console().print(table)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pathlib import Path

    from servers.common.config import get_config
    from servers.common.segmenters import train

    cfg = get_config()
    data = Path(args.data) if args.data else Path(cfg.data_root) / "fluo_nuclei"
    out = Path(args.out) if args.out else Path(cfg.workspace) / "models" / args.backend
    images, labels = train.load_fluo_training_set(data, limit=args.limit)

    def progress(done, total=None, msg=None):
        print(f"{msg or ''} {done}/{total}", file=sys.stderr)

    if args.backend == "cellpose":
        path = train.train_cellpose(images, labels, out, name=args.name or "cellpose_nuclei",
                                    epochs=args.epochs or 5, base_weights=args.base_weights,
                                    device=args.device, progress=progress)
    else:
        path = train.train_stardist(images, labels, out, name=args.name or "stardist_nuclei",
                                    epochs=args.epochs or 2, steps_per_epoch=args.steps_per_epoch,
                                    base_weights=args.base_weights, device=args.device, progress=progress)
    result = {"backend": args.backend, "weights": str(path), "n_images": len(images)}
    print(json.dumps(result) if args.json else f"{args.backend} weights written to {path}")
    return 0
