"""The spatial MCP server end to end (in-memory client): load → graph → statistics → plots, and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from servers.common.synthetic import cell_table


@pytest.fixture
def seg_table(data_root):
    df = cell_table(1200, pattern="segregated", types=("Tumor", "Immune"), seed=0, samples=2)
    df.to_csv(data_root / "cells.csv", index=False)
    bad = df.drop(columns=["y"])
    bad.to_csv(data_root / "no_y.csv", index=False)
    return df


async def test_tools_listed(mcp_client):
    async with mcp_client("spatial") as c:
        names = {t.name for t in await c.list_tools()}
    assert {"load_dataset", "dataset_summary", "composition", "gate_phenotypes", "cluster_cells", "spatial_graph",
            "neighborhood_enrichment", "co_occurrence", "ripley", "spatial_autocorrelation",
            "nearest_neighbor_distances", "cell_density", "cellular_neighborhoods", "distance_to_region",
            "plot_spatial", "list_artifacts", "group_statistics", "transcript_counts"} <= names


async def test_workflow_on_segregated_tissue(mcp_client, seg_table):
    async with mcp_client("spatial") as c:
        r = await c.call_tool("load_dataset", {"path": "cells.csv", "units": "um", "cell_type_col": "cell_type",
                                               "sample_col": "sample", "id_col": "cell_id"})
        ds = r.structured_content["dataset"]
        assert r.structured_content["n_cells"] == 1200 and r.structured_content["spatial_units"] == "um"
        comp = (await c.call_tool("composition", {"dataset": ds, "cluster_key": "cell_type"})).structured_content
        assert sum(row["n_cells"] for row in comp["rows"]) == 1200
        r = await c.call_tool("neighborhood_enrichment", {"dataset": ds, "cluster_key": "cell_type", "n_perms": 100})
        s = r.structured_content
        assert s["graph_built"]["method"] == "knn"
        assert s["self_enrichment"]["Tumor"] > 5 and s["self_enrichment"]["Immune"] > 5
        assert s["most_depleted"][0]["zscore"] < -5
        assert any(b.type == "image" for b in r.content)
        r = await c.call_tool("co_occurrence", {"dataset": ds, "cluster_key": "cell_type",
                                                "distances": [0, 25, 50, 100]})
        s = r.structured_content
        assert s["thresholds"] == [25.0, 50.0, 100.0] and s["units"] == "um"
        assert s["at_first_threshold"]["Tumor"]["most_enriched_near"] == "Tumor"
        g = (await c.call_tool("spatial_graph", {"dataset": ds, "method": "delaunay"})).structured_content
        assert g["dataset"] != ds and g["n_edges"] > 6000
        d = (await c.call_tool("cell_density", {"dataset": ds, "cluster_key": "cell_type", "region": "bbox"})
             ).structured_content
        all_row = next(x for x in d["rows"] if x["cell_type"] == "all")
        assert all_row["n_cells"] == 1200 and 1000 < all_row["cells_per_mm2"] < 1300
        n = (await c.call_tool("cellular_neighborhoods", {"dataset": ds, "cluster_key": "cell_type",
                                                          "n_niches": 2})).structured_content
        assert sum(x["n_cells"] for x in n["niches"]) == 1200
        rp = (await c.call_tool("ripley", {"dataset": ds, "mode": "L", "cell_type": "Tumor",
                                           "cluster_key": "cell_type", "n_simulations": 19})).structured_content
        assert rp["n_points"] == int((seg_table.cell_type == "Tumor").sum())
        dist = (await c.call_tool("distance_to_region", {"dataset": ds, "cluster_key": "cell_type",
                                                         "target_types": ["Tumor"]})).structured_content
        by = {x["cell_type"]: x for x in dist["summary"]}
        assert by["Tumor"]["mean"] == 0 and by["Immune"]["mean"] > 50
        p = await c.call_tool("plot_spatial", {"dataset": ds, "color": "marker0"})
        assert p.content[-1].type == "image"
        arts = (await c.call_tool("list_artifacts", {"kind": "anndata"})).structured_content["artifacts"]
        assert len(arts) >= 4  # loaded + graph + niches + distances


async def test_errors_are_actionable(mcp_client, seg_table):
    async with mcp_client("spatial") as c:
        r = await c.call_tool_mcp("load_dataset", {"path": "no_y.csv", "units": "um"})
        assert r.is_error and "y_col='y'" in r.content[0].text and "Available columns" in r.content[0].text
        r = await c.call_tool_mcp("load_dataset", {"path": "cells.csv"})
        assert r.is_error and "units='um'" in r.content[0].text
        r = await c.call_tool_mcp("load_dataset", {"path": "../etc/passwd"})
        assert r.is_error and ".." in r.content[0].text
        ds = (await c.call_tool("load_dataset", {"path": "cells.csv", "units": "px"})).structured_content["dataset"]
        r = await c.call_tool_mcp("co_occurrence", {"dataset": ds, "cluster_key": "celltype"})
        assert r.is_error and "Unknown cell-type key 'celltype'" in r.content[0].text and "cell_type" in r.content[0].text
        r = await c.call_tool_mcp("cell_density", {"dataset": ds})
        assert r.is_error and "pixels of unknown size" in r.content[0].text
        r = await c.call_tool_mcp("dataset_summary", {"dataset": "anndata-nope"})
        assert r.is_error and "list_artifacts" in r.content[0].text
        # out-of-range numbers are refused up front with the argument named (not a MemoryError later)
        r = await c.call_tool_mcp("ripley", {"dataset": ds, "n_simulations": 10**7})
        assert r.is_error and "Invalid arguments for tool 'ripley': n_simulations:" in r.content[0].text
        r = await c.call_tool_mcp("neighborhood_enrichment", {"dataset": ds, "cluster_key": "cell_type",
                                                               "n_perms": 10**9})
        assert r.is_error and "n_perms <= " in r.content[0].text and "analytic" in r.content[0].text
        r = await c.call_tool_mcp("ripley", {"dataset": ds, "n_simulations": 0, "max_radius": 50})
        assert not r.is_error and r.structured_content["n_simulations"] == 0
        ok = await c.call_tool("dataset_summary", {"dataset": ds})  # still serving
        assert ok.structured_content["n_cells"] == 1200


async def test_cosmx_through_the_server(mcp_client, shared_data_root):
    async with mcp_client("spatial") as c:
        r = await c.call_tool("load_dataset", {"path": "spatial/cosmx_lung12_mini"})
        s = r.structured_content
        assert s["n_cells"] == 120 and s["n_vars"] == 960 and s["spatial_units"] == "um"
        assert s["cosmx"]["n_transcripts"] == 25825
        r = await c.call_tool("cluster_cells", {"dataset": s["dataset"], "n_clusters": 4, "n_pcs": 10})
        assert sum(x["n_cells"] for x in r.structured_content["clusters"]) == 120
        json.dumps(r.structured_content)


async def test_scimap_enrichment_exact_mode(mcp_client, shared_data_root):
    async with mcp_client("spatial") as c:
        s = (await c.call_tool("load_dataset", {"path": "spatial/scimap_example.h5ad", "x_col": "X_position",
                                                "y_col": "Y_position", "units": "px"})).structured_content
        r = (await c.call_tool("neighborhood_enrichment", {"dataset": s["dataset"], "cluster_key": "phenotype",
                                                           "n_perms": 50, "permutations": "squidpy"})
             ).structured_content
        assert r["n_types"] == 25 and np.isfinite(r["most_enriched"][0]["zscore"])


async def test_gating_through_the_server(mcp_client, seg_table):
    async with mcp_client("spatial") as c:
        ds = (await c.call_tool("load_dataset", {"path": "cells.csv", "units": "um", "id_col": "cell_id",
                                                 "marker_cols": ["marker0", "marker1"]})).structured_content["dataset"]
        r = (await c.call_tool("gate_phenotypes", {"dataset": ds, "thresholds": {"marker0": 3.5, "marker1": 3.5},
                                                   "rules": [{"name": "T-like", "positive": ["marker0"],
                                                              "negative": ["marker1"]}]})).structured_content
        exp = int(((seg_table.marker0 > 3.5) & ~(seg_table.marker1 > 3.5)).sum())
        got = {x["phenotype"]: x["n_cells"] for x in r["phenotypes"]}
        assert got["T-like"] == exp and got["Unknown"] == 1200 - exp
        s = (await c.call_tool("dataset_summary", {"dataset": r["dataset"]})).structured_content
        assert s["obs"]["phenotype"]["top"]["T-like"] == exp


async def test_stdio_server_lists_tools_quickly(stdio_client):
    import time

    t = time.perf_counter()
    async with stdio_client("spatial") as c:
        names = {t.name for t in await c.list_tools()}
        r = await c.call_tool_mcp("dataset_summary", {"dataset": "nope"})
    assert "co_occurrence" in names and r.is_error and "load_dataset" in r.content[0].text
    assert time.perf_counter() - t < 60
