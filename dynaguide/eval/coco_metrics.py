"""Cluster/class Hungarian matching scores (COCO-Stuff-27 style).

:func:`coco_scores`: one confusion matrix over the whole dataset, ONE Hungarian
assignment (PiCIE / STEGO / SmooSeg protocol). :func:`coco_scores_per_image_matching`: a
Hungarian assignment per image with TP/FP/FN summed over the dataset (DiffSeg protocol;
much more lenient, not comparable with the former).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from dynaguide.eval.label_maps import (
    as_label_map,
    paired,
)

__all__ = ["coco_scores", "coco_scores_per_image_matching", "confusion_matrix", "hungarian_match"]


# ------------------------------------------------------------------- COCO-Stuff-27 style
def confusion_matrix(
    prediction: Any,
    target: Any,
    *,
    n_classes: int,
    n_clusters: int | None = None,
    ignore_index: int | None = 255,
) -> np.ndarray:
    """Pixel confusion matrix, rows = GT classes, columns = predicted clusters.

    Parameters
    ----------
    prediction : ndarray (H, W) of int
        Cluster ids, >= 0.
    target : ndarray (H, W) of int
        Class ids in ``[0, n_classes)``; pixels equal to ``ignore_index`` are dropped.
    n_classes : int
    n_clusters : int, optional
        Number of columns; cluster ids must be below it. Default: ``max(prediction) + 1``.
    ignore_index : int or None

    Returns
    -------
    ndarray (n_classes, n_clusters) int64
    """
    pred = as_label_map(prediction, "prediction")
    gt = as_label_map(target, "target")
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target shape {gt.shape}")
    if not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    g, p = gt.reshape(-1).astype(np.int64), pred.reshape(-1).astype(np.int64)
    if ignore_index is not None:
        keep = g != ignore_index
        g, p = g[keep], p[keep]
    if g.size and (g.min() < 0 or g.max() >= n_classes):
        bad = g[(g < 0) | (g >= n_classes)][0]
        raise ValueError(
            f"target holds class {bad} outside [0, {n_classes}) "
            f"that is not ignore_index={ignore_index}"
        )
    if p.size and p.min() < 0:
        raise ValueError(f"prediction holds negative cluster id {p.min()}")
    top = int(p.max()) + 1 if p.size else 1
    if n_clusters is None:
        n_clusters = top
    elif top > n_clusters:
        raise ValueError(f"prediction holds cluster id {top - 1} >= n_clusters={n_clusters}")
    return np.bincount(g * n_clusters + p, minlength=n_classes * n_clusters).reshape(
        n_classes, n_clusters
    )


def hungarian_match(confusion: Any) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one class/cluster assignment maximising the matched pixels.

    Parameters
    ----------
    confusion : ndarray (n_classes, n_clusters)
        Rows GT classes, columns clusters; rectangular is fine: ``min(n_classes,
        n_clusters)`` pairs are matched.

    Returns
    -------
    classes, clusters : ndarray of int
        Matched pairs (``classes`` sorted).
    """
    c = np.asarray(confusion)
    if c.ndim != 2 or c.size == 0:
        raise ValueError(f"confusion must be a non-empty 2-D matrix, got shape {c.shape}")
    if c.dtype.kind not in "biuf":
        raise TypeError(f"confusion must hold real counts, got dtype {c.dtype}")
    if not np.all(np.isfinite(c)):
        raise ValueError("confusion holds NaN or infinite counts")
    rows, cols = linear_sum_assignment(c, maximize=True)
    return rows, cols


