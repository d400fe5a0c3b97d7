"""Nucleus instance segmentation of images, slide regions and whole slides, tile by tile with
stitching across tile borders, plus per-nucleus morphometry in µm.

Stitching: the image is cut into non-overlapping *core* tiles; each core is segmented together
with a context margin of ``overlap_px`` on every side, and a nucleus is kept only by the tile whose
core contains its centroid. Cores partition the plane, so every nucleus is kept once and a nucleus
that crosses a core border is segmented whole (it lies inside the context window). Rare
near-duplicates (two tiles disagreeing on a border nucleus) are resolved by overlap (label images)
or centroid distance (slide tables).

Any backend of ``servers.common.segmenters`` works (``classical`` needs no weights).

Modality: ``"he"`` segments RGB H&E (hematoxylin channel); ``"fluorescence"`` segments one
intensity channel (bright nuclei on a dark background, e.g. DAPI/Hoechst) read in the file's own
units (a uint16 TIFF keeps its 16-bit values); ``"auto"`` picks fluorescence for one-channel or
multi-channel (non-RGB) images and for grey images with a dark background, H&E otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from servers.common.errors import ToolError
from servers.common.progress import ProgressFn
from servers.wsi.slide import Slide

MODALITIES = ("auto", "he", "fluorescence")
MORPH_COLUMNS = ["area_px", "area_um2", "perimeter_um", "equivalent_diameter_um", "major_axis_um", "minor_axis_um",
                 "eccentricity", "solidity", "convex_area_um2", "circularity", "orientation_deg",
                 "mean_hematoxylin_od", "mean_intensity"]


def _segmenter(backend: str, options: dict | None, modality: str = "he"):
    from servers.common.segmenters import get_segmenter

    return get_segmenter(backend, modality=modality, **(options or {}))


def detect_modality(slide: Slide) -> str:
    """'fluorescence' for one-channel or multi-channel (non-RGB) images, and for grey RGB images whose
    background (the median) is darker than the middle of their intensity range; else 'he'."""
    if slide._raw is not None and slide.n_channels != 3:
        return "fluorescence"
    thumb, _ = slide.thumbnail(256)
    t = thumb.astype(np.float32)
    grey = np.abs(t[..., 0] - t[..., 1]).mean() < 3 and np.abs(t[..., 1] - t[..., 2]).mean() < 3
    if grey:
        g = t.mean(axis=2)
        lo, hi = np.percentile(g, [2, 98])
        if np.median(g) < (lo + hi) / 2:
            return "fluorescence"
    return "he"


def flat_field(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Illumination (flat-field) correction of a fluorescence channel: divide by its Gaussian blur of
    ``sigma_px`` (≫ a nucleus) — the multiplicative shading estimate — so dim and bright parts of the
    field get the same contrast. float32 out."""
    from scipy import ndimage as ndi

    if not sigma_px > 0:
        raise ToolError(f"The flat-field scale must be > 0, got {sigma_px}.", hint="Pass e.g. flatfield_um=20.")
    img = np.asarray(image, np.float32)
    shade = ndi.gaussian_filter(img, float(sigma_px))
    floor = max(float(np.percentile(shade, 1)) * 1e-3, 1e-6)
    return img / np.maximum(shade, floor)


def resolve_modality(slide: Slide, modality: str) -> str:
    """``modality`` checked, with ``"auto"`` replaced by :func:`detect_modality`."""
    if modality not in MODALITIES:
        raise ToolError(f"Unknown modality {modality!r}.",
                        hint="Pass 'he' (RGB H&E), 'fluorescence' (bright nuclei on dark, one channel) or 'auto'.")
    return detect_modality(slide) if modality == "auto" else modality


def core_windows(height: int, width: int, tile_px: int) -> Iterator[tuple[int, int, int, int]]:
    """Non-overlapping core tiles (y0, x0, y1, x1) covering an image; each is segmented inside a
    context window grown by the overlap."""
    for cy0 in range(0, height, tile_px):
        for cx0 in range(0, width, tile_px):
            yield cy0, cx0, min(cy0 + tile_px, height), min(cx0 + tile_px, width)


