"""Reference answers computed independently from ground truth — never by calling our own tools.

Every shipped question has a function here, registered with ``@reference("<question id>")``,
that derives the answer rows from the source of truth: slide file headers (read with tifffile),
the shipped tissue masks, expert polygon annotations (MoNuSeg XML, parsed with ElementTree and
rasterised with scikit-image), instance-mask PNGs / label images, annotation CSVs, AnnData
tables and CosMx flat files (pandas / scipy KD-trees), and for generated data the truth files
written by :mod:`evals.generate`.

``python -m evals.groundtruth --write`` recomputes the answers and stores them in the question
files (``reference_answer``); ``--check`` verifies that the shipped answers still match.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from evals import generate as gen

Rows = list[dict[str, Any]]


@dataclass
class Roots:
    shared: Path | None  # the shared data folder (None when absent)
    generated: Path | None  # root given to evals.generate.generate_all (data/ and truth/ inside)

    def data(self, kind: str) -> Path:
        root = self.shared if kind == "shared" else (gen.data_dir(self.generated) if self.generated else None)
        if root is None or not root.is_dir():
            raise FileNotFoundError(f"no {kind} data root available")
        return root

    def truth(self) -> Path:
        if self.generated is None:
            raise FileNotFoundError("no generated data root")
        return gen.truth_dir(self.generated)


REGISTRY: dict[str, Callable[[Roots], Rows]] = {}


def reference(qid: str) -> Callable:
    def deco(fn: Callable[[Roots], Rows]) -> Callable[[Roots], Rows]:
        if qid in REGISTRY:
            raise ValueError(f"duplicate reference for {qid}")
        REGISTRY[qid] = fn
        return fn
    return deco


def _r(x: float, nd: int = 6) -> float:
    return float(round(float(x), nd))


# -- readers (independent of servers/*) -------------------------------------------------------
WSI = {"cmu": "wsi/cmu-1-small-region.svs", "tcga": "wsi/tcga-cr-7395-01a-01-ts1.svs"}
MONUSEG = ["TCGA-2Z-A9J9-01A-01-TS1", "TCGA-AC-A2FO-01A-01-TS1", "TCGA-HT-8564-01Z-00-DX1"]
MONUSEG_MPP = 0.2525
COSMX = "spatial/cosmx_lung12_mini"


def svs_levels(path: Path) -> list[tuple[int, int]]:
    """(width, height) of the pyramid levels: the tiled pages of an SVS, in file order."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        return [(p.shape[1], p.shape[0]) for p in tf.pages if p.is_tiled]


def svs_description(path: Path) -> dict[str, str]:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        desc = tf.pages[0].description or ""
    return {k.strip(): v.strip() for k, v in (kv.split("=", 1) for kv in desc.split("|")[1:] if "=" in kv)}


def tissue_fraction_from_mask(mask_path: Path) -> float:
    return float(np.load(mask_path).astype(bool).mean())


def imagescope_polygons(xml_path: Path) -> list[np.ndarray]:
    """One (N, 2) array of (row, col) vertices per annotated Region."""
    polys = []
    for region in ET.parse(xml_path).getroot().iter("Region"):
        pts = [(float(v.get("Y")), float(v.get("X"))) for v in region.iter("Vertex")]
        if len(pts) >= 3:
            polys.append(np.asarray(pts))
    return polys