def _match_counts(
    confusion: np.ndarray, classes: np.ndarray, clusters: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP, FP, FN per class for a matching (FP counts only the matched cluster's column)."""
    n_classes = confusion.shape[0]
    tp = np.zeros(n_classes, np.int64)
    fp = np.zeros(n_classes, np.int64)
    tp[classes] = confusion[classes, clusters]
    fp[classes] = confusion[:, clusters].sum(axis=0) - tp[classes]
    fn = confusion.sum(axis=1) - tp
    return tp, fp, fn


def _finish_coco(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, n_pixels: int) -> dict[str, Any]:
    denom = (tp + fp + fn).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(denom > 0, tp / np.where(denom > 0, denom, 1), np.nan)
    valid = ~np.isnan(iou)
    return {
        "pixel_accuracy": float(tp.sum() / n_pixels) if n_pixels else float("nan"),
        "mIoU": float(iou[valid].mean()) if valid.any() else float("nan"),
        "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
        "tp": tp.tolist(),
        "fp": fp.tolist(),
        "fn": fn.tolist(),
        "n_pixels": int(n_pixels),
    }


def coco_scores(
    predictions: Iterable[Any],
    targets: Iterable[Any],
    *,
    n_classes: int = 27,
    n_clusters: int | None = None,
    ignore_index: int | None = 255,
) -> dict[str, Any]:
    """COCO-Stuff-27 protocol of PiCIE / STEGO / SmooSeg: ONE matching.

    1. One confusion matrix over the whole dataset (cluster ids are taken as given, so
       they must mean the same thing in every image, e.g. a global cluster probe).
    2. ONE Hungarian assignment clusters <-> classes maximising matched pixels
       (``n_clusters != n_classes`` allowed: unmatched clusters' pixels are errors,
       unmatched classes get TP = 0).
    3. pixel accuracy = sum TP / labelled pixels; mIoU = nanmean over classes of
       TP / (TP + FP + FN) (a class with no GT pixel and no matched prediction is NaN).

    Parameters
    ----------
    predictions : iterable of ndarray (H, W) of int
        Cluster ids >= 0.
    targets : iterable of ndarray (H, W) of int
        Class ids in ``[0, n_classes)`` or ``ignore_index``.
    n_classes : int
        27 for COCO-Stuff-27 ("COCO-All").
    n_clusters : int, optional
        Default: the largest cluster id seen + 1.
    ignore_index : int or None
        Target value dropped from scoring (default 255).

    Returns
    -------
    dict
        ``pixel_accuracy``, ``mIoU``, ``per_class_iou`` (None for NaN), ``tp``, ``fp``,
        ``fn``, ``n_pixels``, ``assignment`` (class -> cluster pairs), ``confusion``,
        ``n_images``.
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    conf = np.zeros((n_classes, n_clusters or 1), np.int64)
    n_images = 0
    for i, (pred, gt) in enumerate(paired(predictions, targets, "predictions", "targets")):
        try:
            c = confusion_matrix(
                pred, gt, n_classes=n_classes, n_clusters=n_clusters, ignore_index=ignore_index
            )
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"image {i}: {exc}") from None
        if c.shape[1] > conf.shape[1]:
            conf = np.pad(conf, ((0, 0), (0, c.shape[1] - conf.shape[1])))
        conf[:, : c.shape[1]] += c
        n_images += 1
    if n_images == 0:
        raise ValueError("coco_scores needs at least one image")
    classes, clusters = hungarian_match(conf)
    out = _finish_coco(*_match_counts(conf, classes, clusters), int(conf.sum()))
    out["assignment"] = [[int(a), int(b)] for a, b in zip(classes, clusters, strict=True)]
    out["confusion"] = conf.tolist()
    out["n_images"] = n_images
    return out


def coco_scores_per_image_matching(
    predictions: Iterable[Any],
    targets: Iterable[Any],
    *,
    n_classes: int = 27,
    ignore_index: int | None = 255,
) -> dict[str, Any]:
    """DiffSeg's COCO-Stuff-27 protocol (Tian et al., CVPR 2024): a Hungarian matching PER IMAGE.

    For each image, the ``n_classes x max(n_classes, max_id + 1)`` confusion matrix is
    matched one-to-one (maximising matched pixels; cluster ids used as given, as in
    DiffSeg's ``hungarian_matching``); TP, FP (matched clusters' columns only) and FN
    per class and the labelled pixel count are summed over the dataset; then pixel
    accuracy = sum TP / pixels and mIoU = nanmean_c TP / (TP + FP + FN). Much more
    lenient than :func:`coco_scores`; the numbers are not comparable.

    Parameters
    ----------
    predictions : iterable of ndarray (H, W) of int
    targets : iterable of ndarray (H, W) of int
    n_classes : int
    ignore_index : int or None

    Returns
    -------
    dict
        ``pixel_accuracy``, ``mIoU``, ``per_class_iou``, ``tp``, ``fp``, ``fn``,
        ``n_pixels``, ``n_images``.
    """
    tp = np.zeros(n_classes, np.int64)
    fp = np.zeros(n_classes, np.int64)
    fn = np.zeros(n_classes, np.int64)
    n_pixels, n_images = 0, 0
    for i, (pred, gt) in enumerate(paired(predictions, targets, "predictions", "targets")):
        try:
            p = as_label_map(pred, "prediction")
            top = int(p.max()) + 1 if p.size else 1
            conf = confusion_matrix(
                p,
                gt,
                n_classes=n_classes,
                n_clusters=max(n_classes, top),
                ignore_index=ignore_index,
            )
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"image {i}: {exc}") from None
        a, b, c = _match_counts(conf, *hungarian_match(conf))
        tp += a
        fp += b
        fn += c
        n_pixels += int(conf.sum())
        n_images += 1
    if n_images == 0:
        raise ValueError("coco_scores_per_image_matching needs at least one image")
    out = _finish_coco(tp, fp, fn, n_pixels)
    out["n_images"] = n_images
    return out
