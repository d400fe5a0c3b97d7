"""Agreement with squidpy's own functions on the shared scimap_example.h5ad (same settings → same numbers)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

sq = pytest.importorskip("squidpy")


@pytest.fixture(scope="module")
def scimap(shared_data):
    import anndata

    ad = anndata.read_h5ad(shared_data / "spatial" / "scimap_example.h5ad")
    ad.obsm["spatial"] = ad.obs[["X_position", "Y_position"]].to_numpy()
    ad.uns["spatial_units"] = "px"
    return ad


def _quiet():
    warnings.filterwarnings("ignore")


def test_graphs_identical_to_squidpy(scimap):
    from servers.spatial.graph import spatial_graph

    _quiet()
    for kw, ours in [({"n_neighs": 6}, {"method": "knn", "n_neighbors": 6}),
                     ({"radius": 40.0}, {"method": "radius", "radius": 40.0}),
                     ({"delaunay": True}, {"method": "delaunay"})]:
        a, b = scimap.copy(), scimap.copy()
        sq.gr.spatial_neighbors(a, coord_type="generic", **kw)
        spatial_graph(b, **ours)
        ca, cb = a.obsp["spatial_connectivities"], b.obsp["spatial_connectivities"]
        assert ca.nnz > 0 and (ca != cb).nnz == 0, kw
        assert abs(a.obsp["spatial_distances"] - b.obsp["spatial_distances"]).max() < 1e-9


def test_cooccurrence_identical_to_squidpy(scimap):
    from servers.spatial.cooccurrence import co_occurrence

    _quiet()
    occ, interval = sq.gr.co_occurrence(scimap, "phenotype", copy=True)
    res = co_occurrence(scimap, "phenotype")
    assert np.array_equal(res.interval, interval)
    assert res.occ.shape == occ.shape == (25, 25, 49)
    np.testing.assert_allclose(res.occ, occ, rtol=0, atol=1e-9)
    iv = np.array([0.0, 10.0, 25.0, 50.0, 100.0], dtype=np.float32)
    occ2, _ = sq.gr.co_occurrence(scimap, "phenotype", interval=iv, copy=True)
    np.testing.assert_allclose(co_occurrence(scimap, "phenotype", interval=iv).occ, occ2, rtol=0, atol=1e-9)


def test_nhood_enrichment_matches_squidpy(scimap):
    from servers.spatial.enrichment import nhood_enrichment
    from servers.spatial.graph import spatial_graph

    _quiet()
    a = scimap.copy()
    sq.gr.spatial_neighbors(a, coord_type="generic", n_neighs=6)
    z, count = sq.gr.nhood_enrichment(a, "phenotype", n_perms=150, seed=7, n_jobs=1, copy=True,
                                      show_progress_bar=False)
    b = scimap.copy()
    spatial_graph(b, "knn", 6)
    exact = nhood_enrichment(b, "phenotype", n_perms=150, seed=7, permutations="squidpy")
    assert np.array_equal(exact.count, count)
    assert np.array_equal(np.isnan(exact.zscore), np.isnan(z))
    np.testing.assert_allclose(exact.zscore, z, rtol=1e-12, atol=1e-12, equal_nan=True)
    fast = nhood_enrichment(b, "phenotype", n_perms=150, seed=7)
    ok = np.isfinite(z) & np.isfinite(fast.zscore) & (exact.perm_std > 1.0)
    # independent permutations: agreement within Monte-Carlo error (relative to the null's spread)
    assert np.corrcoef(fast.zscore[ok], z[ok])[0, 1] > 0.995
    assert np.median(np.abs(fast.zscore[ok] - z[ok])) < 0.15
    analytic = nhood_enrichment(b, "phenotype", permutations="analytic")
    # squidpy's permutation mean/std estimate the exact moments: agreement within Monte-Carlo error
    dm = np.abs(analytic.perm_mean - exact.perm_mean)[ok]
    assert np.all(dm <= 5 * exact.perm_std[ok] / np.sqrt(150))
    assert np.corrcoef(analytic.zscore[ok], z[ok])[0, 1] > 0.995


def test_autocorrelation_matches_squidpy(scimap):
    from servers.spatial.graph import spatial_graph
    from servers.spatial.stats import autocorrelation

    _quiet()
    a = scimap.copy()
    sq.gr.spatial_neighbors(a, coord_type="generic", n_neighs=6)
    genes = list(a.var_names[:6])
    b = scimap.copy()
    spatial_graph(b, "knn", 6)
    for mode, stat in (("moran", "I"), ("geary", "C")):
        ref = sq.gr.spatial_autocorr(a, mode=mode, genes=genes, n_perms=None, copy=True)
        ours = autocorrelation(b, genes, mode=mode)
        np.testing.assert_allclose(ours.loc[genes, stat], ref.loc[genes, stat], rtol=1e-6)
        np.testing.assert_allclose(ours.loc[genes, "var_norm"], ref.loc[genes, "var_norm"], rtol=1e-6)  # squidpy: float32 weights
        # squidpy computes 1 - cdf (0.0 below ~1e-16); we use the survival function, so compare absolutely
        np.testing.assert_allclose(ours.loc[genes, "pval_norm"], ref.loc[genes, "pval_norm"], rtol=1e-6, atol=1e-12)
