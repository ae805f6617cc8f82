"""From merged attention proposals to a label map: optional k-means refinement, then NMS
(upsample and argmax); :func:`diffseg_segment` runs the whole DiffSeg algorithm
(aggregate, merge, refine, NMS; Tian et al., CVPR 2024) on a list of attention maps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dynaguide.guidance.attention_merge import (
    DEFAULT_CHUNK,
    aggregate_attention,
    check_grid_shape,
    chunk_rows,
    merge_attention,
)

__all__ = ["diffseg_segment", "kmeans_refine", "nms_labels"]


def kmeans_refine(
    attention: torch.Tensor, proposals: torch.Tensor, *, max_iter: int = 300
) -> torch.Tensor:
    """K-means over all query maps, initialised at the proposals (DiffSeg's ``refine``).

    Parameters
    ----------
    attention : Tensor (Gh, Gw, Gh, Gw)
    proposals : Tensor (K, Gh, Gw)
    max_iter : int
        Lloyd iterations (scikit-learn's default 300).

    Returns
    -------
    Tensor (K', Gh, Gw)
        Means of the non-empty clusters (K' <= K), in cluster order.
    """
    from sklearn.cluster import KMeans

    gh, gw = attention.shape[:2]
    x = attention.reshape(gh * gw, gh * gw).detach().cpu().double().numpy()
    init = proposals.reshape(proposals.shape[0], -1).detach().cpu().double().numpy()
    if init.shape[0] == 1:
        return proposals
    km = KMeans(n_clusters=init.shape[0], init=init, n_init=1, max_iter=max_iter).fit(x)
    labels = km.labels_
    means = [x[labels == k].mean(0) for k in np.unique(labels)]
    out = torch.as_tensor(np.stack(means), dtype=proposals.dtype, device=proposals.device)
    return out.reshape(-1, gh, gw)


def nms_labels(
    proposals: torch.Tensor, out_size: tuple[int, int], *, chunk_elements: int = DEFAULT_CHUNK
) -> np.ndarray:
    """Upsample the proposals bilinearly to ``out_size`` and take the per-pixel argmax.

    The argmax runs over chunks of proposals, so at most ``chunk_elements`` upsampled
    values exist at once.

    Returns
    -------
    ndarray (H, W) int32
        Index of the winning proposal (ties go to the lower index).
    """
    if proposals.ndim != 3 or proposals.shape[0] < 1:
        raise ValueError(
            f"proposals must have shape (K, Gh, Gw) with K >= 1, got {tuple(proposals.shape)}"
        )
    h, w = check_grid_shape(out_size, "out_size")
    step = chunk_rows(proposals.shape[0], h * w, chunk_elements)
    best = torch.full((h, w), -math.inf, dtype=proposals.dtype, device=proposals.device)
    label = torch.zeros((h, w), dtype=torch.int32, device=proposals.device)
    for start in range(0, proposals.shape[0], step):
        up = F.interpolate(
            proposals[None, start : start + step], size=(h, w), mode="bilinear", align_corners=False
        )[0]
        val, arg = up.max(0)
        better = val > best
        best = torch.where(better, val, best)
        label = torch.where(better, arg.to(torch.int32) + start, label)
    return label.cpu().numpy()


def diffseg_segment(
    maps: Any,
    out_size: tuple[int, int],
    *,
    num_points: int | tuple[int, int] = 16,
    tau: float | Sequence[float] = 1.1,
    n_iter: int = 3,
    refine: bool = False,
    layout: str = "reference",
    weights: Sequence[float] | None = None,
    anchors: np.ndarray | None = None,
    chunk_elements: int = DEFAULT_CHUNK,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """The whole DiffSeg pipeline on attention maps: aggregate, merge, refine, NMS.

    Parameters
    ----------
    maps : tensor or sequence of tensors
        See :func:`aggregate_attention`.
    out_size : (int, int)
        (H, W) of the label map (the image size).
    num_points, tau, n_iter, layout, anchors, chunk_elements
        See :func:`merge_attention`.
    refine : bool
        K-means refinement (:func:`kmeans_refine`).
    weights : sequence of float, optional
        Resolution weights (:func:`aggregate_attention`).
    dtype : torch.dtype
        Computation dtype (float32 or float64).

    Returns
    -------
    ndarray (H, W) int32
        Segment ids 0..K-1 (ids whose proposal never wins do not appear).

    Examples
    --------
    >>> import torch
    >>> a = torch.full((4, 4, 4, 4), 1 / 16.0)
    >>> diffseg_segment(a, (8, 8), num_points=2).max()
    0
    """
    agg = aggregate_attention(maps, weights=weights, dtype=dtype)
    proposals = merge_attention(
        agg,
        num_points=num_points,
        tau=tau,
        n_iter=n_iter,
        layout=layout,
        anchors=anchors,
        chunk_elements=chunk_elements,
    )
    if refine:
        proposals = kmeans_refine(agg, proposals)
    return nms_labels(proposals, out_size, chunk_elements=chunk_elements)
