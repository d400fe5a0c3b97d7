"""Readers for ground-truth annotations of the public datasets we score against.

* Aperio ImageScope XML (MoNuSeg): one ``Region`` per nucleus with ``Vertex X=col Y=row`` →
  :func:`read_imagescope_polygons` / :func:`imagescope_to_labels` (int32 label image).
* Data Science Bowl 2018 sample folder (``<id>/images/<id>.png``, ``<id>/masks/*.png`` one binary
  mask per nucleus) → :func:`read_dsb2018_labels`, :func:`read_dsb2018_image`.
* Label images stored as TIFF/PNG/NPY → :func:`read_label_image`.
* smFISH spot CSV without header, columns ``x`` (col), ``y`` (row) in pixels →
  :func:`read_spot_csv` returning ``(N, 2)`` ``(row, col)`` like the rest of the code base.

All functions take a local path (servers resolve user paths with ``servers.common.paths`` first)
and raise :class:`ToolError` naming the file and what was expected when it is unusable.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from servers.common.errors import ToolError


def _existing(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ToolError(f"{what} not found: {p}.", hint="Pass the path of an existing file or folder.")
    return p


# --------------------------------------------------------------------------- ImageScope XML


def read_imagescope_polygons(path: str | Path) -> list[np.ndarray]:
    """Every ``Region`` of an Aperio ImageScope XML file as an ``(N, 2)`` array of (row, col) pixels.

    Regions with fewer than 3 vertices are skipped (they enclose no area).
    """
    p = _existing(path, "ImageScope XML file")
    try:
        root = ET.parse(p).getroot()
    except ET.ParseError as e:
        raise ToolError(f"{p.name} is not valid XML: {e}.",
                        hint="Pass an Aperio ImageScope .xml annotation file.") from e
    polys = []
    for region in root.iter("Region"):
        verts = region.find("Vertices")
        if verts is None:
            continue
        xy = [(float(v.get("X")), float(v.get("Y"))) for v in verts.iter("Vertex")]
        if len(xy) >= 3:
            arr = np.asarray(xy, dtype=float)
            polys.append(arr[:, ::-1].copy())  # (x, y) -> (row, col)
    if not polys and root.tag != "Annotations":
        raise ToolError(f"{p.name} has no <Annotations>/<Region> polygons.",
                        hint="Pass an Aperio ImageScope .xml annotation file (MoNuSeg format).")
    return polys


def polygons_to_labels(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Rasterise (row, col) polygons into an int32 label image; polygon i gets label i+1.

    Where polygons overlap the later one wins (as ImageScope draws them); polygons fully covered by
    later ones or lying outside the image vanish, so the result may hold fewer labels than polygons.
    """
    from skimage.draw import polygon as draw_polygon

    if len(shape) < 2:
        raise ToolError(f"Label image shape {shape} is not 2-D.", hint="Pass (height, width).")
    h, w = int(shape[0]), int(shape[1])
    labels = np.zeros((h, w), dtype=np.int32)
    for i, poly in enumerate(polygons, start=1):
        rr, cc = draw_polygon(poly[:, 0], poly[:, 1], shape=(h, w))
        labels[rr, cc] = i
    return labels


def imagescope_to_labels(path: str | Path, shape: tuple[int, ...]) -> np.ndarray:
    """Read an ImageScope XML file and rasterise it to an int32 (H, W) label image.

    Labels are consecutive (1..N) over the nuclei that cover at least one pixel.
    """
    from skimage.segmentation import relabel_sequential

    labels = polygons_to_labels(read_imagescope_polygons(path), tuple(shape[:2]))
    return relabel_sequential(labels)[0].astype(np.int32)


# --------------------------------------------------------------------------- DSB2018


def _dsb_folder(folder: str | Path) -> Path:
    f = _existing(folder, "DSB2018 sample folder")
    if not (f / "masks").is_dir() and not (f / "images").is_dir():
        raise ToolError(f"{f} has neither masks/ nor images/.",
                        hint="Pass a DSB2018 sample folder <id>/ holding images/<id>.png and masks/*.png.")
    return f


