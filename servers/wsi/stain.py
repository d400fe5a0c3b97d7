"""H&E stain separation and normalisation.

- ``deconvolve``: Ruifrok-Johnston colour deconvolution (``skimage.color.rgb2hed``) into
  hematoxylin, eosin and residual (DAB) optical densities.
- ``macenko_stains``: Macenko et al. 2009 stain-vector estimation — optical density, drop
  transparent pixels (OD < ``beta``), project on the plane of the two main eigenvectors, take the
  ``alpha`` / ``100-alpha`` percentile angles as the two stain directions (hematoxylin first).
- ``macenko_normalize``: re-express an image with a target's stain vectors and concentration
  range (default target: the reference of the original Macenko implementation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from servers.common.errors import ToolError

IO_DEFAULT = 240.0
#: Reference H&E stain matrix (columns: H, E; rows: R, G, B OD) and max concentrations.
REF_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
REF_MAX_CONC = np.array([1.9705, 1.0308])


@dataclass
class StainModel:
    stains: np.ndarray  # (3, 2) unit OD vectors, column 0 = hematoxylin, column 1 = eosin
    max_conc: np.ndarray  # (2,) 99th-percentile concentrations
    io: float = IO_DEFAULT

    def to_dict(self) -> dict:
        return {"hematoxylin_od_rgb": [round(float(v), 4) for v in self.stains[:, 0]],
                "eosin_od_rgb": [round(float(v), 4) for v in self.stains[:, 1]],
                "max_concentration": [round(float(v), 4) for v in self.max_conc], "io": self.io}


def _rgb(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.ndim != 3 or a.shape[2] < 3:
        raise ToolError(f"Stain tools need an RGB image (H, W, 3), got shape {a.shape}.",
                        hint="Pass an H&E RGB region (e.g. from read_region).")
    return a[..., :3]


def deconvolve(rgb: np.ndarray) -> dict[str, np.ndarray]:
    """Hematoxylin, eosin and residual optical-density channels (float32, same H x W)."""
    from skimage.color import rgb2hed

    hed = rgb2hed(_rgb(rgb)).astype(np.float32)
    return {"hematoxylin": hed[..., 0], "eosin": hed[..., 1], "residual": hed[..., 2]}


def optical_density(rgb: np.ndarray, io: float = IO_DEFAULT) -> np.ndarray:
    """Beer-Lambert OD = -log((I + 1) / Io) per channel, (N, 3) float."""
    a = _rgb(rgb).reshape(-1, 3).astype(np.float64)
    return -np.log((a + 1.0) / io)


def macenko_stains(rgb: np.ndarray, *, io: float = IO_DEFAULT, alpha: float = 1.0, beta: float = 0.15,
                   max_pixels: int = 1_000_000, seed: int = 0) -> StainModel:
    """Estimate the H and E stain vectors and concentration range of an H&E image (Macenko)."""
    od = optical_density(rgb, io)
    od = od[np.all(od >= beta, axis=1)]
    if od.shape[0] < 100:
        raise ToolError(f"Only {od.shape[0]} stained pixels (OD >= {beta} in every channel) — not enough to "
                        "estimate stain vectors.", hint="Pass a region that contains tissue (not background glass).")
    if od.shape[0] > max_pixels:
        od = od[np.random.default_rng(seed).choice(od.shape[0], max_pixels, replace=False)]
    _, vecs = np.linalg.eigh(np.cov(od, rowvar=False))
    plane = vecs[:, 1:3]  # the two largest eigenvectors
    proj = od @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, alpha), np.percentile(phi, 100 - alpha)
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    v1 *= np.sign(v1.sum()) or 1.0
    v2 *= np.sign(v2.sum()) or 1.0
    # hematoxylin absorbs red more than eosin does: the vector with the larger red OD is H
    stains = np.stack([v1, v2], axis=1) if v1[0] > v2[0] else np.stack([v2, v1], axis=1)
    stains /= np.linalg.norm(stains, axis=0, keepdims=True)
    conc = np.linalg.lstsq(stains, od.T, rcond=None)[0]
    max_conc = np.percentile(conc, 99, axis=1)
    return StainModel(stains=stains, max_conc=np.maximum(max_conc, 1e-6), io=io)


def concentrations(rgb: np.ndarray, model: StainModel) -> np.ndarray:
    """Per-pixel (H, E) concentrations under ``model``: (H, W, 2) float32."""
    a = _rgb(rgb)
    od = optical_density(a, model.io)
    conc = np.linalg.lstsq(model.stains, od.T, rcond=None)[0].T
    return conc.reshape(a.shape[0], a.shape[1], 2).astype(np.float32)


def macenko_normalize(rgb: np.ndarray, target: StainModel | None = None, *, source: StainModel | None = None,
                      io: float = IO_DEFAULT) -> np.ndarray:
    """``rgb`` re-stained to ``target`` (default: the Macenko reference) → uint8 RGB."""
    a = _rgb(rgb)
    src = source or macenko_stains(a, io=io)
    tgt = target or StainModel(REF_STAINS / np.linalg.norm(REF_STAINS, axis=0), REF_MAX_CONC, io)
    conc = concentrations(a, src).reshape(-1, 2)
    conc *= (tgt.max_conc / src.max_conc)[None, :]
    out = tgt.io * np.exp(-(conc @ tgt.stains.T))
    return np.clip(out, 0, 255).reshape(a.shape).astype(np.uint8)
