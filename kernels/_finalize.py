"""Finalisation and backward of the loss kernels.

* :func:`finalize`: one program turns the per-program loss partials into per-image losses,
  K (from the label histogram) and the reduced loss, all on the device (deterministic: no
  float atomics).
* :class:`GradStore` / :func:`scale_grad_`: the gradient was written during the forward
  pass; backward rescales it by ``grad_output`` in place. float16 responses keep that
  gradient in float32 until backward (their ``(p - 1) / (H W)`` entries underflow float16
  at 1024x1024 before a loss scale such as ``torch.amp.GradScaler``'s can lift them), and
  backward writes the scaled float16 gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._common import (
    Layout,
    _count_labels,
    _dyn_weight,
    _join,
    _row_sum,
    interpreting,
    jit_any_size,
    launch,
    split_float,
)


# ------------------------------------------------------------------- finalisation
@jit_any_size
def _finalize_kernel(
    sim_part_ptr,
    cont_part_ptr,
    guide_part_ptr,
    n_parts,
    cnt_ptr,
    cnt_stride,
    C,
    nvalid_ptr,
    nvalid_stride,
    kmin_ptr,
    kmin_stride,
    kmin_scalar,
    loss_ptr,
    reduced_ptr,
    k_ptr,
    N,
    HW,
    sim_w_hi,
    sim_w_lo,
    guide_w_hi,
    guide_w_lo,
    wp_hi,
    wp_lo,
    HAS_SIM: tl.constexpr,
    HAS_CONT: tl.constexpr,
    HAS_GUIDE: tl.constexpr,
    COUNT_K: tl.constexpr,
    HAS_KMIN: tl.constexpr,
    WEIGHT_MODE: tl.constexpr,
    REDUCTION: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_PART: tl.constexpr,
    BLOCK_BINS: tl.constexpr,
):
    """One program: per-image losses, K, and the reduced loss, all on device.

    per_image[n] = sim_w * sim[n] + w(K_eff[n]) * cont[n] + guide_w * guide[n], with
    sim[n] = sum(partials) / HW, cont[n] = sum(partials) (already per-direction means),
    guide[n] = sum(partials) / max(valid pixels, 1).
    """
    sim_w = _join(sim_w_hi, sim_w_lo, ACC)
    guide_w = _join(guide_w_hi, guide_w_lo, ACC)
    wparam = _join(wp_hi, wp_lo, ACC)
    total = tl.zeros([], ACC)
    for n in range(0, N):
        n64 = tl.cast(n, tl.int64)
        per = tl.zeros([], ACC)
        k = tl.zeros([], tl.int32)
        if COUNT_K:
            k = _count_labels(cnt_ptr + n64 * cnt_stride, C, BLOCK_BINS)
            tl.store(k_ptr + n64, k.to(tl.int64))
        if HAS_SIM:
            per += (
                sim_w
                * _row_sum(sim_part_ptr + n64 * n_parts, n_parts, BLOCK_PART, ACC)
                / tl.cast(HW, ACC)
            )
        if HAS_CONT:
            kmin = tl.zeros([], tl.int32) + kmin_scalar
            if HAS_KMIN:
                kmin = tl.maximum(kmin, tl.load(kmin_ptr + n64 * kmin_stride).to(tl.int32))
            w = _dyn_weight(k, kmin, wparam, WEIGHT_MODE, ACC)
            per += w * _row_sum(cont_part_ptr + n64 * n_parts, n_parts, BLOCK_PART, ACC)
        if HAS_GUIDE:
            nv = tl.load(nvalid_ptr + n64 * nvalid_stride).to(ACC)
            g = _row_sum(guide_part_ptr + n64 * n_parts, n_parts, BLOCK_PART, ACC)
            per += guide_w * g / tl.maximum(nv, 1.0)
        tl.store(loss_ptr + n64, per)
        total += per
    if REDUCTION == 1:
        total = total / tl.cast(N, ACC)
    tl.store(reduced_ptr, total)


def finalize(
    lay: Layout,
    reduction: int,
    n_parts: int,
    *,
    sim_part: torch.Tensor | None = None,
    cont_part: torch.Tensor | None = None,
    guide_part: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    nvalid: torch.Tensor | None = None,
    count_k: bool = False,
    k_min: torch.Tensor | None = None,
    k_min_scalar: int = 0,
    weight_mode: int = 0,
    weight_param: float = 1.0,
    sim_weight: float = 1.0,
    guide_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch :func:`_finalize_kernel`; return (loss as the reduction asks, K or None).

    ``counts`` is the int32 (N, >= C) histogram buffer; ``nvalid`` an int tensor whose
    ``[n]`` (first column for 2-D) is image n's valid-pixel count.
    """
    dev = lay.r.device
    per_image = torch.empty(lay.n, dtype=lay.loss_dtype, device=dev)
    reduced = torch.empty((), dtype=lay.loss_dtype, device=dev)
    k = torch.empty(lay.n, dtype=torch.int64, device=dev) if count_k else None
    any_part = next(p for p in (sim_part, cont_part, guide_part) if p is not None)
    nv_stride = 0 if nvalid is None else nvalid.stride(0)
    launch(
        _finalize_kernel,
        (1,),
        sim_part if sim_part is not None else any_part,
        cont_part if cont_part is not None else any_part,
        guide_part if guide_part is not None else any_part,
        n_parts,
        counts if counts is not None else any_part,
        0 if counts is None else counts.stride(0),
        lay.c,
        nvalid if nvalid is not None else any_part,
        nv_stride,
        k_min if k_min is not None else any_part,
        0 if k_min is None or k_min.dim() == 0 else k_min.stride(0),
        k_min_scalar,
        per_image,
        reduced,
        k if k is not None else per_image,
        lay.n,
        lay.hw,
        *split_float(sim_weight),
        *split_float(guide_weight),
        *split_float(weight_param),
        HAS_SIM=sim_part is not None,
        HAS_CONT=cont_part is not None,
        HAS_GUIDE=guide_part is not None,
        COUNT_K=count_k,
        HAS_KMIN=k_min is not None,
        WEIGHT_MODE=weight_mode,
        REDUCTION=reduction,
        ACC=lay.acc,
        BLOCK_PART=1024,  # fixed, not next_pow2(n_parts): one compilation for every image size
        BLOCK_BINS=min(1024, triton.next_power_of_2(lay.c)),
        num_warps=4,
    )
    loss = (per_image if lay.batched else per_image[0]) if reduction == 0 else reduced
    return loss, k