def segment_image(
    rgb: np.ndarray, *, mpp: float, backend: str = "classical", options: dict | None = None,
    tile_px: int = 1024, overlap_px: int = 96, modality: str = "he", progress: ProgressFn | None = None,
) -> np.ndarray:
    """Instance labels (int32, 1..n) of an image at ``mpp`` µm/px, tiled and stitched: an RGB H&E
    image (``modality="he"``) or a (H, W) fluorescence intensity image (``"fluorescence"``; an
    (H, W, C) image is averaged over its channels)."""
    img = np.asarray(rgb)
    if modality == "fluorescence":
        if img.ndim == 3:
            img = img.astype(np.float32).mean(axis=2)
        if img.ndim != 2:
            raise ToolError(f"Fluorescence nucleus segmentation needs a 2-D image, got shape {img.shape}.",
                            hint="Pass one intensity channel (H, W).")
    elif modality != "he":
        raise ToolError(f"Unknown modality {modality!r}.", hint="Pass 'he' or 'fluorescence'.")
    elif img.ndim != 3 or img.shape[2] < 3:
        raise ToolError(f"Nucleus segmentation needs an RGB image, got shape {img.shape}.",
                        hint="For one-channel fluorescence images pass modality='fluorescence'.")
    else:
        img = img[..., :3]
    if not (mpp and mpp > 0):
        raise ToolError("mpp (µm per pixel of this image) is required.", hint="Pass mpp=, e.g. 0.25 for 40x.")
    if tile_px < 64 or overlap_px < 0:
        raise ToolError(f"tile_px must be >= 64 and overlap_px >= 0 (got {tile_px}, {overlap_px}).")
    seg = _segmenter(backend, options, modality)
    H, W = img.shape[:2]
    if H <= tile_px + overlap_px and W <= tile_px + overlap_px:
        if progress:
            progress(0, 1, "segmenting")
        lab = seg.segment(img, mpp=mpp)
        if progress:
            progress(1, 1, "segmenting")
        return lab
    out = np.zeros((H, W), np.int32)
    cores = list(core_windows(H, W, tile_px))
    next_id = 1
    for k, (cy0, cx0, cy1, cx1) in enumerate(cores):
        if progress:
            progress(k, len(cores), "segmenting tiles")
        wy0, wx0 = max(0, cy0 - overlap_px), max(0, cx0 - overlap_px)
        wy1, wx1 = min(H, cy1 + overlap_px), min(W, cx1 + overlap_px)
        lab = seg.segment(img[wy0:wy1, wx0:wx1], mpp=mpp)
        next_id = _paste_core(out, lab, (wy0, wx0), (cy0, cx0, cy1, cx1), next_id)
    if progress:
        progress(len(cores), len(cores), "segmenting tiles")
    return out


def _paste_core(out: np.ndarray, lab: np.ndarray, origin: tuple[int, int], core: tuple[int, int, int, int],
                next_id: int) -> int:
    """Paste the objects of ``lab`` (window at ``origin``) whose centroid lies in ``core``."""
    from scipy import ndimage as ndi

    n = int(lab.max())
    if n == 0:
        return next_id
    wy0, wx0 = origin
    cy0, cx0, cy1, cx1 = core
    idx = np.arange(1, n + 1)
    cents = np.array(ndi.center_of_mass(np.ones_like(lab, np.uint8), lab, idx)).reshape(-1, 2)
    cy, cx = cents[:, 0] + wy0, cents[:, 1] + wx0
    keep = (cy >= cy0) & (cy < cy1) & (cx >= cx0) & (cx < cx1)
    objs = ndi.find_objects(lab)
    for i in idx[keep]:
        sl = objs[i - 1]
        if sl is None:
            continue
        own = lab[sl] == i
        gsl = (slice(sl[0].start + wy0, sl[0].stop + wy0), slice(sl[1].start + wx0, sl[1].stop + wx0))
        dst = out[gsl]
        clash = (dst[own] > 0).sum()
        if clash > 0.3 * own.sum():  # a neighbour tile already holds this nucleus
            continue
        dst[own & (dst == 0)] = next_id
        next_id += 1
    return next_id


