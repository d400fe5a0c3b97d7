"""Exact unit tests for servers.common.metrics on hand-built label images and point sets."""

from __future__ import annotations

import numpy as np
import pytest

from servers.common.errors import ToolError
from servers.common.metrics import (
    aggregated_jaccard_index,
    average_precision,
    count_error,
    iou_matrix,
    match_instances,
    match_points,
    overlap,
    segmentation_scores,
)


def _two_objects():
    """GT: A = 4x4 square (16 px), B = 2x5 bar (10 px). Pred: A' shifted by one column, B exact, C spurious."""
    gt = np.zeros((10, 12), dtype=np.int32)
    gt[0:4, 0:4] = 7  # non-consecutive ids on purpose
    gt[6:8, 5:10] = 3
    pred = np.zeros_like(gt)
    pred[0:4, 1:5] = 1  # overlaps A in 12 px → IoU 12 / 20 = 0.6
    pred[6:8, 5:10] = 2  # identical to B → IoU 1
    pred[0:2, 9:11] = 5  # 4 px, overlaps nothing
    return gt, pred


def test_iou_matrix_exact():
    gt, pred = _two_objects()
    ov = overlap(gt, pred)
    # gt ids sorted: 3 (B) → row 0, 7 (A) → row 1; pred ids 1, 2, 5 → cols 0, 1, 2
    assert ov.area_gt.tolist() == [10, 16]
    assert ov.area_pred.tolist() == [16, 10, 4]
    dense = iou_matrix(gt, pred).toarray()
    np.testing.assert_allclose(dense, [[0, 1.0, 0], [0.6, 0, 0]])
    assert ov.intersection.toarray().tolist() == [[0, 10, 0], [12, 0, 0]]


def test_match_and_ap_at_thresholds():
    gt, pred = _two_objects()
    m = match_instances(gt, pred, 0.5)
    assert (m.tp, m.fp, m.fn) == (2, 1, 0)
    assert m.ap == pytest.approx(2 / 3)
    assert m.precision == pytest.approx(2 / 3)
    assert m.recall == 1.0
    assert m.f1 == pytest.approx(0.8)
    assert m.mean_matched_iou == pytest.approx(0.8)
    m75 = match_instances(gt, pred, 0.75)
    assert (m75.tp, m75.fp, m75.fn) == (1, 2, 1)
    assert m75.ap == pytest.approx(1 / 4)
    assert sorted(map(tuple, m75.pairs.tolist())) == [(0, 1)]
    aps = average_precision(gt, pred, thresholds=(0.5, 0.6, 0.61, 1.0))
    assert aps == pytest.approx({0.5: 2 / 3, 0.6: 2 / 3, 0.61: 1 / 4, 1.0: 1 / 4})


def test_aji_exact():
    gt, pred = _two_objects()
    # A↔A': I=12, U=20 ; B↔B: I=10, U=10 ; C unused: +4 → 22 / 34
    assert aggregated_jaccard_index(gt, pred) == pytest.approx(22 / 34)
    # a GT object with no overlap adds its area to the denominator only
    gt2 = gt.copy()
    gt2[9, 0:3] = 9
    assert aggregated_jaccard_index(gt2, pred) == pytest.approx(22 / 37)


def test_optimal_matching_beats_greedy_at_low_threshold():
    """At IoU ≥ 0.3 greedy (best IoU first) takes g1↔p1 and leaves g2 alone; the optimum matches both."""
    gt = np.zeros((1, 14), dtype=np.int32)
    gt[0, 0:10] = 1  # g1, 10 px
    gt[0, 10:14] = 2  # g2, 4 px
    pred = np.zeros_like(gt)
    pred[0, 4:14] = 1  # p1: IoU(g1) = 6/14, IoU(g2) = 4/10
    pred[0, 0:4] = 2  # p2: IoU(g1) = 4/10
    m = match_instances(gt, pred, 0.3)
    assert m.tp == 2 and m.fp == 0 and m.fn == 0
    assert sorted(map(tuple, m.pairs.tolist())) == [(0, 1), (1, 0)]
    np.testing.assert_allclose(m.ious, [0.4, 0.4])
    # above 0.4 only g1↔p1 qualifies
    m2 = match_instances(gt, pred, 0.41)
    assert m2.tp == 1 and m2.pairs.tolist() == [[0, 0]]


def test_segmentation_scores_and_count_error():
    gt, pred = _two_objects()
    s = segmentation_scores(gt, pred, thresholds=(0.5, 0.75))
    assert s["n_gt"] == 2 and s["n_pred"] == 3
    assert s["count_error"] == 1 and s["relative_count_error"] == pytest.approx(0.5)
    assert s["ap"] == pytest.approx({"0.5": 2 / 3, "0.75": 0.25})
    assert s["tp"] == {"0.5": 2, "0.75": 1}
    assert s["aji"] == pytest.approx(22 / 34)
    assert count_error(gt, pred) == 1


