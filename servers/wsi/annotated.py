"""Expert annotations as instance labels with the same per-object morphometry as segmented nuclei.

Reads (through :mod:`servers.common.annotations`):

* Aperio ImageScope XML (MoNuSeg): one ``Region`` polygon per object, rasterised at the size of the
  image it annotates (``image=``, or a sibling file with the same stem);
* a Data Science Bowl 2018 sample folder (``<id>/masks/*.png``, one binary mask per object; the
  image is ``<id>/images/<id>.png``);
* a label image (``.tif``/``.png``/``.npy``: 0 = background, 1..N = objects).

Morphometry is :func:`servers.wsi.nuclei.morphometry` (one implementation for segmented and annotated
objects). Physical units need ``mpp`` (argument, or the image's calibration); without it the table
keeps pixel units only (``area_px``, centroid, shape descriptors) and says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from servers.common.errors import ToolError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".svs")
LABEL_SUFFIXES = (".tif", ".tiff", ".png", ".npy")


@dataclass
class Annotated:
    labels: np.ndarray  # int32 (H, W), 1..n
    source: str  # "imagescope_xml" | "dsb2018_folder" | "label_image"
    n_annotations: int  # polygons / mask files / distinct labels in the file
    image: np.ndarray | None  # what the annotations outline (RGB, or one intensity channel), for intensities
    image_path: Path | None
    mpp: float | None
    modality: str | None
    table: Any  # DataFrame from nuclei.morphometry

    def summary(self) -> dict[str, Any]:
        from servers.wsi.nuclei import summarize

        h, w = self.labels.shape
        area_mm2 = h * w * (self.mpp / 1000) ** 2 if self.mpp else None
        out = summarize(self.table, area_mm2)
        n = out.pop("n_nuclei")
        out = {"source": self.source, "n_annotations": self.n_annotations, "n_objects": n, **out,
               "nuclear_area_fraction": round(float((self.labels > 0).mean()), 6), "shape_px": [h, w],
               "mpp": self.mpp, "image": self.image_path.name if self.image_path else None,
               "image_modality": self.modality}
        if not self.mpp:
            out["note"] = "No mpp (µm per pixel): sizes are in pixels only; pass mpp= for µm and densities per mm²."
        if n < self.n_annotations:
            out["note_overlaps"] = (f"{self.n_annotations - n} annotation(s) cover no pixel of their own "
                                    "(fully overlapped by later ones or outside the image).")
        return out


def _sibling_image(annotation: Path) -> Path | None:
    for suf in IMAGE_SUFFIXES:
        cand = annotation.with_suffix(suf)
        if cand != annotation and cand.is_file():
            return cand
    return None


def _read_image(path: Path, mpp: float | None, channel: int | None) -> tuple[np.ndarray, float | None, str]:
    """(pixels, mpp, modality) of the annotated image: RGB for H&E, one float channel for fluorescence."""
    from servers.wsi.nuclei import detect_modality
    from servers.wsi.slide import open_slide_path

    s = open_slide_path(path, mpp)
    w, h = s.dimensions
    modality = detect_modality(s)
    img = s.read_intensity_ds(0, 0, w, h, 1.0, channel) if modality == "fluorescence" else s.read_region(0, 0, w, h)
    return img, s.mpp, modality


def load_annotations(annotation: Path, *, image: Path | None = None, mpp: float | None = None,
                     channel: int | None = None) -> Annotated:
    """Read expert annotations (see the module docstring) into labels + morphometry table.

    Args:
        annotation: ImageScope ``.xml``, DSB2018 sample folder, or label image (absolute, confined path).
        image: The annotated image (default: a sibling with the same stem; DSB: ``images/*.png``).
        mpp: µm per pixel (default: the image's calibration, if any).
        channel: Channel of a multi-channel fluorescence image for mean intensities.
    """
    from servers.common import annotations as A
    from servers.wsi.nuclei import morphometry

    annotation = Path(annotation)
    if mpp is not None and not (np.isfinite(mpp) and mpp > 0):
        raise ToolError(f"mpp must be a positive number of µm per pixel, got {mpp!r}.", hint="E.g. 0.2525 for MoNuSeg.")
    if not annotation.exists():
        raise ToolError(f"Annotation not found: {annotation.name}.",
                        hint="Pass an ImageScope .xml file, a DSB2018 sample folder or a label image under the data root.")
    if annotation.is_dir():
        if not (annotation / "masks").is_dir():
            raise ToolError(f"{annotation.name}/ is not a DSB2018 sample folder (no masks/ subfolder).",
                            hint="Pass <dsb root>/<sample id> holding masks/*.png and images/<id>.png.")
        source = "dsb2018_folder"
        labels = A.read_dsb2018_labels(annotation)
        n_ann = len(list((annotation / "masks").glob("*.png")))
        if image is None:
            imgs = sorted((annotation / "images").glob("*.png"))
            image = imgs[0] if imgs else None
    elif annotation.suffix.lower() == ".xml":
        source = "imagescope_xml"
        polys = A.read_imagescope_polygons(annotation)
        n_ann = len(polys)
        image = image or _sibling_image(annotation)
        if image is None:
            raise ToolError(f"No image found next to {annotation.name} to give the label image its size.",
                            hint="Pass image= (the annotated image, relative to the data root).")
        labels = None
    elif annotation.suffix.lower() in LABEL_SUFFIXES:
        source = "label_image"
        labels = A.read_label_image(annotation)
        if labels.min() < 0:
            raise ToolError(f"{annotation.name} has negative labels.", hint="Pass 0 = background, 1..N = objects.")
        if labels.size and labels.min() > 0:
            raise ToolError(f"{annotation.name} has no background (no pixel is 0): it looks like an intensity "
                            "image, not an instance label image.",
                            hint="Pass a label image with 0 = background and 1..N = objects (e.g. *.mask.tif), "
                            "an ImageScope .xml, or a DSB2018 sample folder.")
        n_ann = int(np.count_nonzero(np.bincount(labels.ravel())[1:]))
    else:
        raise ToolError(f"Unsupported annotation file {annotation.name}.",
                        hint="Pass an Aperio ImageScope .xml, a DSB2018 sample folder, or a .tif/.png/.npy label image.")
    img, img_mpp, modality = (None, None, None)
    if image is not None:
        img, img_mpp, modality = _read_image(Path(image), mpp, channel)
    if labels is None:  # ImageScope: rasterise at the image's size
        from skimage.segmentation import relabel_sequential

        labels = relabel_sequential(A.polygons_to_labels(polys, img.shape[:2]))[0].astype(np.int32)
    if img is not None and img.shape[:2] != labels.shape:
        raise ToolError(f"The image {Path(image).name} is {img.shape[1]}x{img.shape[0]} px but the annotation "
                        f"{annotation.name} is {labels.shape[1]}x{labels.shape[0]} px.",
                        hint="Pass the image these annotations were drawn on.")
    use_mpp = mpp if mpp is not None else img_mpp
    table = morphometry(labels, img, use_mpp or 1.0)
    if not use_mpp:  # never report pixels as µm
        table = table.drop(columns=[c for c in table.columns if c.endswith(("_um", "_um2"))])
    return Annotated(labels, source, n_ann, img, Path(image) if image is not None else None, use_mpp, modality, table)
