"""Synthetic whole slides with known nuclei (extends ``servers.common.synthetic`` for WSI tests and benchmarks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_pyramid(path: str | Path, rgb: np.ndarray, *, mpp: float, levels: int = 2, tile: int = 256,
                  compression: str = "jpeg") -> list[tuple[int, int]]:
    """Write an RGB array as a tiled pyramidal TIFF that OpenSlide opens; returns level (w, h)."""
    import tifffile

    res = 10_000 / mpp  # px per cm
    dims = []
    level = np.asarray(rgb, np.uint8)
    with tifffile.TiffWriter(Path(path), bigtiff=False) as tw:
        for i in range(levels):
            dims.append((level.shape[1], level.shape[0]))
            tw.write(level, tile=(tile, tile), photometric="rgb", compression=compression,
                     compressionargs={"level": 95} if compression == "jpeg" else None,
                     resolution=(res / 2**i, res / 2**i), resolutionunit="CENTIMETER",
                     subfiletype=1 if i else 0, metadata=None)
            level = level[::2, ::2]
    return dims


def nuclei_slide(path: str | Path, shape: tuple[int, int] = (1024, 1024), n: int = 300, *, mpp: float = 0.5,
                 radius: tuple[float, float] = (6, 10), seed: int = 0, levels: int = 2) -> dict:
    """A pyramidal H&E-like slide full of nuclei with known labels and centres (level-0 px)."""
    from servers.common.synthetic import nuclei_image

    s = nuclei_image(shape, n, radius, modality="he", seed=seed)
    dims = write_pyramid(path, s.image, mpp=mpp, levels=levels, compression="zlib")
    return {"path": str(path), "image": s.image, "labels": s.labels, "centers_rc": s.centers, "radii": s.radii,
            "mpp": mpp, "level_dimensions": dims}
