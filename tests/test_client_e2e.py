"""End to end over stdio with the real servers: a scripted plan chains wsi → spatial (load CosMx,
cluster, neighbourhood enrichment) → sandbox code reading the resulting artifacts → answer, checked
against ground truth computed here directly from the shared data files."""

from __future__ import annotations

import pytest

from client.agent import run_agent
from client.providers.scripted import ScriptedProvider
from client.servers import ServerPool, cytoagent_servers
from client.transcript import load_transcript

NEEDED = {"wsi": ["slide_info"], "spatial": ["load_dataset", "cluster_cells", "neighborhood_enrichment",
                                              "artifact_info"], "sandbox": ["execute"]}

PLAN = [
    {"call": "wsi_slide_info", "args": {"slide": "wsi/cmu-1-small-region.svs"}},
    {"call": "spatial_load_dataset", "args": {"path": "spatial/cosmx_lung12_mini"}},
    {"call": "spatial_cluster_cells", "args": {"dataset": "{{steps[1].structured.dataset}}", "n_clusters": 4}},
    {"call": "spatial_neighborhood_enrichment",
     "args": {"dataset": "{{steps[2].structured.dataset}}", "cluster_key": "cluster", "n_perms": 100}},
    {"call": "spatial_artifact_info", "args": {"artifact_id": "{{steps[3].structured.table_artifact}}"}},
    {"call": "spatial_artifact_info", "args": {"artifact_id": "{{steps[2].structured.dataset}}"}},
    {"code": "import anndata as ad\nimport pandas as pd\n"
             "z = pd.read_parquet('{{steps[4].structured.abspath}}')\n"
             "a = ad.read_h5ad('{{steps[5].structured.abspath}}')\n"
             "pairs = set(zip(z.type_a.astype(str), z.type_b.astype(str)))\n"
             "{'n_cells': int(a.n_obs), 'counts_in_cells': int(a.obs.total_counts.sum() + a.obs.neg_counts.sum()),\n"
             " 'neg_counts': int(a.obs.neg_counts.sum()), 'pairs': len(pairs),\n"
             " 'max_z': round(float(z.zscore.max()), 3), 'n_clusters': int(a.obs['cluster'].nunique())}"},
    {"answer": {"mpp": "{{steps[0].structured.mpp}}", "n_cells_tool": "{{steps[1].structured.n_cells}}",
                "top_z_tool": "{{steps[3].structured.most_enriched[0].zscore}}", "sandbox": "{{steps[6].value}}"}},
]


async def test_scripted_plan_chains_wsi_spatial_sandbox_over_stdio(shared_data_root, workspace_dir, tmp_path):
    import openslide
    import pandas as pd

    configs = cytoagent_servers(list(NEEDED), data_root=shared_data_root, workspace=workspace_dir)
    async with ServerPool(configs, log_dir=tmp_path / "logs") as pool:
        missing = [f"{s}.{t}" for s, tools in NEEDED.items() for t in tools if pool.find_tool(s, t) is None]
        if missing:
            pytest.skip(f"servers do not have the tools this plan needs yet: {', '.join(missing)}")
        res = await run_agent("Slide mpp, CosMx cell count and strongest neighbourhood enrichment? Answer in JSON.",
                              ScriptedProvider(PLAN), pool=pool, out_dir=tmp_path / "run",
                              data_root=shared_data_root, workspace=workspace_dir)
    assert res.ok, res.error
    a = res.answer
    # ground truth straight from the files
    slide = openslide.OpenSlide(str(shared_data_root / "wsi" / "cmu-1-small-region.svs"))
    assert a["mpp"] == pytest.approx(float(slide.properties[openslide.PROPERTY_NAME_MPP_X]), abs=1e-6)
    tx = pd.read_csv(shared_data_root / "spatial" / "cosmx_lung12_mini" / "Lung12_tx_file.csv")
    in_cells = tx[tx.cell_ID != 0]
    n_cells = in_cells.groupby(["fov", "cell_ID"]).ngroups
    sb = a["sandbox"]
    assert a["n_cells_tool"] == sb["n_cells"] == n_cells
    assert sb["counts_in_cells"] == len(in_cells)
    assert sb["neg_counts"] == int(in_cells.target.str.startswith("NegPrb").sum())
    # the sandbox read the very table the spatial tool summarised
    assert sb["n_clusters"] == 4 and sb["pairs"] == 16
    assert sb["max_z"] == pytest.approx(a["top_z_tool"], abs=1e-3)
    recs = load_transcript(res.transcript_path)
    servers_used = {r["name"].split("_")[0] for r in recs if r["type"] == "tool_result"}
    assert servers_used == {"wsi", "spatial", "sandbox"}
    assert any(r["type"] == "tool_result" and r["figures"] for r in recs)  # the enrichment heatmap
    assert "![spatial_neighborhood_enrichment]" in res.report_path.read_text()


async def test_code_mode_with_the_real_sandbox(shared_data_root, workspace_dir, tmp_path):
    """Code actions run in the sandbox's persistent session, with DATA predefined."""
    import pandas as pd

    plan = [{"code": "import pandas as pd\ntx = pd.read_csv(DATA + '/spatial/cosmx_lung12_mini/Lung12_tx_file.csv')\n"
                     "tx.shape"},
            {"code": "tx[tx.cell_ID != 0].groupby('target').size().sort_values(ascending=False).head(1).to_dict()"},
            {"answer": {"shape": "{{steps[0].value}}", "top": "{{steps[1].value}}"}}]
    configs = cytoagent_servers(["sandbox"], data_root=shared_data_root, workspace=workspace_dir)
    async with ServerPool(configs) as pool:
        if pool.find_tool("sandbox", "execute") is None:
            pytest.skip("the sandbox server has no execute tool yet")
        res = await run_agent("Top gene by transcripts in cells? JSON", ScriptedProvider(plan), pool=pool, mode="code",
                              out_dir=tmp_path / "run", data_root=shared_data_root, workspace=workspace_dir)
    assert res.ok, res.error
    tx = pd.read_csv(shared_data_root / "spatial" / "cosmx_lung12_mini" / "Lung12_tx_file.csv")
    top = tx[tx.cell_ID != 0].groupby("target").size().sort_values(ascending=False).head(1)
    assert res.answer == {"shape": list(tx.shape), "top": {top.index[0]: int(top.iloc[0])}}
    sessions = {r["arguments"]["session"] for r in load_transcript(res.transcript_path) if r["type"] == "tool_call"}
    assert len(sessions) == 1  # one persistent session: step 2 used `tx` from step 1
