"""Boundary pixels and their one-to-one matching, as in the BSDS500 boundary benchmark
(Martin, Fowlkes, Malik, TPAMI 2004; Arbeláez et al., TPAMI 2011).

Boundary pixels follow the benchmark's ``seg2bmap``; the predicted map is then thinned to
one-pixel lines (``bwmorph(bmap, 'thin', inf)`` in the benchmark,
:func:`skimage.morphology.thin` here) while the annotations' maps are used as they are,
as in the benchmark's ``evaluation_bdry_image``. Predicted and ground-truth boundary
pixels closer than a tolerance (0.0075 x the image diagonal in the benchmark) are
matched one-to-one by a maximum-cardinality bipartite matching of the close pairs
(found with :class:`scipy.spatial.cKDTree`), solved as a unit-capacity maximum flow with
:func:`scipy.sparse.csgraph.maximum_flow` (Dinic). Used by
:mod:`dynaguide.eval.bsds_benchmark`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import maximum_flow
from scipy.spatial import cKDTree

from dynaguide.eval.label_maps import as_label_map

__all__ = [
    "boundary_counts",
    "boundary_map",
    "match_within",
    "matching_radius",
    "prediction_boundary",
    "prf",
]


def boundary_map(labels: Any) -> np.ndarray:
    """Boundary pixels of a label map in the BSDS ``seg2bmap`` convention.

    A pixel is on a boundary when its label differs from its right, lower or
    lower-right neighbour; the last row only compares with the right neighbour, the
    last column only with the one below, and the bottom-right pixel is never boundary.
    The map is one pixel thick on one side of every label change (no further thinning).

    Parameters
    ----------
    labels : ndarray (H, W) of int

    Returns
    -------
    ndarray (H, W) of bool
    """
    a = as_label_map(labels, "labels")
    b = np.zeros(a.shape, bool)
    b[:, :-1] |= a[:, :-1] != a[:, 1:]
    b[:-1, :] |= a[:-1, :] != a[1:, :]
    b[:-1, :-1] |= a[:-1, :-1] != a[1:, 1:]
    return b


def prediction_boundary(labels: Any, *, thin: bool = True) -> np.ndarray:
    """Boundary pixels of a predicted label map: :func:`boundary_map`, then thinned.

    Parameters
    ----------
    labels : ndarray (H, W) of int
    thin : bool
        Thin the map to one-pixel 8-connected lines (:func:`skimage.morphology.thin`, the
        benchmark's ``bwmorph(..., 'thin', inf)``); False keeps the raw ``seg2bmap`` map.

    Returns
    -------
    ndarray (H, W) of bool
    """
    b = boundary_map(labels)
    if thin and b.any():
        from skimage.morphology import thin as _thin

        b = _thin(b)
    return b


def matching_radius(shape: tuple[int, int], max_dist: float) -> float:
    """The matching tolerance in pixels: ``max_dist`` x the diagonal of ``shape``.

    Raises
    ------
    ValueError
        If ``max_dist`` is negative or not finite.
    """
    if not (np.isfinite(max_dist) and max_dist >= 0):
        raise ValueError(f"max_dist must be a finite fraction >= 0, got {max_dist!r}")
    return float(max_dist) * float(np.hypot(*shape))


def match_within(
    pred_tree: cKDTree | None, n_pred: int, gt_points: np.ndarray, radius: float
) -> tuple[np.ndarray, int]:
    """Maximum one-to-one matching of predicted and GT points at most ``radius`` apart.

    The bipartite graph of the close pairs is solved as a unit-capacity maximum flow
    (source -> predicted point -> GT point -> sink) with scipy's Dinic algorithm, which
    is O(E sqrt(V)) here. ``maximum_bipartite_matching`` gives the same cardinality but
    its Hopcroft-Karp search re-expands dead ends (scipy issue #26147) and took minutes
    on the layered graphs of parallel boundaries.

    Parameters
    ----------
    pred_tree : cKDTree or None
        Tree of the predicted points (None when there is none).
    n_pred : int
        Number of predicted points.
    gt_points : ndarray (M, 2)
        Ground-truth points.
    radius : float
        Largest matching distance (inclusive).

    Returns
    -------
    matched : ndarray (n_pred,) of bool
        The predicted points that are matched.
    n_matched : int
        Cardinality of the matching.
    """
    matched = np.zeros(n_pred, bool)
    if pred_tree is None or gt_points.size == 0:
        return matched, 0
    pairs = pred_tree.sparse_distance_matrix(cKDTree(gt_points), radius, output_type="ndarray")
    if pairs.size == 0:
        return matched, 0
    n_gt = len(gt_points)
    sink = n_pred + n_gt + 1
    tails = np.concatenate(
        [np.zeros(n_pred, np.int64), 1 + pairs["i"], 1 + n_pred + np.arange(n_gt)]
    )
    heads = np.concatenate(
        [1 + np.arange(n_pred), 1 + n_pred + pairs["j"], np.full(n_gt, sink, np.int64)]
    )
    graph = csr_matrix((np.ones(tails.size, np.int32), (tails, heads)), shape=(sink + 1, sink + 1))
    flow = maximum_flow(graph, 0, sink, method="dinic").flow.tocsr()
    row = flow[[0]].toarray()[0, 1 : n_pred + 1]
    matched = row > 0
    return matched, int(matched.sum())


def boundary_counts(
    points: np.ndarray, annotations: list[np.ndarray], radius: float
) -> dict[str, int]:
    """Match predicted boundary points against each annotation's boundary pixels.

    Parameters
    ----------
    points : ndarray (K, 2)
        Predicted boundary pixels (row, column), e.g. ``np.argwhere(boundary_map(s))``.
    annotations : list of ndarray (H, W) of int
        The human segmentations.
    radius : float
        Matching tolerance in pixels (:func:`matching_radius`).

    Returns
    -------
    dict
        ``boundary_matched_pred`` (predicted pixels matched for at least one annotator),
        ``boundary_pred``, ``boundary_matched_gt`` (matched GT pixels summed over
        annotators), ``boundary_gt`` (GT boundary pixels summed over annotators).
    """
    tree = cKDTree(points) if len(points) else None
    correct = np.zeros(len(points), bool)
    matched_gt = total_gt = 0
    for gt in annotations:
        gt_points = np.argwhere(boundary_map(gt))
        matched, n_matched = match_within(tree, len(points), gt_points, radius)
        correct |= matched
        matched_gt += n_matched
        total_gt += len(gt_points)
    return {
        "boundary_matched_pred": int(correct.sum()),
        "boundary_pred": len(points),
        "boundary_matched_gt": matched_gt,
        "boundary_gt": total_gt,
    }


def prf(counts: dict[str, Any]) -> dict[str, float]:
    """Precision, recall and F from the counts of :func:`boundary_counts` (or sums of
    them); an empty denominator gives 0, as in the benchmark."""
    matched_pred, n_pred = counts["boundary_matched_pred"], counts["boundary_pred"]
    matched_gt, n_gt = counts["boundary_matched_gt"], counts["boundary_gt"]
    precision = matched_pred / n_pred if n_pred else 0.0
    recall = matched_gt / n_gt if n_gt else 0.0
    f = 2.0 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f": f}
