"""GeoJSON that QuPath (0.4+) imports: tissue annotations, tile and nucleus detections.

Coordinates are level-0 pixels (QuPath's image space). Each feature carries
``properties.objectType`` ("annotation", "tile" or "detection"), ``classification`` {name, color}
and ``measurements`` {name: number}.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

COLORS = {"Tissue": [0, 160, 0], "Tile": [80, 80, 200], "Nucleus": [200, 0, 200]}


def _clean(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def feature(geometry: dict, object_type: str, name: str, measurements: dict | None = None,
            fid: str | None = None) -> dict:
    props: dict[str, Any] = {"objectType": object_type,
                             "classification": {"name": name, "color": COLORS.get(name, [255, 200, 0])}}
    if measurements:
        props["measurements"] = {k: c for k, v in measurements.items() if (c := _clean(v)) is not None}
    out = {"type": "Feature", "geometry": geometry, "properties": props}
    if fid is not None:
        out["id"] = fid
    return out


def collection(features: list[dict]) -> dict:
    return {"type": "FeatureCollection", "features": features}


def tissue_geojson(polygons: list, mpp: float | None = None) -> dict:
    """Tissue pieces (shapely Polygons in level-0 px) as QuPath annotations with area measurements."""
    from shapely.geometry import mapping

    feats = []
    for i, p in enumerate(polygons, 1):
        meas = {"area_px0": p.area}
        if mpp is not None:
            meas["area_mm2"] = p.area * (mpp / 1000) ** 2
        feats.append(feature(mapping(p), "annotation", "Tissue", meas, fid=f"tissue-{i}"))
    return collection(feats)


def tiles_geojson(grid, value_columns: list[str] | None = None) -> dict:
    """Tile squares (grid rows with x, y, size0) as QuPath tiles."""
    feats = []
    cols = value_columns or [c for c in ("tissue_fraction", "n_nuclei", "cluster") if c in grid]
    for rec in grid.to_dict("records"):
        x, y, s = float(rec["x"]), float(rec["y"]), float(rec["size0"])
        geom = {"type": "Polygon", "coordinates": [[[x, y], [x + s, y], [x + s, y + s], [x, y + s], [x, y]]]}
        feats.append(feature(geom, "tile", "Tile", {c: rec.get(c) for c in cols}, fid=str(rec.get("tile_id"))))
    return collection(feats)


NUCLEUS_MEASUREMENTS = ("area_um2", "perimeter_um", "eccentricity", "solidity", "circularity",
                        "mean_hematoxylin_od")


def nuclei_geojson(table, *, name: str = "Nucleus") -> dict:
    """Nuclei as QuPath detections: polygons when the table has a ``polygon`` column, points otherwise."""
    feats = []
    has_poly = "polygon" in table
    cols = [c for c in NUCLEUS_MEASUREMENTS if c in table]
    for rec in table.to_dict("records"):
        ring = rec.get("polygon") if has_poly else None
        if ring is not None and len(ring) >= 4:
            # a table read back from Parquet holds the ring as an object array of (2,) arrays
            coords = np.array([np.asarray(p, float) for p in ring], float).reshape(-1, 2)
            geom = {"type": "Polygon", "coordinates": [coords.round(2).tolist()]}
        else:
            geom = {"type": "Point", "coordinates": [round(float(rec["x"]), 2), round(float(rec["y"]), 2)]}
        fid = rec.get("nucleus_id", rec.get("label"))
        feats.append(feature(geom, "detection", name, {c: rec[c] for c in cols},
                             fid=None if fid is None else f"nucleus-{fid}"))
    return collection(feats)
