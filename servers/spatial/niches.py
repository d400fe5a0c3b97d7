"""Cellular neighbourhoods / niches: windowed cell-type composition + clustering (Schürch et al. 2020,
as in scimap's ``spatial_count`` + ``spatial_cluster``).

For every cell the window is its ``k`` nearest cells (itself included) or all cells within
``radius``; the window's type fractions form a k-type vector, and K-means on these vectors gives the
niches. Each niche is described by its mean composition and its enrichment over the tissue-wide
composition (log2 ratio).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from servers.common.errors import ToolError
from servers.spatial.core import SPATIAL_KEY, get_coords, get_labels

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from anndata import AnnData


@dataclass
class Niches:
    labels: np.ndarray  # (n,) niche index
    composition: np.ndarray  # (n, k) window fractions
    profiles: np.ndarray  # (n_niches, k) mean fractions per niche
    categories: list[str]
    sizes: np.ndarray

    def table(self) -> pd.DataFrame:
        import pandas as pd

        overall = self.composition.mean(axis=0)
        df = pd.DataFrame(self.profiles, columns=self.categories)
        df.index = [f"niche_{i}" for i in range(len(df))]
        df.insert(0, "n_cells", self.sizes)
        with np.errstate(divide="ignore"):
            top = [", ".join(f"{self.categories[j]} ({np.log2(p[j] / overall[j]):+.1f})"
                             for j in np.argsort(-(p / np.maximum(overall, 1e-12)))[:3] if p[j] > 0)
                   for p in self.profiles]
        df.insert(1, "enriched_types_log2", top)
        return df


def window_composition(coords: np.ndarray, codes: np.ndarray, n_types: int, k: int | None = 10,
                       radius: float | None = None) -> np.ndarray:
    """(n, n_types) fractions of types among each cell's k nearest cells (incl. itself) or within radius."""
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    n = len(coords)
    tree = cKDTree(coords)
    if radius is not None:
        if not radius > 0:
            raise ToolError(f"radius must be positive; got {radius}.")
        pairs = tree.query_pairs(float(radius), output_type="ndarray")
        rows = np.concatenate([pairs[:, 0], pairs[:, 1], np.arange(n)])
        cols = np.concatenate([pairs[:, 1], pairs[:, 0], np.arange(n)])
    else:
        kk = int(min(k or 10, n))
        if kk < 1:
            raise ToolError(f"k must be >= 1; got {k}.")
        _, idx = tree.query(coords, k=kk, workers=-1)
        idx = idx.reshape(n, kk)
        rows = np.repeat(np.arange(n), kk)
        cols = idx.ravel()
    onehot = sp.csr_matrix((np.ones(n), (np.arange(n), codes)), shape=(n, n_types))
    A = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    counts = np.asarray((A @ onehot).todense())
    return counts / counts.sum(axis=1, keepdims=True)


def cellular_neighborhoods(adata: AnnData, cluster_key: str, n_niches: int = 6, k: int | None = 10,
                           radius: float | None = None, seed: int = 0, key_added: str = "niche",
                           spatial_key: str = SPATIAL_KEY) -> Niches:
    """Niches from windowed composition + K-means; writes ``obs[key_added]`` and ``obsm['niche_composition']``.

    Args:
        adata: Dataset with coordinates and cell types.
        cluster_key: obs column with cell types.
        n_niches: Number of niches (K-means clusters).
        k: Window = k nearest cells (including the cell); ignored when ``radius`` is given.
        radius: Window = cells within this distance (coordinate units).
        seed: K-means seed.
        key_added: obs column for the niche label.
    """
    import pandas as pd
    from sklearn.cluster import KMeans

    xy = get_coords(adata, spatial_key)
    codes, cats = get_labels(adata, cluster_key, min_types=2)
    if not 2 <= n_niches <= adata.n_obs:
        raise ToolError(f"n_niches must be between 2 and the number of cells; got {n_niches}.")
    comp = window_composition(xy, codes, len(cats), k=k, radius=radius)
    lab = KMeans(n_clusters=int(n_niches), n_init=4, random_state=seed).fit_predict(comp)
    # order niches by size (largest = niche_0) for stable naming
    sizes = np.bincount(lab, minlength=n_niches)
    order = np.argsort(-sizes, kind="stable")
    remap = np.empty_like(order)
    remap[order] = np.arange(len(order))
    lab = remap[lab]
    sizes = np.bincount(lab, minlength=n_niches)
    prof = np.array([comp[lab == i].mean(axis=0) if sizes[i] else np.zeros(len(cats)) for i in range(n_niches)])
    adata.obs[key_added] = pd.Categorical([f"niche_{i}" for i in lab], categories=[f"niche_{i}" for i in range(n_niches)])
    adata.obsm["niche_composition"] = comp
    adata.uns["niches"] = {"cluster_key": cluster_key, "categories": cats, "k": k, "radius": radius,
                           "n_niches": int(n_niches)}
    return Niches(labels=lab, composition=comp, profiles=prof, categories=cats, sizes=sizes)
