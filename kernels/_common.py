"""Shared pieces of the fused loss kernels: conventions and on-device (``@triton.jit``) helpers.

Conventions used by every kernel in :mod:`dynaguide.kernels`:

* The response is viewed as ``(N, C, H, W)`` with its own strides (NCHW, channels-last or
  any other strided view): nothing is copied. A program owns ``BLOCK_P`` consecutive pixels
  (row-major over ``H*W``) of one image and loops over the channels in blocks of
  ``BLOCK_C``; the tile is ``[BLOCK_P, BLOCK_C]``. With channels-last the channel axis is
  contiguous, with NCHW the pixel axis is; which one is a compile-time constant
  (``Layout.unit``), so the loads coalesce either way.
* One compiled kernel per configuration, whatever the image size: every argument that
  depends on H, W or N (sizes, strides, counts, block counts) is in the kernel's
  ``do_not_specialize`` list, block sizes depend on C only, and buffers are separate
  allocations (Triton specialises pointers on 16-byte alignment). What stays specialised
  depends on C and the layout only (plus ``numel % 16`` of the backward rescale, which
  keeps its vectorised loads: at most two variants).
* The grid has one axis (N * pixel blocks; axis 1 would cap N at 65535). Pixel indices
  are int32, element offsets int64.
* Accumulation is in float32 (float64 for float64 inputs); gradients are written in the
  input dtype (float32 for float16 inputs until backward applies ``grad_output``).
* Per-image sums are written as one partial per program and summed by a finalisation
  kernel (deterministic, no float atomics). Integer counts (label histogram, valid pixels)
  use atomics, which are exact.
* Gradients are computed during the forward pass; backward only rescales them by
  ``grad_output`` (in place, skipped on device where ``grad_output == 1``).

Under ``TRITON_INTERPRET=1`` (CPU tests) every program costs about 0.4 ms, so the launch
geometry switches to a few big programs.
"""

from __future__ import annotations

import triton
import triton.language as tl

# The host side (layout, checks, geometry) lives in _layout; its names are part of this
# package-private module's interface for the kernel files.
from ._layout import (  # noqa: F401  # noqa: F401 - the shared checks and constants, re-exported
    REDUCTIONS,
    SIZE_DEPENDENT,
    SUPPORTED_DTYPES,
    TARGET_DTYPES,
    WEIGHT_MODES,
    Geometry,
    Layout,
    check_continuity_options,
    check_int,
    check_number,
    check_reduction,
    check_response,
    check_target,
    check_target_values,
    compiling,
    direction_counts,
    geometry,
    grad_strides,
    interpreting,
    jit_any_size,
    launch,
    new_grad,
    split_float,
    target_flat,
)


