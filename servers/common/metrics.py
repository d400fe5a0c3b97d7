"""Accuracy metrics for instance segmentation and spot detection, against exact ground truth.

Instance segmentation (label images, 0 = background, any positive ids):

    iou = iou_matrix(gt, pred)                       # sparse (n_gt, n_pred), no per-object loops
    m = match_instances(gt, pred, iou_threshold=0.5) # optimal one-to-one matching
    s = segmentation_scores(gt, pred)                # AP@{0.5,0.75,0.9}, P/R/F1, AJI, count error

``ap`` follows the Cellpose / StarDist definition ``AP = TP / (TP + FP + FN)`` at an IoU threshold;
``aji`` is the aggregated Jaccard index of Kumar et al. (2017, MoNuSeg).

Spots / points (``(N, 2)`` arrays of ``(row, col)`` in pixels):

    r = match_points(gt_rc, pred_rc, radius_px=3)    # Hungarian one-to-one within radius → P/R/F1

as used for smFISH spot detection scoring (deepBlink / Polaris F1 within a distance cutoff).

Conventions: when both ground truth and prediction are empty every score is 1.0 (perfect); a
ratio with a zero denominator otherwise is 0.0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import sparse
from scipy.optimize import linear_sum_assignment

from servers.common.errors import ToolError

DEFAULT_THRESHOLDS = (0.5, 0.75, 0.9)


# --------------------------------------------------------------------------- label images


def _check_labels(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise ToolError(f"Ground truth shape {gt.shape} differs from prediction shape {pred.shape}.",
                        hint="Pass two label images of the same (H, W) size.")
    for name, a in (("ground truth", gt), ("prediction", pred)):
        if a.dtype.kind not in "iub":
            raise ToolError(f"The {name} label image has dtype {a.dtype}; expected integers.",
                            hint="Pass an integer instance label image (0 = background, 1..N = objects).")
        if a.dtype.kind == "i" and a.size and a.min() < 0:
            raise ToolError(f"The {name} label image has negative labels.",
                            hint="Use 0 for background and positive ids for objects.")
    return gt, pred


def _sequential(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Relabel to 0..n (0 stays background, ids keep their order), returning the flat array and n.

    Uses an O(N) lookup table when the largest id is not huge, else a sort (``np.unique``).
    """
    flat = labels.ravel()
    if flat.size == 0:
        return flat.astype(np.int64), 0
    mx = int(flat.max())
    if mx <= max(1 << 22, 4 * flat.size):
        if flat.dtype.kind == "b" or flat.dtype.itemsize > np.dtype(np.intp).itemsize or flat.dtype == np.uint64:
            flat = flat.astype(np.intp)
        present = np.bincount(flat, minlength=mx + 1) > 0
        present[0] = False
        lut = np.cumsum(present, dtype=np.int64)
        return lut[flat], int(lut[-1])
    uniq, inv = np.unique(flat, return_inverse=True)
    if uniq[0] == 0:
        return inv.astype(np.int64), int(uniq.size - 1)
    return inv.astype(np.int64) + 1, int(uniq.size)


