"""Cellpose backend: weights trained here by `cytoagent segmenters train cellpose`, then loaded and run.

Skips cleanly when the ``cellpose`` package is not installed (``pip install 'cytoagent[cellpose]'``).
Training uses the shared fluorescence images, so these tests also need ../shared/data; training
(~30 s) and running an under-trained network on CPU make them ``slow``.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from servers.common.errors import ToolError
from servers.common.segmenters import available_backends, get_segmenter

pytest.importorskip("cellpose", reason="cellpose not installed (pip install 'cytoagent[cellpose]')")


@pytest.fixture(scope="module")
def cellpose_weights(tmp_path_factory, shared_data):
    """Real Cellpose weights: one epoch on two shared training images via the CLI."""
    from cytoagent.cli import main

    out = tmp_path_factory.mktemp("cpmodels")
    rc = main(["segmenters", "train", "cellpose", "--data", str(shared_data / "fluo_nuclei"), "--out", str(out),
               "--limit", "2", "--epochs", "1", "--name", "cp_test", "--device", "cpu", "--json"])
    assert rc == 0
    return out / "cp_test"


@pytest.mark.slow
@pytest.mark.shared_data
def test_training_writes_cellpose_weights(cellpose_weights):
    import torch

    assert cellpose_weights.is_file()
    sd = torch.load(cellpose_weights, map_location="cpu", weights_only=True)
    assert "diam_mean" in sd and float(sd["diam_mean"][0]) == 17.0  # Cellpose's own format
    meta = json.loads(cellpose_weights.with_name("cp_test.json").read_text())
    assert meta["backend"] == "cellpose" and meta["n_images"] == 2 and meta["epochs"] == 1
    assert not list(cellpose_weights.parent.glob(".cp_test-*"))  # no temp left behind


@pytest.mark.slow
@pytest.mark.shared_data
def test_cellpose_loads_and_segments(cellpose_weights, shared_data):
    import tifffile

    img = tifffile.imread(shared_data / "fluo_nuclei" / "stardist_img2d.tif")[:256, :256]
    seg = get_segmenter("cellpose", weights=str(cellpose_weights), device="cpu")
    labels = seg.segment(img)
    assert labels.shape == img.shape and labels.dtype == np.int32 and labels.min() == 0
    batch = seg.segment_batch([img, img[:128, :160]])
    assert [b.shape for b in batch] == [(256, 256), (128, 160)]
    he = np.full((96, 96, 3), 230, np.uint8)
    assert get_segmenter("cellpose", modality="he", weights=str(cellpose_weights)).segment(he, mpp=0.5).shape == (96, 96)


@pytest.mark.slow
@pytest.mark.shared_data
def test_cellpose_options_and_errors(cellpose_weights, tmp_path):
    img = np.zeros((64, 64), np.float32)
    with pytest.raises(ToolError, match="mpp"):
        get_segmenter("cellpose", weights=str(cellpose_weights), diameter_um=8).segment(img)
    assert get_segmenter("cellpose", weights=str(cellpose_weights), diameter_um=8).segment(img, mpp=0.5).shape == (64, 64)
    with pytest.raises(ToolError, match="> 0"):
        get_segmenter("cellpose", weights=str(cellpose_weights), diameter=-3).segment(img)


def test_missing_cellpose_weights_never_download(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLPOSE_LOCAL_MODELS_PATH", str(tmp_path / "cache"))
    monkeypatch.delenv("CYTOAGENT_CELLPOSE_WEIGHTS", raising=False)
    with pytest.raises(ToolError) as e:
        get_segmenter("cellpose").segment(np.zeros((32, 32), np.float32))
    assert "No cellpose weights found" in str(e.value) and "segmenters train cellpose" in str(e.value)
    with pytest.raises(ToolError, match="'cyto3' not found"):
        get_segmenter("cellpose", weights="cyto3").segment(np.zeros((32, 32), np.float32))
    assert available_backends()["cellpose"]["status"] == "ready"


def test_our_ap_matches_cellpose_metrics():
    """servers.common.metrics.average_precision equals cellpose.metrics.average_precision.

    Cellpose counts objects as ``labels.max()``, so ids must be consecutive for it; ours relabels.
    """
    from cellpose import metrics as cpm
    from skimage.segmentation import relabel_sequential

    from servers.common.metrics import average_precision
    from servers.common.synthetic import nuclei_image

    gts, preds = [], []
    for seed in range(4):
        r = nuclei_image((128, 128), 20, seed=seed)
        pred = np.roll(r.labels, seed + 1, axis=seed % 2)  # shifted copy → IoUs spread over thresholds
        pred[pred == 3] = 0
        gts.append(r.labels)
        preds.append(pred)
    th = [0.5, 0.6, 0.75, 0.9]
    ref = cpm.average_precision(gts, [relabel_sequential(p)[0] for p in preds], threshold=th)[0]
    ours = np.array([[average_precision(g, p, th)[t] for t in th] for g, p in zip(gts, preds)])
    np.testing.assert_allclose(ours, ref, atol=1e-6)
