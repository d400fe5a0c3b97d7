"""Black-box downstream tools with fixed settings, and how their output is scored.

A downstream tool turns one preprocessed image into a prediction; the task's metric compares it
with the ground truth. The preprocessing function under optimisation never sees these settings:
it can only change the pixels the tool receives.

- ``log_spots``: Laplacian-of-Gaussian response at a fixed scale, local maxima above a fixed
  absolute threshold (the detector is deliberately *not* intensity-adaptive, so preprocessing
  that puts spots on the right scale matters). Scored with one-to-one matching within a radius
  (:func:`servers.common.metrics.match_points`, pooled F1 over the split).
- ``segmenter``: any backend of :func:`servers.common.segmenters.get_segmenter` (classical, unet,
  cellpose, stardist with local weights). Scored with AP at IoU 0.5 (Cellpose definition,
  :func:`servers.common.metrics.match_instances`), averaged over images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from servers.common.errors import ToolError


def detect_spots_log(image: np.ndarray, *, sigma: float = 1.5, threshold: float = 0.1,
                     min_distance: int = 2, exclude_border: int = 0) -> np.ndarray:
    """Spots as local maxima of the scale-normalised LoG response ``-sigma² ∇²G_sigma * image``.

    Args:
        image: (H, W) image (RGB is averaged to grey).
        sigma: Gaussian scale in pixels (≈ spot radius / √2).
        threshold: Absolute minimum response of a spot (in the image's intensity units).
        min_distance: Minimum distance in pixels between two detected spots.
        exclude_border: Ignore maxima this many pixels from the border.

    Returns:
        (N, 2) float array of (row, col) pixel coordinates.
    """
    from scipy import ndimage as ndi

    img = np.asarray(image, dtype=np.float32)
    if img.ndim == 3:
        img = img.mean(axis=2)
    if img.ndim != 2:
        raise ToolError(f"The spot detector needs a 2-D image, got shape {img.shape}.", hint="Pass (H, W).")
    response = -(sigma**2) * ndi.gaussian_laplace(img, sigma)
    # local maxima in a (2*min_distance+1)^2 window: the same peaks as skimage's peak_local_max here
    # (benchmarks/preprocess.py checks), without its per-peak KD-tree pass that makes noisy, badly
    # scaled candidates (thousands of maxima) 10x slower.
    peak_max = ndi.maximum_filter(response, size=2 * int(min_distance) + 1, mode="nearest")
    keep = (response == peak_max) & (response > float(threshold))
    if exclude_border:
        b = int(exclude_border)
        keep[:b], keep[-b:], keep[:, :b], keep[:, -b:] = False, False, False, False
    peaks = np.argwhere(keep)
    return peaks.astype(float).reshape(-1, 2)


@dataclass
class Downstream:
    """A configured downstream tool: ``run(image) -> prediction``; ``score(preds, truths) -> dict``."""

    tool: str = "log_spots"
    settings: dict[str, Any] = field(default_factory=dict)
    match_radius_px: float = 3.0
    mpp: float | None = None

    def __post_init__(self) -> None:
        if self.tool not in TOOLS:
            raise ToolError(f"Unknown downstream tool {self.tool!r}.", hint=f"Use one of: {', '.join(TOOLS)}.")
        self._seg = None

    @property
    def metric(self) -> str:
        return "spot_f1" if self.tool == "log_spots" else "ap50"

    def describe(self) -> dict[str, Any]:
        d = {"tool": self.tool, "settings": self.settings, "summary": TOOLS[self.tool], "metric": self.metric}
        if self.tool == "log_spots":
            d["match_radius_px"] = self.match_radius_px
        if self.mpp:
            d["mpp"] = self.mpp
        return d

    def _segmenter(self):
        if self._seg is None:
            from servers.common.segmenters import get_segmenter

            s = dict(self.settings)
            backend = s.pop("backend", "classical")
            modality = s.pop("modality", "fluorescence")
            self._seg = get_segmenter(backend, modality=modality, device=s.pop("device", "cpu"), **s)
        return self._seg

    def run(self, image: np.ndarray) -> np.ndarray:
        """Prediction for one image: (N, 2) spot coordinates or an (H, W) int32 label image."""
        if self.tool == "log_spots":
            return detect_spots_log(image, **self.settings)
        return self._segmenter().segment(image, mpp=self.mpp)

    def score(self, predictions: Sequence[np.ndarray], truths: Sequence[np.ndarray],
              ids: Sequence[str] | None = None) -> tuple[float, list[dict[str, Any]]]:
        """(split score, per-image metrics). Spots: pooled F1; segmentation: mean AP@0.5."""
        from servers.common.metrics import match_instances, match_points

        ids = list(ids) if ids is not None else [str(i) for i in range(len(predictions))]
        per: list[dict[str, Any]] = []
        if self.tool == "log_spots":
            tp = fp = fn = 0
            for i, (p, t) in enumerate(zip(predictions, truths)):
                m = match_points(t, p, radius=self.match_radius_px)
                tp, fp, fn = tp + m.tp, fp + m.fp, fn + m.fn
                per.append({"id": ids[i], "f1": m.f1, "precision": m.precision, "recall": m.recall,
                            "n_true": m.n_gt, "n_pred": m.n_pred, "tp": m.tp})
            den = 2 * tp + fp + fn
            return (1.0 if den == 0 else 2 * tp / den), per
        aps = []
        for i, (p, t) in enumerate(zip(predictions, truths)):
            m = match_instances(t, p, iou_threshold=0.5)
            aps.append(m.ap)
            per.append({"id": ids[i], "ap50": m.ap, "precision": m.precision, "recall": m.recall,
                        "n_true": m.n_gt, "n_pred": m.n_pred, "tp": m.tp})
        return (float(np.mean(aps)) if aps else 0.0), per


TOOLS = {
    "log_spots": "Laplacian-of-Gaussian spot detector at a fixed scale with a fixed absolute threshold "
                 "(local maxima); scored by F1 with one-to-one matching within a radius.",
    "segmenter": "nucleus instance segmentation with servers.common.segmenters (classical / unet / cellpose / "
                 "stardist, fixed settings); scored by average precision at IoU 0.5 (TP/(TP+FP+FN)).",
}