def _contingency(g: np.ndarray, p: np.ndarray, ng: int, npred: int) -> sparse.csr_matrix:
    """(ng+1, npred+1) pixel-count table of two relabelled flat arrays."""
    ncols = npred + 1
    key = g * ncols + p
    cells = (ng + 1) * ncols
    if cells <= max(1 << 24, 4 * key.size):
        counts = np.bincount(key, minlength=cells)
        nz = np.flatnonzero(counts)
        vals = counts[nz]
    else:
        nz, vals = np.unique(key, return_counts=True)
    return sparse.csr_matrix((vals, (nz // ncols, nz % ncols)), shape=(ng + 1, ncols))


@dataclass
class Overlap:
    """Pixel overlaps between ``n_gt`` ground-truth and ``n_pred`` predicted objects.

    ``intersection`` and ``iou`` are sparse CSR matrices of shape (n_gt, n_pred) (background
    excluded); ``area_gt`` / ``area_pred`` are object areas in pixels (index i ↔ object i+1 after
    relabelling to consecutive ids in increasing order of the original ids).
    """

    intersection: sparse.csr_matrix
    iou: sparse.csr_matrix
    area_gt: np.ndarray
    area_pred: np.ndarray

    @property
    def n_gt(self) -> int:
        return int(self.area_gt.size)

    @property
    def n_pred(self) -> int:
        return int(self.area_pred.size)


def overlap(gt: np.ndarray, pred: np.ndarray) -> Overlap:
    """Sparse contingency table of two label images and the IoU of every overlapping pair."""
    gt, pred = _check_labels(gt, pred)
    g, ng = _sequential(gt)
    p, npred = _sequential(pred)
    table = _contingency(g, p, ng, npred)
    area_gt = np.asarray(table.sum(axis=1)).ravel()[1:]
    area_pred = np.asarray(table.sum(axis=0)).ravel()[1:]
    inter = table[1:, 1:].tocoo()
    union = area_gt[inter.row] + area_pred[inter.col] - inter.data
    iou = sparse.coo_matrix((inter.data / union, (inter.row, inter.col)), shape=(ng, npred)).tocsr()
    return Overlap(inter.tocsr(), iou, area_gt, area_pred)


def iou_matrix(gt: np.ndarray, pred: np.ndarray) -> sparse.csr_matrix:
    """IoU of every (ground-truth object, predicted object) pair as a sparse (n_gt, n_pred) matrix."""
    return overlap(gt, pred).iou


@dataclass
class InstanceMatch:
    """Optimal one-to-one matching at one IoU threshold.

    ``pairs`` holds (gt_index, pred_index) into the relabelled objects (0-based), ``ious`` their IoU.
    """

    iou_threshold: float
    n_gt: int
    n_pred: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    ap: float
    mean_matched_iou: float
    pairs: np.ndarray = field(repr=False)
    ious: np.ndarray = field(repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("pairs")
        d.pop("ious")
        return d


def _ratio(num: float, den: float, both_empty: bool) -> float:
    if den == 0:
        return 1.0 if both_empty else 0.0
    return float(num) / float(den)


def _match_from_iou(iou: sparse.csr_matrix, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-cardinality one-to-one matching among pairs with IoU ≥ threshold, ties → higher IoU.

    Same objective as Cellpose's ``_true_positive``: cost = -(iou ≥ thr) - iou / (2 n_min), solved
    with the Hungarian algorithm on the sub-matrix of objects that have any candidate.
    """
    cand = iou.tocoo()
    keep = cand.data >= threshold
    rows, cols, vals = cand.row[keep], cand.col[keep], cand.data[keep]
    if rows.size == 0:
        return np.zeros((0, 2), dtype=np.int64), np.zeros(0)
    ur, ri = np.unique(rows, return_inverse=True)
    uc, ci = np.unique(cols, return_inverse=True)
    if ur.size == rows.size and uc.size == cols.size:  # every candidate is unique (always when thr > 0.5)
        return np.stack([rows, cols], axis=1).astype(np.int64), vals
    n_min = min(ur.size, uc.size)
    cost = np.zeros((ur.size, uc.size))
    cost[ri, ci] = -1.0 - vals / (2.0 * n_min)
    r, c = linear_sum_assignment(cost)
    ok = cost[r, c] < 0
    r, c = r[ok], c[ok]
    sub = np.zeros((ur.size, uc.size))
    sub[ri, ci] = vals
    return np.stack([ur[r], uc[c]], axis=1).astype(np.int64), sub[r, c]


def _instance_match(ov: Overlap, threshold: float) -> InstanceMatch:
    if not 0.0 < threshold <= 1.0:
        raise ToolError(f"IoU threshold {threshold} is outside (0, 1].", hint="Use e.g. 0.5.")
    pairs, ious = _match_from_iou(ov.iou, threshold)
    tp = int(len(pairs))
    fp = ov.n_pred - tp
    fn = ov.n_gt - tp
    empty = ov.n_gt == 0 and ov.n_pred == 0
    precision = _ratio(tp, tp + fp, empty)
    recall = _ratio(tp, tp + fn, empty)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn, empty)
    ap = _ratio(tp, tp + fp + fn, empty)
    return InstanceMatch(float(threshold), ov.n_gt, ov.n_pred, tp, fp, fn, precision, recall, f1, ap,
                         float(ious.mean()) if ious.size else 0.0, pairs, ious)


def match_instances(gt: np.ndarray, pred: np.ndarray, iou_threshold: float = 0.5) -> InstanceMatch:
    """Optimal one-to-one matching of predicted to ground-truth objects at ``iou_threshold``.

    Returns TP/FP/FN, precision, recall, F1 and ``ap = TP / (TP + FP + FN)`` (Cellpose definition).
    """
    return _instance_match(overlap(gt, pred), iou_threshold)


def average_precision(gt: np.ndarray, pred: np.ndarray,
                      thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict[float, float]:
    """``{threshold: AP}`` with AP = TP / (TP + FP + FN) at each IoU threshold."""
    ov = overlap(gt, pred)
    return {float(t): _instance_match(ov, t).ap for t in thresholds}


def aggregated_jaccard_index(gt: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017).

    Each ground-truth object G is paired with the predicted object S of highest IoU; the index is
    Σ|G∩S| / (Σ|G∪S| + Σ|unused S|), where a G with no overlapping S adds |G| to the denominator and
    every predicted object never chosen adds its area.
    """
    return _aji(overlap(gt, pred))


def _aji(ov: Overlap) -> float:
    if ov.n_gt == 0:
        return 1.0 if ov.n_pred == 0 else 0.0
    iou = ov.iou
    best = np.asarray(iou.argmax(axis=1)).ravel() if ov.n_pred else np.zeros(ov.n_gt, dtype=np.int64)
    best_iou = np.asarray(iou.max(axis=1).toarray()).ravel() if ov.n_pred else np.zeros(ov.n_gt)
    has = best_iou > 0
    inter = np.zeros(ov.n_gt)
    if has.any():
        inter[has] = np.asarray(ov.intersection[np.flatnonzero(has), best[has]]).ravel()
    union = ov.area_gt.astype(float).copy()
    union[has] = ov.area_gt[has] + ov.area_pred[best[has]] - inter[has]
    used = np.zeros(ov.n_pred, dtype=bool)
    used[best[has]] = True
    denom = union.sum() + ov.area_pred[~used].sum()
    return float(inter.sum() / denom) if denom else 0.0


def segmentation_scores(gt: np.ndarray, pred: np.ndarray,
                        thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict:
    """Everything in one JSON-able dict: per-threshold AP/P/R/F1, AJI, counts and count error.

    Keys: ``n_gt``, ``n_pred``, ``count_error`` (n_pred - n_gt), ``relative_count_error``,
    ``aji``, ``mean_matched_iou`` (at the first threshold), ``ap`` ``{thr: AP}``, and per threshold
    ``precision``/``recall``/``f1``/``tp``/``fp``/``fn`` dicts keyed by threshold (as strings).
    """
    ov = overlap(gt, pred)
    matches = [_instance_match(ov, t) for t in thresholds]
    out = {
        "n_gt": ov.n_gt,
        "n_pred": ov.n_pred,
        "count_error": ov.n_pred - ov.n_gt,
        "relative_count_error": (ov.n_pred - ov.n_gt) / ov.n_gt if ov.n_gt else float(ov.n_pred > 0),
        "aji": _aji(ov),
        "mean_matched_iou": matches[0].mean_matched_iou if matches else 0.0,
    }
    for key in ("ap", "precision", "recall", "f1", "tp", "fp", "fn"):
        out[key] = {f"{m.iou_threshold:g}": getattr(m, key) for m in matches}
    return out


def count_error(gt: np.ndarray, pred: np.ndarray) -> int:
    """Number of predicted objects minus number of ground-truth objects."""
    gt, pred = _check_labels(gt, pred)
    n = lambda a: int(np.count_nonzero(np.unique(a)))  # noqa: E731
    return n(pred) - n(gt)


# --------------------------------------------------------------------------- points / spots


@dataclass
class PointMatch:
    """One-to-one matching of predicted points to ground-truth points within ``radius``."""

    radius: float
    n_gt: int
    n_pred: int
    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float
    mean_distance: float
    pairs: np.ndarray = field(repr=False)
    distances: np.ndarray = field(repr=False)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("pairs")
        d.pop("distances")
        return d


def _check_points(a, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=float)
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ToolError(f"{name} points have shape {arr.shape}; expected (N, 2).",
                        hint="Pass an (N, 2) array of (row, col) coordinates in pixels.")
    if not np.isfinite(arr).all():
        raise ToolError(f"{name} points contain NaN or infinite coordinates.", hint="Drop them first.")
    return arr


def match_points(gt: np.ndarray, pred: np.ndarray, radius: float = 3.0) -> PointMatch:
    """Maximum one-to-one matching of points within ``radius`` (same units as the coordinates).

    Among matchings with the most pairs, the one with the smallest total distance is chosen
    (Hungarian algorithm on the distance matrix with pairs farther than ``radius`` forbidden), as in
    deepBlink / Polaris spot-detection F1. ``pairs`` are (gt_index, pred_index).
    """
    if not radius > 0:
        raise ToolError(f"Match radius {radius} must be > 0.", hint="Use e.g. 3 (pixels).")
    g = _check_points(gt, "Ground-truth")
    p = _check_points(pred, "Predicted")
    pairs = np.zeros((0, 2), dtype=np.int64)
    dists = np.zeros(0)
    if len(g) and len(p):
        from scipy.spatial import cKDTree

        sdm = cKDTree(g).sparse_distance_matrix(cKDTree(p), radius, output_type="ndarray")
        rows, cols, vals = sdm["i"], sdm["j"], sdm["v"]  # includes exact-zero distances
        if rows.size:
            ur, ri = np.unique(rows, return_inverse=True)
            uc, ci = np.unique(cols, return_inverse=True)
            big = radius * (min(ur.size, uc.size) + 1) + 1.0
            cost = np.full((ur.size, uc.size), big)
            np.minimum.at(cost, (ri, ci), vals)
            r, c = linear_sum_assignment(cost)
            ok = cost[r, c] <= radius
            pairs = np.stack([ur[r[ok]], uc[c[ok]]], axis=1).astype(np.int64)
            dists = cost[r[ok], c[ok]]
    tp = len(pairs)
    fp, fn = len(p) - tp, len(g) - tp
    empty = len(g) == 0 and len(p) == 0
    return PointMatch(float(radius), len(g), len(p), tp, fp, fn, _ratio(tp, tp + fp, empty),
                      _ratio(tp, tp + fn, empty), _ratio(2 * tp, 2 * tp + fp + fn, empty),
                      float(dists.mean()) if dists.size else 0.0, pairs, dists)

