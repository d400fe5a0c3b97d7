"""The segmenter interface and backend registry."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from servers.common.errors import ToolError

Modality = Literal["he", "fluorescence"]
Device = Literal["auto", "cpu", "cuda"]


@dataclass
class Segmenter:
    """Base class: image(s) in, int32 instance label image(s) out (0 = background).

    Subclasses implement ``_segment_one`` (and may override ``segment_batch`` to batch on a GPU).
    ``image`` is (H, W) for fluorescence or (H, W, 3) uint8 RGB for H&E. ``mpp`` (µm per pixel)
    lets a backend rescale to the resolution its model or parameters expect.
    """

    modality: Modality = "fluorescence"
    device: Device = "auto"
    batch_size: int = 8
    options: dict[str, Any] = field(default_factory=dict)
    name: str = "base"

    def segment(self, image: np.ndarray, *, mpp: float | None = None) -> np.ndarray:
        img = np.asarray(image)
        if img.ndim not in (2, 3):
            raise ToolError(f"Expected a 2-D image or (H, W, 3) RGB, got shape {img.shape}.",
                            hint="Pass one image; use segment_batch for several.")
        if img.ndim == 3 and img.shape[2] not in (1, 3, 4):
            raise ToolError(f"Expected 1, 3 or 4 channels last, got shape {img.shape}.",
                            hint="Pass (H, W) or (H, W, 3).")
        labels = self._segment_one(img, mpp=mpp)
        return np.asarray(labels, dtype=np.int32)

    def segment_batch(self, images: Sequence[np.ndarray], *, mpp: float | None = None) -> list[np.ndarray]:
        return [self.segment(im, mpp=mpp) for im in images]

    def _segment_one(self, image: np.ndarray, *, mpp: float | None) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def resolved_device(self) -> str:
        """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``."""
        if self.device != "auto":
            return self.device
        try:
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            return "cpu"


# name -> ("module:Class", extra to install, one-line description)
BACKENDS: dict[str, tuple[str, str | None, str]] = {
    "classical": ("servers.common.segmenters.classical:ClassicalSegmenter", None,
                  "threshold + distance-transform watershed; hematoxylin channel for H&E; no weights"),
    "unet": ("servers.common.segmenters.unet:UNetSegmenter", "unet",
             "bioimage.io 2D U-Net (nucleus foreground/boundary) + seeded watershed; weights.pt or ONNX"),
    "cellpose": ("servers.common.segmenters.cellpose_backend:CellposeSegmenter", "cellpose",
                 "Cellpose with a local pretrained_model path"),
    "stardist": ("servers.common.segmenters.stardist_backend:StarDistSegmenter", "stardist",
                 "StarDist 2D with a local model folder"),
}


def register_backend(name: str, target: str, extra: str | None = None, description: str = "") -> None:
    """Add a backend (``target`` = ``"module:Class"`` of a ``Segmenter`` subclass)."""
    BACKENDS[name] = (target, extra, description)


def _load_class(name: str):
    if name not in BACKENDS:
        raise ToolError(f"Unknown segmentation backend {name!r}.", hint=f"Use one of: {', '.join(BACKENDS)}.")
    target, extra, _ = BACKENDS[name]
    mod, _, cls = target.partition(":")
    try:
        return getattr(importlib.import_module(mod), cls)
    except ImportError as e:
        hint = f"pip install 'cytoagent[{extra}]'" if extra else "reinstall cytoagent"
        raise ToolError(f"Segmentation backend {name!r} is not available: {e}.", hint=f"Install it with {hint}.") from e


def get_segmenter(backend: str = "classical", *, modality: Modality = "fluorescence", device: Device = "auto",
                  batch_size: int = 8, **options: Any) -> Segmenter:
    """A ready segmenter. Backends that need weights take ``weights=<local path>`` in ``options``."""
    if modality not in ("he", "fluorescence"):
        raise ToolError(f"Unknown modality {modality!r}.", hint="Use 'he' or 'fluorescence'.")
    cls = _load_class(backend)
    return cls(modality=modality, device=device, batch_size=batch_size, options=options, name=backend)


def available_backends() -> dict[str, dict[str, Any]]:
    """Each backend with whether its code imports here and what it needs."""
    out = {}
    for name, (_target, extra, desc) in BACKENDS.items():
        try:
            _load_class(name)
            status = "ready"
        except ToolError as e:
            status = str(e)
        out[name] = {"description": desc, "extra": extra, "status": status}
    return out
