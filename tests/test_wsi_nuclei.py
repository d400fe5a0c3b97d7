"""Nucleus segmentation of images, regions and whole slides; stitching; morphometry in µm."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from servers.common import synthetic
from servers.common.errors import ToolError
from servers.common.metrics import match_instances
from servers.common.segmenters import get_segmenter
from servers.wsi.nuclei import label_polygons, morphometry, segment_image, segment_region, segment_slide
from servers.wsi.slide import open_slide
from servers.wsi.synth import nuclei_slide


@pytest.fixture(scope="module")
def crowded():
    return synthetic.nuclei_image((640, 640), 220, radius=(7, 11), modality="he", seed=3)


def test_tiled_equals_whole(crowded):
    """Stitched tiles (cores 160 px, context 40 px) find exactly the nuclei the whole image does."""
    whole = get_segmenter("classical", modality="he").segment(crowded.image, mpp=0.5)
    calls = []
    tiled = segment_image(crowded.image, mpp=0.5, tile_px=160, overlap_px=40,
                          progress=lambda d, t=None, m=None: calls.append((d, t)))
    assert calls[-1] == (16, 16)
    n = int(crowded.labels.max())
    mw, mt = match_instances(crowded.labels, whole), match_instances(crowded.labels, tiled)
    assert mt.tp >= n - 2 and mt.f1 >= 0.98, mt.summary()
    assert mt.n_pred == mw.n_pred
    assert match_instances(whole, tiled, 0.5).f1 >= 0.98
    # every stitched label is one connected object (no nucleus split across a tile border)
    from scipy import ndimage as ndi

    for i, sl in enumerate(ndi.find_objects(tiled), 1):
        if sl is not None:
            assert ndi.label(tiled[sl] == i)[1] == 1


def test_morphometry_exact_units():
    lab = np.zeros((100, 120), np.int32)
    yy, xx = np.mgrid[0:100, 0:120]
    lab[(yy - 50) ** 2 + (xx - 40) ** 2 <= 15**2] = 1  # disc r = 15 px
    lab[20:30, 80:110] = 2  # 10 x 30 px rectangle
    rgb = np.full((100, 120, 3), 200, np.uint8)
    df = morphometry(lab, rgb, 0.5, offset_xy=(1000, 2000), scale_to_level0=2.0).set_index("label")
    assert df.loc[1, "area_um2"] == pytest.approx((lab == 1).sum() * 0.25)
    assert df.loc[1, "equivalent_diameter_um"] == pytest.approx(15.0, rel=0.02)
    assert df.loc[1, "eccentricity"] < 0.1
    assert df.loc[1, "solidity"] > 0.95
    assert df.loc[2, "area_um2"] == pytest.approx(300 * 0.25)
    assert df.loc[2, "major_axis_um"] / df.loc[2, "minor_axis_um"] == pytest.approx(3.0, rel=0.05)
    # centroid of the disc: local (row 50, col 40) → level-0 x = 1000 + 2*40, y = 2000 + 2*50; level-0 mpp 0.25
    assert df.loc[1, "x"] == pytest.approx(1080) and df.loc[1, "y"] == pytest.approx(2100)
    assert df.loc[1, "x_um"] == pytest.approx(1080 * 0.25)
    assert df.loc[1, "mean_intensity"] == pytest.approx(200)


def test_polygons_cover_objects():
    from shapely.geometry import Polygon

    s = synthetic.nuclei_image((200, 200), 12, modality="he", seed=5)
    rings = label_polygons(s.labels, offset_xy=(10, 20))
    assert len(rings) == s.labels.max()
    for i, ring in rings.items():
        poly = Polygon(ring)
        assert poly.is_valid
        assert poly.area == pytest.approx((s.labels == i).sum(), rel=0.25)
        cy, cx = np.argwhere(s.labels == i).mean(axis=0)
        assert poly.contains(Polygon([(cx + 10, cy + 20), (cx + 10.5, cy + 20), (cx + 10, cy + 20.5)]).centroid)


def test_segment_region_on_plain_image(data_root):
    from PIL import Image

    s = synthetic.nuclei_image((400, 400), 60, modality="he", seed=7)
    Image.fromarray(s.image).save(data_root / "he.png")
    with pytest.raises(ToolError, match="mpp"):
        segment_region(open_slide("he.png"), 0, 0, 400, 400)
    sl = open_slide("he.png", mpp=0.5)
    res = segment_region(sl, 0, 0, 400, 400, tile_px=128, overlap_px=32)
    m = match_instances(s.labels, res.labels)
    assert m.f1 >= 0.97
    summ = res.summary()
    assert summ["n_nuclei"] == m.n_pred
    assert summ["density_per_mm2"] == pytest.approx(m.n_pred / (400 * 400 * 0.25e-6))
    # at half resolution (1 µm/px) the same nuclei are found, centroids mapped back to level-0 px
    half = segment_region(sl, 0, 0, 200, 200, mpp=1.0)
    d, _ = cKDTree(s.centers[:, ::-1]).query(half.table[["x", "y"]].to_numpy())
    assert len(half.table) >= 57 and np.median(d) < 1.5


def test_segment_slide_unique_and_complete(data_root):
    truth = nuclei_slide(data_root / "nuc.tif", (768, 768), 170, mpp=0.5, seed=2)
    whole = get_segmenter("classical", modality="he").segment(truth["image"], mpp=0.5)
    sl = open_slide("nuc.tif")
    seen = []
    res = segment_slide(sl, tile_px=192, overlap_px=32, min_tissue_fraction=0.0, polygons=True,
                        progress=lambda d, t=None, m=None: seen.append(d))
    table = res["table"]
    n = len(truth["radii"])
    d, idx = cKDTree(truth["centers_rc"][:, ::-1]).query(table[["x", "y"]].to_numpy())
    # exactly what whole-image segmentation finds (171: one small over-split fragment) — no
    # duplicates at the 16 tile borders, none lost — and every true nucleus found once
    assert len(table) == whole.max()
    assert len(set(idx[d < 3])) >= n - 2
    assert res["summary"]["n_tiles"] == 16 and seen
    assert res["tiles"]["n_nuclei"].sum() == len(table)
    area = truth["labels"] > 0
    assert table["area_um2"].sum() == pytest.approx(area.sum() * 0.25, rel=0.05)
    assert all(isinstance(p, list) and len(p) >= 4 for p in table["polygon"])
    with pytest.raises(ToolError, match="max_tiles"):
        segment_slide(sl, tile_px=128, max_tiles=3, min_tissue_fraction=0.0)


def test_segment_slide_parallel_matches_serial(data_root):
    nuclei_slide(data_root / "nuc2.tif", (512, 512), 70, mpp=0.5, seed=4)
    sl = open_slide("nuc2.tif")
    a = segment_slide(sl, tile_px=256, min_tissue_fraction=0.0, workers=1)["table"]
    b = segment_slide(sl, tile_px=256, min_tissue_fraction=0.0, workers=2)["table"]
    assert len(a) >= 68
    assert len(a) == len(b)
    np.testing.assert_allclose(np.sort(a["area_um2"].to_numpy()), np.sort(b["area_um2"].to_numpy()))


def test_unknown_backend_and_missing_weights():
    img = np.full((64, 64, 3), 230, np.uint8)
    with pytest.raises(ToolError, match="Unknown segmentation backend"):
        segment_image(img, mpp=0.5, backend="nope")
    with pytest.raises(ToolError, match="mpp"):
        segment_image(img, mpp=0)


def test_monuseg_through_region(shared_data_root):
    """The MoNuSeg tile opened as a one-level slide (mpp given), segmented via tiles of 512 px."""
    from servers.common.annotations import imagescope_to_labels
    from servers.common.metrics import segmentation_scores

    name = "TCGA-HT-8564-01Z-00-DX1"
    sl = open_slide(f"he_nuclei/{name}.tif", mpp=0.2525)
    res = segment_region(sl, 0, 0, 1000, 1000, tile_px=512, overlap_px=64)
    gt = imagescope_to_labels(shared_data_root / "he_nuclei" / f"{name}.xml", (1000, 1000))
    s = segmentation_scores(gt, res.labels, thresholds=(0.5,))
    assert s["f1"]["0.5"] >= 0.75, s  # 0.80 untiled


@pytest.mark.slow
def test_segment_shared_slide(shared_data_root):
    sl = open_slide("wsi/cmu-1-small-region.svs")
    res = segment_slide(sl, tile_px=1024)
    s = res["summary"]
    assert s["n_nuclei"] > 1000
    assert 500 < s["density_per_mm2"] < 10000
    assert 10 < s["median_area_um2"] < 60
