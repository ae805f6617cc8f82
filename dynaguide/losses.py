"""The refinement losses: feature similarity, spatial continuity and guidance.

Each public function is a plain PyTorch reference plus a call-time dispatch to a fast
path (Triton on CUDA, the native C++ extension on CPU; see :mod:`dynaguide.backend`).
All of them accept a response map of shape ``(C, H, W)`` (one image) or
``(N, C, H, W)`` (N independent images) and keep everything on the tensor's device:
no host synchronisation happens inside them.

Semantics (DFC's similarity and continuity losses, DynaGuide's Huber continuity):

* similarity: softmax cross-entropy of every pixel's C-vector against its own argmax
  (labels carry no gradient), averaged over the H*W pixels of each image.
* continuity: for each direction (vertical, horizontal and, with 8 neighbours, the two
  diagonals) the penalty of the neighbour differences averaged over that direction's
  own element count ``C * (#pixel pairs)``; the directions are summed. A direction with
  no pixel pair (H or W equal to 1) contributes 0.
* guidance: cross-entropy against aligned guide labels, averaged over the pixels whose
  target is not ``ignore_index`` (0 when there are none).

``reduction`` is ``"mean"`` (mean over the N images of the per-image losses; for a
single image this is just its loss), ``"sum"`` or ``"none"`` (shape ``(N,)``; for a
``(C, H, W)`` input a 0-dim tensor).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from dynaguide import dispatch, op_checks
from dynaguide.op_checks import check_response as _check_response
from dynaguide.op_checks import reduce as _reduce

Penalty = Literal["l1", "huber"]
Reduction = Literal["mean", "sum", "none"]


def _check_options(penalty: str, neighbors: int, delta: float) -> None:
    op_checks.check_continuity_options(penalty, neighbors, delta)


def _fast(op: str, device: torch.device, backend: str | None) -> Callable | None:
    """The fast implementation of ``op`` for ``device`` (:mod:`dynaguide.dispatch`), or None
    when the plain PyTorch reference is chosen."""
    chosen = dispatch.resolve(op, device, backend)
    return None if chosen.backend == "torch" else chosen.fn


# ----------------------------------------------------------------------- references
def neighbor_differences(r: torch.Tensor, neighbors: int = 8) -> list[torch.Tensor]:
    """Differences between neighbouring pixels of ``r`` (N, C, H, W), one tensor per direction.

    Order: vertical (i+1, j) - (i, j); horizontal (i, j+1) - (i, j); with 8 neighbours
    also the diagonal (i+1, j+1) - (i, j) and the anti-diagonal (i+1, j) - (i, j+1).
    """
    diffs = [r[:, :, 1:, :] - r[:, :, :-1, :], r[:, :, :, 1:] - r[:, :, :, :-1]]
    if neighbors == 8:
        diffs.append(r[:, :, 1:, 1:] - r[:, :, :-1, :-1])
        diffs.append(r[:, :, 1:, :-1] - r[:, :, :-1, 1:])
    return diffs


def continuity_loss_reference(
    response: torch.Tensor,
    *,
    penalty: Penalty = "huber",
    neighbors: int = 8,
    delta: float = 1.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Plain PyTorch continuity loss; see :func:`continuity_loss` for the semantics."""
    _check_options(penalty, neighbors, delta)
    r = _check_response(response)
    if r.dtype in (torch.float16, torch.bfloat16):
        r = r.float()
    n = r.shape[0]
    total = r.sum(dim=(1, 2, 3)) * 0  # keeps the graph when no direction has a pair (1x1)
    for d in neighbor_differences(r, neighbors):
        if d.numel() == 0:
            continue
        if penalty == "l1":
            p = d.abs()
        else:
            p = F.huber_loss(d, torch.zeros_like(d), reduction="none", delta=delta)
        total = total + p.reshape(n, -1).mean(dim=1)
    return _reduce(total, reduction, response.dim() == 4)


