"""Whole-slide histopathology: slide metadata and regions, tissue, tiles, stain, nuclei, features, heatmaps, GeoJSON.

Thin MCP layer over the ``servers.wsi`` library. Slides are paths relative to the data root (any
OpenSlide format, or a PNG/JPEG/TIFF image with ``mpp=``); coordinates are level-0 pixels;
resolutions are µm per pixel (``mpp``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastmcp import Context
from fastmcp.tools import ToolResult
from pydantic import Field

from cytoagent.mcpkit import create_server, run_blocking, tool_result
from servers.common.errors import ToolError

mcp = create_server(
    "wsi",
    "Whole-slide image (histopathology) tools. Start with list_slides and slide_info (levels, mpp, "
    "objective). Coordinates are level-0 pixels (x = column, y = row); resolution is mpp (µm/px). "
    "Nucleus tools handle H&E and fluorescence (grey/uint16 TIFF/PNG) images; load_annotations reads expert "
    "annotations (ImageScope XML, DSB2018 masks, label images) with the same morphometry. "
    "Typical flow: tissue_segment → tile_slide → segment_nuclei / segment_nuclei_slide or tile_features "
    "→ cluster_tiles / tile_heatmap → export as GeoJSON (QuPath). Large results are saved as workspace "
    "artifacts (ids in the result). If a slide has no mpp in its metadata, pass mpp=.",
)

Mpp = Annotated[float | None, Field(description="µm per level-0 pixel; only needed when the slide's metadata lacks it", gt=0)]
Modality = Literal["auto", "he", "fluorescence"]


def _open(slide: str, mpp: float | None = None):
    from servers.wsi.slide import open_slide

    return open_slide(slide, mpp)


def _prov(tool: str, **args: Any) -> dict:
    return {"tool": f"wsi.{tool}", "args": args}


def _ws():
    from servers.common.workspace import get_workspace

    return get_workspace()


def _inline(df, n: int | None = None) -> list[dict]:
    from servers.common.config import get_config

    n = n or min(20, get_config().limits.max_table_rows_inline)
    return df.head(n).round(4).to_dict("records")


# -- slide access --------------------------------------------------------------------------------


@mcp.tool(annotations={"readOnlyHint": True})
def list_slides(folder: str = ".", pattern: str = "*", limit: int = 50) -> dict:
    """List slide and image files under a folder of the data root (recursive; no pixels are read).

    Whole-slide formats (SVS, NDPI, MRXS, tiled TIFF, ...) come first, then plain images
    (PNG/JPEG/...), each group in path order.

    Args:
        folder: Folder relative to the data root ('.' = the root).
        pattern: Glob pattern for file names, e.g. '*.svs'.
        limit: Maximum number of files returned (1-2000; default 50).

    Returns:
        n (files returned), n_found (files matching, counted up to 10,000), truncated (true when more
        matched than returned: narrow with folder= or pattern=), slides (path, bytes, kind).
    """
    from servers.wsi.slide import list_slides as _ls

    limit = max(1, min(limit, 2000))
    found = _ls(folder, pattern, limit=10_000)
    found.sort(key=lambda item: item["kind"] != "slide")  # stable: slides first, path order kept
    out = {"n": min(limit, len(found)), "n_found": len(found), "truncated": len(found) > limit,
           "slides": found[:limit]}
    if out["truncated"]:
        out["hint"] = "More files matched than returned: pass folder= or pattern= (e.g. '*.svs') to narrow."
    return out


@mcp.tool(annotations={"readOnlyHint": True})
def slide_info(slide: str, mpp: Mpp = None) -> dict:
    """Metadata of a slide: size per pyramid level, downsamples, mpp (µm/px) per level, objective
    power, vendor, associated images (label, macro, thumbnail). Use first on any slide.

    Args:
        slide: Path relative to the data root (SVS, NDPI, MRXS, tiled TIFF, ..., or PNG/JPEG/TIFF image).
        mpp: Override/supply µm per level-0 pixel (required for plain images if you need physical units).
    """
    return _open(slide, mpp).info()


@mcp.tool(annotations={"readOnlyHint": True})
def slide_thumbnail(slide: str, max_side: int = 1024, associated: str | None = None) -> ToolResult:
    """A thumbnail of the whole slide (PNG image), or one of its associated images ('label', 'macro').

    Args:
        slide: Path relative to the data root.
        max_side: Longer side of the thumbnail in pixels (64-2048).
        associated: Name of an associated image instead of the thumbnail.
    """
    from servers.common.images import png_bytes

    s = _open(slide)
    if associated:
        img = s.associated_image(associated)
        return tool_result({"associated": associated, "shape": list(img.shape)}, images=[png_bytes(img)])
    side = max(64, min(int(max_side), 2048))
    img, ds = s.thumbnail(side)
    return tool_result({"shape": list(img.shape), "downsample": round(ds, 4),
                        "mpp": None if s.mpp is None else round(s.mpp * ds, 4)}, images=[png_bytes(img)])


@mcp.tool(annotations={"readOnlyHint": False})
def read_region(slide: str, x: int, y: int, width: int, height: int, mpp: float | None = None,
                magnification: float | None = None, level: int | None = None, slide_mpp: Mpp = None,
                save: bool = True) -> ToolResult:
    """Read a rectangular region as RGB at a requested resolution and save it as an image artifact.

    The region starts at level-0 pixel (x, y) and is width x height pixels **at the output
    resolution**: give ``mpp`` (µm/px, e.g. 0.5 ≈ 20x, 0.25 ≈ 40x), a ``magnification`` (from the
    scan's objective power) or a pyramid ``level``; with none, level 0. Requests over the pixel limit
    are refused with advice to tile.

    Args:
        slide: Path relative to the data root.
        x: Left edge in level-0 pixels.
        y: Top edge in level-0 pixels.
        width: Output width in pixels.
        height: Output height in pixels.
        mpp: Output resolution in µm per pixel.
        magnification: Output magnification, e.g. 10 for 10x (needs the objective power in the metadata).
        level: Pyramid level to read instead of mpp.
        slide_mpp: µm per level-0 pixel if the slide's metadata lacks it.
        save: Save the region as an image artifact (tiff).
    """
    from servers.common.images import preview_png

    s = _open(slide, slide_mpp)
    if sum(v is not None for v in (mpp, magnification, level)) > 1:
        raise ToolError("Pass only one of mpp, magnification or level.")
    if mpp is not None:
        rgb = s.read_region_mpp(x, y, width, height, mpp)
        out_mpp = mpp
    elif magnification is not None:
        ds = s.downsample_for_magnification(magnification)
        rgb = s.read_region_ds(x, y, width, height, ds)
        out_mpp = None if s.mpp is None else s.mpp * ds
    else:
        lv = level or 0
        rgb = s.read_region(x, y, width, height, lv)
        out_mpp = s.level_mpp(lv)
    summary: dict[str, Any] = {"shape": list(rgb.shape), "mpp": out_mpp, "x": x, "y": y}
    if save:
        art = _ws().save_array(rgb, kind="image", name="region", fmt="tiff",
                               provenance=_prov("read_region", slide=slide, x=x, y=y, width=width, height=height,
                                                mpp=mpp, magnification=magnification, level=level),
                               meta={"slide": slide, "mpp": out_mpp, "origin_level0": [x, y]})
        summary["artifact"] = art.id
    return tool_result(summary, images=[preview_png(rgb)])


# -- tissue and tiles ----------------------------------------------------------------------------


@mcp.tool
async def tissue_segment(slide: str, ctx: Context, method: Literal["gray", "saturation", "od", "gray+saturation"] = "gray",
                         mpp: Mpp = None, close_um: float = 25.0, dilate_um: float = 0.0,
                         min_piece_um2: float | None = None, max_hole_um2: float = 75_000.0) -> ToolResult:
    """Segment tissue vs glass on a thumbnail: pieces, holes, area in mm², tissue fraction; saves the
    mask (npy, thumbnail scale) and the contours as QuPath GeoJSON (level-0 px).

    Args:
        slide: Path relative to the data root.
        method: 'gray' (Otsu on greyscale, default), 'saturation', 'od' (optical density) or 'gray+saturation'.
        mpp: µm per level-0 pixel if the slide's metadata lacks it (needed for mm²).
        close_um: Radius in µm of the morphological closing (dilate then erode) that joins tissue
            fragments across gaps up to ~2x this wide; area-neutral (outlines do not grow).
        dilate_um: Extra outward growth of every piece in µm (default 0 = report the detected area;
            25 reproduces histolab's TissueMask convention, which adds a rim and inflates areas).
        min_piece_um2: Pieces smaller than this (µm²) are dropped (default 75,000 or 1% of the slide).
        max_hole_um2: Holes smaller than this (µm²) are filled.
    """
    from servers.wsi.export import tissue_geojson
    from servers.wsi.tissue import overlay_png, segment_tissue

    s = _open(slide, mpp)
    res = await run_blocking(ctx, segment_tissue, s, method=method, close_um=close_um, dilate_um=dilate_um,
                             min_piece_um2=min_piece_um2, max_hole_um2=max_hole_um2)
    prov = _prov("tissue_segment", slide=slide, method=method, close_um=close_um, dilate_um=dilate_um)
    ws = _ws()
    m = ws.save_array(res.mask.astype("uint8"), kind="mask", name="tissue_mask", provenance=prov,
                      meta={"slide": slide, "downsample": res.downsample})
    g = ws.save_json(tissue_geojson(res.polygons, s.mpp), kind="geojson", name="tissue", provenance=prov)
    summary = res.summary()
    summary.update({"mask_artifact": m.id, "geojson_artifact": g.id})
    return tool_result(summary, images=[overlay_png(res)])


@mcp.tool
async def tile_slide(slide: str, ctx: Context, tile_px: int = 256, mpp: float | None = None,
                     downsample: float | None = None, overlap_px: int = 0, min_tissue_fraction: float = 0.5,
                     slide_mpp: Mpp = None, export_tiles: bool = False, max_export: int = 2000) -> ToolResult:
    """Tile grid over the tissue at a target resolution: one row per tile with level-0 x/y, footprint,
    tissue fraction (and x_um/y_um). Saves the table (parquet) and tiles GeoJSON; optionally writes the
    tile images (PNG) into a workspace folder.

    Args:
        slide: Path relative to the data root.
        tile_px: Tile side in output pixels.
        mpp: Output µm per pixel (e.g. 0.5); or use downsample.
        downsample: Output pixel size in level-0 pixels (for slides without mpp).
        overlap_px: Overlap between neighbouring tiles in output pixels.
        min_tissue_fraction: Keep tiles whose tissue fraction is at least this (0-1).
        slide_mpp: µm per level-0 pixel if the slide's metadata lacks it.
        export_tiles: Also write the tiles as PNG files (a folder artifact).
        max_export: Refuse exports of more tiles than this.
    """
    from servers.common.images import png_bytes
    from servers.wsi import tiling
    from servers.wsi.export import tiles_geojson
    from servers.wsi.heatmap import heatmap_png, value_grid
    from servers.wsi.tissue import segment_tissue

    s = _open(slide, slide_mpp)
    spec = tiling.resolve_spec(s, tile_px, mpp, downsample, overlap_px)
    tissue = await run_blocking(ctx, segment_tissue, s)
    grid = tiling.tile_grid(s, spec, tissue_mask=tissue.mask, mask_downsample=tissue.downsample,
                            min_tissue_fraction=min_tissue_fraction)
    prov = _prov("tile_slide", slide=slide, tile_px=tile_px, mpp=mpp, downsample=downsample, overlap_px=overlap_px,
                 min_tissue_fraction=min_tissue_fraction)
    ws = _ws()
    meta = {"slide": slide, "tile_px": tile_px, "downsample": spec.downsample, "mpp": spec.mpp,
            "overlap_px": overlap_px}
    t = ws.save_table(grid, name="tiles", provenance=prov, meta=meta)
    g = ws.save_json(tiles_geojson(grid), kind="geojson", name="tiles", provenance=prov)
    summary: dict[str, Any] = {"n_tiles": len(grid), "tile_px": tile_px, "mpp": spec.mpp,
                               "downsample": round(spec.downsample, 4), "table_artifact": t.id,
                               "geojson_artifact": g.id, "first_tiles": _inline(grid, 10)}
    if export_tiles:
        if len(grid) > max_export:
            raise ToolError(f"{len(grid)} tiles exceed max_export={max_export}.",
                            hint="Raise max_export, raise min_tissue_fraction, or use a coarser mpp.")
        folder = ws.root / "artifacts" / f"tiles-{t.id}"
        await run_blocking(ctx, tiling.export_tiles, s, spec, grid, folder)
        f = ws.register("file", folder, name="tile_images", provenance=prov, meta=meta, n_rows=len(grid))
        summary["tiles_folder_artifact"] = f.id
        summary["tiles_folder"] = str(folder)
    if len(grid):
        field = value_grid(grid, grid["tissue_fraction"], tissue.thumbnail.shape, tissue.downsample)
        img = heatmap_png(tissue.thumbnail, field, title="tile tissue fraction", vmin=0, vmax=1)
    else:
        img = png_bytes(tissue.thumbnail)
    return tool_result(summary, images=[img])


@mcp.tool
async def tile_slides_batch(ctx: Context, folder: str = ".", pattern: str = "*", tile_px: int = 256,
                            mpp: float | None = None, downsample: float | None = None, overlap_px: int = 0,
                            min_tissue_fraction: float = 0.5, workers: int = 2) -> dict:
    """Tissue detection + tile grids for every slide under a folder, in parallel (process pool or Dask),
    with progress. Slides that fail (corrupt, missing mpp) are reported, the rest still run. Saves one
    combined table (column 'slide').

    Args:
        folder: Folder relative to the data root.
        pattern: Glob for slide files, e.g. '*.svs'.
        tile_px: Tile side in output pixels.
        mpp: Output µm per pixel (slides without mpp fail unless downsample is used).
        downsample: Output pixel size in level-0 pixels (alternative to mpp).
        overlap_px: Overlap between tiles in output pixels.
        min_tissue_fraction: Keep tiles with at least this tissue fraction.
        workers: Parallel workers.
    """
    from servers.common.config import get_config
    from servers.wsi.slide import list_slides as _ls
    from servers.wsi.tiling import batch_tile

    root = get_config().data_root
    items = [(it["path"], root / it["path"]) for it in _ls(folder, pattern) if it["kind"] == "slide"]
    if not items:
        raise ToolError(f"No slide files under {folder!r} matching {pattern!r}.", hint="Call list_slides to see what is there.")
    table, status = await run_blocking(ctx, batch_tile, items, tile_px=tile_px, target_mpp=mpp, downsample=downsample,
                                       overlap_px=overlap_px, min_tissue_fraction=min_tissue_fraction,
                                       workers=max(1, min(int(workers), 16)))
    out: dict[str, Any] = {"n_slides": len(items), "slides": status, "n_tiles": len(table)}
    if len(table):
        art = _ws().save_table(table, name="tiles_batch",
                               provenance=_prov("tile_slides_batch", folder=folder, pattern=pattern, tile_px=tile_px,
                                                mpp=mpp, downsample=downsample))
        out["table_artifact"] = art.id
    return out


# -- stain ------------------------------------------------------------------------------------------


def _region(s, x, y, width, height, mpp):
    return s.read_region_mpp(x, y, width, height, mpp) if mpp else s.read_region(x, y, width, height, 0)


@mcp.tool
def stain_deconvolve(slide: str, x: int, y: int, width: int, height: int, mpp: float | None = None,
                     slide_mpp: Mpp = None) -> ToolResult:
    """H&E colour deconvolution of a region into hematoxylin (nuclei), eosin (cytoplasm/stroma) and
    residual optical-density channels; saves them as a (H, W, 3) float32 artifact and returns previews
    plus Macenko stain vectors estimated from the region.

    Args:
        slide: Path relative to the data root.
        x: Left edge, level-0 px.
        y: Top edge, level-0 px.
        width: Width in output pixels.
        height: Height in output pixels.
        mpp: Output µm per pixel (default: level 0).
        slide_mpp: µm per level-0 pixel if the metadata lacks it.
    """
    import numpy as np

    from servers.common.images import preview_png
    from servers.wsi.stain import deconvolve, macenko_stains

    s = _open(slide, slide_mpp)
    rgb = _region(s, x, y, width, height, mpp)
    ch = deconvolve(rgb)
    stack = np.stack([ch["hematoxylin"], ch["eosin"], ch["residual"]], axis=2)
    art = _ws().save_array(stack, kind="image", name="hed_od",
                           provenance=_prov("stain_deconvolve", slide=slide, x=x, y=y, width=width, height=height, mpp=mpp),
                           meta={"channels": ["hematoxylin", "eosin", "residual"]})
    summary: dict[str, Any] = {"artifact": art.id, "channels": ["hematoxylin", "eosin", "residual"],
                               "mean_od": {k: round(float(v.mean()), 4) for k, v in ch.items()}}
    try:
        summary["macenko"] = macenko_stains(rgb).to_dict()
    except ToolError as e:
        summary["macenko"] = str(e)
    return tool_result(summary, images=[preview_png(ch["hematoxylin"]), preview_png(ch["eosin"])])


@mcp.tool
def stain_normalize(slide: str, x: int, y: int, width: int, height: int, mpp: float | None = None,
                    target_slide: str | None = None, target_x: int = 0, target_y: int = 0,
                    target_width: int = 1024, target_height: int = 1024, slide_mpp: Mpp = None) -> ToolResult:
    """Macenko stain normalisation of a region to a target's stain vectors (a region of target_slide,
    or the standard Macenko reference when no target is given). Saves the normalised RGB region.

    Args:
        slide: Path relative to the data root.
        x: Left edge, level-0 px.
        y: Top edge, level-0 px.
        width: Width in output pixels.
        height: Height in output pixels.
        mpp: Output µm per pixel (default: level 0).
        target_slide: Slide whose stain appearance to match (optional).
        target_x: Target region left edge (level-0 px of target_slide).
        target_y: Target region top edge.
        target_width: Target region width (level-0 px).
        target_height: Target region height.
        slide_mpp: µm per level-0 pixel if the metadata lacks it.
    """
    import numpy as np

    from servers.common.images import png_bytes
    from servers.wsi.slide import resize
    from servers.wsi.stain import macenko_normalize, macenko_stains

    s = _open(slide, slide_mpp)
    rgb = _region(s, x, y, width, height, mpp)
    src = macenko_stains(rgb)
    target = None
    if target_slide:
        t = _open(target_slide)
        target = macenko_stains(t.read_region(target_x, target_y, target_width, target_height, 0))
    out = macenko_normalize(rgb, target, source=src)
    art = _ws().save_array(out, kind="image", name="stain_normalized", fmt="tiff",
                           provenance=_prov("stain_normalize", slide=slide, x=x, y=y, width=width, height=height,
                                            mpp=mpp, target_slide=target_slide))
    both = np.concatenate([rgb, out], axis=1)
    if max(both.shape[:2]) > 1024:
        f = 1024 / max(both.shape[:2])
        both = resize(both, int(both.shape[1] * f), int(both.shape[0] * f))
    return tool_result({"artifact": art.id, "source_stains": src.to_dict(),
                        "target_stains": target.to_dict() if target else "Macenko reference"},
                       images=[png_bytes(both)])


# -- nuclei -----------------------------------------------------------------------------------------


def _seg_options(backend: str, weights: str | None, options: dict | None) -> dict:
    opts = dict(options or {})
    if weights:
        from servers.common.paths import resolve_data_path

        opts["weights"] = str(resolve_data_path(weights))
    return opts


@mcp.tool
async def segment_nuclei(slide: str, ctx: Context, x: int = 0, y: int = 0, width: int | None = None,
                         height: int | None = None, mpp: float | None = None, backend: str = "classical", weights: str | None = None,
                         options: dict | None = None, slide_mpp: Mpp = None, tile_px: int = 1024,
                         overlap_px: int = 96, modality: Modality = "auto", channel: int | None = None,
                         flatfield_um: float | None = None) -> ToolResult:
    """Nucleus instance segmentation of a slide region or a whole image (tiled with stitching across
    tile borders) and per-nucleus morphometry: area µm² (and px), perimeter µm, equivalent diameter µm,
    eccentricity, solidity, convex area, circularity, hematoxylin OD (H&E) or mean intensity. Works on
    H&E (RGB) and on fluorescence images (grey/uint16/multi-channel TIFF or PNG, bright nuclei on a
    dark background; modality='auto' tells them apart). The result gives n_nuclei, density_per_mm2,
    mean/median/max area, mean equivalent diameter and nuclear_area_fraction of the region. Saves
    labels (tiff), the table (parquet) and nuclei GeoJSON (QuPath detections).

    Leave x, y, width, height out to segment a whole (plain) image. TIFFs calibrated in cm/inch/µm
    give mpp themselves; otherwise pass slide_mpp (slide_mpp=1 with an
    uncalibrated image gives pixel units — read mean_area_px / area_px then).

    Args:
        slide: Path relative to the data root (a MoNuSeg-style .tif works with slide_mpp).
        x: Left edge, level-0 px (default 0).
        y: Top edge, level-0 px (default 0).
        width: Width in pixels at mpp (default: to the right edge of the image).
        height: Height in pixels at mpp (default: to the bottom edge of the image).
        mpp: Resolution to segment at in µm/px (default: the slide's level 0).
        backend: 'classical' (no weights; hematoxylin threshold + watershed), 'unet', 'cellpose', 'stardist'.
        weights: Local weights path under the data root for model backends.
        options: Backend options, e.g. {"h_um": 0.3, "min_area_um2": 10} for classical.
        slide_mpp: µm per level-0 pixel if the metadata lacks it.
        tile_px: Tile side for stitched processing.
        overlap_px: Context margin around each tile (≥ a nucleus diameter).
        modality: 'he' (RGB H&E, hematoxylin), 'fluorescence' (one intensity channel, bright nuclei on
            dark; raw values are kept, e.g. 16-bit) or 'auto' (fluorescence for grey/multi-channel
            images with a dark background, else H&E).
        channel: Fluorescence channel of a multi-channel image (0-based); default: the channel mean.
        flatfield_um: Fluorescence only: correct uneven illumination (dim corners/sides) first by
            dividing by a Gaussian blur of this scale in µm (several nucleus diameters, e.g. 20).
    """
    from servers.common.images import overlay_labels
    from servers.wsi.export import nuclei_geojson
    from servers.wsi.nuclei import label_polygons, segment_region

    s = _open(slide, slide_mpp)
    opts = _seg_options(backend, weights, options)
    res = await run_blocking(ctx, segment_region, s, x, y, width, height, mpp=mpp, backend=backend, options=opts,
                             tile_px=tile_px, overlap_px=overlap_px, modality=modality, channel=channel,
                             flatfield_um=flatfield_um)
    prov = _prov("segment_nuclei", slide=slide, x=x, y=y, width=width, height=height, mpp=mpp, backend=backend,
                 options=options, modality=res.modality, channel=channel, flatfield_um=flatfield_um)
    ws = _ws()
    lab = ws.save_array(res.labels, kind="labels", name="nuclei", fmt="tiff", provenance=prov,
                        meta={"slide": slide, "mpp": res.mpp, "origin_level0": list(res.origin)})
    table = res.table.copy()
    rings = label_polygons(res.labels, offset_xy=res.origin, scale=res.downsample)
    table["polygon"] = [rings.get(int(i)) for i in table["label"]]
    tab = ws.save_table(table, name="nuclei", provenance=prov, meta={"slide": slide, "mpp": res.mpp})
    gj = ws.save_json(nuclei_geojson(table), kind="geojson", name="nuclei", provenance=prov)
    summary = res.summary()
    summary.update({"labels_artifact": lab.id, "table_artifact": tab.id, "geojson_artifact": gj.id,
                    "first_nuclei": _inline(table.drop(columns=["polygon"]), 5)})
    return tool_result(summary, images=[overlay_labels(res.rgb, res.labels)])


@mcp.tool
async def segment_nuclei_slide(slide: str, ctx: Context, mpp: float | None = None, tile_px: int = 1024,
                               overlap_px: int = 64, min_tissue_fraction: float = 0.05, backend: str = "classical",
                               weights: str | None = None, options: dict | None = None, polygons: bool = True,
                               max_tiles: int = 5000, workers: int = 1, slide_mpp: Mpp = None,
                               modality: Modality = "auto", channel: int | None = None) -> ToolResult:
    """Nuclei of a whole slide: tissue tiles segmented in parallel with stitching; saves a nucleus
    table (level-0 centroids, µm morphometry, tile_id, outlines), a per-tile table (count, density per
    mm² of tissue), nuclei GeoJSON, and returns a density heatmap.

    Args:
        slide: Path relative to the data root.
        mpp: Resolution to segment at in µm/px (default: level 0; 0.5 is a good speed/quality balance).
        tile_px: Tile side in pixels at mpp.
        overlap_px: Context margin around each tile.
        min_tissue_fraction: Skip tiles with less tissue than this.
        backend: Segmentation backend ('classical' needs no weights).
        weights: Local weights path under the data root for model backends.
        options: Backend options.
        polygons: Keep nucleus outlines (for GeoJSON); off = centroids only (faster, smaller).
        max_tiles: Refuse slides with more tissue tiles than this.
        workers: Parallel worker processes.
        slide_mpp: µm per level-0 pixel if the metadata lacks it.
        modality: 'he', 'fluorescence' (every tile is segmented, density per mm² of image) or 'auto'.
        channel: Fluorescence channel of a multi-channel image (0-based); default: the channel mean.
    """
    from servers.wsi.export import nuclei_geojson
    from servers.wsi.heatmap import heatmap_png, value_grid
    from servers.wsi.nuclei import segment_slide

    s = _open(slide, slide_mpp)
    opts = _seg_options(backend, weights, options)
    res = await run_blocking(ctx, segment_slide, s, mpp=mpp, tile_px=tile_px, overlap_px=overlap_px,
                             min_tissue_fraction=min_tissue_fraction, backend=backend, options=opts,
                             polygons=polygons, max_tiles=max_tiles, workers=max(1, min(int(workers), 16)),
                             modality=modality, channel=channel)
    prov = _prov("segment_nuclei_slide", slide=slide, mpp=mpp, tile_px=tile_px, backend=backend, options=options,
                 modality=modality, channel=channel)
    ws = _ws()
    table, tiles = res["table"], res["tiles"]
    tab = ws.save_table(table, name="nuclei_slide", provenance=prov, meta={"slide": slide})
    tt = ws.save_table(tiles, name="nuclei_tiles", provenance=prov, meta={"slide": slide})
    gj = ws.save_json(nuclei_geojson(table), kind="geojson", name="nuclei_slide", provenance=prov)
    summary = dict(res["summary"])
    summary.update({"table_artifact": tab.id, "tiles_artifact": tt.id, "geojson_artifact": gj.id})
    images = []
    if len(tiles):
        tissue = res["tissue"]
        g = tiles.assign(size0=int(round(tile_px * (res["summary"]["mpp"] / s.mpp))))
        field = value_grid(g, g["density_per_mm2_tissue"], tissue.thumbnail.shape, tissue.downsample)
        images.append(heatmap_png(tissue.thumbnail, field, title="nuclei per mm² of tissue", cmap="magma"))
    return tool_result(summary, images=images)


@mcp.tool
async def load_annotations(annotation: str, ctx: Context, image: str | None = None, mpp: float | None = None,
                           channel: int | None = None, preview: bool = True) -> ToolResult:
    """Read expert (ground-truth) annotations of nuclei/cells into an instance label image and measure
    every annotated object exactly like segment_nuclei does (area µm² and px, perimeter, equivalent
    diameter, eccentricity, solidity, circularity, mean intensity / hematoxylin OD). Use it to answer
    questions about the annotations themselves (how many annotated nuclei, their mean area, the
    annotated nuclear area fraction) or to compare a segmentation with the truth.

    Formats: Aperio ImageScope XML (MoNuSeg; one Region polygon per nucleus, rasterised at the size of
    the annotated image — a sibling file with the same stem is used unless image= is given), a Data
    Science Bowl 2018 sample folder (<id>/masks/*.png, one mask per nucleus), or a label image
    (.tif/.png/.npy, 0 = background). Saves the labels (tiff) and the table (parquet).

    Args:
        annotation: Path relative to the data root: an .xml file, a DSB2018 sample folder, or a label image.
        image: The annotated image (relative to the data root), for size, intensities and the overlay.
        mpp: µm per pixel (MoNuSeg 40x: 0.2525). Default: the image's calibration; without either,
            sizes are reported in pixels only.
        channel: Channel of a multi-channel fluorescence image for mean intensities.
        preview: Return an overlay PNG of the annotation outlines.

    Returns:
        n_annotations (objects in the file), n_objects (with pixels), mean/median/max area, mean
        equivalent diameter, nuclear_area_fraction, density_per_mm2 (with mpp), labels_artifact,
        table_artifact.
    """
    from servers.common.images import overlay_labels
    from servers.common.paths import resolve_data_path
    from servers.wsi.annotated import load_annotations as _load

    ann = resolve_data_path(annotation)
    img = resolve_data_path(image) if image else None
    res = await run_blocking(ctx, _load, ann, image=img, mpp=mpp, channel=channel)
    prov = _prov("load_annotations", annotation=annotation, image=image, mpp=mpp)
    ws = _ws()
    lab = ws.save_array(res.labels, kind="labels", name="annotations", fmt="tiff", provenance=prov,
                        meta={"annotation": annotation, "mpp": res.mpp})
    tab = ws.save_table(res.table, name="annotations", provenance=prov, meta={"annotation": annotation, "mpp": res.mpp})
    summary = {"annotation": annotation, **res.summary(), "labels_artifact": lab.id, "table_artifact": tab.id,
               "first_objects": _inline(res.table, 5)}
    images = []
    if preview:
        base = res.image if res.image is not None else (res.labels > 0).astype("uint8") * 255
        images.append(overlay_labels(base, res.labels))
    return tool_result(summary, images=images)


# -- features, clusters, heatmaps, classifier ------------------------------------------------------


@mcp.tool
async def tile_features(slide: str, ctx: Context, tile_px: int = 256, mpp: float | None = 1.0,
                        downsample: float | None = None, min_tissue_fraction: float = 0.5, nuclei: bool = False,
                        workers: int = 1, slide_mpp: Mpp = None) -> dict:
    """Handcrafted features of every tissue tile: colour (mean/std RGB), stain (H and E OD), texture
    (GLCM contrast/homogeneity/energy/correlation, entropy) and, with nuclei=True, nuclear count,
    density per mm², area and eccentricity. Saves a table (one row per tile) for cluster_tiles,
    tile_heatmap and train_slide_classifier.

    Args:
        slide: Path relative to the data root.
        tile_px: Tile side in pixels at mpp.
        mpp: Tile resolution in µm/px (set None and use downsample for slides without mpp).
        downsample: Output pixel size in level-0 px (alternative to mpp).
        min_tissue_fraction: Keep tiles with at least this tissue fraction.
        nuclei: Also segment nuclei per tile (slower).
        workers: Parallel worker processes.
        slide_mpp: µm per level-0 pixel if the metadata lacks it.
    """
    from servers.wsi import features as F
    from servers.wsi import tiling
    from servers.wsi.tissue import segment_tissue

    s = _open(slide, slide_mpp)
    spec = tiling.resolve_spec(s, tile_px, mpp if downsample is None else None, downsample)
    tissue = await run_blocking(ctx, segment_tissue, s)
    grid = tiling.tile_grid(s, spec, tissue_mask=tissue.mask, mask_downsample=tissue.downsample,
                            min_tissue_fraction=min_tissue_fraction)
    df = await run_blocking(ctx, F.tile_features, s, spec, grid, nuclei=nuclei, workers=max(1, min(int(workers), 16)))
    df["size0"] = int(round(spec.tile_px * spec.downsample))
    art = _ws().save_table(df, name="tile_features",
                           provenance=_prov("tile_features", slide=slide, tile_px=tile_px, mpp=spec.mpp, nuclei=nuclei),
                           meta={"slide": slide, "tile_px": tile_px, "downsample": spec.downsample, "mpp": spec.mpp})
    cols = F.feature_columns(df)
    return {"n_tiles": len(df), "table_artifact": art.id, "features": cols,
            "feature_means": {c: round(float(df[c].mean()), 4) for c in cols}}


def _load_table(ref: str):
    import pandas as pd

    obj = _ws().load(ref)
    if not isinstance(obj, pd.DataFrame):
        raise ToolError(f"Artifact {ref!r} is not a table.", hint="Pass the table_artifact from tile_features or tile_slide.")
    return obj


@mcp.tool
def cluster_tiles(features_table: str, n_clusters: int = 4, columns: list[str] | None = None,
                  slide: str | None = None) -> ToolResult:
    """K-means clustering of tiles on standardised features (from tile_features); adds a 'cluster'
    column (saved as a new table) and, when the slide is given, returns a cluster map over the thumbnail.

    Args:
        features_table: Table artifact id from tile_features.
        n_clusters: Number of clusters (2 .. n_tiles-1).
        columns: Feature columns to use (default: all numeric features).
        slide: The slide the tiles came from, for the cluster map.
    """
    from servers.wsi.features import cluster_tiles as _cluster
    from servers.wsi.heatmap import heatmap_png, value_grid

    df = _load_table(features_table)
    res = _cluster(df, n_clusters=n_clusters, columns=columns)
    df = df.assign(cluster=res["labels"])
    art = _ws().save_table(df, name="tile_clusters",
                           provenance=_prov("cluster_tiles", features_table=features_table, n_clusters=n_clusters))
    summary = {"table_artifact": art.id, "silhouette": round(res["silhouette"], 4), "clusters": res["clusters"]}
    images = []
    if slide:
        s = _open(slide)
        thumb, ds = s.thumbnail(1024)
        images.append(heatmap_png(thumb, value_grid(df, df["cluster"], thumb.shape, ds), title="tile clusters",
                                  categorical=True))
    return tool_result(summary, images=images)


@mcp.tool
def tile_heatmap(slide: str, table: str, column: str, cmap: str = "viridis", max_side: int = 1024,
                 slide_mpp: Mpp = None) -> ToolResult:
    """Heatmap of any per-tile value (a column of a tile table with x, y, size0) over the slide
    thumbnail; saved as a figure artifact.

    Args:
        slide: Path relative to the data root.
        table: Table artifact id with one row per tile (tile_slide, tile_features, cluster_tiles, nuclei tiles).
        column: Column to map, e.g. 'tissue_fraction', 'mean_hematoxylin_od', 'cluster', 'n_nuclei'.
        cmap: Matplotlib colour map name.
        max_side: Thumbnail size.
        slide_mpp: µm per level-0 pixel if the metadata lacks it.
    """
    from servers.wsi.heatmap import heatmap_png, value_grid

    df = _load_table(table)
    if column not in df:
        raise ToolError(f"Column {column!r} is not in table {table}.", hint=f"Columns: {', '.join(map(str, df.columns))}.")
    missing = [c for c in ("x", "y", "size0") if c not in df]
    if missing:
        raise ToolError(f"Table {table} lacks tile geometry columns {missing}.",
                        hint="Use a table from tile_slide, tile_features or cluster_tiles.")
    s = _open(slide, slide_mpp)
    thumb, ds = s.thumbnail(max(128, min(int(max_side), 2048)))
    png = heatmap_png(thumb, value_grid(df, df[column], thumb.shape, ds), title=column, cmap=cmap,
                      categorical=column == "cluster")
    art = _ws().save_bytes(png, kind="figure", name=f"heatmap_{column}",
                           provenance=_prov("tile_heatmap", slide=slide, table=table, column=column))
    return tool_result({"figure_artifact": art.id, "column": column,
                        "min": float(df[column].min()), "max": float(df[column].max())}, images=[png])


@mcp.tool
def train_slide_classifier(feature_tables: dict[str, str], labels: dict[str, str],
                           pooling: Literal["mean", "attention"] = "mean", columns: list[str] | None = None) -> dict:
    """Train a slide-level classifier on tile features: mean pooling + logistic regression, or
    gated-attention MIL. Reports stratified cross-validated accuracy and saves the model.

    Args:
        feature_tables: {slide name: tile_features table artifact id}.
        labels: {slide name: class label}.
        pooling: 'mean' or 'attention'.
        columns: Feature columns (default: all numeric features).
    """
    import pickle

    from servers.wsi.classify import train_slide_classifier as _train

    tables = {name: _load_table(ref) for name, ref in feature_tables.items()}
    clf = _train(tables, labels, pooling=pooling, columns=columns)
    art = _ws().save_bytes(pickle.dumps(clf), kind="model", ext="pkl", name=f"slide_classifier_{pooling}",
                           provenance=_prov("train_slide_classifier", labels=labels, pooling=pooling))
    train_pred = clf.predict([tables[s] for s in tables if s in labels])
    acc_train = sum(p == str(labels[s]) for p, s in zip(train_pred, [s for s in tables if s in labels])) / len(train_pred)
    return {"model_artifact": art.id, "pooling": pooling, "classes": clf.classes, "cv_accuracy": clf.cv_accuracy,
            "train_accuracy": round(acc_train, 4), **clf.meta}


@mcp.tool
def export_geojson(table: str, kind: Literal["nuclei", "tiles"] = "nuclei") -> dict:
    """Export a nucleus or tile table artifact as QuPath-readable GeoJSON (level-0 pixel coordinates).

    Args:
        table: Table artifact id (from segment_nuclei, segment_nuclei_slide, tile_slide, tile_features).
        kind: 'nuclei' (detections; polygons when outlines were kept, else points) or 'tiles'.
    """
    from servers.wsi.export import nuclei_geojson, tiles_geojson

    df = _load_table(table)
    need = ["x", "y"] + (["size0"] if kind == "tiles" else [])
    missing = [c for c in need if c not in df]
    if missing:
        raise ToolError(f"Table {table} lacks columns {missing} for {kind} export.")
    gj = nuclei_geojson(df) if kind == "nuclei" else tiles_geojson(df)
    art = _ws().save_json(gj, kind="geojson", name=kind, provenance=_prov("export_geojson", table=table, kind=kind))
    return {"geojson_artifact": art.id, "n_features": len(gj["features"]), "path": str(_ws().abspath(art))}


if __name__ == "__main__":  # pragma: no cover
    mcp.run()
