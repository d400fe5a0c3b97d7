"""Open whole-slide images (anything OpenSlide reads) and plain images as single-level slides.

Coordinates are always **level-0 pixels** (x = column, y = row), like OpenSlide. Resolution is
given as ``mpp`` (µm per pixel at level 0); a slide without mpp metadata has ``mpp=None`` and
every function that needs physical units raises a ToolError asking for ``mpp=`` instead of
guessing.

    s = open_slide("slides/a.svs")                 # path relative to the data root, or absolute Path
    s.info()                                       # levels, downsamples, mpp, objective, vendor, ...
    rgb = s.read_region_mpp(x, y, 512, 512, mpp=0.5)   # 512x512 px at 0.5 µm/px from (x, y)
    thumb, ds = s.thumbnail(1024)                  # RGB thumbnail and its downsample vs level 0
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from servers.common.errors import ToolError

PLAIN_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
                  ".dcm", ".czi", ".qptiff"}


def _max_pixels() -> int:
    from servers.common.config import get_config

    return int(get_config().limits.max_image_pixels)


def check_region_size(width: int, height: int, what: str = "region") -> None:
    """Refuse reads larger than ``limits.max_image_pixels`` with a message on how to tile."""
    limit = _max_pixels()
    if width <= 0 or height <= 0:
        raise ToolError(f"The {what} size must be positive, got {width}x{height} px.",
                        hint="Pass width and height >= 1.")
    if width * height > limit:
        side = int(math.sqrt(limit))
        raise ToolError(
            f"The requested {what} is {width}x{height} = {width * height:,} px, over the limit of "
            f"{limit:,} px per read.",
            hint=f"Read it in tiles (e.g. tile_slide with tile_px <= {min(side, 4096)}), request a coarser mpp, "
                 "or use the whole-slide tools (tissue_segment, segment_nuclei_slide) that tile internally.",
        )


@dataclass
class Slide:
    """A whole-slide image or a plain image presented as a one-level slide."""

    path: Path
    backend: str  # "openslide" | "image"
    level_dimensions: list[tuple[int, int]]  # (width, height) per level
    level_downsamples: list[float]
    mpp: float | None
    mpp_source: str  # "metadata" | "argument" | "none"
    objective_power: float | None = None
    vendor: str | None = None
    properties: dict[str, str] | None = None
    associated_images: list[str] | None = None
    _osr: Any = None  # openslide.OpenSlide
    _array: np.ndarray | None = None  # plain images: the RGB array
    _raw: np.ndarray | None = None  # plain images that are not 8-bit RGB: original values, (H, W) or (H, W, C)

    # -- metadata ------------------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    def require_mpp(self) -> float:
        """The level-0 µm/px, or a ToolError that asks for it."""
        if self.mpp is None:
            raise ToolError(
                f"Slide {self.path.name} has no resolution (µm per pixel) in its metadata.",
                hint="Pass mpp=<µm per level-0 pixel> (e.g. 0.25 for 40x, 0.5 for 20x scans).",
            )
        return self.mpp

    def level_mpp(self, level: int) -> float | None:
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    def info(self) -> dict[str, Any]:
        """Dimensions per level, downsamples, mpp, objective power, vendor, associated images."""
        levels = [
            {"level": i, "width": w, "height": h, "downsample": round(float(d), 4),
             "mpp": None if self.mpp is None else round(self.mpp * float(d), 5)}
            for i, ((w, h), d) in enumerate(zip(self.level_dimensions, self.level_downsamples))
        ]
        w, h = self.dimensions
        out: dict[str, Any] = {
            "file": self.path.name,
            "backend": self.backend,
            "width": w,
            "height": h,
            "level_count": self.level_count,
            "levels": levels,
            "mpp": self.mpp,
            "mpp_source": self.mpp_source,
            "dtype": self.raw_dtype,
            "channels": self.n_channels,
            "objective_power": self.objective_power,
            "vendor": self.vendor,
            "associated_images": self.associated_images or [],
        }
        if self.mpp is not None:
            out["width_mm"] = round(w * self.mpp / 1000, 4)
            out["height_mm"] = round(h * self.mpp / 1000, 4)
        else:
            out["note"] = "No mpp in the metadata: pass mpp= to tools that need physical units."
        return out

    # -- pixels --------------------------------------------------------------------------------
    def read_region(self, x: int, y: int, width: int, height: int, level: int = 0) -> np.ndarray:
        """RGB uint8 (height, width, 3) from level ``level``; (x, y) in level-0 pixels. Parts
        outside the slide are white."""
        if not 0 <= level < self.level_count:
            raise ToolError(f"Level {level} does not exist; this slide has levels 0..{self.level_count - 1}.",
                            hint="Call slide_info to see the levels.")
        check_region_size(int(width), int(height))
        W, H = self.dimensions
        ds = self.level_downsamples[level]
        if x >= W or y >= H or x + width * ds <= 0 or y + height * ds <= 0:
            raise ToolError(
                f"Region at x={x}, y={y} (level-0 px) of {width}x{height} px at level {level} lies outside "
                f"the slide ({W}x{H} px at level 0).",
                hint="Pass x in [0, width) and y in [0, height) in level-0 pixel coordinates.",
            )
        if self.backend == "openslide":
            import openslide

            try:
                return _read_openslide(self._osr, int(x), int(y), int(level), int(width), int(height))
            except openslide.OpenSlideError as e:
                raise ToolError(f"Reading {self.path.name} failed: {e} (truncated or corrupt file?).",
                                hint="Re-export or re-download the slide.") from None
        arr = self._array
        out = np.full((int(height), int(width), 3), 255, np.uint8)
        y0, x0 = max(0, int(y)), max(0, int(x))
        y1, x1 = min(H, int(y) + int(height)), min(W, int(x) + int(width))
        out[y0 - int(y): y1 - int(y), x0 - int(x): x1 - int(x)] = arr[y0:y1, x0:x1]
        return out

    @property
    def n_channels(self) -> int:
        """Channels of the stored pixel values: 1 for grey images, C for multi-channel TIFFs, 3 for RGB."""
        if self._raw is not None:
            return 1 if self._raw.ndim == 2 else int(self._raw.shape[2])
        return 3

    @property
    def raw_dtype(self) -> str:
        return str(self._raw.dtype) if self._raw is not None else "uint8"

    def read_intensity_ds(self, x: int, y: int, width: int, height: int, downsample: float = 1.0,
                          channel: int | None = None) -> np.ndarray:
        """One intensity channel as float32 (height, width) in the file's own units (e.g. uint16
        counts), for fluorescence analysis. ``channel`` picks a channel (0-based); None averages the
        channels (grey images have one). Plain images use their original values (not the 8-bit
        display copy); whole-slide files use the RGB pixels. Outside the image reads as 0 (dark)."""
        n = self.n_channels
        if channel is not None and not 0 <= int(channel) < n:
            raise ToolError(f"channel={channel} does not exist; {self.path.name} has {n} channel(s).",
                            hint=f"Pass channel in 0..{n - 1}, or leave it out to average the channels.")
        if self._raw is None:
            rgb = self.read_region_ds(x, y, width, height, downsample).astype(np.float32)
            return rgb[..., int(channel)] if channel is not None else rgb.mean(axis=2)
        if downsample <= 0:
            raise ToolError(f"downsample must be > 0, got {downsample}.")
        check_region_size(int(width), int(height))
        W, H = self.dimensions
        rw, rh = int(math.ceil(width * downsample)), int(math.ceil(height * downsample))
        check_region_size(rw, rh, what="read behind this region")
        raw = self._raw if self._raw.ndim == 2 else (
            self._raw[..., int(channel)] if channel is not None else self._raw.astype(np.float32).mean(axis=2))
        out = np.zeros((rh, rw), np.float32)
        y0, x0 = max(0, int(y)), max(0, int(x))
        y1, x1 = min(H, int(y) + rh), min(W, int(x) + rw)
        if y1 <= y0 or x1 <= x0:
            raise ToolError(f"Region at x={x}, y={y} lies outside the image ({W}x{H} px).",
                            hint="Pass x in [0, width) and y in [0, height) in level-0 pixel coordinates.")
        out[y0 - int(y): y1 - int(y), x0 - int(x): x1 - int(x)] = raw[y0:y1, x0:x1]
        return resize(out, int(width), int(height))

    def read_intensity_mpp(self, x: int, y: int, width: int, height: int, mpp: float,
                           channel: int | None = None) -> np.ndarray:
        """:meth:`read_intensity_ds` at ``mpp`` µm/px."""
        base = self.require_mpp()
        if not (mpp and mpp > 0) or mpp < base * 0.999:
            raise ToolError(f"mpp must be >= the scan's {base} µm/px, got {mpp!r}.", hint=f"Pass mpp >= {base}.")
        return self.read_intensity_ds(x, y, width, height, mpp / base, channel)

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample is <= ``downsample`` (so we never upsample)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.001:
                best = i
        return best

    def read_region_ds(self, x: int, y: int, width: int, height: int, downsample: float) -> np.ndarray:
        """``width x height`` output pixels at ``downsample`` (vs level 0) starting at level-0 (x, y):
        reads the best pyramid level and resizes (area interpolation) only when needed."""
        if downsample <= 0:
            raise ToolError(f"downsample must be > 0, got {downsample}.")
        check_region_size(int(width), int(height))
        level = self.best_level(downsample)
        ld = self.level_downsamples[level]
        factor = downsample / ld
        if abs(factor - 1.0) < 1e-3:
            return self.read_region(x, y, width, height, level)
        rw, rh = int(math.ceil(width * factor)), int(math.ceil(height * factor))
        check_region_size(rw, rh, what=f"level-{level} read behind this region")
        raw = self.read_region(x, y, rw, rh, level)
        return resize(raw, width, height)

    def read_region_mpp(self, x: int, y: int, width: int, height: int, mpp: float) -> np.ndarray:
        """``width x height`` pixels at ``mpp`` µm/px starting at level-0 (x, y)."""
        base = self.require_mpp()
        if not (mpp and mpp > 0):
            raise ToolError(f"mpp must be a positive number of µm per pixel, got {mpp!r}.")
        if mpp < base * 0.999:
            raise ToolError(f"Requested {mpp} µm/px is finer than the scan ({base} µm/px at level 0).",
                            hint=f"Pass mpp >= {base}.")
        return self.read_region_ds(x, y, width, height, mpp / base)

    def downsample_for_magnification(self, magnification: float) -> float:
        """Downsample vs level 0 that gives ``magnification`` (e.g. 10 for 10x) from the scan's
        objective power (``openslide.objective-power``)."""
        if not (magnification and magnification > 0):
            raise ToolError(f"magnification must be > 0, got {magnification!r}.", hint="E.g. 20, 10, 5.")
        if not self.objective_power:
            raise ToolError(f"Slide {self.path.name} has no objective power in its metadata.",
                            hint="Ask for a resolution with mpp= instead (µm per pixel; 0.5 ≈ 20x, 0.25 ≈ 40x).")
        ds = self.objective_power / magnification
        if ds < 0.999:
            raise ToolError(f"{magnification}x is above the scan's {self.objective_power:g}x.",
                            hint=f"Pass magnification <= {self.objective_power:g}.")
        return ds

    def overview(self, width: int, height: int, downsample: float, *, embedded: bool = True) -> np.ndarray:
        """The whole slide as ``width x height`` RGB at ``downsample``. Uses the scanner's embedded
        ``thumbnail`` image when it is a faithful downscale of level 0 (same aspect within 1 %) and at
        least as fine as requested — decoding it takes milliseconds instead of decoding level tiles."""
        W, H = self.dimensions
        if embedded and self.backend == "openslide" and "thumbnail" in (self.associated_images or []):
            tw, th = self._osr.associated_images["thumbnail"].size
            fx, fy = W / tw, H / th
            if abs(fx - fy) / fx < 0.01 and fx <= downsample * 1.001 and tw >= 64:
                return resize(self.associated_image("thumbnail"), width, height)
        return self.read_region_ds(0, 0, width, height, downsample)

    def thumbnail(self, max_side: int = 1024) -> tuple[np.ndarray, float]:
        """An RGB thumbnail whose longer side is ``max_side``; returns (image, downsample vs level 0)."""
        W, H = self.dimensions
        ds = max(1.0, max(W, H) / max_side)
        w, h = max(1, int(round(W / ds))), max(1, int(round(H / ds)))
        return self.overview(w, h, ds), ds

    def associated_image(self, name: str) -> np.ndarray:
        if self.backend != "openslide" or name not in (self.associated_images or []):
            raise ToolError(f"No associated image {name!r}.",
                            hint=f"Available: {', '.join(self.associated_images or []) or 'none'}.")
        return _rgba_to_rgb(self._osr.associated_images[name])

    def close(self) -> None:
        if self._osr is not None:
            self._osr.close()


def resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area-interpolated resize (OpenCV) to exactly ``width x height``."""
    import cv2

    if rgb.shape[1] == width and rgb.shape[0] == height:
        return rgb
    interp = cv2.INTER_AREA if width <= rgb.shape[1] else cv2.INTER_LINEAR
    return cv2.resize(rgb, (int(width), int(height)), interpolation=interp)