def morphometry(labels: np.ndarray, rgb: np.ndarray | None, mpp: float, *, offset_xy: tuple[float, float] = (0, 0),
                scale_to_level0: float = 1.0):
    """Per-nucleus measurements (pandas DataFrame), lengths in µm and areas in µm².

    Columns: ``label, x, y`` (centroid in level-0 px: ``offset + scale * local``), ``x_um, y_um``,
    ``area_px`` (pixels of ``labels``), ``area_um2, perimeter_um, equivalent_diameter_um,
    major_axis_um, minor_axis_um, eccentricity, solidity, convex_area_um2, circularity`` (4πA/P²,
    1 = disc), ``orientation_deg``; with an RGB ``rgb`` also ``mean_hematoxylin_od`` and
    ``mean_intensity`` (grey, 0-255); with a 2-D ``rgb`` (a fluorescence channel) ``mean_intensity``
    in that image's units."""
    import pandas as pd
    from skimage.measure import regionprops_table

    lab = np.asarray(labels)
    props = ["label", "centroid", "area", "perimeter", "equivalent_diameter_area", "axis_major_length",
             "axis_minor_length", "eccentricity", "solidity", "area_convex", "orientation"]
    if lab.max() == 0:
        return pd.DataFrame(columns=["label", "x", "y", "x_um", "y_um", *MORPH_COLUMNS])
    extra = {}
    if rgb is not None and np.asarray(rgb).ndim == 2:
        extra = {"intensity_mean-1": regionprops_table(lab, intensity_image=np.asarray(rgb, np.float32),
                                                       properties=["intensity_mean"])["intensity_mean"]}
    elif rgb is not None:
        from servers.common.segmenters.classical import hematoxylin_od

        hem = hematoxylin_od(np.asarray(rgb)[..., :3])
        gray = np.asarray(rgb)[..., :3].astype(np.float32).mean(axis=2)
        stack = np.stack([hem, gray], axis=2)
        extra = regionprops_table(lab, intensity_image=stack, properties=["intensity_mean"])
    t = regionprops_table(lab, properties=props)
    s = float(mpp)
    df = pd.DataFrame({
        "label": t["label"].astype(np.int64),
        "x": offset_xy[0] + scale_to_level0 * t["centroid-1"],
        "y": offset_xy[1] + scale_to_level0 * t["centroid-0"],
        "area_px": t["area"].astype(np.int64),
        "area_um2": t["area"] * s * s,
        "perimeter_um": t["perimeter"] * s,
        "equivalent_diameter_um": t["equivalent_diameter_area"] * s,
        "major_axis_um": t["axis_major_length"] * s,
        "minor_axis_um": t["axis_minor_length"] * s,
        "eccentricity": t["eccentricity"],
        "solidity": t["solidity"],
        "convex_area_um2": t["area_convex"] * s * s,
        "orientation_deg": np.degrees(t["orientation"]),
    })
    per = np.where(t["perimeter"] > 0, t["perimeter"], np.nan)
    df["circularity"] = np.clip(4 * np.pi * t["area"] / per**2, 0, 1)
    if "intensity_mean-0" in extra:
        df["mean_hematoxylin_od"] = extra["intensity_mean-0"]
    if extra:
        df["mean_intensity"] = extra["intensity_mean-1"]
    level0_mpp = s / scale_to_level0
    df.insert(3, "x_um", df["x"] * level0_mpp)
    df.insert(4, "y_um", df["y"] * level0_mpp)
    return df


def summarize(table, area_mm2: float | None) -> dict[str, Any]:
    """Counts, density per mm², mean/max nucleus size and morphometry medians of a nucleus table."""
    n = int(len(table))
    out: dict[str, Any] = {"n_nuclei": n, "area_mm2": None if area_mm2 is None else round(area_mm2, 5)}
    out["density_per_mm2"] = round(n / area_mm2, 2) if area_mm2 else None
    if n:
        for c, agg in (("area_um2", "mean"), ("area_um2", "max"), ("area_px", "mean"),
                       ("equivalent_diameter_um", "mean")):
            if c in table:
                out[f"{agg}_{c}"] = round(float(getattr(table[c], agg)()), 4)
        for c in ("area_um2", "perimeter_um", "eccentricity", "solidity", "circularity", "mean_hematoxylin_od"):
            if c in table:
                out[f"median_{c}"] = round(float(np.nanmedian(table[c])), 4)
    return out


