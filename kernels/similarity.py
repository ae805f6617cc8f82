"""Feature-similarity loss: cross-entropy of each pixel against its own argmax (Triton).

One pass produces the loss, the argmax labels, the per-image label histogram and, after a
one-program finalisation, K (the number of distinct labels): everything stays on the device.

Gradient
--------
For a pixel with logits x (C channels), ``m = max_c x_c``, ``s = sum_c exp(x_c - m)``,
label ``y = argmax x`` (first maximum) and softmax ``p_c = exp(x_c - m) / s``:

    CE = logsumexp(x) - x_y = m + log(s) - m = log(s) = log1p(t)

with ``t = s - 1`` the sum over the other channels, tracked directly so that small
losses keep their relative precision (see ``_stats_loop``).

The label is treated as a constant (it carries no gradient, as in the reference, where it
comes from ``argmax`` of a detached tensor), so ``dCE/dx_c = p_c - [c == y]``. The image loss
is the mean over its ``H*W`` pixels, hence ``dL/dx_c = (p_c - [c == y]) / (H*W)``, with
``p_y - 1 = -t / s`` computed as such (times
``1/N`` for ``reduction="mean"``). With C up to one channel block the tile stays in
registers; otherwise the second sweep that writes the gradient re-reads the pixel's
channels from L2. HBM traffic: one read of the response, one write of the gradient,
8 bytes per pixel of labels.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._common import (
    Layout,
    _add_histogram,
    _coffs,
    _goffs,
    _join,
    _log1p,
    _pixels,
    _program,
    _stats_loop,
    check_reduction,
    check_response,
    geometry,
    grad_strides,
    jit_any_size,
    launch,
    new_grad,
    split_float,
)
from ._finalize import GradStore, finalize


@jit_any_size
def _similarity_kernel(
    r_ptr,
    g_ptr,
    labels_ptr,
    cnt_ptr,
    part_ptr,
    C,
    W,
    HW,
    n_pblocks,
    cnt_stride,
    s_n,
    s_c,
    s_h,
    s_w,
    g_n,
    g_c,
    g_p,
    gscale_hi,
    gscale_lo,
    WRITE_GRAD: tl.constexpr,
    FLAT: tl.constexpr,
    UNIT: tl.constexpr,
    G_CL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NUM_BINS: tl.constexpr,
):
    """Grid (N * pixel blocks,): labels, histogram atomics, loss partial, gradient."""
    pid_p, n = _program(n_pblocks)
    p, pmask, _i, _j, pix = _pixels(pid_p, HW, W, s_h, s_w, BLOCK_P, FLAT, UNIT)
    base = r_ptr + n * s_n
    m, t, idx, _xt, _cont = _stats_loop(
        base, pix, pmask, pmask, pmask, tl.zeros([BLOCK_P], tl.int64), C, s_c, s_h, s_w,
        1.0, 1.0, 1.0, 1.0, False, False, False, False, ACC, BLOCK_P, BLOCK_C, UNIT,
    )  # fmt: skip
    tl.store(labels_ptr + n * HW + p, idx.to(tl.int64), mask=pmask)
    _add_histogram(cnt_ptr + n * cnt_stride, idx, pmask, C, NUM_BINS)
    tl.store(part_ptr + n * n_pblocks + pid_p, tl.sum(tl.where(pmask, _log1p(t), 0.0), axis=0))
    if WRITE_GRAD:
        gscale = _join(gscale_hi, gscale_lo, ACC)
        inv_s = 1.0 / (1.0 + t)
        pm1 = -t * inv_s  # p[label] - 1 without cancellation
        gbase = g_ptr + n * g_n
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m2 = pmask[:, None] & (c < C)[None, :]
            x = tl.load(base + pix[:, None] + _coffs(c, s_c, UNIT)[None, :], mask=m2, other=0.0)
            x = x.to(ACC)
            prob = tl.exp(x - m[:, None]) * inv_s[:, None]
            g = tl.where(c[None, :] == idx[:, None], pm1[:, None], prob)
            gptrs = gbase + _goffs(p, c, g_c, g_p, G_CL)
            tl.store(gptrs, (g * gscale).to(g_ptr.dtype.element_ty), mask=m2)


def similarity_forward(
    lay: Layout, reduction: int, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the similarity kernel and finalisation; return (loss, labels, K, gradient or None)."""
    geo = geometry(lay, stencil=False)
    n_pb = geo.n_pblocks(lay.hw)
    dev = lay.r.device
    part = torch.empty((lay.n, n_pb), dtype=lay.loss_dtype, device=dev)
    labels = torch.empty((lay.n, lay.h, lay.w), dtype=torch.int64, device=dev)
    counts = torch.zeros((lay.n, lay.c), dtype=torch.int32, device=dev)
    grad = new_grad(lay) if need_grad else None
    g_n, g_c, g_p = grad_strides(grad) if grad is not None else (0, 0, 0)
    gscale = (1.0 / lay.hw) * (1.0 / lay.n if reduction == 1 else 1.0)
    launch(
        _similarity_kernel,
        (n_pb * lay.n,),
        lay.r,
        grad if grad is not None else part,
        labels,
        counts,
        part,
        lay.c,
        lay.w,
        lay.hw,
        n_pb,
        counts.stride(0),
        *lay.strides,
        g_n,
        g_c,
        g_p,
        *split_float(gscale),
        WRITE_GRAD=need_grad,
        FLAT=lay.flat,
        UNIT=lay.unit,
        G_CL=lay.channels_last,
        ACC=lay.acc,
        BLOCK_P=geo.block_p,
        BLOCK_C=geo.block_c,
        NUM_BINS=triton.next_power_of_2(lay.c),
        num_warps=geo.num_warps,
    )
    loss, k = finalize(lay, reduction, n_pb, sim_part=part, counts=counts, count_k=True)
    assert k is not None
    return loss, labels, k, grad


class SimilarityLoss(torch.autograd.Function):
    """autograd Function returning (loss, labels, K); labels and K are not differentiable."""

    @staticmethod
    def forward(ctx: Any, response: torch.Tensor, reduction: str) -> Any:
        lay = check_response(response)
        red = check_reduction(reduction)
        loss, labels, k, grad = similarity_forward(lay, red, ctx.needs_input_grad[0])
        GradStore.save(ctx, lay, grad)
        if not lay.batched:
            labels, k = labels[0], k[0]
        ctx.mark_non_differentiable(labels, k)
        return loss, labels, k

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, _g_labels: Any, _g_k: Any) -> Any:
        return GradStore.backward(ctx, grad_output), None


def similarity_loss(
    response: torch.Tensor, *, reduction: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feature-similarity loss with its argmax labels and label count (Triton).

    See :func:`dynaguide.losses.similarity_loss` for the semantics.

    Parameters
    ----------
    response : Tensor, shape (C, H, W) or (N, C, H, W)
        float32, bfloat16, float16 or float64, any strides. CUDA, or CPU under
        ``TRITON_INTERPRET=1``.
    reduction : {"mean", "sum", "none"}

    Returns
    -------
    loss : Tensor
        Scalar (or ``(N,)`` / 0-dim with ``"none"``), differentiable.
    labels : Tensor
        int64 argmax labels, (H, W) or (N, H, W); the first maximum wins ties.
    n_labels : Tensor
        int64 number of distinct labels K, 0-dim or ``(N,)``, on the response's device.
    """
    check_reduction(reduction)
    return SimilarityLoss.apply(response, reduction)