# --------------------------------------------------------------- jit helper functions
@triton.jit
def _join(hi, lo, ACC: tl.constexpr):
    """Rebuild a scalar passed as float32 hi + lo in the accumulation dtype."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _inv(count, ACC: tl.constexpr):
    """1 / count in the accumulation dtype (count is an integer scalar >= 1)."""
    return 1.0 / tl.cast(count, ACC)


@triton.jit
def _program(n_pblocks):
    """(pixel block, image) of this program: the grid is one axis of N * n_pblocks programs
    (axis 0 allows 2**31 - 1; axis 1, at most 65535, would limit the batch)."""
    pid = tl.program_id(0)
    n = pid // n_pblocks
    return pid - n * n_pblocks, n.to(tl.int64)


@triton.jit
def _pixels(pid_p, HW, W, s_h, s_w, BLOCK_P: tl.constexpr, FLAT: tl.constexpr, UNIT: tl.constexpr):
    """Pixel indices of a program: (p, in-range mask, row i, column j, element offset).

    p, i, j are int32 (an image has fewer than 2**31 pixels); the offset is int64.
    """
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < HW
    i = p // W
    j = p - i * W
    if FLAT:
        off = p.to(tl.int64) if UNIT == 2 else p.to(tl.int64) * s_w
    else:
        off = i.to(tl.int64) * s_h + j.to(tl.int64) * s_w
    return p, pmask, i, j, off


@triton.jit
def _coffs(c, s_c, UNIT: tl.constexpr):
    """Element offsets of channels ``c`` (int64): unit stride known at compile time."""
    return c.to(tl.int64) if UNIT == 1 else c.to(tl.int64) * s_c


@triton.jit
def _goffs(p, c, g_c, g_p, G_CL: tl.constexpr):
    """[pixels, channels] offsets into a gradient buffer from :func:`new_grad`."""
    if G_CL:
        off = (p.to(tl.int64) * g_p)[:, None] + c.to(tl.int64)[None, :]
    else:
        off = p.to(tl.int64)[:, None] + (c.to(tl.int64) * g_c)[None, :]
    return off


@triton.jit
def _penalty(d, delta, IS_HUBER: tl.constexpr):
    """Huber (0.5 d^2 if |d| < delta else delta (|d| - delta/2)) or |d|."""
    a = tl.abs(d)
    if IS_HUBER:
        a = tl.where(a < delta, 0.5 * d * d, delta * (a - 0.5 * delta))
    return a


@triton.jit
def _dpenalty(d, delta, IS_HUBER: tl.constexpr):
    """Derivative of :func:`_penalty` in d.

    Huber: d if |d| < delta else delta * sign(d), i.e. clamp(d, -delta, delta) (at
    |d| == delta both branches give +-delta, as torch's huber backward).
    L1: sign(d) with sign(0) = 0 (torch's abs backward).
    """
    if IS_HUBER:
        g = tl.minimum(tl.maximum(d, -delta), delta)
    else:
        g = tl.where(d > 0, 1.0, 0.0) - tl.where(d < 0, 1.0, 0.0)
    return g


@triton.jit
def _stats_loop(
    base,
    pix,
    pmask,
    has_dn,
    has_rt,
    tc,
    C,
    s_c,
    s_h,
    s_w,
    inv_v,
    inv_h,
    inv_d,
    delta,
    WANT_TARGET: tl.constexpr,
    WANT_CONT: tl.constexpr,
    IS_HUBER: tl.constexpr,
    EIGHT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    UNIT: tl.constexpr,
):
    """One sweep over the channels of ``BLOCK_P`` pixels.

    Returns, per pixel: the channel maximum ``m``; ``t = sum_{c != idx} exp(x_c - m)``,
    the softmax denominator without the maximum's own term (``s = 1 + t``); the first
    argmax ``idx`` (int32; ties go to the lowest channel as in ``torch.argmax``);
    ``x[tc]`` (if ``WANT_TARGET``) and the continuity loss of the pairs anchored at the
    pixel, each direction already divided by its element count (if ``WANT_CONT``; see
    :func:`_continuity_loss_tile`).

    Why ``t`` and not ``s``: the similarity loss is ``log(s) = log1p(t)`` and the gradient
    at the label is ``1/s - 1 = -t/s``. When one channel dominates, ``t`` is small and
    ``s`` rounds it away (``log(1 + 1e-3)`` in float32 has a relative error ~1e-4).
    Online update over channel blocks with block maximum ``bm`` at ``ba`` and running
    maximum ``M = max(m, bm)``: if ``bm > m`` the old maximum becomes an ordinary term,
    ``t <- (t + 1) exp(m - M) + sum_{block, c != ba} exp(x_c - M)``; otherwise (ties
    included: an earlier channel keeps the label) ``t <- t + sum_{block} exp(x_c - m)``.
    """
    m = tl.full([BLOCK_P], float("-inf"), ACC)
    t = tl.zeros([BLOCK_P], ACC)
    idx = tl.zeros([BLOCK_P], tl.int32)
    xt = tl.zeros([BLOCK_P], ACC)
    cont = tl.zeros([BLOCK_P], ACC)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < C
        m2 = pmask[:, None] & cmask[None, :]
        ptrs = base + pix[:, None] + _coffs(c, s_c, UNIT)[None, :]
        x = tl.load(ptrs, mask=m2, other=0.0).to(ACC)
        if WANT_CONT:
            cont += _continuity_loss_tile(
                x,
                ptrs,
                m2,
                has_dn,
                has_rt,
                s_h,
                s_w,
                inv_v,
                inv_h,
                inv_d,
                delta,
                IS_HUBER,
                EIGHT,
                ACC,
            )
        if WANT_TARGET:
            hit = (c[None, :] == tc[:, None]) & cmask[None, :]
            xt += tl.sum(tl.where(hit, x, 0.0), axis=1)
        x = tl.where(cmask[None, :], x, float("-inf"))
        bmax = tl.max(x, axis=1)
        barg = tl.argmax(x, axis=1, tie_break_left=True).to(tl.int32) + c0
        new_m = tl.maximum(m, bmax)
        e = tl.exp(x - new_m[:, None])
        block_all = tl.sum(e, axis=1)
        block_rest = tl.sum(tl.where(c[None, :] == barg[:, None], 0.0, e), axis=1)
        newmax = bmax > m  # strict: an earlier block keeps ties
        t = tl.where(newmax, (t + 1.0) * tl.exp(m - new_m) + block_rest, t + block_all)
        idx = tl.where(newmax, barg, idx)
        m = new_m
    return m, t, idx, xt, cont


@triton.jit
def _log1p(t):
    """log(1 + t) accurate for small t without libdevice (Goldberg: log(u) * t / (u - 1))."""
    u = 1.0 + t
    d = u - 1.0
    return tl.where(d == 0.0, t, tl.log(u) * (t / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _continuity_loss_tile(
    x,
    ptrs,
    m2,
    has_dn,
    has_rt,
    s_h,
    s_w,
    inv_v,
    inv_h,
    inv_d,
    delta,
    IS_HUBER: tl.constexpr,
    EIGHT: tl.constexpr,
    ACC: tl.constexpr,
):
    """Per-pixel continuity loss of the pairs anchored at (i, j), summed over the tile's channels.

    Pairs anchored at (i, j): vertical r[i+1, j] - r[i, j], horizontal r[i, j+1] - r[i, j],
    and with 8 neighbours diagonal r[i+1, j+1] - r[i, j] and anti-diagonal
    r[i+1, j] - r[i, j+1]. Every pair of the image has exactly one anchor, so summing
    over all pixels gives each direction's total; ``inv_*`` are 1 / element counts.
    """
    m_dn = m2 & has_dn[:, None]
    m_rt = m2 & has_rt[:, None]
    x_d = tl.load(ptrs + s_h, mask=m_dn, other=0.0).to(ACC)
    x_r = tl.load(ptrs + s_w, mask=m_rt, other=0.0).to(ACC)
    lv = tl.sum(tl.where(m_dn, _penalty(x_d - x, delta, IS_HUBER), 0.0), axis=1)
    lh = tl.sum(tl.where(m_rt, _penalty(x_r - x, delta, IS_HUBER), 0.0), axis=1)
    out = lv * inv_v + lh * inv_h
    if EIGHT:
        m_dr = m_dn & has_rt[:, None]
        x_dr = tl.load(ptrs + s_h + s_w, mask=m_dr, other=0.0).to(ACC)
        ld = tl.where(m_dr, _penalty(x_dr - x, delta, IS_HUBER), 0.0)
        la = tl.where(m_dr, _penalty(x_d - x_r, delta, IS_HUBER), 0.0)
        out += tl.sum(ld + la, axis=1) * inv_d
    return out


@triton.jit
def _continuity_grad_tile(
    x,
    ptrs,
    m2,
    has_up,
    has_dn,
    has_lt,
    has_rt,
    s_h,
    s_w,
    inv_v,
    inv_h,
    inv_d,
    delta,
    IS_HUBER: tl.constexpr,
    EIGHT: tl.constexpr,
    ACC: tl.constexpr,
):
    """d(continuity)/d r[i, j] for a tile (per image, before any weight or reduction).

    With L = sum_dir inv_dir * sum_pairs phi(r[plus] - r[minus]), a pixel receives
    +phi'(d) * inv_dir from each pair where it is the plus end and -phi'(d) * inv_dir
    from each pair where it is the minus end:

    * vertical:   plus of (i-1, j) [needs i > 0], minus of (i, j) [needs i < H-1]
    * horizontal: plus of (i, j-1) [j > 0],        minus of (i, j) [j < W-1]
    * diagonal:   plus of anchor (i-1, j-1): d = r[i, j] - r[i-1, j-1] [i > 0, j > 0];
                  minus of anchor (i, j):    d = r[i+1, j+1] - r[i, j] [i < H-1, j < W-1]
    * anti-diag (pair r[a+1, b] - r[a, b+1]): plus of anchor (i-1, j):
                  d = r[i, j] - r[i-1, j+1] [i > 0, j < W-1];
                  minus of anchor (i, j-1): d = r[i+1, j-1] - r[i, j] [i < H-1, j > 0]
    """
    m_up = m2 & has_up[:, None]
    m_dn = m2 & has_dn[:, None]
    m_lt = m2 & has_lt[:, None]
    m_rt = m2 & has_rt[:, None]
    x_u = tl.load(ptrs - s_h, mask=m_up, other=0.0).to(ACC)
    x_d = tl.load(ptrs + s_h, mask=m_dn, other=0.0).to(ACC)
    x_l = tl.load(ptrs - s_w, mask=m_lt, other=0.0).to(ACC)
    x_r = tl.load(ptrs + s_w, mask=m_rt, other=0.0).to(ACC)
    gv = tl.where(m_up, _dpenalty(x - x_u, delta, IS_HUBER), 0.0) - tl.where(
        m_dn, _dpenalty(x_d - x, delta, IS_HUBER), 0.0
    )
    gh = tl.where(m_lt, _dpenalty(x - x_l, delta, IS_HUBER), 0.0) - tl.where(
        m_rt, _dpenalty(x_r - x, delta, IS_HUBER), 0.0
    )
    g = gv * inv_v + gh * inv_h
    if EIGHT:
        m_ul = m_up & has_lt[:, None]
        m_dr = m_dn & has_rt[:, None]
        m_ur = m_up & has_rt[:, None]
        m_dl = m_dn & has_lt[:, None]
        x_ul = tl.load(ptrs - s_h - s_w, mask=m_ul, other=0.0).to(ACC)
        x_dr = tl.load(ptrs + s_h + s_w, mask=m_dr, other=0.0).to(ACC)
        x_ur = tl.load(ptrs - s_h + s_w, mask=m_ur, other=0.0).to(ACC)
        x_dl = tl.load(ptrs + s_h - s_w, mask=m_dl, other=0.0).to(ACC)
        gd = tl.where(m_ul, _dpenalty(x - x_ul, delta, IS_HUBER), 0.0) - tl.where(
            m_dr, _dpenalty(x_dr - x, delta, IS_HUBER), 0.0
        )
        ga = tl.where(m_ur, _dpenalty(x - x_ur, delta, IS_HUBER), 0.0) - tl.where(
            m_dl, _dpenalty(x_dl - x, delta, IS_HUBER), 0.0
        )
        g += (gd + ga) * inv_d
    return g


@triton.jit
def _add_histogram(row_ptr, idx, pmask, C, NUM_BINS: tl.constexpr):
    """Add the labels ``idx`` of the in-range pixels to the int32 histogram at ``row_ptr``.

    One histogram per program, then one atomic per non-empty bin (not one per pixel):
    late in training few labels remain, and per-pixel atomics would serialise on them.
    """
    h = tl.histogram(idx, NUM_BINS, mask=pmask)
    bins = tl.arange(0, NUM_BINS)
    tl.atomic_add(row_ptr + bins, h, mask=(bins < C) & (h > 0), sem="relaxed")


@triton.jit
def _count_labels(row_ptr, C, BLOCK_BINS: tl.constexpr):
    """Number of non-zero bins of the int32 histogram at ``row_ptr`` (K), as int32."""
    k = tl.zeros([], tl.int32)
    for b0 in range(0, C, BLOCK_BINS):
        b = b0 + tl.arange(0, BLOCK_BINS)
        h = tl.load(row_ptr + b, mask=b < C, other=0)
        k += tl.sum((h > 0).to(tl.int32), axis=0)
    return k


@triton.jit
def _dyn_weight(k, kmin, param, MODE: tl.constexpr, ACC: tl.constexpr):
    """Continuity weight from K_eff = max(K, kmin): mu (0), K/beta (1) or scf_mu/max(K, 1) (2)."""
    keff = tl.cast(tl.maximum(k, kmin), ACC)
    if MODE == 0:
        w = param + 0.0 * keff
    elif MODE == 1:
        w = keff / param
    else:
        w = param / tl.maximum(keff, 1.0)
    return w


@triton.jit
def _row_sum(ptr, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """Sum of ``n`` consecutive values at ``ptr`` in ``ACC``."""
    acc = tl.zeros([BLOCK], ACC)
    for b0 in range(0, n, BLOCK):
        b = b0 + tl.arange(0, BLOCK)
        acc += tl.load(ptr + b, mask=b < n, other=0.0).to(ACC)
    return tl.sum(acc, axis=0)
