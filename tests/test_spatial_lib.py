"""Spatial library on synthetic data with exact ground truth (no MCP)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from servers.common.errors import ToolError
from servers.common.synthetic import cell_table


def _adata(df: pd.DataFrame, units: str = "um"):
    from servers.spatial.io import table_to_anndata

    return table_to_anndata(df, x_col="x", y_col="y", units=units, cell_type_col="cell_type", sample_col="sample",
                            id_col="cell_id")


# -- co-occurrence ---------------------------------------------------------------------------------


def _brute_cooc(xy, codes, k, interval):
    """Reference: squidpy's definition written out with float32 pairwise arithmetic."""
    x = xy.astype(np.float32)
    dx = x[:, None, 0] - x[None, :, 0]
    dy = x[:, None, 1] - x[None, :, 1]
    d2 = (dx * dx + dy * dy).astype(np.float32)
    np.fill_diagonal(d2, np.inf)
    t2 = (interval[1:].astype(np.float32) ** 2).astype(np.float32)
    L = len(t2)
    N = np.zeros((k, k, L))
    for r in range(L):
        m = d2 <= t2[r]
        for a in range(k):
            for b in range(k):
                N[a, b, r] = m[np.ix_(codes == a, codes == b)].sum()
    S = N.sum(axis=0)
    P = S / S.sum(axis=0)
    occ = np.zeros_like(N)
    for r in range(L):
        for c in range(k):
            for i in range(k):
                if P[i, r] != 0 and S[c, r] != 0:
                    occ[i, c, r] = (N[c, i, r] / S[c, r]) / P[i, r]
    return occ, N


def test_cooccurrence_matches_bruteforce_definition():
    from servers.spatial.cooccurrence import co_occurrence

    df = cell_table(700, pattern="clustered", types=("A", "B", "C"), seed=3)
    df["cell_type"] = pd.Categorical(np.random.default_rng(0).choice(["A", "B", "C"], len(df)))
    ad = _adata(df)
    res = co_occurrence(ad, "cell_type", interval=12)
    codes = ad.obs["cell_type"].cat.codes.to_numpy()
    ref, N = _brute_cooc(ad.obsm["spatial"], codes, 3, res.interval)
    assert np.array_equal(res.counts, N.astype(np.int64))
    np.testing.assert_allclose(res.occ, ref, rtol=0, atol=1e-12)
    # explicit distances, including duplicates of coordinates (distance 0 pairs count, i == j never)
    ad2 = ad[:50].copy()
    ad2.obsm["spatial"][1] = ad2.obsm["spatial"][0]
    res2 = co_occurrence(ad2, "cell_type", interval=[0.0, 1e-9, 50.0, 200.0])
    _, N2 = _brute_cooc(ad2.obsm["spatial"], ad2.obs["cell_type"].cat.codes.to_numpy(), 3, res2.interval)
    assert np.array_equal(res2.counts, N2.astype(np.int64))
    assert res2.counts[:, :, 0].sum() == 2  # the coincident pair, both orders


def test_cooccurrence_segregated_vs_mixed():
    from servers.spatial.cooccurrence import co_occurrence

    seg = co_occurrence(_adata(cell_table(1500, pattern="segregated", seed=1)), "cell_type",
                        interval=np.array([0, 30.0, 60.0]))
    mix = co_occurrence(_adata(cell_table(1600, pattern="mixed", seed=1)), "cell_type",
                        interval=np.array([0, 30.0, 60.0]))
    # segregated halves: A near A more than overall (ratio ~2), B rare near A
    assert seg.occ[0, 0, 0] > 1.7 and seg.occ[1, 0, 0] < 0.3
    # alternating lattice (spacing 25 µm): within 30 µm every neighbour of A is B
    assert mix.occ[1, 0, 0] > 1.5 and mix.occ[0, 0, 0] < 0.5


# -- graph & enrichment ----------------------------------------------------------------------------


