"""Metrics of dynaguide.eval (SPEC §6): hand-computed cases, properties, oracles."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import ndimage

from dynaguide.eval import (
    bsds_image_scores,
    bsds_scores,
    coco_scores,
    coco_scores_per_image_matching,
    confusion_matrix,
    hungarian_match,
    relabel_connected_components,
    resize_nearest,
    segment_best_iou,
    voc_image_scores,
    voc_scores,
)
from dynaguide.eval import metrics as M

# Hand case A (4x4). GT segments: S1 = 4 px, S2 = 4 px, S3 = 8 px.
GT_A = np.array(
    [
        [1, 1, 2, 2],
        [1, 1, 2, 2],
        [3, 3, 3, 3],
        [3, 3, 3, 3],
    ]
)
# Predicted regions: P0 = 6 px, P1 = 4 px in TWO pieces (top-right 2 px + bottom-right 2 px),
# P2 = 6 px.
PRED_A = np.array(
    [
        [0, 0, 0, 1],
        [0, 0, 0, 1],
        [2, 2, 2, 2],
        [2, 2, 1, 1],
    ]
)
# Raw:
#   S1: |S1 ∩ P0| = 4 -> 4 / (4 + 6 - 4) = 4/6 = 2/3
#   S2: ∩P0 = 2 -> 2 / (4 + 6 - 2) = 1/4 ; ∩P1 = 2 -> 2 / (4 + 4 - 2) = 1/3   => best 1/3
#   S3: ∩P2 = 6 -> 6 / (8 + 6 - 6) = 3/4 ; ∩P1 = 2 -> 2 / (8 + 4 - 2) = 1/5  => best 3/4
#   mean = (2/3 + 1/3 + 3/4) / 3 = 1.75 / 3 = 0.583333...
BEST_A = [2 / 3, 1 / 3, 3 / 4]
# After 8-connected CC relabelling, P1 splits into P1a (top-right, 2 px) and P1b (2 px):
#   S2: ∩P1a = 2 -> 2 / (4 + 2 - 2) = 1/2 (beats 1/4)      => best 1/2
#   S3: ∩P1b = 2 -> 2 / (8 + 2 - 2) = 1/4 (loses to 3/4)   => best 3/4
#   mean = (2/3 + 1/2 + 3/4) / 3 = (8 + 6 + 9) / 36 = 23/36
BEST_A_CC = [2 / 3, 1 / 2, 3 / 4]

# A coarser second annotation of the same image: T1 = rows 0-1 (8 px), T2 = rows 2-3 (8 px).
GT_B = np.array(
    [
        [1, 1, 1, 1],
        [1, 1, 1, 1],
        [2, 2, 2, 2],
        [2, 2, 2, 2],
    ]
)
#   T1: ∩P0 = 6 -> 6 / (8 + 6 - 6) = 3/4 ; ∩P1 = 2 -> 2 / (8 + 4 - 2) = 1/5   => 3/4
#   T2: same pixels as S3                                                        => 3/4
# All    = mean(2/3, 1/3, 3/4, 3/4, 3/4) = 3.25 / 5 = 0.65
# Fine   = GT_A (3 labels) = 1.75 / 3
# Coarse = GT_B (2 labels) = 1.5 / 2 = 0.75
# Mean   = (0.65 + 1.75/3 + 0.75) / 3


def test_segment_best_iou_hand_case():
    labels, best = segment_best_iou(PRED_A, GT_A)
    assert labels.tolist() == [1, 2, 3]
    np.testing.assert_allclose(best, BEST_A, rtol=0, atol=1e-12)


def test_bsds_hand_case_raw_and_cc():
    s = bsds_scores([PRED_A], [[GT_A]])
    assert s["All"] == pytest.approx(1.75 / 3, abs=1e-12)
    assert s["counts"] == {"All": 3, "Fine": 3, "Coarse": 3}
    cc = bsds_scores([PRED_A], [[GT_A]], connected_components=True, connectivity=8)
    assert cc["All"] == pytest.approx(23 / 36, abs=1e-12)
    # 4-connectivity splits P1 the same way (its pieces are far apart)
    cc4 = bsds_scores([PRED_A], [[GT_A]], connected_components=True, connectivity=4)
    assert cc4["All"] == pytest.approx(23 / 36, abs=1e-12)


def test_bsds_hand_case_modes():
    s = bsds_scores([PRED_A], [[GT_A, GT_B]])
    assert s["All"] == pytest.approx(0.65, abs=1e-12)
    assert s["Fine"] == pytest.approx(1.75 / 3, abs=1e-12)
    assert s["Coarse"] == pytest.approx(0.75, abs=1e-12)
    assert s["Mean"] == pytest.approx((0.65 + 1.75 / 3 + 0.75) / 3, abs=1e-12)
    assert s["counts"] == {"All": 5, "Fine": 3, "Coarse": 2}
    per = bsds_image_scores(PRED_A, [GT_A, GT_B])
    assert (per["fine_index"], per["coarse_index"]) == (0, 1)
    assert per["n_labels"] == [3, 2]
    assert per["All"] == pytest.approx(0.65, abs=1e-12)


def test_bsds_global_list_not_per_image_mean():
    # image 2: 2x2, one GT segment, perfectly predicted (best 1.0)
    gt2 = np.ones((2, 2), int)
    s = bsds_scores([PRED_A, np.zeros((2, 2), int)], [[GT_A], [gt2]])
    # global list: (2/3 + 1/3 + 3/4 + 1) / 4 = 2.75 / 4; a per-image mean would be 0.7917
    assert s["All"] == pytest.approx(2.75 / 4, abs=1e-12)
    assert s["counts"]["All"] == 4
    assert s["n_images"] == 2


def test_fine_coarse_tie_picks_first():
    two_a = np.array([[1, 1], [2, 2]])
    two_b = np.array([[1, 2], [1, 2]])
    three_a = np.array([[1, 2], [3, 3]])
    three_b = np.array([[1, 1], [2, 3]])
    per = bsds_image_scores(two_b, [two_a, two_b, three_a, three_b])
    assert per["fine_index"] == 2  # first of the two 3-label annotations
    assert per["coarse_index"] == 0  # first of the two 2-label annotations
    # the prediction equals two_b, but Coarse scores two_a: halves -> every IoU = 1/3
    assert per["Coarse"] == pytest.approx(1 / 3)


def test_prediction_equal_to_annotation_scores_one():
    rng = np.random.default_rng(0)
    gts = [rng.integers(1, 6, size=(9, 11)) for _ in range(3)]
    for k, gt in enumerate(gts):
        _, best = segment_best_iou(gt, gt)
        assert np.all(best == 1.0)
        relabelled = gt * 7 - 3
        image = M._bsds_image(
            relabelled, gts, connected_components=False, connectivity=8, resize=False, name="p"
        )
        assert np.all(image["best"][k] == 1.0)
        assert bsds_scores([relabelled], [[gt]])["All"] == 1.0


def test_blank_prediction_is_area_fraction():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 7, size=(13, 17))
    labels, best = segment_best_iou(np.full(gt.shape, 3), gt)
    areas = np.array([(gt == v).sum() for v in labels])
    np.testing.assert_allclose(best, areas / gt.size, rtol=1e-15)
    # per annotation the blank best IoUs sum to exactly 1
    s = bsds_scores([np.zeros(gt.shape, int)] * 2, [[gt, gt % 3], [gt]])
    assert s["sums"]["All"] == pytest.approx(3.0)


def _brute_best_iou(pred, gt):
    out = []
    for s in np.unique(gt):
        S = gt == s
        out.append(
            max(((S & (pred == t)).sum() / (S | (pred == t)).sum()) for t in np.unique(pred))
        )
    return np.array(out)


@pytest.mark.parametrize("seed", range(5))
def test_segment_best_iou_matches_brute_force_dense_and_sparse(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    h, w = rng.integers(3, 20, size=2)
    gt = rng.integers(-2, 1 + rng.integers(1, 9), size=(h, w))
    pred = rng.integers(0, 1 + rng.integers(1, 30), size=(h, w)) * 1000 - 7
    expected = _brute_best_iou(pred, gt)
    np.testing.assert_allclose(segment_best_iou(pred, gt)[1], expected, rtol=1e-12)
    monkeypatch.setattr(M, "DENSE_TABLE_FACTOR", -(10**9))  # force the sparse path
    np.testing.assert_allclose(segment_best_iou(pred, gt)[1], expected, rtol=1e-12)
    s = bsds_scores([pred], [[gt]])
    assert s["All"] == pytest.approx(expected.mean(), rel=1e-12)


def test_label_permutation_invariance():
    rng = np.random.default_rng(2)
    gt = [rng.integers(1, 5, size=(12, 10)), rng.integers(1, 9, size=(12, 10))]
    pred = rng.integers(0, 6, size=(12, 10))
    perm = rng.permutation(6) * 13 - 20  # bijection onto other (negative too) ids
    gperm = rng.permutation(10) + 100
    a = bsds_scores([pred], [gt])
    b = bsds_scores([perm[pred]], [[gperm[g] for g in gt]])
    for m in ("All", "Fine", "Coarse", "Mean"):
        assert a[m] == pytest.approx(b[m], abs=1e-14)
    c1 = bsds_scores([pred], [gt], connected_components=True)
    c2 = bsds_scores([perm[pred]], [gt], connected_components=True)
    assert c1["All"] == pytest.approx(c2["All"], abs=1e-14)


def _same_partition(a, b):
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("seed", range(4))
def test_connected_components_match_scipy_oracle(connectivity, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=(15, 21)) - (seed == 3) * 5
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    oracle = np.zeros(labels.shape, np.int64)
    offset = 0
    for v in np.unique(labels):
        comp, n = ndimage.label(labels == v, structure=structure)
        oracle[comp > 0] = comp[comp > 0] + offset
        offset += n
    got = relabel_connected_components(labels, connectivity=connectivity)
    assert got.shape == labels.shape
    assert got.min() == 0 and got.max() == offset - 1
    assert _same_partition(got, oracle)


def test_resize_nearest_hand_case():
    a = np.array([[1, 2], [3, 4]])
    up = resize_nearest(a, (4, 4))
    assert up.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]
    # 4 -> 2 samples source rows/cols floor((i + 0.5) * 2) = 1, 3
    b = np.arange(16).reshape(4, 4)
    assert resize_nearest(b, (2, 2)).tolist() == [[5, 7], [13, 15]]
    s = bsds_scores([a], [[up]], resize=True)
    assert s["All"] == 1.0
    with pytest.raises(ValueError, match="resize=True"):
        bsds_scores([a], [[up]])


def test_voc_hand_case():
    mask = np.array([[0, 0, 255], [1, 1, 255]])
    pred = np.array([[5, 5, 5], [7, 7, 5]])
    # void ignored: P5 = {(0,0),(0,1)} (its void pixels do not count), P7 = {(1,0),(1,1)}
    # background S0 = P5 -> 1, S1 = P7 -> 1
    r = voc_image_scores(pred, mask)
    assert r["labels"] == [0, 1] and r["best"] == [1.0, 1.0]
    # void counted: P5 = 4 px. S0: 2 / (2 + 4 - 2) = 1/2; S1: 1; S255: 2 / (2 + 4 - 2) = 1/2
    r = voc_image_scores(pred, mask, ignore_index=None)
    assert r["labels"] == [0, 1, 255]
    assert r["mIoU"] == pytest.approx(2 / 3)
    # background not scored: only S1
    r = voc_image_scores(pred, mask, count_background=False)
    assert r["labels"] == [1] and r["count"] == 1
    # dataset: one global list
    s = voc_scores([pred, pred], [mask, np.where(mask == 255, 255, 0)])
    # image 2: only background S0 = {(0,0),(0,1),(1,0),(1,1)}: best = 2 / 4 = 1/2
    assert s["count"] == 3
    assert s["mIoU"] == pytest.approx((1 + 1 + 0.5) / 3)


def test_coco_hand_case():
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = np.array([[3, 3, 0, 0], [1, 2, 2, 0]])
    conf = confusion_matrix(pred, gt, n_classes=3)
    # rows = class, cols = cluster 0..3; pixel (1, 2) is ignored
    assert conf.tolist() == [[0, 0, 0, 2], [3, 0, 0, 0], [0, 1, 1, 0]]
    # best matching: 0<->3 (2), 1<->0 (3), 2<->1 or 2 (1): 6 of 7 pixels
    # TP = [2, 3, 1], FP = [0, 0, 0], FN = [0, 0, 1] -> IoU = [1, 1, 1/2]
    for fn in (coco_scores, coco_scores_per_image_matching):
        s = fn([pred], [gt], n_classes=3)
        assert s["pixel_accuracy"] == pytest.approx(6 / 7)
        assert s["mIoU"] == pytest.approx(2.5 / 3)
        assert s["tp"] == [2, 3, 1] and s["fp"] == [0, 0, 0] and s["fn"] == [0, 0, 1]


def test_coco_dataset_vs_per_image_matching():
    # two images whose cluster ids mean opposite things
    gts = [np.array([[0, 1]]), np.array([[0, 1]])]
    preds = [np.array([[0, 1]]), np.array([[1, 0]])]
    # dataset level: conf = [[1, 1], [1, 1]] -> TP = [1, 1], FP = FN = [1, 1] -> IoU 1/3
    d = coco_scores(preds, gts, n_classes=2)
    assert d["pixel_accuracy"] == 0.5 and d["mIoU"] == pytest.approx(1 / 3)
    # per image: each image is matched on its own and is perfect
    p = coco_scores_per_image_matching(preds, gts, n_classes=2)
    assert p["pixel_accuracy"] == 1.0 and p["mIoU"] == 1.0


def test_coco_fewer_clusters_than_classes_and_nan_classes():
    gt = np.array([[0, 0, 1, 1, 2, 2]])
    pred = np.array([[0, 0, 1, 1, 1, 1]])
    # conf = [[2, 0], [0, 2], [0, 2]]: 0<->0, 1<->1 (tie with 2 broken by the solver)
    s = coco_scores([pred], [gt], n_classes=4)
    assert s["pixel_accuracy"] == pytest.approx(4 / 6)
    # class 0: 1; matched class of cluster 1: TP 2, FP 2 -> 1/2; the other: TP 0, FN 2 -> 0;
    # class 3 absent and unmatched -> NaN, left out of the mean
    assert s["per_class_iou"][0] == 1.0 and s["per_class_iou"][3] is None
    assert sorted(s["per_class_iou"][1:3]) == [0.0, 0.5]
    assert s["mIoU"] == pytest.approx(1.5 / 3)


@pytest.mark.parametrize("shape", [(3, 3), (3, 5), (5, 3), (4, 4), (2, 6)])
def test_hungarian_matches_brute_force(shape):
    rng = np.random.default_rng(shape[0] * 10 + shape[1])
    for _ in range(10):
        conf = rng.integers(0, 50, size=shape)
        rows, cols = hungarian_match(conf)
        n, m = shape
        if n <= m:
            best = max(
                sum(conf[i, p[i]] for i in range(n)) for p in itertools.permutations(range(m), n)
            )
        else:
            best = max(
                sum(conf[p[j], j] for j in range(m)) for p in itertools.permutations(range(n), m)
            )
        assert conf[rows, cols].sum() == best
        assert len(set(rows)) == len(rows) == min(n, m) == len(set(cols))


def test_dataset_confusion_accumulates_with_growing_clusters():
    rng = np.random.default_rng(3)
    gts = [rng.integers(0, 4, size=(6, 7)) for _ in range(3)]
    preds = [rng.integers(0, k, size=(6, 7)) for k in (2, 6, 3)]
    s = coco_scores(preds, gts, n_classes=4)
    total = sum(
        confusion_matrix(p, g, n_classes=4, n_clusters=6) for p, g in zip(preds, gts, strict=True)
    )
    assert np.array_equal(np.array(s["confusion"]), total)
    rows, cols = hungarian_match(total)
    assert s["pixel_accuracy"] == pytest.approx(total[rows, cols].sum() / total.sum())


# ------------------------------------------------------------------------ bad inputs
def test_bad_inputs_raise_clear_errors():
    gt = np.ones((3, 3), int)
    with pytest.raises(TypeError, match="integer"):
        bsds_scores([np.zeros((3, 3))], [[gt]])
    with pytest.raises(ValueError, match="2-D"):
        bsds_scores([np.zeros((3, 3, 1), int)], [[gt]])
    with pytest.raises(ValueError, match="different lengths"):
        bsds_scores([gt, gt], [[gt]])
    with pytest.raises(ValueError, match="at least one"):
        bsds_scores([], [])
    with pytest.raises(ValueError, match="no annotation"):
        bsds_scores([gt], [[]])
    with pytest.raises(ValueError, match="connectivity"):
        bsds_scores([gt], [[gt]], connected_components=True, connectivity=6)
    with pytest.raises(ValueError, match=r"annotations of .*\[1\] has shape"):
        bsds_image_scores(gt, [gt, np.ones((2, 3), int)])
    with pytest.raises(TypeError, match="sequence"):
        bsds_image_scores(gt, 5)
    with pytest.raises(ValueError, match="different lengths"):
        voc_scores([gt], [])
    with pytest.raises(ValueError, match="outside"):
        confusion_matrix(gt, gt * 40, n_classes=27)
    with pytest.raises(ValueError, match="n_clusters"):
        confusion_matrix(gt * 9, gt, n_classes=2, n_clusters=4)
    with pytest.raises(ValueError, match="negative"):
        confusion_matrix(-gt, gt, n_classes=2)
    with pytest.raises(ValueError, match=r"image 1: .*outside"):
        coco_scores([gt, gt], [gt, gt * 99], n_classes=2)
    with pytest.raises(ValueError, match="2-D"):
        hungarian_match(np.zeros(3))
