"""Shared pre- and post-processing for the model-backed segmenters.

* :func:`nuclear_channel` — the single channel a nucleus model sees: the image itself for
  fluorescence (mean of channels if RGB), the hematoxylin optical density (``rgb2hed``) for H&E, so
  nuclei are bright on dark in both cases.
* :func:`seeded_watershed` — instances from a foreground probability map (and optionally a
  boundary probability map): seeds are distance-transform maxima (or, with a boundary map,
  connected cores ``fg - boundary``), flooded by a watershed restricted to the foreground.
* :func:`rescale_for_model` / :func:`resize_labels` — bring an image to the pixel size a model
  was trained at and labels back.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from servers.common.errors import ToolError


def nuclear_channel(image: np.ndarray, modality: str) -> np.ndarray:
    """(H, W) float32 with nuclei bright: hematoxylin OD for ``he``; intensity for ``fluorescence``."""
    img = np.asarray(image)
    if modality == "he":
        if img.ndim != 3 or img.shape[2] < 3:
            raise ToolError(f"H&E input must be (H, W, 3) RGB, got shape {img.shape}.",
                            hint="Pass the RGB tile, or use modality='fluorescence' for one channel.")
        from skimage.color import rgb2hed

        rgb = img[..., :3]
        if rgb.dtype.kind == "f" and rgb.max() > 1.0:
            rgb = rgb / 255.0
        return rgb2hed(rgb)[..., 0].astype(np.float32)
    if img.ndim == 3:
        img = img[..., :3].astype(np.float32).mean(axis=2) if img.shape[2] >= 3 else img[..., 0]
    return img.astype(np.float32)


def rescale_for_model(image: np.ndarray, factor: float) -> np.ndarray:
    """Resize a 2-D image by ``factor`` (linear interpolation, anti-aliased when shrinking)."""
    if abs(factor - 1.0) < 1e-3:
        return image
    from skimage.transform import rescale

    return rescale(image, factor, order=1, anti_aliasing=factor < 1, preserve_range=True).astype(np.float32)


def resize_to(array: np.ndarray, shape: tuple[int, int], *, order: int = 1) -> np.ndarray:
    """Resize a 2-D map to ``shape`` (``order=0`` for labels)."""
    if array.shape[:2] == tuple(shape):
        return array
    from skimage.transform import resize

    out = resize(array, shape, order=order, preserve_range=True, anti_aliasing=False)
    return out.astype(array.dtype)


def seeded_watershed(
    foreground: np.ndarray,
    boundary: np.ndarray | None = None,
    *,
    threshold: float = 0.5,
    seed_threshold: float = 0.5,
    min_distance: int = 3,
    min_size: int = 15,
    smooth_sigma: float = 1.0,
) -> np.ndarray:
    """Instance labels from per-pixel probabilities.

    Args:
        foreground: (H, W) probability that a pixel belongs to a nucleus (0..1).
        boundary: optional (H, W) probability of a nucleus boundary; when given, seeds are the
            connected components of ``foreground - boundary > seed_threshold`` and the boundary map
            is the flooding landscape; otherwise seeds are local maxima of the (smoothed) distance
            transform of the foreground mask at least ``min_distance`` px apart.
        threshold: foreground probability above which a pixel is inside a nucleus.
        seed_threshold: core probability for seeds (boundary mode only).
        min_distance: minimum distance between seeds in pixels (distance mode).
        min_size: objects smaller than this many pixels are removed.
        smooth_sigma: Gaussian sigma (px) applied to the distance transform before finding maxima.

    Returns:
        (H, W) int32 labels, 0 = background, objects numbered 1..N consecutively.
    """
    from skimage.segmentation import relabel_sequential, watershed

    fg = np.asarray(foreground, dtype=np.float32)
    if fg.ndim != 2:
        raise ToolError(f"Foreground probability must be 2-D, got shape {fg.shape}.", hint="Pass an (H, W) map.")
    mask = fg > threshold
    mask = ndi.binary_fill_holes(mask)
    if not mask.any():
        return np.zeros(fg.shape, dtype=np.int32)
    if boundary is not None:
        bd = np.asarray(boundary, dtype=np.float32)
        if bd.shape != fg.shape:
            raise ToolError(f"Boundary map shape {bd.shape} differs from foreground {fg.shape}.",
                            hint="Pass maps of the same size.")
        markers, _ = ndi.label((fg - bd) > seed_threshold)
        landscape = bd
    else:
        from skimage.feature import peak_local_max

        dist = ndi.distance_transform_edt(mask)
        if smooth_sigma > 0:
            dist = ndi.gaussian_filter(dist, smooth_sigma)
        comps, _ = ndi.label(mask)
        peaks = peak_local_max(dist, min_distance=max(1, int(min_distance)), labels=comps, exclude_border=False)
        markers = np.zeros(fg.shape, dtype=np.int32)
        markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
        # merge seeds lying on one plateau into one marker
        markers, _ = ndi.label(ndi.binary_dilation(markers > 0, iterations=1) & mask)
        landscape = -dist
    labels = watershed(landscape, markers, mask=mask)
    # foreground components that received no seed become objects of their own
    rest = mask & (labels == 0)
    if rest.any():
        extra, n_extra = ndi.label(rest)
        labels = np.where(extra > 0, extra + labels.max(), labels)
    if min_size > 0 and labels.max() > 0:
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        labels[small[labels]] = 0
    return relabel_sequential(labels.astype(np.int32))[0].astype(np.int32)
