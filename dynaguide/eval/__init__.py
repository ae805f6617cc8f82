"""Evaluation: segmentation metrics, dataset readers and the evaluation runner.

Segment-best-IoU (All / Fine / Coarse), VOC and COCO protocols live in
:mod:`dynaguide.eval.metrics`; the standard BSDS500 benchmark (Covering, PRI, VoI,
boundary F, ODS / OIS; Arbeláez et al., TPAMI 2011) in :mod:`dynaguide.eval.bsds_benchmark`.

Metrics and readers need only numpy/scipy/scikit-image; :func:`evaluate` calls
:func:`dynaguide.segment`.
"""

from __future__ import annotations

from dynaguide.eval.bsds_benchmark import (
    BOUNDARY_MAX_DIST,
    STANDARD_METRICS,
    boundary_map,
    boundary_precision_recall,
    ods_ois,
    probabilistic_rand_index,
    segmentation_covering,
    standard_image_scores,
    standard_scores,
    variation_of_information,
)
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
from dynaguide.eval.settings import EvalSettings

__all__ = [
    "BOUNDARY_MAX_DIST",
    "BSDS_MODES",
    "STANDARD_METRICS",
    "BSDS500Dataset",
    "DatasetError",
    "DatasetItem",
    "EvalSettings",
    "FolderDataset",
    "boundary_map",
    "boundary_precision_recall",
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
    "ods_ois",
    "open_dataset",
    "probabilistic_rand_index",
    "relabel_connected_components",
    "resize_nearest",
    "segment_best_iou",
    "segmentation_covering",
    "standard_image_scores",
    "standard_scores",
    "summarize",
    "variation_of_information",
    "voc_image_scores",
    "voc_scores",
]
