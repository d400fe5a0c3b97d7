"""StarDist 2D backend (TensorFlow/Keras stack) with a local model folder.

A StarDist model is a folder holding ``config.json``, ``thresholds.json`` (optional) and the Keras
weights (``weights_best.h5`` / ``weights_last.h5``, or ``*.weights.h5`` under Keras 3). It is loaded
with ``StarDist2D(None, name=<folder name>, basedir=<parent>)`` — the official way to open a saved
model; nothing is downloaded (``from_pretrained`` is never called).

Input normalisation follows StarDist's examples: percentiles 1 → 99.8 per image
(``csbdeep.utils.normalize``). A 1-channel model sees the nuclear channel (hematoxylin OD for H&E);
a 3-channel model sees RGB. Large images are predicted in tiles (``n_tiles`` guessed by StarDist
when not given).

Options: ``weights`` (model folder; see weights.py), ``prob_thresh`` / ``nms_thresh`` (model's
optimised thresholds by default), ``scale`` (resize factor, e.g. model_mpp/mpp), ``n_tiles``.

Device: TensorFlow uses a visible GPU by itself; ``device="cpu"`` hides GPUs from TensorFlow
(only effective before TensorFlow initialises in this process).
"""

from __future__ import annotations

import contextlib
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

from servers.common.errors import ToolError
from servers.common.segmenters.base import Segmenter
from servers.common.segmenters.postprocess import nuclear_channel
from servers.common.segmenters.weights import find_weights

try:
    import stardist  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the 'stardist' package (with TensorFlow) is not installed") from e


def _configure_device(device: str) -> None:
    import tensorflow as tf

    if device == "cpu":
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TF already initialised its devices; keep what it has
            pass


@lru_cache(maxsize=4)
def load_stardist_model(folder: str, device: str, mtime_ns: int = 0):
    """``StarDist2D`` loaded from a model folder (config.json + weights); cached, ``mtime_ns`` (of
    config.json) in the key reloads a retrained folder."""
    _configure_device(device)
    from stardist.models import StarDist2D

    p = Path(folder)
    if not (p / "config.json").is_file():
        raise ToolError(f"{p} is not a StarDist model folder (no config.json).",
                        hint="Pass the folder written by StarDist training (config.json + weights_best.h5).")
    try:
        with contextlib.redirect_stdout(sys.stderr):  # StarDist print()s; stdout is the MCP channel
            return StarDist2D(None, name=p.name, basedir=str(p.parent))
    except Exception as e:
        raise ToolError(f"StarDist could not load the model in {p}: {e}.",
                        hint="Pass a folder with config.json and weights_best.h5 / weights_last.h5.") from e


class StarDistSegmenter(Segmenter):
    """StarDist 2D star-convex polygon instances."""

    def _model(self):
        folder = find_weights("stardist", self.options.get("weights"))
        return load_stardist_model(str(folder), self.resolved_device(), (folder / "config.json").stat().st_mtime_ns)

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import tensorflow as tf

        return "cuda" if tf.config.list_physical_devices("GPU") else "cpu"

    def _input(self, image: np.ndarray, n_channel_in: int) -> np.ndarray:
        from csbdeep.utils import normalize

        if n_channel_in == 1:
            x = nuclear_channel(image, self.modality)
            return normalize(x, 1, 99.8, axis=(0, 1)).astype(np.float32)
        if image.ndim != 3 or image.shape[2] < n_channel_in:
            raise ToolError(f"This StarDist model takes {n_channel_in} channels; got image shape {image.shape}.",
                            hint="Pass an (H, W, 3) RGB image, or use a 1-channel model.")
        return normalize(image[..., :n_channel_in].astype(np.float32), 1, 99.8, axis=(0, 1))

    def _segment_one(self, image: np.ndarray, *, mpp: float | None) -> np.ndarray:
        model = self._model()
        nch = int(model.config.n_channel_in)
        x = self._input(image, nch)
        kw = {}
        for k in ("prob_thresh", "nms_thresh", "scale"):
            if self.options.get(k) is not None:
                kw[k] = float(self.options[k])
        if self.options.get("n_tiles") is not None:
            nt = self.options["n_tiles"]
            kw["n_tiles"] = tuple(nt) + ((1,) if x.ndim == 3 else ()) if isinstance(nt, (list, tuple)) else None
        else:
            kw["n_tiles"] = model._guess_n_tiles(x)
        axes = "YX" if x.ndim == 2 else "YXC"
        with contextlib.redirect_stdout(sys.stderr):
            labels, _ = model.predict_instances(x, axes=axes, show_tile_progress=False, verbose=False, **kw)
        return np.asarray(labels, dtype=np.int32)
