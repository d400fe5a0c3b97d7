"""CLI plugin: ``cytoagent wsi info|tissue|tiles|nuclei`` on local slide files.

Top-level imports stay light (argparse only); OpenSlide and the library load inside the commands.
Paths are ordinary local paths (the CLI user owns the files; a relative path not found in the current
directory is looked up under the data root), results go to stdout as JSON and,
with ``--out``, to a file.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> None:
    sp = subparsers.add_parser("wsi", help="whole-slide images: info, tissue, tile grids, nuclei")
    ws = sp.add_subparsers(dest="wsi_cmd", metavar="ACTION")

    info = ws.add_parser("info", help="levels, mpp, objective power, vendor of a slide")
    info.add_argument("slide")
    info.add_argument("--mpp", type=float, help="µm per level-0 pixel if the metadata lacks it")
    info.set_defaults(func=cmd_info)

    tis = ws.add_parser("tissue", help="tissue mask summary (pieces, holes, area mm²); --out writes GeoJSON")
    tis.add_argument("slide")
    tis.add_argument("--mpp", type=float)
    tis.add_argument("--method", default="gray", choices=["gray", "saturation", "od", "gray+saturation"])
    tis.add_argument("--out", help="GeoJSON file for the tissue contours")
    tis.set_defaults(func=cmd_tissue)

    tl = ws.add_parser("tiles", help="tissue tile grids for one or many slides (parallel, with progress)")
    tl.add_argument("slides", nargs="+")
    tl.add_argument("--tile-px", type=int, default=256)
    tl.add_argument("--tile-mpp", type=float, help="tile resolution in µm/px (default: level 0)")
    tl.add_argument("--downsample", type=float)
    tl.add_argument("--min-tissue", type=float, default=0.5)
    tl.add_argument("--workers", type=int, default=2)
    tl.add_argument("--out", help="CSV or Parquet file for the combined tile table")
    tl.set_defaults(func=cmd_tiles)

    nu = ws.add_parser("nuclei", help="segment all nuclei of a slide's tissue (classical backend by default)")
    nu.add_argument("slide")
    nu.add_argument("--mpp", type=float, help="µm per level-0 pixel if the metadata lacks it")
    nu.add_argument("--seg-mpp", type=float, help="resolution to segment at (default: level 0)")
    nu.add_argument("--tile-px", type=int, default=1024)
    nu.add_argument("--backend", default="classical")
    nu.add_argument("--weights")
    nu.add_argument("--workers", type=int, default=1)
    nu.add_argument("--modality", choices=["auto", "he", "fluorescence"], default="auto",
                    help="H&E, fluorescence (one intensity channel; the whole image is tiled) or auto")
    nu.add_argument("--channel", type=int, help="fluorescence channel of a multi-channel image (0-based)")
    nu.add_argument("--out", help="Parquet/CSV nucleus table, or .geojson for QuPath")
    nu.set_defaults(func=cmd_nuclei)
    sp.set_defaults(func=lambda a: (sp.print_help(), 2)[1])


def _progress(done, total=None, message=None) -> None:
    if total:
        print(f"\r{message or ''} {int(done)}/{int(total)}", end="" if done < total else "\n", file=sys.stderr)


def _local(path: str):
    """A local slide path: as given (relative to the current directory), else under the data root.

    A path that exists neither way is a ToolError naming both places looked at.
    """
    from pathlib import Path

    from servers.common.config import get_config
    from servers.common.errors import ToolError

    p = Path(path).expanduser()
    if p.exists():
        return p.resolve()
    root = get_config().data_root
    if not p.is_absolute() and (root / p).exists():
        return (root / p).resolve()
    raise ToolError(f"No such file: {path!r} (looked in the current directory and in the data root {root}).",
                    hint="Pass a local slide path, or one relative to the data root (CYTOAGENT_DATA_ROOT).")


def _open(path: str, mpp: float | None):
    from servers.wsi.slide import open_slide_path

    return open_slide_path(_local(path), mpp)


def _write_table(df, out: str) -> None:
    if out.endswith(".csv"):
        df.to_csv(out, index=False)
    else:
        df.to_parquet(out)


def _run(fn) -> int:
    from servers.common.errors import ToolError

    try:
        result = fn()
    except ToolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(result, default=str, indent=2))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    return _run(lambda: _open(args.slide, args.mpp).info())


def cmd_tissue(args: argparse.Namespace) -> int:
    def go():
        from servers.wsi.export import tissue_geojson
        from servers.wsi.tissue import segment_tissue

        s = _open(args.slide, args.mpp)
        res = segment_tissue(s, method=args.method)
        if args.out:
            from servers.common.atomic import atomic_write_text

            atomic_write_text(args.out, json.dumps(tissue_geojson(res.polygons, s.mpp)))
        return res.summary()

    return _run(go)


def cmd_tiles(args: argparse.Namespace) -> int:
    def go():
        from servers.wsi.tiling import batch_tile

        items = [(p, _local(p)) for p in args.slides]
        table, status = batch_tile(items, tile_px=args.tile_px, target_mpp=args.tile_mpp, downsample=args.downsample,
                                   min_tissue_fraction=args.min_tissue, workers=args.workers, progress=_progress)
        if args.out and len(table):
            _write_table(table, args.out)
        return {"n_tiles": len(table), "slides": status}

    return _run(go)


def cmd_nuclei(args: argparse.Namespace) -> int:
    def go():
        from servers.wsi.nuclei import segment_slide

        s = _open(args.slide, args.mpp)
        opts = {"weights": args.weights} if args.weights else None
        out = segment_slide(s, mpp=args.seg_mpp, tile_px=args.tile_px, backend=args.backend, options=opts,
                            workers=args.workers, polygons=bool(args.out and args.out.endswith(".geojson")),
                            modality=args.modality, channel=args.channel, progress=_progress)
        if args.out:
            if args.out.endswith(".geojson"):
                from servers.common.atomic import atomic_write_text
                from servers.wsi.export import nuclei_geojson

                atomic_write_text(args.out, json.dumps(nuclei_geojson(out["table"])))
            else:
                _write_table(out["table"], args.out)
        return out["summary"]

    return _run(go)