def test_graphs_match_bruteforce():
    from scipy.spatial.distance import cdist

    from servers.spatial.graph import graph_arrays

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (300, 2))
    D = cdist(xy, xy)
    np.fill_diagonal(D, np.inf)
    conn, dist = graph_arrays(xy, "knn", 5)
    ref = np.argsort(D, axis=1)[:, :5]
    for i in range(300):
        assert set(conn[i].indices) == set(ref[i])
    np.testing.assert_allclose(np.sort(dist[7].data), np.sort(D[7, ref[7]]))
    conn, _ = graph_arrays(xy, "radius", radius=12.0)
    assert np.array_equal(conn.toarray() > 0, D <= 12.0)
    conn, _ = graph_arrays(xy, "delaunay")
    assert (conn != conn.T).nnz == 0 and conn.diagonal().sum() == 0
    assert conn.nnz == 2 * (3 * 300 - 3 - _hull_size(xy))  # Euler: E = 3n - 3 - h


def _hull_size(xy):
    from scipy.spatial import ConvexHull

    return len(ConvexHull(xy).vertices)


def test_enrichment_signs_and_counts():
    from servers.spatial.enrichment import nhood_enrichment
    from servers.spatial.graph import spatial_graph

    seg = _adata(cell_table(2000, pattern="segregated", seed=2))
    spatial_graph(seg, "knn", 6)
    r = nhood_enrichment(seg, "cell_type", n_perms=200, seed=0)
    assert r.zscore[0, 0] > 10 and r.zscore[1, 1] > 10 and r.zscore[0, 1] < -10
    # observed counts = directed edges by type pair
    g = seg.obsp["spatial_connectivities"].tocoo()
    c = seg.obs["cell_type"].cat.codes.to_numpy()
    ref = np.zeros((2, 2), int)
    np.add.at(ref, (c[g.row], c[g.col]), 1)
    assert np.array_equal(r.count, ref)
    mix = _adata(cell_table(1600, pattern="mixed", seed=2))
    spatial_graph(mix, "knn", 4)
    r = nhood_enrichment(mix, "cell_type", n_perms=200, seed=0)
    assert r.zscore[0, 1] > 10 and r.zscore[0, 0] < -10
    rnd = _adata(cell_table(3000, pattern="random", seed=5))
    spatial_graph(rnd, "knn", 6)
    r = nhood_enrichment(rnd, "cell_type", n_perms=300, seed=0)
    assert np.all(np.abs(r.zscore) < 4)


def test_enrichment_refuses_huge_n_perms_before_allocating():
    """A huge n_perms is a clear ToolError with the largest allowed value, not a MemoryError."""
    from servers.spatial.enrichment import MAX_PERM_VALUES, nhood_enrichment
    from servers.spatial.graph import spatial_graph

    ad = _adata(cell_table(300, pattern="random", seed=1))
    spatial_graph(ad, "knn", 4)
    k = ad.obs["cell_type"].nunique()
    with pytest.raises(ToolError, match="n_perms=1,000,000,000") as e:
        nhood_enrichment(ad, "cell_type", n_perms=10**9)
    assert f"n_perms <= {MAX_PERM_VALUES // (k * k):,}" in str(e.value) and "analytic" in str(e.value)
    # the analytic mode ignores n_perms, so it is not refused
    assert nhood_enrichment(ad, "cell_type", n_perms=10**9, permutations="analytic").zscore.shape == (k, k)


def test_enrichment_fast_vs_exact_permutations_and_libraries():
    from servers.spatial.enrichment import nhood_enrichment
    from servers.spatial.graph import spatial_graph

    ad = _adata(cell_table(1500, pattern="random", types=("A", "B", "C"), seed=9, samples=2))
    ad.obs["cell_type"] = pd.Categorical(np.where(ad.obsm["spatial"][:, 0] < 300, "A",
                                                  ad.obs["cell_type"].astype(str)))
    spatial_graph(ad, "knn", 6)
    fast = nhood_enrichment(ad, "cell_type", n_perms=400, seed=1)
    ex = nhood_enrichment(ad, "cell_type", n_perms=400, seed=1, permutations="squidpy")
    assert np.array_equal(fast.count, ex.count)
    # same null distribution: means agree within Monte-Carlo error
    se = ex.perm_std / np.sqrt(400)
    assert np.all(np.abs(fast.perm_mean - ex.perm_mean) < 5 * se + 1e-9)
    lib = nhood_enrichment(ad, "cell_type", n_perms=100, seed=1, library_key="sample")
    assert lib.zscore.shape == (3, 3) and np.isfinite(lib.zscore).all()
    again = nhood_enrichment(ad, "cell_type", n_perms=100, seed=1, library_key="sample")
    assert np.array_equal(lib.zscore, again.zscore)  # reproducible for a seed


