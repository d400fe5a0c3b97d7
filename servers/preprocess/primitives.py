"""The primitive library: small OpenCV/NumPy image operations with parameter ranges.

The same primitives are (a) listed to the model in ``describe_task`` as building blocks for
``preprocess_images`` and (b) the AutoML search space (pipelines of 2–4 primitives, as in the
agentic-superoptimisation paper's Optuna baseline). Every primitive takes a float32 image
(``(H, W)`` or ``(H, W, C)``) and returns a float32 image of the same shape; its source depends
only on ``numpy``/``cv2`` and ``_per_channel``, so :func:`pipeline_code` can emit a standalone
function file for any pipeline.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from servers.common.errors import ToolError


def _per_channel(img, fn):
    """Apply ``fn`` to a 2-D image, or to every channel of an (H, W, C) image."""
    if img.ndim == 2:
        return fn(img).astype(np.float32)
    return np.stack([fn(np.ascontiguousarray(img[..., c])) for c in range(img.shape[2])], axis=-1).astype(np.float32)


def _odd(k):
    k = int(round(k))
    return k if k % 2 == 1 else k + 1


def percentile_normalize(img, low=1.0, high=99.8):
    """Scale so the ``low``/``high`` percentiles map to 0/1, then clip to [0, 1] (per channel)."""

    def f(x):
        lo, hi = np.percentile(x, [low, high])
        return np.clip((x - lo) / max(float(hi - lo), 1e-6), 0.0, 1.0)

    return _per_channel(img.astype(np.float32), f)


def minmax_normalize(img):
    """Scale linearly to [0, 1] (per channel)."""

    def f(x):
        lo, hi = float(x.min()), float(x.max())
        return (x - lo) / max(hi - lo, 1e-6)

    return _per_channel(img.astype(np.float32), f)


def gaussian_blur(img, sigma=1.0):
    """Gaussian smoothing with standard deviation ``sigma`` pixels (cv2.GaussianBlur)."""
    return _per_channel(img.astype(np.float32), lambda x: cv2.GaussianBlur(x, (0, 0), float(sigma)))


def median_blur(img, ksize=3):
    """Median filter with an odd ``ksize`` (3 or 5; cv2.medianBlur on float32)."""
    k = 5 if int(ksize) >= 5 else 3
    return _per_channel(img.astype(np.float32), lambda x: cv2.medianBlur(x, k))


def bilateral_filter(img, d=5, sigma_color=0.1, sigma_space=3.0):
    """Edge-preserving smoothing; ``sigma_color`` is a fraction of the image's intensity range."""

    def f(x):
        rng = float(x.max() - x.min()) or 1.0
        return cv2.bilateralFilter(x, int(d), float(sigma_color) * rng, float(sigma_space))

    return _per_channel(img.astype(np.float32), f)


def clahe(img, clip_limit=2.0, tile_grid=8):
    """Contrast-limited adaptive histogram equalisation (cv2.createCLAHE); output in [0, 1]."""
    op = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid), int(tile_grid)))

    def f(x):
        lo, hi = float(x.min()), float(x.max())
        u16 = ((x - lo) / max(hi - lo, 1e-6) * 65535.0).astype(np.uint16)
        return op.apply(u16).astype(np.float32) / 65535.0

    return _per_channel(img.astype(np.float32), f)


def gamma_correct(img, gamma=1.0):
    """Min-max scale to [0, 1], then raise to the power ``gamma`` (<1 brightens, >1 darkens)."""

    def f(x):
        lo, hi = float(x.min()), float(x.max())
        return np.power((x - lo) / max(hi - lo, 1e-6), float(gamma))

    return _per_channel(img.astype(np.float32), f)


def white_tophat(img, radius=5):
    """Remove background structures larger than ``radius`` pixels (morphological white top-hat)."""
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * int(radius) + 1, 2 * int(radius) + 1))
    return _per_channel(img.astype(np.float32), lambda x: cv2.morphologyEx(x, cv2.MORPH_TOPHAT, k))


