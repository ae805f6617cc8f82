"""The standard BSDS500 region and boundary benchmark (Arbeláez, Maire, Fowlkes, Malik,
"Contour Detection and Hierarchical Image Segmentation", TPAMI 2011).

(Over 400 lines: the benchmark's four measures share one per-image contingency table and
one way of combining annotators, so they are computed together here; the boundary
matching itself is :mod:`dynaguide.eval.boundary_matching`.)

Every measure compares one predicted label map S with each human segmentation G of the
image (BSDS500: 4-9 annotators) and combines the annotators as the benchmark does:

Segmentation Covering
    ``C(S -> G) = (1/N) sum_{R in G} |R| max_{R' in S} IoU(R, R')``. Pooled: per image the
    numerators of all annotators are summed and N is added once per annotator; the
    dataset score is the sum of numerators over the sum of denominators.
Probabilistic Rand Index (PRI)
    The mean over annotators of the Rand index (fraction of the n(n-1)/2 pixel pairs on
    which S and G agree about "same segment" / "different segment"); dataset: mean over
    images.
Variation of Information (VoI)
    The mean over annotators of ``H(S) + H(G) - 2 I(S, G)`` (Meila 2005); dataset: mean
    over images. Lower is better. ``voi`` is in nats, ``voi_bits`` in bits: the
    benchmark's code (``match_segmentations2.m``) uses ``log2``, so the published VoI
    values (e.g. human 1.17, gPb-owt-ucm 1.69) compare with ``voi_bits``.
Boundary precision / recall / F
    Boundary pixels as in the benchmark's ``seg2bmap``: a pixel is a boundary pixel when
    its label differs from its right, lower or lower-right neighbour (the last row only
    looks right, the last column only down); the predicted map is thinned to one-pixel
    lines as the benchmark does. Predicted boundary pixels are matched
    one-to-one to each annotator's boundary pixels within ``0.0075 x`` the image
    diagonal: a maximum-cardinality bipartite matching on the pairs closer than that,
    solved as a unit-capacity maximum flow with scipy's Dinic algorithm. Recall pools
    the matched GT pixels over annotators; a predicted pixel is correct when it is
    matched for ANY annotator; F = 2PR / (P + R). The dataset pools the counts. An
    empty boundary set gives 0 (the benchmark's convention). See
    :mod:`dynaguide.eval.boundary_matching`.

ODS / OIS (:func:`ods_ois`)
    For a method with a knob: ODS fixes one knob value for the whole dataset (per
    measure the best pooled score), OIS takes the best value per image and then pools.

All contingency tables come from one ``np.bincount``; a per-image call at 481x321 with
5-8 annotators takes well under a second (see ``benchmarks/baselines.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dynaguide.eval.boundary_matching import (
    boundary_counts,
    boundary_map,
    matching_radius,
    prediction_boundary,
    prf,
)
from dynaguide.eval.label_maps import (
    DENSE_TABLE_FACTOR,
    as_label_map,
    check_annotations,
    compact_labels,
    relabel_connected_components,
)

__all__ = [
    "BOUNDARY_MAX_DIST",
    "STANDARD_METRICS",
    "boundary_map",
    "boundary_precision_recall",
    "ods_ois",
    "probabilistic_rand_index",
    "segmentation_covering",
    "standard_image_scores",
    "standard_scores",
    "variation_of_information",
]

#: Matching tolerance of the boundary benchmark, as a fraction of the image diagonal.
BOUNDARY_MAX_DIST = 0.0075
#: nats -> bits.
_BITS = 1.0 / np.log(2.0)
#: The dataset-level measures and whether larger is better.
STANDARD_METRICS = {"covering": True, "pri": True, "voi": False, "f": True}


# ----------------------------------------------------------------------------- inputs
def _inputs(prediction: Any, annotations: Any, name: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """Validate a prediction and its annotator list (same (H, W) shape)."""
    maps = check_annotations(annotations, f"annotations of {name}")
    pred = as_label_map(prediction, name)
    if pred.shape != maps[0].shape:
        raise ValueError(f"{name} has shape {pred.shape} but its annotations have {maps[0].shape}")
    return pred, maps


class _Prediction:
    """Compact ids and region count of one prediction; its boundary points on demand."""

    def __init__(self, pred: np.ndarray) -> None:
        self.shape = pred.shape
        self.ids, self.n = compact_labels(pred.reshape(-1))
        self.labels = pred

    def points(self, thin: bool) -> np.ndarray:
        return np.argwhere(prediction_boundary(self.labels, thin=thin))


def _contingency(
    p_ids: np.ndarray, n_p: int, g_ids: np.ndarray, n_g: int
) -> tuple[np.ndarray, ...]:
    """Non-zero cells (g, p, count) of the contingency table, sorted by (g, p)."""
    if n_g * n_p <= DENSE_TABLE_FACTOR * g_ids.size + 4096:
        table = np.bincount(g_ids * n_p + p_ids, minlength=n_g * n_p)
        cells = np.flatnonzero(table)
        counts = table[cells]
    else:
        cells, counts = np.unique(g_ids * n_p + p_ids, return_counts=True)
    return cells // n_p, cells % n_p, counts.astype(np.float64)


def _region_scores(pred: _Prediction, gt: np.ndarray) -> tuple[float, float, float]:
    """(covering numerator, Rand index, VoI) of the prediction against one annotation."""
    g_ids, n_g = compact_labels(gt.reshape(-1))
    g, p, c = _contingency(pred.ids, pred.n, g_ids, n_g)
    area_g = np.bincount(g, weights=c, minlength=n_g)
    area_p = np.bincount(p, weights=c, minlength=pred.n)
    n = float(g_ids.size)
    # covering: cells are sorted by g, every GT region has at least one cell
    iou = c / (area_g[g] + area_p[p] - c)
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    best = np.maximum.reduceat(iou, starts)
    covering_num = float((area_g[g[starts]] * best).sum())
    # Rand index over n(n-1)/2 pairs; float64 pair counts (no int64 overflow)
    pairs = n * (n - 1.0) / 2.0
    same_both = float((c * (c - 1.0)).sum()) / 2.0
    same_g = float((area_g * (area_g - 1.0)).sum()) / 2.0
    same_p = float((area_p * (area_p - 1.0)).sum()) / 2.0
    ri = 1.0 if pairs == 0 else (pairs + 2.0 * same_both - same_g - same_p) / pairs

    # VoI = 2 H(S, G) - H(S) - H(G), entropies in nats from counts
    def entropy(x: np.ndarray) -> float:
        x = x[x > 0]
        return float(np.log(n) - (x * np.log(x)).sum() / n)

    voi = 2.0 * entropy(c) - entropy(area_g) - entropy(area_p)
    return covering_num, ri, max(voi, 0.0)


# ----------------------------------------------------------------- public per-measure API
def segmentation_covering(prediction: Any, annotations: Any, *, name: str = "prediction") -> float:
    """Segmentation Covering of the annotations by the prediction, pooled over annotators.

    Parameters
    ----------
    prediction : ndarray (H, W) of int
    annotations : ndarray (H, W) or sequence of them
        The human segmentations (same shape as the prediction).
    name : str
        Name of the prediction in error messages.

    Returns
    -------
    float
        ``sum_k sum_{R in G_k} |R| max_{R'} IoU(R, R') / (K N)`` (K annotators, N pixels).
    """
    pred, maps = _inputs(prediction, annotations, name)
    p = _Prediction(pred)
    return sum(_region_scores(p, gt)[0] for gt in maps) / (len(maps) * pred.size)


def probabilistic_rand_index(
    prediction: Any, annotations: Any, *, name: str = "prediction"
) -> float:
    """Probabilistic Rand Index: the mean over annotators of the Rand index.

    Parameters
    ----------
    prediction : ndarray (H, W) of int
    annotations : ndarray (H, W) or sequence of them
    name : str
        Name of the prediction in error messages.

    Returns
    -------
    float in [0, 1]
        Fraction of the n(n-1)/2 pixel pairs on which prediction and annotation agree
        (both "same segment" or both "different segments"), averaged over annotators.
    """
    pred, maps = _inputs(prediction, annotations, name)
    p = _Prediction(pred)
    return float(np.mean([_region_scores(p, gt)[1] for gt in maps]))


def variation_of_information(
    prediction: Any, annotations: Any, *, unit: str = "nats", name: str = "prediction"
) -> float:
    """Variation of Information ``H(S) + H(G) - 2 I(S, G)``, mean over annotators.

    Parameters
    ----------
    prediction : ndarray (H, W) of int
    annotations : ndarray (H, W) or sequence of them
    unit : {"nats", "bits"}
        Natural or base-2 logarithm (the benchmark's code and its published values use
        bits).
    name : str
        Name of the prediction in error messages.

    Returns
    -------
    float >= 0
        In bits, for one annotation, the sum of the two conditional entropies returned
        by :func:`skimage.metrics.variation_of_information`; in nats ``ln 2`` times the sum of the two conditional entropies
        returned by :func:`skimage.metrics.variation_of_information` (which are in bits).
    """
    if unit not in ("nats", "bits"):
        raise ValueError(f"unit must be 'nats' or 'bits', got {unit!r}")
    pred, maps = _inputs(prediction, annotations, name)
    p = _Prediction(pred)
    voi = float(np.mean([_region_scores(p, gt)[2] for gt in maps]))
    return voi * _BITS if unit == "bits" else voi


def boundary_precision_recall(
    prediction: Any,
    annotations: Any,
    *,
    max_dist: float = BOUNDARY_MAX_DIST,
    thin: bool = True,
    name: str = "prediction",
) -> dict[str, float]:
    """Boundary precision, recall and F of the prediction against every annotator.

    Parameters
    ----------
    prediction : ndarray (H, W) of int
    annotations : ndarray (H, W) or sequence of them
    max_dist : float
        Matching tolerance as a fraction of the image diagonal (benchmark: 0.0075).
    thin : bool
        Thin the predicted boundary map to one-pixel lines first (the benchmark does).
    name : str
        Name of the prediction in error messages.

    Returns
    -------
    dict
        ``precision``, ``recall``, ``f`` and the counts ``boundary_matched_pred`` (predicted
        boundary pixels matched for at least one annotator), ``boundary_pred``,
        ``boundary_matched_gt`` (matched GT pixels summed over annotators) and
        ``boundary_gt`` (GT boundary pixels summed over annotators).
    """
    pred, maps = _inputs(prediction, annotations, name)
    counts = _boundary_counts(_Prediction(pred), maps, max_dist, thin)
    out: dict[str, Any] = prf(counts)
    out.update(counts)
    return out


# ---------------------------------------------------------------- per image and dataset
def standard_image_scores(
    prediction: Any,
    annotations: Any,
    *,
    name: str = "prediction",
    connected_components: bool = False,
    connectivity: int = 8,
    max_dist: float = BOUNDARY_MAX_DIST,
    thin: bool = True,
) -> dict[str, Any]:
    """All standard BSDS500 measures of one image, with the sums needed for pooling.

    Parameters
    ----------
    prediction : ndarray (H, W) of int
    annotations : ndarray (H, W) or sequence of them
        Every human segmentation of the image, same shape as the prediction.
    name : str
        Name of the prediction in error messages.
    connected_components : bool
        Relabel the prediction into connected components first.
    connectivity : {4, 8}
    max_dist : float
        Boundary matching tolerance as a fraction of the image diagonal.
    thin : bool
        Thin the predicted boundary map to one-pixel lines first (the benchmark does).

    Returns
    -------
    dict (JSON-able)
        ``covering``, ``pri``, ``voi`` (nats), ``voi_bits``, ``precision``, ``recall``,
        ``f`` of this image,
        ``n_annotators``, ``n_pred_segments`` and ``sums``: ``covering_num``,
        ``covering_den`` and the four boundary counts (see
        :func:`boundary_precision_recall`). Pool a list of them with
        :func:`standard_scores`.
    """
    pred, maps = _inputs(prediction, annotations, name)
    if connected_components:
        pred = relabel_connected_components(pred, connectivity=connectivity)
    p = _Prediction(pred)
    region = np.array([_region_scores(p, gt) for gt in maps])
    sums: dict[str, Any] = {
        "covering_num": float(region[:, 0].sum()),
        "covering_den": float(len(maps) * pred.size),
    }
    sums.update(_boundary_counts(p, maps, max_dist, thin))
    out: dict[str, Any] = {
        "covering": sums["covering_num"] / sums["covering_den"],
        "pri": float(region[:, 1].mean()),
        "voi": float(region[:, 2].mean()),
    }
    out["voi_bits"] = out["voi"] * _BITS
    out.update(prf(sums))
    out.update({"n_annotators": len(maps), "n_pred_segments": int(p.n), "sums": sums})
    return out


def _boundary_counts(
    pred: _Prediction, maps: list[np.ndarray], max_dist: float, thin: bool
) -> dict[str, int]:
    radius = matching_radius(pred.shape, max_dist)
    return boundary_counts(pred.points(thin), maps, radius)


_SUM_KEYS = (
    "covering_num",
    "covering_den",
    "boundary_matched_pred",
    "boundary_pred",
    "boundary_matched_gt",
    "boundary_gt",
)


def _check_records(records: Any, name: str) -> list[Mapping[str, Any]]:
    if isinstance(records, Mapping) or not isinstance(records, Sequence):
        raise TypeError(f"{name} must be a list of per-image records, got {type(records).__name__}")
    for k, rec in enumerate(records):
        if not isinstance(rec, Mapping) or "sums" not in rec:
            raise ValueError(f"{name}[{k}] is not a record of standard_image_scores")
        missing = [key for key in ("pri", "voi") if key not in rec]
        missing += [key for key in _SUM_KEYS if key not in rec["sums"]]
        if missing:
            raise ValueError(f"{name}[{k}] lacks {', '.join(missing)}")
    return list(records)


def standard_scores(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Dataset scores from per-image records of :func:`standard_image_scores`.

    Covering is pooled (sum of numerators / sum of denominators), PRI and VoI are means
    over images, boundary precision / recall come from the pooled counts and F from
    them (the benchmark's ODS-style F at one setting).

    Parameters
    ----------
    records : list of dict

    Returns
    -------
    dict
        ``covering``, ``pri``, ``voi`` (nats), ``voi_bits``, ``precision``, ``recall``,
        ``f``, ``n_images`` and the pooled ``sums``. With no record every score is NaN.
    """
    records = _check_records(records, "records")
    totals = {k: float(sum(r["sums"][k] for r in records)) for k in _SUM_KEYS}
    nan = float("nan")
    out: dict[str, Any] = {
        "covering": totals["covering_num"] / totals["covering_den"] if records else nan,
        "pri": float(np.mean([r["pri"] for r in records])) if records else nan,
        "voi": float(np.mean([r["voi"] for r in records])) if records else nan,
    }
    out["voi_bits"] = out["voi"] * _BITS
    out.update(prf(totals) if records else dict.fromkeys(("precision", "recall", "f"), nan))
    out["n_images"] = len(records)
    out["sums"] = totals
    return out


