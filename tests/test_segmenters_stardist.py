"""StarDist backend: a model folder trained here by `cytoagent segmenters train stardist`, loaded and run.

Skips cleanly when ``stardist``/TensorFlow are not installed (``pip install 'cytoagent[stardist]'``;
TensorFlow is ~2.5 GB, so it is not in the default environment). Training uses the shared
fluorescence images, so these tests also need ../shared/data.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from servers.common.errors import ToolError
from servers.common.segmenters import available_backends, get_segmenter

pytest.importorskip("stardist", reason="stardist/TensorFlow not installed (pip install 'cytoagent[stardist]')")
pytest.importorskip("tensorflow", reason="TensorFlow not installed (pip install 'cytoagent[stardist]')")


@pytest.fixture(scope="module")
def stardist_model(tmp_path_factory, shared_data):
    """A real StarDist2D folder: 1 epoch × 3 steps on three shared training images via the CLI."""
    from cytoagent.cli import main

    out = tmp_path_factory.mktemp("sdmodels")
    rc = main(["segmenters", "train", "stardist", "--data", str(shared_data / "fluo_nuclei"), "--out", str(out),
               "--limit", "3", "--epochs", "1", "--steps-per-epoch", "3", "--name", "sd_test", "--device", "cpu"])
    assert rc == 0
    return out / "sd_test"


@pytest.mark.slow
@pytest.mark.shared_data
def test_training_writes_stardist_folder(stardist_model):
    cfg = json.loads((stardist_model / "config.json").read_text())
    assert cfg["n_channel_in"] == 1 and cfg["n_rays"] == 32 and cfg["grid"] == [2, 2]
    assert (stardist_model / "weights_best.h5").is_file() or list(stardist_model.glob("*.weights.h5"))
    th = json.loads((stardist_model / "thresholds.json").read_text())
    assert 0 < th["prob"] < 1 and th["nms"] in (0.3, 0.4)
    meta = json.loads((stardist_model.parent / "sd_test.json").read_text())
    assert meta["backend"] == "stardist" and meta["n_train"] + meta["n_val"] == 3
    assert not list(stardist_model.parent.glob(".sd_test-tmp-*"))


@pytest.mark.slow
@pytest.mark.shared_data
def test_stardist_loads_and_segments(stardist_model, shared_data, capfd):
    import tifffile

    img = tifffile.imread(shared_data / "fluo_nuclei" / "stardist_img2d.tif")[:256, :256]
    seg = get_segmenter("stardist", weights=str(stardist_model), device="cpu")
    labels = seg.segment(img)
    assert labels.shape == img.shape and labels.dtype == np.int32 and labels.min() == 0
    batch = seg.segment_batch([img, img[:128, :160]])
    assert [b.shape for b in batch] == [(256, 256), (128, 160)]
    he = np.full((96, 96, 3), 230, np.uint8)
    assert get_segmenter("stardist", modality="he", weights=str(stardist_model)).segment(he).shape == (96, 96)
    assert capfd.readouterr().out == ""  # nothing on stdout (the MCP stdio channel)


@pytest.mark.slow
@pytest.mark.shared_data
def test_stardist_options(stardist_model):
    img = np.random.default_rng(0).random((128, 128)).astype(np.float32)
    seg = get_segmenter("stardist", weights=str(stardist_model), prob_thresh=0.99, nms_thresh=0.3, n_tiles=[2, 2])
    assert seg.segment(img).shape == (128, 128)


def test_missing_stardist_model(tmp_path, monkeypatch):
    monkeypatch.delenv("CYTOAGENT_STARDIST_WEIGHTS", raising=False)
    with pytest.raises(ToolError) as e:
        get_segmenter("stardist").segment(np.zeros((32, 32), np.float32))
    assert "No stardist weights found" in str(e.value) and "config.json" in str(e.value)
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ToolError, match="not found"):
        get_segmenter("stardist", weights=str(tmp_path / "notamodel")).segment(np.zeros((32, 32), np.float32))
    assert available_backends()["stardist"]["status"] == "ready"