def subtract_background(img, sigma=20.0):
    """Subtract a large Gaussian blur (``sigma`` pixels) and clip negatives to 0: flat-field correction."""
    return _per_channel(img.astype(np.float32),
                        lambda x: np.maximum(x - cv2.GaussianBlur(x, (0, 0), float(sigma)), 0.0))


def unsharp_mask(img, sigma=1.0, amount=1.0):
    """Sharpen: ``img + amount * (img - blur(img, sigma))``."""
    return _per_channel(img.astype(np.float32),
                        lambda x: x + float(amount) * (x - cv2.GaussianBlur(x, (0, 0), float(sigma))))


def difference_of_gaussians(img, sigma=1.0, ratio=3.0):
    """Band-pass: ``blur(img, sigma) - blur(img, sigma * ratio)``, negatives clipped to 0."""

    def f(x):
        a = cv2.GaussianBlur(x, (0, 0), float(sigma))
        b = cv2.GaussianBlur(x, (0, 0), float(sigma) * float(ratio))
        return np.maximum(a - b, 0.0)

    return _per_channel(img.astype(np.float32), f)


def log_transform(img):
    """``log1p`` of the image shifted to be non-negative (compresses bright values)."""
    x = img.astype(np.float32)
    return np.log1p(x - float(x.min())).astype(np.float32)


def morph_open(img, radius=1):
    """Grey opening with a disk of ``radius`` pixels (removes small bright specks)."""
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * int(radius) + 1, 2 * int(radius) + 1))
    return _per_channel(img.astype(np.float32), lambda x: cv2.morphologyEx(x, cv2.MORPH_OPEN, k))


def morph_close(img, radius=1):
    """Grey closing with a disk of ``radius`` pixels (fills small dark holes)."""
    k = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * int(radius) + 1, 2 * int(radius) + 1))
    return _per_channel(img.astype(np.float32), lambda x: cv2.morphologyEx(x, cv2.MORPH_CLOSE, k))


def scale_intensity(img, factor=1.0):
    """Multiply intensities by ``factor`` (moves the image relative to a fixed detection threshold)."""
    return (img.astype(np.float32) * float(factor)).astype(np.float32)


