"""Declarative preprocessing-optimisation tasks.

A :class:`Task` is a dataset with a deterministic validation/test split, a black-box downstream
tool with fixed settings (:mod:`servers.preprocess.downstream`), its metric, an expert baseline
preprocessing and a text description for the model. Built-in tasks:

- ``spots_synthetic``: generated Gaussian spots at known sub-pixel positions on uneven backgrounds,
  raw camera-like intensities (always available; used by tests and benchmarks);
- ``smfish``: the annotated smFISH field ``spots/smfish.png`` + ``smfish.csv`` (267 spots), cut into
  a 4×6 grid of tiles;
- ``nuclei_synthetic``: generated fluorescent nuclei with exact instance labels;
- ``fluo_nuclei``: StarDist's fluorescence image (4 tiles) + 12 DSB2018 images, classical segmenter;
- ``fluo_nuclei_unet``: the same images with the bioimage.io U-Net (``models/unet2d_nuclei_broad``);
- ``he_nuclei``: 3 MoNuSeg H&E tiles (each cut 2×2), classical segmenter, 0.2525 µm/px.

More tasks come from folders holding images, ground truth and a ``task.toml`` / ``task.yaml``
(see :func:`load_task_file` and ``docs/preprocess.md``), found under ``<data root>/preprocess_tasks/``,
in folders registered with :func:`register_task_folder`, or in ``CYTOAGENT_PREPROCESS_TASKS``.
Paths are always relative to the configured data root (or to the task folder).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from servers.common.errors import ToolError

KINDS = ("spots", "nuclei")
SPLITS = ("val", "test")

SIGNATURE = '''def preprocess_images(images: list[np.ndarray]) -> list[np.ndarray]:
    """Return one processed image per input image, same height/width (and channel count)."""'''


@dataclass
class Sample:
    id: str
    image: np.ndarray
    truth: np.ndarray  # (N, 2) row/col spot coordinates, or (H, W) int32 instance labels


@dataclass
class Task:
    """One optimisation task (see the module docstring)."""

    name: str
    kind: str
    description: str
    source: dict[str, Any]
    downstream: dict[str, Any]
    expert: str = "percentile"
    split_seed: int = 0
    val_fraction: float = 0.5
    mpp: float | None = None
    origin: str = "builtin"
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ToolError(f"Task {self.name!r} has unknown kind {self.kind!r}.", hint=f"Use one of {KINDS}.")
        if not 0.0 < float(self.val_fraction) < 1.0:
            raise ToolError(f"Task {self.name!r}: val_fraction {self.val_fraction} must be in (0, 1).")
        if self.expert not in EXPERTS:
            raise ToolError(f"Task {self.name!r}: unknown expert baseline {self.expert!r}.",
                            hint=f"Use one of: {', '.join(EXPERTS)}.")

    # -- identity ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Task:
        return cls(**d)

    @property
    def fingerprint(self) -> str:
        """Hash of everything that changes scores (data, split, downstream), not the description."""
        key = {k: getattr(self, k) for k in ("kind", "source", "downstream", "split_seed", "val_fraction", "mpp")}
        return hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]

    @property
    def modality(self) -> str:
        return self.downstream.get("settings", {}).get("modality", "fluorescence")

    @property
    def rgb(self) -> bool:
        return self.kind == "nuclei" and self.modality == "he"

    @property
    def metric(self) -> str:
        return "spot_f1" if self.kind == "spots" else "ap50"

    # -- data -------------------------------------------------------------------------------
    def available(self) -> tuple[bool, str]:
        """Whether the task's data can be read here, and why not."""
        try:
            for p in _required_files(self):
                if not p.exists():
                    return False, f"missing {p}"
        except ToolError as e:
            return False, str(e)
        return True, "ok"

    def samples(self, split: str | None = None) -> list[Sample]:
        """All samples (``split=None``) or the deterministic ``val`` / ``test`` half."""
        all_samples = load_samples(self)
        if split is None:
            return all_samples
        if split not in SPLITS:
            raise ToolError(f"Unknown split {split!r}.", hint="Use 'val' or 'test'.")
        val_ids, _ = split_ids(self, [s.id for s in all_samples])
        return [s for s in all_samples if (s.id in val_ids) == (split == "val")]

    def make_downstream(self):
        from servers.preprocess.downstream import Downstream

        ds = dict(self.downstream)
        settings = dict(ds.get("settings", {}))
        if "weights" in settings and settings["weights"]:
            settings["weights"] = str(_data_file(self, settings["weights"]))
        tool = ds.get("tool", "log_spots" if self.kind == "spots" else "segmenter")
        return Downstream(tool=tool, settings=settings, match_radius_px=float(ds.get("match_radius_px", 3.0)),
                          mpp=self.mpp)

    def expert_code(self) -> str:
        return EXPERTS[self.expert]()

    def summary(self) -> dict[str, Any]:
        ok, why = self.available()
        return {"name": self.name, "kind": self.kind, "metric": self.metric, "expert": self.expert,
                "available": ok, **({} if ok else {"unavailable_because": why}), "origin": self.origin,
                "description": self.description.split("\n")[0]}