# -- statistics ------------------------------------------------------------------------------------


def test_ripley_csr_and_clustered():
    from servers.spatial.stats import ripley_arrays

    rng = np.random.default_rng(4)
    csr = rng.uniform(0, 1000, (800, 2))
    r = ripley_arrays(csr, "L", n_simulations=39, seed=1)
    outside = (r.observed > r.envelope_high) | (r.observed < r.envelope_low)
    assert outside.mean() <= 0.1
    assert np.abs(r.observed[1:] - r.csr_mean[1:]).max() < 8.0
    cl = cell_table(800, pattern="clustered", seed=4)
    r2 = ripley_arrays(cl[["x", "y"]].to_numpy(), "L", n_simulations=19, seed=1)
    assert (r2.observed[1:] > r2.envelope_high[1:]).mean() > 0.9
    k = ripley_arrays(csr, "K", radii=np.array([50.0]), n_simulations=0)
    assert abs(k.observed[0] / (np.pi * 50**2) - 1) < 0.15
    g = ripley_arrays(cell_table(400, pattern="lattice")[["x", "y"]].to_numpy(), "G", radii=np.array([49.0, 51.0]),
                      n_simulations=0)
    assert g.observed.tolist() == [0.0, 1.0]  # lattice spacing 50 µm: every NN distance is exactly 50


def test_nn_distances_lattice_exact():
    from servers.spatial.stats import nn_distances

    df = cell_table(400, pattern="mixed", seed=0)
    df[["x", "y"]] = np.round((df[["x", "y"]].to_numpy() - 25.0) / 50.0) * 50.0 + 25.0  # exact lattice, spacing 50
    t = nn_distances(_adata(df), "cell_type").set_index(["source", "target"])
    assert t.loc[("A", "B"), "mean"] == pytest.approx(50.0) and t.loc[("A", "B"), "p90"] == pytest.approx(50.0)
    assert t.loc[("A", "A"), "median"] == pytest.approx(50.0 * np.sqrt(2))


def test_density_and_distance_to_region():
    from servers.spatial.stats import density, distance_to_polygon, distance_to_types

    df = cell_table(400, pattern="lattice", extent_um=1000.0)
    ad = _adata(df)
    d = density(ad, "cell_type", region="bbox").set_index("cell_type")
    assert d.loc["all", "area_mm2"] == pytest.approx(0.95 * 0.95)
    assert d.loc["all", "cells_per_mm2"] == pytest.approx(400 / 0.9025)
    assert d.loc["A", "n_cells"] + d.loc["B", "n_cells"] == 400
    given = density(ad, area_mm2=1.0)
    assert given.loc[0, "cells_per_mm2"] == 400
    for bad in (-1.0, 0.0, float("nan")):
        with pytest.raises(ToolError, match="area_mm2 must be a positive area"):
            density(ad, area_mm2=bad)
    px = _adata(df, units="px")
    with pytest.raises(ToolError, match="pixels of unknown size"):
        density(px)
    px.uns["mpp"] = 0.5
    assert density(px, region="bbox").loc[0, "area_mm2"] == pytest.approx(0.9025 / 4)
    sq = [[0, 0], [500, 0], [500, 1000], [0, 1000]]
    dd = distance_to_polygon(ad, sq)
    x = ad.obsm["spatial"][:, 0]
    y = ad.obsm["spatial"][:, 1]
    exp = np.where(x < 500, np.minimum.reduce([x, 500 - x, y, 1000 - y]), x - 500)
    np.testing.assert_allclose(np.abs(dd), exp)
    assert np.all(dd[x < 500] < 0) and np.all(dd[x > 500] > 0)
    seg = _adata(cell_table(1000, pattern="segregated", seed=0))
    dt = distance_to_types(seg, "cell_type", ["B"])
    assert np.all(dt[seg.obs["cell_type"] == "B"] == 0)
    assert np.corrcoef(dt[seg.obs["cell_type"] == "A"], 500 - seg.obsm["spatial"][seg.obs["cell_type"] == "A", 0])[0, 1] > 0.95


