"""Readers: AnnData ``.h5ad``, CSV/Parquet cell tables, CosMx, Xenium and MERFISH/Vizgen outputs.

Every reader returns an AnnData with coordinates in ``obsm['spatial']`` and their unit stated in
``uns['spatial_units']`` (``'um'`` or ``'px'``), plus ``uns['mpp']`` (µm per pixel) when known.
Paths are ordinary filesystem paths here; ``load_path`` resolves data-root-relative paths.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from servers.common.errors import ToolError
from servers.spatial.core import set_units

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from anndata import AnnData

COSMX_MPP = 0.12028  # µm per pixel of CosMx SMI cameras (NanoString; newer instruments use 0.12)
_NEG_PATTERNS = re.compile(r"^(NegPrb|Negative|SystemControl|FalseCode|NegControl|BLANK|Blank-|Unassigned|"
                           r"DeprecatedCodeword|GenomicControl|IntergenicRegion|antisense)", re.IGNORECASE)
FORMATS = ("auto", "h5ad", "table", "cosmx", "xenium", "merfish")
# transcript tables of each platform (first match wins)
TX_PATTERNS = {
    "cosmx": ("*tx_file.csv", "*tx_file.csv.gz", "*_tx_file*"),
    "xenium": ("transcripts.parquet", "transcripts.csv.gz", "transcripts.csv"),
    "merfish": ("*detected_transcripts*.csv*", "*detected_transcripts*.parquet"),
}


def is_control_feature(name: str) -> bool:
    """Negative-control / blank / system probes (excluded from the gene matrix)."""
    return bool(_NEG_PATTERNS.match(str(name)))


# -- generic tables -----------------------------------------------------------------------------


def _read_df(path: Path, only: set[str] | None = None, **kw) -> pd.DataFrame:
    """Read a CSV/TSV/Parquet table; ``only``: read just these columns where present (faster)."""
    import pandas as pd

    name = path.name.lower()
    try:
        if name.endswith(".parquet") or name.endswith(".pq"):
            if only is not None:
                import pyarrow.parquet as pq

                kw["columns"] = [c for c in pq.read_schema(path).names if c in only]
            return pd.read_parquet(path, **kw)
        sep = "\t" if name.endswith((".tsv", ".tsv.gz", ".txt")) else ","
        if only is not None:
            kw["usecols"] = lambda c: c in only
        return pd.read_csv(path, sep=sep, **kw)
    except ToolError:
        raise
    except Exception as e:
        raise ToolError(f"Could not read {path.name}: {type(e).__name__}: {e}",
                        hint="Pass a CSV/TSV/Parquet file with a header row.") from None


def _require_cols(df: pd.DataFrame, cols: dict[str, str | None], what: str) -> None:
    missing = {role: c for role, c in cols.items() if c is not None and c not in df.columns}
    if missing:
        have = ", ".join(map(str, list(df.columns)[:40]))
        raise ToolError(
            f"{what}: column(s) not found: " + ", ".join(f"{role}={c!r}" for role, c in missing.items()) + ".",
            hint=f"Available columns: {have}. Pass the right names (x_col, y_col, cell_type_col, …).",
        )


def table_to_anndata(df: pd.DataFrame, *, x_col: str, y_col: str, units: str, mpp: float | None = None,
                     cell_type_col: str | None = None, sample_col: str | None = None,
                     marker_cols: list[str] | None = None, id_col: str | None = None,
                     drop_nan_coords: bool = False) -> AnnData:
    """A cell table (one row per cell) → AnnData with markers in ``X`` and coordinates in ``obsm``.

    Args:
        df: The table.
        x_col: Column with x coordinates.
        y_col: Column with y coordinates.
        units: Unit of x/y: ``'um'`` or ``'px'`` (never guessed).
        mpp: Microns per pixel (needed to convert pixels to µm for densities/areas).
        cell_type_col: Optional cell-type column (stored as categorical ``obs['cell_type']`` too).
        sample_col: Optional sample / FOV / image column.
        marker_cols: Columns that form ``X``; default: every other numeric column.
        id_col: Optional cell-id column (becomes ``obs_names``).
        drop_nan_coords: Drop rows with NaN coordinates instead of refusing the table.
    """
    import anndata
    import pandas as pd

    _require_cols(df, {"x_col": x_col, "y_col": y_col, "cell_type_col": cell_type_col,
                       "sample_col": sample_col, "id_col": id_col}, "Cell table")
    if len(df) == 0:
        raise ToolError("The cell table is empty (0 rows).", hint="Pass a table with at least one cell.")
    xy = df[[x_col, y_col]].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        if not drop_nan_coords:
            raise ToolError(
                f"{int(bad.sum())} of {len(df)} rows have missing/non-numeric coordinates in {x_col!r}/{y_col!r} "
                f"(first bad row: {int(np.argmax(bad))}).",
                hint="Fix the table or pass drop_nan_coords=True to drop those cells.",
            )
        df = df.loc[~bad]
        xy = xy[~bad]
    if marker_cols is None:
        skip = {x_col, y_col, cell_type_col, sample_col, id_col}
        marker_cols = [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c])
                       and not pd.api.types.is_bool_dtype(df[c])]
    else:
        _require_cols(df, {f"marker {m}": m for m in marker_cols}, "Cell table")
    X = df[marker_cols].to_numpy(dtype=np.float32) if marker_cols else np.zeros((len(df), 0), np.float32)
    obs_cols = [c for c in df.columns if c not in marker_cols]
    obs = df[obs_cols].copy()
    if id_col is not None:
        obs.index = obs[id_col].astype(str).to_numpy()
    else:
        obs.index = [str(i) for i in df.index]
    if not obs.index.is_unique:
        obs.index = [f"{v}_{i}" for i, v in enumerate(obs.index)]
    if cell_type_col is not None:
        obs["cell_type"] = obs[cell_type_col].astype(str).astype("category")
    if sample_col is not None:
        obs["sample"] = obs[sample_col].astype(str).astype("category")
    ad = anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[str(m) for m in marker_cols]))
    ad.obsm["spatial"] = xy
    set_units(ad, units, mpp)
    return ad


def read_table(path: str | Path, *, x_col: str = "x", y_col: str = "y", units: str | None = None,
               mpp: float | None = None, cell_type_col: str | None = None, sample_col: str | None = None,
               marker_cols: list[str] | None = None, id_col: str | None = None,
               drop_nan_coords: bool = False) -> AnnData:
    """Read a CSV/TSV/Parquet cell table; see ``table_to_anndata`` for the column mapping."""
    if units is None:
        raise ToolError("State the unit of the x/y columns.", hint="Pass units='um' or units='px' (plus mpp for pixels).")
    df = _read_df(Path(path))
    return table_to_anndata(df, x_col=x_col, y_col=y_col, units=units, mpp=mpp, cell_type_col=cell_type_col,
                            sample_col=sample_col, marker_cols=marker_cols, id_col=id_col,
                            drop_nan_coords=drop_nan_coords)


def read_h5ad(path: str | Path, *, x_col: str | None = None, y_col: str | None = None, units: str | None = None,
              mpp: float | None = None, cell_type_col: str | None = None) -> AnnData:
    """Read an ``.h5ad``; coordinates from ``obsm['spatial']`` or the obs columns ``x_col``/``y_col``.

    The unit must be stated in the file (``uns['spatial_units']``) or passed as ``units``.
    """
    import anndata
    import pandas as pd

    try:
        ad = anndata.read_h5ad(path)
    except Exception as e:
        raise ToolError(f"Could not read {Path(path).name} as AnnData: {type(e).__name__}: {e}") from None
    if x_col is not None or y_col is not None:
        if x_col is None or y_col is None:
            raise ToolError(f"Only one coordinate column given (x_col={x_col!r}, y_col={y_col!r}).",
                            hint="Pass both x_col and y_col (obs column names), e.g. x_col='X_position', "
                            "y_col='Y_position'.")
        _require_cols(ad.obs, {"x_col": x_col, "y_col": y_col}, "obs")
        ad.obsm["spatial"] = ad.obs[[x_col, y_col]].to_numpy(dtype=np.float64)
    elif "spatial" not in ad.obsm:
        num = [c for c in ad.obs.columns if pd.api.types.is_numeric_dtype(ad.obs[c])][:20]
        raise ToolError(
            "The .h5ad has no obsm['spatial'] coordinates.",
            hint=f"Pass x_col and y_col naming obs columns with coordinates (numeric obs columns: {', '.join(num)})"
            + ("" if "spatial_units" in ad.uns else ", and units='um' or units='px' (plus mpp for pixels)")
            + ".",
        )
    if units is not None:
        set_units(ad, units, mpp)
    elif "spatial_units" not in ad.uns:
        raise ToolError("The .h5ad does not state its coordinate unit (uns['spatial_units']).",
                        hint="Pass units='um' or units='px' (plus mpp for pixels).")
    elif mpp is not None:
        set_units(ad, str(ad.uns["spatial_units"]), mpp)
    if cell_type_col is not None:
        _require_cols(ad.obs, {"cell_type_col": cell_type_col}, "obs")
        ad.obs["cell_type"] = ad.obs[cell_type_col].astype(str).astype("category")
    return ad


# -- CosMx --------------------------------------------------------------------------------------


def _find_one(folder: Path, patterns: tuple[str, ...], what: str, required: bool = True) -> Path | None:
    for pat in patterns:
        hits = sorted(folder.glob(pat))
        if hits:
            return hits[0]
    if required:
        names = ", ".join(sorted(p.name for p in folder.iterdir())[:20])
        raise ToolError(f"No {what} found in {folder.name} (looked for {', '.join(patterns)}).",
                        hint=f"Files there: {names}.")
    return None


def _register_labels(labels: np.ndarray, tx_cells: np.ndarray, tx_x: np.ndarray, tx_y: np.ndarray
                     ) -> dict[str, Any]:
    """Find how a label image sits in local pixel space from transcripts with known cell ids.

    Tries row order as-is and flipped vertically; for each, the offset is the median difference
    between transcript and label-pixel centroids per cell (rounded to whole pixels). Returns the
    orientation whose offset puts most transcripts on a pixel of their own cell.
    """
    h, w = labels.shape
    lab = labels.ravel()
    n_lab = int(lab.max()) + 1
    rr, cc = np.divmod(np.arange(lab.size), w)
    cnt = np.bincount(lab, minlength=n_lab).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_r = np.bincount(lab, weights=rr, minlength=n_lab) / cnt
        mean_c = np.bincount(lab, weights=cc, minlength=n_lab) / cnt
    ok = (tx_cells > 0) & (tx_cells < n_lab)
    tc, tx, ty = tx_cells[ok], tx_x[ok], tx_y[ok]
    best: dict[str, Any] = {"x0": 0.0, "y0": 0.0, "flip_y": False, "match_fraction": 0.0, "n_checked": int(ok.sum())}
    if len(tc) == 0:
        return best
    cells = np.unique(tc)
    cells = cells[cnt[cells] > 0]
    if len(cells) == 0:
        return best
    _, inv = np.unique(tc, return_inverse=True)
    uniq = np.unique(tc)
    sx = np.bincount(inv, weights=tx) / np.bincount(inv)
    sy = np.bincount(inv, weights=ty) / np.bincount(inv)
    pos = np.searchsorted(uniq, cells)
    for flip in (False, True):
        col_c = mean_c[cells] + 0.5
        row_c = (h - 1 - mean_r[cells] if flip else mean_r[cells]) + 0.5
        x0 = float(np.round(np.median(sx[pos] - col_c)))
        y0 = float(np.round(np.median(sy[pos] - row_c)))
        c = np.floor(tx - x0).astype(np.int64)
        r = np.floor(ty - y0).astype(np.int64)
        if flip:
            r = h - 1 - r
        inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
        hit = np.zeros(len(tc), bool)
        hit[inside] = labels[r[inside], c[inside]] == tc[inside]
        frac = float(hit.mean())
        if frac > best["match_fraction"]:
            best = {"x0": x0, "y0": y0, "flip_y": flip, "match_fraction": round(frac, 4), "n_checked": int(len(tc))}
    return best


def read_cosmx(folder: str | Path, *, mpp: float = COSMX_MPP, tx_file: str | None = None,
               fov_file: str | None = None, labels_dir: str = "CellLabels",
               min_match_fraction: float = 0.5) -> AnnData:
    """Read CosMx SMI flat files into a cells × genes AnnData.

    Counts: transcripts (``*_tx_file.csv``) with ``cell_ID > 0`` (0 = outside any cell) counted per
    (fov, cell_ID, target); negative probes (``NegPrb*`` etc.) go to ``obs['neg_counts']`` /
    ``obsm['control_counts']`` instead of ``X``. Cell areas and centroids come from the label images
    ``CellLabels/CellLabels_F###.tif`` (pixel count × mpp²); their placement in local pixel space
    (offset, vertical flip) is found from the transcripts' cell ids and reported in
    ``uns['cosmx']['label_registration']``. Global coordinates = local + FOV position
    (``*fov_positions_file.csv``). ``obsm['spatial']`` holds global coordinates in µm
    (``obsm['spatial_px']`` in global pixels, ``obsm['spatial_local_px']`` per-FOV local pixels).

    Args:
        folder: Folder with the flat files.
        mpp: Microns per pixel (0.12028 for CosMx).
        tx_file: Transcript file name inside ``folder`` (default: the ``*tx_file.csv*`` there).
        fov_file: FOV positions file name (default: the ``*fov_positions_file.csv*`` there).
        labels_dir: Sub-folder with ``CellLabels_F*.tif``.
        min_match_fraction: Refuse label images where fewer transcripts than this land on their own cell.
    """
    import anndata
    import pandas as pd
    import scipy.sparse as sp
    import tifffile

    folder = Path(folder)
    if not folder.is_dir():
        raise ToolError(f"{folder.name} is not a folder.", hint="Pass the CosMx flat-file folder.")
    txp = folder / tx_file if tx_file else _find_one(folder, TX_PATTERNS["cosmx"], "transcript file (*_tx_file.csv)")
    tx = _read_df(txp)
    _require_cols(tx, {"fov": "fov", "cell_ID": "cell_ID", "target": "target", "x_local_px": "x_local_px",
                       "y_local_px": "y_local_px"}, f"CosMx transcripts {txp.name}")
    if len(tx) == 0:
        raise ToolError(f"{txp.name} has no transcripts.")
    fovp = folder / fov_file if fov_file else _find_one(folder, ("*fov_positions_file.csv*",), "FOV positions file",
                                                          required=False)
    fovpos = None
    if fovp is not None:
        fovpos = _read_df(fovp)
        fov_col = "fov" if "fov" in fovpos.columns else ("FOV" if "FOV" in fovpos.columns else None)
        xg = next((c for c in ("x_global_px", "X_mm", "x_global_mm") if c in fovpos.columns), None)
        yg = next((c for c in ("y_global_px", "Y_mm", "y_global_mm") if c in fovpos.columns), None)
        if fov_col is None or xg is None or yg is None:
            raise ToolError(f"{fovp.name} needs columns fov, x_global_px, y_global_px; has {list(fovpos.columns)}.")
        scale = (1000.0 / mpp) if xg.endswith("mm") else 1.0
        fovpos = {int(r[fov_col]): (float(r[xg]) * scale, float(r[yg]) * scale) for _, r in fovpos.iterrows()}
    elif {"x_global_px", "y_global_px"} <= set(tx.columns):
        d = tx.groupby("fov")[["x_global_px", "x_local_px", "y_global_px", "y_local_px"]].first()
        fovpos = {int(f): (float(r.x_global_px - r.x_local_px), float(r.y_global_px - r.y_local_px))
                  for f, r in d.iterrows()}

    neg = tx["target"].astype(str).map(is_control_feature).to_numpy()
    inside = tx["cell_ID"].to_numpy() > 0
    genes = sorted(tx.loc[~neg, "target"].astype(str).unique())
    controls = sorted(tx.loc[neg, "target"].astype(str).unique())

    # cells: union of label-image cells and transcript cells
    cells: dict[tuple[int, int], dict[str, float]] = {}
    registration: dict[str, Any] = {}
    ldir = folder / labels_dir
    fovs = sorted(int(f) for f in tx["fov"].unique())
    for fov in fovs:
        lp = None
        if ldir.is_dir():
            cands = [p for p in ldir.glob("CellLabels_F*.tif*") if re.search(r"F0*(\d+)\.tif", p.name)
                     and int(re.search(r"F0*(\d+)\.tif", p.name).group(1)) == fov]
            lp = cands[0] if cands else None
        sub = tx[(tx["fov"] == fov)]
        if lp is None:
            continue
        labels = np.asarray(tifffile.imread(lp))
        if labels.ndim != 2:
            raise ToolError(f"{lp.name} is not a 2-D label image (shape {labels.shape}).")
        if labels.dtype.kind == "f":
            if np.any(labels != np.round(labels)):
                raise ToolError(f"{lp.name} holds non-integer values; it is not a label image.")
        labels = labels.astype(np.int64)
        reg = _register_labels(labels, sub["cell_ID"].to_numpy(), sub["x_local_px"].to_numpy(dtype=float),
                               sub["y_local_px"].to_numpy(dtype=float))
        if reg["n_checked"] > 0 and reg["match_fraction"] < min_match_fraction:
            raise ToolError(
                f"Label image {lp.name} does not line up with the transcripts of FOV {fov}: only "
                f"{reg['match_fraction']:.0%} of in-cell transcripts fall on their own cell.",
                hint="Check that the label images belong to this run, or lower min_match_fraction.",
            )
        registration[str(fov)] = {**reg, "file": lp.name, "shape": list(labels.shape)}
        h, w = labels.shape
        lab = labels.ravel()
        n_lab = int(lab.max()) + 1
        cnt = np.bincount(lab, minlength=n_lab)
        rr, cc = np.divmod(np.arange(lab.size), w)
        with np.errstate(invalid="ignore", divide="ignore"):
            mr = np.bincount(lab, weights=rr, minlength=n_lab) / cnt
            mc = np.bincount(lab, weights=cc, minlength=n_lab) / cnt
        for cid in np.flatnonzero(cnt):
            if cid == 0:
                continue
            row = (h - 1 - mr[cid]) if reg["flip_y"] else mr[cid]
            cells[(fov, int(cid))] = {"area_px": float(cnt[cid]), "x_local_px": reg["x0"] + mc[cid] + 0.5,
                                      "y_local_px": reg["y0"] + row + 0.5, "centroid_from": "labels"}
    # transcript-only cells: centroid = mean transcript position
    tin = tx[inside]
    tmean = tin.groupby(["fov", "cell_ID"])[["x_local_px", "y_local_px"]].mean()
    for (fov, cid), r in tmean.iterrows():
        key = (int(fov), int(cid))
        if key not in cells:
            cells[key] = {"area_px": np.nan, "x_local_px": float(r.x_local_px), "y_local_px": float(r.y_local_px),
                          "centroid_from": "transcripts"}
    if not cells:
        raise ToolError("No cells found: every transcript has cell_ID 0 and there are no label images.",
                        hint=f"Put CellLabels_F*.tif in {labels_dir}/ or check the transcript file.")
    keys = sorted(cells)
    index = {k: i for i, k in enumerate(keys)}
    obs = pd.DataFrame([{**cells[k], "fov": k[0], "cell_ID": k[1]} for k in keys])
    obs.index = [f"{f}_{c}" for f, c in keys]
    obs["area_um2"] = obs["area_px"] * mpp * mpp
    if fovpos is not None:
        miss = sorted(set(obs["fov"]) - set(fovpos))
        if miss:
            raise ToolError(f"FOV position missing for FOV(s) {miss} in the FOV positions file.")
        off = np.array([fovpos[f] for f in obs["fov"]])
        obs["x_global_px"] = obs["x_local_px"] + off[:, 0]
        obs["y_global_px"] = obs["y_local_px"] + off[:, 1]
    else:
        raise ToolError("No FOV positions: need *fov_positions_file.csv or x/y_global_px columns in the transcripts.")

    # counts
    row_of = np.array([index.get((int(f), int(c)), -1) for f, c in zip(tin["fov"], tin["cell_ID"], strict=True)])
    tgt = tin["target"].astype(str).to_numpy()
    is_neg = neg[inside]
    gidx = {g: i for i, g in enumerate(genes)}
    cidx = {g: i for i, g in enumerate(controls)}
    gi = np.array([gidx.get(t, -1) for t in tgt])
    ci = np.array([cidx.get(t, -1) for t in tgt])
    mg = ~is_neg
    X = sp.csr_matrix((np.ones(int(mg.sum()), np.float32), (row_of[mg], gi[mg])), shape=(len(keys), len(genes)))
    X.sum_duplicates()
    C = sp.csr_matrix((np.ones(int(is_neg.sum()), np.float32), (row_of[is_neg], ci[is_neg])),
                      shape=(len(keys), len(controls)))
    C.sum_duplicates()
    obs["total_counts"] = np.asarray(X.sum(axis=1)).ravel()
    obs["neg_counts"] = np.asarray(C.sum(axis=1)).ravel()
    obs["fov"] = obs["fov"].astype(str).astype("category")
    ad = anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))
    ad.obsm["control_counts"] = C.toarray() if len(controls) <= 100 else C
    ad.uns["control_probes"] = controls
    gpx = obs[["x_global_px", "y_global_px"]].to_numpy(dtype=np.float64)
    ad.obsm["spatial_px"] = gpx
    ad.obsm["spatial_local_px"] = obs[["x_local_px", "y_local_px"]].to_numpy(dtype=np.float64)
    ad.obsm["spatial"] = gpx * mpp
    set_units(ad, "um", mpp)
    ad.uns["cosmx"] = {"label_registration": registration, "n_transcripts": int(len(tx)),
                       "n_transcripts_in_cells": int(inside.sum()), "tx_file": txp.name,
                       "coordinates": "obsm['spatial'] = global px * mpp (µm)"}
    return ad


# -- Xenium -------------------------------------------------------------------------------------


def _str_ids(col: pd.Series) -> pd.Series:
    """Ids as text; bytes (older Xenium parquet files) are decoded, not rendered as "b'...'"."""
    if len(col) and isinstance(col.iloc[0], bytes):
        return col.map(lambda v: v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
    return col.astype(str)


def read_xenium(folder: str | Path, *, min_qv: float = 20.0, use_transcripts: bool = True) -> AnnData:
    """Read a 10x Xenium output folder: ``cells.csv(.gz)|cells.parquet`` (+ ``transcripts.csv(.gz)|.parquet``).

    Counts are computed from the transcript table (``qv >= min_qv``, ``cell_id`` assigned, control
    probes/codewords excluded) when it is present; otherwise from ``cell_feature_matrix.h5`` is not
    read here — pass the transcripts. Coordinates: ``x_centroid``/``y_centroid`` in µm; areas
    ``cell_area``/``nucleus_area`` in µm².
    """
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    folder = Path(folder)
    cp = _find_one(folder, ("cells.parquet", "cells.csv.gz", "cells.csv"), "Xenium cells table (cells.csv/.parquet)")
    cells = _read_df(cp)
    _require_cols(cells, {"cell_id": "cell_id", "x_centroid": "x_centroid", "y_centroid": "y_centroid"},
                  f"Xenium {cp.name}")
    if len(cells) == 0:
        raise ToolError(f"{cp.name} has no cells.")
    cells["cell_id"] = _str_ids(cells["cell_id"])
    obs = cells.set_index("cell_id", drop=False)
    obs.index.name = None
    if "cell_area" in obs:
        obs["area_um2"] = obs["cell_area"].astype(float)
    tp = _find_one(folder, TX_PATTERNS["xenium"], "transcripts",
                   required=False) if use_transcripts else None
    if tp is not None:
        tx = _read_df(tp)
        _require_cols(tx, {"cell_id": "cell_id", "feature_name": "feature_name"}, f"Xenium {tp.name}")
        tx["cell_id"] = _str_ids(tx["cell_id"])
        tx["feature_name"] = _str_ids(tx["feature_name"])
        keep = tx["cell_id"].isin(obs.index)
        if "qv" in tx:
            keep &= tx["qv"].to_numpy() >= min_qv
        tx = tx[keep]
        ctrl = tx["feature_name"].map(is_control_feature).to_numpy()
        genes = sorted(tx.loc[~ctrl, "feature_name"].unique())
        gidx = pd.Index(genes)
        t = tx[~ctrl]
        rows = obs.index.get_indexer(t["cell_id"])
        cols = gidx.get_indexer(t["feature_name"])
        X = sp.csr_matrix((np.ones(len(t), np.float32), (rows, cols)), shape=(len(obs), len(genes)))
        X.sum_duplicates()
        obs["control_counts"] = np.bincount(obs.index.get_indexer(tx.loc[ctrl, "cell_id"]), minlength=len(obs))
    else:
        genes = []
        X = sp.csr_matrix((len(obs), 0), dtype=np.float32)
    obs["total_counts"] = np.asarray(X.sum(axis=1)).ravel()
    ad = anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))
    ad.obsm["spatial"] = obs[["x_centroid", "y_centroid"]].to_numpy(dtype=np.float64)
    set_units(ad, "um", 0.2125)
    ad.uns["xenium"] = {"cells_file": cp.name, "transcripts_file": tp.name if tp else None, "min_qv": min_qv}
    return ad


# -- MERFISH / Vizgen ---------------------------------------------------------------------------


def read_merfish(folder: str | Path, *, cell_by_gene: str | None = None, cell_metadata: str | None = None) -> AnnData:
    """Read Vizgen MERSCOPE output: ``cell_by_gene.csv`` + ``cell_metadata.csv``.

    Cells are joined on the first column (``cell`` / ``EntityID``); ``Blank-*`` columns go to
    ``obsm['blank_counts']``; coordinates are ``center_x``/``center_y`` in µm; ``volume`` (µm³) is
    kept in obs.
    """
    import anndata
    import pandas as pd
    import scipy.sparse as sp

    folder = Path(folder)
    cbg = folder / cell_by_gene if cell_by_gene else _find_one(folder, ("*cell_by_gene*.csv*",), "cell_by_gene.csv")
    meta = folder / cell_metadata if cell_metadata else _find_one(folder, ("*cell_metadata*.csv*",),
                                                                  "cell_metadata.csv")
    counts = _read_df(cbg, index_col=0)
    md = _read_df(meta, index_col=0)
    _require_cols(md, {"center_x": "center_x", "center_y": "center_y"}, f"MERFISH {meta.name}")
    counts.index = counts.index.astype(str)
    md.index = md.index.astype(str)
    common = md.index.intersection(counts.index)
    if len(common) == 0:
        raise ToolError(f"No cell ids shared by {cbg.name} and {meta.name}.",
                        hint="Both files must be indexed by the same cell id in their first column.")
    md = md.loc[common]
    counts = counts.loc[common]
    blanks = [c for c in counts.columns if is_control_feature(c)]
    genes = [c for c in counts.columns if c not in blanks]
    X = sp.csr_matrix(counts[genes].to_numpy(dtype=np.float32))
    obs = md.copy()
    obs["total_counts"] = np.asarray(X.sum(axis=1)).ravel()
    obs["blank_counts"] = counts[blanks].sum(axis=1).to_numpy() if blanks else 0
    ad = anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[str(g) for g in genes]))
    if blanks:
        ad.obsm["blank_counts"] = counts[blanks].to_numpy(dtype=np.float32)
        ad.uns["blank_probes"] = blanks
    ad.obsm["spatial"] = md[["center_x", "center_y"]].to_numpy(dtype=np.float64)
    set_units(ad, "um")
    ad.uns["merfish"] = {"cell_by_gene": cbg.name, "cell_metadata": meta.name,
                         "n_dropped_unmatched": int(max(len(counts), len(md)) - len(common))}
    return ad


# -- transcript tables -------------------------------------------------------------------------

TX_COLUMNS = ("fov", "gene", "cell", "in_cell", "is_control")


def find_transcripts(folder: str | Path, fmt: str = "auto") -> tuple[str, Path]:
    """The platform (``cosmx``/``xenium``/``merfish``) and transcript file of an output folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ToolError(f"{folder.name} is not a folder.",
                        hint="Pass a CosMx / Xenium / MERFISH output folder (the one holding the transcript table).")
    if fmt not in ("auto", *TX_PATTERNS):
        raise ToolError(f"No transcript table for format {fmt!r}.", hint=f"Use one of: auto, {', '.join(TX_PATTERNS)}.")
    for name in (TX_PATTERNS if fmt == "auto" else (fmt,)):
        hit = _find_one(folder, TX_PATTERNS[name], "transcript table", required=False)
        if hit is not None:
            return name, hit
    names = ", ".join(sorted(p.name for p in folder.iterdir())[:20])
    looked = ", ".join(p for k in (TX_PATTERNS if fmt == "auto" else (fmt,)) for p in TX_PATTERNS[k])
    raise ToolError(f"No transcript table in {folder.name} (looked for {looked}).",
                    hint=f"Files there: {names or '(none)'}. Pass the output folder that holds the per-transcript "
                         "table (CosMx *_tx_file.csv, Xenium transcripts.parquet/.csv.gz, MERFISH "
                         "detected_transcripts.csv).")


