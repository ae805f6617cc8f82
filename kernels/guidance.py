"""Guidance loss: cross-entropy against guide labels with ``ignore_index`` (Triton).

Semantics (``dynaguide.losses.guidance_loss_reference``): per image, the mean over the
pixels whose target is not ``ignore_index`` of ``CE(x, t)``, 0 when no pixel is valid;
targets other than ``ignore_index`` must lie in ``[0, C)``. Checking that would need a
host synchronisation, so the kernels do not (the reference raises): a negative target
is read as class 0 and a target ``>= C`` gives ``CE = logsumexp(x)`` with no one-hot term.

Gradient
--------
With ``p = softmax(x)`` and target class ``t`` at a valid pixel,
``CE = logsumexp(x) - x_t`` and ``dCE/dx_c = p_c - [c == t]``. The image loss divides by
the image's valid-pixel count ``V`` (at least 1), so ``dL/dx_c = valid * (p_c - [c == t]) / V``
(times ``1/N`` for ``reduction="mean"``). ``V`` is needed before the gradient can be
written, so it is counted first from the target (an integer map, ``1/C`` of the response's
bytes); the kernel then reads the response once and writes the gradient once.
"""

from __future__ import annotations

from typing import Any

import torch
import triton.language as tl

from ._common import (
    Layout,
    _coffs,
    _goffs,
    _join,
    _log1p,
    _pixels,
    _program,
    _stats_loop,
    check_int,
    check_reduction,
    check_response,
    check_target,
    check_target_values,
    geometry,
    grad_strides,
    jit_any_size,
    launch,
    new_grad,
    split_float,
    target_flat,
)
from ._finalize import GradStore, finalize