# ---------------------------------------------------------------------- backward
@jit_any_size
def _scale_grad_kernel(
    g_ptr,
    out_ptr,
    go_ptr,
    go_stride,
    numel,
    per_image,
    PER_IMAGE: tl.constexpr,
    ALWAYS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out = g * grad_output, one value per image or one scalar (``out`` may be ``g``).

    In place (``ALWAYS`` false), the check ``grad_output == 1`` happens on the device, per
    program: programs whose factors are all 1 neither read nor write, so
    ``loss.backward()`` costs no pass over the gradient and the host never synchronises.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    if PER_IMAGE:
        go = tl.load(go_ptr + (offs // per_image) * go_stride, mask=mask, other=1.0).to(ACC)
    else:
        go = tl.load(go_ptr + offs * 0, mask=mask, other=1.0).to(ACC)
    if ALWAYS or tl.sum((go != 1.0).to(tl.int32), axis=0) > 0:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(out_ptr + offs, (g * go).to(out_ptr.dtype.element_ty), mask=mask)


def scale_grad_(
    grad: torch.Tensor,
    grad_output: torch.Tensor,
    batched: bool,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Scale the stored gradient (N, C, H, W) by ``grad_output``; return it shaped like the
    response ((C, H, W) when not ``batched``).

    In place, unless ``out_dtype`` differs from the buffer's (the float32 gradient of a
    float16 response): then a new tensor of that dtype and memory format is written.
    """
    n = grad.shape[0]
    per_image = grad_output.dim() > 0 and grad_output.numel() > 1
    numel = grad.numel()
    block = 32768 if interpreting() else 2048  # 8 elements per thread: no spills
    go = grad_output if grad_output.dim() > 0 else grad_output.reshape(1)
    out = grad
    if out_dtype is not None and out_dtype != grad.dtype:
        out = torch.empty_like(grad, dtype=out_dtype)  # keeps the (dense) strides
    launch(
        _scale_grad_kernel,
        (triton.cdiv(numel, block),),
        grad,
        out,
        go,
        go.stride(0) if per_image else 0,
        numel,
        numel // n,
        PER_IMAGE=per_image,
        ALWAYS=out is not grad,
        ACC=tl.float64 if grad.dtype == torch.float64 else tl.float32,
        BLOCK=block,
        num_warps=8,
    )
    return out if batched else out[0]


class GradStore:
    """Helpers shared by the autograd Functions: the gradient is computed in forward,
    saved, and backward rescales it in place (only once: a second backward through the
    same graph would see an already scaled gradient, so it raises)."""

    @staticmethod
    def save(ctx: Any, lay: Layout, grad: torch.Tensor | None) -> None:
        """Keep what backward needs: the gradient (if any), batching and response dtype."""
        ctx.batched = lay.batched
        ctx.response_dtype = lay.r.dtype
        if grad is not None:
            ctx.save_for_backward(grad)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> torch.Tensor | None:
        """Return d(loss)/d(response) scaled by ``grad_output``."""
        if not ctx.needs_input_grad[0]:
            return None
        if getattr(ctx, "consumed", False):
            raise RuntimeError(
                "dynaguide.kernels losses support a single backward per forward (the stored "
                "gradient is scaled in place); recompute the loss instead of retain_graph=True"
            )
        ctx.consumed = True
        (grad,) = ctx.saved_tensors
        return scale_grad_(grad, grad_output, ctx.batched, ctx.response_dtype)