# -- expert baselines -------------------------------------------------------------------------
def _expert(steps, note):
    def make() -> str:
        from servers.preprocess.primitives import pipeline_code

        return pipeline_code(steps, header=note)

    return make


#: expert baselines as primitive pipelines (also applied directly by ``detect_spots``)
EXPERT_STEPS: dict[str, list[tuple[str, dict]]] = {
    "percentile": [("percentile_normalize", {"low": 1.0, "high": 99.8})],
    "minmax": [("minmax_normalize", {})],
    "normalize99": [("percentile_normalize", {"low": 1.0, "high": 99.0})],
    "identity": [],
}
EXPERTS = {
    "percentile": _expert(EXPERT_STEPS["percentile"],
                          "Expert baseline: percentile clipping (1st-99.8th percentile to [0, 1])."),
    "minmax": _expert(EXPERT_STEPS["minmax"], "Baseline: min-max scaling to [0, 1]."),
    "normalize99": _expert(EXPERT_STEPS["normalize99"],
                           "Expert baseline: Cellpose normalize99 (1st-99th percentile to [0, 1])."),
    "identity": lambda: "def preprocess_images(images):\n    return [img for img in images]\n",
}


# -- split ----------------------------------------------------------------------------------
def split_ids(task: Task, ids: list[str]) -> tuple[set[str], set[str]]:
    """Deterministic val/test split: order ids by sha1(seed:id) and take the first fraction as val."""
    order = sorted(ids, key=lambda i: hashlib.sha1(f"{task.split_seed}:{i}".encode()).hexdigest())
    n_val = int(round(len(order) * float(task.val_fraction)))
    if len(order) >= 2:
        n_val = min(max(n_val, 1), len(order) - 1)
    return set(order[:n_val]), set(order[n_val:])


# -- loading --------------------------------------------------------------------------------
_CACHE: dict[tuple[str, str], list[Sample]] = {}
_CACHE_LOCK = threading.Lock()


def _data_root() -> Path:
    from servers.common.config import get_config

    return Path(get_config().data_root)


def _data_file(task: Task, rel: str) -> Path:
    """A file of the task: relative to its folder (folder tasks) or to the data root."""
    from servers.common.paths import confine, resolve_data_path

    if task.source.get("type") == "folder":
        return confine(task.source["root"], rel, what="task folder", must_exist=False)
    return resolve_data_path(rel, must_exist=False)


def _required_files(task: Task) -> list[Path]:
    src = task.source
    t = src.get("type")
    out: list[Path] = []
    if t in ("spot_file", "label_file"):
        out = [_data_file(task, src["image"]), _data_file(task, src["truth"])]
    elif t == "fluo_nuclei":
        out = [_data_file(task, src["image"]), _data_file(task, src["truth"])]
    elif t == "monuseg":
        out = [_data_file(task, f"{src['folder']}/{n}.tif") for n in src["names"]]
    elif t == "folder":
        out = [Path(src["root"])]
    w = task.downstream.get("settings", {}).get("weights")
    if w:
        out.append(_data_file(task, w))
    return out


def load_samples(task: Task) -> list[Sample]:
    """Every sample of the task (cached per process, keyed by the task's fingerprint and data root)."""
    key = (task.fingerprint, str(_data_root()))
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key]
    ok, why = task.available()
    if not ok:
        raise ToolError(f"Task {task.name!r} cannot be loaded here: {why}.",
                        hint="Point CYTOAGENT_DATA_ROOT at the data (e.g. ../shared/data) or use 'spots_synthetic'.")
    loader = _LOADERS.get(task.source.get("type"))
    if loader is None:
        raise ToolError(f"Task {task.name!r} has unknown source type {task.source.get('type')!r}.",
                        hint=f"Use one of: {', '.join(_LOADERS)}.")
    samples = loader(task)
    if len(samples) < 2:
        raise ToolError(f"Task {task.name!r} has {len(samples)} sample(s); a val/test split needs at least 2.",
                        hint="Add images or set 'tile' / 'grid' to cut large images into tiles.")
    with _CACHE_LOCK:
        _CACHE[key] = samples
    return samples


