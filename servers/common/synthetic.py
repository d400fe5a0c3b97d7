"""Synthetic data with exact ground truth, for tests, benchmarks and demos.

Every generator is deterministic for a given ``seed`` and returns the data together with the
truth it was built from (labels, coordinates, planted types), so tests can assert exact answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class NucleiImage:
    image: np.ndarray  # (H, W) float32 fluorescence or (H, W, 3) uint8 H&E-like
    labels: np.ndarray  # (H, W) int32, 0 = background, 1..n instances
    centers: np.ndarray  # (n, 2) row, col
    radii: np.ndarray  # (n,) pixels


def nuclei_image(
    shape: tuple[int, int] = (256, 256), n: int = 30, radius: tuple[float, float] = (6, 10), *,
    modality: str = "fluorescence", noise: float = 0.05, seed: int = 0, min_gap: float = 3.0,
) -> NucleiImage:
    """Non-overlapping elliptical nuclei with known instance labels.

    ``modality="fluorescence"``: bright blobs on dark background (float32 in [0, 1]).
    ``modality="he"``: purple nuclei on pink stroma (uint8 RGB), built by Beer-Lambert mixing of
    hematoxylin and eosin so that colour deconvolution recovers the nuclei.
    """
    rng = np.random.default_rng(seed)
    h, w = shape
    labels = np.zeros(shape, np.int32)
    centers, radii = [], []
    yy, xx = np.mgrid[0:h, 0:w]
    attempts = 0
    while len(centers) < n and attempts < n * 200:
        attempts += 1
        r = rng.uniform(*radius)
        c = rng.uniform([r + 2, r + 2], [h - r - 2, w - r - 2])
        if any(np.hypot(*(c - c2)) < r + r2 + min_gap for c2, r2 in zip(centers, radii)):
            continue
        ecc = rng.uniform(0.75, 1.0)
        theta = rng.uniform(0, np.pi)
        dy, dx = yy - c[0], xx - c[1]
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = -dx * np.sin(theta) + dy * np.cos(theta)
        inside = (u / r) ** 2 + (v / (r * ecc)) ** 2 <= 1.0
        labels[inside & (labels == 0)] = len(centers) + 1
        centers.append(c)
        radii.append(r)
    fg = (labels > 0).astype(np.float32)
    from scipy import ndimage as ndi

    smooth = ndi.gaussian_filter(fg, 1.0)
    if modality == "fluorescence":
        brightness = np.zeros(len(centers) + 1, np.float32)
        brightness[1:] = rng.uniform(0.6, 1.0, len(centers))
        img = ndi.gaussian_filter(brightness[labels], 1.0) * 0.9 + 0.05
        img = img + rng.normal(0, noise, shape).astype(np.float32)
        image = np.clip(img, 0, 1).astype(np.float32)
    elif modality == "he":
        # optical densities of hematoxylin (nuclei) and eosin (everywhere) → RGB by Beer-Lambert
        h_vec = np.array([0.65, 0.70, 0.29])
        e_vec = np.array([0.07, 0.99, 0.11])
        conc_h = smooth * rng.uniform(0.9, 1.3) + rng.normal(0, noise, shape)
        conc_e = 0.35 + 0.1 * ndi.gaussian_filter(rng.normal(0, 1, shape), 4) + rng.normal(0, noise / 2, shape)
        od = conc_h[..., None] * h_vec + np.clip(conc_e, 0, None)[..., None] * e_vec
        image = np.clip(255 * np.exp(-od), 0, 255).astype(np.uint8)
    else:
        raise ValueError(f"unknown modality {modality!r}; use 'fluorescence' or 'he'")
    return NucleiImage(image, labels, np.array(centers).reshape(-1, 2), np.array(radii))


@dataclass
class SpotImage:
    image: np.ndarray  # (H, W) float32
    coords: np.ndarray  # (n, 2) row, col (sub-pixel)


def spot_image(
    shape: tuple[int, int] = (256, 256), n: int = 60, sigma: float = 1.5, amplitude: tuple[float, float] = (0.4, 1.0),
    *, background: float = 0.1, noise: float = 0.03, min_dist: float = 6.0, seed: int = 0, gradient: float = 0.0,
) -> SpotImage:
    """Gaussian spots at known sub-pixel positions on a (optionally uneven) background."""
    rng = np.random.default_rng(seed)
    h, w = shape
    coords: list[np.ndarray] = []
    attempts = 0
    while len(coords) < n and attempts < n * 200:
        attempts += 1
        c = rng.uniform([3, 3], [h - 3, w - 3])
        if all(np.hypot(*(c - c2)) >= min_dist for c2 in coords):
            coords.append(c)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.full(shape, background, np.float32) + gradient * (xx / w)
    for c in coords:
        a = rng.uniform(*amplitude)
        r0, c0 = int(round(c[0])), int(round(c[1]))
        sl = (slice(max(0, r0 - 6), min(h, r0 + 7)), slice(max(0, c0 - 6), min(w, c0 + 7)))
        img[sl] += a * np.exp(-((yy[sl] - c[0]) ** 2 + (xx[sl] - c[1]) ** 2) / (2 * sigma**2))
    img += rng.normal(0, noise, shape).astype(np.float32)
    return SpotImage(img.astype(np.float32), np.array(coords).reshape(-1, 2))


def cell_table(
    n: int = 2000, *, pattern: str = "segregated", types: tuple[str, ...] = ("A", "B"), extent_um: float = 1000.0,
    seed: int = 0, n_markers: int = 5, samples: int = 1,
):
    """A cell table (pandas) with x/y in µm, a ``cell_type`` column, markers, ``sample``.

    Patterns with known spatial answers:
      ``random``      complete spatial randomness, types assigned independently (no enrichment)
      ``segregated``  left half type 0, right half type 1 (self-enrichment, cross-depletion)
      ``mixed``       a checkerboard-free alternating mix: every cell's nearest neighbour is of the
                      other type (a jittered lattice with alternating types)
      ``clustered``   Thomas-process clusters of type 0 in a random background of type 1
      ``lattice``     a square lattice with spacing ``extent_um / sqrt(n)``, exact NN distances
    """
    import pandas as pd

    rng = np.random.default_rng(seed)
    k = len(types)
    if pattern == "random":
        xy = rng.uniform(0, extent_um, (n, 2))
        t = rng.integers(0, k, n)
    elif pattern == "segregated":
        xy = rng.uniform(0, extent_um, (n, 2))
        t = np.minimum((xy[:, 0] / extent_um * k).astype(int), k - 1)
    elif pattern in ("mixed", "lattice"):
        side = int(np.ceil(np.sqrt(n)))
        spacing = extent_um / side
        gy, gx = np.divmod(np.arange(side * side), side)
        xy = np.stack([gx, gy], 1).astype(float) * spacing + spacing / 2
        t = (gx + gy) % k if pattern == "mixed" else rng.integers(0, k, side * side)
        if pattern == "mixed":
            xy = xy + rng.uniform(-0.05, 0.05, xy.shape) * spacing
        xy, t = xy[:n], t[:n]
    elif pattern == "clustered":
        n_par = max(1, n // 100)
        parents = rng.uniform(0, extent_um, (n_par, 2))
        n_c = n // 2
        child = parents[rng.integers(0, n_par, n_c)] + rng.normal(0, extent_um * 0.01, (n_c, 2))
        back = rng.uniform(0, extent_um, (n - n_c, 2))
        xy = np.clip(np.vstack([child, back]), 0, extent_um)
        t = np.r_[np.zeros(n_c, int), np.ones(n - n_c, int) % k]
    else:
        raise ValueError(f"unknown pattern {pattern!r}")
    df = pd.DataFrame({"cell_id": [f"c{i}" for i in range(len(xy))], "x": xy[:, 0], "y": xy[:, 1]})
    df["cell_type"] = pd.Categorical(np.asarray(types)[t], categories=list(types))
    for m in range(n_markers):
        base = rng.gamma(2.0, 1.0, len(df))
        df[f"marker{m}"] = base + 3.0 * (t == (m % k))
    df["sample"] = [f"s{i % samples}" for i in range(len(df))]
    return df


def pyramidal_tiff(
    path: str | Path, shape: tuple[int, int] = (2048, 3072), *, mpp: float = 0.5, tile: int = 256, levels: int = 3,
    seed: int = 0, tissue_boxes: list[tuple[int, int, int, int]] | None = None,
) -> dict:
    """A tiled, pyramidal RGB TIFF that OpenSlide opens (generic-tiff), with known tissue regions.

    Returns the truth: level dimensions, mpp and the tissue mask at full resolution.
    """
    import tifffile

    rng = np.random.default_rng(seed)
    h, w = shape
    boxes = tissue_boxes or [(h // 8, w // 8, h // 2, w // 3), (h // 2, w // 2, 7 * h // 8, 7 * w // 8)]
    mask = np.zeros(shape, bool)
    for r0, c0, r1, c1 in boxes:
        mask[r0:r1, c0:c1] = True
    img = np.full((h, w, 3), 242, np.uint8)
    tissue_rgb = np.array([200, 120, 170], np.float32)
    tex = rng.normal(0, 12, (h // 8 + 1, w // 8 + 1, 3)).repeat(8, 0).repeat(8, 1)[:h, :w]
    img[mask] = np.clip(tissue_rgb + tex[mask], 0, 255).astype(np.uint8)
    res = 10_000 / mpp  # pixels per cm
    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=False) as tw:
        level = img
        dims = []
        for i in range(levels):
            dims.append((level.shape[1], level.shape[0]))
            scale = 2**i
            tw.write(
                level, tile=(tile, tile), photometric="rgb", compression="jpeg",
                resolution=(res / scale, res / scale), resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0, metadata=None,
            )
            level = level[::2, ::2]
    return {"path": str(path), "level_dimensions": dims, "mpp": mpp, "tissue_mask": mask}
