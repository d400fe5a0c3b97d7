import io

import numpy as np
import pytest
from PIL import Image

from servers.common.errors import Cancelled, ToolError
from servers.common.executor import LocalExecutor
from servers.common.images import boundaries, downscale, overlay_labels, preview_png, to_uint8
from servers.common.progress import CancelToken, make_progress, track


def _png(b: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(b)))


def test_preview_downscales_and_stretches():
    img = np.zeros((3000, 1000), np.uint16)
    img[:, 500:] = 4000
    out = _png(preview_png(img, max_side=1024))
    assert out.shape == (1000, 333) and out.dtype == np.uint8
    assert out[:, :160].max() == 0 and out[:, 170:].min() == 255


def test_to_uint8_percentiles_and_nan():
    a = np.linspace(0, 100, 101, dtype=np.float32)
    a[0] = np.nan
    u = to_uint8(a, (0, 100))
    assert u[1] == 0 and u[-1] == 255 and u[0] == 0


def test_downscale_labels_keep_ids():
    lab = np.repeat(np.repeat(np.arange(1, 5).reshape(2, 2), 600, 0), 600, 1)
    small = downscale(lab, 300, labels=True)
    assert set(np.unique(small)) == {1, 2, 3, 4}


def test_overlay_and_boundaries():
    lab = np.zeros((50, 50), np.int32)
    lab[10:20, 10:20] = 1
    edge = boundaries(lab)
    assert edge.sum() == 36 and not edge[15, 15]
    rgb = _png(overlay_labels(np.zeros((50, 50)), lab))
    assert tuple(rgb[10, 15]) == (255, 255, 0) and tuple(rgb[15, 15]) == (0, 0, 0)
    with pytest.raises(ToolError, match="differ"):
        overlay_labels(np.zeros((10, 10)), lab)


def _square(x: int) -> int:
    return x * x


def test_local_executor_keeps_order_and_reports_progress():
    seen = []
    with LocalExecutor(2) as ex:
        out = ex.map(_square, range(10), progress=lambda d, t, m: seen.append((d, t)))
    assert out == [i * i for i in range(10)] and seen[-1] == (10, 10)
    with LocalExecutor(1) as ex:
        assert ex.map(_square, [3]) == [9]


def test_progress_cancellation():
    token = CancelToken()
    got = []
    prog = make_progress(lambda d, t, m: got.append(d), token, min_interval_s=0)
    with pytest.raises(Cancelled):
        for i in track(range(100), prog):
            if i == 5:
                token.cancel()
    assert got[-1] == 5


def test_dask_executor_same_interface():
    pytest.importorskip("dask.distributed")
    from servers.common.config import Config
    from servers.common.executor import get_executor

    with get_executor(Config(executor="dask", workers=1)) as ex:
        assert ex.kind == "dask"
        seen = []
        assert ex.map(_square, range(6), progress=lambda d, t, m: seen.append(d)) == [0, 1, 4, 9, 16, 25]
        assert seen[-1] == 6


def test_read_image_formats_and_errors(tmp_path):
    from servers.common.imageio import read_image

    grey16 = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    Image.fromarray(grey16).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g.png"), grey16)  # 16-bit values kept
    rgba = np.zeros((6, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba).save(tmp_path / "c.png")
    rgb = read_image(tmp_path / "c.png")
    assert rgb.shape == (6, 5, 3) and rgb[0, 0].tolist() == [200, 0, 0]
    import tifffile

    stack = np.arange(3 * 20 * 30, dtype=np.float32).reshape(3, 20, 30)
    tifffile.imwrite(tmp_path / "s.tif", stack)
    assert read_image(tmp_path / "s.tif").shape == (20, 30, 3)  # channel-first → channels-last
    (tmp_path / "bad.png").write_bytes(b"\x89PNG truncated")
    with pytest.raises(ToolError, match="Cannot read bad.png as an image"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(ToolError, match="Image not found"):
        read_image(tmp_path / "missing.tif")
