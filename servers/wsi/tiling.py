"""Tile grids at a target resolution, with overlap and a minimum tissue fraction; tile export;
batches over many slides through the configured executor.

A tile is ``tile_px x tile_px`` pixels at ``mpp`` µm/px (or at ``downsample`` vs level 0 when the
slide has no mpp). Its level-0 footprint is ``tile_px * downsample`` pixels; consecutive tiles
start every ``(tile_px - overlap_px) * downsample`` level-0 pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from servers.common.errors import ToolError
from servers.common.progress import ProgressFn, track
from servers.wsi.slide import Slide


@dataclass
class TileSpec:
    tile_px: int
    downsample: float  # output pixel size in level-0 pixels
    mpp: float | None  # output µm/px (None when the slide has no mpp)
    overlap_px: int = 0


def resolve_spec(slide: Slide, tile_px: int, mpp: float | None = None, downsample: float | None = None,
                 overlap_px: int = 0) -> TileSpec:
    """Validate tile parameters. ``mpp`` needs the slide's mpp (else a ToolError asks for it);
    ``downsample`` works on any slide; neither = level-0 pixels."""
    if not isinstance(tile_px, int | np.integer) or tile_px < 16:
        raise ToolError(f"tile_px must be an integer >= 16, got {tile_px!r}.", hint="Typical values: 224, 256, 512.")
    if not 0 <= overlap_px < tile_px:
        raise ToolError(f"overlap_px must be in [0, tile_px), got {overlap_px}.", hint="E.g. overlap_px=0 or 32.")
    if mpp is not None:
        base = slide.require_mpp()
        if mpp < base * 0.999:
            raise ToolError(f"Tile mpp {mpp} is finer than the scan ({base} µm/px).", hint=f"Pass mpp >= {base}.")
        return TileSpec(int(tile_px), mpp / base, float(mpp), int(overlap_px))
    if downsample is None:
        downsample = 1.0  # level 0: well defined with or without mpp
    if downsample < 1:
        raise ToolError(f"downsample must be >= 1, got {downsample}.")
    return TileSpec(int(tile_px), float(downsample),
                    None if slide.mpp is None else slide.mpp * float(downsample), int(overlap_px))


def tile_grid(
    slide: Slide, spec: TileSpec, *, tissue_mask: np.ndarray | None = None, mask_downsample: float | None = None,
    min_tissue_fraction: float = 0.0, include_partial: bool = False,
):
    """Tile coordinates as a DataFrame: ``tile_id, row, col, x, y`` (level-0 px of the top-left),
    ``size0`` (level-0 footprint), ``tissue_fraction`` (from ``tissue_mask`` when given), and
    ``x_um, y_um`` when mpp is known. Tiles below ``min_tissue_fraction`` are dropped."""
    import pandas as pd

    if not 0 <= min_tissue_fraction <= 1:
        raise ToolError(f"min_tissue_fraction must be within [0, 1], got {min_tissue_fraction}.")
    W, H = slide.dimensions
    size0 = spec.tile_px * spec.downsample
    step0 = (spec.tile_px - spec.overlap_px) * spec.downsample
    ncols = max(1, int(math.floor((W - size0) / step0)) + 1) if W >= size0 else (1 if include_partial else 0)
    nrows = max(1, int(math.floor((H - size0) / step0)) + 1) if H >= size0 else (1 if include_partial else 0)
    if include_partial:
        ncols = max(ncols, int(math.ceil(max(W - size0, 0) / step0)) + 1)
        nrows = max(nrows, int(math.ceil(max(H - size0, 0) / step0)) + 1)
    rr, cc = np.mgrid[0:nrows, 0:ncols]
    rr, cc = rr.ravel(), cc.ravel()
    xs = np.round(cc * step0).astype(np.int64)
    ys = np.round(rr * step0).astype(np.int64)
    df = pd.DataFrame({"row": rr, "col": cc, "x": xs, "y": ys})
    df["size0"] = int(round(size0))
    if tissue_mask is not None:
        ds = mask_downsample or 1.0
        m = np.asarray(tissue_mask, bool)
        ii = np.zeros((m.shape[0] + 1, m.shape[1] + 1), np.int64)
        ii[1:, 1:] = m.cumsum(0).cumsum(1)
        x0 = np.clip(np.floor(xs / ds).astype(int), 0, m.shape[1])
        y0 = np.clip(np.floor(ys / ds).astype(int), 0, m.shape[0])
        x1 = np.clip(np.ceil((xs + size0) / ds).astype(int), 0, m.shape[1])
        y1 = np.clip(np.ceil((ys + size0) / ds).astype(int), 0, m.shape[0])
        area = np.maximum((x1 - x0) * (y1 - y0), 1)
        inside = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
        df["tissue_fraction"] = np.round(inside / area, 4)
        df = df[df["tissue_fraction"] >= min_tissue_fraction]
    elif min_tissue_fraction > 0:
        raise ToolError("min_tissue_fraction needs a tissue mask.", hint="Pass tissue=True (or min_tissue_fraction=0).")
    df = df.reset_index(drop=True)
    df.insert(0, "tile_id", [f"r{r}_c{c}" for r, c in zip(df["row"], df["col"])])
    if slide.mpp is not None:
        df["x_um"] = df["x"] * slide.mpp
        df["y_um"] = df["y"] * slide.mpp
    df.attrs.update({"tile_px": spec.tile_px, "downsample": spec.downsample, "mpp": spec.mpp,
                     "overlap_px": spec.overlap_px})
    return df


def read_tile(slide: Slide, spec: TileSpec, x: int, y: int) -> np.ndarray:
    """One tile (tile_px x tile_px RGB) at the spec's resolution."""
    return slide.read_region_ds(int(x), int(y), spec.tile_px, spec.tile_px, spec.downsample)


