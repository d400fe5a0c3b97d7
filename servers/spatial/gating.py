"""Dataset summary, composition, marker gating / phenotyping, normalisation, PCA and clustering."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from servers.common.errors import ToolError
from servers.spatial.core import get_coords, get_labels

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from anndata import AnnData


def _dense(X) -> np.ndarray:
    import scipy.sparse as sp

    return X.toarray() if sp.issparse(X) else np.asarray(X)


def summarize(adata: AnnData, max_items: int = 30) -> dict[str, Any]:
    """Cells, genes/markers, coordinate extent and unit, obs columns with their categories, obsm/obsp keys."""
    import pandas as pd

    out: dict[str, Any] = {"n_cells": int(adata.n_obs), "n_vars": int(adata.n_vars),
                           "vars": [str(v) for v in adata.var_names[:max_items]],
                           "spatial_units": adata.uns.get("spatial_units"), "mpp": adata.uns.get("mpp")}
    if "spatial" in adata.obsm:
        xy = np.asarray(adata.obsm["spatial"], dtype=float)
        fin = np.isfinite(xy).all(axis=1)
        if fin.any():
            out["extent"] = {"x": [float(xy[fin, 0].min()), float(xy[fin, 0].max())],
                             "y": [float(xy[fin, 1].min()), float(xy[fin, 1].max())]}
        out["n_nan_coordinates"] = int((~fin).sum())
    cols = {}
    for c in adata.obs.columns:
        s = adata.obs[c]
        if isinstance(s.dtype, pd.CategoricalDtype) or s.dtype == object or s.nunique() <= 50:
            vc = s.astype(str).value_counts()
            cols[str(c)] = {"type": "categorical", "n_categories": int(len(vc)),
                            "top": {str(k): int(v) for k, v in vc.head(12).items()}}
        else:
            cols[str(c)] = {"type": "numeric", "mean": float(s.mean()), "min": float(s.min()), "max": float(s.max())}
    out["obs"] = cols
    out["obsm"] = list(adata.obsm.keys())
    out["obsp"] = list(adata.obsp.keys())
    out["layers"] = list(adata.layers.keys())
    return out


def composition(adata: AnnData, cluster_key: str, by: str | None = None) -> pd.DataFrame:
    """Counts and fractions of each cell type, overall or per ``by`` (sample / FOV / region / niche).

    Returns:
        Long DataFrame ``group, cell_type, n_cells, fraction`` (fractions sum to 1 within a group).
    """
    import pandas as pd

    codes, cats = get_labels(adata, cluster_key)
    if by is None:
        groups = np.full(adata.n_obs, "all", dtype=object)
    else:
        if by not in adata.obs:
            raise ToolError(f"Unknown grouping column {by!r}.", hint=f"obs columns: {', '.join(map(str, adata.obs.columns[:30]))}.")
        groups = adata.obs[by].astype(str).to_numpy()
    df = pd.DataFrame({"group": groups, "cell_type": np.asarray(cats)[codes]})
    t = df.groupby(["group", "cell_type"]).size().rename("n_cells").reset_index()
    t["fraction"] = t["n_cells"] / t.groupby("group")["n_cells"].transform("sum")
    return t.sort_values(["group", "n_cells"], ascending=[True, False]).reset_index(drop=True)


# -- gating --------------------------------------------------------------------------------------


def _marker_matrix(adata: AnnData, markers: list[str], layer: str | None = None) -> np.ndarray:
    missing = [m for m in markers if m not in adata.var_names and m not in adata.obs.columns]
    if missing:
        raise ToolError(f"Unknown marker(s): {missing}.", hint=f"Markers: {', '.join(map(str, adata.var_names[:40]))}.")
    cols = []
    for m in markers:
        if m in adata.var_names:
            x = adata[:, m].X if layer is None else adata[:, m].layers[layer]
            cols.append(_dense(x).ravel().astype(np.float64))
        else:
            cols.append(adata.obs[m].to_numpy(dtype=np.float64))
    return np.column_stack(cols) if cols else np.zeros((adata.n_obs, 0))


def auto_thresholds(adata: AnnData, markers: list[str], method: str = "otsu", layer: str | None = None) -> dict[str, float]:
    """Per-marker positivity thresholds: Otsu on the marker's values (``otsu``) or its median (``median``)."""
    X = _marker_matrix(adata, markers, layer)
    out = {}
    for i, m in enumerate(markers):
        v = X[:, i]
        v = v[np.isfinite(v)]
        if method == "otsu":
            from skimage.filters import threshold_otsu

            out[m] = float(threshold_otsu(v)) if len(np.unique(v)) > 1 else float(v[0])
        elif method == "median":
            out[m] = float(np.median(v))
        else:
            raise ToolError(f"Unknown threshold method {method!r}.", hint="Use 'otsu' or 'median', or pass thresholds.")
    return out


