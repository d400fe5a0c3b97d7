"""Co-occurrence of cell types over distance, identical in definition to ``squidpy.gr.co_occurrence``.

For thresholds ``t_1 < … < t_L`` (``interval[1:]``) count ordered cell pairs ``(i, j)``, ``i != j``,
with ``|x_i - x_j| <= t_r`` by type pair: ``N[a, b, r]``. With ``S[b, r] = Σ_a N[a, b, r]`` and
``P[b, r] = S[b, r] / Σ_b S[b, r]`` the co-occurrence ratio is::

    occ[i, c, r] = (N[c, i, r] / S[c, r]) / P[i, r]

i.e. P(type i within t_r | a type-c cell) / P(type i within t_r). Values > 1 mean type ``i`` is
found near type ``c`` more often than overall. Like squidpy, coordinates are cast to float32 and the
thresholds are float32; pair distances are compared in float32 (``d² <= t²``) so results match.

Squidpy visits every ordered pair and compares it with every threshold (O(n² · L) work and an
(n, k² · L) int32 buffer, 2 GB at 100k cells). Here a numba kernel visits each unordered pair once:
cells are sorted by (type, x), so a cell's partners of one type form a contiguous x-sorted segment,
trimmed by binary search to |Δx| <= the largest threshold (short explicit distance ranges cost
O(n · neighbours), not O(n²)). Long runs of partners are processed in blocks of 256: d² for the
block, then per threshold a vectorised count of ``d² <= t²`` — only for thresholds between the
block's smallest and largest d² (below: none count, above: all count). Short runs bin each pair
(arithmetic for uniform thresholds, a lookup table over d² otherwise, then exact float32
comparisons) into a per-type-pair histogram that is cumulated at the end. The comparisons are
squidpy's float32 ``d² <= t²``, so the counts are identical. Same float32
arithmetic as squidpy, so the counts (and the ratios) are identical, not just close. A dual-tree
pair count (``cKDTree.count_neighbors``) was tried first and was only ~2x faster than squidpy
because it needs one traversal per type pair and float64 distances disagree with squidpy's float32
comparison for pairs at a threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from servers.common.errors import ToolError
from servers.common.progress import ProgressFn
from servers.spatial.core import SPATIAL_KEY, get_coords, get_labels

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData



@dataclass
class CoOccurrence:
    occ: np.ndarray  # (k, k, L): occ[i, c, r] as in squidpy
    interval: np.ndarray  # (L + 1,) float32 thresholds; occ[..., r] uses interval[r + 1]
    categories: list[str]
    counts: np.ndarray  # (k, k, L) int64 ordered pair counts N[a, b, r]

    def summary(self, max_types: int = 12) -> dict:
        """Compact summary: per type, the partner with the highest ratio at the smallest threshold."""
        k = len(self.categories)
        r0 = 0
        top = {}
        for c in range(min(k, max_types)):
            ratios = self.occ[:, c, r0]
            j = int(np.argmax(ratios))
            top[self.categories[c]] = {"most_enriched_near": self.categories[j], "ratio": round(float(ratios[j]), 4),
                                       "self_ratio": round(float(self.occ[c, c, r0]), 4)}
        # thresholds are float32 (squidpy's dtype): 4 decimals drop the float32 noise from the JSON
        return {"n_types": k, "thresholds": [round(float(t), 4) for t in self.interval[1:]],
                "first_threshold": round(float(self.interval[1]), 4), "at_first_threshold": top}


def default_interval(coords32: np.ndarray, n: int) -> np.ndarray:
    """squidpy's automatic thresholds: ``linspace(min, max, n)`` in float32 where ``min`` is the distance
    between the two cells with the smallest x+y and ``max`` half the distance from the smallest to the
    largest x+y cell."""
    from sklearn.metrics import pairwise_distances

    s = np.sum(coords32, axis=1)
    i0, i1 = np.argpartition(s, 2)[:2]
    imax = np.argmax(s)
    tmax = pairwise_distances(coords32[i0, :].reshape(1, -1), coords32[imax, :].reshape(1, -1))[0, 0] / 2.0
    tmin = pairwise_distances(coords32[i0, :].reshape(1, -1), coords32[i1, :].reshape(1, -1))[0, 0]
    return np.linspace(np.float32(tmin), np.float32(tmax), num=n, dtype=np.float32)


def pair_counts(coords: np.ndarray, codes: np.ndarray, k: int, thresholds: np.ndarray,
                progress: ProgressFn | None = None) -> np.ndarray:
    """Ordered pair counts ``N[a, b, r]`` (``i != j``, float32 ``d² <= thresholds[r]²``) — (k, k, L) int64.

    ``coords`` is cast to float32 first (as squidpy does); ``thresholds`` must be ascending.
    """
    c32 = np.ascontiguousarray(coords, dtype=np.float32)
    t32 = np.asarray(thresholds, dtype=np.float32)
    t2 = (t32 * t32).astype(np.float32)  # squidpy: thresholds = interval[1:] ** 2 in float32
    if len(t2) == 0 or np.any(np.diff(t2) < 0):
        raise ToolError("Co-occurrence thresholds must be a non-empty ascending list.")
    n = len(c32)
    lab = np.asarray(codes, dtype=np.int32)
    # sort by (type, x): for a cell, the partners of one type are a contiguous x-sorted segment, so
    # (1) the histogram row (type_i, type_j) is fixed inside the inner loop and (2) only partners with
    # |x_j - x_i| <= largest threshold are visited (found by binary search)
    order = np.lexsort((c32[:, 0], lab))
    xs = np.ascontiguousarray(c32[order, 0])
    ys = np.ascontiguousarray(c32[order, 1])
    labs = np.ascontiguousarray(lab[order])
    seg = np.concatenate([[0], np.cumsum(np.bincount(labs, minlength=k))]).astype(np.int64)
    # window half-width along x, with slack for float32 rounding of x ± tcut at this coordinate scale
    # (partners inside the slack are visited and decided by the exact comparison)
    xmag = float(np.max(np.abs(xs))) if n else 0.0
    tcut = float(np.sqrt(np.float64(t2[-1]))) * (1 + 1e-5) + 1e-6 + 8 * float(np.finfo(np.float32).eps) * xmag
    t = np.sqrt(t2.astype(np.float64))
    L = len(t2)
    uniform = L == 1 or bool(np.max(np.abs(np.diff(t) - (t[-1] - t[0]) / (L - 1))) <= 1e-3 * max(t[-1] - t[0], 1e-12)
                             and t[-1] > t[0])
    kern = _kernel()
    hist = np.zeros((k, k, L + 1), dtype=np.int64)  # per-bin increments (cumulated below)
    cum = np.zeros((k, k, L), dtype=np.int64)  # already cumulative counts
    n_chunks = 64 if n > 2000 else 1
    # a few rounds so progress / cancellation are checked while the numba kernel runs
    rounds = max(1, min(16, n // 5000))
    for rnd in range(rounds):
        hb, hc = kern(xs, ys, labs, seg, t2, k, n_chunks, rnd, rounds, tcut, uniform)
        hist += hb
        cum += hc
        if progress is not None:
            progress(rnd + 1, rounds, "counting cell pairs")
    tri = np.cumsum(hist[:, :, :-1], axis=2) + cum  # unordered pairs with type_i <= type_j
    return tri + np.transpose(tri, (1, 0, 2))  # -> ordered pairs (the diagonal counts both orders)


_KERNEL = None


def _kernel():
    """Numba kernel: histogram of unordered pairs by (type_i <= type_j, first threshold bin)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    from numba import prange

    from servers.spatial.core import njit_cached

    @njit_cached(parallel=True, fastmath=True, nogil=True)
    def kern(x, y, lab, seg, t2, k, n_chunks, rnd, rounds, tcut, uniform):  # pragma: no cover - compiled
        n = x.shape[0]
        L = t2.shape[0]
        # t2e[r + 1] = t2[r]; t2e[0] = -1 and t2e[L + 1] = inf make the bin search branch-free
        t2e = np.empty(L + 2, dtype=np.float32)
        t2e[0] = -1.0
        t2e[1:L + 1] = t2
        t2e[L + 1] = np.inf
        tt = np.sqrt(t2.astype(np.float64))
        t0 = np.float32(tt[0])
        inv_step = np.float32((L - 1) / (tt[L - 1] - tt[0])) if (uniform and L > 1) else np.float32(0.0)
        # non-uniform thresholds: lookup table over d² -> lowest possible bin
        M = max(4096, 64 * L)
        t2max = t2[L - 1]
        inv = np.float32(M / t2max) if t2max > 0 else np.float32(0.0)
        lut = np.empty(M + 1, dtype=np.int32)
        r = 0
        for q in range(M + 1):
            lo = np.float32(q - 1) / inv if (inv > 0 and q > 0) else np.float32(0.0)  # one cell of slack
            while r < L and t2e[r + 1] < lo:
                r += 1
            lut[q] = r
        stride = L + 1
        out = np.zeros((n_chunks, k * k * stride), dtype=np.int64)
        outc = np.zeros((n_chunks, k * k * L), dtype=np.int64)
        BS = 256
        for c in prange(n_chunks):
            h = out[c]
            hc = outc[c]
            bins = np.empty(BS, dtype=np.int32)
            d2b = np.empty(BS, dtype=np.float32)
            for i in range(c + n_chunks * rnd, n, n_chunks * rounds):
                xi = x[i]
                yi = y[i]
                a = lab[i]
                for b in range(a, k):
                    # partners: type b, x within tcut of xi (and j > i inside the own segment)
                    s0 = seg[b]
                    s1 = seg[b + 1]
                    lo_x = np.float32(np.float64(xi) - tcut)
                    hi_x = np.float32(np.float64(xi) + tcut)
                    j0 = i + 1 if b == a else s0 + np.searchsorted(x[s0:s1], lo_x)
                    j1 = s0 + np.searchsorted(x[s0:s1], hi_x, side="right")
                    base = (a * k + b) * stride
                    while j0 < j1:
                        m = min(BS, j1 - j0)
                        if m >= 64:
                            # long runs: count pairs within each threshold with vectorised compares
                            # (cumulative, no per-pair scatter); once all m are within, the rest are too
                            mn = np.float32(np.inf)
                            mx = np.float32(-1.0)
                            for q in range(m):
                                dx = xi - x[j0 + q]
                                dy = yi - y[j0 + q]
                                d2 = dx * dx + dy * dy
                                d2b[q] = d2
                                mn = min(mn, d2)
                                mx = max(mx, d2)
                            # thresholds below the block's smallest d² count nothing; from the first
                            # threshold >= its largest d² on, all m pairs count
                            r = 0
                            while r < L and t2[r] < mn:
                                r += 1
                            r1 = r
                            while r1 < L and t2[r1] < mx:
                                r1 += 1
                            cbase = (a * k + b) * L
                            while r < r1:
                                tr = t2[r]
                                s = np.int32(0)
                                for q in range(m):
                                    s += np.int32(d2b[q] <= tr)
                                hc[cbase + r] += s
                                r += 1
                            if r1 < L:
                                h[base + r1] += m  # per-bin marker: cumulative sum adds m to bins >= r1
                            j0 += m
                            continue
                        for q in range(m):
                            j = j0 + q
                            dx = xi - x[j]
                            dy = yi - y[j]
                            d2 = dx * dx + dy * dy
                            if uniform:
                                g = (np.sqrt(d2) - t0) * inv_step
                                g = min(max(g, np.float32(0.0)), np.float32(L))
                                bb = np.int32(g)
                            else:
                                fq = d2 * inv
                                bb = lut[M if fq >= M else np.int32(fq)]
                            # exact float32 comparisons (as squidpy): first r with d2 <= t2[r]
                            while bb > 0 and d2 <= t2e[bb]:
                                bb -= 1
                            while d2 > t2e[bb + 1]:
                                bb += 1
                            bins[q] = bb
                        for q in range(m):
                            h[base + bins[q]] += 1
                        j0 += m
        return out.sum(axis=0).reshape(k, k, stride), outc.sum(axis=0).reshape(k, k, L)

    _KERNEL = kern
    return kern