def _read_openslide(osr, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
    """OpenSlide pixels straight into a numpy buffer (no PIL image, no ARGB→RGBA pass): about one
    copy less than ``OpenSlide.read_region``. Falls back to the public API if the low-level call is
    not available in this openslide-python version."""
    from openslide import lowlevel

    handle = getattr(osr, "_osr", None)
    fn = getattr(lowlevel, "_read_region", None)
    if handle is None or fn is None or np.little_endian is False:
        return _rgba_to_rgb(osr.read_region((x, y), level, (w, h)))
    buf = np.empty((h, w), np.uint32)
    fn(handle, buf.ctypes.data_as(lowlevel.POINTER(lowlevel.c_uint32)), x, y, level, w, h)
    bgra = buf.view(np.uint8).reshape(h, w, 4)  # premultiplied ARGB words, little-endian: B, G, R, A
    import cv2

    rgb = cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGB)
    if buf.min() < 0xFF000000:  # some pixel is not fully opaque
        alpha = bgra[..., 3]
        a = alpha.astype(np.float32)
        partial = (alpha > 0) & (alpha < 255)
        if partial.any():
            rgb[partial] = np.clip(rgb[partial] * (255.0 / a[partial, None]), 0, 255).astype(np.uint8)
        rgb[alpha == 0] = 255
    return rgb


