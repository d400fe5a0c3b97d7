"""Spatial benchmarks against squidpy in the same run: co-occurrence, neighbourhood enrichment, graphs, 1M cells;
transcript_counts against the same per-FOV numbers computed by hand with pandas.

    python benchmarks/spatial.py --quick     # 20k cells, < 1 minute
    python benchmarks/spatial.py             # 20k + 100k vs squidpy, and 1M cells (ours only)

Prints human-readable lines, then all figures as ONE JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")
TYPES = tuple("ABCDEFGHIJ")


def _log(msg: str) -> None:
    print(msg, flush=True)


def make(n: int, seed: int = 0):
    """n cells, 10 types with spatial structure (clustered patches + random), density ~ 5000 cells/mm²."""
    import anndata
    import pandas as pd

    rng = np.random.default_rng(seed)
    side = float(np.sqrt(n / 5000.0) * 1000.0)  # µm
    xy = rng.uniform(0, side, (n, 2))
    patch = (np.floor(xy[:, 0] / 200) + 3 * np.floor(xy[:, 1] / 200)).astype(int) % len(TYPES)
    rand = rng.integers(0, len(TYPES), n)
    t = np.where(rng.uniform(size=n) < 0.6, patch, rand)
    ad = anndata.AnnData(obs=pd.DataFrame({"cell_type": pd.Categorical(np.asarray(TYPES)[t], categories=list(TYPES))},
                                          index=[str(i) for i in range(n)]))
    ad.obsm["spatial"] = xy
    ad.uns["spatial_units"] = "um"
    return ad


CPU: dict[str, float] = {}


def _time(fn, *a, **kw):
    """Wall time; the process CPU time (all threads) of the call is left in CPU['last'].

    Every call starts with numba's default thread count: squidpy's ``parallelize`` sets the calling
    thread's numba threads to 1 and never restores it, which would otherwise slow whatever runs next.
    """
    import numba

    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
    t, c = time.perf_counter(), time.process_time()
    out = fn(*a, **kw)
    CPU["last"] = time.process_time() - c
    return out, time.perf_counter() - t


def warmup():
    import squidpy as sq

    from servers.spatial.cooccurrence import co_occurrence
    from servers.spatial.enrichment import nhood_enrichment
    from servers.spatial.graph import spatial_graph

    ad = make(500, seed=1)
    sq.gr.co_occurrence(ad, "cell_type", copy=True)
    co_occurrence(ad, "cell_type")
    sq.gr.spatial_neighbors(ad, coord_type="generic", n_neighs=6)
    sq.gr.nhood_enrichment(ad, "cell_type", n_perms=5, seed=0, n_jobs=1, copy=True, show_progress_bar=False)
    b = make(500, seed=1)
    spatial_graph(b, "knn", 6)
    nhood_enrichment(b, "cell_type", n_perms=5)
    nhood_enrichment(b, "cell_type", n_perms=5, permutations="squidpy")


def bench_cooccurrence(n: int) -> dict:
    import squidpy as sq

    from servers.spatial.cooccurrence import co_occurrence

    ad = make(n)
    ours, t_ours = _time(co_occurrence, ad, "cell_type")
    c_ours = CPU["last"]
    (occ, iv), t_sq = _time(sq.gr.co_occurrence, ad, "cell_type", copy=True)
    c_sq = CPU["last"]
    d = float(np.max(np.abs(ours.occ - occ)))
    r = {"n_cells": n, "ours_s": round(t_ours, 3), "squidpy_s": round(t_sq, 3), "speedup": round(t_sq / t_ours, 1),
         "ours_cpu_s": round(c_ours, 3), "squidpy_cpu_s": round(c_sq, 3), "speedup_cpu": round(c_sq / c_ours, 1),
         "max_abs_diff": d, "same_interval": bool(np.array_equal(ours.interval, iv))}
    _log(f"co-occurrence {n:>7} cells: ours {t_ours:.2f}s squidpy {t_sq:.2f}s → {t_sq / t_ours:.1f}x, max|Δ|={d:.2e}")
    return r


def bench_enrichment(n: int, n_perms: int = 1000) -> dict:
    import squidpy as sq

    from servers.spatial.enrichment import nhood_enrichment
    from servers.spatial.graph import spatial_graph

    ad = make(n)
    _, t_gsq = _time(sq.gr.spatial_neighbors, ad, coord_type="generic", n_neighs=6)
    b = make(n)
    _, t_g = _time(spatial_graph, b, "knn", 6)
    same_graph = (ad.obsp["spatial_connectivities"] != b.obsp["spatial_connectivities"]).nnz == 0
    (z, _), t_sq = _time(sq.gr.nhood_enrichment, ad, "cell_type", n_perms=n_perms, seed=0, n_jobs=1, copy=True,
                         show_progress_bar=False)
    c_sq = CPU["last"]
    fast, t_fast = _time(nhood_enrichment, b, "cell_type", n_perms=n_perms, seed=0)
    c_fast = CPU["last"]
    exact, t_exact = _time(nhood_enrichment, b, "cell_type", n_perms=n_perms, seed=0, permutations="squidpy")
    analytic, t_an = _time(nhood_enrichment, b, "cell_type", permutations="analytic")
    # Monte-Carlo error of a z-score from n_perms permutations is ~ sqrt((1 + z²/2) / n_perms)
    mc = np.sqrt((1 + z**2 / 2) / n_perms)
    r = {"n_cells": n, "n_perms": n_perms, "n_edges": int(b.obsp["spatial_connectivities"].nnz),
         "squidpy_s": round(t_sq, 3), "ours_fast_s": round(t_fast, 3), "ours_exact_s": round(t_exact, 3),
         "speedup_fast": round(t_sq / t_fast, 1), "speedup_exact": round(t_sq / t_exact, 1),
         "squidpy_cpu_s": round(c_sq, 3), "ours_fast_cpu_s": round(c_fast, 3), "speedup_fast_cpu": round(c_sq / c_fast, 1),
         "exact_max_abs_z_diff": float(np.nanmax(np.abs(exact.zscore - z))),
         "fast_max_abs_z_diff": float(np.nanmax(np.abs(fast.zscore - z))),
         "fast_max_diff_in_mc_se": float(np.nanmax(np.abs(fast.zscore - z) / (np.sqrt(2) * mc))),
         "ours_analytic_s": round(t_an, 3), "speedup_analytic": round(t_sq / t_an, 1),
         "analytic_max_diff_in_mc_se": float(np.nanmax(np.abs(analytic.zscore - z) / mc)),
         "graph_ours_s": round(t_g, 3), "graph_squidpy_s": round(t_gsq, 3), "graph_identical": bool(same_graph)}
    _log(f"nhood enrichment {n:>7} cells, {n_perms} perms: squidpy {t_sq:.2f}s, ours fast {t_fast:.2f}s "
         f"({t_sq / t_fast:.1f}x), ours squidpy-exact {t_exact:.2f}s ({t_sq / t_exact:.1f}x), "
         f"analytic {t_an:.3f}s ({t_sq / t_an:.0f}x); "
         f"exact max|Δz|={r['exact_max_abs_z_diff']:.1e}, fast max|Δz|={r['fast_max_abs_z_diff']:.3f}")
    return r


def _peak_rss_kb() -> float:
    """Peak resident memory of this process in KiB (VmHWM: reset by exec, unlike ru_maxrss)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _million(n: int, q) -> None:
    from servers.spatial.enrichment import nhood_enrichment
    from servers.spatial.graph import spatial_graph

    ad = make(n)
    base = _peak_rss_kb()
    info, t_g = _time(spatial_graph, ad, "knn", 6)
    res, t_e = _time(nhood_enrichment, ad, "cell_type", n_perms=1000, seed=0)
    an, t_a = _time(nhood_enrichment, ad, "cell_type", permutations="analytic")
    peak = _peak_rss_kb()
    q.put({"n_cells": n, "graph_s": round(t_g, 2), "enrichment_1000_perms_s": round(t_e, 2),
           "enrichment_analytic_s": round(t_a, 2),
           "analytic_vs_perm_max_abs_z_diff": float(np.nanmax(np.abs(an.zscore - res.zscore))),
           "n_edges": info.n_edges, "peak_rss_mb": round(peak / 1024, 1), "rss_before_mb": round(base / 1024, 1),
           "self_z_min": float(np.min(np.diag(res.zscore)))})


