"""Handcrafted patch features (colour, stain, texture, nuclei) and clustering of patches.

Features of one RGB patch (``patch_features``):
  colour    ``mean_r/g/b``, ``std_r/g/b``, ``mean_gray``
  stain     ``mean_hematoxylin_od``, ``mean_eosin_od`` (colour deconvolution), ``tissue_fraction``
            (pixels with summed OD > 0.3)
  texture   grey-level co-occurrence (32 levels, distance 1 px, 4 angles, averaged):
            ``glcm_contrast, glcm_homogeneity, glcm_energy, glcm_correlation``; ``entropy`` (bits)
  nuclei    (``nuclei=True``) ``n_nuclei``, ``nuclei_per_mm2``, ``nuclear_area_fraction``,
            ``mean_nuclear_area_um2``, ``mean_nuclear_eccentricity`` via the classical segmenter.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from servers.common.errors import ToolError
from servers.common.progress import ProgressFn


def patch_features(rgb: np.ndarray, *, mpp: float | None = None, nuclei: bool = False,
                   backend: str = "classical") -> dict[str, float]:
    """Feature dict of one RGB patch (see the module docstring)."""
    from skimage.color import rgb2hed
    from skimage.feature import graycomatrix, graycoprops

    img = np.asarray(rgb)[..., :3]
    if img.ndim != 3:
        raise ToolError(f"Patch features need an RGB patch, got shape {np.asarray(rgb).shape}.")
    f: dict[str, float] = {}
    flat = img.reshape(-1, 3).astype(np.float32)
    for i, c in enumerate("rgb"):
        f[f"mean_{c}"] = float(flat[:, i].mean())
        f[f"std_{c}"] = float(flat[:, i].std())
    gray = flat.mean(axis=1).reshape(img.shape[:2])
    f["mean_gray"] = float(gray.mean())
    hed = rgb2hed(img)
    f["mean_hematoxylin_od"] = float(hed[..., 0].mean())
    f["mean_eosin_od"] = float(hed[..., 1].mean())
    od = -np.log((flat + 1.0) / 256.0).sum(axis=1)
    f["tissue_fraction"] = float((od > 0.3).mean())
    q = np.clip(gray / 8.0, 0, 31).astype(np.uint8)
    glcm = graycomatrix(q, [1], [0, np.pi / 4, np.pi / 2, 3 * np.pi / 4], levels=32, symmetric=True, normed=True)
    for prop in ("contrast", "homogeneity", "energy", "correlation"):
        v = graycoprops(glcm, prop)
        f[f"glcm_{prop}"] = float(np.nan_to_num(v).mean())
    hist = np.bincount(q.ravel(), minlength=32).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    f["entropy"] = float(-(p * np.log2(p)).sum())
    if nuclei:
        if mpp is None:
            raise ToolError("Nuclear features need the patch resolution.", hint="Pass mpp= (µm per pixel).")
        from servers.wsi.nuclei import morphometry, segment_image

        lab = segment_image(img, mpp=mpp, backend=backend, tile_px=max(img.shape[:2]) + 1)
        tab = morphometry(lab, None, mpp)
        area_mm2 = img.shape[0] * img.shape[1] * (mpp / 1000) ** 2
        f["n_nuclei"] = float(len(tab))
        f["nuclei_per_mm2"] = float(len(tab) / area_mm2)
        f["nuclear_area_fraction"] = float((lab > 0).mean())
        f["mean_nuclear_area_um2"] = float(tab["area_um2"].mean()) if len(tab) else 0.0
        f["mean_nuclear_eccentricity"] = float(tab["eccentricity"].mean()) if len(tab) else 0.0
    return f


def _features_job(job: dict[str, Any]) -> list[dict[str, Any]]:
    from servers.wsi.slide import open_slide_path
    from servers.wsi.tiling import TileSpec, read_tile

    slide = open_slide_path(job["abspath"], job.get("slide_mpp"))
    spec = TileSpec(**job["spec"])
    rows = []
    for tid, x, y in job["tiles"]:
        f = patch_features(read_tile(slide, spec, x, y), mpp=spec.mpp, nuclei=job["nuclei"])
        rows.append({"tile_id": tid, **f})
    return rows


def tile_features(slide, spec, grid, *, nuclei: bool = False, workers: int = 1, progress: ProgressFn | None = None):
    """Features of every tile in ``grid`` (DataFrame: tile_id, row, col, x, y + features)."""
    import pandas as pd

    from servers.common.executor import get_executor

    if nuclei and spec.mpp is None:
        slide.require_mpp()
    tiles = list(zip(grid["tile_id"], grid["x"].astype(int), grid["y"].astype(int)))
    if not tiles:
        raise ToolError("The tile grid is empty.", hint="Lower min_tissue_fraction or tile_px.")
    n_chunks = max(1, min(len(tiles), workers * 4))
    base = {"abspath": str(slide.path), "slide_mpp": slide.mpp if slide.mpp_source == "argument" else None,
            "spec": {"tile_px": spec.tile_px, "downsample": spec.downsample, "mpp": spec.mpp,
                     "overlap_px": spec.overlap_px}, "nuclei": nuclei}
    jobs = [{**base, "tiles": tiles[i::n_chunks]} for i in range(n_chunks)]
    with get_executor(workers=max(1, workers)) as ex:
        parts = ex.map(_features_job, jobs, progress=progress, message="tile features")
    feats = pd.DataFrame([r for p in parts for r in p])
    keep = [c for c in ("tile_id", "row", "col", "x", "y", "tissue_fraction") if c in grid]
    meta = grid[keep].rename(columns={"tissue_fraction": "mask_tissue_fraction"})
    return meta.merge(feats, on="tile_id")


FEATURE_EXCLUDE = {"tile_id", "row", "col", "x", "y", "x_um", "y_um", "size0", "slide", "mask_tissue_fraction",
                   "cluster"}


def feature_columns(df) -> list[str]:
    return [c for c in df.columns if c not in FEATURE_EXCLUDE and np.issubdtype(df[c].dtype, np.number)]


def cluster_tiles(df, *, n_clusters: int = 4, columns: list[str] | None = None, seed: int = 0) -> dict[str, Any]:
    """K-means on standardised tile features. Returns ``labels`` (array), ``silhouette``, per-cluster
    sizes and feature means (original units)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score
    from sklearn.preprocessing import StandardScaler

    cols = columns or feature_columns(df)
    missing = [c for c in cols if c not in df]
    if missing:
        raise ToolError(f"Unknown feature columns {missing}.", hint=f"Available: {', '.join(feature_columns(df))}.")
    if len(df) < 3:
        raise ToolError(f"Only {len(df)} tile(s) in the table: clustering needs at least 3.",
                        hint="Make more tiles: a smaller tile_px, a finer mpp, or a lower min_tissue_fraction.")
    if not 2 <= n_clusters <= len(df) - 1:
        raise ToolError(f"n_clusters must be in [2, {len(df) - 1}] for {len(df)} tiles, got {n_clusters}.",
                        hint=f"Pass n_clusters between 2 and {len(df) - 1}.")
    X = StandardScaler().fit_transform(df[cols].to_numpy(np.float64))
    X = np.nan_to_num(X)
    km = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit(X)
    labels = km.labels_
    sil = float(silhouette_score(X, labels)) if len(set(labels)) > 1 else float("nan")
    means = df[cols].groupby(labels).mean()
    clusters = [{"cluster": int(k), "n_tiles": int((labels == k).sum()),
                 "means": {c: round(float(means.loc[k, c]), 4) for c in cols[:12]}} for k in range(n_clusters)]
    return {"labels": labels, "silhouette": sil, "clusters": clusters, "columns": cols}