def read_dsb2018_labels(folder: str | Path) -> np.ndarray:
    """One int32 label image from the per-nucleus binary masks in ``<folder>/masks/*.png``.

    Masks are read in sorted file-name order; mask i becomes label i+1 (overlaps: later wins).
    """
    from skimage.io import imread

    f = _dsb_folder(folder)
    files = sorted((f / "masks").glob("*.png"))
    if not files:
        raise ToolError(f"No mask PNGs in {f / 'masks'}.", hint="Each nucleus needs one masks/<x>.png.")
    labels = None
    for i, mf in enumerate(files, start=1):
        m = imread(mf)
        if m.ndim == 3:
            m = m[..., 0]
        if labels is None:
            labels = np.zeros(m.shape, dtype=np.int32)
        elif m.shape != labels.shape:
            raise ToolError(f"Mask {mf.name} has shape {m.shape}, others {labels.shape}.",
                            hint="All masks of one sample must have the image's size.")
        labels[m > 0] = i
    return labels


def read_dsb2018_image(folder: str | Path, *, grayscale: bool = True) -> np.ndarray:
    """The sample's image ``<folder>/images/*.png``: (H, W) mean of RGB when ``grayscale`` (uint8),
    else (H, W, 3) RGB (alpha dropped)."""
    from skimage.io import imread

    f = _dsb_folder(folder)
    files = sorted((f / "images").glob("*.png"))
    if not files:
        raise ToolError(f"No image PNG in {f / 'images'}.", hint="Expected images/<id>.png.")
    img = imread(files[0])
    if img.ndim == 3:
        img = img[..., :3]
        if grayscale:
            img = img.astype(np.float32).mean(axis=2).round().astype(np.uint8)
    return img


def list_dsb2018_samples(root: str | Path) -> list[Path]:
    """Sample folders under a DSB2018 root (those with a ``masks/`` subfolder), sorted by name."""
    r = _existing(root, "DSB2018 folder")
    return sorted(d for d in r.iterdir() if (d / "masks").is_dir())


# --------------------------------------------------------------------------- generic label images


def read_label_image(path: str | Path) -> np.ndarray:
    """An instance label image from .tif/.tiff/.png/.npy as int32 (H, W)."""
    p = _existing(path, "Label image")
    suffix = p.suffix.lower()
    if suffix in (".tif", ".tiff"):
        import tifffile

        arr = tifffile.imread(p)
    elif suffix == ".npy":
        arr = np.load(p, allow_pickle=False)
    elif suffix == ".png":
        from skimage.io import imread

        arr = imread(p)
    else:
        raise ToolError(f"Unsupported label image format {suffix!r} ({p.name}).",
                        hint="Use .tif, .png or .npy.")
    arr = np.squeeze(arr)
    if arr.ndim != 2 or arr.dtype.kind not in "iub":
        raise ToolError(f"{p.name} is not a 2-D integer label image (shape {arr.shape}, dtype {arr.dtype}).",
                        hint="Pass an (H, W) image with 0 = background and 1..N = objects.")
    return arr.astype(np.int32)


# --------------------------------------------------------------------------- spots


def read_spot_csv(path: str | Path) -> np.ndarray:
    """Spot coordinates from a CSV of ``x,y`` pixel positions (x = column, y = row; header optional).

    Returns a float ``(N, 2)`` array of ``(row, col)``.
    """
    p = _existing(path, "Spot CSV")
    rows = []
    with open(p, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.strip()
            if not line:
                continue
            parts = [s.strip() for s in line.split(",")]
            try:
                x, y = float(parts[0]), float(parts[1])
            except (ValueError, IndexError):
                if lineno == 1:  # a header line
                    continue
                raise ToolError(f"{p.name} line {lineno} is not 'x,y' numbers: {line!r}.",
                                hint="Pass a CSV with two numeric columns: x (col), y (row) in pixels.") from None
            rows.append((y, x))
    return np.asarray(rows, dtype=float).reshape(-1, 2)