def bench_million(n: int = 1_000_000) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_million, args=(n, q))
    p.start()
    r = q.get()
    p.join()
    _log(f"{n} cells: knn graph {r['graph_s']}s + enrichment (1000 perms) {r['enrichment_1000_perms_s']}s "
         f"(analytic {r['enrichment_analytic_s']}s), "
         f"peak RSS {r['peak_rss_mb']} MB")
    return r


def bench_transcripts(n_tx: int, folder: Path | None = None) -> dict:
    """transcript_counts per FOV (read + count, all in-cell columns) vs the same numbers by hand in pandas."""
    import tempfile

    import pandas as pd

    from servers.spatial.io import read_transcripts
    from servers.spatial.synthetic import GENES
    from servers.spatial.transcripts import transcript_counts

    rng = np.random.default_rng(0)
    genes = np.array([*GENES, *(f"G{i:03d}" for i in range(950)), *(f"NegPrb{i}" for i in range(10))])
    fov = rng.integers(1, 21, n_tx)
    cid = np.where(rng.uniform(size=n_tx) < 0.75, rng.integers(1, 2000, n_tx), 0)
    tx = pd.DataFrame({"fov": fov, "cell_ID": cid, "x_local_px": rng.uniform(0, 4000, n_tx),
                       "y_local_px": rng.uniform(0, 4000, n_tx), "target": genes[rng.integers(0, len(genes), n_tx)]})
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "Bench_tx_file.csv"
        tx.to_csv(p, index=False)

        def ours():
            t, _ = read_transcripts(d)
            return transcript_counts(t, ["fov"]).set_index("fov")

        def reference():
            t = pd.read_csv(p)
            g = t.groupby("fov")
            inside = t[t.cell_ID > 0].groupby("fov")
            r = pd.DataFrame({"n_transcripts": g.size(), "n_in_cells": inside.size(),
                              "n_cells": inside.cell_ID.nunique()})
            r["fraction_in_cells"] = r.n_in_cells / r.n_transcripts
            r["mean_transcripts_per_cell"] = r.n_in_cells / r.n_cells
            return r

        t_ours = t_ref = float("inf")
        for _ in range(3):  # alternate, best of 3 (the first read also warms the file cache)
            b, t = _time(reference)
            t_ref = min(t_ref, t)
            a, t = _time(ours)
            t_ours = min(t_ours, t)
    same = all(np.allclose(a[c].to_numpy(float), b[c].to_numpy(float)) for c in b.columns)
    res = {"n_transcripts": n_tx, "ours_s": round(t_ours, 3), "pandas_s": round(t_ref, 3),
           "ratio_pandas_over_ours": round(t_ref / t_ours, 2), "identical": bool(same)}
    _log(f"transcript_counts {n_tx:,} tx: ours {t_ours:.2f}s, hand-written pandas {t_ref:.2f}s, identical={same}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="20k cells only (< 1 minute)")
    ap.add_argument("--sizes", type=int, nargs="*", help="cell counts to compare with squidpy (default 20k [100k])")
    ap.add_argument("--million", type=int, default=None, help="cells for the ours-only scale run (default 1M; 0 = skip)")
    args = ap.parse_args()
    import numba

    out: dict = {"benchmark": "spatial", "quick": args.quick, "cpu_count": os.cpu_count(),
                 "numba_threads": numba.get_num_threads()}
    t0 = time.perf_counter()
    warmup()
    out["warmup_s"] = round(time.perf_counter() - t0, 2)
    sizes = args.sizes if args.sizes is not None else ([20_000] if args.quick else [20_000, 100_000])
    out["co_occurrence"] = [bench_cooccurrence(n) for n in sizes]
    out["nhood_enrichment"] = [bench_enrichment(n) for n in sizes]
    out["transcript_counts"] = bench_transcripts(1_000_000 if args.quick else 5_000_000)
    big = args.million if args.million is not None else (0 if args.quick else 1_000_000)
    if big:
        out["million"] = bench_million(big)
    out["total_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