@dataclass(frozen=True)
class Param:
    """A primitive parameter: ``kind`` is "float", "int" or "choice"."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.name} in {list(self.choices)}"
        return f"{self.name} in [{self.low:g}, {self.high:g}]{' (log scale)' if self.log else ''}"


@dataclass(frozen=True)
class Primitive:
    name: str
    fn: Callable
    params: tuple[Param, ...] = field(default_factory=tuple)

    @property
    def doc(self) -> str:
        return (self.fn.__doc__ or "").strip().splitlines()[0]

    def signature(self) -> str:
        return f"{self.name}{inspect.signature(self.fn)}"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "signature": self.signature(), "doc": self.doc,
                "params": [p.describe() for p in self.params]}


def _f(name, low, high, log=False):
    return Param(name, "float", low, high, log)


def _i(name, low, high):
    return Param(name, "int", low, high)


def _c(name, *choices):
    return Param(name, "choice", choices=tuple(choices))


PRIMITIVES: dict[str, Primitive] = {p.name: p for p in [
    Primitive("percentile_normalize", percentile_normalize, (_f("low", 0.0, 5.0), _f("high", 95.0, 100.0))),
    Primitive("minmax_normalize", minmax_normalize),
    Primitive("gaussian_blur", gaussian_blur, (_f("sigma", 0.3, 3.0, log=True),)),
    Primitive("median_blur", median_blur, (_c("ksize", 3, 5),)),
    Primitive("bilateral_filter", bilateral_filter,
              (_c("d", 3, 5, 7), _f("sigma_color", 0.02, 0.5, log=True), _f("sigma_space", 1.0, 8.0))),
    Primitive("clahe", clahe, (_f("clip_limit", 0.5, 8.0, log=True), _c("tile_grid", 4, 8, 16))),
    Primitive("gamma_correct", gamma_correct, (_f("gamma", 0.3, 3.0, log=True),)),
    Primitive("white_tophat", white_tophat, (_i("radius", 2, 15),)),
    Primitive("subtract_background", subtract_background, (_f("sigma", 4.0, 50.0, log=True),)),
    Primitive("unsharp_mask", unsharp_mask, (_f("sigma", 0.5, 3.0), _f("amount", 0.2, 3.0))),
    Primitive("difference_of_gaussians", difference_of_gaussians, (_f("sigma", 0.5, 2.5), _f("ratio", 1.5, 6.0))),
    Primitive("log_transform", log_transform),
    Primitive("morph_open", morph_open, (_i("radius", 1, 4),)),
    Primitive("morph_close", morph_close, (_i("radius", 1, 4),)),
    Primitive("scale_intensity", scale_intensity, (_f("factor", 0.001, 10.0, log=True),)),
]}

Pipeline = list[tuple[str, dict[str, Any]]]


def get_primitive(name: str) -> Primitive:
    if name not in PRIMITIVES:
        raise ToolError(f"Unknown primitive {name!r}.", hint=f"Use one of: {', '.join(PRIMITIVES)}.")
    return PRIMITIVES[name]


def apply_pipeline(image: np.ndarray, steps: Sequence[tuple[str, dict[str, Any]]]) -> np.ndarray:
    """Run ``steps`` (``[(primitive_name, params), ...]``) on one image; float32 out."""
    x = np.asarray(image, dtype=np.float32)
    for name, params in steps:
        x = get_primitive(name).fn(x, **params)
    return x


def _literal(v: Any) -> str:
    if isinstance(v, float):
        return repr(round(v, 6)) if math.isfinite(v) else "0.0"
    return repr(v)


def pipeline_code(steps: Sequence[tuple[str, dict[str, Any]]], *, header: str | None = None) -> str:
    """Standalone Python source of ``preprocess_images(images)`` running ``steps``.

    The file needs only numpy and OpenCV: the used primitives' sources are inlined.
    """
    used = []
    for name, _ in steps:
        if name not in used:
            used.append(name)
    parts = []
    if header:
        parts.append("\n".join(f"# {line}" for line in header.splitlines()))
    parts.append("import cv2\nimport numpy as np\n")
    parts.append(inspect.getsource(_per_channel))
    for name in used:
        parts.append(inspect.getsource(get_primitive(name).fn))
    body = ["def preprocess_images(images):",
            '    """Pipeline: ' + " -> ".join(n for n, _ in steps) + '."""',
            "    out = []",
            "    for img in images:",
            "        x = np.asarray(img, dtype=np.float32)"]
    for name, params in steps:
        args = ", ".join(f"{k}={_literal(v)}" for k, v in params.items())
        body.append(f"        x = {name}(x{', ' + args if args else ''})")
    body += ["        out.append(x)", "    return out", ""]
    parts.append("\n".join(body))
    return "\n\n".join(parts)


def describe_primitives() -> list[dict[str, Any]]:
    """Every primitive: name, signature, one-line doc and parameter ranges (for prompts and tools)."""
    return [p.describe() for p in PRIMITIVES.values()]


def suggest_pipeline(trial, *, min_steps: int = 2, max_steps: int = 4,
                     names: Sequence[str] | None = None) -> Pipeline:
    """Sample a pipeline of ``min_steps``–``max_steps`` primitives from an Optuna ``trial``."""
    names = list(names or PRIMITIVES)
    n = trial.suggest_int("n_steps", min_steps, max_steps)
    steps: Pipeline = []
    for i in range(n):
        name = trial.suggest_categorical(f"s{i}_op", names)
        params: dict[str, Any] = {}
        for p in get_primitive(name).params:
            key = f"s{i}_{name}_{p.name}"
            if p.kind == "float":
                params[p.name] = trial.suggest_float(key, p.low, p.high, log=p.log)
            elif p.kind == "int":
                params[p.name] = trial.suggest_int(key, int(p.low), int(p.high))
            else:
                params[p.name] = trial.suggest_categorical(key, list(p.choices))
        steps.append((name, params))
    return steps
