"""Evaluation: segmentation metrics, dataset readers and the evaluation runner.

Segment-best-IoU (All / Fine / Coarse), VOC and COCO protocols live in
:mod:`dynaguide.eval.metrics`; the standard BSDS500 benchmark (Covering, PRI, VoI,
boundary F, ODS / OIS; Arbeláez et al., TPAMI 2011) in :mod:`dynaguide.eval.bsds_benchmark`.

Metrics and readers need only numpy/scipy/scikit-image; :func:`evaluate` calls
:func:`dynaguide.segment`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dynaguide._lazy import attach as _attach

#: public name -> the module that defines it (imported on first access).
_LAZY: dict[str, str] = {
    "BOUNDARY_MAX_DIST": "dynaguide.eval.bsds_benchmark",
    "BSDS500Dataset": "dynaguide.eval.datasets",
    "BSDS_MODES": "dynaguide.eval.metrics",
    "DatasetError": "dynaguide.eval.datasets",
    "DatasetItem": "dynaguide.eval.datasets",
    "FolderDataset": "dynaguide.eval.datasets",
    "STANDARD_METRICS": "dynaguide.eval.bsds_benchmark",
    "boundary_map": "dynaguide.eval.bsds_benchmark",
    "boundary_precision_recall": "dynaguide.eval.bsds_benchmark",
    "bsds_image_scores": "dynaguide.eval.metrics",
    "bsds_scores": "dynaguide.eval.metrics",
    "coco_scores": "dynaguide.eval.metrics",
    "coco_scores_per_image_matching": "dynaguide.eval.metrics",
    "confusion_matrix": "dynaguide.eval.metrics",
    "EvalSettings": "dynaguide.eval.settings",
    "evaluate": "dynaguide.eval.runner",
    "hungarian_match": "dynaguide.eval.metrics",
    "load_bsds_annotations": "dynaguide.eval.datasets",
    "load_cached": "dynaguide.eval.runner",
    "load_mask": "dynaguide.eval.datasets",
    "ods_ois": "dynaguide.eval.bsds_benchmark",
    "open_dataset": "dynaguide.eval.datasets",
    "probabilistic_rand_index": "dynaguide.eval.bsds_benchmark",
    "relabel_connected_components": "dynaguide.eval.metrics",
    "resize_nearest": "dynaguide.eval.metrics",
    "segment_best_iou": "dynaguide.eval.metrics",
    "segmentation_covering": "dynaguide.eval.bsds_benchmark",
    "standard_image_scores": "dynaguide.eval.bsds_benchmark",
    "standard_scores": "dynaguide.eval.bsds_benchmark",
    "summarize": "dynaguide.eval.runner",
    "variation_of_information": "dynaguide.eval.bsds_benchmark",
    "voc_image_scores": "dynaguide.eval.metrics",
    "voc_scores": "dynaguide.eval.metrics",
}

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

if TYPE_CHECKING:  # what static checkers and IDEs see
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

__getattr__, __dir__ = _attach(__name__, _LAZY)
