"""Shared helpers: validated coordinates, cell-type codes, units, dataset artifacts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from servers.common.errors import ToolError

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

SPATIAL_KEY = "spatial"
UNITS = ("um", "px")


def get_coords(adata: AnnData, spatial_key: str = SPATIAL_KEY) -> np.ndarray:
    """``adata.obsm[spatial_key]`` as a finite float64 (n, 2) array, or a ToolError naming the problem."""
    if spatial_key not in adata.obsm:
        raise ToolError(
            f"The dataset has no coordinates in obsm[{spatial_key!r}] (obsm keys: {list(adata.obsm.keys()) or 'none'}).",
            hint="Load it with load_dataset and name the x/y columns (x_col, y_col) so coordinates are stored.",
        )
    xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        raise ToolError(f"obsm[{spatial_key!r}] must be an (n_cells, 2) array; got shape {xy.shape}.")
    xy = xy[:, :2]
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        raise ToolError(
            f"{int(bad.sum())} of {len(xy)} cells have NaN/infinite coordinates (first: row {int(np.argmax(bad))}).",
            hint="Drop those cells first (filter_cells / dropna on the x/y columns) or fix the coordinate columns.",
        )
    if len(xy) == 0:
        raise ToolError("The dataset has no cells.", hint="Load a non-empty table.")
    return xy


def get_labels(adata: AnnData, key: str, *, min_types: int = 1) -> tuple[np.ndarray, list[str]]:
    """Integer codes (int32, 0..k-1, category order) and category names of ``adata.obs[key]``."""
    import pandas as pd

    if key not in adata.obs.columns:
        cats = [c for c in adata.obs.columns if not pd.api.types.is_float_dtype(adata.obs[c])][:30]
        raise ToolError(
            f"Unknown cell-type key {key!r}.",
            hint=f"Pass one of the categorical obs columns: {', '.join(map(str, cats)) or '(none)'}.",
        )
    col = adata.obs[key]
    if col.isna().any():
        raise ToolError(
            f"obs[{key!r}] has {int(col.isna().sum())} missing values.",
            hint="Fill or drop cells without a label before this analysis.",
        )
    if not isinstance(col.dtype, pd.CategoricalDtype):
        col = col.astype(str).astype("category")
    col = col.cat.remove_unused_categories()
    cats = [str(c) for c in col.cat.categories]
    if len(cats) < min_types:
        raise ToolError(
            f"obs[{key!r}] has {len(cats)} cell type(s) ({', '.join(cats) or 'none'}); this analysis needs at least {min_types}.",
            hint="Pass a key with several categories, or analyse a dataset containing more than one type.",
        )
    return col.cat.codes.to_numpy().astype(np.int32), cats


def spatial_units(adata: AnnData) -> str:
    """``'um'`` or ``'px'`` from ``adata.uns['spatial_units']`` (error if missing or unknown)."""
    u = str(adata.uns.get("spatial_units", "")).lower().replace("µ", "u")
    if u in ("um", "micron", "microns", "micrometer", "micrometers"):
        return "um"
    if u in ("px", "pixel", "pixels"):
        return "px"
    raise ToolError(
        f"The coordinate unit is not stated (uns['spatial_units']={adata.uns.get('spatial_units')!r}).",
        hint="Set it with set_units / load_dataset(units='um' or 'px', mpp=...) — units are never guessed.",
    )


def um_per_unit(adata: AnnData) -> float | None:
    """Microns per coordinate unit: 1.0 for µm, ``mpp`` for pixels when known, else None."""
    u = spatial_units(adata)
    if u == "um":
        return 1.0
    mpp = adata.uns.get("mpp")
    return float(mpp) if mpp is not None and float(mpp) > 0 else None


def coords_um(adata: AnnData, spatial_key: str = SPATIAL_KEY) -> np.ndarray:
    """Coordinates in µm; ToolError when they are pixels of unknown size."""
    f = um_per_unit(adata)
    if f is None:
        raise ToolError(
            "Coordinates are in pixels and the pixel size (uns['mpp']) is unknown, so µm cannot be computed.",
            hint="Reload with mpp=<microns per pixel> or pass distances in pixels.",
        )
    return get_coords(adata, spatial_key) * f


def set_units(adata: AnnData, units: str, mpp: float | None = None) -> None:
    """State the coordinate unit (and pixel size) in ``adata.uns``."""
    u = str(units).lower().replace("µ", "u")
    if u not in UNITS:
        raise ToolError(f"Unknown coordinate unit {units!r}.", hint="Pass units='um' (microns) or 'px' (pixels).")
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise ToolError(f"mpp must be a positive number of microns per pixel; got {mpp!r}.")
    if u == "um" and mpp is not None:
        pass  # coordinates already in µm; mpp only describes the source image
    adata.uns["spatial_units"] = u
    if mpp is not None:
        adata.uns["mpp"] = float(mpp)


# -- dataset artifacts --------------------------------------------------------------------------


def load_dataset(ref: str) -> AnnData:
    """An AnnData from a workspace artifact id / workspace path, or a data-root-relative ``.h5ad``."""
    import anndata

    from servers.common.paths import resolve_data_path
    from servers.common.workspace import get_workspace

    ws = get_workspace()
    if ws.exists(ref):
        art = ws.get(ref)
        if art.kind != "anndata":
            raise ToolError(
                f"Artifact {ref!r} is a {art.kind}, not a dataset.",
                hint="Pass the id returned by load_dataset (kind 'anndata').",
            )
        return anndata.read_h5ad(ws.abspath(art))
    if not str(ref).endswith(".h5ad"):
        raise ToolError(
            f"{ref!r} is neither a dataset artifact id nor an .h5ad file.",
            hint="Call load_dataset first and pass the artifact id it returns (list_artifacts kind='anndata').",
        )
    try:
        p = ws.resolve(ref)
    except ToolError:
        p = resolve_data_path(ref)
    return anndata.read_h5ad(p)


def save_dataset(adata: AnnData, *, name: str, tool: str, args: dict[str, Any] | None = None,
                 meta: dict[str, Any] | None = None):
    """Write ``adata`` as a new workspace artifact (kind ``anndata``) and return it."""
    from servers.common.workspace import get_workspace

    _h5ad_safe(adata)
    m = {"spatial_units": adata.uns.get("spatial_units"), "n_cells": int(adata.n_obs), "n_vars": int(adata.n_vars)}
    m.update(meta or {})
    return get_workspace().save_anndata(adata, name=name, provenance={"tool": tool, "args": args or {}}, meta=m)


def _uns_safe(d: dict) -> dict:
    """uns values HDF5 can store: None dropped, lists of dicts / mixed lists as JSON text."""
    import json

    out = {}
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, dict):
            out[str(k)] = _uns_safe(v)
        elif isinstance(v, list | tuple) and any(isinstance(x, dict | list | tuple) or x is None for x in v):
            out[str(k)] = json.dumps(v, default=str)
        else:
            out[str(k)] = v
    return out


def _h5ad_safe(adata: AnnData) -> None:
    """Make obs/var columns and uns writable: object columns become strings, awkward uns values JSON."""
    import pandas as pd

    adata.uns = _uns_safe(dict(adata.uns))
    for df in (adata.obs, adata.var):
        for c in df.columns:
            if df[c].dtype == object:
                df[c] = df[c].astype(str)
            elif isinstance(df[c].dtype, pd.CategoricalDtype) and df[c].cat.categories.dtype == object:
                df[c] = df[c].cat.rename_categories([str(x) for x in df[c].cat.categories])


def njit_cached(**options):
    """``numba.njit(cache=True, **options)`` that falls back to no caching where the package folder and
    the user cache are read-only (e.g. inside the sandbox)."""
    from numba import njit

    def deco(fn):
        try:
            return njit(cache=True, **options)(fn)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return njit(cache=False, **options)(fn)

    return deco
