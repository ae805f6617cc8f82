"""Fused CPU refinement losses backed by the native extension ``dynaguide._native``.

Drop-in fast paths for :mod:`dynaguide.losses` on CPU tensors, found there by name:
:func:`continuity_loss`, :func:`similarity_loss` and :func:`guidance_loss` take the
same arguments as the public functions (minus ``backend``) and return the same values
as the ``*_reference`` functions.

Each loss reads the response once in C++ (OpenMP over rows, unit-stride inner loops
over channels for channels-last responses and over pixels for contiguous ones; other
layouts are copied to contiguous first).

* similarity and guidance write ``d(loss_n)/d(response)`` during the forward pass (the
  softmax is computed once); backward only scales it by ``grad_output`` (and returns it
  as is when that is 1).
* continuity computes its gradient in backward, in one pass that already includes the
  ``grad_output`` scale, so the forward pass only reads.

Gradient formulas (per image, P = H * W pixels, softmax ``s`` of a pixel's C-vector):
similarity ``dL/dr[c, p] = (s[c, p] - [c == argmax_p]) / P``; guidance the same with the
target class and ``1 / #valid`` (0 on ignored pixels); continuity
``dL/dr[p] = sum over the pairs (a, b) holding p of +-w_dir * penalty'(r[a] - r[b])``
with ``w_dir = 1 / (C * #pairs_dir)``, ``+`` when p is the later pixel ``a``,
``penalty'`` = ``clamp(d, -delta, delta)`` (Huber) or ``sign(d)`` (L1).

float16/bfloat16 responses are computed in float32 (as the references do). All
functions run on CPU tensors only.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch

from dynaguide.losses import Penalty, Reduction
from dynaguide.op_checks import check_continuity_options as _check_options
from dynaguide.op_checks import check_reduction as _check_reduction
from dynaguide.op_checks import check_response as _check_response
from dynaguide.op_checks import check_target
from dynaguide.op_checks import reduce as _reduce

__all__ = ["continuity_loss", "guidance_loss", "similarity_loss"]


def _native() -> ModuleType:
    return importlib.import_module("dynaguide._native")


def _prepare(response: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Validate; return a detached (N, C, H, W) float32/float64 CPU view the kernels take."""
    r = _check_response(response)
    if r.device.type != "cpu":
        raise ValueError(f"response must be a CPU tensor for the native losses, got {r.device}")
    x = r.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if not _layout_ok(x):
        x = x.contiguous()
    return x, response.dim() == 4


def _layout_ok(x: torch.Tensor) -> bool:
    """Whether each image of x (N, C, H, W) is dense planar or dense channels-last."""
    _, c, h, w = x.shape
    _, sc, sh, sw = x.stride()
    cl = (c == 1 or sc == 1) and (w == 1 or sw == c) and (h == 1 or sh == w * c)
    planar = (w == 1 or sw == 1) and (h == 1 or sh == w) and (c == 1 or sc == h * w)
    return cl or planar


def _scale(grad_output: torch.Tensor, reduction: str, n: int) -> torch.Tensor:
    """d(output)/d(loss_n) times grad_output, as float64 (N,)."""
    g = grad_output.detach().to(torch.float64)
    if reduction == "none":
        return g.reshape(n).contiguous()
    if reduction == "mean":
        g = g / n
    return g.reshape(1).expand(n).contiguous()


def _out_dtype(response: torch.Tensor) -> torch.dtype:
    return torch.float64 if response.dtype == torch.float64 else torch.float32


