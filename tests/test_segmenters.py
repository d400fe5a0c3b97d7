"""Model-backed segmenters: bioimage.io U-Net (torch + ONNX), post-processing, weights lookup, CLI.

Cellpose and StarDist have their own files (they skip when their package is not installed).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from servers.common.errors import ToolError
from servers.common.metrics import segmentation_scores
from servers.common.segmenters import available_backends, get_segmenter
from servers.common.segmenters.postprocess import nuclear_channel, seeded_watershed
from servers.common.synthetic import nuclei_image

torch = pytest.importorskip("torch")

MODEL = "models/unet2d_nuclei_broad"


def _touching_discs():
    """Two overlapping discs split along the perpendicular bisector, plus one lone disc."""
    yy, xx = np.mgrid[:60, :80]
    centers = [(30, 20), (30, 34), (30, 62)]
    d = np.stack([np.hypot(yy - r, xx - c) for r, c in centers])
    labels = np.where(d.min(0) <= 9, d.argmin(0) + 1, 0).astype(np.int32)
    return labels


# --------------------------------------------------------------------------- post-processing


def test_seeded_watershed_splits_touching_discs():
    gt = _touching_discs()
    fg = (gt > 0).astype(np.float32)
    out = seeded_watershed(fg, min_distance=5, min_size=10)
    assert out.dtype == np.int32 and out.max() == 3
    s = segmentation_scores(gt, out)
    assert s["ap"]["0.75"] == 1.0 and s["aji"] > 0.9
    # a naive connected-component labelling merges the touching pair
    from scipy import ndimage as ndi

    assert ndi.label(fg > 0.5)[1] == 2


def test_seeded_watershed_with_boundary_map_is_exact_on_cores():
    from skimage.segmentation import find_boundaries

    r = nuclei_image((128, 128), 25, modality="fluorescence", seed=3)
    fg = (r.labels > 0).astype(np.float32)
    bd = find_boundaries(r.labels, mode="inner").astype(np.float32)
    out = seeded_watershed(fg, bd, min_size=1)
    s = segmentation_scores(r.labels, out, thresholds=(0.9,))
    assert s["n_pred"] == s["n_gt"] and s["ap"]["0.9"] == 1.0


def test_seeded_watershed_edge_cases():
    assert seeded_watershed(np.zeros((10, 10))).max() == 0
    fg = np.zeros((20, 20))
    fg[2:4, 2:4] = 1  # 4 px, below min_size
    fg[10:18, 10:18] = 1
    out = seeded_watershed(fg, min_size=10)
    assert out.max() == 1 and out[3, 3] == 0 and out[14, 14] == 1
    with pytest.raises(ToolError, match="2-D"):
        seeded_watershed(np.zeros((2, 3, 4)))
    with pytest.raises(ToolError, match="Boundary"):
        seeded_watershed(fg, np.zeros((5, 5)))


def test_nuclear_channel():
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 30
    rgb[..., 2] = 90
    np.testing.assert_allclose(nuclear_channel(rgb, "fluorescence"), 40.0)
    he = np.full((4, 4, 3), 240, np.uint8)
    he[1, 1] = (60, 40, 140)  # hematoxylin-purple pixel
    h = nuclear_channel(he, "he")
    assert h.shape == (4, 4) and h[1, 1] > h[0, 0] + 0.1
    with pytest.raises(ToolError, match="RGB"):
        nuclear_channel(np.zeros((4, 4)), "he")


# --------------------------------------------------------------------------- U-Net architecture & tiling


def test_tiled_predict_equals_whole_image_for_local_op():
    """With a halo ≥ the operator's reach, tiling is exact (here a 5×5 box mean)."""
    from scipy import ndimage as ndi

    from servers.common.segmenters.unet import tiled_predict

    rng = np.random.default_rng(0)
    img = rng.random((300, 200)).astype(np.float32)

    def fn(batch):
        return np.stack([ndi.uniform_filter(b[0], 5, mode="reflect")[None] for b in batch])

    whole = ndi.uniform_filter(img, 5, mode="reflect")
    out = tiled_predict(img, fn, tile=96, halo=8, batch_size=3)
    assert out.shape == (1, 300, 200)
    # borders of the image itself see reflect padding in both; interior must be identical
    np.testing.assert_allclose(out[0], whole, atol=1e-6)
    small = tiled_predict(img[:50, :30], fn, tile=96, halo=8)  # padded up to a tile, cropped back
    assert small.shape == (1, 50, 30)


