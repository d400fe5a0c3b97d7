"""Transcript statistics (CosMx / Xenium / MERFISH transcript tables) against exact synthetic truth and the real CosMx crop."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from servers.common.errors import ToolError


@pytest.fixture
def cosmx(tmp_path):
    from servers.spatial.synthetic import write_cosmx

    truth = write_cosmx(tmp_path / "run", n_fovs=3, seed=7)
    return tmp_path / "run", truth


def test_cosmx_counts_by_cell_gene_and_fov_exact(cosmx):
    from servers.spatial.io import read_transcripts
    from servers.spatial.transcripts import transcript_counts

    folder, truth = cosmx
    tx, info = read_transcripts(folder)
    assert info["format"] == "cosmx" and info["has_fov"] and info["has_cells"]
    assert len(tx) == sum(sum(c.values()) for c in truth["counts"].values()) + truth["n_outside"] + truth["n_neg"]
    assert int(tx["is_control"].sum()) == truth["n_neg"]

    # per cell × gene, controls excluded: exactly the truth
    cg = transcript_counts(tx, ["cell", "gene"], include_controls=False)
    got = {(r.cell, r.gene): r.n_transcripts for r in cg.itertuples()}
    want = {(f"{f}_{c}", g): n for (f, c), cnt in truth["counts"].items() for g, n in cnt.items()}
    assert got == want
    assert set(cg["fov"]) == {1, 2, 3}

    # per FOV: 150 transcripts outside cells each; cells = every labelled cell (all have transcripts)
    fov = transcript_counts(tx, ["fov"]).set_index("fov")
    assert list(fov.index) == [1, 2, 3]
    assert (fov["n_transcripts"] - fov["n_in_cells"] == 150).all()
    for f in (1, 2, 3):
        cells = [k for k in truth["counts"] if k[0] == f]
        assert fov.loc[f, "n_cells"] == len(cells)
        assert fov.loc[f, "fraction_in_cells"] == pytest.approx(fov.loc[f, "n_in_cells"] / fov.loc[f, "n_transcripts"])
        assert fov.loc[f, "mean_transcripts_per_cell"] == pytest.approx(fov.loc[f, "n_in_cells"] / len(cells))

    # one gene per FOV, controls off: sum of the truth over that FOV's cells + outside ones
    raw = pd.read_csv(next(folder.glob("*_tx_file.csv")))
    g = transcript_counts(tx, ["fov"], genes=["COL1A1"], in_cells_only=True, include_controls=False)
    for r in g.itertuples():
        assert r.n_transcripts == sum(c.get("COL1A1", 0) for (f, _), c in truth["counts"].items() if f == r.fov)
    g_all = transcript_counts(tx, ["fov"], genes=["COL1A1"]).set_index("fov")["n_transcripts"]
    assert g_all.to_dict() == raw[raw.target == "COL1A1"].groupby("fov").size().to_dict()

    # top-k genes within each FOV, ties broken by name
    top = transcript_counts(tx, ["fov", "gene"], top_k=3, include_controls=False)
    for f, sub in top.groupby("fov"):
        exp = (raw[(raw.fov == f) & ~raw.target.str.startswith("NegPrb")].target.value_counts()
               .rename_axis("gene").reset_index().sort_values(["count", "gene"], ascending=[False, True]).head(3))
        assert list(sub.gene) == list(exp.gene) and list(sub.n_transcripts) == list(exp["count"])

    overall = transcript_counts(tx, [])
    assert overall.loc[0, "n_transcripts"] == len(raw) and overall.loc[0, "n_cells"] == len(truth["counts"])


def test_requested_genes_and_fovs_without_transcripts_give_zero_rows(cosmx):
    from servers.spatial.io import read_transcripts
    from servers.spatial.transcripts import transcript_counts

    folder, _ = cosmx
    tx, _ = read_transcripts(folder)
    only_f1 = tx[(tx["fov"] != 1) | (tx["gene"] != "CD3E")]
    out = transcript_counts(only_f1, ["fov"], genes=["CD3E"]).set_index("fov")
    assert out.loc[1, "n_transcripts"] == 0 and np.isnan(out.loc[1, "fraction_in_cells"])
    assert out.loc[2, "n_transcripts"] > 0


def test_xenium_and_merfish_transcripts(tmp_path):
    from servers.spatial.io import read_transcripts
    from servers.spatial.synthetic import write_xenium
    from servers.spatial.transcripts import transcript_counts

    for parquet in (False, True):
        truth = write_xenium(tmp_path / f"x{parquet}", n_cells=12, seed=3, parquet=parquet)
        tx, info = read_transcripts(tmp_path / f"x{parquet}")
        assert info["format"] == "xenium" and not info["has_fov"] and info["n_dropped_low_qv"] > 0
        cg = transcript_counts(tx, ["cell", "gene"], include_controls=False)
        assert {(r.cell, r.gene): r.n_transcripts for r in cg.itertuples()} == {
            (c, g): n for c, cnt in truth["counts"].items() for g, n in cnt.items()}
        o = transcript_counts(tx, [])
        assert o.loc[0, "n_transcripts"] - o.loc[0, "n_in_cells"] == 40  # UNASSIGNED (all qv 40)
        assert int(tx["is_control"].sum()) == 12  # one NegControlProbe per cell
        with pytest.raises(ToolError, match="no FOV column"):
            transcript_counts(tx, ["fov"])

    d = tmp_path / "merfish"
    d.mkdir()
    pd.DataFrame({"gene": ["A", "A", "B", "Blank-1", "B"], "cell_id": [5, -1, 5, 6, 7], "fov": [0, 0, 1, 1, 1],
                  "global_x": 0.0, "global_y": 0.0}).to_csv(d / "detected_transcripts.csv", index=False)
    tx, info = read_transcripts(d)
    assert info["format"] == "merfish"
    f = transcript_counts(tx, ["fov"]).set_index("fov")
    assert f["n_transcripts"].to_dict() == {0: 2, 1: 3} and f["n_in_cells"].to_dict() == {0: 1, 1: 3}
    assert f.loc[1, "n_cells"] == 3
    f = transcript_counts(tx, ["fov"], include_controls=False).set_index("fov")
    assert f["n_transcripts"].to_dict() == {0: 2, 1: 2} and f.loc[1, "n_cells"] == 2


def test_bad_inputs(cosmx, tmp_path):
    from servers.spatial.io import read_transcripts
    from servers.spatial.transcripts import transcript_counts

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "cells.csv").write_text("a\n1\n")
    with pytest.raises(ToolError, match="No transcript table") as e:
        read_transcripts(tmp_path / "empty")
    assert "cells.csv" in e.value.hint
    folder, _ = cosmx
    tx, _ = read_transcripts(folder)
    with pytest.raises(ToolError, match="Unknown gene") as e:
        transcript_counts(tx, ["fov"], genes=["COL1A"])
    assert "COL1A1" in e.value.hint
    with pytest.raises(ToolError, match="Unknown FOV"):
        transcript_counts(tx, ["gene"], fovs=[9])
    with pytest.raises(ToolError, match="Invalid group keys"):
        transcript_counts(tx, ["sample"])
    with pytest.raises(ToolError, match="top_k"):
        transcript_counts(tx, [], top_k=3)


def test_real_cosmx_matches_pandas(shared_data):
    from servers.spatial.io import read_cosmx, read_transcripts
    from servers.spatial.transcripts import transcript_counts

    folder = shared_data / "spatial" / "cosmx_lung12_mini"
    raw = pd.read_csv(folder / "Lung12_tx_file.csv")
    tx, _ = read_transcripts(folder)
    fov = transcript_counts(tx, ["fov"]).set_index("fov")
    assert fov["n_transcripts"].to_dict() == raw.groupby("fov").size().to_dict() == {2: 12542, 3: 13283}
    inside = raw[raw.cell_ID > 0]
    assert fov["n_cells"].to_dict() == inside.groupby("fov").cell_ID.nunique().to_dict()
    # the per-cell counts agree with the cells × genes matrix of the dataset reader (one implementation)
    ad = read_cosmx(folder)
    cells = transcript_counts(tx, ["cell"], include_controls=False).set_index("cell")["n_transcripts"]
    tot = ad.obs["total_counts"]
    assert np.array_equal(cells.to_numpy(), tot.loc[cells.index].to_numpy())
    assert tot.drop(cells.index).eq(0).all()


async def test_transcript_counts_tool(mcp_client, data_root):
    from servers.spatial.synthetic import write_cosmx

    truth = write_cosmx(data_root / "cosmx", n_fovs=2, seed=2)
    async with mcp_client("spatial") as c:
        r = (await c.call_tool("transcript_counts", {"path": "cosmx", "by": ["fov"]})).structured_content
        assert r["format"] == "cosmx" and r["n_rows"] == 2 and r["table_artifact"]
        assert [x["n_transcripts"] - x["n_in_cells"] for x in r["rows"]] == [150, 150]
        assert r["n_control_transcripts_total"] == truth["n_neg"]
        r = (await c.call_tool("transcript_counts", {"path": "cosmx", "by": ["gene"], "fovs": [1], "top_k": 2,
                                                     "include_controls": False})).structured_content
        assert len(r["rows"]) == 2 and r["rows"][0]["n_transcripts"] >= r["rows"][1]["n_transcripts"]
        bad = await c.call_tool_mcp("transcript_counts", {"path": "cosmx", "genes": ["NOPE"]})
        assert bad.is_error and "Unknown gene" in bad.content[0].text
        (data_root / "plain").mkdir()
        bad = await c.call_tool_mcp("transcript_counts", {"path": "plain"})
        assert bad.is_error and "No transcript table" in bad.content[0].text
