"""Spot counting on one image: read → optional preprocessing → the LoG detector of
:mod:`servers.preprocess.downstream` (the same implementation the optimisation tasks score) →
spot table and a preview with the spots circled.

Preprocessing is one of the named normalisations (``"none"``, ``"minmax"``, ``"percentile"``,
``"normalize99"``, ``"divide_255"``), a task's expert baseline (``task=``: that task's expert
normalisation *and* its fixed detector settings), or an explicit pipeline of primitives from
:mod:`servers.preprocess.primitives` (``[{"name": "subtract_background", "sigma": 20}, ...]``).
The detector's ``threshold`` is absolute, so it is in the units of the preprocessed image (e.g. a
min-max normalised image is in [0, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from servers.common.errors import ToolError

NORMALISATIONS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "none": [],
    "minmax": [("minmax_normalize", {})],
    "percentile": [("percentile_normalize", {"low": 1.0, "high": 99.8})],
    "normalize99": [("percentile_normalize", {"low": 1.0, "high": 99.0})],
    "divide_255": [("scale_intensity", {"factor": 1.0 / 255.0})],
}
DETECTOR_DEFAULTS: dict[str, Any] = {"sigma": 1.5, "threshold": 0.1, "min_distance": 2, "exclude_border": 0}


def read_image_2d(path: str | Path, channel: int | None = None) -> np.ndarray:
    """An image file (TIFF, PNG, JPEG, BMP, NPY) as a float32 (H, W) array in its own units.

    ``channel`` picks one channel of a multi-channel image (0-based; channel-first TIFFs with up to
    8 channels are recognised); None averages the colour channels (alpha is dropped)."""
    from servers.common.imageio import read_image

    p = Path(path)
    arr = read_image(p)
    if arr.ndim == 3:
        n = arr.shape[2]
        if channel is not None:
            if not 0 <= int(channel) < n:
                raise ToolError(f"channel={channel} does not exist; {p.name} has {n} channels.",
                                hint=f"Pass channel in 0..{n - 1}, or leave it out to average the channels.")
            arr = arr[..., int(channel)]
        else:
            arr = arr[..., :3].astype(np.float32).mean(axis=2) if n in (3, 4) else arr.astype(np.float32).mean(axis=2)
    elif channel not in (None, 0):
        raise ToolError(f"channel={channel} does not exist; {p.name} has one channel.", hint="Leave channel out.")
    if arr.ndim != 2:
        raise ToolError(f"{p.name} is not a 2-D image (shape {arr.shape}).", hint="Pass one image plane (H, W).")
    if arr.dtype.kind not in "uifb":
        raise ToolError(f"{p.name} has non-numeric pixels ({arr.dtype}).", hint="Pass a numeric image.")
    return arr.astype(np.float32)


def _pipeline(steps: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    from servers.preprocess.primitives import get_primitive

    out = []
    for i, st in enumerate(steps):
        if not isinstance(st, dict) or "name" not in st:
            raise ToolError(f"Pipeline step {i} is {st!r}.",
                            hint='Each step is {"name": <primitive>, <param>: <value>, ...}, e.g. '
                                 '{"name": "subtract_background", "sigma": 20}.')
        params = {k: v for k, v in st.items() if k != "name"}
        prim = get_primitive(str(st["name"]))
        known = {p.name for p in prim.params}
        unknown = set(params) - known
        if unknown:
            raise ToolError(f"Primitive {prim.name!r} has no parameter(s) {sorted(unknown)}.",
                            hint=f"Its parameters: {', '.join(sorted(known)) or 'none'}.")
        out.append((prim.name, params))
    return out


def preprocessing_steps(preprocess: str = "none", *, task: str | None = None,
                        pipeline: list[dict[str, Any]] | None = None) -> tuple[list[tuple[str, dict]], str]:
    """The primitive steps to run and a one-line description of them."""
    if pipeline is not None and (task or preprocess != "none"):
        raise ToolError("Pass either pipeline or preprocess/task, not both.",
                        hint="Put the normalisation into the pipeline, e.g. [{'name': 'minmax_normalize'}, ...].")
    if pipeline is not None:
        steps = _pipeline(list(pipeline))
        return steps, "pipeline: " + " → ".join(n for n, _ in steps) if steps else "none"
    if task:
        from servers.preprocess.tasks import EXPERT_STEPS, get_task

        t = get_task(task)
        if t.kind != "spots":
            raise ToolError(f"Task {task!r} is a {t.kind} task, not a spot task.",
                            hint="Use a spots task from list_tasks (e.g. 'smfish', 'spots_synthetic').")
        if preprocess == "none":
            if t.expert not in EXPERT_STEPS:
                raise ToolError(f"Task {task!r} has no expert pipeline to apply.", hint="Pass preprocess= instead.")
            return list(EXPERT_STEPS[t.expert]), f"expert baseline of task {t.name!r}: {t.expert}"
    if preprocess not in NORMALISATIONS:
        raise ToolError(f"Unknown preprocess {preprocess!r}.", hint=f"Use one of: {', '.join(NORMALISATIONS)}.")
    return list(NORMALISATIONS[preprocess]), preprocess


def detector_settings(task: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Detector settings: the defaults, then the task's fixed downstream settings, then ``overrides``
    (None values are ignored)."""
    s = dict(DETECTOR_DEFAULTS)
    if task:
        from servers.preprocess.tasks import get_task

        s.update(get_task(task).downstream.get("settings") or {})
    s.update({k: v for k, v in overrides.items() if v is not None})
    if not s["sigma"] > 0:
        raise ToolError(f"sigma must be > 0 pixels, got {s['sigma']}.", hint="About spot radius / √2, e.g. 1.5.")
    if int(s["min_distance"]) < 1 or int(s["exclude_border"]) < 0:
        raise ToolError(f"min_distance must be >= 1 and exclude_border >= 0 (got {s['min_distance']}, "
                        f"{s['exclude_border']}).")
    return s


