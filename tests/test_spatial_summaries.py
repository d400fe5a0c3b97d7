"""Group statistics, type-agnostic nearest-neighbour statistics, enrichment calls and Leiden clustering."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from servers.common.errors import ToolError


def _adata(df: pd.DataFrame, markers=("m0", "m1"), cell_type_col="cell_type"):
    from servers.spatial.io import table_to_anndata

    return table_to_anndata(df, x_col="x", y_col="y", units="um", cell_type_col=cell_type_col,
                            marker_cols=list(markers))


def _lattice(nx=12, ny=9, dx=10.0, dy=13.0):
    c, r = np.meshgrid(np.arange(nx), np.arange(ny))
    return pd.DataFrame({"x": c.ravel() * dx + 500.0, "y": r.ravel() * dy - 40.0, "col": c.ravel(), "row": r.ravel()})


def test_group_statistics_exact():
    from servers.spatial.groupstats import group_statistics

    rng = np.random.default_rng(0)
    n = 500
    df = pd.DataFrame({"x": rng.uniform(0, 100, n), "y": rng.uniform(0, 100, n),
                       "cell_type": rng.choice(["a", "b", "c", "d"], n, p=[0.1, 0.4, 0.3, 0.2]),
                       "Area": rng.gamma(4, 30, n), "m0": rng.normal(size=n), "m1": rng.normal(size=n)})
    df.loc[3, "Area"] = np.nan
    ad = _adata(df)
    out = group_statistics(ad, "cell_type", ["Area", "m1"], ["mean", "median", "std", "min", "max", "sum", "count"])
    vc = df.cell_type.value_counts()
    assert list(out["cell_type"]) == list(vc.index) and list(out["n_cells"]) == list(vc)
    for r in out.itertuples():
        sub = df[df.cell_type == r.cell_type]
        a = sub.Area.dropna().to_numpy()
        assert r.Area_mean == pytest.approx(a.mean()) and r.Area_median == pytest.approx(np.median(a))
        assert r.Area_std == pytest.approx(a.std(ddof=1)) and r.Area_count == len(a)
        assert r.Area_min == pytest.approx(a.min()) and r.Area_max == pytest.approx(a.max())
        assert r.Area_sum == pytest.approx(a.sum())
        assert r.m1_mean == pytest.approx(sub.m1.mean(), rel=1e-5)  # X is float32
        assert r.fraction == pytest.approx(len(sub) / n)
    top = group_statistics(ad, "cell_type", "Area", "mean", top=2)
    assert list(top.cell_type) == list(vc.index[:2])
    by_name = group_statistics(ad, "cell_type", ["m0"], ["mean"], sort="name")
    assert list(by_name.cell_type) == ["a", "b", "c", "d"] and list(by_name.columns) == [
        "cell_type", "n_cells", "fraction", "m0_mean"]


def test_group_statistics_bad_inputs():
    from servers.spatial.groupstats import group_statistics

    df = _lattice().assign(cell_type="t", label="x", m0=1.0, m1=2.0)
    ad = _adata(df)
    with pytest.raises(ToolError, match="neither an obs column nor a gene") as e:
        group_statistics(ad, "cell_type", ["area"])
    assert "row" in e.value.hint and "m0" in e.value.hint
    with pytest.raises(ToolError, match="not numeric"):
        group_statistics(ad, "cell_type", ["label"])
    with pytest.raises(ToolError, match="Unknown cell-type key"):
        group_statistics(ad, "phenotype", ["m0"])
    with pytest.raises(ToolError, match="Unknown statistic"):
        group_statistics(ad, "cell_type", ["m0"], ["avg"])
    with pytest.raises(ToolError, match="top"):
        group_statistics(ad, "cell_type", ["m0"], top=0)


def test_nn_overall_lattice_exact():
    from servers.spatial.stats import nn_overall

    df = _lattice()
    # types by column: the nearest neighbour (horizontal, 10 µm) is always in another column
    by_col = _adata(df.assign(cell_type=df.col.map(lambda c: f"c{c % 3}"), m0=0.0, m1=0.0))
    o = nn_overall(by_col, "cell_type")
    assert o["n_cells"] == len(df) and o["mean"] == pytest.approx(10.0) and o["max"] == pytest.approx(10.0)
    assert o["same_type_nn_fraction"] == 0.0 and set(o["same_type_nn_fraction_by_type"].values()) == {0.0}
    by_row = _adata(df.assign(cell_type=df.row.map(lambda r: "even" if r % 2 == 0 else "odd"), m0=0.0, m1=0.0))
    o = nn_overall(by_row, "cell_type")
    assert o["same_type_nn_fraction"] == 1.0 and o["same_type_nn_fraction_by_type"] == {"even": 1.0, "odd": 1.0}
    assert np.allclose(by_row.obs["nn_distance"], 10.0)


def test_nn_overall_random_matches_bruteforce():
    from scipy.spatial.distance import cdist

    from servers.spatial.stats import nn_overall

    rng = np.random.default_rng(1)
    n = 300
    df = pd.DataFrame({"x": rng.uniform(0, 200, n), "y": rng.uniform(0, 200, n), "cell_type": rng.choice(list("AB"), n),
                       "m0": 0.0, "m1": 0.0})
    df.loc[5, ["x", "y", "cell_type"]] = df.loc[6, ["x", "y", "cell_type"]].to_numpy()  # coincident pair: distance 0
    ad = _adata(df)
    D = cdist(df[["x", "y"]], df[["x", "y"]])
    np.fill_diagonal(D, np.inf)
    nn = D.argmin(axis=1)
    d = D.min(axis=1)
    o = nn_overall(ad, "cell_type")
    assert o["mean"] == pytest.approx(d.mean()) and o["median"] == pytest.approx(np.median(d)) and o["min"] == 0.0
    t = df.cell_type.to_numpy()
    same = t == t[nn]
    assert o["same_type_nn_fraction"] == pytest.approx(same.mean())
    assert o["same_type_nn_fraction_by_type"]["A"] == pytest.approx(same[t == "A"].mean())
    with pytest.raises(ToolError, match="at least 2 cells"):
        nn_overall(_adata(df.head(1)))


def test_enrichment_call_thresholds():
    from servers.spatial.enrichment import Z_CALL, call

    assert Z_CALL == 1.96
    assert call(2.0) == "enriched" and call(-1.96) == "depleted" and call(1.0) == "not significant"
    assert call(float("nan")) == "undefined"


def test_leiden_recovers_separated_populations():
    from servers.spatial import gating

    rng = np.random.default_rng(0)
    k, per = 3, 150
    truth = np.repeat(np.arange(k), per)
    centers = np.array([[0, 0, 0, 0], [8, 0, 0, 0], [0, 8, 0, 8]], float)
    X = centers[truth] + rng.normal(size=(k * per, 4))
    df = pd.DataFrame(X, columns=[f"m{i}" for i in range(4)]).assign(x=rng.uniform(0, 100, k * per),
                                                                        y=rng.uniform(0, 100, k * per))
    ad = _adata(df, markers=[f"m{i}" for i in range(4)], cell_type_col=None)
    gating.pca(ad, 4)
    sizes = gating.cluster(ad, method="leiden", resolution=0.2, seed=0)
    assert sorted(sizes["n_cells"]) == [per] * k
    ct = pd.crosstab(truth, ad.obs["cluster"].to_numpy())
    assert (ct.to_numpy() > 0).sum() == k  # one-to-one
    with pytest.raises(ToolError, match="resolution > 0"):
        gating.cluster(ad, method="leiden", resolution=0)


async def test_summary_tools_through_the_server(mcp_client, data_root):
    from servers.common.synthetic import cell_table

    df = cell_table(900, pattern="segregated", types=("Tumor", "Immune"), seed=3)
    df.to_csv(data_root / "cells.csv", index=False)
    async with mcp_client("spatial") as c:
        ds = (await c.call_tool("load_dataset", {"path": "cells.csv", "units": "um", "cell_type_col": "cell_type"})
              ).structured_content["dataset"]
        g = (await c.call_tool("group_statistics", {"dataset": ds, "group_key": "cell_type",
                                                    "columns": ["marker0"], "stats": ["mean"]})).structured_content
        exp = df.groupby("cell_type", observed=True).marker0.mean()
        for r in g["rows"]:
            assert r["marker0_mean"] == pytest.approx(exp[r["cell_type"]], abs=1e-5)
        bad = await c.call_tool_mcp("group_statistics", {"dataset": ds, "group_key": "cell_type", "columns": ["nope"]})
        assert bad.is_error and "neither an obs column" in bad.content[0].text
        nn = (await c.call_tool("nearest_neighbor_distances", {"dataset": ds})).structured_content
        assert nn["units"] == "um" and nn["all_cells"]["n_cells"] == 900 and "rows" not in nn
        nn = (await c.call_tool("nearest_neighbor_distances", {"dataset": ds, "cluster_key": "cell_type"})
              ).structured_content
        assert nn["same_type_nn_fraction"] > 0.9 and len(nn["rows"]) == 4
        d = (await c.call_tool("distance_to_region", {"dataset": ds, "cluster_key": "cell_type",
                                                      "target_types": ["Tumor"]})).structured_content
        assert d["summary_by_group"]["Tumor"]["mean"] == 0
        assert d["summary_by_group"]["Immune"]["count"] == int((df.cell_type == "Immune").sum())
        e = (await c.call_tool("neighborhood_enrichment", {"dataset": ds, "cluster_key": "cell_type",
                                                           "permutations": "analytic"})).structured_content
        assert e["self_enrichment_call"] == {"Immune": "enriched", "Tumor": "enriched"}