def test_identical_and_empty():
    gt, _ = _two_objects()
    perm = np.where(gt == 7, 100, np.where(gt == 3, 50, 0)).astype(np.uint16)  # relabelled copy
    s = segmentation_scores(gt, perm)
    assert s["ap"] == {"0.5": 1.0, "0.75": 1.0, "0.9": 1.0} and s["aji"] == 1.0
    z = np.zeros_like(gt)
    assert match_instances(z, z).ap == 1.0 and aggregated_jaccard_index(z, z) == 1.0
    m = match_instances(gt, z)
    assert (m.tp, m.fn, m.ap, m.recall) == (0, 2, 0.0, 0.0)
    assert aggregated_jaccard_index(gt, z) == 0.0
    assert match_instances(z, gt).fp == 2


def test_bad_label_inputs():
    gt, pred = _two_objects()
    with pytest.raises(ToolError, match="shape"):
        match_instances(gt, pred[:5])
    with pytest.raises(ToolError, match="dtype"):
        match_instances(gt.astype(float), pred)
    with pytest.raises(ToolError, match="negative"):
        match_instances(gt - 1, pred)
    with pytest.raises(ToolError, match="threshold"):
        match_instances(gt, pred, 0.0)


def test_large_random_matches_brute_force():
    """Sparse IoU equals a brute-force per-pair computation on a random tiling."""
    rng = np.random.default_rng(0)
    gt = np.repeat(np.repeat(rng.integers(0, 30, (20, 20)), 5, 0), 5, 1)
    pred = np.roll(gt, 2, axis=1)
    pred[pred == 4] = 0
    dense = iou_matrix(gt, pred).toarray()
    g_ids = np.unique(gt[gt > 0])
    p_ids = np.unique(pred[pred > 0])
    for i, a in enumerate(g_ids):
        for j, b in enumerate(p_ids):
            inter = np.sum((gt == a) & (pred == b))
            union = np.sum((gt == a) | (pred == b))
            assert dense[i, j] == pytest.approx(inter / union)


# --------------------------------------------------------------------------- points


def test_points_one_to_one_within_radius():
    gt = np.array([[0, 0], [10, 10], [20, 20], [50, 50]], dtype=float)
    pred = np.array([[0, 1], [0, 2], [10, 12.5], [20, 20], [80, 80]], dtype=float)
    r = match_points(gt, pred, radius=3)
    # (0,0)↔(0,1) d=1 ; (10,10)↔(10,12.5) d=2.5 ; (20,20)↔(20,20) d=0 ; (0,2) duplicate → FP
    assert (r.tp, r.fp, r.fn) == (3, 2, 1)
    assert r.precision == pytest.approx(3 / 5) and r.recall == pytest.approx(3 / 4)
    assert r.f1 == pytest.approx(6 / 9)
    assert sorted(map(tuple, r.pairs.tolist())) == [(0, 0), (1, 2), (2, 3)]
    assert r.mean_distance == pytest.approx(3.5 / 3)
    assert match_points(gt, pred, radius=2).tp == 2  # 2.5 is now too far


def test_points_hungarian_maximises_matches():
    """Greedy nearest-first would pair g0↔p1 (d=1) and leave g1 unmatched; optimal matches both."""
    gt = np.array([[0, 0], [0, 2.5]])
    pred = np.array([[0, -1.5], [0, 1]])
    r = match_points(gt, pred, radius=2)
    assert r.tp == 2 and sorted(map(tuple, r.pairs.tolist())) == [(0, 0), (1, 1)]
    assert r.distances.sum() == pytest.approx(3.0)


def test_points_empty_and_bad():
    e = np.zeros((0, 2))
    assert match_points(e, e).f1 == 1.0
    r = match_points(np.array([[1.0, 1.0]]), e)
    assert (r.fn, r.recall, r.f1) == (1, 0.0, 0.0)
    with pytest.raises(ToolError, match=r"\(N, 2\)"):
        match_points(np.zeros((3, 3)), e)
    with pytest.raises(ToolError, match="radius"):
        match_points(e, e, radius=0)


@pytest.mark.parametrize("dtype", [bool, np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int64])
def test_any_integer_dtype(dtype):
    a = np.zeros((6, 6), dtype=np.int32)
    a[1:3, 1:3] = 1
    m = match_instances(a.astype(dtype), a)
    assert (m.tp, m.fp, m.fn) == (1, 0, 0)


def test_huge_label_ids_use_sort_path():
    gt, pred = _two_objects()
    big = gt.astype(np.int64) * 10**12  # ids far beyond the lookup-table range
    assert average_precision(big, pred, (0.5,)) == pytest.approx({0.5: 2 / 3})
    assert aggregated_jaccard_index(big, pred) == pytest.approx(22 / 34)