def test_moran_geary_gradient_vs_noise():
    from servers.spatial.graph import spatial_graph
    from servers.spatial.stats import autocorrelation

    ad = _adata(cell_table(1500, pattern="random", seed=6))
    rng = np.random.default_rng(0)
    ad.X[:, 0] = ad.obsm["spatial"][:, 0] / 1000  # smooth gradient
    ad.X[:, 1] = rng.normal(size=ad.n_obs)  # noise
    spatial_graph(ad, "knn", 6)
    m = autocorrelation(ad, ["marker0", "marker1"])
    assert m.loc["marker0", "I"] > 0.9 and abs(m.loc["marker1", "I"]) < 0.1
    assert m.loc["marker0", "pval_norm"] < 1e-10 and m.loc["marker1", "pval_norm"] > 1e-3
    g = autocorrelation(ad, ["marker0", "marker1"], mode="geary")
    assert g.loc["marker0", "C"] < 0.1 and abs(g.loc["marker1", "C"] - 1) < 0.1


# -- niches, gating, clustering --------------------------------------------------------------------


def test_niches_recover_compartments():
    from servers.spatial.niches import cellular_neighborhoods

    df = cell_table(2000, pattern="segregated", types=("T", "B"), seed=0)
    rnd = np.random.default_rng(1).uniform(size=len(df)) < 0.2
    df.loc[rnd & (df.cell_type == "T"), "cell_type"] = "B"
    ad = _adata(df)
    res = cellular_neighborhoods(ad, "cell_type", n_niches=2, k=15)
    left = ad.obsm["spatial"][:, 0] < 500
    niche = ad.obs["niche"].to_numpy()
    agree = max(np.mean((niche == "niche_0") == left), np.mean((niche == "niche_0") != left))
    assert agree > 0.9
    assert res.profiles.shape == (2, 2) and np.allclose(res.profiles.sum(axis=1), 1)


def test_gating_exact_and_clustering():
    from servers.spatial.gating import cluster, composition, gate, normalize, pca

    df = cell_table(600, pattern="random", types=("A", "B", "C"), seed=0, n_markers=3)
    ad = _adata(df)
    th = {"marker0": 3.5, "marker1": 3.5}
    counts = gate(ad, [{"name": "A-like", "positive": ["marker0"], "negative": ["marker1"]},
                       {"name": "B-like", "positive": ["marker1"]}], thresholds=th)
    m0 = df["marker0"].to_numpy() > 3.5
    m1 = df["marker1"].to_numpy() > 3.5
    exp = np.where(m0 & ~m1, "A-like", np.where(m1, "B-like", "Unknown"))
    assert np.array_equal(ad.obs["phenotype"].astype(str).to_numpy(), exp)
    assert counts.set_index("phenotype")["n_cells"].sum() == 600
    with pytest.raises(ToolError, match="Unknown marker"):
        gate(ad, [{"name": "x", "positive": ["CD999"]}])
    comp = composition(ad, "cell_type", by="sample")
    assert comp.groupby("group")["fraction"].sum().round(12).eq(1).all()
    normalize(ad, "zscore")
    pca(ad, 2)
    sizes = cluster(ad, n_clusters=3)
    assert sizes["n_cells"].sum() == 600
    ct = pd.crosstab(ad.obs["cluster"], ad.obs["cell_type"])
    assert (ct.max(axis=1) / ct.sum(axis=1)).min() > 0.6  # clusters follow the marker-defined types


# -- bad input -------------------------------------------------------------------------------------


def test_bad_inputs_are_clear():
    from servers.spatial.cooccurrence import co_occurrence
    from servers.spatial.core import get_coords
    from servers.spatial.enrichment import nhood_enrichment
    from servers.spatial.graph import spatial_graph
    from servers.spatial.io import table_to_anndata

    df = cell_table(50, pattern="random")
    with pytest.raises(ToolError, match="column.*not found.*x_col='xx'"):
        table_to_anndata(df, x_col="xx", y_col="y", units="um")
    bad = df.copy()
    bad.loc[3, "x"] = np.nan
    with pytest.raises(ToolError, match="1 of 50 rows have missing"):
        table_to_anndata(bad, x_col="x", y_col="y", units="um")
    assert table_to_anndata(bad, x_col="x", y_col="y", units="um", drop_nan_coords=True).n_obs == 49
    with pytest.raises(ToolError, match="Unknown coordinate unit"):
        table_to_anndata(df, x_col="x", y_col="y", units="mm")
    with pytest.raises(ToolError, match="empty"):
        table_to_anndata(df.iloc[:0], x_col="x", y_col="y", units="um")
    ad = _adata(df)
    with pytest.raises(ToolError, match="Unknown cell-type key 'celltype'"):
        co_occurrence(ad, "celltype")
    ad.obsm["spatial"][0, 0] = np.nan
    with pytest.raises(ToolError, match="NaN"):
        get_coords(ad)
    one = _adata(df.assign(cell_type="A"))
    spatial_graph(one, "knn", 3)
    with pytest.raises(ToolError, match="at least 2"):
        nhood_enrichment(one, "cell_type", n_perms=10)
    ad2 = _adata(df)
    with pytest.raises(ToolError, match="no spatial graph"):
        nhood_enrichment(ad2, "cell_type", n_perms=10)
    with pytest.raises(ToolError, match="n_neighbors"):
        spatial_graph(ad2, "knn", 500)
    with pytest.raises(ToolError, match="Unknown graph method"):
        spatial_graph(ad2, "gabriel")


