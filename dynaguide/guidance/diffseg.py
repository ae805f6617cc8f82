"""The DiffSeg guide (Tian et al., CVPR 2024): attention maps of any provider, merged into
pseudo-labels.

:class:`DiffSegGuide` takes the self-attention maps of an image from a provider and runs
:func:`diffseg_segment` on them. The pieces: aggregation, symmetric-KL merging
(:mod:`dynaguide.guidance.attention_merge`), k-means refinement and NMS
(:mod:`dynaguide.guidance.attention_labels`); the attention providers
(:mod:`dynaguide.guidance.vit_attention`: :class:`ViTAttention` reads a local Hugging Face
ViT / DINO / DINOv2 checkpoint folder or its ONNX export, and any callable
``image -> list of maps`` works); the export of a ViT's attention to ONNX is
:func:`dynaguide.export.export_vit_attention`. The names of those modules are importable
from here too.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from dynaguide.guidance.attention_labels import diffseg_segment, kmeans_refine, nms_labels
from dynaguide.guidance.attention_merge import (
    DEFAULT_CHUNK,
    aggregate_attention,
    anchor_grid,
    as_tensor,
    merge_attention,
    pairwise_symmetric_kl,
    tau_schedule,
)
from dynaguide.guidance.pretrained import (
    check_rgb_image,
)
from dynaguide.guidance.vit_attention import (  # noqa: F401 - the providers' names here too
    VIT_MODEL_TYPES,
    AttentionProvider,
    PatchAttention,
    ViTAttention,
    load_vit,
    vit_preprocessor,
)

__all__ = [
    "VIT_MODEL_TYPES",
    "AttentionProvider",
    "DiffSegGuide",
    "PatchAttention",
    "ViTAttention",
    "aggregate_attention",
    "anchor_grid",
    "diffseg_segment",
    "kmeans_refine",
    "merge_attention",
    "nms_labels",
    "pairwise_symmetric_kl",
]


# --------------------------------------------------------------------------------------
# The guide
# --------------------------------------------------------------------------------------


class DiffSegGuide:
    """DiffSeg-style attention merging as guidance.

    Parameters
    ----------
    checkpoint : path, optional
        A ViT / DINO / DINOv2 checkpoint folder or its ONNX export (see :class:`ViTAttention`).
    provider : callable, optional
        Any :class:`AttentionProvider` instead of ``checkpoint``.
    num_points : int or (int, int)
        Anchors per axis.
    tau : float or sequence of float
        KL threshold(s); 1.1 is DiffSeg's COCO value for Stable Diffusion attention and
        is not tuned for ViT attention.
    n_iter : int
        Merging iterations.
    refine : bool
        K-means refinement.
    layout : {"even", "reference"}
        Anchor layout (:func:`anchor_grid`); ``"even"`` suits the small grids of ViTs.
    weights : sequence of float, optional
        Resolution weights for multi-resolution providers.
    merge_device : str, optional
        Torch device for the merging ("cpu", "cuda"); default: the provider's tensors' device.
    dtype : torch.dtype
        Merging dtype.
    chunk_elements : int
        Memory bound of the merging temporaries.
    **provider_options
        Passed to :class:`ViTAttention` (``backend``, ``layers``, ``size``, ``device``,
        ``onnx_path``, ``threads``, ``verify``).
    """

    name = "diffseg"

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        *,
        provider: Callable[[np.ndarray], Sequence[Any]] | None = None,
        num_points: int | tuple[int, int] = 16,
        tau: float | Sequence[float] = 1.1,
        n_iter: int = 3,
        refine: bool = False,
        layout: str = "even",
        weights: Sequence[float] | None = None,
        merge_device: str | None = None,
        dtype: torch.dtype = torch.float32,
        chunk_elements: int = DEFAULT_CHUNK,
        **provider_options: Any,
    ):
        if (checkpoint is None) == (provider is None):
            raise ValueError(
                "the 'diffseg' guide needs exactly one of checkpoint=<folder or .onnx> "
                "and provider="
            )
        if provider is not None and not callable(provider):
            raise TypeError(f"provider must be callable, got {type(provider).__name__}")
        if provider is not None and provider_options:
            raise TypeError(f"options {sorted(provider_options)} only apply with checkpoint=")
        tau_schedule(tau, n_iter)
        anchor_grid(8, num_points, layout=layout)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.provider = (
            provider if provider is not None else ViTAttention(checkpoint, **provider_options)
        )
        self.num_points = num_points
        self.tau = tau
        self.n_iter = n_iter
        self.refine = refine
        self.layout = layout
        self.weights = weights
        self.merge_device = None if merge_device is None else torch.device(merge_device)
        self.dtype = dtype
        self.chunk_elements = chunk_elements

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W) int32 segment ids of an (H, W, 3) uint8 RGB image."""
        image = check_rgb_image(image, "diffseg guide")
        maps = list(self.provider(image))
        if self.merge_device is not None:
            maps = [as_tensor(m, "attention map").to(self.merge_device) for m in maps]
        return diffseg_segment(
            maps,
            image.shape[:2],
            num_points=self.num_points,
            tau=self.tau,
            n_iter=self.n_iter,
            refine=self.refine,
            layout=self.layout,
            weights=self.weights,
            chunk_elements=self.chunk_elements,
            dtype=self.dtype,
        )


def diffseg_guide_factory(
    checkpoint: str | os.PathLike | None = None, **options: Any
) -> DiffSegGuide:
    """Registry factory: ``get_guide("diffseg", checkpoint=PATH, **options)``."""
    if checkpoint is None and options.get("provider") is None:
        raise ValueError(
            "the 'diffseg' guide needs checkpoint=<local ViT/DINO/DINOv2 folder or .onnx export> "
            "(or provider=<callable>), e.g. guidance_options={'checkpoint': 'dino-vits16/'}"
        )
    return DiffSegGuide(checkpoint, **options)