def _categorical(values, keep: np.ndarray | None = None):
    """Text categorical of ``values`` (ids decoded from bytes, categories sorted), ``<NA>`` where not ``keep``."""
    import pandas as pd

    codes, uniq = pd.factorize(np.asarray(values), sort=True)
    cats = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in uniq]
    if len(set(cats)) != len(cats):  # e.g. 5 and "5": merge them
        return pd.Categorical([cats[c] if c >= 0 else None for c in codes]) if keep is None else \
            pd.Categorical([cats[c] if c >= 0 and k else None for c, k in zip(codes, keep, strict=True)])
    if keep is not None:
        codes = np.where(keep, codes, -1)
    return pd.Categorical.from_codes(codes, categories=cats)


def read_transcripts(folder: str | Path, fmt: str = "auto", *, min_qv: float | None = 20.0
                     ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One row per transcript in a common layout, from a CosMx / Xenium / MERFISH output folder.

    Columns: ``fov`` (CosMx/MERFISH ``fov``, Xenium ``fov_name``; ``None`` when absent), ``gene``
    (categorical: CosMx ``target``, Xenium ``feature_name``, MERFISH ``gene``), ``cell`` (categorical
    cell id — CosMx ``"{fov}_{cell_ID}"`` as ``read_cosmx`` names cells — ``NaN`` outside cells),
    ``in_cell`` (CosMx ``cell_ID > 0``; Xenium ``cell_id`` not ``UNASSIGNED``/-1; MERFISH
    ``cell_id`` not -1), ``is_control`` (negative probes / blanks, see ``is_control_feature``).

    Args:
        folder: Output folder.
        fmt: ``auto`` (from the files present), ``cosmx``, ``xenium`` or ``merfish``.
        min_qv: Xenium only: drop transcripts with ``qv`` below this (as ``read_xenium``); None keeps all.

    Returns:
        The table and info ``{format, file, n_raw, n_dropped_low_qv, has_fov, has_cells}``.
    """
    import pandas as pd

    name, path = find_transcripts(folder, fmt)
    raw = _read_df(path, only={"fov", "cell_ID", "target", "cell_id", "feature_name", "qv", "fov_name", "gene"})
    info: dict[str, Any] = {"format": name, "file": path.name, "n_raw": int(len(raw)), "n_dropped_low_qv": 0}
    unassigned = {"UNASSIGNED", "-1", "", "nan", "None", "<NA>"}
    fov = None
    if name == "cosmx":
        _require_cols(raw, {"fov": "fov", "cell_ID": "cell_ID", "target": "target"}, f"CosMx transcripts {path.name}")
        fov = raw["fov"].to_numpy(np.int64)
        cid = raw["cell_ID"].to_numpy(np.int64)
        in_cell = cid > 0
        m = int(cid.max()) + 1 if len(cid) else 1
        codes, uniq = pd.factorize(fov * m + cid, sort=True)
        cats = [f"{k // m}_{k % m}" for k in uniq]
        cell = pd.Categorical.from_codes(np.where(in_cell, codes, -1), categories=cats)
        gene_col = raw["target"]
    elif name == "xenium":
        _require_cols(raw, {"cell_id": "cell_id", "feature_name": "feature_name"}, f"Xenium {path.name}")
        if min_qv is not None and "qv" in raw:
            keep = raw["qv"].to_numpy() >= min_qv
            info["n_dropped_low_qv"] = int((~keep).sum())
            raw = raw[keep].reset_index(drop=True)
        ids = _categorical(raw["cell_id"])
        in_cell = ~np.isin(np.asarray(ids.categories, dtype=object), list(unassigned))[ids.codes] & (ids.codes >= 0)
        cell = _categorical(raw["cell_id"], in_cell)
        gene_col = raw["feature_name"]
        if "fov_name" in raw:
            fov = np.asarray(_categorical(raw["fov_name"]).astype(object))
    else:  # merfish / Vizgen detected_transcripts
        _require_cols(raw, {"gene": "gene"}, f"MERFISH {path.name}")
        if "fov" in raw:
            fov = raw["fov"].to_numpy(np.int64)
        if "cell_id" in raw:
            ids = _categorical(raw["cell_id"])
            in_cell = ~np.isin(np.asarray(ids.categories, dtype=object), list(unassigned))[ids.codes] & (ids.codes >= 0)
            cell = _categorical(raw["cell_id"], in_cell)
        else:
            in_cell = np.zeros(len(raw), bool)
            cell = pd.Categorical.from_codes(np.full(len(raw), -1), categories=[])
        gene_col = raw["gene"]
    genes = _categorical(gene_col)
    ctrl_cats = np.array([is_control_feature(g) for g in genes.categories], bool)
    out = pd.DataFrame({
        "fov": fov,
        "gene": genes,
        "cell": cell,
        "in_cell": np.asarray(in_cell, bool),
        "is_control": ctrl_cats[genes.codes] if len(ctrl_cats) else np.zeros(len(genes), bool),
    })
    info["has_fov"] = fov is not None
    info["has_cells"] = bool(name == "cosmx" or "cell_id" in raw)
    return out, info


# -- dispatch -----------------------------------------------------------------------------------


def detect_format(path: Path) -> str:
    """``h5ad``, ``table``, ``cosmx``, ``xenium`` or ``merfish`` from a file/folder's contents."""
    if path.is_file():
        n = path.name.lower()
        if n.endswith(".h5ad"):
            return "h5ad"
        if n.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz", ".txt", ".parquet", ".pq")):
            return "table"
        raise ToolError(f"Unrecognised file type {path.name}.", hint="Pass .h5ad, .csv/.tsv/.parquet, or a folder.")
    names = [p.name for p in path.iterdir()]
    if any("tx_file" in n for n in names):
        return "cosmx"
    if any(n.startswith("cells.") for n in names) and any(n.startswith(("transcripts.", "cells.")) for n in names):
        return "xenium"
    if any("cell_by_gene" in n for n in names):
        return "merfish"
    raise ToolError(f"Cannot tell the format of folder {path.name} ({', '.join(sorted(names)[:12])}).",
                    hint="Expected CosMx (*_tx_file.csv), Xenium (cells.csv + transcripts) or MERFISH "
                         "(cell_by_gene.csv + cell_metadata.csv); or pass fmt explicitly.")


def read_any(path: str | Path, fmt: str = "auto", **kw) -> AnnData:
    """Read any supported format (``fmt`` = auto|h5ad|table|cosmx|xenium|merfish) with reader options ``kw``."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ToolError(f"Unknown format {fmt!r}.", hint=f"Use one of: {', '.join(FORMATS)}.")
    if fmt == "auto":
        fmt = detect_format(path)
    reader = {"h5ad": read_h5ad, "table": read_table, "cosmx": read_cosmx, "xenium": read_xenium,
              "merfish": read_merfish}[fmt]
    import inspect

    allowed = set(inspect.signature(reader).parameters) - {"folder", "path"}
    extra = {k: v for k, v in kw.items() if v is not None}
    unknown = set(extra) - allowed
    if unknown:
        raise ToolError(f"Options {sorted(unknown)} do not apply to the {fmt} reader.",
                        hint=f"It accepts: {', '.join(sorted(allowed))}.")
    ad = reader(path, **extra)
    ad.uns["source"] = {"format": fmt, "path": path.name}
    return ad


def load_path(rel_path: str, fmt: str = "auto", **kw) -> AnnData:
    """``read_any`` on a path relative to the configured data root (confined)."""
    from servers.common.paths import resolve_data_path

    return read_any(resolve_data_path(rel_path), fmt=fmt, **kw)
