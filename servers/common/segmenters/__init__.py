"""One interface for nucleus/cell instance segmentation, with pluggable backends.

    seg = get_segmenter("classical", modality="he")          # no weights needed
    labels = seg.segment(image, mpp=0.25)                      # (H, W) int32 instance labels

Backends: ``classical`` (default, weight-free), ``unet`` (bioimage.io U-Net + seeded watershed),
``cellpose`` and ``stardist`` (local weights). The WSI and preprocess servers use only this
interface, so no segmentation code is duplicated per server.
"""

from servers.common.segmenters.base import (
    BACKENDS,
    Segmenter,
    available_backends,
    get_segmenter,
    register_backend,
)

__all__ = ["BACKENDS", "Segmenter", "available_backends", "get_segmenter", "register_backend"]
