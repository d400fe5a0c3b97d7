"""Spatial neighbour graphs (kNN, radius, Delaunay) as sparse matrices, compatible with squidpy.

The graph is stored like ``squidpy.gr.spatial_neighbors`` stores it: ``obsp['spatial_connectivities']``
(CSR, float32 ones), ``obsp['spatial_distances']`` (CSR, float64 Euclidean distances in the dataset's
coordinate units) and ``uns['spatial_neighbors']``. Definitions match squidpy's generic builders:
kNN is directed (each cell → its k nearest other cells), radius and Delaunay are symmetric, no
self-loops. Nothing dense: memory is O(edges), so 1M cells take seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from servers.common.errors import ToolError
from servers.spatial.core import SPATIAL_KEY, get_coords

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData
    from scipy.sparse import csr_matrix

METHODS = ("knn", "radius", "delaunay")
CONN_KEY = "spatial_connectivities"
DIST_KEY = "spatial_distances"


@dataclass
class GraphInfo:
    method: str
    n_cells: int
    n_edges: int
    mean_degree: float
    median_edge_length: float
    units: str | None
    params: dict

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def graph_arrays(coords: np.ndarray, method: str = "knn", n_neighbors: int = 6,
                 radius: float | None = None) -> tuple[csr_matrix, csr_matrix]:
    """(connectivities, distances) CSR matrices for coordinates (n, 2).

    Args:
        coords: Cell coordinates.
        method: ``knn`` (directed, k nearest other cells), ``radius`` (all pairs with distance
            <= radius) or ``delaunay`` (triangulation edges).
        n_neighbors: k for ``knn``.
        radius: Required for ``radius``; for ``knn``/``delaunay`` an optional maximum edge length
            (longer edges are dropped).
    """
    from scipy.sparse import csr_matrix
    from scipy.spatial import cKDTree

    xy = np.asarray(coords, dtype=np.float64)
    n = len(xy)
    if method not in METHODS:
        raise ToolError(f"Unknown graph method {method!r}.", hint=f"Use one of: {', '.join(METHODS)}.")
    if n < 2:
        raise ToolError(f"A spatial graph needs at least 2 cells; the dataset has {n}.")
    if radius is not None and not (np.isfinite(radius) and radius > 0):
        raise ToolError(f"radius must be a positive distance in coordinate units; got {radius!r}.")
    if method == "knn":
        k = int(n_neighbors)
        if k < 1 or k >= n:
            raise ToolError(f"n_neighbors must be between 1 and n_cells - 1 = {n - 1}; got {n_neighbors}.")
        tree = cKDTree(xy)
        d, idx = tree.query(xy, k=k + 1, workers=-1)
        is_self = idx == np.arange(n)[:, None]
        # drop the cell itself (or, if duplicates hid it, the farthest of the k + 1)
        no_self = ~is_self.any(axis=1)
        is_self[no_self, -1] = True
        keep = ~is_self
        rows = np.repeat(np.arange(n), k)
        cols = idx[keep]
        dists = d[keep]
    elif method == "radius":
        if radius is None:
            raise ToolError("method='radius' needs a radius.", hint="Pass radius in the dataset's coordinate units.")
        tree = cKDTree(xy)
        pairs = tree.query_pairs(float(radius), output_type="ndarray")
        rows = np.concatenate([pairs[:, 0], pairs[:, 1]])
        cols = np.concatenate([pairs[:, 1], pairs[:, 0]])
        dists = np.linalg.norm(xy[rows] - xy[cols], axis=1)
    else:
        from scipy.spatial import Delaunay

        if n < 3:
            raise ToolError("A Delaunay graph needs at least 3 cells.")
        try:
            tri = Delaunay(xy)
        except Exception as e:  # QhullError on degenerate (collinear) input
            raise ToolError(f"Delaunay triangulation failed ({type(e).__name__}); are all cells on one line?",
                            hint="Use method='knn' or 'radius' instead.") from None
        indptr, cols = tri.vertex_neighbor_vertices
        rows = np.repeat(np.arange(n), np.diff(indptr))
        dists = np.linalg.norm(xy[rows] - xy[cols], axis=1)
    if radius is not None and method != "radius":
        m = dists <= radius
        rows, cols, dists = rows[m], cols[m], dists[m]
    conn = csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n, n))
    dist = csr_matrix((dists.astype(np.float64), (rows, cols)), shape=(n, n))
    conn.sort_indices()
    dist.sort_indices()
    return conn, dist


def spatial_graph(adata: AnnData, method: str = "knn", n_neighbors: int = 6, radius: float | None = None,
                  spatial_key: str = SPATIAL_KEY) -> GraphInfo:
    """Build a spatial graph in place (``obsp['spatial_connectivities']`` / ``['spatial_distances']``).

    Args:
        adata: Dataset with coordinates in ``obsm[spatial_key]``.
        method: ``knn``, ``radius`` or ``delaunay``.
        n_neighbors: k for ``knn`` (squidpy's default is 6).
        radius: Radius for ``radius`` or maximum edge length for the others, in coordinate units.
        spatial_key: ``obsm`` key with coordinates.

    Returns:
        ``GraphInfo`` with edge count, mean degree and median edge length.
    """
    xy = get_coords(adata, spatial_key)
    conn, dist = graph_arrays(xy, method, n_neighbors, radius)
    adata.obsp[CONN_KEY] = conn
    adata.obsp[DIST_KEY] = dist
    params = {"method": method, "n_neighbors": int(n_neighbors) if method == "knn" else None,
              "radius": None if radius is None else float(radius)}
    adata.uns["spatial_neighbors"] = {"connectivities_key": CONN_KEY, "distances_key": DIST_KEY,
                                      "params": {k: v for k, v in params.items() if v is not None}}
    units = adata.uns.get("spatial_units")
    return GraphInfo(method=method, n_cells=int(adata.n_obs), n_edges=int(conn.nnz),
                     mean_degree=float(conn.nnz / max(1, adata.n_obs)),
                     median_edge_length=float(np.median(dist.data)) if dist.nnz else float("nan"),
                     units=str(units) if units is not None else None, params=params)


def get_graph(adata: AnnData, key: str = CONN_KEY) -> csr_matrix:
    """The stored connectivity matrix as CSR, or a ToolError telling how to build one."""
    from scipy.sparse import csr_matrix, issparse

    if key not in adata.obsp:
        raise ToolError(
            f"The dataset has no spatial graph (obsp[{key!r}]).",
            hint="Build one first with spatial_graph(method='knn'|'radius'|'delaunay').",
        )
    g = adata.obsp[key]
    return g.tocsr() if issparse(g) else csr_matrix(np.asarray(g))
