"""Spatial-continuity loss (L1 or Huber over 4 or 8 neighbours): one fused Triton pass.

Semantics (``dynaguide.losses.continuity_loss_reference``): for each direction ``dir``
(vertical, horizontal and, with 8 neighbours, diagonal and anti-diagonal) the penalty of
the neighbour differences averaged over that direction's ``C * #pairs`` elements, the
directions summed; a direction without pairs contributes 0; then the reduction over the
images.

Forward and gradient in one pass
--------------------------------
Per image, ``L = sum_dir inv_dir * sum_{pairs (plus, minus) of dir} phi(r[plus] - r[minus])``
with ``inv_dir = 1 / (C * #pairs_dir)``. Its derivative is

    dL/dr[i, j, c] = sum_dir inv_dir * ( sum_{pairs with plus = (i, j)}   phi'(d)
                                       - sum_{pairs with minus = (i, j)} phi'(d) )

(:func:`dynaguide.kernels._common._continuity_grad_tile` lists the eight pairs), with
``phi'(d) = clamp(d, -delta, delta)`` for Huber and ``sign(d)`` for L1. It needs the eight
neighbours of each element, which the program loads anyway, so the kernel writes the
gradient (times ``1/N`` for ``reduction="mean"``) while it computes the loss, and the
backward pass only multiplies it by ``grad_output``. HBM traffic: one read of the response
and one write of the gradient (the neighbour loads hit L1/L2).
"""

from __future__ import annotations

from typing import Any

import torch
import triton.language as tl

from ._common import (
    Layout,
    _coffs,
    _continuity_grad_tile,
    _continuity_loss_tile,
    _goffs,
    _inv,
    _join,
    _pixels,
    _program,
    check_continuity_options,
    check_reduction,
    check_response,
    direction_counts,
    geometry,
    grad_strides,
    jit_any_size,
    launch,
    new_grad,
    split_float,
)
from ._finalize import GradStore, finalize


@jit_any_size
def _continuity_kernel(
    r_ptr,
    g_ptr,
    part_ptr,
    C,
    H,
    W,
    HW,
    n_pblocks,
    s_n,
    s_c,
    s_h,
    s_w,
    g_n,
    g_c,
    g_p,
    cnt_v,
    cnt_h,
    cnt_d,
    delta_hi,
    delta_lo,
    gscale_hi,
    gscale_lo,
    IS_HUBER: tl.constexpr,
    EIGHT: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    FLAT: tl.constexpr,
    UNIT: tl.constexpr,
    G_CL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid (N * pixel blocks,). Writes one loss partial per program and, optionally, the gradient."""
    pid_p, n = _program(n_pblocks)
    p, pmask, i, j, pix = _pixels(pid_p, HW, W, s_h, s_w, BLOCK_P, FLAT, UNIT)
    has_up = i > 0
    has_dn = i < H - 1
    has_lt = j > 0
    has_rt = j < W - 1
    inv_v = _inv(cnt_v, ACC)
    inv_h = _inv(cnt_h, ACC)
    inv_d = _inv(cnt_d, ACC)
    delta = _join(delta_hi, delta_lo, ACC)
    gscale = _join(gscale_hi, gscale_lo, ACC)
    base = r_ptr + n * s_n
    gbase = g_ptr + n * g_n
    loss = tl.zeros([BLOCK_P], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m2 = pmask[:, None] & (c < C)[None, :]
        ptrs = base + pix[:, None] + _coffs(c, s_c, UNIT)[None, :]
        x = tl.load(ptrs, mask=m2, other=0.0).to(ACC)
        loss += _continuity_loss_tile(
            x, ptrs, m2, has_dn, has_rt, s_h, s_w, inv_v, inv_h, inv_d, delta, IS_HUBER, EIGHT, ACC
        )
        if WRITE_GRAD:
            g = _continuity_grad_tile(
                x, ptrs, m2, has_up, has_dn, has_lt, has_rt, s_h, s_w, inv_v, inv_h, inv_d, delta,
                IS_HUBER, EIGHT, ACC,
            )  # fmt: skip
            gptrs = gbase + _goffs(p, c, g_c, g_p, G_CL)
            tl.store(gptrs, (g * gscale).to(g_ptr.dtype.element_ty), mask=m2)
    tl.store(part_ptr + n * n_pblocks + pid_p, tl.sum(loss, axis=0))


def continuity_forward(
    lay: Layout, penalty: str, neighbors: int, delta: float, reduction: int, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the continuity kernel and the finalisation; return (loss, gradient or None)."""
    geo = geometry(lay, stencil=True)
    n_pb = geo.n_pblocks(lay.hw)
    part = torch.empty((lay.n, n_pb), dtype=lay.loss_dtype, device=lay.r.device)
    grad = new_grad(lay) if need_grad else None
    g = grad if grad is not None else part
    g_n, g_c, g_p = grad_strides(grad) if grad is not None else (0, 0, 0)
    gscale = 1.0 / lay.n if reduction == 1 else 1.0
    launch(
        _continuity_kernel,
        (n_pb * lay.n,),
        lay.r,
        g,
        part,
        lay.c,
        lay.h,
        lay.w,
        lay.hw,
        n_pb,
        *lay.strides,
        g_n,
        g_c,
        g_p,
        *direction_counts(lay),
        *split_float(delta),
        *split_float(gscale),
        IS_HUBER=penalty == "huber",
        EIGHT=neighbors == 8,
        WRITE_GRAD=need_grad,
        FLAT=lay.flat,
        UNIT=lay.unit,
        G_CL=lay.channels_last,
        ACC=lay.acc,
        BLOCK_P=geo.block_p,
        BLOCK_C=geo.block_c,
        num_warps=geo.num_warps,
    )
    loss, _ = finalize(lay, reduction, n_pb, cont_part=part)
    return loss, grad


class ContinuityLoss(torch.autograd.Function):
    """autograd Function: the gradient is written during forward, backward rescales it."""

    @staticmethod
    def forward(
        ctx: Any, response: torch.Tensor, penalty: str, neighbors: int, delta: float, reduction: str
    ) -> Any:
        lay = check_response(response)
        red = check_reduction(reduction)
        loss, grad = continuity_forward(
            lay, penalty, neighbors, float(delta), red, ctx.needs_input_grad[0]
        )
        GradStore.save(ctx, lay, grad)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> Any:
        return GradStore.backward(ctx, grad_output), None, None, None, None


def continuity_loss(
    response: torch.Tensor,
    *,
    penalty: str = "huber",
    neighbors: int = 8,
    delta: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Spatial-continuity loss of a response map (Triton).

    Semantics as :func:`dynaguide.losses.continuity_loss`.

    Parameters
    ----------
    response : Tensor, shape (C, H, W) or (N, C, H, W)
        float32, bfloat16, float16 or float64, any strides (NCHW and channels-last read
        in place). CUDA, or CPU under ``TRITON_INTERPRET=1``.
    penalty : {"huber", "l1"}
    neighbors : {8, 4}
    delta : float
        Huber threshold (> 0).
    reduction : {"mean", "sum", "none"}

    Returns
    -------
    Tensor
        float32 (float64 for float64 input) scalar, or ``(N,)`` / 0-dim with ``"none"``.
        Differentiable; the gradient has the response's dtype and memory format.

    Examples
    --------
    >>> loss = continuity_loss(response, penalty="l1", neighbors=4)  # doctest: +SKIP
    >>> loss.backward()  # doctest: +SKIP
    """
    check_continuity_options(penalty, neighbors, delta)
    check_reduction(reduction)
    return ContinuityLoss.apply(response, penalty, neighbors, delta, reduction)
