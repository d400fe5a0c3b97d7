"""Per-group summaries of cell measurements: mean / median / std / … of obs columns or markers per cell type."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from servers.common.errors import ToolError
from servers.spatial.core import get_labels

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from anndata import AnnData

STATS = ("mean", "median", "std", "min", "max", "sum", "count")


def _values(adata: AnnData, name: str, layer: str | None) -> np.ndarray:
    """Numeric values of obs column ``name`` or, failing that, gene/marker ``name`` (a column of X / layer)."""
    import pandas as pd
    import scipy.sparse as sp

    if name in adata.obs.columns:
        col = adata.obs[name]
        if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
            raise ToolError(f"obs column {name!r} is not numeric ({col.dtype}); it cannot be averaged.",
                            hint="Use it as the group column instead, or pick a numeric column.")
        return col.to_numpy(dtype=np.float64)
    if name in adata.var_names:
        if layer is not None and layer not in adata.layers:
            raise ToolError(f"Unknown layer {layer!r}.", hint=f"Layers: {', '.join(adata.layers) or 'none'}; "
                                                              "or pass layer=None for X.")
        X = adata.X if layer is None else adata.layers[layer]
        j = adata.var_names.get_loc(name)
        v = X[:, j]
        v = v.toarray() if sp.issparse(v) else np.asarray(v)
        return v.ravel().astype(np.float64)
    num = [c for c in adata.obs.columns if pd.api.types.is_numeric_dtype(adata.obs[c])
           and not pd.api.types.is_bool_dtype(adata.obs[c])]
    raise ToolError(f"{name!r} is neither an obs column nor a gene/marker of the dataset.",
                    hint=f"Numeric obs columns: {', '.join(map(str, num[:30])) or 'none'}; "
                         f"markers (first 30): {', '.join(map(str, adata.var_names[:30])) or 'none'}.")


def group_statistics(adata: AnnData, group_key: str, columns: list[str] | str,
                     stats: list[str] | str = ("mean", "median", "std", "count"), *, layer: str | None = None,
                     sort: str = "size", top: int | None = None) -> pd.DataFrame:
    """Summary statistics of numeric obs columns and/or genes/markers per group (cell type, FOV, niche…).

    Args:
        adata: Dataset.
        group_key: obs column defining the groups.
        columns: obs columns (e.g. ``Area``) and/or gene/marker names (values from ``X`` or ``layer``).
        stats: Any of ``mean, median, std`` (sample std, ddof=1), ``min, max, sum, count`` (non-NaN
            values); NaNs are skipped.
        layer: Layer for gene/marker values instead of ``X``.
        sort: ``size`` (largest group first, ties by name) or ``name``.
        top: Keep only the first ``top`` groups after sorting (``top=3`` + ``sort='size'``: the three
            most frequent groups).

    Returns:
        One row per group: ``group_key``, ``n_cells``, ``fraction`` (of all cells) and
        ``<column>_<stat>`` for each column and statistic.
    """
    import pandas as pd

    columns = [columns] if isinstance(columns, str) else list(columns)
    stats = [stats] if isinstance(stats, str) else list(stats)
    if not columns:
        raise ToolError("No columns to summarise.", hint="Pass obs columns (e.g. 'Area') or marker names.")
    bad = [s for s in stats if s not in STATS]
    if bad or not stats:
        raise ToolError(f"Unknown statistic(s) {bad or stats}.", hint=f"Use any of: {', '.join(STATS)}.")
    if sort not in ("size", "name"):
        raise ToolError(f"Unknown sort {sort!r}.", hint="Use 'size' (largest group first) or 'name'.")
    if top is not None and int(top) < 1:
        raise ToolError(f"top must be >= 1; got {top}.")
    codes, cats = get_labels(adata, group_key)
    data = pd.DataFrame({c: _values(adata, c, layer) for c in dict.fromkeys(columns)})
    g = data.groupby(codes, sort=True)
    agg = g.agg(stats)
    agg.columns = [f"{c}_{s}" for c, s in agg.columns]
    n = np.bincount(codes, minlength=len(cats))
    out = pd.DataFrame({group_key: cats, "n_cells": n, "fraction": n / n.sum()})
    out = pd.concat([out, agg.reindex(range(len(cats))).reset_index(drop=True)], axis=1)
    for c in out.columns:
        if c.endswith("_count"):
            out[c] = out[c].fillna(0).astype(np.int64)
    out = out[out["n_cells"] > 0]
    if sort == "size":
        out = out.sort_values(["n_cells", group_key], ascending=[False, True], kind="stable")
    if top is not None:
        out = out.head(int(top))
    return out.reset_index(drop=True)