def test_analytic_permutation_moments_exact_by_enumeration():
    import itertools

    from scipy.sparse import csr_matrix

    from servers.spatial.enrichment import edge_counts, nhood_enrichment_arrays, permutation_moments

    rng = np.random.default_rng(1)
    A = (rng.uniform(size=(7, 7)) < 0.45).astype(int)
    np.fill_diagonal(A, 0)
    g = csr_matrix(A)
    codes = np.array([0, 0, 0, 1, 1, 2, 2])
    allc = np.array([edge_counts(g.indptr, g.indices, codes[list(p)], 3)[0]
                     for p in itertools.permutations(range(7))], float)
    mean, var = permutation_moments(g.indptr, g.indices, codes, 3)
    np.testing.assert_allclose(mean, allc.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(var, allc.var(axis=0), atol=1e-12)
    z, count, m2, sd = nhood_enrichment_arrays(g.indptr, g.indices, codes, 3, permutations="analytic")
    np.testing.assert_allclose(sd, np.sqrt(allc.var(axis=0)), atol=1e-12)
    A[0, 0] = 1
    with pytest.raises(ToolError, match="self-loops"):
        permutation_moments(csr_matrix(A).indptr, csr_matrix(A).indices, codes, 3)


def test_cooccurrence_refuses_runaway_inputs_and_short_ranges_are_cheap():
    from servers.spatial.cooccurrence import co_occurrence

    ad = _adata(cell_table(3000, pattern="random", extent_um=3000.0, seed=0))
    with pytest.raises(ToolError, match="cell pairs"):
        co_occurrence(ad, "cell_type", max_pairs=1e5)
    # a short explicit range only visits a strip of partners but gives the same counts
    short = co_occurrence(ad, "cell_type", interval=[0.0, 20.0, 40.0], max_pairs=1e6)
    full = co_occurrence(ad, "cell_type", interval=[0.0, 20.0, 40.0, 5000.0])
    assert np.array_equal(short.counts, full.counts[:, :, :2])


def test_cooccurrence_exact_far_from_origin():
    """Global CosMx-like coordinates (~2e4 µm) with short distances: window slack must not drop pairs."""
    from servers.spatial.cooccurrence import co_occurrence

    df = cell_table(600, pattern="random", types=("A", "B"), extent_um=300.0, seed=8)
    ad = _adata(df)
    ad.obsm["spatial"] = ad.obsm["spatial"] + 20000.0
    res = co_occurrence(ad, "cell_type", interval=[0.0, 3.0, 7.5, 15.0])
    _, N = _brute_cooc(ad.obsm["spatial"], ad.obs["cell_type"].cat.codes.to_numpy(), 2, res.interval)
    assert np.array_equal(res.counts, N.astype(np.int64))


@pytest.mark.parametrize("k", [3, 12, 25, 60])
def test_category_palette_never_repeats_a_colour(k):
    """Plots with more than 20 cell types must not reuse colours (tab20 alone wraps around)."""
    from servers.spatial.plots import _palette

    pal = _palette(k)
    assert pal.shape == (k, 4) and np.all((pal >= 0) & (pal <= 1))
    rgb = pal[:, :3]
    d = np.sqrt(((rgb[:, None] - rgb[None]) ** 2).sum(-1)) + np.eye(k) * 9
    assert d.min() > 0.09  # every pair visibly different (RGB distance)
