"""SmooSeg's smoothness loss and its code gradients as fused Triton kernels.

The loss (see :mod:`dynaguide.smooseg.smoothness`) is the mean over patch pairs (i, j) of
``(F_ij - shift) * (1 - S_ij)``. It is linear in the code similarity ``S_ij = a_i . b_j``
and the feature similarity is ``x_i . y_j`` up to the pointwise centring, so with the
(D, K) matrices ``G_a = X^T A`` and ``G_b = Y^T B`` (normalised features times normalised
codes, summed over an image's patches) and the means ``xbar``, ``ybar``, ``abar``,
``bbar`` of one image pair (P = 1 with pointwise centring, 0 without; ``g`` the mean of
``xbar . ybar`` over the batch)::

    mean_ij F_ij S_ij = <G_a, G_b> / (N M) - P (G_a^T ybar / N) . bbar + P g abar . bbar
    mean_ij S_ij      = abar . bbar
    loss = g - shift - mean_n(mean_ij F S) + shift * mean_n(mean_ij S)

Neither the N x M feature-similarity nor the code-similarity matrix exists anywhere, not
even as a tile: the kernels do O(N D K) work instead of O(N M (D + K)) (at SmooSeg's 784
patches, D = 384, K = 27 that is 15x fewer flops, and every pass is bound by reading the
features). Three kernels:

* ``_inv_norm_kernel`` (grid: batch x pixel blocks): 1 / max(|f_i|, eps) of every patch's
  features (one read of the features);
* ``_gram_kernel`` (grid: batch x pixel chunks x feature blocks): per chunk, the partial
  ``X^T A`` with ``tl.dot`` (codes normalised in the tile, the feature norms folded into
  the codes' row weights), the partial sums of the normalised features and codes (one
  more read of the features, one of the codes). Partials are summed by torch on the small
  (B, chunks, D, K) buffer: deterministic, no float atomics;
* ``_code_grad_kernel`` (backward; grid: batch x pixel blocks): with the gradient with
  respect to the normalised code ``a_i`` written as ``x_i^T Q + c`` (``Q`` (D, K) and
  ``c`` (K,) per image, from the small matrices above, ``grad_output`` folded in on the
  device), one ``tl.dot`` over feature blocks, then the chain rule through the code
  normalisation ``a = c / max(|c|, eps)``. One launch per side.

Accumulation in float32 (float64 for float64 inputs), ``tl.dot`` in IEEE precision (no
TF32: the tests hold float32 to 1e-5 of a float64 reference). The loss is float32
(float64 for float64 inputs); the code gradients have the codes' dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from ._common import SUPPORTED_DTYPES, compiling, interpreting, launch

EPS: tl.constexpr = tl.constexpr(1e-10)  # F.normalize's eps in SmooSeg's code
MAX_CODES = 256  # the code channels are one tile


def _jit(fn: Any) -> Any:
    """``triton.jit`` without specialisation on sizes and strides (one kernel per dtype and
    block configuration, whatever the batch, image size or layout)."""
    sizes = {"N", "D", "K", "n_pblocks", "n_dblocks", "n_chunks", "chunk"}
    names = fn.__code__.co_varnames[: fn.__code__.co_argcount]
    return triton.jit(
        fn, do_not_specialize=[a for a in names if a in sizes or a.startswith(("f_", "c_"))]
    )


@_jit
def _inv_norm_kernel(
    f_ptr, inv_ptr, N, D, n_pblocks, f_n, f_d, f_p,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """inv[n, i] = 1 / max(|f[n, :, i]|, eps)."""
    pid = tl.program_id(0)
    n = pid // n_pblocks
    p = (pid - n * n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < N
    base = f_ptr + n.to(tl.int64) * f_n + p.to(tl.int64)[None, :] * f_p
    ss = tl.zeros([BLOCK_P], ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        m = (d < D)[:, None] & pmask[None, :]
        x = tl.load(base + d.to(tl.int64)[:, None] * f_d, mask=m, other=0.0).to(ACC)
        ss += tl.sum(x * x, axis=0)
    inv = 1.0 / tl.maximum(tl.sqrt(ss), tl.full([], EPS, ACC))
    tl.store(inv_ptr + n.to(tl.int64) * N + p, inv, mask=pmask)


@triton.jit
def _normalised_codes(
    c_ptr, n, p, pmask, K, c_n, c_k, c_p, ACC: tl.constexpr, BLOCK_K: tl.constexpr
):
    """Codes of pixels ``p`` as a [BLOCK_P, BLOCK_K] tile: (raw, |c|, max(|c|, eps))."""
    k = tl.arange(0, BLOCK_K)
    m = pmask[:, None] & (k < K)[None, :]
    ptrs = c_ptr + n * c_n + p.to(tl.int64)[:, None] * c_p + k.to(tl.int64)[None, :] * c_k
    c = tl.load(ptrs, mask=m, other=0.0).to(ACC)
    norm = tl.sqrt(tl.sum(c * c, axis=1))
    return c, norm, tl.maximum(norm, tl.full([], EPS, ACC))


@_jit
def _gram_kernel(
    f_ptr, c_ptr, inv_ptr, g_ptr, xs_ptr, as_ptr,
    N, D, K, chunk, n_chunks, n_dblocks, f_n, f_d, f_p, c_n, c_k, c_p,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Partials over one pixel chunk: g[n, ch, d, k] = sum_i x_i[d] a_i[k],
    xs[n, ch, d] = sum_i x_i[d] and (feature block 0) as[n, ch, k] = sum_i a_i[k], with
    x_i and a_i the normalised features and codes."""
    pid = tl.program_id(0)
    db = pid % n_dblocks
    rest = pid // n_dblocks
    ch = rest % n_chunks
    n = (rest // n_chunks).to(tl.int64)
    d = db * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_D, BLOCK_K], ACC)
    xs = tl.zeros([BLOCK_D], ACC)
    asum = tl.zeros([BLOCK_K], ACC)
    start = ch * chunk
    stop = tl.minimum(start + chunk, N)
    for p0 in range(start, stop, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pmask = p < stop
        inv = tl.load(inv_ptr + n * N + p, mask=pmask, other=0.0)
        c, _norm, den = _normalised_codes(c_ptr, n, p, pmask, K, c_n, c_k, c_p, ACC, BLOCK_K)
        a = c / den[:, None]
        fptrs = f_ptr + n * f_n + d.to(tl.int64)[:, None] * f_d + p.to(tl.int64)[None, :] * f_p
        x = tl.load(fptrs, mask=dmask[:, None] & pmask[None, :], other=0.0).to(ACC)
        acc += tl.dot(x, a * inv[:, None], input_precision="ieee")
        xs += tl.sum(x * inv[None, :], axis=1)
        asum += tl.sum(a, axis=0)
    part = n * n_chunks + ch
    gptrs = g_ptr + (part * D + d.to(tl.int64))[:, None] * K + k[None, :]
    tl.store(gptrs, acc, mask=dmask[:, None] & (k < K)[None, :])
    tl.store(xs_ptr + part * D + d, xs, mask=dmask)
    tl.store(as_ptr + part * K + k, asum, mask=(k < K) & (db == 0))


@_jit
def _code_grad_kernel(
    f_ptr, c_ptr, inv_ptr, q_ptr, v_ptr, g_ptr,
    N, D, K, n_pblocks, f_n, f_d, f_p, c_n, c_k, c_p,
    ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """grad[n, :, i] = d loss / d codes[n, :, i] from the gradient ``x_i^T Q[n] + v[n]`` with
    respect to the normalised code a_i (x_i the normalised features). Written (B, K, N)."""
    pid = tl.program_id(0)
    n = (pid // n_pblocks).to(tl.int64)
    p = (pid % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < N
    k = tl.arange(0, BLOCK_K)
    kmask = k < K
    acc = tl.zeros([BLOCK_P, BLOCK_K], ACC)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        fptrs = f_ptr + n * f_n + p.to(tl.int64)[:, None] * f_p + d.to(tl.int64)[None, :] * f_d
        x = tl.load(fptrs, mask=pmask[:, None] & dmask[None, :], other=0.0).to(ACC)
        q = tl.load(
            q_ptr + (n * D + d.to(tl.int64))[:, None] * K + k[None, :],
            mask=dmask[:, None] & kmask[None, :],
            other=0.0,
        )
        acc += tl.dot(x, q, input_precision="ieee")
    inv = tl.load(inv_ptr + n * N + p, mask=pmask, other=0.0)
    v = tl.load(v_ptr + n * K + k, mask=kmask, other=0.0)
    ga = acc * inv[:, None] + v[None, :]
    c, norm, den = _normalised_codes(c_ptr, n, p, pmask, K, c_n, c_k, c_p, ACC, BLOCK_K)
    a = c / den[:, None]
    radial = tl.sum(a * ga, axis=1)
    grad = (
        tl.where((norm > tl.full([], EPS, ACC))[:, None], ga - a * radial[:, None], ga)
        / den[:, None]
    )
    out = g_ptr + (n * K + k.to(tl.int64))[None, :] * N + p.to(tl.int64)[:, None]
    tl.store(out, grad.to(g_ptr.dtype.element_ty), mask=pmask[:, None] & kmask[None, :])


# ----------------------------------------------------------------------------- host side
def _blocks(d: int, k: int, n: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_P, BLOCK_D, BLOCK_K, pixel chunk, num_warps); few big programs when interpreting."""
    block_k = max(16, triton.next_power_of_2(k))
    if interpreting():
        block_p = max(16, min(triton.next_power_of_2(n), 1024))
        return block_p, max(16, min(triton.next_power_of_2(d), 128)), block_k, 1 << 30, 4
    # sm_90 (ptxas via kernels._compile_check): 16 x 64 tiles, 8 warps: gram 138 registers
    # (float32) without spills, code gradient 70; 64 x 64 with 4 warps spilled.
    return 16, 64, block_k, 1024, 8


def _as_bdn(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, h*w) view (a copy only when h and w cannot be merged)."""
    return x.flatten(2)


def _check(name: str, x: torch.Tensor) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16, float16 or float64 for the Triton kernel, "
            f"got {x.dtype}"
        )
    dev = x.device.type
    if not (dev == "cuda" or (dev == "cpu" and (interpreting() or compiling()))):
        raise ValueError(
            f"{name} is on {x.device}: the Triton kernel needs a CUDA tensor "
            "(or TRITON_INTERPRET=1 for CPU tensors)"
        )
    if x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")


def _side(f: torch.Tensor, c: torch.Tensor, acc: torch.dtype):
    """Inverse feature norms (B, N), X^T A (B, D, K), mean normalised features and codes."""
    b, d, n = f.shape
    k = c.shape[1]
    block_p, block_d, block_k, chunk, warps = _blocks(d, k, n)
    inv = torch.empty((b, n), dtype=acc, device=f.device)
    n_pb = triton.cdiv(n, block_p)
    tacc = tl.float64 if acc == torch.float64 else tl.float32
    launch(_inv_norm_kernel, (b * n_pb,), f, inv, n, d, n_pb, *f.stride(),
           ACC=tacc, BLOCK_P=block_p, BLOCK_D=block_d, num_warps=warps)  # fmt: skip
    chunk = min(chunk, n)
    n_ch, n_db = triton.cdiv(n, chunk), triton.cdiv(d, block_d)
    gpart = torch.empty((b, n_ch, d, k), dtype=acc, device=f.device)
    xpart = torch.empty((b, n_ch, d), dtype=acc, device=f.device)
    apart = torch.empty((b, n_ch, k), dtype=acc, device=f.device)
    launch(_gram_kernel, (b * n_ch * n_db,), f, c, inv, gpart, xpart, apart,
           n, d, k, chunk, n_ch, n_db, *f.stride(), *c.stride(),
           ACC=tacc, BLOCK_P=block_p, BLOCK_D=block_d, BLOCK_K=block_k, num_warps=warps)  # fmt: skip
    return inv, gpart.sum(1), xpart.sum(1) / n, apart.sum(1) / n


def _code_grad(f, c, inv, q, v) -> torch.Tensor:
    """Launch the backward kernel for one side; returns the (B, K, N) code gradient."""
    b, d, n = f.shape
    k = c.shape[1]
    block_p, block_d, block_k, _chunk, warps = _blocks(d, k, n)
    grad = torch.empty((b, k, n), dtype=c.dtype, device=c.device)
    n_pb = triton.cdiv(n, block_p)
    tacc = tl.float64 if q.dtype == torch.float64 else tl.float32
    launch(_code_grad_kernel, (b * n_pb,), f, c, inv, q.contiguous(), v.contiguous(), grad,
           n, d, k, n_pb, *f.stride(), *c.stride(),
           ACC=tacc, BLOCK_P=block_p, BLOCK_D=block_d, BLOCK_K=block_k, num_warps=warps)  # fmt: skip
    return grad


class _SmoothnessLoss(torch.autograd.Function):
    """Forward: three kernels and a few (B, D, K) torch ops; backward: one kernel per side."""

    @staticmethod
    def forward(ctx: Any, fa, fb, ca, cb, shift: float, pointwise: bool) -> torch.Tensor:
        acc = (
            torch.float64
            if torch.float64 in (fa.dtype, fb.dtype, ca.dtype, cb.dtype)
            else torch.float32
        )
        shapes = (ca.shape, cb.shape)
        fa, fb, ca, cb = (_as_bdn(t.detach()) for t in (fa, fb, ca, cb))
        inv_a, ga, xbar, abar = _side(fa, ca, acc)
        inv_b, gb, ybar, bbar = _side(fb, cb, acc)
        n_a, n_b = fa.shape[2], fb.shape[2]
        p = 1.0 if pointwise else 0.0
        g = (xbar * ybar).sum(1).mean()
        ab = (abar * bbar).sum(1)
        ra = torch.einsum("bdk,bd->bk", ga, ybar) / n_a  # mean_i r_i a_i
        fs = (ga * gb).sum((1, 2)) / (n_a * n_b) - p * ((ra * bbar).sum(1) - g * ab)
        loss = g - shift - fs.mean() + shift * ab.mean()
        ctx.save_for_backward(fa, fb, ca, cb, inv_a, inv_b, ga, gb, ybar, abar, bbar, g, ra)
        ctx.shift, ctx.p, ctx.shapes = shift, p, shapes
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> Any:
        fa, fb, ca, cb, inv_a, inv_b, ga, gb, ybar, abar, bbar, g, ra = ctx.saved_tensors
        nb, n_a, n_b = fa.shape[0], fa.shape[2], fb.shape[2]
        shift, p = ctx.shift, ctx.p
        go = grad_output.to(ga.dtype)
        grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            # dL/da_i = (x_i^T (-G_b/M + P ybar bbar^T) + (shift - P g) bbar) / (B N)
            q = -gb / n_b + p * ybar[:, :, None] * bbar[:, None, :]
            v = (shift - p * g) * bbar
            s = go / (nb * n_a)
            grad_a = _code_grad(fa, ca, inv_a, q * s, v * s).view(ctx.shapes[0])
        if ctx.needs_input_grad[3]:
            # dL/db_j = (y_j^T (-G_a/N) + P mean_i r_i a_i + (shift - P g) abar) / (B M)
            v = p * ra + (shift - p * g) * abar
            s = go / (nb * n_b)
            grad_b = _code_grad(fb, cb, inv_b, -ga / n_a * s, v * s).view(ctx.shapes[1])
        return None, None, grad_a, grad_b, None, None


def smoothness_loss_triton(
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    codes_a: torch.Tensor,
    codes_b: torch.Tensor,
    *,
    shift: float,
    pointwise: bool = True,
) -> torch.Tensor:
    """SmooSeg's smoothness loss with the Triton kernels (see the module docstring).

    Same arguments as :func:`dynaguide.smooseg.smoothness_loss`, which checks their shapes
    and calls this for CUDA tensors. Here: float32 / bfloat16 / float16 / float64 tensors
    on CUDA (CPU under ``TRITON_INTERPRET=1``), at most 256 code channels. No gradient
    flows into the features.
    """
    for name, t in (("feats_a", feats_a), ("feats_b", feats_b), ("codes_a", codes_a),
                    ("codes_b", codes_b)):  # fmt: skip
        _check(name, t)
    if codes_a.shape[1] > MAX_CODES:
        raise ValueError(
            f"codes_a has {codes_a.shape[1]} channels: the Triton kernel takes at most "
            f"{MAX_CODES} (use method='factorised')"
        )
    return _SmoothnessLoss.apply(feats_a, feats_b, codes_a, codes_b, float(shift), bool(pointwise))
