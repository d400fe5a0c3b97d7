"""Transcript-level statistics of CosMx / Xenium / MERFISH runs: counts per FOV, gene and cell.

Works on the common transcript table of ``servers.spatial.io.read_transcripts`` (one row per
transcript: ``fov, gene, cell, in_cell, is_control``), so every platform is counted the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from servers.common.errors import ToolError

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

GROUP_KEYS = ("fov", "gene", "cell")


def _check_values(tx: pd.DataFrame, col: str, wanted: list, what: str) -> list:
    """``wanted`` cast to the column's type; ToolError naming values absent from the whole run."""
    import difflib

    have = tx[col].dropna().unique()
    if tx[col].dtype.kind in "iu" or (len(have) and isinstance(have[0], int | np.integer)):
        try:
            wanted = [int(v) for v in wanted]
        except (TypeError, ValueError):
            raise ToolError(f"{what} values must be integers here; got {wanted}.") from None
    else:
        wanted = [str(v) for v in wanted]
    known = set(have.tolist())
    missing = [v for v in wanted if v not in known]
    if missing:
        strs = sorted(map(str, known))
        close = sorted({c for m in missing for c in difflib.get_close_matches(str(m), strs, n=3)})
        raise ToolError(f"Unknown {what}(s) {missing[:10]}: not in this run's transcripts.",
                        hint=(f"Close matches: {', '.join(close)}. " if close else "")
                        + f"{len(strs)} {what}s present, e.g. {', '.join(strs[:15])}.")
    return wanted


def transcript_counts(tx: pd.DataFrame, by: list[str] | str = ("fov",), *, genes: list[str] | None = None,
                      fovs: list | None = None, include_controls: bool = True, in_cells_only: bool = False,
                      top_k: int | None = None) -> pd.DataFrame:
    """Count transcripts grouped by any of ``fov`` / ``gene`` / ``cell``.

    Filters first (``genes``, ``fovs``, controls, in-cell), then groups. Rows for requested genes /
    FOVs without transcripts are kept with 0. Unless ``cell`` is a key, every row also has the
    in-cell statistics of its transcripts: ``n_in_cells`` (assigned to a cell), ``fraction_in_cells``
    (0-1), ``n_cells`` (distinct cells with >= 1 of them) and ``mean_transcripts_per_cell``
    (``n_in_cells / n_cells``, i.e. over cells with at least one such transcript). Grouping by
    ``cell`` counts in-cell transcripts only and adds ``n_genes`` (distinct genes).

    Args:
        tx: Table from ``read_transcripts``.
        by: Group keys, in order, from ``fov``, ``gene``, ``cell``; ``[]`` for one overall row.
        genes: Keep only these genes (e.g. ``["COL1A1"]``).
        fovs: Keep only these FOVs.
        include_controls: Count negative-control / blank probes too (True: every row of the table).
        in_cells_only: Count only transcripts assigned to a cell.
        top_k: Keep the k groups with most transcripts within each group of the other keys
            (``by=["fov", "gene"], top_k=5``: top 5 genes per FOV); rows sorted by count then.

    Returns:
        DataFrame: the keys, ``n_transcripts`` and the in-cell columns; sorted by the keys, or by
        ``n_transcripts`` descending (ties by key) when ``top_k`` is given.
    """
    import pandas as pd

    by = [by] if isinstance(by, str) else list(by)
    bad = [k for k in by if k not in GROUP_KEYS]
    if bad or len(set(by)) != len(by):
        raise ToolError(f"Invalid group keys {by}.", hint="Group by any of 'fov', 'gene', 'cell' (each once).")
    if "fov" in by or fovs is not None:
        if tx["fov"].isna().all():
            raise ToolError("This run's transcript table has no FOV column.", hint="Group by 'gene' or 'cell'.")
    if top_k is not None and (int(top_k) < 1 or not by):
        raise ToolError(f"top_k must be >= 1 and needs group keys; got top_k={top_k}, by={by}.")
    t = tx
    if genes is not None:
        genes = _check_values(tx, "gene", list(genes), "gene")
        t = t[t["gene"].isin(genes)]
    if fovs is not None:
        fovs = _check_values(tx, "fov", list(fovs), "FOV")
        t = t[t["fov"].isin(fovs)]
    if not include_controls:
        t = t[~t["is_control"].to_numpy()]
    if in_cells_only or "cell" in by:
        t = t[t["in_cell"].to_numpy()]

    if "cell" in by:
        keys = by + (["fov"] if "fov" not in by and t["fov"].notna().any() else [])
        g = t.groupby(keys, observed=True, sort=True)
        df = pd.DataFrame({"n_transcripts": g.size(), "n_genes": g["gene"].nunique()}).reset_index()
        df = df[[*by, *[k for k in keys if k not in by], "n_transcripts", "n_genes"]]
        for k in ("cell", "gene"):
            if k in df:
                df[k] = df[k].astype(str)
    else:
        if by:
            g = t.groupby(by, observed=True, sort=True)
            df = pd.DataFrame({"n_transcripts": g.size(), "n_in_cells": g["in_cell"].sum(),
                               "n_cells": g["cell"].nunique()}).reset_index()
            if "gene" in by:
                df["gene"] = df["gene"].astype(str)
            df = df.set_index(by)
            # zero rows for requested genes / all FOVs of the run
            levels = []
            for k in by:
                if k == "gene":
                    vals = genes if genes is not None else df.index.get_level_values("gene").unique().tolist()
                else:
                    vals = fovs if fovs is not None else sorted(tx["fov"].dropna().unique().tolist())
                levels.append(sorted(vals, key=lambda v: (str(type(v)), v)))
            full = pd.MultiIndex.from_product(levels, names=by) if len(by) > 1 else pd.Index(levels[0], name=by[0])
            df = df.reindex(full, fill_value=0).reset_index()
        else:
            df = pd.DataFrame({"n_transcripts": [len(t)], "n_in_cells": [int(t["in_cell"].sum())],
                               "n_cells": [int(t["cell"].nunique())]})
        df["n_transcripts"] = df["n_transcripts"].astype(np.int64)
        df["n_in_cells"] = df["n_in_cells"].astype(np.int64)
        df["n_cells"] = df["n_cells"].astype(np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            df["fraction_in_cells"] = np.where(df["n_transcripts"] > 0, df["n_in_cells"] / df["n_transcripts"].clip(1),
                                               np.nan)
            df["mean_transcripts_per_cell"] = np.where(df["n_cells"] > 0, df["n_in_cells"] / df["n_cells"].clip(1),
                                                       np.nan)
        df = df[[*by, "n_transcripts", "n_in_cells", "fraction_in_cells", "n_cells", "mean_transcripts_per_cell"]]

    if top_k is not None:
        outer = by[:-1]
        df = df.sort_values([*outer, "n_transcripts", by[-1]], ascending=[True] * len(outer) + [False, True],
                            kind="stable")
        df = df.groupby(outer, sort=False).head(int(top_k)) if outer else df.head(int(top_k))
    return df.reset_index(drop=True)
