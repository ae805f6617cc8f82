"""SmooSeg: dataset-level unsupervised semantic segmentation with a smoothness prior.

SmooSeg (Lan et al., "SmooSeg: Smoothness Prior for Unsupervised Semantic Segmentation",
NeurIPS 2023) trains one small head over frozen self-supervised patch features of a whole
dataset: a projector, student/teacher prototypes and two losses, a pairwise smoothness term
(close features should share a label, distant ones may differ, within an image and across
images) and a data term (the student's cosine logits against the teacher's hard labels).
"""

from __future__ import annotations

from dynaguide.smooseg.smoothness import (
    derangement,
    feature_similarity,
    smoothness_loss,
    smoothness_loss_factorised,
    smoothness_loss_reference,
)

__all__ = [
    "derangement",
    "feature_similarity",
    "smoothness_loss",
    "smoothness_loss_factorised",
    "smoothness_loss_reference",
]
