"""Evaluation: segmentation metrics (SPEC §6), dataset readers and the evaluation runner.

Metrics and readers need only numpy/scipy/scikit-image; :func:`evaluate` calls
:func:`dynaguide.segment`.
"""

from __future__ import annotations

from dynaguide.eval.datasets import (
    BSDS500Dataset,
    DatasetError,
    DatasetItem,
    FolderDataset,
    load_bsds_annotations,
    load_mask,
    open_dataset,
)
from dynaguide.eval.metrics import (
    BSDS_MODES,
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
from dynaguide.eval.runner import evaluate, load_cached, summarize

__all__ = [
    "BSDS_MODES",
    "BSDS500Dataset",
    "DatasetError",
    "DatasetItem",
    "FolderDataset",
    "bsds_image_scores",
    "bsds_scores",
    "coco_scores",
    "coco_scores_per_image_matching",
    "confusion_matrix",
    "evaluate",
    "hungarian_match",
    "load_bsds_annotations",
    "load_cached",
    "load_mask",
    "open_dataset",
    "relabel_connected_components",
    "resize_nearest",
    "segment_best_iou",
    "summarize",
    "voc_image_scores",
    "voc_scores",
]