def _rgba_to_rgb(pil_img) -> np.ndarray:
    """OpenSlide returns premultiplied RGBA with transparent = outside the scan: make that white."""
    arr = np.asarray(pil_img)
    rgb = arr[..., :3]
    alpha = arr[..., 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    out = rgb.copy()
    out[alpha == 0] = 255
    return out


def _float_prop(props: dict, key: str) -> float | None:
    try:
        v = float(props[key])
    except (KeyError, TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _open_openslide(path: Path, mpp: float | None) -> Slide:
    import openslide

    osr = openslide.OpenSlide(str(path))
    props = dict(osr.properties)
    meta_mpp = _float_prop(props, openslide.PROPERTY_NAME_MPP_X)
    if mpp is not None:
        use, src = float(mpp), "argument"
    elif meta_mpp is not None:
        use, src = meta_mpp, "metadata"
    else:
        use, src = None, "none"
    return Slide(
        path=path, backend="openslide",
        level_dimensions=[tuple(map(int, d)) for d in osr.level_dimensions],
        level_downsamples=[float(d) for d in osr.level_downsamples],
        mpp=use, mpp_source=src,
        objective_power=_float_prop(props, openslide.PROPERTY_NAME_OBJECTIVE_POWER),
        vendor=props.get(openslide.PROPERTY_NAME_VENDOR),
        properties=props, associated_images=sorted(osr.associated_images), _osr=osr,
    )


def tiff_mpp(path: Path) -> float | None:
    """µm per pixel from a TIFF's resolution tags (centimetre or inch units, or ImageJ 'micron'),
    or None when absent or implausible (the common 72 dpi default means no calibration)."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            tags = tf.pages[0].tags
            xres = tags.get("XResolution")
            unit = tags.get("ResolutionUnit")
            ij_unit = (tf.imagej_metadata or {}).get("unit")
            if xres is None:
                return None
            num, den = xres.value if isinstance(xres.value, tuple) else (xres.value, 1)
            px_per_unit = float(num) / float(den or 1)
            u = int(unit.value) if unit is not None else 1
    except Exception:  # noqa: BLE001 - unreadable tags simply mean "no calibration"
        return None
    if px_per_unit <= 0:
        return None
    if u == 3:
        mpp = 1e4 / px_per_unit
    elif u == 2:
        mpp = 25_400 / px_per_unit
    elif ij_unit in ("micron", "um", "µm"):
        mpp = 1.0 / px_per_unit
    else:
        return None
    return mpp if 0.01 <= mpp <= 50 else None


def _open_plain(path: Path, mpp: float | None) -> Slide:
    from servers.common.imageio import read_image

    limit = _max_pixels()
    meta_mpp = None
    try:
        arr = read_image(path, max_pixels=limit)
    except ToolError as e:
        raise ToolError(e.message.replace("as an image", "as a slide or an image"),
                        hint="Pass an OpenSlide format (SVS, NDPI, MRXS, tiled TIFF, ...) or a PNG/JPEG/TIFF image; "
                             "the file may be truncated or corrupt.") from None
    if path.suffix.lower() in (".tif", ".tiff"):
        meta_mpp = tiff_mpp(path)
    raw = None
    if arr.ndim == 2 or (arr.ndim == 3 and (arr.shape[2] != 3 or arr.dtype != np.uint8)):
        raw = np.ascontiguousarray(arr)  # grey / multi-channel / >8-bit: keep the measured values
        if arr.ndim == 3 and arr.shape[2] == 4 and arr.dtype == np.uint8:
            raw = None  # RGBA: an RGB image with alpha
        elif arr.ndim == 3 and arr.shape[2] != 3:
            arr = arr[..., :3] if arr.shape[2] > 3 else arr.astype(np.float32).mean(axis=2)
    if arr.ndim == 2:
        arr = np.repeat(to_uint8_display(arr)[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] < 3:
        raise ToolError(f"{path.name} is not an RGB or grey image (shape {arr.shape}).",
                        hint="Pass an RGB H&E image or a whole-slide file.")
    if arr.shape[0] * arr.shape[1] > limit:
        raise ToolError(f"{path.name} is {arr.shape[1]}x{arr.shape[0]} px, over the {limit:,} px limit for plain images.",
                        hint="Convert it to a tiled pyramidal TIFF (e.g. with vips tiffsave --tile --pyramid).")
    if arr.dtype != np.uint8:
        from servers.common.images import to_uint8

        arr = to_uint8(arr[..., :3])
    arr = np.ascontiguousarray(arr[..., :3])
    h, w = arr.shape[:2]
    if mpp is not None:
        use, src = float(mpp), "argument"
    elif meta_mpp is not None:
        use, src = float(meta_mpp), "metadata"
    else:
        use, src = None, "none"
    return Slide(path=path, backend="image", level_dimensions=[(w, h)], level_downsamples=[1.0],
                 mpp=use, mpp_source=src, _array=arr, _raw=raw)


def to_uint8_display(grey: np.ndarray) -> np.ndarray:
    """8-bit display copy of a one-channel image (uint8 unchanged; else a 1-99 % percentile stretch)."""
    if grey.dtype == np.uint8:
        return grey
    from servers.common.images import to_uint8

    return to_uint8(grey)


def open_slide_path(path: str | os.PathLike, mpp: float | None = None) -> Slide:
    """Open an absolute path (already confined by the caller)."""
    path = Path(path)
    if mpp is not None and not (isinstance(mpp, int | float) and math.isfinite(mpp) and mpp > 0):
        raise ToolError(f"mpp must be a positive number of µm per pixel, got {mpp!r}.",
                        hint="Pass e.g. 0.25 (40x) or 0.5 (20x).")
    if not path.is_file():
        raise ToolError(f"{path.name} is not a file.", hint="Pass the path of a slide or image file.")
    import openslide

    suffix = path.suffix.lower()
    if suffix in PLAIN_SUFFIXES - {".tif", ".tiff"}:
        return _open_plain(path, mpp)
    try:
        return _open_openslide(path, mpp)
    except openslide.OpenSlideUnsupportedFormatError:
        if suffix in PLAIN_SUFFIXES:
            return _open_plain(path, mpp)
        raise ToolError(f"{path.name} is not a slide format OpenSlide can read (and not a plain image), "
                        "or the file is truncated/corrupt.",
                        hint="Pass an SVS, NDPI, MRXS, SCN, tiled TIFF, ... or a PNG/JPEG/TIFF image.") from None
    except openslide.OpenSlideError as e:
        raise ToolError(f"{path.name} could not be read: {e} (truncated or corrupt file?).",
                        hint="Re-export or re-download the slide.") from None


_CACHE: OrderedDict[tuple, Slide] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 8


def open_slide(path: str | os.PathLike, mpp: float | None = None, *, cached: bool = True) -> Slide:
    """Open a slide. ``str`` paths are relative to the data root (confined); ``Path`` objects are
    used as given (library/test use). Open handles are cached (keyed by path, mtime and mpp)."""
    if isinstance(path, str):
        from servers.common.paths import resolve_data_path

        p = resolve_data_path(path)
    else:
        p = Path(path)
    if not cached:
        return open_slide_path(p, mpp)
    try:
        key = (str(p.resolve()), p.stat().st_mtime_ns, mpp)
    except OSError as e:
        raise ToolError(f"Cannot open {p.name}: {e}.") from None
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    s = open_slide_path(p, mpp)
    with _CACHE_LOCK:
        _CACHE[key] = s
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)  # the handle closes when garbage-collected
    return s


def list_slides(subdir: str = ".", pattern: str = "*", limit: int = 500) -> list[dict[str, Any]]:
    """Slide and image files under ``subdir`` of the data root, with sizes (no pixels are read)."""
    from servers.common.config import get_config
    from servers.common.paths import list_files

    root = get_config().data_root
    out = []
    for rel in list_files(root, subdir, pattern, limit=limit * 4):
        suf = Path(rel).suffix.lower()
        if suf not in SLIDE_SUFFIXES | PLAIN_SUFFIXES or rel.endswith(".npy"):
            continue
        out.append({"path": rel, "bytes": (Path(root) / rel).stat().st_size,
                    "kind": "image" if suf in PLAIN_SUFFIXES - {".tif", ".tiff"} else "slide"})
        if len(out) >= limit:
            break
    return out