def gate(adata: AnnData, rules: list[dict[str, Any]], thresholds: dict[str, float] | None = None,
         method: str = "otsu", key_added: str = "phenotype", unknown: str = "Unknown",
         layer: str | None = None) -> pd.DataFrame:
    """Assign phenotypes by marker gating (first matching rule wins, like a gating tree).

    Args:
        adata: Dataset with markers in ``X`` (or obs columns).
        rules: Ordered list of ``{"name": "CD8 T", "positive": ["CD3D", "CD8A"], "negative": ["CD4"]}``.
            A cell matches when every positive marker is > its threshold and every negative one <=.
        thresholds: ``{marker: value}``; markers without one get an automatic threshold (``method``).
        method: ``otsu`` or ``median`` for automatic thresholds.
        key_added: obs column for the phenotype (categorical).
        unknown: Label of cells matching no rule.
        layer: Optional layer instead of ``X``.

    Returns:
        Counts per phenotype (``phenotype, n_cells, fraction``); thresholds used go to ``uns['gating']``.
    """
    import pandas as pd

    if not rules:
        raise ToolError("No gating rules given.", hint='Pass e.g. [{"name": "T cells", "positive": ["CD3D"]}].')
    markers: list[str] = []
    for r in rules:
        if not isinstance(r, dict) or "name" not in r:
            raise ToolError(f"Bad gating rule {r!r}.", hint='Each rule needs "name" and "positive"/"negative" lists.')
        bad_keys = set(r) - {"name", "positive", "negative"}
        if bad_keys:
            raise ToolError(f"Gating rule {r['name']!r} has unknown keys {sorted(bad_keys)}.",
                            hint="Use only name, positive, negative.")
        for m in list(r.get("positive", [])) + list(r.get("negative", [])):
            if m not in markers:
                markers.append(m)
    th = dict(thresholds or {})
    need = [m for m in markers if m not in th]
    if need:
        th.update(auto_thresholds(adata, need, method, layer))
    X = _marker_matrix(adata, markers, layer)
    pos = X > np.array([th[m] for m in markers])
    col = {m: i for i, m in enumerate(markers)}
    label = np.full(adata.n_obs, unknown, dtype=object)
    assigned = np.zeros(adata.n_obs, bool)
    for r in rules:
        ok = ~assigned
        for m in r.get("positive", []):
            ok &= pos[:, col[m]]
        for m in r.get("negative", []):
            ok &= ~pos[:, col[m]]
        label[ok] = str(r["name"])
        assigned |= ok
    cats = [str(r["name"]) for r in rules] + [unknown]
    adata.obs[key_added] = pd.Categorical(label, categories=list(dict.fromkeys(cats)))
    adata.uns["gating"] = {"thresholds": {k: float(v) for k, v in th.items()}, "rules": rules, "key": key_added}
    vc = adata.obs[key_added].value_counts()
    return pd.DataFrame({"phenotype": vc.index.astype(str), "n_cells": vc.to_numpy(),
                         "fraction": vc.to_numpy() / adata.n_obs})


# -- normalisation, PCA, clustering --------------------------------------------------------------


def normalize(adata: AnnData, method: str = "log1p", target_sum: float = 1e4) -> None:
    """Normalise ``X`` in place (raw values kept in ``layers['raw']``).

    ``log1p``: counts scaled to ``target_sum`` per cell, then log1p (for transcript counts);
    ``arcsinh``: arcsinh(x / 5) (cytometry / multiplexed imaging intensities);
    ``zscore``: per-marker standardisation.
    """
    import scipy.sparse as sp

    X = adata.X
    if "raw" not in adata.layers:
        adata.layers["raw"] = X.copy()
    if method == "log1p":
        Xd = sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.asarray(X, dtype=np.float32)
        tot = np.asarray(Xd.sum(axis=1)).ravel()
        scale = np.where(tot > 0, target_sum / np.maximum(tot, 1e-12), 0.0).astype(np.float32)
        if sp.issparse(Xd):
            Xd = sp.diags(scale) @ Xd
            Xd.data = np.log1p(Xd.data)
            adata.X = sp.csr_matrix(Xd)
        else:
            adata.X = np.log1p(Xd * scale[:, None])
    elif method == "arcsinh":
        adata.X = np.arcsinh(_dense(X).astype(np.float32) / 5.0)
    elif method == "zscore":
        D = _dense(X).astype(np.float64)
        sd = D.std(axis=0)
        adata.X = ((D - D.mean(axis=0)) / np.where(sd > 0, sd, 1.0)).astype(np.float32)
    else:
        raise ToolError(f"Unknown normalisation {method!r}.", hint="Use 'log1p', 'arcsinh' or 'zscore'.")
    adata.uns["normalization"] = {"method": method, "target_sum": target_sum if method == "log1p" else None}


