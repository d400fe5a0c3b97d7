"""Cellpose backend: a local ``pretrained_model`` file run through the installed Cellpose's API.

Cellpose 3 (``CellposeModel(pretrained_model=..., device=...)``, ``eval(channels=[0, 0])``) and
Cellpose 4 (same constructor, ``eval`` without ``channels``) are both supported; which one is used
is decided by the installed major version. Nothing is downloaded: the weights path is checked
before Cellpose sees it (Cellpose itself silently falls back to downloading ``cyto3`` when a path
does not exist).

Options: ``weights`` (path or a name in Cellpose's model cache; see weights.py), ``diameter``
(px) or ``diameter_um`` (µm, needs ``mpp``) — default: the model's own ``diam_mean`` (no rescale),
``flow_threshold`` (0.4), ``cellprob_threshold`` (0.0), ``min_size`` (15 px).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from servers.common.errors import ToolError
from servers.common.segmenters.base import Segmenter
from servers.common.segmenters.postprocess import nuclear_channel
from servers.common.segmenters.weights import find_weights

try:  # the backend is "not available" (clear install hint from base.get_segmenter) without cellpose
    import cellpose  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("the 'cellpose' package is not installed") from e


def cellpose_major() -> int:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("cellpose")
    except PackageNotFoundError:  # e.g. installed with --target; fall back to the module
        from cellpose import version as v  # type: ignore[no-redef]
    return int(str(v).split(".")[0])


@lru_cache(maxsize=4)
def load_cellpose_model(path: str, device: str, mtime_ns: int = 0):
    """A ``cellpose.models.CellposeModel`` with the weights at ``path`` on ``device`` (cached;
    ``mtime_ns`` in the key reloads rewritten weights)."""
    import torch
    from cellpose import models

    try:
        return models.CellposeModel(gpu=device == "cuda", pretrained_model=path, device=torch.device(device))
    except Exception as e:
        raise ToolError(f"Cellpose could not load {path}: {e}.",
                        hint="Pass weights saved by Cellpose (cellpose train / `cytoagent segmenters train cellpose`).") from e


class CellposeSegmenter(Segmenter):
    """Cellpose with local weights; batches go through one ``model.eval`` call."""

    def _model(self):
        path = find_weights("cellpose", self.options.get("weights"))
        return load_cellpose_model(str(path), self.resolved_device(), path.stat().st_mtime_ns)

    def _diameter(self, mpp: float | None) -> float | None:
        if self.options.get("diameter") is not None:
            d = float(self.options["diameter"])
        elif self.options.get("diameter_um") is not None:
            if mpp is None:
                raise ToolError("diameter_um needs the pixel size.", hint="Pass mpp= (µm per pixel) or diameter= in px.")
            d = float(self.options["diameter_um"]) / float(mpp)
        else:
            return None
        if not d > 0:
            raise ToolError(f"Cellpose diameter {d} must be > 0 px.", hint="Pass the typical object diameter.")
        return d

    def _eval(self, images: list[np.ndarray], mpp: float | None) -> list[np.ndarray]:
        model = self._model()
        diameter = self._diameter(mpp)
        if diameter is None:
            diameter = float(np.asarray(model.diam_mean).ravel()[0])
        kw = dict(batch_size=self.batch_size, diameter=diameter, normalize=True,
                  flow_threshold=float(self.options.get("flow_threshold", 0.4)),
                  cellprob_threshold=float(self.options.get("cellprob_threshold", 0.0)),
                  min_size=int(self.options.get("min_size", 15)))
        if cellpose_major() < 4:
            kw["channels"] = [0, 0]
        chans = [nuclear_channel(im, self.modality) for im in images]
        masks = model.eval(chans, **kw)[0]
        return [np.asarray(m, dtype=np.int32) for m in masks]

    def _segment_one(self, image: np.ndarray, *, mpp: float | None) -> np.ndarray:
        return self._eval([image], mpp)[0]

    def segment_batch(self, images: Sequence[np.ndarray], *, mpp: float | None = None) -> list[np.ndarray]:
        imgs = [np.asarray(im) for im in images]
        for im in imgs:
            if im.ndim not in (2, 3):
                raise ToolError(f"Expected 2-D or (H, W, 3) images, got shape {im.shape}.", hint="Pass single images.")
        return self._eval(imgs, mpp) if imgs else []