def count_labels(labels: torch.Tensor, n_channels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image label histogram (N, n_channels) and number of distinct labels (N,), on device."""
    n = labels.shape[0]
    flat = labels.reshape(n, -1)
    hist = torch.zeros(n, n_channels, dtype=torch.int64, device=labels.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    return hist, (hist > 0).sum(dim=1)


def similarity_loss_reference(
    response: torch.Tensor, *, reduction: Reduction = "mean"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain PyTorch similarity loss; see :func:`similarity_loss`."""
    r = _check_response(response)
    if r.dtype in (torch.float16, torch.bfloat16):
        r = r.float()
    n, c = r.shape[:2]
    labels = r.detach().argmax(dim=1)  # (N, H, W), first maximum on ties
    ce = F.cross_entropy(r, labels, reduction="none").reshape(n, -1).mean(dim=1)
    _, k = count_labels(labels, c)
    batched = response.dim() == 4
    return (
        _reduce(ce, reduction, batched),
        (labels if batched else labels[0]),
        (k if batched else k[0]),
    )


def guidance_loss_reference(
    response: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -1,
    reduction: Reduction = "mean",
    validate: bool = True,
) -> torch.Tensor:
    """Plain PyTorch guidance loss; see :func:`guidance_loss`."""
    r = _check_response(response)
    t = _check_target(target, r, response.dim() == 4)
    op_checks.check_reduction(reduction)
    if validate:
        op_checks.check_target_values(t, r.shape[1], ignore_index)
    if r.dtype in (torch.float16, torch.bfloat16):
        r = r.float()
    n = r.shape[0]
    # any ignore_index (even >= C); other negative targets count as class 0, as in the fast paths
    safe = torch.where(t == ignore_index, 0, t).clamp_min(0)
    ce = F.cross_entropy(r, safe, reduction="none")
    valid = (t != ignore_index).to(ce.dtype)
    per_image = (ce * valid).reshape(n, -1).sum(1) / valid.reshape(n, -1).sum(1).clamp_min(1.0)
    return _reduce(per_image, reduction, response.dim() == 4)


def _check_target(target: torch.Tensor, r: torch.Tensor, batched: bool) -> torch.Tensor:
    """Validated target (N, H, W) as int64 (see :func:`dynaguide.op_checks.check_target`)."""
    return op_checks.check_target(target, r, batched).long()


# --------------------------------------------------------------------------- public
def continuity_loss(
    response: torch.Tensor,
    *,
    penalty: Penalty = "huber",
    neighbors: int = 8,
    delta: float = 1.0,
    reduction: Reduction = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """Spatial-continuity loss of a response map.

    Parameters
    ----------
    response : Tensor, shape (C, H, W) or (N, C, H, W)
        Float response map (float32, float64 or bfloat16).
    penalty : {"huber", "l1"}
        Huber (``0.5 d**2`` for ``|d| < delta``, else ``delta * (|d| - delta / 2)``;
        with ``delta=1`` this is ``nn.SmoothL1Loss``) or absolute difference (DFC).
    neighbors : {8, 4}
        8 adds the two diagonal directions to the vertical and horizontal ones.
    delta : float
        Huber threshold (ignored by L1).
    reduction : {"mean", "sum", "none"}
        Over the N images; see the module docstring.
    backend : str, optional
        Force ``"torch"``, ``"triton"`` or ``"native"`` for this call.

    Returns
    -------
    Tensor
        Scalar, or ``(N,)`` with ``reduction="none"``; differentiable.

    Examples
    --------
    >>> import torch
    >>> r = torch.zeros(3, 4, 5)
    >>> float(continuity_loss(r))
    0.0
    """
    _check_options(penalty, neighbors, delta)
    _check_response(response)
    fast = _fast("continuity_loss", response.device, backend)
    if fast is None:
        return continuity_loss_reference(
            response, penalty=penalty, neighbors=neighbors, delta=delta, reduction=reduction
        )
    return fast(response, penalty=penalty, neighbors=neighbors, delta=delta, reduction=reduction)


def similarity_loss(
    response: torch.Tensor, *, reduction: Reduction = "mean", backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feature-similarity loss: cross-entropy of each pixel against its own argmax.

    Parameters
    ----------
    response : Tensor, shape (C, H, W) or (N, C, H, W)
    reduction : {"mean", "sum", "none"}
    backend : str, optional
        Force a backend for this call.

    Returns
    -------
    loss : Tensor
        Scalar (or ``(N,)``), differentiable with respect to ``response``.
    labels : Tensor
        int64 argmax labels, shape (H, W) or (N, H, W); the first maximum wins ties.
    n_labels : Tensor
        int64 number of distinct labels K, 0-dim or ``(N,)``, on the response's device.
    """
    _check_response(response)
    fast = _fast("similarity_loss", response.device, backend)
    if fast is None:
        return similarity_loss_reference(response, reduction=reduction)
    return fast(response, reduction=reduction)


def guidance_loss(
    response: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -1,
    reduction: Reduction = "mean",
    backend: str | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """Cross-entropy of the response against guide labels aligned to its channels.

    Parameters
    ----------
    response : Tensor, shape (C, H, W) or (N, C, H, W)
    target : integer Tensor, shape (H, W) or (N, H, W)
        Channel index per pixel, or ``ignore_index`` for pixels without guidance. A
        negative value other than ``ignore_index`` counts as class 0; a class ``>= C``
        raises ValueError on every backend (:func:`dynaguide.op_checks.check_target_values`).
    ignore_index : int
    reduction : {"mean", "sum", "none"}
    backend : str, optional
    validate : bool
        Check the target's values (one host synchronisation on a GPU); the refinement loop,
        whose targets come from the guide aligner, passes False.
    """
    r = _check_response(response)
    t = _check_target(target, r, response.dim() == 4)
    op_checks.check_reduction(reduction)
    if validate:
        op_checks.check_target_values(t, r.shape[1], ignore_index)
    fast = dispatch.resolve("guidance_loss", response.device, backend).fn
    return fast(response, target, ignore_index=ignore_index, reduction=reduction, validate=False)