def pca(adata: AnnData, n_comps: int = 20, seed: int = 0) -> np.ndarray:
    """PCA of ``X`` into ``obsm['X_pca']`` (sklearn; centred). Returns explained variance ratios."""
    from sklearn.decomposition import PCA

    n_comps = int(min(n_comps, adata.n_vars, adata.n_obs - 1))
    if n_comps < 1:
        raise ToolError("PCA needs at least 2 cells and 1 gene/marker.")
    p = PCA(n_components=n_comps, random_state=seed)
    adata.obsm["X_pca"] = p.fit_transform(_dense(adata.X).astype(np.float32))
    adata.uns["pca"] = {"variance_ratio": p.explained_variance_ratio_.tolist()}
    return p.explained_variance_ratio_


def cluster(adata: AnnData, n_clusters: int = 8, use_rep: str = "X_pca", method: str = "kmeans",
            key_added: str = "cluster", seed: int = 0, resolution: float = 1.0,
            n_neighbors: int = 15) -> pd.DataFrame:
    """Cluster cells on ``obsm[use_rep]`` (or ``X``): ``kmeans`` (sklearn, ``n_clusters``) or ``leiden``
    (scanpy's kNN graph with ``n_neighbors`` + ``sc.tl.leiden`` igraph flavour at ``resolution``;
    needs leidenalg + igraph; the number of clusters follows from the resolution — higher, more).

    Returns counts per cluster; labels in ``obs[key_added]`` (categorical, '0', '1', …).
    """
    import pandas as pd

    rep = adata.obsm[use_rep] if use_rep in adata.obsm else (_dense(adata.X) if use_rep == "X" else None)
    if rep is None:
        raise ToolError(f"No representation {use_rep!r}.", hint="Run pca first or pass use_rep='X'.")
    if method == "kmeans":
        from sklearn.cluster import KMeans

        if not 1 <= n_clusters <= adata.n_obs:
            raise ToolError(f"n_clusters must be between 1 and {adata.n_obs}; got {n_clusters}.")
        lab = KMeans(n_clusters=int(n_clusters), n_init=4, random_state=seed).fit_predict(np.asarray(rep, np.float64))
    elif method == "leiden":
        try:
            import scanpy as sc

            if not resolution > 0 or int(n_neighbors) < 2:
                raise ToolError(f"Leiden needs resolution > 0 and n_neighbors >= 2; got {resolution}, {n_neighbors}.")
            sc.pp.neighbors(adata, n_neighbors=int(min(n_neighbors, adata.n_obs - 1)),
                            use_rep=use_rep if use_rep != "X" else None, random_state=seed)
            sc.tl.leiden(adata, key_added=key_added, random_state=seed, flavor="igraph", n_iterations=2,
                         resolution=float(resolution))
            lab = adata.obs[key_added].astype(int).to_numpy()
        except ImportError as e:
            raise ToolError(f"Leiden clustering is unavailable here ({e}).",
                            hint="Install the spatial extra's leidenalg + igraph, or use method='kmeans'.") from None
    else:
        raise ToolError(f"Unknown clustering method {method!r}.", hint="Use 'kmeans' or 'leiden'.")
    cats = [str(c) for c in sorted(set(int(x) for x in lab))]
    adata.obs[key_added] = pd.Categorical([str(int(x)) for x in lab], categories=cats)
    vc = adata.obs[key_added].value_counts().sort_index()
    return pd.DataFrame({"cluster": vc.index.astype(str), "n_cells": vc.to_numpy()})


def filter_cells(adata: AnnData, drop_nan_coords: bool = True, min_counts: float | None = None,
                 cell_types: list[str] | None = None, cluster_key: str | None = None) -> AnnData:
    """A copy without cells with NaN coordinates / fewer than ``min_counts`` / not in ``cell_types``."""
    keep = np.ones(adata.n_obs, bool)
    if drop_nan_coords and "spatial" in adata.obsm:
        keep &= np.isfinite(np.asarray(adata.obsm["spatial"], float)).all(axis=1)
    if min_counts is not None:
        keep &= np.asarray(adata.X.sum(axis=1)).ravel() >= min_counts
    if cell_types is not None:
        if cluster_key is None:
            raise ToolError("cell_types needs cluster_key.")
        codes, cats = get_labels(adata, cluster_key)
        keep &= np.isin(np.asarray(cats)[codes], [str(c) for c in cell_types])
    if not keep.any():
        raise ToolError("The filter removes every cell.", hint="Relax the filter.")
    out = adata[keep].copy()
    if "spatial" in out.obsm:
        get_coords(out)  # validates
    return out