def iter_tiles(slide: Slide, spec: TileSpec, grid, progress: ProgressFn | None = None):
    """Yield (row dict, RGB tile) for every row of ``grid``."""
    for rec in track(grid.to_dict("records"), progress, message="reading tiles"):
        yield rec, read_tile(slide, spec, rec["x"], rec["y"])


def export_tiles(slide: Slide, spec: TileSpec, grid, out_dir: Path, *, fmt: str = "png",
                 progress: ProgressFn | None = None) -> list[str]:
    """Write every tile of ``grid`` as ``<tile_id>.<fmt>`` into ``out_dir`` (atomic writes)."""
    from PIL import Image

    from servers.common.atomic import atomic_path

    if fmt not in ("png", "jpg", "jpeg"):
        raise ToolError(f"Unknown tile format {fmt!r}.", hint="Use 'png' or 'jpg'.")
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for rec, tile in iter_tiles(slide, spec, grid, progress):
        name = f"{rec['tile_id']}.{fmt}"
        with atomic_path(out_dir / name) as tmp:
            Image.fromarray(tile).save(tmp, format="PNG" if fmt == "png" else "JPEG", quality=90)
        names.append(name)
    return names


# -- batches over many slides ----------------------------------------------------------------------


def _tile_one_slide(job: dict[str, Any]) -> dict[str, Any]:
    """Worker: tissue mask + tile grid for one slide (runs in a pool process)."""
    from servers.wsi.slide import open_slide_path
    from servers.wsi.tissue import segment_tissue

    try:
        slide = open_slide_path(job["abspath"], job.get("mpp"))
        spec = resolve_spec(slide, job["tile_px"], job.get("target_mpp"), job.get("downsample"), job.get("overlap_px", 0))
        tissue = segment_tissue(slide, **(job.get("tissue_options") or {}))
        grid = tile_grid(slide, spec, tissue_mask=tissue.mask, mask_downsample=tissue.downsample,
                         min_tissue_fraction=job.get("min_tissue_fraction", 0.5))
        grid.insert(0, "slide", job["slide"])
        return {"slide": job["slide"], "ok": True, "n_tiles": len(grid), "grid": grid,
                "tissue_area_mm2": tissue.area_mm2}
    except ToolError as e:
        return {"slide": job["slide"], "ok": False, "error": str(e), "n_tiles": 0}


def batch_tile(slides: list[tuple[str, Path]], *, tile_px: int = 256, target_mpp: float | None = None,
               downsample: float | None = None, overlap_px: int = 0, min_tissue_fraction: float = 0.5,
               mpp: float | None = None, tissue_options: dict | None = None, progress: ProgressFn | None = None,
               workers: int | None = None):
    """Tissue + tile grids for many slides in parallel through ``servers.common.executor``.

    ``slides`` = [(name, absolute path)]; ``tissue_options`` go to ``segment_tissue``. Returns (combined DataFrame, per-slide status list).
    A slide that fails (corrupt, no mpp) is reported in the status list; the rest still run.
    """
    import pandas as pd

    from servers.common.executor import get_executor

    jobs = [{"slide": name, "abspath": str(p), "tile_px": tile_px, "target_mpp": target_mpp, "downsample": downsample,
             "overlap_px": overlap_px, "min_tissue_fraction": min_tissue_fraction, "mpp": mpp,
             "tissue_options": tissue_options} for name, p in slides]
    n = workers or min(len(jobs), 4) or 1
    with get_executor(workers=n) as ex:
        results = ex.map(_tile_one_slide, jobs, progress=progress, message="tiling slides")
    grids = [r.pop("grid") for r in results if r.get("ok")]
    table = pd.concat(grids, ignore_index=True) if grids else pd.DataFrame()
    return table, results
