"""Decode an image file (TIFF, PNG, JPEG, BMP, NPY) into a numpy array — one reader for every server.

Single-channel images keep their measured values (8/16-bit, float); colour images come back as RGB
(alpha and palettes resolved); channel-first stacks (C, H, W) with up to 8 channels become
channels-last. Anything a decoder rejects is a ToolError that names the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from servers.common.errors import ToolError

_GREY_MODES = ("L", "I", "I;16", "I;16B", "I;16L", "F")


def read_image(path: str | Path, *, max_pixels: int | None = None) -> np.ndarray:
    """The image at ``path`` as an (H, W) or (H, W, C) array in its own units."""
    p = Path(path)
    if not p.is_file():
        raise ToolError(f"Image not found: {p.name}.", hint="Pass the path of an image file under the data root.")
    try:
        suffix = p.suffix.lower()
        if suffix in (".tif", ".tiff"):
            import tifffile

            arr = tifffile.imread(p)
        elif suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        else:
            from PIL import Image

            if max_pixels:
                Image.MAX_IMAGE_PIXELS = max_pixels
            with Image.open(p) as im:
                arr = np.asarray(im) if im.mode in _GREY_MODES else np.asarray(im.convert("RGB"))
    except ToolError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure means "not an image we can read"
        raise ToolError(f"Cannot read {p.name} as an image: {type(e).__name__}: {e}.",
                        hint="Pass a TIFF, PNG, JPEG or NPY image; the file may be truncated or corrupt.") from None
    arr = np.squeeze(np.asarray(arr))
    if arr.ndim == 3 and arr.shape[0] <= 8 and arr.shape[2] > 8:  # channel-first (C, H, W)
        arr = np.moveaxis(arr, 0, -1)
    return arr