def _per_image_value(record: Mapping[str, Any], metric: str) -> float:
    if metric == "covering":
        s = record["sums"]
        return s["covering_num"] / s["covering_den"]
    if metric == "f":
        return prf(record["sums"])["f"]
    return float(record[metric])


def ods_ois(records_by_knob: Mapping[Any, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """ODS and OIS of a method with a knob (number of segments, scale, ...).

    ODS (optimal dataset scale): per measure, the knob value whose pooled dataset score
    (:func:`standard_scores`) is best: max Covering, max PRI, min VoI, max F. OIS
    (optimal image scale): per measure and image the knob value with the best score of
    that image, then those records pooled the same way. Ties go to the first knob value
    in the mapping's order.

    Parameters
    ----------
    records_by_knob : mapping knob value -> list of per-image records
        Every list covers the same images in the same order (records carrying an ``id``
        are checked).

    Returns
    -------
    dict
        ``ods``: per measure ``{"value", "knob"}`` (for ``f`` also ``precision`` and
        ``recall`` at that knob, for ``voi`` also ``bits``); ``ois``: per measure
        ``{"value"}`` and the chosen ``knobs`` per image (for ``f`` also the pooled
        ``precision`` / ``recall``, for ``voi`` also ``bits``);
        ``by_knob``: the dataset scores of every knob value; ``n_images``.
    """
    if not isinstance(records_by_knob, Mapping) or not records_by_knob:
        raise ValueError("records_by_knob must be a non-empty mapping knob -> records")
    knobs = list(records_by_knob)
    lists = [_check_records(records_by_knob[k], f"records_by_knob[{k!r}]") for k in knobs]
    n = len(lists[0])
    for k, recs in zip(knobs, lists, strict=True):
        if len(recs) != n:
            raise ValueError(
                f"records_by_knob[{k!r}] has {len(recs)} records, "
                f"records_by_knob[{knobs[0]!r}] has {n}"
            )
        ids = [r.get("id") for r in recs]
        if ids != [r.get("id") for r in lists[0]]:
            raise ValueError(f"records_by_knob[{k!r}] lists other images than {knobs[0]!r}")
    if n == 0:
        raise ValueError("records_by_knob holds no image")
    by_knob = [standard_scores(recs) for recs in lists]
    ods: dict[str, Any] = {}
    ois: dict[str, Any] = {}
    for metric, larger in STANDARD_METRICS.items():
        sign = 1.0 if larger else -1.0
        best = int(np.argmax([sign * s[metric] for s in by_knob]))
        ods[metric] = {"value": by_knob[best][metric], "knob": knobs[best]}
        per_image = np.array([[_per_image_value(r, metric) for r in recs] for recs in lists])
        choice = np.argmax(sign * per_image, axis=0)
        pooled = standard_scores([lists[c][i] for i, c in enumerate(choice)])
        ois[metric] = {"value": pooled[metric], "knobs": [knobs[c] for c in choice]}
        if metric == "voi":
            ods[metric]["bits"] = ods[metric]["value"] * _BITS
            ois[metric]["bits"] = ois[metric]["value"] * _BITS
        if metric == "f":
            for key in ("precision", "recall"):
                ods[metric][key] = by_knob[best][key]
                ois[metric][key] = pooled[key]
    return {
        "ods": ods,
        "ois": ois,
        "by_knob": [{"knob": k, **s} for k, s in zip(knobs, by_knob, strict=True)],
        "n_images": n,
    }