def rasterise(polys: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Instance labels from polygons (later polygons overwrite earlier ones where they overlap)."""
    from skimage.draw import polygon

    lab = np.zeros(shape, np.int32)
    for i, p in enumerate(polys, 1):
        rr, cc = polygon(p[:, 0], p[:, 1], shape)
        lab[rr, cc] = i
    return lab


@lru_cache(maxsize=8)
def monuseg_labels(shared: Path, name: str) -> np.ndarray:
    import tifffile

    shape = tifffile.imread(shared / "he_nuclei" / f"{name}.tif").shape[:2]
    return rasterise(imagescope_polygons(shared / "he_nuclei" / f"{name}.xml"), shape)


def dsb_samples(shared: Path) -> list[Path]:
    return sorted(p for p in (shared / "fluo_nuclei" / "dsb2018").iterdir() if (p / "masks").is_dir())


def dsb_masks(sample: Path) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(m)) > 0 for m in sorted((sample / "masks").glob("*.png"))]


def read_tif(path: Path) -> np.ndarray:
    import tifffile

    return tifffile.imread(path)


def instance_areas(labels: np.ndarray) -> np.ndarray:
    counts = np.bincount(labels.ravel().astype(np.int64))
    return counts[1:][counts[1:] > 0]


def cosmx_tx(shared: Path):
    import pandas as pd

    return pd.read_csv(shared / COSMX / "Lung12_tx_file.csv")


def scimap_obs(shared: Path):
    import anndata as ad

    a = ad.read_h5ad(shared / "spatial" / "scimap_example.h5ad", backed="r")
    obs = a.obs.copy()
    n_vars = a.n_vars
    a.file.close()
    return obs, n_vars


def cells_csv(gen_data: Path, name: str):
    import pandas as pd

    return pd.read_csv(gen_data / "cells" / f"{name}.csv")


def nn_dist_and_index(xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from scipy.spatial import cKDTree

    d, i = cKDTree(xy).query(xy, k=2)
    return d[:, 1], i[:, 1]


def tiles_with_tissue(mask: np.ndarray, tile_px: int, scale: float, min_fraction: float) -> int:
    """Number of full ``tile_px`` level-0 tiles whose tissue fraction >= min_fraction.

    ``mask`` is at level-0 size / ``scale``; tiles are taken from the top-left corner, partial edge
    tiles excluded.
    """
    h0, w0 = mask.shape[0] * scale, mask.shape[1] * scale
    n = 0
    for r in range(int(h0 // tile_px)):
        for c in range(int(w0 // tile_px)):
            r0, r1 = int(round(r * tile_px / scale)), int(round((r + 1) * tile_px / scale))
            c0, c1 = int(round(c * tile_px / scale)), int(round((c + 1) * tile_px / scale))
            if mask[r0:r1, c0:c1].mean() >= min_fraction:
                n += 1
    return n


# ==============================================================================================
# DataQA
# ==============================================================================================
@reference("dataqa_cmu_dimensions")
def _(R: Roots) -> Rows:
    w, h = svs_levels(R.data("shared") / WSI["cmu"])[0]
    return [{"width_px": w, "height_px": h}]


@reference("dataqa_cmu_mpp")
def _(R: Roots) -> Rows:
    return [{"mpp": float(svs_description(R.data("shared") / WSI["cmu"])["MPP"])}]


@reference("dataqa_cmu_objective")
def _(R: Roots) -> Rows:
    return [{"objective_power": float(svs_description(R.data("shared") / WSI["cmu"])["AppMag"])}]


@reference("dataqa_cmu_physical_size")
def _(R: Roots) -> Rows:
    p = R.data("shared") / WSI["cmu"]
    w, h = svs_levels(p)[0]
    mpp = float(svs_description(p)["MPP"])
    return [{"width_mm": _r(w * mpp / 1000), "height_mm": _r(h * mpp / 1000)}]


@reference("dataqa_tcga_levels")
def _(R: Roots) -> Rows:
    lv = svs_levels(R.data("shared") / WSI["tcga"])
    return [{"level": i, "width_px": w, "height_px": h, "downsample": _r(lv[0][0] / w, 4)}
            for i, (w, h) in enumerate(lv)]


@reference("dataqa_fluo_image_info")
def _(R: Roots) -> Rows:
    a = read_tif(R.data("shared") / "fluo_nuclei" / "stardist_img2d.tif")
    return [{"height_px": a.shape[0], "width_px": a.shape[1], "dtype": str(a.dtype)}]


@reference("dataqa_dsb_image_sizes")
def _(R: Roots) -> Rows:
    from PIL import Image

    rows = []
    for s in dsb_samples(R.data("shared")):
        w, h = Image.open(next((s / "images").glob("*.png"))).size
        rows.append({"sample": s.name, "width_px": w, "height_px": h})
    return rows


@reference("dataqa_smfish_annotations")
def _(R: Roots) -> Rows:
    import pandas as pd

    xy = pd.read_csv(R.data("shared") / "spots" / "smfish.csv", header=None).to_numpy(float)
    return [{"n_spots": len(xy), "mean_x_px": _r(xy[:, 0].mean(), 3), "mean_y_px": _r(xy[:, 1].mean(), 3)}]


@reference("dataqa_generated_slide_levels")
def _(R: Roots) -> Rows:
    spec = gen.SLIDES["slide_a"]
    h, w = spec["shape"]
    # pyramidal_tiff halves each level with [::2, ::2] (ceil division)
    rows = []
    for i in range(spec["levels"]):
        rows.append({"level": i, "width_px": w, "height_px": h, "mpp": _r(spec["mpp"] * 2**i)})
        h, w = (h + 1) // 2, (w + 1) // 2
    read = svs_levels(R.data("generated") / "slides" / "slide_a.tiff")
    assert [(r["width_px"], r["height_px"]) for r in rows] == read, (rows, read)
    return rows


@reference("dataqa_generated_slide_mpp")
def _(R: Roots) -> Rows:
    return [{"slide": f"slides/{k}.tiff", "mpp": v["mpp"]} for k, v in gen.SLIDES.items()]


# ==============================================================================================
# SlideQA (tissue)
# ==============================================================================================
@reference("slideqa_cmu_tissue_area")
def _(R: Roots) -> Rows:
    p = R.data("shared") / WSI["cmu"]
    w, h = svs_levels(p)[0]
    mpp = float(svs_description(p)["MPP"])
    frac = tissue_fraction_from_mask(R.data("shared") / "wsi" / "cmu-1-small-region.tissue-mask.npy")
    return [{"tissue_area_mm2": _r(frac * w * h * mpp**2 / 1e6)}]


@reference("slideqa_tissue_fraction")
def _(R: Roots) -> Rows:
    return [{"slide": WSI[k], "tissue_fraction": _r(tissue_fraction_from_mask(
        R.data("shared") / WSI[k].replace(".svs", ".tissue-mask.npy")))} for k in ("cmu", "tcga")]


@reference("slideqa_more_tissue")
def _(R: Roots) -> Rows:
    f = {k: tissue_fraction_from_mask(R.data("shared") / WSI[k].replace(".svs", ".tissue-mask.npy"))
         for k in ("cmu", "tcga")}
    best = max(f, key=f.get)
    return [{"slide": WSI[best]}]


@reference("slideqa_generated_tissue_area")
def _(R: Roots) -> Rows:
    rows = []
    for k, spec in gen.SLIDES.items():
        m = np.load(R.truth() / "slides" / f"{k}.tissue-mask.npy")
        rows.append({"slide": f"slides/{k}.tiff", "tissue_area_mm2": _r(m.sum() * spec["mpp"] ** 2 / 1e6)})
    return rows


@reference("slideqa_generated_tissue_tiles")
def _(R: Roots) -> Rows:
    m = np.load(R.truth() / "slides" / "slide_a.tissue-mask.npy")
    return [{"n_tiles": tiles_with_tissue(m, 256, 1.0, 0.75)}]


@reference("slideqa_generated_tissue_regions")
def _(R: Roots) -> Rows:
    from scipy import ndimage as ndi

    rows = []
    for k in gen.SLIDES:
        m = np.load(R.truth() / "slides" / f"{k}.tissue-mask.npy")
        rows.append({"slide": f"slides/{k}.tiff", "n_regions": int(ndi.label(m)[1])})
    return rows


# ==============================================================================================
# CellularQA
# ==============================================================================================
@reference("cellularqa_monuseg_counts")
def _(R: Roots) -> Rows:
    return [{"image": f"he_nuclei/{n}.tif", "n_nuclei": len(imagescope_polygons(R.data("shared") / "he_nuclei" / f"{n}.xml"))}
            for n in MONUSEG]


@reference("cellularqa_monuseg_mean_area")
def _(R: Roots) -> Rows:
    rows = []
    for n in MONUSEG:
        areas = instance_areas(monuseg_labels(R.data("shared"), n)) * MONUSEG_MPP**2
        rows.append({"image": f"he_nuclei/{n}.tif", "mean_area_um2": _r(areas.mean(), 3)})
    return rows


@reference("cellularqa_monuseg_sparsest")
def _(R: Roots) -> Rows:
    c = {n: len(imagescope_polygons(R.data("shared") / "he_nuclei" / f"{n}.xml")) for n in MONUSEG}
    return [{"image": f"he_nuclei/{min(c, key=c.get)}.tif"}]


@reference("cellularqa_fluo_count")
def _(R: Roots) -> Rows:
    lab = read_tif(R.data("shared") / "fluo_nuclei" / "stardist_img2d.mask.tif")
    return [{"n_nuclei": len(instance_areas(lab))}]


@reference("cellularqa_fluo_mean_area")
def _(R: Roots) -> Rows:
    lab = read_tif(R.data("shared") / "fluo_nuclei" / "stardist_img2d.mask.tif")
    return [{"mean_area_px": _r(instance_areas(lab).mean(), 3)}]


@reference("dataqa_dsb_annotated_counts")
def _(R: Roots) -> Rows:
    return [{"sample": s.name, "n_annotated_nuclei": len(dsb_masks(s))} for s in dsb_samples(R.data("shared"))]


@reference("cellularqa_generated_fluo_eq_diameter")
def _(R: Roots) -> Rows:
    rows = []
    for k in gen.FLUO_TILES:
        a = instance_areas(read_tif(R.truth() / "nuclei_fluo" / f"{k}.labels.tif"))
        rows.append({"image": f"nuclei_fluo/{k}.tif",
                     "mean_diameter_um": _r(np.sqrt(4 * a / np.pi).mean() * gen.FLUO_MPP, 4)})
    return rows


@reference("cellularqa_generated_fluo_counts")
def _(R: Roots) -> Rows:
    return [{"image": f"nuclei_fluo/{k}.tif", "n_nuclei": len(instance_areas(read_tif(
        R.truth() / "nuclei_fluo" / f"{k}.labels.tif")))} for k in gen.FLUO_TILES]


@reference("cellularqa_generated_fluo_mean_area")
def _(R: Roots) -> Rows:
    return [{"image": f"nuclei_fluo/{k}.tif", "mean_area_um2": _r(instance_areas(read_tif(
        R.truth() / "nuclei_fluo" / f"{k}.labels.tif")).mean() * gen.FLUO_MPP**2, 3)} for k in gen.FLUO_TILES]


@reference("cellularqa_generated_fluo_density")
def _(R: Roots) -> Rows:
    rows = []
    for k in gen.FLUO_TILES:
        lab = read_tif(R.truth() / "nuclei_fluo" / f"{k}.labels.tif")
        area_mm2 = lab.size * gen.FLUO_MPP**2 / 1e6
        rows.append({"image": f"nuclei_fluo/{k}.tif", "nuclei_per_mm2": _r(len(instance_areas(lab)) / area_mm2, 2)})
    return rows


@reference("cellularqa_generated_he_counts")
def _(R: Roots) -> Rows:
    return [{"image": f"nuclei_he/{k}.png", "n_nuclei": len(instance_areas(read_tif(
        R.truth() / "nuclei_he" / f"{k}.labels.tif")))} for k in gen.HE_TILES]


# ==============================================================================================
# PatchQA / ImageQA
# ==============================================================================================
@reference("patchqa_smfish_spot_count")
def _(R: Roots) -> Rows:
    import pandas as pd

    return [{"n_spots": len(pd.read_csv(R.data("shared") / "spots" / "smfish.csv", header=None))}]


@reference("patchqa_generated_spot_counts")
def _(R: Roots) -> Rows:
    import pandas as pd

    return [{"image": f"spots/{k}.tif", "n_spots": len(pd.read_csv(R.truth() / "spots" / f"{k}.csv"))}
            for k in gen.SPOT_FIELDS]


@reference("patchqa_generated_most_spots")
def _(R: Roots) -> Rows:
    import pandas as pd

    c = {k: len(pd.read_csv(R.truth() / "spots" / f"{k}.csv")) for k in gen.SPOT_FIELDS}
    return [{"image": f"spots/{max(c, key=c.get)}.tif"}]


@reference("patchqa_monuseg_nuclear_fraction")
def _(R: Roots) -> Rows:
    return [{"image": f"he_nuclei/{n}.tif", "nuclear_area_fraction": _r((monuseg_labels(R.data("shared"), n) > 0).mean())}
            for n in MONUSEG]


@reference("patchqa_fluo_foreground_fraction")
def _(R: Roots) -> Rows:
    lab = read_tif(R.data("shared") / "fluo_nuclei" / "stardist_img2d.mask.tif")
    return [{"foreground_fraction": _r((lab > 0).mean())}]


@reference("patchqa_generated_he_nuclear_fraction")
def _(R: Roots) -> Rows:
    return [{"image": f"nuclei_he/{k}.png", "nuclear_area_fraction": _r((read_tif(
        R.truth() / "nuclei_he" / f"{k}.labels.tif") > 0).mean())} for k in gen.HE_TILES]


@reference("patchqa_generated_largest_nucleus")
def _(R: Roots) -> Rows:
    return [{"image": f"nuclei_fluo/{k}.tif", "max_area_um2": _r(instance_areas(read_tif(
        R.truth() / "nuclei_fluo" / f"{k}.labels.tif")).max() * gen.FLUO_MPP**2, 3)} for k in gen.FLUO_TILES]


@reference("patchqa_preprocess_spots_raw")
def _(R: Roots) -> Rows:
    import pandas as pd

    return [{"n_spots": len(pd.read_csv(R.truth() / "preprocess" / "spots_raw.csv"))}]


@reference("cellularqa_preprocess_nuclei_uneven")
def _(R: Roots) -> Rows:
    return [{"n_nuclei": len(instance_areas(read_tif(R.truth() / "preprocess" / "nuclei_uneven.labels.tif")))}]


@reference("patchqa_dsb_most_nuclei")
def _(R: Roots) -> Rows:
    c = {s.name: len(dsb_masks(s)) for s in dsb_samples(R.data("shared"))}
    return [{"sample": max(c, key=c.get)}]


# ==============================================================================================
# SpatialQA
# ==============================================================================================
@reference("spatialqa_scimap_size")
def _(R: Roots) -> Rows:
    obs, n_vars = scimap_obs(R.data("shared"))
    return [{"n_cells": len(obs), "n_markers": int(n_vars)}]


@reference("spatialqa_scimap_top_phenotypes")
def _(R: Roots) -> Rows:
    obs, _n = scimap_obs(R.data("shared"))
    vc = obs["phenotype"].astype(str).value_counts()
    return [{"phenotype": k, "n_cells": int(v), "fraction": _r(v / len(obs))} for k, v in vc.head(5).items()]


@reference("spatialqa_scimap_nn_distance")
def _(R: Roots) -> Rows:
    obs, _n = scimap_obs(R.data("shared"))
    d, _i = nn_dist_and_index(obs[["X_position", "Y_position"]].to_numpy(float))
    return [{"mean_nn_distance": _r(d.mean(), 4)}]


@reference("spatialqa_scimap_cd8_to_tumor")
def _(R: Roots) -> Rows:
    from scipy.spatial import cKDTree

    obs, _n = scimap_obs(R.data("shared"))
    xy = obs[["X_position", "Y_position"]].to_numpy(float)
    ph = obs["phenotype"].astype(str).to_numpy()
    d, _ = cKDTree(xy[ph == "Tumor CD45- CD30+"]).query(xy[ph == "CD8 T cells"])
    return [{"mean_distance": _r(d.mean(), 4), "n_cd8_cells": int((ph == "CD8 T cells").sum())}]


@reference("spatialqa_scimap_mean_area")
def _(R: Roots) -> Rows:
    obs, _n = scimap_obs(R.data("shared"))
    obs = obs.assign(phenotype=obs["phenotype"].astype(str))
    top = obs["phenotype"].value_counts().head(3).index
    return [{"phenotype": p, "mean_area": _r(obs.loc[obs.phenotype == p, "Area"].mean(), 3)} for p in top]


@reference("spatialqa_cosmx_tx_per_fov")
def _(R: Roots) -> Rows:
    t = cosmx_tx(R.data("shared"))
    return [{"fov": int(f), "n_transcripts": int(n)} for f, n in t.groupby("fov").size().items()]


@reference("spatialqa_cosmx_top_genes_fov2")
def _(R: Roots) -> Rows:
    t = cosmx_tx(R.data("shared"))
    vc = t.loc[t.fov == 2, "target"].value_counts()
    if vc.iloc[4] == vc.iloc[5]:
        raise AssertionError("tie at rank 5; the question would be ambiguous")
    return [{"gene": g, "n_transcripts": int(n)} for g, n in vc.head(5).items()]


@reference("spatialqa_cosmx_cells_per_fov")
def _(R: Roots) -> Rows:
    rows = []
    for f in (2, 3):
        lab = read_tif(R.data("shared") / COSMX / "CellLabels" / f"CellLabels_F{f:03d}.tif")
        rows.append({"fov": f, "n_cells": int(len(np.unique(lab[lab > 0])))})
    return rows


@reference("spatialqa_cosmx_fraction_in_cells")
def _(R: Roots) -> Rows:
    t = cosmx_tx(R.data("shared"))
    return [{"fov": int(f), "fraction_in_cells": _r((g.cell_ID > 0).mean())} for f, g in t.groupby("fov")]


@reference("spatialqa_cosmx_gene_count")
def _(R: Roots) -> Rows:
    t = cosmx_tx(R.data("shared"))
    return [{"fov": int(f), "n_transcripts": int((g.target == "COL1A1").sum())} for f, g in t.groupby("fov")]


@reference("spatialqa_cosmx_tx_per_cell")
def _(R: Roots) -> Rows:
    t = cosmx_tx(R.data("shared"))
    t = t[t.cell_ID > 0]
    return [{"fov": int(f), "mean_transcripts_per_cell": _r(g.groupby("cell_ID").size().mean(), 4)}
            for f, g in t.groupby("fov")]


@reference("spatialqa_generated_composition")
def _(R: Roots) -> Rows:
    df = cells_csv(R.data("generated"), "random3")
    vc = df["cell_type"].value_counts()
    return [{"cell_type": k, "n_cells": int(v), "fraction": _r(v / len(df))} for k, v in vc.items()]


@reference("spatialqa_generated_nn_same_type")
def _(R: Roots) -> Rows:
    rows = []
    for k in ("segregated", "mixed"):
        df = cells_csv(R.data("generated"), k)
        _d, i = nn_dist_and_index(df[["x_um", "y_um"]].to_numpy(float))
        t = df["cell_type"].to_numpy()
        rows.append({"dataset": f"cells/{k}.csv", "same_type_nn_fraction": _r((t == t[i]).mean())})
    return rows


@reference("spatialqa_generated_lattice_spacing")
def _(R: Roots) -> Rows:
    df = cells_csv(R.data("generated"), "mixed")
    d, _i = nn_dist_and_index(df[["x_um", "y_um"]].to_numpy(float))
    return [{"mean_nn_distance_um": _r(d.mean(), 4)}]


@reference("spatialqa_generated_enrichment")
def _(R: Roots) -> Rows:
    """Self-neighbourhood A–A: enriched when observed same-type neighbour pairs exceed the count
    expected from the type frequencies (permutation-free, analytic expectation)."""
    rows = []
    for k in ("segregated", "mixed"):
        df = cells_csv(R.data("generated"), k)
        _d, i = nn_dist_and_index(df[["x_um", "y_um"]].to_numpy(float))
        t = df["cell_type"].to_numpy()
        a = t == "A"
        observed = (a & (t[i] == "A")).sum()
        expected = a.sum() * (a.sum() - 1) / (len(t) - 1)
        rows.append({"dataset": f"cells/{k}.csv", "A_A": "enriched" if observed > expected else "depleted"})
    return rows


@reference("spatialqa_generated_marker_by_type")
def _(R: Roots) -> Rows:
    df = cells_csv(R.data("generated"), "random3")
    m = df.groupby("cell_type")["marker0"].mean()
    return [{"cell_type": k, "mean_marker0": _r(v, 4)} for k, v in m.items()]


# -- files ------------------------------------------------------------------------------------
def compute(q, roots: Roots) -> Rows:
    """The reference rows for question ``q`` (raises FileNotFoundError when its data is absent)."""
    if q.id not in REGISTRY:
        raise KeyError(f"no ground-truth function for question {q.id!r}")
    roots.data(q.data)
    return REGISTRY[q.id](roots)


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return abs(a - b) <= 1e-6 * max(1.0, abs(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    return a == b


def rows_match(a: Rows | None, b: Rows | None) -> bool:
    return a is not None and b is not None and _close(a, b)


def main(argv: list[str] | None = None) -> int:
    from evals.schema import QUESTIONS_DIR, Question

    p = argparse.ArgumentParser(prog="python -m evals.groundtruth", description=__doc__.splitlines()[0])
    from evals.runner import DEFAULT_SHARED

    p.add_argument("--shared", default=str(DEFAULT_SHARED), help="shared data folder (default: ../shared/data)")
    p.add_argument("--generated", default=None, help="generated-data root (default: user cache)")
    p.add_argument("--questions", default=str(QUESTIONS_DIR))
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", action="store_true")
    g.add_argument("--check", action="store_true")
    a = p.parse_args(argv)
    roots = Roots(Path(a.shared) if Path(a.shared).is_dir() else None,
                  gen.generate_all(a.generated))
    bad = 0
    for f in sorted(Path(a.questions).glob("*.json")):
        raw = json.loads(f.read_text())
        items = raw["questions"] if isinstance(raw, dict) else raw
        changed = False
        for item in items:
            q = Question.model_validate(item)
            try:
                rows = compute(q, roots)
            except FileNotFoundError as e:
                print(f"skip {q.id}: {e}", file=sys.stderr)
                continue
            if rows_match(item.get("reference_answer"), rows):
                continue
            if a.write:
                item["reference_answer"] = rows
                Question.model_validate(item)
                changed = True
            else:
                bad += 1
                print(f"MISMATCH {q.id}: shipped {item.get('reference_answer')} != computed {rows}", file=sys.stderr)
        if changed:
            from servers.common.atomic import atomic_write_text

            atomic_write_text(f, json.dumps(raw, indent=2, ensure_ascii=False) + "\n")
            print(f"updated {f}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
