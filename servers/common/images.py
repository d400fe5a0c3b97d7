"""Arrays to PNG previews: downscaling, percentile contrast, label overlays and contours."""

from __future__ import annotations

import io

import numpy as np

from servers.common.errors import ToolError

# A fixed, colour-blind-friendly-ish cycle for label colours (tab20-like), so previews are stable.
_PALETTE = np.array(
    [
        [31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
        [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207],
        [174, 199, 232], [255, 187, 120], [152, 223, 138], [255, 152, 150], [197, 176, 213],
        [196, 156, 148], [247, 182, 210], [199, 199, 199], [219, 219, 141], [158, 218, 229],
    ],
    dtype=np.uint8,
)


def _stride_for(shape: tuple[int, ...], max_side: int) -> int:
    return max(1, int(np.ceil(max(shape[:2]) / max_side)))


def downscale(image: np.ndarray, max_side: int = 1024, *, labels: bool = False) -> np.ndarray:
    """Shrink so the longer side is <= ``max_side``. Labels use nearest sampling (ids stay intact);
    intensity images use block means (no aliasing of small structures)."""
    image = np.asarray(image)
    s = _stride_for(image.shape, max_side)
    if s == 1:
        return image
    if labels:
        return image[::s, ::s]
    h, w = image.shape[:2]
    hh, ww = h // s * s, w // s * s
    if hh == 0 or ww == 0:
        return image[::s, ::s]
    cropped = image[:hh, :ww].astype(np.float32)
    blocks = cropped.reshape(hh // s, s, ww // s, s, *image.shape[2:])
    return blocks.mean(axis=(1, 3))


def to_uint8(image: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.0)) -> np.ndarray:
    """Contrast-stretch to uint8 between two percentiles (per channel for RGB)."""
    img = np.asarray(image)
    if img.dtype == np.uint8 and img.ndim == 3:
        return img
    img = img.astype(np.float32)
    if img.ndim == 3:
        out = np.empty(img.shape, np.uint8)
        for c in range(img.shape[2]):
            out[..., c] = to_uint8(img[..., c], percentiles)
        return out
    finite = np.isfinite(img)
    vals = img[finite] if not finite.all() else img
    lo, hi = np.percentile(vals, percentiles) if vals.size else (0.0, 1.0)
    if hi <= lo:
        hi = lo + 1.0
    img = np.where(finite, img, lo)  # NaN/inf show as background rather than poisoning the stretch
    return (np.clip((img - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        return np.repeat(to_uint8(img)[..., None], 3, axis=2)
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., :3]
    if img.ndim == 3 and img.shape[2] == 3:
        return to_uint8(img)
    if img.ndim == 3 and img.shape[2] in (1, 2) or img.ndim == 3 and img.shape[2] > 4:
        return np.repeat(to_uint8(img[..., 0])[..., None], 3, axis=2)
    raise ToolError(f"Cannot preview an array of shape {img.shape}.", hint="Pass a 2-D (H, W) or (H, W, 3) array.")


def png_bytes(rgb_or_gray: np.ndarray) -> bytes:
    from PIL import Image

    arr = np.asarray(rgb_or_gray)
    if arr.dtype != np.uint8:
        arr = to_uint8(arr)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()


def preview_png(image: np.ndarray, max_side: int = 1024, percentiles: tuple[float, float] = (1.0, 99.0)) -> bytes:
    """A PNG preview of an intensity or RGB image: downscaled, contrast-stretched."""
    img = np.asarray(image)
    if img.ndim not in (2, 3):
        raise ToolError(f"Cannot preview an array with {img.ndim} dimensions.", hint="Pass (H, W) or (H, W, C).")
    small = downscale(img, max_side)
    if small.ndim == 2:
        return png_bytes(to_uint8(small, percentiles))
    return png_bytes(_as_rgb(small if small.dtype == np.uint8 else to_uint8(small, percentiles)))


def label_colors(labels: np.ndarray) -> np.ndarray:
    """RGB image with one stable colour per label id (0 stays black)."""
    lab = np.asarray(labels)
    rgb = _PALETTE[(lab.astype(np.int64) * 7919) % len(_PALETTE)]
    rgb[lab == 0] = 0
    return rgb


def boundaries(labels: np.ndarray) -> np.ndarray:
    """Boolean mask of pixels on the outline of each labelled object (4-connectivity)."""
    lab = np.asarray(labels)
    edge = np.zeros(lab.shape, bool)
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    return edge & (lab > 0)


def overlay_labels(
    image: np.ndarray, labels: np.ndarray, *, mode: str = "contour", alpha: float = 0.4, max_side: int = 1024,
    color: tuple[int, int, int] = (255, 255, 0),
) -> bytes:
    """PNG of ``image`` with ``labels`` drawn as outlines (``contour``) or filled colours (``fill``)."""
    img, lab = np.asarray(image), np.asarray(labels)
    if img.shape[:2] != lab.shape[:2]:
        raise ToolError(f"Image {img.shape[:2]} and labels {lab.shape[:2]} differ in size.",
                        hint="Pass labels computed on this image.")
    s = _stride_for(img.shape, max_side)
    base = _as_rgb(downscale(img, max_side) if s > 1 else img).copy()
    lab_small = lab[::s, ::s][: base.shape[0], : base.shape[1]]
    base = base[: lab_small.shape[0], : lab_small.shape[1]]
    if mode == "fill":
        colors = label_colors(lab_small)
        m = lab_small > 0
        base[m] = ((1 - alpha) * base[m] + alpha * colors[m]).astype(np.uint8)
    elif mode == "contour":
        base[boundaries(lab_small)] = color
    else:
        raise ToolError(f"Unknown overlay mode {mode!r}.", hint="Use 'contour' or 'fill'.")
    return png_bytes(base)


def figure_png(fig, dpi: int = 110) -> bytes:
    """Render a matplotlib figure to PNG bytes and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
