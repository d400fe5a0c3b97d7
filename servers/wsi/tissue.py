"""Tissue detection on a slide thumbnail: threshold, morphology, pieces, holes, area, contours.

Method (``method="gray"``, the default): Otsu threshold of the greyscale thumbnail (tissue is
darker than glass), morphological closing with a disk of ``close_um`` (dilate then erode: joins
fragments and bridges gaps narrower than about 2 × ``close_um`` **without growing the outline**, so
a sharp-edged piece keeps its true area), optional outward growth by ``dilate_um`` (0 by default;
histolab's ``TissueMask`` and the expectation masks shipped with the shared test slides add such a
rim, about 25 µm), holes smaller than ``max_hole_um2`` filled, pieces smaller than
``min_piece_um2`` removed. ``"saturation"`` thresholds HSV saturation (good
for pale or fatty tissue on bright glass), ``"od"`` the summed optical density, ``"gray+saturation"``
takes their union. All sizes are physical; slides without mpp use the level-0 pixel equivalents
at 0.5 µm/px **only for the morphology** (reported in ``units``) and give no mm² areas unless
``mpp`` is passed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from servers.common.errors import ToolError
from servers.wsi.slide import Slide

METHODS = ("gray", "saturation", "od", "gray+saturation")
NO_MPP_MORPHOLOGY_MPP = 0.5  # only used to size the structuring elements when a slide has no mpp


@dataclass
class TissueResult:
    mask: np.ndarray  # bool, at ``downsample`` vs level 0
    downsample: float
    mpp: float | None
    thumbnail: np.ndarray
    threshold: float
    pieces: list[dict[str, Any]] = field(default_factory=list)
    polygons: list[Any] = field(default_factory=list)  # shapely Polygons in level-0 px

    @property
    def tissue_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0

    @property
    def area_mm2(self) -> float | None:
        if self.mpp is None:
            return None
        return float(self.mask.sum() * (self.downsample * self.mpp / 1000.0) ** 2)

    def summary(self) -> dict[str, Any]:
        out = {
            "tissue_fraction": round(self.tissue_fraction, 4),
            "area_mm2": None if self.area_mm2 is None else round(self.area_mm2, 4),
            "n_pieces": len(self.pieces),
            "n_holes": int(sum(p["n_holes"] for p in self.pieces)),
            "mask_shape": list(self.mask.shape),
            "mask_downsample": round(self.downsample, 4),
            "threshold": round(float(self.threshold), 4),
            "pieces": self.pieces[:20],
        }
        if self.mpp is None:
            out["note"] = "Slide has no mpp: areas are in level-0 px^2; pass mpp= for mm²."
        return out


def tissue_mask_from_rgb(
    rgb: np.ndarray, *, px_um: float, method: str = "gray", close_um: float = 25.0, dilate_um: float = 0.0,
    min_piece_um2: float = 75_000.0, max_hole_um2: float = 75_000.0,
) -> tuple[np.ndarray, float]:
    """Binary tissue mask of an RGB thumbnail whose pixels are ``px_um`` µm wide; returns (mask, threshold).

    ``close_um``: radius of the area-neutral closing (gap bridging); ``dilate_um``: extra outward
    growth of every piece (inflates areas; 0 = none)."""
    from skimage import color, filters, morphology

    if method not in METHODS:
        raise ToolError(f"Unknown tissue method {method!r}.", hint=f"Use one of: {', '.join(METHODS)}.")
    img = np.asarray(rgb)[..., :3]
    if img.size == 0:
        raise ToolError("Empty thumbnail.")

    def otsu(v: np.ndarray) -> float:
        if float(v.max()) == float(v.min()):
            return float("inf")
        return float(filters.threshold_otsu(v))

    masks, thr = [], float("nan")
    if method in ("gray", "gray+saturation"):
        gray = color.rgb2gray(img)
        t = otsu(gray)
        thr = t
        masks.append(gray < t)
    if method in ("saturation", "gray+saturation"):
        sat = color.rgb2hsv(img)[..., 1]
        t = otsu(sat)
        thr = t if method == "saturation" else thr
        masks.append(sat > t)
    if method == "od":
        od = -np.log(np.clip(img.astype(np.float32) / 255.0, 1 / 255.0, 1.0)).sum(axis=2)
        thr = otsu(od)
        masks.append(od > thr)
    if close_um < 0 or dilate_um < 0:
        raise ToolError(f"close_um and dilate_um must be >= 0 µm (got {close_um}, {dilate_um}).",
                        hint="Pass close_um=25 (gap bridging, area-neutral) and dilate_um=0 (no outward growth).")
    mask = np.logical_or.reduce(masks)
    r = int(round(close_um / px_um))
    if r >= 1:
        # pad so that tissue touching the image border is not eroded away from it by the closing
        padded = np.pad(mask, r, mode="edge")
        mask = morphology.closing(padded, morphology.disk(r))[r:-r, r:-r]
    g = int(round(dilate_um / px_um))
    if g >= 1:
        mask = morphology.dilation(mask, morphology.disk(g))
    px_area = px_um**2
    mask = morphology.remove_small_holes(mask, max_size=max(0, int(max_hole_um2 / px_area)))
    mask = morphology.remove_small_objects(mask, max_size=max(0, int(min_piece_um2 / px_area)))
    return mask.astype(bool), thr


def mask_polygons(mask: np.ndarray, scale: float, *, simplify_px: float = 1.0) -> list[Any]:
    """Shapely polygons (with holes) of a binary mask, coordinates multiplied by ``scale``
    (e.g. the mask downsample → level-0 pixels)."""
    import cv2
    from shapely.geometry import Polygon

    m = np.ascontiguousarray(mask.astype(np.uint8))
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hierarchy = hierarchy[0]
    polys = []
    for i, cnt in enumerate(contours):
        if hierarchy[i][3] != -1 or len(cnt) < 3:  # holes are handled with their parent
            continue
        shell = cnt[:, 0, :].astype(float)
        holes = []
        child = hierarchy[i][2]
        while child != -1:
            h = contours[child]
            if len(h) >= 3:
                holes.append(h[:, 0, :].astype(float) * scale)
            child = hierarchy[child][0]
        poly = Polygon(shell * scale, holes)
        if not poly.is_valid:
            poly = poly.buffer(0)
        if simplify_px:
            poly = poly.simplify(simplify_px * scale, preserve_topology=True)
        if not poly.is_empty:
            polys.append(poly)
    return polys


def segment_tissue(
    slide: Slide, *, method: str = "gray", working_um: float = 5.0, max_side: int = 2048,
    close_um: float = 25.0, dilate_um: float = 0.0, min_piece_um2: float | None = None,
    max_hole_um2: float = 75_000.0, embedded_thumbnail: bool = True,
) -> TissueResult:
    """Tissue mask of a slide, computed on a thumbnail of about ``working_um`` µm/px (at most
    ``max_side`` px), with pieces (area, bounding box, holes) and polygons in level-0 pixels.

    ``min_piece_um2`` defaults to 75,000 µm² (0.075 mm²) or 1 % of the slide area if smaller, so
    small crops keep their tissue. ``embedded_thumbnail`` lets it use the scanner's thumbnail image
    when that is a faithful downscale (tens of ms instead of decoding the slide)."""
    W, H = slide.dimensions
    base = slide.mpp if slide.mpp is not None else NO_MPP_MORPHOLOGY_MPP
    if min_piece_um2 is None:
        min_piece_um2 = min(75_000.0, 0.01 * W * H * base**2)
    ds = max(1.0, working_um / base, max(W, H) / max_side)
    w, h = max(1, int(round(W / ds))), max(1, int(round(H / ds)))
    thumb = slide.overview(w, h, ds, embedded=embedded_thumbnail)
    ds_y, ds_x = H / h, W / w
    ds = (ds_x + ds_y) / 2
    mask, thr = tissue_mask_from_rgb(thumb, px_um=ds * base, method=method, close_um=close_um, dilate_um=dilate_um,
                                     min_piece_um2=min_piece_um2, max_hole_um2=max_hole_um2)
    res = TissueResult(mask=mask, downsample=ds, mpp=slide.mpp, thumbnail=thumb, threshold=thr)
    res.polygons = mask_polygons(mask, ds)
    unit = (slide.mpp / 1000.0) ** 2 if slide.mpp is not None else None
    pieces = []
    for i, poly in enumerate(sorted(res.polygons, key=lambda p: -p.area)):
        minx, miny, maxx, maxy = poly.bounds
        holes = list(getattr(poly, "interiors", []))
        d = {"piece": i + 1, "bbox_level0": [int(minx), int(miny), int(math.ceil(maxx)), int(math.ceil(maxy))],
             "n_holes": len(holes), "area_px0": round(float(poly.area), 1)}
        if unit is not None:
            from shapely.geometry import Polygon

            d["area_mm2"] = round(float(poly.area) * unit, 5)
            d["holes_area_mm2"] = round(sum(Polygon(h).area for h in holes) * unit, 5)
        pieces.append(d)
    res.pieces = pieces
    res.polygons = sorted(res.polygons, key=lambda p: -p.area)
    return res


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; ``a`` is resized (nearest) to ``b``'s shape if they differ."""
    a = np.asarray(a, bool)
    b = np.asarray(b, bool)
    if a.shape != b.shape:
        import cv2

        a = cv2.resize(a.astype(np.uint8), (b.shape[1], b.shape[0]), interpolation=cv2.INTER_NEAREST).astype(bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def overlay_png(res: TissueResult, max_side: int = 1024) -> bytes:
    """Thumbnail with tissue outlines (green) for a preview."""
    from servers.common.images import boundaries, downscale, png_bytes

    thumb = res.thumbnail.copy()
    edge = boundaries(res.mask.astype(np.int32))
    import cv2

    edge = cv2.dilate(edge.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    thumb[edge] = (0, 200, 0)
    small = downscale(thumb, max_side)
    return png_bytes(small.astype(np.uint8))
