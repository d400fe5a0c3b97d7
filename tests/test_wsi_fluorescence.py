"""Fluorescence nuclei through the wsi library and server: raw 16-bit values, calibration from TIFF
tags, auto modality, channels, flat-field correction, whole-slide tiling; exact synthetic truth."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from servers.common import synthetic
from servers.common.errors import ToolError
from servers.common.metrics import match_instances
from servers.wsi.nuclei import detect_modality, morphometry, segment_region, segment_slide
from servers.wsi.slide import open_slide, tiff_mpp

RES_05 = {"resolution": (1e4 / 0.5, 1e4 / 0.5), "resolutionunit": "CENTIMETER"}  # 0.5 µm/px


@pytest.fixture
def fluo(data_root):
    """A uint16 fluorescence TIFF (0.5 µm/px in its tags) with 30 known nuclei."""
    s = synthetic.nuclei_image((256, 256), 30, modality="fluorescence", seed=11)
    raw = np.round(s.image * 4000 + 100).astype(np.uint16)
    tifffile.imwrite(data_root / "fluo.tif", raw, **RES_05)
    return s, raw


def test_tiff_calibration(data_root):
    img = np.zeros((8, 8), np.uint16)
    tifffile.imwrite(data_root / "cm.tif", img, **RES_05)
    tifffile.imwrite(data_root / "inch.tif", img, resolution=(25_400 / 0.25, 25_400 / 0.25), resolutionunit="INCH")
    tifffile.imwrite(data_root / "dpi72.tif", img, resolution=(72, 72), resolutionunit="INCH")
    tifffile.imwrite(data_root / "none.tif", img)
    assert tiff_mpp(data_root / "cm.tif") == pytest.approx(0.5)
    assert tiff_mpp(data_root / "inch.tif") == pytest.approx(0.25)
    assert tiff_mpp(data_root / "dpi72.tif") is None  # 352 µm/px: the usual "no calibration" default
    assert tiff_mpp(data_root / "none.tif") is None
    s = open_slide("cm.tif")
    assert (s.mpp, s.mpp_source) == (pytest.approx(0.5), "metadata")
    assert open_slide("cm.tif", mpp=0.3).mpp == 0.3  # an explicit mpp wins


def test_fluorescence_region_keeps_raw_values(fluo):
    truth, raw = fluo
    s = open_slide("fluo.tif")
    assert s.n_channels == 1 and s.raw_dtype == "uint16"
    np.testing.assert_array_equal(s.read_intensity_ds(0, 0, 256, 256), raw.astype(np.float32))
    assert detect_modality(s) == "fluorescence"
    res = segment_region(s)  # whole image, modality auto, mpp from the tags
    assert res.modality == "fluorescence" and res.labels.shape == (256, 256)
    m = match_instances(truth.labels, res.labels)
    assert m.n_gt == 30 and m.tp >= 28 and abs(m.n_pred - 30) <= 2, m
    sm = res.summary()
    assert sm["n_nuclei"] == res.labels.max() == len(res.table)
    # exact bookkeeping on the predicted labels: px areas, µm², density, fraction, raw intensities
    areas = np.bincount(res.labels.ravel())[1:]
    t = res.table.set_index("label")
    np.testing.assert_array_equal(t["area_px"].to_numpy(), areas)
    np.testing.assert_allclose(t["area_um2"].to_numpy(), areas * 0.25)
    assert sm["mean_area_um2"] == pytest.approx(areas.mean() * 0.25, abs=1e-3)
    assert sm["max_area_um2"] == pytest.approx(areas.max() * 0.25, abs=1e-3)
    assert sm["density_per_mm2"] == pytest.approx(len(areas) / (256 * 256 * 0.25e-6), abs=0.01)
    assert sm["nuclear_area_fraction"] == pytest.approx((res.labels > 0).mean(), abs=1e-6)
    sums = np.bincount(res.labels.ravel(), weights=raw.ravel().astype(float))[1:]
    np.testing.assert_allclose(t["mean_intensity"].to_numpy(), sums / areas, rtol=1e-5)
    assert t["mean_intensity"].min() > 255  # 16-bit units, not an 8-bit display copy
    assert "mean_hematoxylin_od" not in t
    # the true nuclei's mean size is recovered
    true_areas = np.bincount(truth.labels.ravel())[1:]
    assert sm["mean_area_um2"] == pytest.approx(true_areas.mean() * 0.25, rel=0.1)


def test_modality_choice_and_errors(fluo, data_root):
    from PIL import Image

    he = synthetic.nuclei_image((128, 128), 8, modality="he", seed=3)
    Image.fromarray(he.image).save(data_root / "he.png")
    assert detect_modality(open_slide("he.png", mpp=0.5)) == "he"
    assert segment_region(open_slide("he.png", mpp=0.5)).modality == "he"
    # an 8-bit grey PNG of a fluorescence image is detected as fluorescence too
    _, raw = fluo
    Image.fromarray((raw // 16).astype(np.uint8)).save(data_root / "fluo8.png")
    assert detect_modality(open_slide("fluo8.png", mpp=0.5)) == "fluorescence"
    s = open_slide("fluo.tif")
    with pytest.raises(ToolError, match="modality"):
        segment_region(s, modality="brightfield")
    with pytest.raises(ToolError, match="flatfield_um"):
        segment_region(open_slide("he.png", mpp=0.5), modality="he", flatfield_um=20)
    with pytest.raises(ToolError, match="channel"):
        segment_region(s, channel=1)


def test_channel_of_multichannel_tiff(data_root):
    truth = synthetic.nuclei_image((192, 192), 15, modality="fluorescence", seed=5)
    noise = np.random.default_rng(0).normal(500, 5, (192, 192))
    stack = np.stack([noise, truth.image * 3000 + 200]).astype(np.uint16)  # (C, H, W): nuclei in channel 1
    tifffile.imwrite(data_root / "two.tif", stack, **RES_05)
    s = open_slide("two.tif")
    assert s.n_channels == 2 and detect_modality(s) == "fluorescence"
    res = segment_region(s, channel=1)
    assert match_instances(truth.labels, res.labels).tp >= 14
    assert res.table["mean_intensity"].min() > 1000  # measured on channel 1


def test_flatfield_recovers_dim_side(data_root):
    truth = synthetic.nuclei_image((256, 256), 30, modality="fluorescence", seed=602)
    ramp = 0.04 + 0.96 * np.linspace(0, 1, 256)[None, :]
    img = truth.image * ramp * 2000 + 300 + np.random.default_rng(1).normal(0, 20, (256, 256))
    tifffile.imwrite(data_root / "uneven.tif", np.clip(img, 0, 65535).astype(np.uint16), **RES_05)
    s = open_slide("uneven.tif")
    plain = match_instances(truth.labels, segment_region(s).labels)
    flat = match_instances(truth.labels, segment_region(s, flatfield_um=20).labels)
    assert flat.tp > plain.tp and flat.tp >= 26, (plain, flat)


def test_fluorescence_whole_slide_tiles_match_region(fluo):
    s = open_slide("fluo.tif")
    region = segment_region(s)
    res = segment_slide(s, tile_px=128, overlap_px=32, modality="auto")
    sm = res["summary"]
    assert sm["modality"] == "fluorescence" and sm["density_basis"] == "image area"
    assert sm["n_tiles"] == 4
    assert abs(sm["n_nuclei"] - region.summary()["n_nuclei"]) <= 2
    assert res["table"]["mean_intensity"].min() > 255


def test_morphometry_of_grey_image_has_intensity_only():
    lab = np.zeros((20, 20), np.int32)
    lab[2:6, 2:6] = 1
    lab[10:15, 10:12] = 2
    img = np.arange(400, dtype=np.float32).reshape(20, 20)
    df = morphometry(lab, img, 0.5).set_index("label")
    assert df.loc[1, "area_px"] == 16 and df.loc[2, "area_px"] == 10
    assert df.loc[1, "mean_intensity"] == pytest.approx(img[2:6, 2:6].mean())
    assert "mean_hematoxylin_od" not in df


async def test_server_fluorescence_whole_image(mcp_client, fluo, workspace):
    truth, _ = fluo
    async with mcp_client("wsi") as c:
        res = await c.call_tool("segment_nuclei", {"slide": "fluo.tif"})
        assert not res.is_error, res.content
        sm = res.structured_content
        assert sm["modality"] == "fluorescence" and sm["mpp"] == pytest.approx(0.5)
        assert sm["shape_px"] == [256, 256] and abs(sm["n_nuclei"] - 30) <= 2
        assert any(getattr(x, "type", "") == "image" for x in res.content)
        lab = workspace.load(sm["labels_artifact"])
        assert int(lab.max()) == sm["n_nuclei"]
        bad = await c.call_tool("segment_nuclei", {"slide": "fluo.tif", "channel": 3}, raise_on_error=False)
        assert bad.is_error and "channel" in bad.content[0].text