@dataclass
class SpotResult:
    image: np.ndarray  # the preprocessed image the detector saw
    coords: np.ndarray  # (N, 2) row, col
    table: Any  # DataFrame: spot_id, row, col, response, intensity
    settings: dict[str, Any]
    preprocessing: str
    steps: list[tuple[str, dict]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        h, w = self.image.shape
        lo, hi = float(self.image.min()), float(self.image.max())
        out = {"n_spots": int(len(self.coords)), "shape_px": [h, w], "preprocessing": self.preprocessing,
               "pipeline": [{"name": n, **p} for n, p in self.steps], "detector": self.settings,
               "spots_per_megapixel": round(len(self.coords) / (h * w / 1e6), 3),
               "image_range_after_preprocessing": [round(lo, 5), round(hi, 5)]}
        if hi - lo > RAW_RANGE:
            out["warning"] = (f"The detector saw values {lo:g}..{hi:g}, but its threshold "
                              f"({self.settings.get('threshold')}) is absolute and meant for images scaled to "
                              "about [0, 1]: this count is likely dominated by noise maxima. Pass "
                              "preprocess='minmax' or 'percentile' (or 'divide_255' for 8-bit images), or a task.")
        return out


RAW_RANGE = 10.0  # a dynamic range above this after preprocessing means raw intensity units


def count_spots(image: np.ndarray, *, preprocess: str = "none", task: str | None = None,
                pipeline: list[dict[str, Any]] | None = None, sigma: float | None = None,
                threshold: float | None = None, min_distance: int | None = None,
                exclude_border: int | None = None) -> SpotResult:
    """Detect spots in a 2-D image: preprocessing, then
    :func:`servers.preprocess.downstream.detect_spots_log`. See the module docstring."""
    import pandas as pd
    from scipy import ndimage as ndi

    from servers.preprocess.downstream import detect_spots_log
    from servers.preprocess.primitives import apply_pipeline

    img = np.asarray(image, dtype=np.float32)
    if img.ndim != 2:
        raise ToolError(f"Spot counting needs a 2-D image, got shape {img.shape}.", hint="Pass one channel (H, W).")
    if not np.isfinite(img).all():
        raise ToolError("The image has NaN or infinite pixels.", hint="Replace them before counting spots.")
    steps, desc = preprocessing_steps(preprocess, task=task, pipeline=pipeline)
    settings = detector_settings(task, sigma=sigma, threshold=threshold, min_distance=min_distance,
                                 exclude_border=exclude_border)
    pre = apply_pipeline(img, steps) if steps else img
    coords = detect_spots_log(pre, **settings)
    response = -(settings["sigma"] ** 2) * ndi.gaussian_laplace(pre, settings["sigma"])
    r, c = coords[:, 0].astype(int), coords[:, 1].astype(int)
    table = pd.DataFrame({"spot_id": np.arange(1, len(coords) + 1), "row": coords[:, 0], "col": coords[:, 1],
                          "response": response[r, c], "intensity": img[r, c]})
    return SpotResult(pre, coords, table, settings, desc, steps)


def spots_preview(image: np.ndarray, coords: np.ndarray, *, radius: int = 4, max_side: int = 1024) -> bytes:
    """PNG of the image (percentile-stretched grey) with every spot circled in red."""
    import cv2

    from servers.common.images import png_bytes, to_uint8

    grey = to_uint8(np.asarray(image, np.float32), (0.5, 99.8))
    rgb = np.repeat(grey[..., None], 3, axis=2)
    scale = min(1.0, max_side / max(rgb.shape[:2]))
    if scale < 1.0:
        rgb = cv2.resize(rgb, (int(rgb.shape[1] * scale), int(rgb.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    rgb = np.ascontiguousarray(rgb)
    for rr, cc in np.asarray(coords, float).reshape(-1, 2):
        cv2.circle(rgb, (int(round(cc * scale)), int(round(rr * scale))), max(2, int(radius * scale)), (255, 0, 0), 1)
    return png_bytes(rgb)
