"""Point-pattern and autocorrelation statistics: Ripley's K/L/G, Moran's I, Geary's C, nearest-neighbour
distances between types, cell densities, distances to a region.

Distances are in the dataset's coordinate unit (``uns['spatial_units']``); densities are per mm²
and need µm (or pixels with a known ``mpp``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from servers.common.errors import ToolError
from servers.spatial.core import SPATIAL_KEY, get_coords, get_labels, um_per_unit
from servers.spatial.graph import CONN_KEY, get_graph

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from anndata import AnnData


# -- Ripley --------------------------------------------------------------------------------------


@dataclass
class Ripley:
    mode: str
    radii: np.ndarray
    observed: np.ndarray
    envelope_low: np.ndarray
    envelope_high: np.ndarray
    csr_mean: np.ndarray
    n_points: int
    area: float
    n_simulations: int
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        above = self.observed > self.envelope_high
        below = self.observed < self.envelope_low
        return {
            "mode": self.mode, "n_points": self.n_points, "area": round(self.area, 3),
            "n_simulations": self.n_simulations,
            "fraction_radii_above_envelope": float(above.mean()), "fraction_radii_below_envelope": float(below.mean()),
            "interpretation": ("clustered" if above.mean() > 0.5 else "dispersed" if below.mean() > 0.5
                               else "consistent with complete spatial randomness"),
            "radii": self.radii.round(4).tolist(), "observed": self.observed.round(5).tolist(),
            "envelope_low": self.envelope_low.round(5).tolist(), "envelope_high": self.envelope_high.round(5).tolist(),
            **self.extra,
        }


def _ripley_stat(xy: np.ndarray, radii: np.ndarray, area: float, mode: str) -> np.ndarray:
    from scipy.spatial import cKDTree

    n = len(xy)
    tree = cKDTree(xy)
    if mode == "G":
        d, _ = tree.query(xy, k=2)
        nn = np.sort(d[:, 1])
        return np.searchsorted(nn, radii, side="right") / n
    pairs = tree.count_neighbors(tree, radii, cumulative=True).astype(np.float64) - n  # ordered, i != j
    K = area * pairs / (n * (n - 1))
    if mode == "K":
        return K
    return np.sqrt(K / np.pi) - radii  # L(r) - r: 0 under CSR


def ripley_arrays(coords: np.ndarray, mode: str = "L", radii: np.ndarray | None = None, n_radii: int = 50,
                  n_simulations: int = 100, bbox: tuple[float, float, float, float] | None = None,
                  seed: int = 0) -> Ripley:
    """Ripley's K, L (as ``L(r) - r``) or G for points in a rectangular window, with a CSR envelope.

    No edge correction: the same estimator is applied to ``n_simulations`` uniform random patterns
    of the same size in the same window, whose pointwise min/max give the envelope — a pattern is
    clustered where the observed curve is above the envelope and dispersed where it is below.

    Args:
        coords: (n, 2) points.
        mode: ``K``, ``L`` or ``G`` (nearest-neighbour distance CDF).
        radii: Distances to evaluate (coordinate units); default ``n_radii`` values up to a quarter
            of the window's shorter side.
        n_radii: Number of radii when ``radii`` is not given.
        n_simulations: CSR simulations for the envelope (0 for none).
        bbox: Window (xmin, ymin, xmax, ymax); default the points' bounding box.
        seed: Seed of the simulations.
    """
    mode = str(mode).upper()
    if mode not in ("K", "L", "G"):
        raise ToolError(f"Unknown Ripley mode {mode!r}.", hint="Use 'K', 'L' or 'G'.")
    xy = np.asarray(coords, dtype=np.float64)
    if len(xy) < 3:
        raise ToolError(f"Ripley's statistics need at least 3 cells; got {len(xy)}.")
    if bbox is None:
        bbox = (*xy.min(axis=0), *xy.max(axis=0))
    x0, y0, x1, y1 = map(float, bbox)
    area = (x1 - x0) * (y1 - y0)
    if not area > 0:
        raise ToolError("The cells span zero area (all on one line or point); Ripley's statistics are undefined.")
    if radii is None:
        radii = np.linspace(0, 0.25 * min(x1 - x0, y1 - y0), n_radii)
    radii = np.asarray(radii, dtype=np.float64)
    if np.any(radii < 0) or not np.all(np.isfinite(radii)):
        raise ToolError("radii must be finite and non-negative.")
    obs = _ripley_stat(xy, radii, area, mode)
    rng = np.random.default_rng(seed)
    sims = np.array([_ripley_stat(np.column_stack([rng.uniform(x0, x1, len(xy)), rng.uniform(y0, y1, len(xy))]),
                                  radii, area, mode) for _ in range(int(n_simulations))])
    if len(sims):
        lo, hi, mean = sims.min(axis=0), sims.max(axis=0), sims.mean(axis=0)
    else:
        lo = hi = mean = np.full_like(obs, np.nan)
    return Ripley(mode=mode, radii=radii, observed=obs, envelope_low=lo, envelope_high=hi, csr_mean=mean,
                  n_points=len(xy), area=area, n_simulations=int(n_simulations))


def ripley(adata: AnnData, mode: str = "L", cluster_key: str | None = None, cell_type: str | None = None,
           radii: list[float] | np.ndarray | None = None, n_simulations: int = 100, seed: int = 0,
           spatial_key: str = SPATIAL_KEY) -> Ripley:
    """Ripley's K/L/G for all cells, or for one ``cell_type`` of ``cluster_key`` (window: all cells' bbox)."""
    xy = get_coords(adata, spatial_key)
    bbox = (*xy.min(axis=0), *xy.max(axis=0))
    extra: dict = {"units": adata.uns.get("spatial_units")}
    if cell_type is not None:
        if cluster_key is None:
            raise ToolError("cell_type needs cluster_key (the obs column holding it).")
        codes, cats = get_labels(adata, cluster_key)
        if str(cell_type) not in cats:
            raise ToolError(f"Unknown cell type {cell_type!r} in {cluster_key!r}.", hint=f"Known: {', '.join(cats[:40])}.")
        xy = xy[codes == cats.index(str(cell_type))]
        extra["cell_type"] = str(cell_type)
    r = ripley_arrays(xy, mode, None if radii is None else np.asarray(radii, float), n_simulations=n_simulations,
                      bbox=bbox, seed=seed)
    r.extra.update(extra)
    return r


# -- spatial autocorrelation ---------------------------------------------------------------------


def _moments(w) -> tuple[float, float, float]:
    s0 = float(w.sum())
    t = w.T + w
    s1 = float(t.multiply(t).sum()) / 2.0
    s2 = float((np.asarray(w.sum(1)).ravel() + np.asarray(w.sum(0)).ravel()) ** 2 @ np.ones(w.shape[0]))
    return s0, s1, s2


def autocorrelation(adata: AnnData, genes: list[str] | str | None = None, mode: str = "moran",
                    transformation: bool = True, layer: str | None = None, connectivity_key: str = CONN_KEY,
                    two_tailed: bool = False) -> pd.DataFrame:
    """Moran's I or Geary's C of genes/markers on the spatial graph (squidpy's ``spatial_autocorr``).

    ``I = n / W · Σ w_ij z_i z_j / Σ z_i²``; ``C = (n - 1) Σ w_ij (x_i - x_j)² / (2 W Σ z_i²)`` with
    ``z = x - mean(x)``, weights row-normalised when ``transformation``. p-values under the normality
    assumption (Cliff & Ord), as squidpy's ``pval_norm``. I > 0 / C < 1: neighbours are alike.

    Returns:
        DataFrame indexed by gene: ``I`` or ``C``, ``pval_norm``, ``var_norm``, ``pval_norm_fdr_bh``,
        sorted like squidpy (I descending, C ascending).
    """
    import pandas as pd
    import scipy.sparse as sp
    from scipy import stats
    from sklearn.preprocessing import normalize

    mode = str(mode).lower()
    if mode not in ("moran", "geary"):
        raise ToolError(f"Unknown mode {mode!r}.", hint="Use 'moran' or 'geary'.")
    g = get_graph(adata, connectivity_key).astype(np.float64)
    if g.nnz == 0:
        raise ToolError("The spatial graph has no edges.", hint="Rebuild it with a larger radius or k.")
    if transformation:
        g = normalize(g, norm="l1", axis=1, copy=True)
    if genes is None:
        genes = list(adata.var_names)
    elif isinstance(genes, str):
        genes = [genes]
    missing = [x for x in genes if x not in adata.var_names]
    if missing:
        raise ToolError(f"Unknown gene/marker(s): {missing[:10]}.",
                        hint=f"Available (first 30): {', '.join(map(str, adata.var_names[:30]))}.")
    if len(genes) == 0:
        raise ToolError("The dataset has no genes/markers to test.")
    sub = adata[:, genes]
    X = sub.X if layer is None else sub.layers[layer]
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    X = X.astype(np.float64)
    n = X.shape[0]
    W = float(g.sum())
    z = X - X.mean(axis=0)
    ss = (z * z).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        if mode == "moran":
            score = n / W * (z * (g @ z)).sum(axis=0) / ss
            expected = -1.0 / (n - 1)
        else:
            rs = np.asarray(g.sum(axis=1)).ravel()
            cs = np.asarray(g.sum(axis=0)).ravel()
            quad = (rs @ (X * X)) + (cs @ (X * X)) - 2 * (X * (g @ X)).sum(axis=0)
            score = (n - 1) * quad / (2 * W * ss)
            expected = 1.0
    s0, s1, s2 = _moments(g)
    if mode == "moran":
        var = (n * n * s1 - n * s2 + 3 * s0 * s0) / ((n - 1) * (n + 1) * s0 * s0) - (1.0 / (n - 1)) ** 2
    else:
        var = ((2 * s1 + s2) * (n - 1) - 4 * s0 * s0) / (2 * (n + 1) * s0 * s0)
    zn = (score - expected) / np.sqrt(var)
    p = np.where(zn > 0, stats.norm.sf(zn), stats.norm.cdf(zn))
    if two_tailed:
        p = p * 2.0
    stat = "I" if mode == "moran" else "C"
    df = pd.DataFrame({stat: score, "pval_norm": p, "var_norm": var}, index=list(genes))
    ok = np.isfinite(df["pval_norm"].to_numpy())
    fdr = np.full(len(df), np.nan)
    if ok.any():
        fdr[ok] = stats.false_discovery_control(df["pval_norm"].to_numpy()[ok], method="bh")
    df["pval_norm_fdr_bh"] = fdr
    return df.sort_values(stat, ascending=(mode == "geary"))


# -- nearest-neighbour distances between types ---------------------------------------------------


def nn_distances(adata: AnnData, cluster_key: str, spatial_key: str = SPATIAL_KEY) -> pd.DataFrame:
    """Distance from every cell of type ``a`` to the nearest *other* cell of type ``b``, summarised.

    Returns:
        Long DataFrame ``source, target, n_source, mean, median, p10, p90`` (coordinate units); also
        writes per-cell ``obsm['nn_distance_by_type']`` (n_cells × k, column order = categories).
    """
    import pandas as pd
    from scipy.spatial import cKDTree

    xy = get_coords(adata, spatial_key)
    codes, cats = get_labels(adata, cluster_key)
    k = len(cats)
    D = np.full((len(xy), k), np.nan)
    for b in range(k):
        idx = np.flatnonzero(codes == b)
        if len(idx) == 0:
            continue
        tree = cKDTree(xy[idx])
        kk = 2 if len(idx) > 1 else 1
        d, j = tree.query(xy, k=kk)
        d = d.reshape(len(xy), -1)
        j = j.reshape(len(xy), -1)
        own = (codes == b) & (idx[j[:, 0]] == np.arange(len(xy)))
        best = d[:, 0].copy()
        if kk == 2:
            best[own] = d[own, 1]
        else:
            best[own] = np.nan  # the only cell of that type: no other
        # duplicates: a coincident other cell of the same type may come first — also fine (distance 0)
        D[:, b] = best
    adata.obsm["nn_distance_by_type"] = D
    rows = []
    for a in range(k):
        m = codes == a
        for b in range(k):
            v = D[m, b]
            v = v[np.isfinite(v)]
            rows.append({"source": cats[a], "target": cats[b], "n_source": int(m.sum()),
                         "mean": float(v.mean()) if len(v) else np.nan,
                         "median": float(np.median(v)) if len(v) else np.nan,
                         "p10": float(np.percentile(v, 10)) if len(v) else np.nan,
                         "p90": float(np.percentile(v, 90)) if len(v) else np.nan})
    return pd.DataFrame(rows)


def nn_overall(adata: AnnData, cluster_key: str | None = None, spatial_key: str = SPATIAL_KEY) -> dict:
    """Type-agnostic nearest-neighbour statistics, and how often the nearest neighbour has the same type.

    Each cell's nearest *other* cell (``scipy.spatial.cKDTree``, Euclidean, coordinate units; a
    coincident cell counts at distance 0). Writes ``obs['nn_distance']`` (and
    ``obs['nn_same_type']`` with ``cluster_key``).

    Returns:
        ``{"n_cells", "mean", "median", "std", "min", "max", "p10", "p90"}`` of the distances, plus with
        ``cluster_key``: ``same_type_nn_fraction`` (fraction of all cells whose nearest neighbour has
        their type) and ``same_type_nn_fraction_by_type`` {type: fraction of that type's cells}.
    """
    from scipy.spatial import cKDTree

    xy = get_coords(adata, spatial_key)
    n = len(xy)
    if n < 2:
        raise ToolError(f"Nearest-neighbour distances need at least 2 cells; got {n}.")
    d, j = cKDTree(xy).query(xy, k=2)
    first_is_self = j[:, 0] == np.arange(n)
    nn = np.where(first_is_self, j[:, 1], j[:, 0])
    dist = np.where(first_is_self, d[:, 1], d[:, 0])
    adata.obs["nn_distance"] = dist
    out: dict = {"n_cells": int(n), "mean": float(dist.mean()), "median": float(np.median(dist)),
                 "std": float(dist.std(ddof=1)), "min": float(dist.min()), "max": float(dist.max()),
                 "p10": float(np.percentile(dist, 10)), "p90": float(np.percentile(dist, 90))}
    if cluster_key is not None:
        codes, cats = get_labels(adata, cluster_key)
        same = codes == codes[nn]
        adata.obs["nn_same_type"] = same
        out["same_type_nn_fraction"] = float(same.mean())
        cnt = np.bincount(codes, minlength=len(cats))
        hit = np.bincount(codes, weights=same.astype(np.float64), minlength=len(cats))
        out["same_type_nn_fraction_by_type"] = {c: float(hit[i] / cnt[i]) for i, c in enumerate(cats) if cnt[i]}
    return out


# -- density -------------------------------------------------------------------------------------


def tissue_area_um2(xy_um: np.ndarray, region: str = "convex_hull") -> float:
    """Area (µm²) of the region the cells occupy: convex hull or bounding box."""
    if region == "bbox":
        ext = xy_um.max(axis=0) - xy_um.min(axis=0)
        return float(ext[0] * ext[1])
    if region != "convex_hull":
        raise ToolError(f"Unknown region {region!r}.", hint="Use 'convex_hull' or 'bbox', or pass area_mm2.")
    from scipy.spatial import ConvexHull

    if len(xy_um) < 3:
        return 0.0
    try:
        return float(ConvexHull(xy_um).volume)  # 2-D "volume" is the area
    except Exception:
        return 0.0


def density(adata: AnnData, cluster_key: str | None = None, sample_key: str | None = None,
            region: str = "convex_hull", area_mm2: float | None = None,
            spatial_key: str = SPATIAL_KEY) -> pd.DataFrame:
    """Cells per mm² by type (and sample); the area is the cells' convex hull / bbox or ``area_mm2``.

    Returns:
        DataFrame ``sample, cell_type, n_cells, area_mm2, cells_per_mm2`` (``cell_type='all'`` rows too).
    """
    import pandas as pd

    if area_mm2 is not None and not (np.isfinite(area_mm2) and area_mm2 > 0):
        raise ToolError(f"area_mm2 must be a positive area in mm², got {area_mm2!r}.",
                        hint="Pass the tissue area, e.g. area_mm2=1.5, or leave it out to use the cells' hull.")
    f = um_per_unit(adata)
    if f is None and area_mm2 is None:
        raise ToolError("Density per mm² needs µm coordinates, but they are pixels of unknown size.",
                        hint="Reload with mpp=<µm per pixel>, or pass area_mm2 explicitly.")
    xy = get_coords(adata, spatial_key) * (f or 1.0)
    codes, cats = get_labels(adata, cluster_key) if cluster_key else (np.zeros(len(xy), np.int32), ["all"])
    if sample_key is not None:
        if sample_key not in adata.obs:
            raise ToolError(f"Unknown sample key {sample_key!r}.", hint=f"obs columns: {', '.join(map(str, adata.obs.columns[:30]))}.")
        samples = adata.obs[sample_key].astype(str).to_numpy()
    else:
        samples = np.full(len(xy), "all")
    rows = []
    for s in sorted(set(samples)):
        m = samples == s
        area = area_mm2 if area_mm2 is not None else tissue_area_um2(xy[m], region) / 1e6
        if not area or area <= 0:
            raise ToolError(f"Sample {str(s)!r}: the cells span zero area, so density is undefined.",
                            hint="Pass area_mm2 explicitly.")
        rows.append({"sample": s, "cell_type": "all", "n_cells": int(m.sum()), "area_mm2": area,
                     "cells_per_mm2": m.sum() / area})
        if cluster_key:
            cnt = np.bincount(codes[m], minlength=len(cats))
            for i, c in enumerate(cats):
                rows.append({"sample": s, "cell_type": c, "n_cells": int(cnt[i]), "area_mm2": area,
                             "cells_per_mm2": cnt[i] / area})
    return pd.DataFrame(rows)


# -- distance to a region ------------------------------------------------------------------------


def distance_to_types(adata: AnnData, cluster_key: str, target_types: list[str],
                      spatial_key: str = SPATIAL_KEY, key_added: str = "distance_to_region") -> np.ndarray:
    """Distance of every cell to the nearest cell of ``target_types`` (0 for those cells themselves).

    Stored in ``obs[key_added]`` (coordinate units).
    """
    from scipy.spatial import cKDTree

    xy = get_coords(adata, spatial_key)
    codes, cats = get_labels(adata, cluster_key)
    unknown = [t for t in target_types if str(t) not in cats]
    if unknown or not target_types:
        raise ToolError(f"Unknown or empty target types {unknown or target_types}.", hint=f"Known: {', '.join(cats[:40])}.")
    m = np.isin(codes, [cats.index(str(t)) for t in target_types])
    d, _ = cKDTree(xy[m]).query(xy, k=1)
    adata.obs[key_added] = d
    return d


def distance_to_polygon(adata: AnnData, polygon: list[list[float]] | np.ndarray, signed: bool = True,
                        spatial_key: str = SPATIAL_KEY, key_added: str = "distance_to_boundary") -> np.ndarray:
    """Distance of every cell to a polygon's boundary (coordinate units); negative inside when ``signed``."""
    import shapely

    pts = np.asarray(polygon, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 3:
        raise ToolError("polygon must be a list of >= 3 [x, y] vertices in the dataset's coordinate units.")
    poly = shapely.Polygon(pts)
    if not poly.is_valid or poly.area <= 0:
        raise ToolError("The polygon is invalid (self-intersecting or zero area).", hint="Pass vertices in order.")
    xy = get_coords(adata, spatial_key)
    p = shapely.points(xy)
    d = shapely.distance(p, poly.boundary)
    if signed:
        d = np.where(shapely.contains(poly, p), -d, d)
    adata.obs[key_added] = d
    return d