def test_state_dict_roundtrip(tmp_path):
    """A plain state dict saved from our UNet2d loads back and gives identical logits."""
    from servers.common.segmenters.unet import UNetModel, build_unet2d

    torch.manual_seed(0)
    net = build_unet2d(1, 2).eval()
    torch.save(net.state_dict(), tmp_path / "w.pth")
    m = UNetModel.load(tmp_path / "w.pth")
    assert m.runtime == "torch" and m.out_channels == 2
    x = np.random.default_rng(1).standard_normal((2, 1, 64, 64)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(m.logits(x), ref, atol=1e-5)
    # a checkpoint dict with "state_dict" works too
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    assert UNetModel.load(tmp_path / "ckpt.pt").out_channels == 2


def test_bad_weight_files(tmp_path):
    from servers.common.segmenters.unet import UNetModel

    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ToolError, match="neither a PyTorch state dict"):
        UNetModel.load(tmp_path / "junk.pt")
    torch.save({"a": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ToolError, match="UNet2d"):
        UNetModel.load(tmp_path / "other.pt")
    with pytest.raises(ToolError, match="No weights.pt"):
        UNetModel.load(tmp_path)


# --------------------------------------------------------------------------- the real bioimage.io model


@pytest.mark.shared_data
@pytest.mark.parametrize("fname", ["weights.pt", "weights.onnx"])
def test_reproduces_bioimageio_test_output(shared_data, fname):
    from servers.common.segmenters.unet import UNetModel

    d = shared_data / MODEL
    x = np.load(d / "test_input.npy")
    y = np.load(d / "test_output.npy")
    m = UNetModel.load(d / fname)
    assert m.runtime == ("onnx" if fname.endswith("onnx") else "torch")
    p = m.predict(x[0, 0])
    assert p.shape == y.shape[1:]
    assert np.abs(p - y[0]).max() < 1e-4


@pytest.mark.shared_data
def test_architecture_matches_torchscript_keys(shared_data):
    from servers.common.segmenters.unet import build_unet2d, load_state_dict

    sd = load_state_dict(shared_data / MODEL / "weights.pt")
    ours = build_unet2d(1, 1).state_dict()
    assert list(sd) == list(ours)
    assert all(sd[k].shape == ours[k].shape for k in ours)


@pytest.mark.shared_data
def test_unet_segments_fluorescence(shared_data):
    import tifffile

    from servers.common.annotations import read_label_image

    img = tifffile.imread(shared_data / "fluo_nuclei" / "stardist_img2d.tif")
    gt = read_label_image(shared_data / "fluo_nuclei" / "stardist_img2d.mask.tif")
    seg = get_segmenter("unet", weights=str(shared_data / MODEL))
    labels = seg.segment(img)
    assert labels.shape == img.shape and labels.dtype == np.int32
    s = segmentation_scores(gt, labels)
    # measured 0.64 AP@0.5 / 0.78 F1 on this image (125 nuclei)
    assert s["ap"]["0.5"] > 0.55 and s["f1"]["0.5"] > 0.7
    assert abs(s["count_error"]) < 20


@pytest.mark.shared_data
def test_unet_segments_he_with_mpp(shared_data):
    import tifffile

    from servers.common.annotations import imagescope_to_labels

    name = "TCGA-HT-8564-01Z-00-DX1"
    img = tifffile.imread(shared_data / "he_nuclei" / f"{name}.tif")
    gt = imagescope_to_labels(shared_data / "he_nuclei" / f"{name}.xml", img.shape)
    seg = get_segmenter("unet", modality="he", weights=str(shared_data / MODEL), runtime="onnx")
    labels = seg.segment(img, mpp=0.2525)  # rescaled to the default model_mpp 0.5 for H&E
    assert labels.shape == (1000, 1000)
    s = segmentation_scores(gt, labels)
    assert s["ap"]["0.5"] > 0.45 and s["f1"]["0.5"] > 0.6  # measured 0.51 / 0.68 (249 nuclei)


@pytest.mark.shared_data
def test_unet_synthetic_and_batch(shared_data):
    r = nuclei_image((256, 256), 30, modality="fluorescence", seed=1)
    seg = get_segmenter("unet", weights=str(shared_data / MODEL), batch_size=2)
    out = seg.segment_batch([r.image, r.image[:128, :200]])
    assert [o.shape for o in out] == [(256, 256), (128, 200)]
    assert segmentation_scores(r.labels, out[0])["ap"]["0.5"] > 0.9  # measured 1.0
    prob = seg.probabilities(r.image)
    assert prob.shape == (1, 256, 256) and 0 <= prob.min() and prob.max() <= 1


# --------------------------------------------------------------------------- weights lookup & errors


def test_missing_weights_error_names_everything(monkeypatch):
    monkeypatch.delenv("CYTOAGENT_UNET_WEIGHTS", raising=False)
    seg = get_segmenter("unet")
    with pytest.raises(ToolError) as e:
        seg.segment(np.zeros((32, 32), np.float32))
    msg = str(e.value)
    assert "No unet weights found" in msg and "CYTOAGENT_UNET_WEIGHTS" in msg
    assert "cytoagent[unet]" in msg and "unet2d_nuclei_broad" in msg


def test_weights_search_order(monkeypatch, tmp_path, data_root, workspace_dir):
    from servers.common.segmenters.unet import build_unet2d
    from servers.common.segmenters.weights import find_weights

    sd = build_unet2d().state_dict()
    a = data_root / "mine" / "a.pt"
    a.parent.mkdir()
    torch.save(sd, a)
    assert find_weights("unet", "mine/a.pt") == a.resolve()  # relative → data root
    assert find_weights("unet", str(a.parent)) == a  # a folder is searched
    with pytest.raises(ToolError, match="climbs out"):
        find_weights("unet", "../x.pt")
    with pytest.raises(ToolError, match="'nope.pt' not found"):
        find_weights("unet", "nope.pt")
    ws = workspace_dir / "models" / "unet" / "trained.pt"
    ws.parent.mkdir(parents=True)
    torch.save(sd, ws)
    assert find_weights("unet") == ws  # workspace models folder
    monkeypatch.setenv("CYTOAGENT_UNET_WEIGHTS", str(a))
    assert find_weights("unet") == a  # env beats workspace
    monkeypatch.setenv("CYTOAGENT_UNET_WEIGHTS", str(tmp_path / "missing"))
    with pytest.raises(ToolError, match="CYTOAGENT_UNET_WEIGHTS"):
        find_weights("unet")
    with pytest.raises(ToolError, match="takes no weights"):
        find_weights("classical")


@pytest.mark.shared_data
def test_default_weights_from_data_root(shared_data_root, monkeypatch):
    from servers.common.segmenters.weights import find_weights

    monkeypatch.delenv("CYTOAGENT_UNET_WEIGHTS", raising=False)
    assert find_weights("unet").name == "weights.pt"
    assert get_segmenter("unet").segment(nuclei_image((64, 64), 3, seed=0).image).shape == (64, 64)


def test_option_errors(tmp_path):
    from servers.common.segmenters.unet import build_unet2d

    torch.save(build_unet2d().state_dict(), tmp_path / "w.pt")
    seg = get_segmenter("unet", weights=str(tmp_path / "w.pt"), scale=100)
    with pytest.raises(ToolError, match="scale"):
        seg.segment(np.zeros((32, 32), np.float32))
    with pytest.raises(ToolError, match="RGB"):
        get_segmenter("unet", modality="he", weights=str(tmp_path / "w.pt")).segment(np.zeros((32, 32)))
    with pytest.raises(ToolError, match="mpp"):
        get_segmenter("unet", modality="he", weights=str(tmp_path / "w.pt")).segment(
            np.zeros((32, 32, 3), np.uint8), mpp=-1)


def test_available_backends_report_missing_extras():
    info = available_backends()
    assert info["unet"]["status"] == "ready"
    for name in ("cellpose", "stardist"):
        st = info[name]["status"]
        assert st == "ready" or f"cytoagent[{name}]" in st


def test_cli_list_json(capsys, tmp_path):
    from cytoagent.cli import main

    assert main(["segmenters", "list", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = {r["backend"]: r for r in out["backends"]}
    assert {"classical", "unet", "cellpose", "stardist"} <= set(names)
    assert names["classical"]["weights"] == "not needed"
    assert out["device"] in ("cpu", "cuda")


@pytest.mark.gpu
@pytest.mark.shared_data
def test_unet_cuda_matches_cpu(shared_data):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from servers.common.segmenters.unet import UNetModel

    d = shared_data / MODEL
    x = np.load(d / "test_input.npy")[0, 0]
    y = np.load(d / "test_output.npy")[0, 0]
    gpu = UNetModel.load(d / "weights.pt", device="cuda")
    assert np.abs(gpu.predict(x)[0] - y).max() < 1e-3
    seg = get_segmenter("unet", device="cuda", weights=str(d))
    assert seg.resolved_device() == "cuda"
    assert seg.segment(x).max() > 50


@pytest.mark.shared_data
def test_runtime_auto_prefers_onnx_on_cpu(shared_data):
    d = str(shared_data / MODEL)
    assert get_segmenter("unet", weights=d, device="cpu")._model().runtime == "onnx"
    assert get_segmenter("unet", weights=d, device="cpu", runtime="torch")._model().runtime == "torch"
    with pytest.raises(ToolError, match="runtime"):
        get_segmenter("unet", weights=d, runtime="tensorrt")._model()


@pytest.mark.shared_data
def test_fluo_training_set(shared_data):
    from servers.common.segmenters.train import load_fluo_training_set

    images, labels = load_fluo_training_set(shared_data / "fluo_nuclei")
    # stardist_img2d + the 10 fluorescence DSB samples (2 stained brightfield ones are skipped)
    assert len(images) == len(labels) == 11
    assert images[0].shape == (512, 512) and len(np.unique(labels[0])) - 1 == 125
    assert all(i.ndim == 2 and i.dtype == np.float32 and i.shape == lb.shape for i, lb in zip(images, labels))
    assert len(load_fluo_training_set(shared_data / "fluo_nuclei", limit=2)[0]) == 2


def test_training_input_errors(tmp_path):
    from servers.common.segmenters.train import load_fluo_training_set, train_cellpose, train_stardist

    with pytest.raises(ToolError, match="not found"):
        load_fluo_training_set(tmp_path / "nope")
    with pytest.raises(ToolError, match="No image/label pairs"):
        load_fluo_training_set(tmp_path)
    img = np.zeros((64, 64), np.float32)
    for fn in (train_cellpose, train_stardist):
        with pytest.raises(ToolError, match="1 images and 0 label"):
            fn([img], [], tmp_path)
        with pytest.raises(ToolError, match="differ in size"):
            fn([img], [np.zeros((32, 32), np.int32)], tmp_path)


def test_train_without_package_says_which_extra(tmp_path, capsys):
    import importlib.util

    from cytoagent.cli import main

    if importlib.util.find_spec("cellpose") is not None:
        pytest.skip("cellpose is installed here")
    d = tmp_path / "fluo"
    d.mkdir()
    import tifffile

    r = nuclei_image((64, 64), 4, seed=0)
    tifffile.imwrite(d / "a.tif", r.image)
    tifffile.imwrite(d / "a.mask.tif", r.labels)
    assert main(["segmenters", "train", "cellpose", "--data", str(d), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "cytoagent[cellpose]" in err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