def occurrence_ratios(counts: np.ndarray) -> np.ndarray:
    """squidpy's ratio ``occ[i, c, r] = (N[c, i, r] / S[c, r]) / P[i, r]`` from pair counts (zeros where undefined)."""
    counts = counts.astype(np.float64)
    row_sums = counts.sum(axis=0)  # (k, L): S[b, r]
    totals = row_sums.sum(axis=0)  # (L,)
    with np.errstate(divide="ignore", invalid="ignore"):
        probs = row_sums / totals  # (k, L): P[i, r]
        cond = counts / row_sums[:, None, :]  # [c, i, r] = N[c, i, r] / S[c, r]
        occ = cond.transpose(1, 0, 2) / probs[:, None, :]  # [i, c, r]
    ok = (probs[:, None, :] != 0.0) & (row_sums[None, :, :] != 0.0)
    return np.where(ok, occ, 0.0)


MAX_PAIRS = 2e10  # ~1 minute of pair counting on one core


def co_occurrence_arrays(coords: np.ndarray, codes: np.ndarray, k: int, interval: int | np.ndarray = 50,
                         progress: ProgressFn | None = None, max_pairs: float = MAX_PAIRS
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(occ, interval, counts)`` for coordinates (n, 2) and integer type codes 0..k-1.

    Refuses (ToolError) when the estimated number of cell pairs to visit exceeds ``max_pairs``.
    """
    c32 = np.asarray(coords, dtype=np.float32)
    if isinstance(interval, int | np.integer):
        if interval < 2:
            raise ToolError(f"interval must be >= 2 thresholds; got {interval}.")
        iv = default_interval(c32, int(interval))
    else:
        iv = np.array(sorted(np.asarray(interval, dtype=np.float64).ravel()), dtype=np.float32)
        if len(iv) < 2 or not np.all(np.isfinite(iv)) or iv[0] < 0:
            raise ToolError(
                f"interval must hold >= 2 finite non-negative distances; got {np.asarray(interval).tolist()[:10]}.",
                hint="Pass e.g. [0, 10, 20, 50, 100] (coordinate units) or an integer number of thresholds.",
            )
    n = len(c32)
    xr = float(c32[:, 0].max() - c32[:, 0].min()) if n else 0.0
    est = 0.5 * n * n * (min(1.0, 2.0 * float(iv[-1]) / xr) if xr > 0 else 1.0)
    if est > max_pairs:
        raise ToolError(
            f"Co-occurrence would compare ~{est:.1e} cell pairs (n={n}, largest distance {float(iv[-1]):.4g}); "
            f"the limit is {max_pairs:.0e} (~{max_pairs / 3e8:.0f} s).",
            hint="Pass a shorter explicit distance range (e.g. up to 200 µm), analyse one sample/FOV at a time, "
                 "or subsample cells.",
        )
    counts = pair_counts(c32, codes, k, iv[1:], progress=progress)
    return occurrence_ratios(counts), iv, counts


def co_occurrence(adata: AnnData, cluster_key: str, interval: int | np.ndarray | list[float] = 50,
                  spatial_key: str = SPATIAL_KEY, progress: ProgressFn | None = None,
                  max_pairs: float = MAX_PAIRS) -> CoOccurrence:
    """Co-occurrence ratios of cell types over distance (same definition and numbers as squidpy).

    Args:
        adata: Dataset with coordinates in ``obsm[spatial_key]``.
        cluster_key: Categorical ``obs`` column with cell types.
        interval: Number of thresholds (squidpy's automatic range) or explicit ascending distances in
            the dataset's coordinate units.
        spatial_key: ``obsm`` key with coordinates.
        progress: Optional progress callback.
        max_pairs: Refuse inputs needing more pair comparisons than this (raise it deliberately).

    Returns:
        ``CoOccurrence`` with ``occ[i, c, r]`` for thresholds ``interval[r + 1]``.
    """
    xy = get_coords(adata, spatial_key)
    codes, cats = get_labels(adata, cluster_key, min_types=1)
    occ, iv, counts = co_occurrence_arrays(xy, codes, len(cats), interval, progress=progress, max_pairs=max_pairs)
    return CoOccurrence(occ=occ, interval=iv, categories=cats, counts=counts)
