"""SmooSeg: dataset-level unsupervised semantic segmentation with a smoothness prior.

SmooSeg (Lan et al., "SmooSeg: Smoothness Prior for Unsupervised Semantic Segmentation",
NeurIPS 2023) trains one small head over frozen self-supervised patch features of a whole
dataset: a projector, student/teacher prototypes and two losses, a pairwise smoothness term
(close features should share a label, distant ones may differ, within an image and across
images) and a data term (the student's cosine logits against the teacher's hard labels).

Training: :func:`dynaguide.smooseg.train.train`; labelling: :class:`SmooSegPredictor`;
scoring: :func:`dynaguide.smooseg.evaluate.evaluate` (the submodules share the functions'
names, so the package does not re-export them); backbones: :func:`load_backbone`. The command line is ``dynaguide smooseg``.
"""

from __future__ import annotations

from dynaguide._lazy import attach as _attach

#: Public names imported on first use (name -> module), so that importing the package (and
#: ``dynaguide --help``, which registers ``dynaguide smooseg``) does not import torch.
_LAZY = {
    "CallableBackbone": "dynaguide.smooseg.backbones",
    "DenseFeatureBackbone": "dynaguide.smooseg.backbones",
    "HFViTBackbone": "dynaguide.smooseg.vit_backbone",
    "SmooSegConfig": "dynaguide.smooseg.model",
    "SmooSegHead": "dynaguide.smooseg.model",
    "SmooSegPredictor": "dynaguide.smooseg.predict",
    "TrainOptions": "dynaguide.smooseg.train",
    "derangement": "dynaguide.smooseg.smoothness",
    "feature_similarity": "dynaguide.smooseg.smoothness",
    "load_backbone": "dynaguide.smooseg.backbones",
    "load_checkpoint": "dynaguide.smooseg.train",
    "predict_folder": "dynaguide.smooseg.predict",
    "smoothness_loss": "dynaguide.smooseg.smoothness",
    "smoothness_loss_factorised": "dynaguide.smooseg.smoothness",
    "smoothness_loss_reference": "dynaguide.smooseg.smoothness",
}

__all__ = [  # the names of _LAZY
    "CallableBackbone",
    "DenseFeatureBackbone",
    "HFViTBackbone",
    "SmooSegConfig",
    "SmooSegHead",
    "SmooSegPredictor",
    "TrainOptions",
    "derangement",
    "feature_similarity",
    "load_backbone",
    "load_checkpoint",
    "predict_folder",
    "smoothness_loss",
    "smoothness_loss_factorised",
    "smoothness_loss_reference",
]

__getattr__, __dir__ = _attach(__name__, _LAZY)