@jit_any_size
def _guidance_kernel(
    r_ptr,
    t_ptr,
    g_ptr,
    nvalid_ptr,
    part_ptr,
    C,
    W,
    HW,
    n_pblocks,
    ignore_index,
    s_n,
    s_c,
    s_h,
    s_w,
    t_n,
    t_h,
    t_w,
    g_n,
    g_c,
    g_p,
    red_hi,
    red_lo,
    WRITE_GRAD: tl.constexpr,
    FLAT: tl.constexpr,
    T_FLAT: tl.constexpr,
    UNIT: tl.constexpr,
    G_CL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid (N * pixel blocks,): loss partial over valid pixels and the gradient."""
    pid_p, n = _program(n_pblocks)
    p, pmask, i, j, pix = _pixels(pid_p, HW, W, s_h, s_w, BLOCK_P, FLAT, UNIT)
    toff = p.to(tl.int64) if T_FLAT else i.to(tl.int64) * t_h + j.to(tl.int64) * t_w
    t = tl.load(t_ptr + n * t_n + toff, mask=pmask, other=0).to(tl.int64)
    valid = pmask & (t != ignore_index)
    tc = tl.maximum(t, 0).to(tl.int32)  # < C
    base = r_ptr + n * s_n
    m, t, idx, xt, _cont = _stats_loop(
        base, pix, pmask, pmask, pmask, tc, C, s_c, s_h, s_w, 1.0, 1.0, 1.0, 1.0,
        True, False, False, False, ACC, BLOCK_P, BLOCK_C, UNIT,
    )  # fmt: skip
    ce = (m - xt) + _log1p(t)  # (m - x_t) first: exact 0 when the target is the argmax
    tl.store(part_ptr + n * n_pblocks + pid_p, tl.sum(tl.where(valid, ce, 0.0), axis=0))
    if WRITE_GRAD:
        nv = tl.load(nvalid_ptr + n).to(ACC)
        scale = _join(red_hi, red_lo, ACC) / tl.maximum(nv, 1.0)
        w = tl.where(valid, scale, 0.0)
        inv_s = 1.0 / (1.0 + t)
        pm1 = (-t * inv_s)[:, None]  # p - 1 at the argmax, without cancellation
        at_max = (tc == idx)[:, None]
        gbase = g_ptr + n * g_n
        for c0 in range(0, C, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            m2 = pmask[:, None] & (c < C)[None, :]
            x = tl.load(base + pix[:, None] + _coffs(c, s_c, UNIT)[None, :], mask=m2, other=0.0)
            prob = tl.exp(x.to(ACC) - m[:, None]) * inv_s[:, None]
            hit = c[None, :] == tc[:, None]
            g = tl.where(hit, tl.where(at_max, pm1, prob - 1.0), prob) * w[:, None]
            gptrs = gbase + _goffs(p, c, g_c, g_p, G_CL)
            tl.store(gptrs, g.to(g_ptr.dtype.element_ty), mask=m2)


def valid_counts(t: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Per-image number of pixels whose target is not ``ignore_index`` (int32, on device).

    Compared as int64 so that an ``ignore_index`` outside the target dtype's range never
    matches (as in the reference, which casts the target with ``.long()``).
    """
    tt = t if t.dtype == torch.int64 else t.long()
    return (tt != ignore_index).sum(dim=(1, 2), dtype=torch.int32)


def guidance_forward(
    lay: Layout, t: torch.Tensor, ignore_index: int, reduction: int, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the guidance kernel and finalisation; return (loss, gradient or None)."""
    geo = geometry(lay, stencil=False)
    n_pb = geo.n_pblocks(lay.hw)
    dev = lay.r.device
    part = torch.empty((lay.n, n_pb), dtype=lay.loss_dtype, device=dev)
    nvalid = valid_counts(t, ignore_index)
    grad = new_grad(lay) if need_grad else None
    g_n, g_c, g_p = grad_strides(grad) if grad is not None else (0, 0, 0)
    t_n, t_h, t_w = t.stride()
    launch(
        _guidance_kernel,
        (n_pb * lay.n,),
        lay.r,
        t,
        grad if grad is not None else part,
        nvalid,
        part,
        lay.c,
        lay.w,
        lay.hw,
        n_pb,
        ignore_index,
        *lay.strides,
        t_n,
        t_h,
        t_w,
        g_n,
        g_c,
        g_p,
        *split_float(1.0 / lay.n if reduction == 1 else 1.0),
        WRITE_GRAD=need_grad,
        FLAT=lay.flat,
        T_FLAT=target_flat(t, lay),
        UNIT=lay.unit,
        G_CL=lay.channels_last,
        ACC=lay.acc,
        BLOCK_P=geo.block_p,
        BLOCK_C=geo.block_c,
        num_warps=geo.num_warps,
    )
    loss, _ = finalize(lay, reduction, n_pb, guide_part=part, nvalid=nvalid)
    return loss, grad


class GuidanceLoss(torch.autograd.Function):
    """autograd Function: the gradient is written during forward, backward rescales it."""

    @staticmethod
    def forward(
        ctx: Any, response: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str
    ) -> Any:
        lay = check_response(response)
        t = check_target(target, lay)
        red = check_reduction(reduction)
        loss, grad = guidance_forward(lay, t, ignore_index, red, ctx.needs_input_grad[0])
        GradStore.save(ctx, lay, grad)
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> Any:
        return GradStore.backward(ctx, grad_output), None, None, None


def guidance_loss(
    response: torch.Tensor,
    target: torch.Tensor,
    *,
    ignore_index: int = -1,
    reduction: str = "mean",
    validate: bool = True,
) -> torch.Tensor:
    """Cross-entropy of the response against guide labels (Triton).

    See :func:`dynaguide.losses.guidance_loss` for the semantics.

    Parameters
    ----------
    response : Tensor, shape (C, H, W) or (N, C, H, W)
        float32, bfloat16, float16 or float64, any strides.
    target : integer Tensor, shape (H, W) or (N, H, W)
        int64, int32, int16 or uint8, any strides; channel index per pixel (``< C``) or
        ``ignore_index``.
    ignore_index : int
    reduction : {"mean", "sum", "none"}
    validate : bool
        Raise ValueError on a class ``>= C`` (one host synchronisation on a GPU).

    Returns
    -------
    Tensor
        Scalar (or ``(N,)`` / 0-dim with ``"none"``), differentiable in ``response``.
    """
    check_int("ignore_index", ignore_index)
    check_reduction(reduction)
    if validate:
        lay = check_response(response)
        check_target_values(check_target(target, lay), lay.c, int(ignore_index))
    return GuidanceLoss.apply(response, target, int(ignore_index), reduction)
