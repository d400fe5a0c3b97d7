"""Spatial readers: synthetic CosMx / Xenium / MERFISH files with exact truth, and the real CosMx crop."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from servers.common.errors import ToolError


@pytest.mark.parametrize("flip_y,offset", [(False, (0, 0)), (True, (4800, 3000))])
def test_cosmx_synthetic_exact(tmp_path, flip_y, offset):
    from servers.spatial.io import COSMX_MPP, read_any
    from servers.spatial.synthetic import GENES, write_cosmx

    truth = write_cosmx(tmp_path / "run", flip_y=flip_y, offset=offset, seed=4)
    ad = read_any(tmp_path / "run")
    assert ad.uns["source"]["format"] == "cosmx"
    assert set(ad.var_names) == set(GENES)
    assert ad.n_obs == len(truth["counts"])
    X = ad.X.toarray()
    for (fov, cid), cnt in truth["counts"].items():
        row = ad.obs_names.get_loc(f"{fov}_{cid}")
        for g in GENES:
            assert X[row, ad.var_names.get_loc(g)] == cnt.get(g, 0)
        assert ad.obs["area_px"].iloc[row] == truth["area_px"][(fov, cid)]
        assert ad.obs["area_um2"].iloc[row] == pytest.approx(truth["area_px"][(fov, cid)] * COSMX_MPP**2)
        cx, cy = truth["centroid_local"][(fov, cid)]
        assert ad.obs["x_local_px"].iloc[row] == pytest.approx(cx)
        assert ad.obs["y_local_px"].iloc[row] == pytest.approx(cy)
        gx, gy = truth["fov_positions"][fov]
        np.testing.assert_allclose(ad.obsm["spatial"][row], [(cx + gx) * COSMX_MPP, (cy + gy) * COSMX_MPP])
    assert ad.obs["neg_counts"].sum() == truth["n_neg"]
    assert X.sum() + truth["n_outside"] + truth["n_neg"] == ad.uns["cosmx"]["n_transcripts"]
    for reg in ad.uns["cosmx"]["label_registration"].values():
        assert reg["flip_y"] == flip_y and (reg["x0"], reg["y0"]) == offset and reg["match_fraction"] == 1.0
    assert ad.uns["spatial_units"] == "um"


def test_cosmx_misregistered_labels_refused(tmp_path):
    import tifffile

    from servers.spatial.io import read_cosmx
    from servers.spatial.synthetic import write_cosmx

    write_cosmx(tmp_path / "run", seed=1)
    p = tmp_path / "run" / "CellLabels" / "CellLabels_F001.tif"
    lab = tifffile.imread(p)
    tifffile.imwrite(p, np.random.default_rng(0).permutation(lab.ravel()).reshape(lab.shape))
    with pytest.raises(ToolError, match="does not line up"):
        read_cosmx(tmp_path / "run")


def test_cosmx_real_counts_match_transcripts(shared_data):
    from servers.spatial.io import read_cosmx

    folder = shared_data / "spatial" / "cosmx_lung12_mini"
    ad = read_cosmx(folder)
    tx = pd.read_csv(folder / "Lung12_tx_file.csv")
    inside = tx[(tx.cell_ID > 0) & ~tx.target.str.startswith("NegPrb")]
    direct = inside.groupby(["fov", "cell_ID", "target"]).size()
    X = ad.X.tocoo()
    ours = pd.Series(X.data, index=pd.MultiIndex.from_arrays(
        [ad.obs["fov"].astype(int).to_numpy()[X.row], ad.obs["cell_ID"].to_numpy()[X.row], ad.var_names[X.col]]))
    ours = ours.sort_index()
    direct = direct.sort_index()
    assert ours.index.equals(direct.index)
    assert np.array_equal(ours.to_numpy(), direct.to_numpy())
    assert ad.n_obs == tx[tx.cell_ID > 0].groupby(["fov", "cell_ID"]).ngroups == 120
    neg = tx[(tx.cell_ID > 0) & tx.target.str.startswith("NegPrb")].groupby(["fov", "cell_ID"]).size()
    assert ad.obs.set_index(["fov", "cell_ID"])["neg_counts"].sum() == neg.sum()
    # label images line up with the transcripts and give real areas
    for reg in ad.uns["cosmx"]["label_registration"].values():
        assert reg["match_fraction"] > 0.95 and reg["flip_y"] is True
    assert ad.obs["area_um2"].notna().all() and 20 < ad.obs["area_um2"].median() < 120
    # global = local + FOV position
    fp = pd.read_csv(folder / "Lung12_fov_positions_file.csv").set_index("fov")
    f = ad.obs["fov"].astype(int).to_numpy()
    np.testing.assert_allclose(ad.obsm["spatial_px"][:, 0], ad.obs["x_local_px"] + fp.loc[f, "x_global_px"].to_numpy())
    # centroids from labels agree with the cells' transcript clouds (within a few µm)
    tm = tx[tx.cell_ID > 0].groupby(["fov", "cell_ID"])[["x_global_px", "y_global_px"]].mean()
    mine = pd.DataFrame(ad.obsm["spatial_px"], index=pd.MultiIndex.from_arrays([f, ad.obs["cell_ID"]]))
    d = np.linalg.norm(mine.loc[tm.index].to_numpy() - tm.to_numpy(), axis=1) * 0.12028
    assert np.median(d) < 2.0


@pytest.mark.parametrize("parquet", [False, True])
def test_xenium_synthetic(tmp_path, parquet):
    from servers.spatial.io import read_any
    from servers.spatial.synthetic import GENES, write_xenium

    truth = write_xenium(tmp_path / "xen", parquet=parquet)
    ad = read_any(tmp_path / "xen")
    assert ad.uns["source"]["format"] == "xenium"
    assert "NegControlProbe_00042" not in ad.var_names
    X = ad.X.toarray()
    for c, cnt in truth["counts"].items():
        row = ad.obs_names.get_loc(c)
        assert [X[row, ad.var_names.get_loc(g)] if g in ad.var_names else 0 for g in GENES] == \
               [cnt.get(g, 0) for g in GENES]
    np.testing.assert_allclose(ad.obsm["spatial"], truth["xy"])
    np.testing.assert_allclose(ad.obs["area_um2"], truth["area"])
    assert (ad.obs["control_counts"] == 1).all()


def test_merfish_synthetic(tmp_path):
    from servers.spatial.io import read_any
    from servers.spatial.synthetic import GENES, write_merfish

    truth = write_merfish(tmp_path / "mer")
    ad = read_any(tmp_path / "mer")
    assert list(ad.var_names) == list(GENES)
    order = [truth["ids"].index(i) for i in ad.obs_names]
    assert np.array_equal(ad.X.toarray(), truth["counts"][order])
    np.testing.assert_allclose(ad.obsm["spatial"], truth["xy"][order])
    assert np.array_equal(ad.obsm["blank_counts"], truth["blanks"][order])


def test_table_and_h5ad_readers(tmp_path):
    from servers.common.synthetic import cell_table
    from servers.spatial.io import read_any

    df = cell_table(100, pattern="random")
    df.to_parquet(tmp_path / "cells.parquet")
    ad = read_any(tmp_path / "cells.parquet", units="px", mpp=0.5, cell_type_col="cell_type", id_col="cell_id")
    assert ad.n_vars == 5 and ad.uns["spatial_units"] == "px" and ad.uns["mpp"] == 0.5
    np.testing.assert_allclose(ad.obsm["spatial"], df[["x", "y"]].to_numpy())
    with pytest.raises(ToolError, match="State the unit"):
        read_any(tmp_path / "cells.parquet")
    ad.write_h5ad(tmp_path / "a.h5ad")
    back = read_any(tmp_path / "a.h5ad")
    assert back.uns["spatial_units"] == "px"
    del ad.obsm["spatial"]
    del ad.uns["spatial_units"]
    ad.write_h5ad(tmp_path / "b.h5ad")
    with pytest.raises(ToolError, match="x_col and y_col") as e:
        read_any(tmp_path / "b.h5ad")
    assert "units='um'" in str(e.value)  # the unit is missing too: said in the same message
    with pytest.raises(ToolError, match="Only one coordinate column") as e:
        read_any(tmp_path / "b.h5ad", x_col="x", units="um")
    assert "y_col" in str(e.value)
    ok = read_any(tmp_path / "b.h5ad", x_col="x", y_col="y", units="um")
    assert ok.obsm["spatial"].shape == (100, 2)
    with pytest.raises(ToolError, match="Cannot tell the format"):
        (tmp_path / "empty").mkdir()
        read_any(tmp_path / "empty")
    with pytest.raises(ToolError, match="do not apply"):
        from servers.spatial.synthetic import write_merfish

        write_merfish(tmp_path / "m2")
        read_any(tmp_path / "m2", units="um")
