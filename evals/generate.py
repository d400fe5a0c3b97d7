"""Generated datasets with exact answers for the question set (``data: "generated"`` questions).

``generate_all(root)`` writes deterministic data under ``root/data`` (this folder is the data root
the servers see for generated questions) and the truth it was built from under ``root/truth``
(label images, spot coordinates, tissue masks) — outside the data root, so an assistant cannot
read the answers. A ``root/MANIFEST.json`` records the generator version; calling again is a
no-op unless the version changed or ``force=True``.

Built on :mod:`servers.common.synthetic` (nuclei, spots, cell tables, pyramidal TIFFs).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from servers.common.atomic import atomic_path, atomic_write_text

VERSION = 4

# dataset specs (shared with groundtruth.py so both agree on what was generated)
FLUO_TILES = {f"tile_{i}": {"n": n, "seed": 101 + i} for i, n in enumerate((12, 20, 28, 36))}
FLUO_SHAPE = (256, 256)
FLUO_MPP = 0.5
HE_TILES = {f"tile_{i}": {"n": n, "seed": 201 + i} for i, n in enumerate((10, 25, 18))}
HE_SHAPE = (256, 256)
HE_MPP = 0.5
SPOT_FIELDS = {f"field_{i}": {"n": n, "seed": 301 + i} for i, n in enumerate((25, 50, 80))}
SPOT_SHAPE = (256, 256)
SPOT_SIGMA = 1.5
# preprocessing-dependent images: answers need intensity normalisation / flat-field correction first
PRE_SPOTS = {"n": 60, "seed": 601, "shape": (256, 256)}  # raw uint16, arbitrary scale, blotchy background
PRE_NUCLEI = {"n": 30, "seed": 602, "shape": (256, 256)}  # uint16, illumination falling to 4% on the left
CELL_TABLES = {
    "segregated": {"n": 2000, "pattern": "segregated", "types": ("A", "B"), "seed": 401},
    "mixed": {"n": 900, "pattern": "mixed", "types": ("A", "B"), "seed": 402},
    "random3": {"n": 1500, "pattern": "random", "types": ("tumor", "immune", "stroma"), "seed": 403},
}
CELL_EXTENT_UM = 1000.0
SLIDES = {
    "slide_a": {"shape": (2048, 3072), "mpp": 0.5, "levels": 3, "seed": 501, "boxes": None},
    # three pieces of 384x512, 320x384 and 384x512 µm (tissue tools drop specks < ~0.05 mm²)
    "slide_b": {"shape": (4096, 6144), "mpp": 0.25, "levels": 3, "seed": 502,
                "boxes": [(512, 512, 2048, 2560), (2560, 3072, 3840, 4608), (256, 3584, 1792, 5632)]},
}


def default_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cytoagent" / "evals-generated"


def data_dir(root: str | os.PathLike) -> Path:
    return Path(root) / "data"


def truth_dir(root: str | os.PathLike) -> Path:
    return Path(root) / "truth"


def _save_tiff(path: Path, arr: np.ndarray, **kw) -> None:
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, arr, **kw)


def _save_png(path: Path, arr: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")


def _resolution(mpp: float) -> dict:
    return {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}


def _preprocess_images(data: Path, truth: Path) -> None:
    import pandas as pd
    from scipy import ndimage as ndi

    from servers.common import synthetic

    rng = np.random.default_rng(PRE_SPOTS["seed"])
    si = synthetic.spot_image(PRE_SPOTS["shape"], PRE_SPOTS["n"], SPOT_SIGMA, seed=PRE_SPOTS["seed"])
    bg = ndi.gaussian_filter(rng.normal(0, 1, PRE_SPOTS["shape"]), 25)
    bg = (bg - bg.min()) / (bg.max() - bg.min())
    _save_tiff(data / "preprocess" / "spots_raw.tif", np.round((si.image + 0.8 * bg) * 3000 + 200).astype(np.uint16))
    (truth / "preprocess").mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"row": si.coords[:, 0], "col": si.coords[:, 1]}).to_csv(truth / "preprocess" / "spots_raw.csv",
                                                                          index=False)
    ni = synthetic.nuclei_image(PRE_NUCLEI["shape"], PRE_NUCLEI["n"], modality="fluorescence", seed=PRE_NUCLEI["seed"])
    ramp = 0.04 + 0.96 * np.linspace(0, 1, PRE_NUCLEI["shape"][1])[None, :]
    img = ni.image * ramp * 2000 + 300 + rng.normal(0, 20, PRE_NUCLEI["shape"])
    _save_tiff(data / "preprocess" / "nuclei_uneven.tif", np.round(np.clip(img, 0, 65535)).astype(np.uint16),
               **_resolution(FLUO_MPP))
    _save_tiff(truth / "preprocess" / "nuclei_uneven.labels.tif", ni.labels)


def generate_all(root: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Write every generated dataset under ``root`` (default: the user cache). Returns ``root``."""
    import pandas as pd

    from servers.common import synthetic

    root = Path(root) if root is not None else default_root()
    manifest = root / "MANIFEST.json"
    if not force and manifest.is_file():
        try:
            if json.loads(manifest.read_text()).get("version") == VERSION:
                return root
        except (OSError, json.JSONDecodeError):
            pass
    data, truth = data_dir(root), truth_dir(root)
    for name, spec in FLUO_TILES.items():
        ni = synthetic.nuclei_image(FLUO_SHAPE, spec["n"], modality="fluorescence", seed=spec["seed"])
        _save_tiff(data / "nuclei_fluo" / f"{name}.tif", np.round(ni.image * 4095).astype(np.uint16),
                   **_resolution(FLUO_MPP))
        _save_tiff(truth / "nuclei_fluo" / f"{name}.labels.tif", ni.labels)
    for name, spec in HE_TILES.items():
        ni = synthetic.nuclei_image(HE_SHAPE, spec["n"], modality="he", seed=spec["seed"])
        _save_png(data / "nuclei_he" / f"{name}.png", ni.image)
        _save_tiff(truth / "nuclei_he" / f"{name}.labels.tif", ni.labels)
    for name, spec in SPOT_FIELDS.items():
        si = synthetic.spot_image(SPOT_SHAPE, spec["n"], SPOT_SIGMA, seed=spec["seed"])
        _save_tiff(data / "spots" / f"{name}.tif", si.image)
        (truth / "spots").mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"row": si.coords[:, 0], "col": si.coords[:, 1]}).to_csv(
            truth / "spots" / f"{name}.csv", index=False)
    _preprocess_images(data, truth)
    for name, spec in CELL_TABLES.items():
        df = synthetic.cell_table(spec["n"], pattern=spec["pattern"], types=spec["types"],
                                  extent_um=CELL_EXTENT_UM, seed=spec["seed"])
        df = df.rename(columns={"x": "x_um", "y": "y_um"})
        (data / "cells").mkdir(parents=True, exist_ok=True)
        with atomic_path(data / "cells" / f"{name}.csv") as tmp:
            df.to_csv(tmp, index=False)
    for name, spec in SLIDES.items():
        (data / "slides").mkdir(parents=True, exist_ok=True)
        target = data / "slides" / f"{name}.tiff"
        with atomic_path(target) as tmp:
            info = synthetic.pyramidal_tiff(tmp, spec["shape"], mpp=spec["mpp"], levels=spec["levels"],
                                            seed=spec["seed"], tissue_boxes=spec["boxes"])
        (truth / "slides").mkdir(parents=True, exist_ok=True)
        np.save(truth / "slides" / f"{name}.tissue-mask.npy", info["tissue_mask"])
    atomic_write_text(manifest, json.dumps({"version": VERSION}))
    return root
