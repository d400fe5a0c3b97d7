"""The weight-free default segmenter: threshold + seeded distance-transform watershed.

Two recipes, chosen by ``modality``:

``"he"`` (RGB brightfield H&E)
    1. hematoxylin optical density by colour deconvolution (``skimage.color.rgb2hed``, Ruifrok &
       Johnston stain vectors), Gaussian-smoothed by ``smooth_um``;
    2. Otsu threshold on that channel (never below ``min_threshold`` OD, so blank glass or pure
       stroma does not turn into nuclei; pass ``threshold=`` to fix it, e.g. per slide);
    3. clean-up: small specks removed, holes filled, opening by a ~0.5 µm disk;
    4. touching nuclei split by a watershed on the smoothed distance transform, seeded by its
       h-maxima (``h_um`` deep), so two nuclei are separated when the neck between them is
       narrower than their radii by more than ``h_um``;
    5. objects smaller than ``min_area_um2`` / larger than ``max_area_um2`` dropped.

    All sizes are in micrometres and converted with ``mpp``; the defaults were tuned on 40×
    MoNuSeg tiles (0.25 µm/px) and hold for 20× (0.5 µm/px) because they scale with ``mpp``.

``"fluorescence"`` (one channel, bright nuclei on dark background)
    Gaussian smoothing, Otsu threshold (or a local threshold with ``local_block_px``), hole
    filling, then the same seeded watershed. Sizes are in pixels; the nucleus radius is
    ``radius_px``, or ``radius_um`` converted with ``mpp``, or estimated from the sizes of the
    thresholded objects.

Options (``get_segmenter("classical", modality=..., **options)``) override any default below.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from servers.common.errors import ToolError
from servers.common.segmenters.base import Segmenter

log = logging.getLogger("cytoagent.segmenters.classical")

#: µm per pixel assumed for H&E when neither ``mpp`` nor the ``mpp`` option is given (40×).
DEFAULT_HE_MPP = 0.25

HE_DEFAULTS: dict[str, Any] = {
    "smooth_um": 0.25,  # Gaussian sigma on the hematoxylin channel
    "threshold": None,  # fixed hematoxylin OD threshold; None = Otsu per image
    "threshold_scale": 1.0,  # multiply the Otsu threshold (>1 = stricter)
    "min_threshold": 0.04,  # Otsu is never allowed below this OD (empty / stroma-only tiles)
    "otsu_clip": 0.5,  # OD values above this (black dust, pen, folds) are clipped before Otsu
    "tissue_od": 0.3,  # pixels with summed RGB OD below this (glass) are left out of Otsu
    "open_um": 0.5,  # radius of the opening that removes thin bridges
    "dist_smooth_um": 0.25,  # sigma on the distance transform before seeding
    "h_um": 0.25,  # h-maxima depth: how pronounced a neck must be to split
    "min_area_um2": 8.0,
    "max_area_um2": 2000.0,
}

FLUO_DEFAULTS: dict[str, Any] = {
    "smooth_px": 1.0,
    "threshold": None,  # fixed intensity threshold; None = Otsu
    "threshold_scale": 1.0,
    "local_block_px": None,  # odd block size → local (adaptive) threshold instead of Otsu
    "radius_px": None,  # expected nucleus radius; None = estimated from the image
    "radius_um": None,  # the same in µm (needs mpp)
    "h_frac": 0.15,  # h-maxima depth as a fraction of the radius
    "min_area_px": None,  # None = 15 % of the expected nucleus area
    "max_area_px": None,
}


def hematoxylin_od(rgb: np.ndarray) -> np.ndarray:
    """Hematoxylin optical density (float32) by Ruifrok-Johnston colour deconvolution."""
    from skimage.color import rgb2hed

    img = np.asarray(rgb)
    if img.ndim != 3 or img.shape[2] < 3:
        raise ToolError(f"H&E segmentation needs an RGB image (H, W, 3); got shape {img.shape}.",
                        hint="Pass the RGB tile, or use modality='fluorescence' for one-channel images.")
    return rgb2hed(img[..., :3]).astype(np.float32)[..., 0]


def seeded_watershed(mask: np.ndarray, h_px: float, smooth_px: float = 0.0, min_split_px: float = 0.0) -> np.ndarray:
    """Split a binary mask into instances: watershed on the (smoothed) distance transform, one
    seed per h-maximum of depth ``h_px``. Returns int32 labels (0 = background).

    The h-maxima transform (a greyscale reconstruction, the expensive step) runs per connected
    component on its bounding box, and components smaller than ``min_split_px`` (too small to
    hold two objects) keep one seed — same result as the whole-image transform, several times
    faster on sparse masks.
    """
    from scipy import ndimage as ndi
    from skimage import morphology, segmentation

    if not mask.any():
        return np.zeros(mask.shape, np.int32)
    dist = ndi.distance_transform_edt(mask).astype(np.float32)
    if smooth_px > 0:
        dist = ndi.gaussian_filter(dist, smooth_px)
    comps, n = ndi.label(mask)
    seeds = np.zeros(mask.shape, np.int32)
    areas = np.bincount(comps.ravel())
    next_id = 1
    h = max(float(h_px), 1e-3)
    for i, sl in enumerate(ndi.find_objects(comps), start=1):
        if sl is None:
            continue
        own = comps[sl] == i
        if areas[i] < min_split_px:
            d = np.where(own, dist[sl], -1.0)
            r, c = np.unravel_index(int(np.argmax(d)), d.shape)
            seeds[sl][r, c] = next_id
            next_id += 1
            continue
        d = np.where(own, dist[sl], 0.0)
        peaks = morphology.h_maxima(d, h).astype(bool) & own
        lab, k = ndi.label(peaks)
        if k == 0:
            r, c = np.unravel_index(int(np.argmax(d)), d.shape)
            seeds[sl][r, c] = next_id
            next_id += 1
            continue
        seeds[sl][lab > 0] = lab[lab > 0] + (next_id - 1)
        next_id += k
    labels = segmentation.watershed(-dist, seeds, mask=mask)
    return labels.astype(np.int32)


def filter_sizes(labels: np.ndarray, min_px: float, max_px: float | None) -> np.ndarray:
    """Drop objects outside [min_px, max_px] pixels and renumber 1..n (int32)."""
    from skimage.segmentation import relabel_sequential

    counts = np.bincount(labels.ravel())
    bad = counts < min_px
    if max_px:
        bad |= counts > max_px
    bad[0] = False
    if bad.any():
        labels = np.where(bad[labels], 0, labels)
    return relabel_sequential(labels)[0].astype(np.int32)


@dataclass
class ClassicalSegmenter(Segmenter):
    """Weight-free nucleus segmentation (see the module docstring for the two recipes)."""

    name: str = "classical"

    def params(self) -> dict[str, Any]:
        base = HE_DEFAULTS if self.modality == "he" else FLUO_DEFAULTS
        unknown = set(self.options) - set(base) - {"mpp"}
        if unknown:
            raise ToolError(f"Unknown option(s) for the classical {self.modality} segmenter: {sorted(unknown)}.",
                            hint=f"Use any of: {', '.join(sorted(base))}, mpp.")
        return {**base, **{k: v for k, v in self.options.items() if k != "mpp"}}

    def _segment_one(self, image: np.ndarray, *, mpp: float | None) -> np.ndarray:
        mpp = mpp if mpp is not None else self.options.get("mpp")
        if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
            raise ToolError(f"mpp must be a positive number of micrometres per pixel, got {mpp!r}.",
                            hint="Pass e.g. mpp=0.25 for 40x or 0.5 for 20x.")
        if self.modality == "he":
            return self._segment_he(image, mpp)
        return self._segment_fluo(image, mpp)

    # -- H&E -----------------------------------------------------------------------------------
    def _segment_he(self, image: np.ndarray, mpp: float | None) -> np.ndarray:
        from scipy import ndimage as ndi

        p = self.params()
        if mpp is None:
            log.warning("classical H&E segmenter: no mpp given, assuming %.2f µm/px (40x)", DEFAULT_HE_MPP)
            mpp = DEFAULT_HE_MPP
        img = image
        if img.ndim == 3 and img.shape[2] == 4:
            img = img[..., :3]
        if img.dtype != np.uint8:
            from servers.common.images import to_uint8

            img = to_uint8(img) if img.max() > 1.0 else (np.clip(img, 0, 1) * 255).astype(np.uint8)
        hem = hematoxylin_od(img)
        if p["smooth_um"]:
            hem = ndi.gaussian_filter(hem, p["smooth_um"] / mpp)
        thr = p["threshold"]
        if thr is None:
            vals = hem
            if p["tissue_od"]:
                od_sum = -np.log((img.astype(np.float32) + 1.0) / 256.0).sum(axis=2)
                tissue = od_sum > float(p["tissue_od"])
                if tissue.sum() > 0.01 * tissue.size:
                    vals = hem[tissue]
            if p["otsu_clip"]:
                vals = np.clip(vals, 0.0, float(p["otsu_clip"]))
            thr = self._otsu(vals) * float(p["threshold_scale"])
            thr = max(thr, float(p["min_threshold"]))
        fg = hem > thr
        return self._instances(fg, p["open_um"] / mpp, p["dist_smooth_um"] / mpp, p["h_um"] / mpp,
                               p["min_area_um2"] / mpp**2, p["max_area_um2"] / mpp**2 if p["max_area_um2"] else None)

    @staticmethod
    def _otsu(values: np.ndarray) -> float:
        from skimage.filters import threshold_otsu

        v = values[np.isfinite(values)]
        if v.size == 0 or float(v.max()) == float(v.min()):
            return float("inf")
        return float(threshold_otsu(v))

    @staticmethod
    def _instances(fg: np.ndarray, open_px: float, dist_smooth_px: float, h_px: float, min_px: float,
                   max_px: float | None) -> np.ndarray:
        """Clean a foreground mask and split it into size-filtered instances."""
        from scipy import ndimage as ndi
        from skimage import morphology

        fg = morphology.remove_small_objects(fg, max_size=max(0, int(min_px) - 1))
        fg = ndi.binary_fill_holes(fg)
        r = int(round(open_px))
        if r >= 1:
            fg = morphology.opening(fg, morphology.disk(r))
        labels = seeded_watershed(fg, h_px, dist_smooth_px, min_split_px=2 * min_px)
        return filter_sizes(labels, min_px, max_px)

    # -- fluorescence --------------------------------------------------------------------------
    def _segment_fluo(self, image: np.ndarray, mpp: float | None) -> np.ndarray:
        from scipy import ndimage as ndi
        from skimage import filters, measure

        p = self.params()
        img = np.asarray(image, dtype=np.float32)
        if img.ndim == 3:
            img = img[..., 0] if img.shape[2] == 1 else img[..., :3].mean(axis=2)
        finite = np.isfinite(img)
        if not finite.all():
            img = np.where(finite, img, np.nanmin(img[finite]) if finite.any() else 0.0)
        sm = ndi.gaussian_filter(img, p["smooth_px"]) if p["smooth_px"] else img
        if p["threshold"] is not None:
            fg = sm > float(p["threshold"])
        elif p["local_block_px"]:
            block = int(p["local_block_px"]) | 1
            fg = (sm > filters.threshold_local(sm, block)) & (sm > self._otsu(sm) * 0.5)
        else:
            fg = sm > self._otsu(sm) * float(p["threshold_scale"])
        fg = ndi.binary_fill_holes(fg)
        radius = p["radius_px"]
        if radius is None and p["radius_um"] is not None:
            if mpp is None:
                raise ToolError("radius_um needs the image resolution.", hint="Pass mpp= or use radius_px.")
            radius = float(p["radius_um"]) / mpp
        if radius is None:
            areas = np.bincount(measure.label(fg).ravel())[1:]
            areas = areas[areas >= 9]
            # larger objects are often clumps of several nuclei: the 40th percentile is closer to one
            radius = float(np.sqrt(np.percentile(areas, 40) / np.pi)) if areas.size else 5.0
            radius = float(np.clip(radius, 2.0, 200.0))
        min_px = p["min_area_px"] if p["min_area_px"] is not None else 0.15 * np.pi * radius**2
        max_px = p["max_area_px"]
        return self._instances(fg, 0, max(1.0, radius * 0.15), max(0.5, radius * p["h_frac"]), min_px, max_px)