def _needs_grad(response: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and response.requires_grad


def _scaled(grad: torch.Tensor, scale: torch.Tensor, batched: bool) -> torch.Tensor:
    """grad (N, C, H, W) times the per-image scale; no copy when the scale is 1."""
    if not bool((scale == 1).all()):
        grad = grad * scale.to(grad.dtype).reshape(-1, 1, 1, 1)
    return grad if batched else grad[0]


# ------------------------------------------------------------------------ continuity
class _Continuity(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        response: torch.Tensor,
        x: torch.Tensor,
        l1: bool,
        neighbors: int,
        delta: float,
        reduction: str,
        batched: bool,
    ) -> torch.Tensor:
        loss = torch.empty(x.shape[0], dtype=torch.float64)
        _native().continuity_forward(x, l1, neighbors, float(delta), loss)
        ctx.save_for_backward(x)
        ctx.args, ctx.reduction, ctx.batched = (l1, neighbors, float(delta)), reduction, batched
        return _reduce(loss.to(_out_dtype(response)), reduction, batched)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (x,) = ctx.saved_tensors
        scale = _scale(grad_output, ctx.reduction, x.shape[0])
        grad = torch.empty_like(x)  # keeps x's (contiguous or channels-last) strides
        _native().continuity_backward(x, *ctx.args, scale, grad)
        return (grad if ctx.batched else grad[0]), None, None, None, None, None, None


def continuity_loss(
    response: torch.Tensor,
    *,
    penalty: Penalty = "huber",
    neighbors: int = 8,
    delta: float = 1.0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """Fused CPU spatial-continuity loss; see :func:`dynaguide.losses.continuity_loss`.

    Parameters
    ----------
    response : Tensor, shape (C, H, W) or (N, C, H, W)
        CPU float response map.
    penalty : {"huber", "l1"}
    neighbors : {8, 4}
    delta : float
        Huber threshold (ignored by L1).
    reduction : {"mean", "sum", "none"}

    Returns
    -------
    Tensor
        Scalar, or ``(N,)`` with ``reduction="none"``; differentiable.

    Examples
    --------
    >>> import torch
    >>> r = torch.zeros(3, 4, 5, requires_grad=True)
    >>> loss = continuity_loss(r)
    >>> float(loss.detach()), loss.requires_grad
    (0.0, True)
    """
    _check_options(penalty, neighbors, delta)
    _check_reduction(reduction)
    x, batched = _prepare(response)
    return _Continuity.apply(response, x, penalty == "l1", neighbors, delta, reduction, batched)


# ------------------------------------------------------------------------ similarity
class _Similarity(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, response: torch.Tensor, x: torch.Tensor, reduction: str, batched: bool, need: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, _, h, w = x.shape
        labels = torch.empty((n, h, w), dtype=torch.int64)
        k = torch.empty(n, dtype=torch.int64)
        loss = torch.empty(n, dtype=torch.float64)
        grad = torch.empty_like(x) if need else None
        _native().similarity_forward(x, labels, grad, loss, k)
        ctx.grad, ctx.reduction, ctx.batched = grad, reduction, batched
        if not batched:
            labels, k = labels[0], k[0]
        ctx.mark_non_differentiable(labels, k)
        return _reduce(loss.to(_out_dtype(response)), reduction, batched), labels, k

    @staticmethod
    def backward(
        ctx: Any, grad_output: torch.Tensor, _labels: Any, _k: Any
    ) -> tuple[torch.Tensor | None, ...]:
        grad = ctx.grad
        if grad is None:
            return None, None, None, None, None
        scale = _scale(grad_output, ctx.reduction, grad.shape[0])
        return _scaled(grad, scale, ctx.batched), None, None, None, None


def similarity_loss(
    response: torch.Tensor, *, reduction: Reduction = "mean"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused CPU feature-similarity loss; see :func:`dynaguide.losses.similarity_loss`.

    Parameters
    ----------
    response : Tensor, shape (C, H, W) or (N, C, H, W)
        CPU float response map.
    reduction : {"mean", "sum", "none"}

    Returns
    -------
    loss : Tensor
        Scalar (or ``(N,)``), differentiable.
    labels : Tensor
        int64 argmax labels, shape (H, W) or (N, H, W); the first maximum wins ties.
    n_labels : Tensor
        int64 number of distinct labels K, 0-dim or ``(N,)``.

    Examples
    --------
    >>> import torch
    >>> r = torch.tensor([[[0.0, 2.0]], [[1.0, 0.0]]])  # (C=2, H=1, W=2)
    >>> loss, labels, k = similarity_loss(r)
    >>> labels.tolist(), int(k)
    ([[1, 0]], 2)
    """
    _check_reduction(reduction)
    x, batched = _prepare(response)
    return _Similarity.apply(response, x, reduction, batched, _needs_grad(response))


# -------------------------------------------------------------------------- guidance
class _Guidance(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        response: torch.Tensor,
        x: torch.Tensor,
        target: torch.Tensor,
        ignore_index: int,
        reduction: str,
        batched: bool,
        need: bool,
    ) -> torch.Tensor:
        loss = torch.empty(x.shape[0], dtype=torch.float64)
        grad = torch.empty_like(x) if need else None
        _native().guidance_forward(x, target, int(ignore_index), grad, loss)
        ctx.grad, ctx.reduction, ctx.batched = grad, reduction, batched
        return _reduce(loss.to(_out_dtype(response)), reduction, batched)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad = ctx.grad
        if grad is None:
            return (None,) * 7
        scale = _scale(grad_output, ctx.reduction, grad.shape[0])
        return (_scaled(grad, scale, ctx.batched),) + (None,) * 6


def guidance_loss(
    response: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -1,
    reduction: Reduction = "mean",
    validate: bool = True,
) -> torch.Tensor:
    """Fused CPU guidance cross-entropy; see :func:`dynaguide.losses.guidance_loss`.

    Parameters
    ----------
    response : Tensor, shape (C, H, W) or (N, C, H, W)
        CPU float response map.
    target : integer Tensor, shape (H, W) or (N, H, W)
        Channel index per pixel, or ``ignore_index``. Other negative values count as
        class 0 (as in the reference); values ``>= C`` raise ``ValueError``.
    ignore_index : int
    reduction : {"mean", "sum", "none"}
    validate : bool
        Accepted for a uniform signature; the C++ kernel always checks (at no cost).

    Returns
    -------
    Tensor
        Scalar, or ``(N,)`` with ``reduction="none"``; differentiable.

    Examples
    --------
    >>> import torch
    >>> r = torch.zeros(4, 2, 3)
    >>> t = torch.full((2, 3), -1)
    >>> t[0, 0] = 2
    >>> round(float(guidance_loss(r, t)), 4)  # log(4): uniform softmax, one valid pixel
    1.3863
    """
    _check_reduction(reduction)
    x, batched = _prepare(response)
    t = check_target(target, x, batched).long().contiguous()  # (N, H, W) int64
    need = _needs_grad(response)
    return _Guidance.apply(response, x, t, ignore_index, reduction, batched, need)
