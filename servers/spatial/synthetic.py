"""Synthetic platform outputs with exact ground truth (CosMx flat files, Xenium, MERFISH) for tests/demos.

Each writer produces files in the platform's real column layout and returns the truth: counts per
cell and gene, cell areas / centroids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

GENES = ("CD3E", "CD8A", "EPCAM", "KRT8", "MS4A1", "COL1A1", "PTPRC", "VIM")


def _disc_labels(shape: tuple[int, int], n: int, rng: np.random.Generator, rmin: int = 8, rmax: int = 16) -> np.ndarray:
    h, w = shape
    labels = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[:h, :w]
    placed = 0
    tries = 0
    while placed < n and tries < n * 50:
        tries += 1
        r = rng.integers(rmin, rmax + 1)
        cy, cx = rng.integers(r, h - r), rng.integers(r, w - r)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if labels[disc].any():
            continue
        placed += 1
        labels[disc] = placed
    return labels


def write_cosmx(folder: str | Path, *, n_fovs: int = 2, shape: tuple[int, int] = (200, 240), cells_per_fov: int = 12,
                flip_y: bool = False, offset: tuple[int, int] = (0, 0), seed: int = 0, prefix: str = "Run1") -> dict:
    """CosMx flat files: ``{prefix}_tx_file.csv``, ``{prefix}_fov_positions_file.csv``, ``CellLabels/CellLabels_F###.tif``.

    Transcripts of cell ``c`` lie on pixels of ``c`` (cell_ID = c); others have cell_ID 0. Local pixel
    coordinates: x = x0 + col + u, y = y0 + row + u (or with rows flipped when ``flip_y``).
    Returns truth: ``counts`` {(fov, cell_ID): {gene: n}}, ``area_px``, ``centroid_local`` (x, y),
    ``fov_positions``, ``n_outside``, ``n_neg``.
    """
    import pandas as pd
    import tifffile

    folder = Path(folder)
    (folder / "CellLabels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    truth: dict = {"counts": {}, "area_px": {}, "centroid_local": {}, "fov_positions": {}, "n_outside": 0, "n_neg": 0}
    fovpos = []
    h, w = shape
    x0, y0 = offset
    for f in range(1, n_fovs + 1):
        labels = _disc_labels(shape, cells_per_fov, rng)
        tifffile.imwrite(folder / "CellLabels" / f"CellLabels_F{f:03d}.tif", labels.astype(np.uint32))
        gx, gy = 10000.0 * f + 123.5, -5000.0 * f
        fovpos.append({"fov": f, "x_global_px": gx, "y_global_px": gy})
        truth["fov_positions"][f] = (gx, gy)

        def to_local(r, c, _f=f):
            u = rng.uniform(0.05, 0.95, (2, len(r)))
            y_img = (h - 1 - r) if flip_y else r
            return x0 + c + u[0], y0 + y_img + u[1]

        for cid in range(1, labels.max() + 1):
            rr, cc = np.nonzero(labels == cid)
            truth["area_px"][(f, cid)] = len(rr)
            yimg = (h - 1 - rr.mean()) if flip_y else rr.mean()
            truth["centroid_local"][(f, cid)] = (x0 + cc.mean() + 0.5, y0 + yimg + 0.5)
            n_tx = int(rng.integers(5, 60))
            pick = rng.integers(0, len(rr), n_tx)
            genes = rng.choice(GENES, n_tx)
            xl, yl = to_local(rr[pick], cc[pick])
            cnt: dict[str, int] = {}
            for g, a, b in zip(genes, xl, yl, strict=True):
                cnt[str(g)] = cnt.get(str(g), 0) + 1
                comp = rng.choice(["Nuclear", "Cytoplasm", "Membrane"])
                rows.append((f, cid, a + gx, b + gy, a, b, int(rng.integers(0, 8)), str(g), comp))
            n_neg = int(rng.integers(0, 3))
            for _ in range(n_neg):
                i = rng.integers(0, len(rr))
                xl1, yl1 = to_local(rr[i:i + 1], cc[i:i + 1])
                rows.append((f, cid, xl1[0] + gx, yl1[0] + gy, xl1[0], yl1[0], 0, f"NegPrb{rng.integers(1, 10)}", "Nuclear"))
            truth["n_neg"] += n_neg
            truth["counts"][(f, cid)] = cnt
        rr, cc = np.nonzero(labels == 0)
        pick = rng.integers(0, len(rr), 150)
        xl, yl = to_local(rr[pick], cc[pick])
        for a, b in zip(xl, yl, strict=True):
            rows.append((f, 0, a + gx, b + gy, a, b, 1, str(rng.choice(GENES)), "0"))
        truth["n_outside"] += 150
    tx = pd.DataFrame(rows, columns=["fov", "cell_ID", "x_global_px", "y_global_px", "x_local_px", "y_local_px", "z",
                                     "target", "CellComp"])
    tx = tx.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    tx.to_csv(folder / f"{prefix}_tx_file.csv", index=False)
    pd.DataFrame(fovpos).to_csv(folder / f"{prefix}_fov_positions_file.csv", index=False)
    return truth


def write_xenium(folder: str | Path, *, n_cells: int = 30, seed: int = 0, parquet: bool = False) -> dict:
    """Xenium ``cells.csv.gz`` (or .parquet) + ``transcripts.csv.gz`` in 10x's column layout.

    Truth: ``counts`` {cell_id: {gene: n}} counting only qv >= 20 gene transcripts; low-qv,
    UNASSIGNED and NegControlProbe_* transcripts are present but must not count.
    """
    import pandas as pd

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = [f"aaa{i:05d}-1" for i in range(n_cells)]
    xy = rng.uniform(0, 500, (n_cells, 2))
    cells = pd.DataFrame({"cell_id": ids, "x_centroid": xy[:, 0], "y_centroid": xy[:, 1],
                          "transcript_counts": 0, "control_probe_counts": 0, "control_codeword_counts": 0,
                          "unassigned_codeword_counts": 0, "deprecated_codeword_counts": 0, "total_counts": 0,
                          "cell_area": rng.uniform(40, 200, n_cells), "nucleus_area": rng.uniform(10, 40, n_cells)})
    rows = []
    truth: dict = {"counts": {c: {} for c in ids}, "xy": xy, "area": cells["cell_area"].to_numpy()}
    tid = 0
    for i, c in enumerate(ids):
        for _ in range(int(rng.integers(3, 40))):
            g = str(rng.choice(GENES))
            qv = float(rng.choice([10.0, 25.0, 40.0]))
            rows.append((tid, c, int(rng.integers(0, 2)), g, xy[i, 0] + rng.normal(), xy[i, 1] + rng.normal(),
                         rng.uniform(0, 10), qv))
            tid += 1
            if qv >= 20:
                truth["counts"][c][g] = truth["counts"][c].get(g, 0) + 1
        rows.append((tid, c, 0, "NegControlProbe_00042", xy[i, 0], xy[i, 1], 1.0, 40.0))
        tid += 1
    for _ in range(40):
        rows.append((tid, "UNASSIGNED", 0, str(rng.choice(GENES)), *rng.uniform(0, 500, 2), 1.0, 40.0))
        tid += 1
    tx = pd.DataFrame(rows, columns=["transcript_id", "cell_id", "overlaps_nucleus", "feature_name", "x_location",
                                     "y_location", "z_location", "qv"])
    if parquet:  # older Xenium releases store ids/feature names as bytes in parquet
        cells.to_parquet(folder / "cells.parquet")
        tx["cell_id"] = tx["cell_id"].map(str.encode)
        tx["feature_name"] = tx["feature_name"].map(str.encode)
        tx.to_parquet(folder / "transcripts.parquet")
    else:
        cells.to_csv(folder / "cells.csv.gz", index=False)
        tx.to_csv(folder / "transcripts.csv.gz", index=False)
    return truth


def write_merfish(folder: str | Path, *, n_cells: int = 40, seed: int = 0) -> dict:
    """Vizgen ``cell_by_gene.csv`` (with Blank-* columns) + ``cell_metadata.csv`` (EntityID index)."""
    import pandas as pd

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = (np.arange(n_cells) + 1_000_000_000_000).astype(np.int64)
    counts = rng.poisson(3, (n_cells, len(GENES)))
    blanks = rng.poisson(0.2, (n_cells, 3))
    cbg = pd.DataFrame(counts, columns=list(GENES))
    for j in range(3):
        cbg[f"Blank-{j}"] = blanks[:, j]
    cbg.insert(0, "cell", ids)
    cbg.to_csv(folder / "cell_by_gene.csv", index=False)
    xy = rng.uniform(0, 800, (n_cells, 2))
    md = pd.DataFrame({"EntityID": ids, "fov": rng.integers(0, 4, n_cells), "volume": rng.uniform(200, 900, n_cells),
                       "center_x": xy[:, 0], "center_y": xy[:, 1], "min_x": xy[:, 0] - 5, "max_x": xy[:, 0] + 5,
                       "min_y": xy[:, 1] - 5, "max_y": xy[:, 1] + 5})
    # metadata in a different row order than the counts: the reader must join on the id
    md.iloc[::-1].to_csv(folder / "cell_metadata.csv", index=False)
    return {"ids": [str(i) for i in ids], "counts": counts, "blanks": blanks, "xy": xy}