def _grid_bounds(n: int, parts: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, int(parts) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def tile_sample(sample: Sample, grid: tuple[int, int]) -> list[Sample]:
    """Cut a sample into a ``rows × cols`` grid of non-overlapping tiles (truth cut accordingly)."""
    if tuple(grid) == (1, 1):
        return [sample]
    h, w = sample.image.shape[:2]
    out = []
    for i, (r0, r1) in enumerate(_grid_bounds(h, grid[0])):
        for j, (c0, c1) in enumerate(_grid_bounds(w, grid[1])):
            img = np.ascontiguousarray(sample.image[r0:r1, c0:c1])
            t = sample.truth
            if t.ndim == 2 and t.shape[1] == 2 and t.shape[0] != h:  # points
                inside = (t[:, 0] >= r0) & (t[:, 0] < r1) & (t[:, 1] >= c0) & (t[:, 1] < c1)
                tt = t[inside] - np.array([r0, c0], float)
            else:
                tt = np.ascontiguousarray(t[r0:r1, c0:c1])
            out.append(Sample(f"{sample.id}@r{i}c{j}", img, tt))
    return out


def _grid_for(task: Task, shape: tuple[int, ...]) -> tuple[int, int]:
    src = task.source
    if src.get("grid"):
        return int(src["grid"][0]), int(src["grid"][1])
    if src.get("tile"):
        t = int(src["tile"])
        return max(1, round(shape[0] / t)), max(1, round(shape[1] / t))
    return 1, 1


def _read_image(path: Path) -> np.ndarray:
    from servers.common.imageio import read_image

    arr = read_image(path)
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.ndim not in (2, 3):
        raise ToolError(f"{path.name}: expected a 2-D or RGB image, got shape {arr.shape}.")
    return arr


def _load_synthetic_spots(task: Task) -> list[Sample]:
    from servers.common.synthetic import spot_image

    src = task.source
    size = int(src.get("size", 128))
    seed = int(src.get("seed", 0))
    out = []
    for i in range(int(src.get("n_images", 16))):
        rng = np.random.default_rng(seed * 1000 + i)
        s = spot_image((size, size), n=int(rng.integers(12, 36)), sigma=float(rng.uniform(1.2, 1.8)),
                       amplitude=(0.1, 0.8), background=0.1, noise=float(rng.uniform(0.05, 0.12)),
                       gradient=float(rng.uniform(0.5, 2.0)), seed=seed * 1000 + i)
        gain, offset = float(rng.uniform(300, 3000)), float(rng.uniform(50, 500))
        out.append(Sample(f"synthetic{i:03d}", (s.image * gain + offset).astype(np.float32), s.coords))
    return out


def _load_synthetic_nuclei(task: Task) -> list[Sample]:
    from servers.common.synthetic import nuclei_image

    src = task.source
    size = int(src.get("size", 128))
    seed = int(src.get("seed", 0))
    out = []
    for i in range(int(src.get("n_images", 8))):
        rng = np.random.default_rng(seed * 1000 + i)
        ni = nuclei_image((size, size), n=int(rng.integers(10, 22)), modality=task.modality,
                          noise=float(rng.uniform(0.2, 0.4)), min_gap=1.0, seed=seed * 1000 + i)
        img = ni.image
        if task.modality != "he":  # camera gain/offset and an uneven illumination ramp
            gain = float(rng.uniform(200, 2000))
            ramp = np.linspace(0.0, 0.8 * float(rng.uniform(0.5, 1.5)), size, dtype=np.float32)[None, :]
            img = (img * gain + float(rng.uniform(20, 200)) + ramp * gain).astype(np.float32)
        out.append(Sample(f"nuclei{i:03d}", img, ni.labels))
    return out


def _load_spot_file(task: Task) -> list[Sample]:
    from servers.common.annotations import read_spot_csv

    img_path = _data_file(task, task.source["image"])
    img = _read_image(img_path)
    coords = read_spot_csv(_data_file(task, task.source["truth"]))
    return tile_sample(Sample(img_path.stem, img, coords), _grid_for(task, img.shape))


def _load_label_file(task: Task) -> list[Sample]:
    from servers.common.annotations import read_label_image

    img_path = _data_file(task, task.source["image"])
    img = _read_image(img_path)
    labels = read_label_image(_data_file(task, task.source["truth"]))
    return tile_sample(Sample(img_path.stem, img, labels), _grid_for(task, img.shape))


def _load_fluo_nuclei(task: Task) -> list[Sample]:
    from servers.common.annotations import list_dsb2018_samples, read_dsb2018_image, read_dsb2018_labels

    out = _load_label_file(task)
    dsb = task.source.get("dsb")
    if dsb and _data_file(task, dsb).is_dir():
        for folder in list_dsb2018_samples(_data_file(task, dsb)):
            out.append(Sample(f"dsb-{folder.name[:12]}", read_dsb2018_image(folder, grayscale=True),
                              read_dsb2018_labels(folder)))
    return out


def _load_monuseg(task: Task) -> list[Sample]:
    from servers.common.annotations import imagescope_to_labels

    out = []
    for name in task.source["names"]:
        img = _read_image(_data_file(task, f"{task.source['folder']}/{name}.tif"))[..., :3]
        labels = imagescope_to_labels(_data_file(task, f"{task.source['folder']}/{name}.xml"), img.shape[:2])
        out.extend(tile_sample(Sample(name[:12], np.ascontiguousarray(img), labels), _grid_for(task, img.shape)))
    return out


def _load_folder(task: Task) -> list[Sample]:
    from servers.common.annotations import read_label_image, read_spot_csv

    root = Path(task.source["root"])
    files = sorted(p for p in root.glob(task.source["images"]) if p.is_file())
    if not files:
        raise ToolError(f"Task {task.name!r}: no images match {task.source['images']!r} in {root}.",
                        hint="Fix 'images' (a glob relative to the task folder) in the task file.")
    out = []
    for f in files:
        rel = task.source["truth"].format(stem=f.stem, name=f.name)
        tpath = _data_file(task, rel)
        if not tpath.exists():
            raise ToolError(f"Task {task.name!r}: ground truth {rel!r} for {f.name} is missing.",
                            hint="'truth' is a pattern relative to the task folder using {stem} or {name}.")
        img = _read_image(f)
        truth = read_spot_csv(tpath) if task.kind == "spots" else read_label_image(tpath)
        out.extend(tile_sample(Sample(f.stem, img, truth), _grid_for(task, img.shape)))
    return out


_LOADERS = {
    "synthetic_spots": _load_synthetic_spots,
    "synthetic_nuclei": _load_synthetic_nuclei,
    "spot_file": _load_spot_file,
    "label_file": _load_label_file,
    "fluo_nuclei": _load_fluo_nuclei,
    "monuseg": _load_monuseg,
    "folder": _load_folder,
}

# -- built-in tasks ---------------------------------------------------------------------------
_SPOT_DATA = ("Single-channel fluorescence microscopy images (smFISH-like): diffraction-limited bright spots "
              "(radius about 2 px) on cells with uneven background, camera noise and arbitrary intensity "
              "scale. Images arrive as 2-D arrays (H, W) in raw intensity units.")
_SPOT_TASK = ("Spot detection. The fixed downstream detector computes the scale-normalised Laplacian-of-"
              "Gaussian response (sigma 1.5 px) of YOUR output and keeps local maxima above a FIXED absolute "
              "threshold of 0.1, so the output's intensity scale matters (a spot of height ~1 on a flat "
              "background passes easily). Score: F1 of detections matched one-to-one to annotated spots "
              "within {r} px (higher is better, 1.0 is perfect).")
_NUC_TASK = ("Nucleus instance segmentation. The fixed downstream tool is {tool}. Score: average precision at "
             "IoU 0.5, AP = TP / (TP + FP + FN) per image (Cellpose definition), averaged over images.")
_SPOT_DS = {"tool": "log_spots", "settings": {"sigma": 1.5, "threshold": 0.1, "min_distance": 2}}

BUILTIN_TASKS: dict[str, Task] = {t.name: t for t in [
    Task("spots_synthetic", "spots", _SPOT_DATA + "\n\n" + _SPOT_TASK.format(r=3),
         {"type": "synthetic_spots", "n_images": 16, "size": 128, "seed": 0},
         {**_SPOT_DS, "match_radius_px": 3.0}, expert="minmax", tags=["synthetic"]),
    Task("smfish", "spots", _SPOT_DATA + " One 700x450 field cut into 24 tiles of about 117x112 px.\n\n"
         + _SPOT_TASK.format(r=4) + " (The published annotations sit a constant ~1.85 px down-right of the "
         "spot centres, hence the 4 px radius.)",
         {"type": "spot_file", "image": "spots/smfish.png", "truth": "spots/smfish.csv", "grid": [4, 6]},
         {**_SPOT_DS, "match_radius_px": 4.0}, expert="minmax", tags=["real"]),
    Task("nuclei_synthetic", "nuclei",
         "Single-channel fluorescence images of nuclei (bright blobs, radius 6-10 px, some nearly touching) "
         "with strong noise, uneven illumination and an arbitrary intensity scale, (H, W) float arrays.\n\n" + _NUC_TASK.format(tool="the classical segmenter "
                                                                            "(threshold + watershed)"),
         {"type": "synthetic_nuclei", "n_images": 8, "size": 128, "seed": 0},
         {"tool": "segmenter", "settings": {"backend": "classical", "modality": "fluorescence"}},
         expert="normalize99", tags=["synthetic"]),
    Task("fluo_nuclei", "nuclei",
         "Fluorescence nuclei (StarDist example split into 4 tiles, uint16; 12 DSB2018 images, uint8 grey), "
         "(H, W) arrays of various sizes.\n\n" + _NUC_TASK.format(tool="the classical segmenter"),
         {"type": "fluo_nuclei", "image": "fluo_nuclei/stardist_img2d.tif",
          "truth": "fluo_nuclei/stardist_img2d.mask.tif", "grid": [2, 2], "dsb": "fluo_nuclei/dsb2018"},
         {"tool": "segmenter", "settings": {"backend": "classical", "modality": "fluorescence"}},
         expert="normalize99", tags=["real"]),
    Task("fluo_nuclei_unet", "nuclei",
         "Fluorescence nuclei as in 'fluo_nuclei'.\n\n" + _NUC_TASK.format(
             tool="the bioimage.io 2D U-Net (unet2d_nuclei_broad) with seeded watershed"),
         {"type": "fluo_nuclei", "image": "fluo_nuclei/stardist_img2d.tif",
          "truth": "fluo_nuclei/stardist_img2d.mask.tif", "grid": [2, 2], "dsb": "fluo_nuclei/dsb2018"},
         {"tool": "segmenter", "settings": {"backend": "unet", "modality": "fluorescence",
                                            "weights": "models/unet2d_nuclei_broad/weights.pt"}},
         expert="normalize99", tags=["real", "gpu-friendly"]),
    Task("he_nuclei", "nuclei",
         "H&E-stained histology (MoNuSeg, 40x, 0.2525 um/px), RGB uint8 (H, W, 3) tiles of 500x500 px. Keep 3 "
         "channels in RGB order; float outputs are read as [0, 1] (or [0, 255] if larger) and converted to "
         "uint8.\n\n" + _NUC_TASK.format(tool="the classical H&E segmenter (hematoxylin channel + watershed)"),
         {"type": "monuseg", "folder": "he_nuclei", "grid": [2, 2],
          "names": ["TCGA-2Z-A9J9-01A-01-TS1", "TCGA-AC-A2FO-01A-01-TS1", "TCGA-HT-8564-01Z-00-DX1"]},
         {"tool": "segmenter", "settings": {"backend": "classical", "modality": "he"}},
         expert="normalize99", mpp=0.2525, tags=["real"]),
]}


# -- folder tasks -----------------------------------------------------------------------------
TASK_FILES = ("task.toml", "task.yaml", "task.yml")


def load_task_file(path: str | os.PathLike) -> Task:
    """A task from a folder's ``task.toml`` / ``task.yaml`` (or the file itself).

    Keys: ``name``, ``kind`` ("spots" | "nuclei"), ``description``, ``images`` (glob in the folder),
    ``truth`` (pattern with ``{stem}``/``{name}``: spot CSV x,y or label image), optional ``expert``,
    ``mpp``, ``tile`` or ``grid``, ``[downstream]`` (``tool``, ``match_radius_px``, ``[downstream.settings]``),
    ``[split]`` (``seed``, ``val_fraction``).
    """
    p = Path(path)
    if p.is_dir():
        found = [p / n for n in TASK_FILES if (p / n).is_file()]
        if not found:
            raise ToolError(f"No task file in {p}.", hint=f"Add one of {', '.join(TASK_FILES)} (see docs/preprocess.md).")
        p = found[0]
    if not p.is_file():
        raise ToolError(f"Task file {p} does not exist.", hint="Pass a task folder or its task.toml.")
    try:
        if p.suffix == ".toml":
            import tomllib

            raw = tomllib.loads(p.read_text())
        else:
            import yaml

            raw = yaml.safe_load(p.read_text()) or {}
    except Exception as e:
        raise ToolError(f"Task file {p} could not be parsed: {e}.", hint="Fix its TOML/YAML syntax.") from e
    if not isinstance(raw, dict):
        raise ToolError(f"Task file {p} must hold a table of keys.", hint="See docs/preprocess.md for an example.")
    missing = [k for k in ("name", "kind", "images", "truth") if k not in raw]
    if missing:
        raise ToolError(f"Task file {p} lacks {', '.join(missing)}.",
                        hint="Required keys: name, kind, images, truth (see docs/preprocess.md).")
    kind = str(raw["kind"])
    ds = dict(raw.get("downstream") or {})
    if kind == "spots":
        ds.setdefault("tool", "log_spots")
        ds["settings"] = {**_SPOT_DS["settings"], **(ds.get("settings") or {})}
    else:
        ds.setdefault("tool", "segmenter")
        ds["settings"] = {"backend": "classical", "modality": "fluorescence", **(ds.get("settings") or {})}
    split = raw.get("split") or {}
    src: dict[str, Any] = {"type": "folder", "root": str(p.parent.resolve()), "images": str(raw["images"]),
                           "truth": str(raw["truth"])}
    if raw.get("tile"):
        src["tile"] = int(raw["tile"])
    if raw.get("grid"):
        src["grid"] = [int(v) for v in raw["grid"]]
    default_desc = (_SPOT_DATA + "\n\n" + _SPOT_TASK.format(r=ds.get("match_radius_px", 3))) if kind == "spots" \
        else _NUC_TASK.format(tool=f"the {ds['settings']['backend']} segmenter")
    return Task(name=str(raw["name"]), kind=kind, description=str(raw.get("description") or default_desc),
                source=src, downstream=ds, expert=str(raw.get("expert", "percentile" if kind == "spots"
                                                                   else "normalize99")),
                split_seed=int(split.get("seed", 0)), val_fraction=float(split.get("val_fraction", 0.5)),
                mpp=float(raw["mpp"]) if raw.get("mpp") else None, origin=str(p), tags=["folder"])


def _registry_file() -> Path:
    from servers.common.config import get_config

    return Path(get_config().workspace) / "preprocess" / "task_folders.json"


def register_task_folder(rel: str) -> Task:
    """Load a task folder (path relative to the data root) and remember it in the workspace."""
    from servers.common.atomic import atomic_write_text
    from servers.common.paths import resolve_data_path

    folder = resolve_data_path(rel)
    task = load_task_file(folder)
    if task.name in BUILTIN_TASKS:
        raise ToolError(f"Task name {task.name!r} is taken by a built-in task.", hint="Rename it in the task file.")
    reg = _registry_file()
    known = json.loads(reg.read_text()) if reg.is_file() else []
    if rel not in known:
        known.append(rel)
        reg.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(reg, json.dumps(known, indent=1))
    return task


def _folder_tasks() -> dict[str, Task]:
    folders: list[Path] = []
    root = _data_root()
    base = root / "preprocess_tasks"
    if base.is_dir():
        folders += [d for d in sorted(base.iterdir()) if d.is_dir() and any((d / n).is_file() for n in TASK_FILES)]
    reg = _registry_file()
    if reg.is_file():
        try:
            folders += [root / r for r in json.loads(reg.read_text())]
        except (json.JSONDecodeError, TypeError):
            pass
    for d in os.environ.get("CYTOAGENT_PREPROCESS_TASKS", "").split(os.pathsep):
        if d.strip():
            folders.append(Path(d.strip()))
    out: dict[str, Task] = {}
    for f in folders:
        try:
            t = load_task_file(f)
        except ToolError:
            continue  # a broken folder must not hide the others; describe it via load_task_file
        out.setdefault(t.name, t)
    return out


def all_tasks() -> dict[str, Task]:
    """Built-in tasks plus folder tasks (built-ins win on name clashes)."""
    return {**_folder_tasks(), **BUILTIN_TASKS}


def get_task(name: str) -> Task:
    tasks = all_tasks()
    if name not in tasks:
        raise ToolError(f"Unknown task {name!r}.", hint=f"Use one of: {', '.join(sorted(tasks))} (see list_tasks).")
    return tasks[name]
