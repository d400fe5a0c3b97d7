"""The weight-free classical segmenter: synthetic ground truth (exact) and MoNuSeg / StarDist data."""

from __future__ import annotations

import numpy as np
import pytest

from servers.common import synthetic
from servers.common.errors import ToolError
from servers.common.metrics import match_instances, segmentation_scores
from servers.common.segmenters import get_segmenter

MONUSEG = ["TCGA-2Z-A9J9-01A-01-TS1", "TCGA-AC-A2FO-01A-01-TS1", "TCGA-HT-8564-01Z-00-DX1"]


@pytest.mark.parametrize("modality", ["he", "fluorescence"])
def test_synthetic_nuclei_recovered(modality):
    s = synthetic.nuclei_image((256, 256), 30, modality=modality, seed=1)
    lab = get_segmenter("classical", modality=modality).segment(s.image, mpp=0.5 if modality == "he" else None)
    assert lab.dtype == np.int32 and lab.shape == (256, 256)
    m = match_instances(s.labels, lab, 0.5)
    assert m.n_gt == 30
    assert m.f1 >= 0.95, m.summary()
    assert m.mean_matched_iou > 0.8


def test_touching_nuclei_are_split():
    """Two overlapping discs (a figure-eight) must become two instances, one disc stays one."""
    yy, xx = np.mgrid[0:80, 0:120]
    a = (yy - 40) ** 2 + (xx - 40) ** 2 <= 15**2
    b = (yy - 40) ** 2 + (xx - 64) ** 2 <= 15**2
    img = np.where(a | b, 0.9, 0.1).astype(np.float32)
    lab = get_segmenter("classical", modality="fluorescence", radius_px=15).segment(img)
    assert lab.max() == 2
    assert lab[40, 30] != lab[40, 75] and lab[40, 30] > 0 and lab[40, 75] > 0
    by_um = get_segmenter("classical", modality="fluorescence", radius_um=7.5).segment(img, mpp=0.5)
    np.testing.assert_array_equal(by_um, lab)  # 7.5 µm at 0.5 µm/px = 15 px
    single = np.where(a, 0.9, 0.1).astype(np.float32)
    assert get_segmenter("classical", modality="fluorescence", radius_px=15).segment(single).max() == 1


def test_mpp_scales_size_filter():
    """The same image at a finer claimed mpp has smaller physical nuclei: min_area_um2 removes them."""
    s = synthetic.nuclei_image((128, 128), 8, radius=(5, 6), modality="he", seed=2)
    seg = get_segmenter("classical", modality="he", min_area_um2=10.0)
    assert seg.segment(s.image, mpp=0.5).max() == 8  # >= 14 µm² each at 0.5 µm/px
    assert seg.segment(s.image, mpp=0.25).max() == 0  # <= 7 µm² at 0.25 µm/px


def test_blank_and_bad_input():
    seg = get_segmenter("classical", modality="he")
    blank = np.full((64, 64, 3), 240, np.uint8)
    assert seg.segment(blank, mpp=0.5).max() == 0
    with pytest.raises(ToolError, match="RGB"):
        seg.segment(np.zeros((32, 32), np.uint8), mpp=0.5)
    with pytest.raises(ToolError, match="mpp"):
        seg.segment(blank, mpp=-1)
    with pytest.raises(ToolError, match="Unknown option"):
        get_segmenter("classical", modality="he", nonsense=1).segment(blank, mpp=0.5)
    f = get_segmenter("classical", modality="fluorescence")
    assert f.segment(np.zeros((32, 32), np.float32)).max() == 0


@pytest.mark.parametrize("name", MONUSEG)
def test_monuseg_f1(shared_data, name):
    """Weight-free default on MoNuSeg 40x tiles: F1@0.5 >= 0.70 on every tile (measured 0.71/0.72/0.80)."""
    import tifffile

    from servers.common.annotations import imagescope_to_labels

    img = tifffile.imread(shared_data / "he_nuclei" / f"{name}.tif")[..., :3]
    gt = imagescope_to_labels(shared_data / "he_nuclei" / f"{name}.xml", img.shape)
    pred = get_segmenter("classical", modality="he").segment(img, mpp=0.2525)
    s = segmentation_scores(gt, pred, thresholds=(0.5,))
    assert s["f1"]["0.5"] >= 0.70, s
    assert s["aji"] >= 0.48, s
    assert abs(s["relative_count_error"]) < 0.15, s


def test_stardist_fluorescence(shared_data):
    import tifffile

    img = tifffile.imread(shared_data / "fluo_nuclei" / "stardist_img2d.tif")
    gt = tifffile.imread(shared_data / "fluo_nuclei" / "stardist_img2d.mask.tif").astype(np.int32)
    pred = get_segmenter("classical", modality="fluorescence").segment(img)
    m = match_instances(gt, pred, 0.5)
    assert m.f1 >= 0.65, m.summary()  # measured 0.70
