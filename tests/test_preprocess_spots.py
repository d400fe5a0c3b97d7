"""detect_spots: image reading, named / task / pipeline preprocessing, the shared LoG detector, the
spots table and preview, and the MCP tool; exact synthetic truth plus the shared smFISH field."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile

from servers.common import synthetic
from servers.common.errors import ToolError
from servers.common.metrics import match_points
from servers.preprocess.downstream import detect_spots_log
from servers.preprocess.spots import count_spots, preprocessing_steps, read_image_2d, spots_preview


@pytest.fixture
def field():
    return synthetic.spot_image((128, 128), 30, 1.5, seed=7)


def test_counts_synthetic_spots_exactly(field):
    res = count_spots(field.image)
    assert res.summary()["n_spots"] == 30
    m = match_points(field.coords, res.coords, radius=2.0)
    assert m.tp == 30 and m.fp == 0
    # one implementation: the same detections as the optimisation tasks' downstream detector
    np.testing.assert_array_equal(res.coords, detect_spots_log(field.image, sigma=1.5, threshold=0.1, min_distance=2))
    t = res.table
    assert list(t.columns) == ["spot_id", "row", "col", "response", "intensity"]
    assert (t["response"] > 0.1).all()
    r, c = t["row"].astype(int), t["col"].astype(int)
    np.testing.assert_allclose(t["intensity"], field.image[r, c])


def test_raw_scale_needs_normalisation(field):
    raw = field.image * 3000 + 200  # arbitrary camera units: the absolute threshold is meaningless
    raw_summary = count_spots(raw).summary()
    assert raw_summary["n_spots"] > 100  # noise maxima pass a threshold of 0.1
    assert "preprocess='minmax'" in raw_summary["warning"]  # ... and the result says so
    assert "warning" not in count_spots(field.image).summary()
    for name in ("minmax", "percentile", "normalize99"):
        res = count_spots(raw, preprocess=name)
        assert "warning" not in res.summary()
        assert match_points(field.coords, res.coords, radius=2.0).tp >= 28, name
        lo, hi = res.summary()["image_range_after_preprocessing"]
        assert lo >= -1e-6 and hi <= 1 + 1e-6
    u8 = np.clip(field.image * 255, 0, 255).astype(np.uint8).astype(np.float32)
    assert count_spots(u8, preprocess="divide_255").summary()["n_spots"] == pytest.approx(30, abs=2)


def test_task_and_pipeline_preprocessing(field):
    raw = field.image * 3000 + 200
    steps, desc = preprocessing_steps(task="spots_synthetic")
    assert steps == [("minmax_normalize", {})] and "spots_synthetic" in desc
    by_task = count_spots(raw, task="spots_synthetic")
    assert by_task.settings["threshold"] == 0.1 and by_task.summary()["n_spots"] == pytest.approx(30, abs=2)
    pipe = [{"name": "subtract_background", "sigma": 10}, {"name": "minmax_normalize"}]
    res = count_spots(raw, pipeline=pipe)
    assert [s["name"] for s in res.summary()["pipeline"]] == ["subtract_background", "minmax_normalize"]
    assert match_points(field.coords, res.coords, radius=2.0).tp >= 28
    # detector overrides
    assert count_spots(field.image, threshold=10.0).summary()["n_spots"] == 0
    assert count_spots(field.image, exclude_border=64).summary()["n_spots"] == 0


@pytest.mark.parametrize("kw,match", [
    ({"preprocess": "zscore"}, "Unknown preprocess"),
    ({"pipeline": [{"name": "nope"}]}, "Unknown primitive"),
    ({"pipeline": [{"name": "gaussian_blur", "radius": 3}]}, "no parameter"),
    ({"pipeline": ["minmax_normalize"]}, "Pipeline step 0"),
    ({"pipeline": [], "preprocess": "minmax"}, "either pipeline"),
    ({"task": "nuclei_synthetic"}, "not a spot task"),
    ({"task": "no_such_task"}, "Unknown task"),
    ({"sigma": 0}, "sigma"),
    ({"min_distance": 0}, "min_distance"),
])
def test_bad_settings(field, kw, match):
    with pytest.raises(ToolError, match=match):
        count_spots(field.image, **kw)


def test_read_image_2d(data_root, field):
    from PIL import Image

    tifffile.imwrite(data_root / "a.tif", (field.image * 1000).astype(np.uint16))
    np.testing.assert_array_equal(read_image_2d(data_root / "a.tif"), (field.image * 1000).astype(np.uint16))
    stack = np.stack([np.zeros((128, 128), np.uint16), (field.image * 1000).astype(np.uint16)])  # (C, H, W)
    tifffile.imwrite(data_root / "c.tif", stack)
    np.testing.assert_array_equal(read_image_2d(data_root / "c.tif", channel=1), stack[1])
    with pytest.raises(ToolError, match="channel=2"):
        read_image_2d(data_root / "c.tif", channel=2)
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[..., 0] = 30
    Image.fromarray(rgb).save(data_root / "rgb.png")
    assert read_image_2d(data_root / "rgb.png").max() == pytest.approx(10.0)
    (data_root / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ToolError, match="Cannot read"):
        read_image_2d(data_root / "bad.png")
    with pytest.raises(ToolError, match="not found"):
        read_image_2d(data_root / "missing.tif")


def test_preview_marks_spots(field):
    from PIL import Image

    res = count_spots(field.image)
    img = np.asarray(Image.open(io.BytesIO(spots_preview(field.image, res.coords))))
    assert img.shape == (128, 128, 3)
    red = (img[..., 0] == 255) & (img[..., 1] == 0) & (img[..., 2] == 0)
    assert red.sum() > 30 * 8


async def test_server_detect_spots(mcp_client, data_root, workspace, field):
    tifffile.imwrite(data_root / "spots.tif", (field.image * 3000 + 200).astype(np.uint16))
    async with mcp_client("preprocess") as c:
        res = await c.call_tool("detect_spots", {"image": "spots.tif", "preprocess": "minmax"})
        assert not res.is_error, res.content
        sm = res.structured_content
        assert sm["n_spots"] == pytest.approx(30, abs=1) and sm["preprocessing"] == "minmax"
        table = workspace.load(sm["table_artifact"])
        assert len(table) == sm["n_spots"] and {"row", "col"} <= set(table.columns)
        assert any(getattr(x, "type", "") == "image" for x in res.content)
        for args, needle in [({"image": "missing.tif"}, "No such file"),
                             ({"image": "spots.tif", "preprocess": "zscore"}, "preprocess"),
                             ({"image": "../outside.tif"}, "")]:
            bad = await c.call_tool("detect_spots", args, raise_on_error=False)
            assert bad.is_error and needle in bad.content[0].text, bad.content


def test_smfish_field(shared_data):
    """The annotated smFISH field (267 spots in the CSV): 8-bit image scaled to [0, 1]."""
    from servers.common.annotations import read_spot_csv

    img = read_image_2d(shared_data / "spots" / "smfish.png")
    res = count_spots(img, preprocess="divide_255", threshold=0.05)
    truth = read_spot_csv(shared_data / "spots" / "smfish.csv")
    m = match_points(truth, res.coords, radius=4.0)
    assert abs(res.summary()["n_spots"] - len(truth)) <= 0.1 * len(truth)
    assert m.f1 > 0.8, m
