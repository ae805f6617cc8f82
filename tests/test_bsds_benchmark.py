"""The standard BSDS500 benchmark: hand-computed cases, plain references and oracles."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_bipartite_matching
from scipy.spatial import cKDTree
from skimage.metrics import variation_of_information as skimage_voi

from dynaguide.eval import bsds_benchmark as bb
from dynaguide.eval.boundary_matching import match_within, prediction_boundary, prf
from dynaguide.eval.bsds_benchmark import (
    boundary_map,
    boundary_precision_recall,
    ods_ois,
    probabilistic_rand_index,
    segmentation_covering,
    standard_image_scores,
    standard_scores,
    variation_of_information,
)

HALVES = np.repeat(np.array([[1, 1, 2, 2]]), 4, axis=0)  # two 8-pixel regions
LEFT_COL = np.repeat(np.array([[0, 1, 1, 1]]), 4, axis=0)  # a 4- and a 12-pixel region


# ------------------------------------------------------------------ plain references
def _covering_reference(pred: np.ndarray, gt: np.ndarray) -> float:
    total = 0.0
    for r in np.unique(gt):
        region = gt == r
        best = 0.0
        for s in np.unique(pred):
            other = pred == s
            best = max(best, (region & other).sum() / (region | other).sum())
        total += region.sum() * best
    return total / gt.size


def _rand_reference(pred: np.ndarray, gt: np.ndarray) -> float:
    p, g = pred.ravel(), gt.ravel()
    pairs = list(itertools.combinations(range(p.size), 2))
    agree = sum((p[i] == p[j]) == (g[i] == g[j]) for i, j in pairs)
    return agree / len(pairs)


def _blocky(rng: np.random.Generator, shape: tuple[int, int], cells: int, n: int) -> np.ndarray:
    coarse = rng.integers(0, n, size=(cells, cells))
    rows = np.arange(shape[0]) * cells // shape[0]
    cols = np.arange(shape[1]) * cells // shape[1]
    return coarse[rows[:, None], cols[None, :]]


def _split(shape: tuple[int, int], *cols: int) -> np.ndarray:
    """Vertical bands: label k for the columns between the k-th and (k+1)-th split."""
    labels = np.zeros(shape, np.int64)
    for c in cols:
        labels[:, c:] += 1
    return labels


# ------------------------------------------------------------------- region measures
def test_hand_computed_region_measures():
    # covering: R1 (cols 0-1) best IoU 4/8 with the left column; R2 best 8/12 with the rest
    assert segmentation_covering(LEFT_COL, [HALVES]) == pytest.approx((8 * 0.5 + 8 * 2 / 3) / 16)
    # Rand: 120 pairs; same in GT 56, same in prediction 72, same in both 40 -> 72 agree
    assert probabilistic_rand_index(LEFT_COL, [HALVES]) == pytest.approx(72 / 120)
    # VoI = 2 H(joint) - H(S) - H(G) with joint (1/4, 1/4, 1/2)
    h_pred = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    expected = 2 * 1.5 * math.log(2) - h_pred - math.log(2)
    assert variation_of_information(LEFT_COL, [HALVES]) == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(6))
def test_region_measures_match_references(seed):
    rng = np.random.default_rng(seed)
    shape = (6, 7)
    pred = _blocky(rng, shape, 4, 5)
    gts = [_blocky(rng, shape, 3, 4) + 1 for _ in range(3)]
    cov = np.mean([_covering_reference(pred, g) for g in gts])
    assert segmentation_covering(pred, gts) == pytest.approx(cov, rel=1e-12)
    ri = np.mean([_rand_reference(pred, g) for g in gts])
    assert probabilistic_rand_index(pred, gts) == pytest.approx(ri, rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_voi_matches_skimage(seed):
    rng = np.random.default_rng(100 + seed)
    shape = (40, 55)
    pred = _blocky(rng, shape, 7, 9)
    gts = [_blocky(rng, shape, 5, 6) + 1 for _ in range(4)]
    # scikit-image returns the two conditional entropies in bits; the benchmark uses nats
    bits = np.mean([sum(skimage_voi(g, pred)) for g in gts])
    expected = bits * math.log(2)
    assert variation_of_information(pred, gts) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert variation_of_information(pred, gts, unit="bits") == pytest.approx(bits, rel=1e-10)
    s = standard_image_scores(pred, gts)
    assert s["voi"] == pytest.approx(expected) and s["voi_bits"] == pytest.approx(bits)


def test_sparse_contingency_path_matches_reference():
    rng = np.random.default_rng(7)
    pred = rng.permutation(64 * 64).reshape(64, 64)  # every pixel its own segment
    gt = _blocky(rng, (64, 64), 4, 10)
    n_gt = len(np.unique(gt))
    assert n_gt * pred.size > bb.DENSE_TABLE_FACTOR * pred.size + 4096  # sparse path taken
    expected = sum(np.sum(gt == r) * (1 / np.sum(gt == r)) for r in np.unique(gt)) / gt.size
    assert segmentation_covering(pred, [gt]) == pytest.approx(expected)
    assert variation_of_information(pred, [gt]) == pytest.approx(
        sum(skimage_voi(gt, pred)) * math.log(2)
    )


def test_rand_index_pair_counts_do_not_overflow():
    # 2 x 10^6 pixels: n (n - 1) / 2 ~ 2e12 pairs and squared region sizes ~ 1e12
    gt = np.zeros((1000, 2000), np.int32)
    gt[:, 1000:] = 1
    pred = np.zeros_like(gt)
    assert probabilistic_rand_index(pred, [gt]) == pytest.approx(
        (2 * 1e6 * (1e6 - 1) / 2) / (2e6 * (2e6 - 1) / 2)
    )


# ---------------------------------------------------------------------- boundaries
def test_boundary_map_follows_seg2bmap():
    a = np.array([[1, 1, 1], [1, 2, 2], [1, 2, 2]])
    expected = np.array([[1, 1, 1], [1, 0, 0], [1, 0, 0]], bool)
    np.testing.assert_array_equal(boundary_map(a), expected)
    halves = np.zeros((4, 4), bool)
    halves[:, 1] = True  # the left region's last column, the last row included
    np.testing.assert_array_equal(boundary_map(HALVES), halves)
    assert not boundary_map(np.zeros((5, 5), int)).any()


def test_boundary_shift_by_one_pixel_matches_far_shift_does_not():
    gt = _split((100, 100), 50)  # boundary column 49; tolerance 0.0075 * 141.4 = 1.06 px
    near = boundary_precision_recall(_split((100, 100), 51), [gt])
    assert (near["precision"], near["recall"], near["f"]) == (1.0, 1.0, 1.0)
    far = boundary_precision_recall(_split((100, 100), 60), [gt])
    assert (far["precision"], far["recall"], far["f"]) == (0.0, 0.0, 0.0)
    assert far["boundary_pred"] == far["boundary_gt"] == 100
    # a larger tolerance (10 px = 0.0708 x diagonal) reaches the far shift
    wide = boundary_precision_recall(_split((100, 100), 60), [gt], max_dist=0.0708)
    assert wide["f"] == 1.0


def test_boundary_matching_is_one_to_one():
    gt = _split((100, 100), 50)
    double = _split((100, 100), 50, 51)  # boundary columns 49 and 50, both within 1 px
    s = boundary_precision_recall(double, [gt], thin=False)
    assert s["boundary_pred"] == 200
    assert s["boundary_matched_pred"] == 100
    assert s["precision"] == 0.5 and s["recall"] == 1.0
    assert s["f"] == pytest.approx(2 * 0.5 / 1.5)
    # thinning (the benchmark's default) turns the 2-pixel band into one line
    thinned = boundary_precision_recall(double, [gt])
    assert 98 <= thinned["boundary_pred"] <= 100 and thinned["precision"] == 1.0
    assert thinned["recall"] == thinned["boundary_pred"] / 100


def test_thinning_keeps_a_subset_of_one_pixel_lines():
    i, j = np.mgrid[:30, :40]
    labels = (i + j // 2 > 20).astype(int) + 2 * (j > 25)  # slanted edges and a junction
    raw, thin = boundary_map(labels), prediction_boundary(labels)
    assert thin.sum() < raw.sum() and not (thin & ~raw).any()
    # straight one-pixel lines are kept as they are
    np.testing.assert_array_equal(prediction_boundary(HALVES), boundary_map(HALVES))
    assert not prediction_boundary(np.zeros((4, 4), int)).any()


def test_precision_counts_a_match_for_any_annotator_recall_pools():
    a, b = _split((100, 100), 50), _split((100, 100), 80)
    both = boundary_precision_recall(_split((100, 100), 50, 80), [a, b])
    assert both["precision"] == 1.0 and both["recall"] == 1.0
    one = boundary_precision_recall(_split((100, 100), 50), [a, b])
    assert one["precision"] == 1.0
    assert (one["boundary_matched_gt"], one["boundary_gt"]) == (100, 200)
    assert one["recall"] == 0.5


@pytest.mark.parametrize("seed", range(8))
def test_flow_matching_has_maximum_cardinality(seed):
    rng = np.random.default_rng(seed)
    pred = rng.integers(0, 30, size=(rng.integers(5, 120), 2)).astype(float)
    pred = np.unique(pred, axis=0)
    gt = np.unique(rng.integers(0, 30, size=(rng.integers(5, 120), 2)), axis=0)
    radius = float(rng.uniform(1.0, 4.0))
    matched, n = match_within(cKDTree(pred), len(pred), gt, radius)
    pairs = cKDTree(pred).sparse_distance_matrix(cKDTree(gt), radius, output_type="ndarray")
    graph = csr_matrix((np.ones(pairs.size), (pairs["i"], pairs["j"])), shape=(len(pred), len(gt)))
    reference = int((maximum_bipartite_matching(graph, perm_type="column") >= 0).sum())
    assert n == reference == int(matched.sum())
    # every matched predicted point has a GT point within the radius
    d, _ = cKDTree(gt).query(pred[matched])
    assert np.all(d <= radius + 1e-12)


# ---------------------------------------------------------------- per image records
def test_identity_prediction_is_perfect():
    gt = _blocky(np.random.default_rng(3), (48, 64), 6, 5) + 1
    s = standard_image_scores(gt.copy(), [gt], thin=False)
    assert s["covering"] == pytest.approx(1.0)
    assert s["pri"] == pytest.approx(1.0)
    assert s["voi"] == pytest.approx(0.0, abs=1e-12) and s["voi_bits"] == s["voi"]
    assert (s["precision"], s["recall"], s["f"]) == (1.0, 1.0, 1.0)
    json.dumps(s)  # JSON-able
    # with the benchmark's thinning, junction pixels leave the prediction: recall < 1
    t = standard_image_scores(gt.copy(), [gt])
    assert t["precision"] == 1.0 and 0.9 < t["recall"] < 1.0
    assert t["sums"]["boundary_pred"] < t["sums"]["boundary_gt"]
    assert t["covering"] == s["covering"] and t["voi"] == s["voi"]


def test_single_segment_prediction_known_values():
    gts = [HALVES, LEFT_COL + 1]
    s = standard_image_scores(np.zeros((4, 4), int), gts)
    # covering by one region: sum |R|^2 / N^2; both annotators pooled
    assert s["covering"] == pytest.approx(((64 + 64) / 256 + (16 + 144) / 256) / 2)
    # Rand index: the pairs the annotator keeps together
    assert s["pri"] == pytest.approx((56 / 120 + 72 / 120) / 2)
    h = [math.log(2), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]
    assert s["voi"] == pytest.approx(np.mean(h))
    assert (s["precision"], s["recall"], s["f"]) == (0.0, 0.0, 0.0)
    assert s["sums"]["boundary_pred"] == 0 and s["sums"]["boundary_gt"] == 8
    assert s["n_annotators"] == 2 and s["n_pred_segments"] == 1


def test_connected_components_option_splits_regions():
    pred = np.array([[0, 1, 0, 0]] * 4)  # label 0 in two pieces
    raw = standard_image_scores(pred, [HALVES])
    cc = standard_image_scores(pred, [HALVES], connected_components=True)
    assert raw["n_pred_segments"] == 2 and cc["n_pred_segments"] == 3
    assert cc["covering"] > raw["covering"]


# ------------------------------------------------------------------------- pooling
def _record(cov_num, cov_den, pri, voi, mp, n_p, mg, n_g):
    sums = {
        "covering_num": cov_num,
        "covering_den": cov_den,
        "boundary_matched_pred": mp,
        "boundary_pred": n_p,
        "boundary_matched_gt": mg,
        "boundary_gt": n_g,
    }
    f = prf(sums)
    return {"covering": cov_num / cov_den, "pri": pri, "voi": voi, **f, "sums": sums}


def test_standard_scores_pooling_arithmetic():
    recs = [_record(30, 100, 0.8, 2.0, 10, 20, 30, 40), _record(90, 100, 0.6, 1.0, 40, 80, 10, 60)]
    s = standard_scores(recs)
    assert s["covering"] == pytest.approx(120 / 200)  # not the mean of 0.3 and 0.9 weights
    assert s["pri"] == pytest.approx(0.7) and s["voi"] == pytest.approx(1.5)
    assert s["voi_bits"] == pytest.approx(1.5 / math.log(2))
    assert s["precision"] == pytest.approx(50 / 100) and s["recall"] == pytest.approx(40 / 100)
    assert s["f"] == pytest.approx(2 * 0.5 * 0.4 / 0.9)
    assert s["n_images"] == 2
    # records of standard_image_scores pool the same way
    a = standard_image_scores(LEFT_COL, [HALVES])
    b = standard_image_scores(np.zeros((2, 6), int), [np.array([[1, 1, 1, 2, 2, 2]] * 2)] * 3)
    pooled = standard_scores([a, b])
    num = a["sums"]["covering_num"] + b["sums"]["covering_num"]
    assert pooled["covering"] == pytest.approx(num / (16 + 3 * 12))
    assert math.isnan(standard_scores([])["covering"]) and standard_scores([])["n_images"] == 0


def test_ods_differs_from_ois_on_two_knobs():
    by_knob = {
        "a": [_record(90, 100, 0.9, 1.0, 9, 10, 9, 10), _record(30, 100, 0.5, 3.0, 1, 10, 1, 10)],
        "b": [_record(50, 100, 0.6, 2.0, 5, 10, 5, 10), _record(80, 100, 0.7, 1.5, 8, 10, 8, 10)],
    }
    r = ods_ois(by_knob)
    ods, ois = r["ods"], r["ois"]
    assert ods["covering"] == {"value": pytest.approx(0.65), "knob": "b"}
    assert ois["covering"]["value"] == pytest.approx(0.85)
    assert ois["covering"]["knobs"] == ["a", "b"]
    assert ods["pri"]["knob"] == "a" and ods["pri"]["value"] == pytest.approx(0.7)
    assert ois["pri"]["value"] == pytest.approx(0.8)
    assert ods["voi"]["knob"] == "b" and ods["voi"]["value"] == pytest.approx(1.75)
    assert ois["voi"]["value"] == pytest.approx(1.25)
    assert ods["voi"]["bits"] == pytest.approx(1.75 / math.log(2))
    assert ois["voi"]["bits"] == pytest.approx(1.25 / math.log(2))
    assert ods["f"]["knob"] == "b" and ods["f"]["value"] == pytest.approx(0.65)
    assert ois["f"]["value"] == pytest.approx(0.85)
    assert ois["f"]["precision"] == pytest.approx(17 / 20)
    assert [k["knob"] for k in r["by_knob"]] == ["a", "b"] and r["n_images"] == 2
    # one fixed output: ODS = OIS
    single = ods_ois({"only": by_knob["a"]})
    for metric in ("covering", "pri", "voi", "f"):
        assert single["ods"][metric]["value"] == pytest.approx(single["ois"][metric]["value"])


# ------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_naming_the_input():
    with pytest.raises(ValueError, match="pred_x has shape"):
        standard_image_scores(np.zeros((3, 4), int), [np.zeros((4, 4), int)], name="pred_x")
    with pytest.raises(ValueError, match="holds no annotation"):
        segmentation_covering(np.zeros((4, 4), int), [])
    with pytest.raises(TypeError, match="integer labels"):
        variation_of_information(np.zeros((4, 4)), [HALVES])
    with pytest.raises(TypeError, match=r"annotations of prediction\[1\]"):
        probabilistic_rand_index(HALVES, [HALVES, HALVES.astype(float)])
    with pytest.raises(ValueError, match=r"annotations of prediction\[1\] has shape"):
        boundary_precision_recall(HALVES, [HALVES, np.zeros((2, 2), int)])
    with pytest.raises(ValueError, match="unit must be"):
        variation_of_information(HALVES, [HALVES], unit="bans")
    with pytest.raises(ValueError, match="max_dist"):
        boundary_precision_recall(HALVES, [HALVES], max_dist=-1.0)
    with pytest.raises(ValueError, match="not a record"):
        standard_scores([{"covering": 1.0}])
    with pytest.raises(TypeError, match="list of per-image records"):
        standard_scores({"sums": {}})
    rec = standard_image_scores(HALVES, [HALVES])
    with pytest.raises(ValueError, match="non-empty mapping"):
        ods_ois({})
    with pytest.raises(ValueError, match="has 1 records"):
        ods_ois({1: [rec, rec], 2: [rec]})
    with pytest.raises(ValueError, match="other images"):
        ods_ois({1: [{**rec, "id": "a"}], 2: [{**rec, "id": "b"}]})