def label_polygons(labels: np.ndarray, *, offset_xy: tuple[float, float] = (0, 0), scale: float = 1.0) -> dict[int, list]:
    """Outline of every label as a closed ring [[x, y], ...] in level-0 px (OpenCV contours)."""
    import cv2
    from scipy import ndimage as ndi

    out: dict[int, list] = {}
    for i, sl in enumerate(ndi.find_objects(labels), start=1):
        if sl is None:
            continue
        m = np.pad((labels[sl] == i).astype(np.uint8), 1)
        cs, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        if not cs:
            continue
        c = max(cs, key=cv2.contourArea)[:, 0, :].astype(float)
        if len(c) < 3:
            continue
        c[:, 0] += sl[1].start - 1
        c[:, 1] += sl[0].start - 1
        ring = np.column_stack([offset_xy[0] + scale * (c[:, 0] + 0.5), offset_xy[1] + scale * (c[:, 1] + 0.5)])
        ring = np.vstack([ring, ring[:1]])
        out[i] = np.round(ring, 2).tolist()
    return out


# -- regions and whole slides ------------------------------------------------------------------


@dataclass
class RegionNuclei:
    labels: np.ndarray
    rgb: np.ndarray  # the RGB region (H&E) or the intensity channel (fluorescence) that was segmented
    table: Any  # DataFrame
    mpp: float
    origin: tuple[int, int]
    downsample: float
    seconds: float
    modality: str = "he"

    def summary(self) -> dict[str, Any]:
        h, w = self.labels.shape
        area_mm2 = h * w * (self.mpp / 1000) ** 2
        out = summarize(self.table, area_mm2)
        out["modality"] = self.modality
        out["nuclear_area_fraction"] = round(float((self.labels > 0).mean()), 6)
        out.update({"region_level0": [self.origin[0], self.origin[1], int(round(w * self.downsample)),
                                      int(round(h * self.downsample))],
                    "shape_px": [h, w], "mpp": self.mpp, "seconds": round(self.seconds, 3),
                    "megapixels_per_s": round(h * w / 1e6 / max(self.seconds, 1e-9), 3)})
        return out


def segment_region(slide: Slide, x: int = 0, y: int = 0, width: int | None = None, height: int | None = None, *,
                   mpp: float | None = None,
                   backend: str = "classical", options: dict | None = None, tile_px: int = 1024,
                   overlap_px: int = 96, modality: str = "auto", channel: int | None = None,
                   flatfield_um: float | None = None, progress: ProgressFn | None = None) -> RegionNuclei:
    """Segment nuclei in a slide region: (x, y) level-0 px, ``width x height`` px at ``mpp`` (default:
    the slide's level-0 mpp; ``width``/``height`` None = up to the right/bottom edge).
    ``modality`` "he" | "fluorescence" | "auto"; fluorescence reads one
    intensity channel (``channel``, default: the mean of the channels) in the file's own units;
    ``flatfield_um`` divides it by its Gaussian blur of that scale (uneven illumination) before
    segmenting (intensities in the table stay raw). Returns labels, the segmented region and a
    morphometry table."""
    import math
    import time

    base = slide.require_mpp()
    mpp = float(mpp or base)
    W, H = slide.dimensions
    if width is None:
        width = max(1, math.ceil((W - x) * base / mpp))
    if height is None:
        height = max(1, math.ceil((H - y) * base / mpp))
    modality = resolve_modality(slide, modality)
    if modality == "fluorescence":
        img = slide.read_intensity_mpp(x, y, width, height, mpp, channel)
    else:
        img = slide.read_region_mpp(x, y, width, height, mpp)
    if flatfield_um is not None and modality != "fluorescence":
        raise ToolError("flatfield_um applies to fluorescence images only.",
                        hint="Leave flatfield_um out for H&E, or pass modality='fluorescence'.")
    t0 = time.perf_counter()
    seg_img = flat_field(img, flatfield_um / mpp) if flatfield_um is not None else img
    labels = segment_image(seg_img, mpp=mpp, backend=backend, options=options, tile_px=tile_px, overlap_px=overlap_px,
                           modality=modality, progress=progress)
    secs = time.perf_counter() - t0
    ds = mpp / base
    table = morphometry(labels, img, mpp, offset_xy=(x, y), scale_to_level0=ds)
    return RegionNuclei(labels, img, table, mpp, (int(x), int(y)), ds, secs, modality)


