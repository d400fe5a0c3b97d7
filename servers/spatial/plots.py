"""Figures as PNG bytes: spatial scatter (by type or gene), enrichment heatmap, co-occurrence curves,
niche map, Ripley curve. matplotlib (Agg) is imported lazily."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from servers.common.errors import ToolError
from servers.spatial.core import get_coords, get_labels

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

MAX_POINTS = 200_000


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    from servers.common.images import figure_png

    try:
        return figure_png(fig)
    finally:
        _plt().close(fig)


def _palette(k: int) -> np.ndarray:
    plt = _plt()
    if k <= 10:
        return np.array([plt.get_cmap("tab10")(i) for i in range(k)])
    if k <= 20:
        return np.array([plt.get_cmap("tab20")(i) for i in range(k)])
    # more types than a qualitative map holds: distinct colours (no repeats) from a cyclic hue wheel
    # at three lightness levels, so neighbouring categories stay distinguishable
    from matplotlib.colors import hsv_to_rgb

    i = np.arange(k)
    hues = (i // 3) / -(-k // 3) + (i % 3) / 3.0  # three interleaved, evenly spaced hue wheels
    hues = hues % 1.0
    levels = np.array([(0.75, 0.9), (0.45, 1.0), (0.95, 0.55)])[i % 3]
    rgb = hsv_to_rgb(np.column_stack([hues, levels[:, 0], levels[:, 1]]))
    return np.column_stack([rgb, np.ones(k)])


def spatial_scatter(adata: AnnData, color: str | None = None, point_size: float | None = None,
                    title: str | None = None, max_points: int = MAX_POINTS, seed: int = 0) -> bytes:
    """Cells at their coordinates coloured by a categorical obs column, a numeric obs column or a gene."""
    import pandas as pd
    import scipy.sparse as sp

    xy = get_coords(adata)
    n = len(xy)
    sel = np.arange(n)
    if n > max_points:
        sel = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    s = point_size if point_size is not None else max(0.3, min(12.0, 30000.0 / len(sel)))
    unit = adata.uns.get("spatial_units", "?")
    if color is None:
        ax.scatter(xy[sel, 0], xy[sel, 1], s=s, c="0.3", linewidths=0)
    elif color in adata.obs and (isinstance(adata.obs[color].dtype, pd.CategoricalDtype)
                                 or adata.obs[color].dtype == object or adata.obs[color].dtype == bool):
        codes, cats = get_labels(adata, color)
        pal = _palette(len(cats))
        ax.scatter(xy[sel, 0], xy[sel, 1], s=s, c=pal[codes[sel]], linewidths=0)
        if len(cats) <= 30:
            from matplotlib.lines import Line2D

            handles = [Line2D([], [], marker="o", ls="", color=pal[i], label=c) for i, c in enumerate(cats)]
            ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    else:
        if color in adata.obs:
            v = adata.obs[color].to_numpy(dtype=float)
        elif color in adata.var_names:
            v = adata[:, color].X
            v = (v.toarray() if sp.issparse(v) else np.asarray(v)).ravel().astype(float)
        else:
            raise ToolError(f"Unknown color key {color!r}.",
                            hint="Pass an obs column (e.g. the cell-type column) or a gene/marker name.")
        order = sel[np.argsort(v[sel], kind="stable")]
        sc = ax.scatter(xy[order, 0], xy[order, 1], s=s, c=v[order], cmap="viridis", linewidths=0)
        fig.colorbar(sc, ax=ax, shrink=0.7, label=color)
    ax.set_aspect("equal")
    ax.invert_yaxis()
    ax.set_xlabel(f"x ({unit})")
    ax.set_ylabel(f"y ({unit})")
    ax.set_title(title or (f"{color}" if color else "cells") + (f" ({len(sel)} of {n} shown)" if len(sel) < n else ""))
    fig.tight_layout()
    return _png(fig)


def heatmap(matrix: np.ndarray, categories: list[str], title: str = "neighbourhood enrichment (z-score)",
            label: str = "z-score", center: float = 0.0) -> bytes:
    """A k × k heatmap with a diverging colour scale centred on ``center``."""
    plt = _plt()
    k = len(categories)
    m = np.asarray(matrix, dtype=float)
    fin = m[np.isfinite(m)]
    lim = float(np.max(np.abs(fin - center))) if fin.size else 1.0
    fig, ax = plt.subplots(figsize=(max(5, 0.32 * k + 3), max(4.5, 0.32 * k + 2.5)))
    im = ax.imshow(m, cmap="RdBu_r", vmin=center - lim, vmax=center + lim)
    ax.set_xticks(range(k), categories, rotation=90, fontsize=7)
    ax.set_yticks(range(k), categories, fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.7, label=label)
    ax.set_title(title)
    fig.tight_layout()
    return _png(fig)


def cooccurrence_curves(occ: np.ndarray, interval: np.ndarray, categories: list[str], cluster: str,
                        units: str | None = None, max_lines: int = 12) -> bytes:
    """``occ[:, c, :]`` against distance for the reference type ``cluster`` (one line per partner type)."""
    if cluster not in categories:
        raise ToolError(f"Unknown reference type {cluster!r}.", hint=f"Known: {', '.join(categories[:40])}.")
    c = categories.index(cluster)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    d = np.asarray(interval)[1:]
    series = occ[:, c, :]
    order = np.argsort(-np.abs(np.log(np.clip(series[:, 0], 1e-9, None))))[:max_lines]
    pal = _palette(len(categories))
    for i in order:
        ax.plot(d, series[i], label=categories[i], color=pal[i], lw=1.4)
    ax.axhline(1.0, color="0.5", ls="--", lw=0.8)
    ax.set_xlabel(f"distance ({units or 'coordinate units'})")
    ax.set_ylabel(f"p(type | {cluster}) / p(type)")
    ax.set_title(f"co-occurrence with {cluster}")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    fig.tight_layout()
    return _png(fig)


def ripley_curve(radii: np.ndarray, observed: np.ndarray, lo: np.ndarray, hi: np.ndarray, mode: str,
                 units: str | None = None) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    if np.all(np.isfinite(lo)):
        ax.fill_between(radii, lo, hi, color="0.85", label="CSR envelope")
    ax.plot(radii, observed, color="C3", lw=1.6, label="observed")
    ax.set_xlabel(f"r ({units or 'coordinate units'})")
    ax.set_ylabel({"K": "K(r)", "L": "L(r) - r", "G": "G(r)"}[mode])
    ax.set_title(f"Ripley's {mode}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)
