"""SmooSeg: dataset-level unsupervised semantic segmentation with a smoothness prior.

SmooSeg (Lan et al., "SmooSeg: Smoothness Prior for Unsupervised Semantic Segmentation",
NeurIPS 2023) trains one small head over frozen self-supervised patch features of a whole
dataset: a projector, student/teacher prototypes and two losses, a pairwise smoothness term
(close features should share a label, distant ones may differ, within an image and across
images) and a data term (the student's cosine logits against the teacher's hard labels).

Training: :func:`train`; labelling: :class:`SmooSegPredictor`; scoring: :func:`evaluate`;
backbones: :func:`load_backbone`. The command line is ``dynaguide smooseg``.
"""

from __future__ import annotations

from typing import Any

from dynaguide.smooseg.smoothness import (
    derangement,
    feature_similarity,
    smoothness_loss,
    smoothness_loss_factorised,
    smoothness_loss_reference,
)

#: Public names imported on first use (name -> module), so that importing the package stays light.
_LAZY = {
    "DenseFeatureBackbone": "dynaguide.smooseg.backbones",
    "CallableBackbone": "dynaguide.smooseg.backbones",
    "HFViTBackbone": "dynaguide.smooseg.vit_backbone",
    "load_backbone": "dynaguide.smooseg.backbones",
    "SmooSegConfig": "dynaguide.smooseg.model",
    "SmooSegHead": "dynaguide.smooseg.model",
    "TrainOptions": "dynaguide.smooseg.train",
    "train": "dynaguide.smooseg.train",
    "load_checkpoint": "dynaguide.smooseg.train",
    "SmooSegPredictor": "dynaguide.smooseg.predict",
    "predict_folder": "dynaguide.smooseg.predict",
    "evaluate": "dynaguide.smooseg.evaluate",
}

__all__ = [
    "derangement",
    "feature_similarity",
    "smoothness_loss",
    "smoothness_loss_factorised",
    "smoothness_loss_reference",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    """Import the lazily exported names on first access."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dynaguide.smooseg' has no attribute {name!r}")