def _slide_tile_job(job: dict[str, Any]) -> dict[str, Any]:
    """Worker: segment the tiles ``job['tiles']`` of one slide; nuclei whose centroid is in each core."""
    import pandas as pd

    from servers.wsi.slide import open_slide_path

    slide = open_slide_path(job["abspath"], job.get("slide_mpp"))
    mpp, ds, core, m = job["mpp"], job["downsample"], job["tile_px"], job["overlap_px"]
    modality = job.get("modality", "he")
    seg = _segmenter(job["backend"], job.get("options"), modality)
    tables, tiles = [], []
    for (tx, ty, tid) in job["tiles"]:
        wx, wy = tx - m * ds, ty - m * ds
        side = core + 2 * m
        if modality == "fluorescence":
            rgb = slide.read_intensity_ds(int(round(wx)), int(round(wy)), side, side, ds, job.get("channel"))
        else:
            rgb = slide.read_region_ds(int(round(wx)), int(round(wy)), side, side, ds)
        lab = seg.segment(rgb, mpp=mpp)
        df = morphometry(lab, rgb, mpp, offset_xy=(round(wx), round(wy)), scale_to_level0=ds)
        keep = (df["x"] >= tx) & (df["x"] < tx + core * ds) & (df["y"] >= ty) & (df["y"] < ty + core * ds)
        df = df[keep].copy()
        df["tile_id"] = tid
        if job.get("polygons") and len(df):
            kept = np.zeros(int(lab.max()) + 1, bool)
            kept[df["label"].to_numpy()] = True
            rings = label_polygons(np.where(kept[lab], lab, 0), offset_xy=(round(wx), round(wy)), scale=ds)
            df["polygon"] = [rings.get(int(i)) for i in df["label"]]
        tables.append(df)
        tiles.append({"tile_id": tid, "x": tx, "y": ty, "n_nuclei": int(len(df))})
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    return {"table": table, "tiles": tiles}


def dedupe_centroids(table, min_dist_px0: float):
    """Drop the smaller of two nuclei from different tiles whose centroids are closer than ``min_dist_px0``."""
    if len(table) < 2:
        return table
    from scipy.spatial import cKDTree

    pts = table[["x", "y"]].to_numpy()
    pairs = cKDTree(pts).query_pairs(min_dist_px0, output_type="ndarray")
    if not len(pairs):
        return table
    tiles = table["tile_id"].to_numpy()
    area = table["area_um2"].to_numpy()
    drop = set()
    for a, b in pairs:
        if tiles[a] == tiles[b] or a in drop or b in drop:
            continue
        drop.add(b if area[b] <= area[a] else a)
    return table.drop(table.index[list(drop)]).reset_index(drop=True)


def segment_slide(slide: Slide, *, mpp: float | None = None, tile_px: int = 1024, overlap_px: int = 64,
                  min_tissue_fraction: float = 0.05, backend: str = "classical", options: dict | None = None,
                  polygons: bool = False, max_tiles: int | None = None, workers: int | None = None,
                  modality: str = "he", channel: int | None = None,
                  progress: ProgressFn | None = None) -> dict[str, Any]:
    """Nuclei of a whole slide (tissue tiles only), in parallel through the executor.

    H&E slides are restricted to tissue tiles and densities are per mm² of tissue; fluorescence
    images (``modality="fluorescence"`` or ``"auto"``) have no bright-field tissue/glass contrast, so
    every tile is segmented and densities are per mm² of image.

    Returns ``{"table": DataFrame (one row per nucleus: level-0 centroid, µm morphometry, tile_id,
    optional polygon), "tiles": DataFrame (per-tile counts, density per mm²), "summary": dict}``.
    """
    import time

    import pandas as pd

    from servers.common.executor import get_executor
    from servers.wsi.tiling import resolve_spec, tile_grid
    from servers.wsi.tissue import segment_tissue

    base = slide.require_mpp()
    mpp = float(mpp or base)
    spec = resolve_spec(slide, tile_px, mpp=mpp)
    modality = resolve_modality(slide, modality)
    tissue = whole_image_tissue(slide) if modality == "fluorescence" else segment_tissue(slide)
    grid = tile_grid(slide, spec, tissue_mask=tissue.mask, mask_downsample=tissue.downsample,
                     min_tissue_fraction=min_tissue_fraction, include_partial=True)
    if max_tiles is not None and len(grid) > max_tiles:
        raise ToolError(f"The slide has {len(grid)} tissue tiles of {tile_px} px at {mpp} µm/px, over max_tiles={max_tiles}.",
                        hint="Raise max_tiles, use a coarser mpp, or segment a region with segment_nuclei.")
    t0 = time.perf_counter()
    tiles = list(zip(grid["x"].tolist(), grid["y"].tolist(), grid["tile_id"].tolist()))
    n_workers = max(1, workers or 1)
    chunks = [tiles[i::n_workers * 4] for i in range(min(len(tiles), n_workers * 4))] or []
    jobs = [{"abspath": str(slide.path), "slide_mpp": slide.mpp if slide.mpp_source == "argument" else None,
             "mpp": mpp, "downsample": spec.downsample, "tile_px": tile_px, "overlap_px": overlap_px,
             "backend": backend, "options": options, "tiles": ch, "polygons": polygons, "modality": modality,
             "channel": channel} for ch in chunks]
    if n_workers == 1:
        results = []
        for k, j in enumerate(jobs):
            if progress:
                progress(k, len(jobs), "segmenting nuclei")
            results.append(_slide_tile_job(j))
        if progress:
            progress(len(jobs), len(jobs), "segmenting nuclei")
    else:
        with get_executor(workers=n_workers) as ex:
            results = ex.map(_slide_tile_job, jobs, progress=progress, message="segmenting nuclei")
    secs = time.perf_counter() - t0
    parts = [r["table"] for r in results if len(r["table"])]
    table = pd.concat(parts, ignore_index=True) if parts else morphometry(np.zeros((1, 1), np.int32), None, mpp)
    n_before = len(table)
    if len(table):
        table = dedupe_centroids(table, min_dist_px0=2.0 / base)  # 2 µm
    table.insert(0, "nucleus_id", np.arange(1, len(table) + 1))
    table = table.drop(columns=["label"], errors="ignore")
    tiles_df = pd.DataFrame([t for r in results for t in r["tiles"]])
    if len(tiles_df):
        counts = table.groupby("tile_id").size()
        tiles_df["n_nuclei"] = tiles_df["tile_id"].map(counts).fillna(0).astype(int)
        tile_mm2 = (tile_px * mpp / 1000) ** 2
        tiles_df = tiles_df.merge(grid[["tile_id", "row", "col", "tissue_fraction"]], on="tile_id")
        tiles_df["density_per_mm2_tissue"] = tiles_df["n_nuclei"] / (tile_mm2 * tiles_df["tissue_fraction"].clip(lower=1e-6))
    summary = summarize(table, tissue.area_mm2)
    summary["density_basis"] = "image area" if modality == "fluorescence" else "tissue area"
    summary["modality"] = modality
    mpx = len(grid) * tile_px**2 / 1e6
    summary.update({"n_tiles": int(len(grid)), "mpp": mpp, "tile_px": tile_px, "overlap_px": overlap_px,
                    "seconds": round(secs, 2), "megapixels": round(mpx, 2),
                    "megapixels_per_s": round(mpx / max(secs, 1e-9), 3), "duplicates_removed": n_before - len(table)})
    return {"table": table, "tiles": tiles_df, "summary": summary, "tissue": tissue}


def whole_image_tissue(slide: Slide):
    """A TissueResult covering the whole image (fluorescence: no tissue/glass contrast to threshold)."""
    from servers.wsi.tissue import TissueResult

    thumb, ds = slide.thumbnail(1024)
    return TissueResult(mask=np.ones(thumb.shape[:2], bool), downsample=ds, mpp=slide.mpp, thumbnail=thumb,
                        threshold=float("nan"))
