"""Shared pieces of the fused loss kernels: checks, launch geometry, on-device helpers.

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

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

# Dynamic continuity weight modes: w = mu | K / beta | scf_mu / K (dynaguide.objective).
from dynaguide.objective import WEIGHT_MODES  # noqa: F401
from dynaguide.op_checks import (  # noqa: F401 - one set of checks for every backend
    REDUCTIONS,
    TARGET_DTYPES,
    check_continuity_options,
    check_int,
    check_number,
    check_reduction,
    check_target_values,
)
from dynaguide.op_checks import check_target as _check_target

from ._launch import compiling, interpreting, launch  # noqa: F401 - re-exported

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------- checks
@dataclass(frozen=True)
class Layout:
    """A validated response map viewed as (N, C, H, W), with its strides."""

    r: torch.Tensor
    batched: bool
    n: int
    c: int
    h: int
    w: int
    strides: tuple[int, int, int, int]

    @property
    def hw(self) -> int:
        return self.h * self.w

    @property
    def channels_last(self) -> bool:
        """Channel axis is the contiguous one (coalesce over channels)."""
        return self.strides[1] == 1 and self.c > 1

    @property
    def flat(self) -> bool:
        """Pixels form one uniform-stride sequence (offset = p * stride_w)."""
        return self.h == 1 or self.strides[2] == self.w * self.strides[3]

    @property
    def unit(self) -> int:
        """Which axis has unit stride, as a compile-time constant of the kernels.

        1: the channels (channels-last, or a single channel); 2: the pixels (dense NCHW);
        0: neither. The strides themselves are runtime arguments that Triton does not
        specialise on (so that every image size reuses one compiled kernel); this constant
        keeps the unit-stride loads vectorised.
        """
        if self.c > 1 and self.strides[1] == 1:
            return 1
        if self.flat and (self.hw == 1 or self.strides[3] == 1):
            return 2
        return 1 if self.c == 1 else 0

    @property
    def grad_dtype(self) -> torch.dtype:
        """dtype of the gradient written in forward: float32 for float16 responses (their
        small gradients would underflow before backward applies the loss scale)."""
        return torch.float32 if self.r.dtype == torch.float16 else self.r.dtype

    @property
    def acc(self) -> tl.dtype:
        """Accumulation dtype of the kernels."""
        return tl.float64 if self.r.dtype == torch.float64 else tl.float32

    @property
    def loss_dtype(self) -> torch.dtype:
        """dtype of the returned losses (as the torch reference: float32 for bf16/fp16)."""
        return torch.float64 if self.r.dtype == torch.float64 else torch.float32


def check_response(response: torch.Tensor, name: str = "response") -> Layout:
    """Validate a response map for the Triton kernels and view it as (N, C, H, W).

    Raises
    ------
    TypeError
        Not a tensor, or an unsupported dtype.
    ValueError
        Wrong rank, empty, or a device the kernels cannot run on.
    """
    if not isinstance(response, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(response).__name__}")
    if response.dim() not in (3, 4):
        raise ValueError(
            f"{name} must have shape (C, H, W) or (N, C, H, W), got {tuple(response.shape)}"
        )
    if response.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16, float16 or float64 for the Triton kernels, "
            f"got {response.dtype}"
        )
    if response.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(response.shape)}")
    dev = response.device.type
    if not (dev == "cuda" or (dev == "cpu" and (interpreting() or compiling()))):
        raise ValueError(
            f"{name} is on {response.device}: the Triton kernels need a CUDA tensor "
            "(or TRITON_INTERPRET=1 for CPU tensors)"
        )
    r = response if response.dim() == 4 else response.unsqueeze(0)
    n, c, h, w = r.shape
    return Layout(r, response.dim() == 4, n, c, h, w, tuple(r.stride()))  # type: ignore[arg-type]


def check_target(target: torch.Tensor, lay: Layout, name: str = "target") -> torch.Tensor:
    """Validate guide labels against a response layout; return them viewed as (N, H, W)."""
    return _check_target(target, lay.r, lay.batched, name)


def new_grad(lay: Layout) -> torch.Tensor:
    """Dense, image-major gradient buffer in the response's memory format (no copy of data)."""
    fmt = torch.channels_last if lay.channels_last else torch.contiguous_format
    return torch.empty(
        (lay.n, lay.c, lay.h, lay.w), dtype=lay.grad_dtype, device=lay.r.device, memory_format=fmt
    )


def target_flat(t: torch.Tensor, lay: Layout) -> bool:
    """Whether a (N, H, W) target's pixels are at unit stride (offset = pixel index)."""
    _, t_h, t_w = t.stride()
    return (lay.h == 1 or t_h == lay.w * t_w) and (lay.hw == 1 or t_w == 1)


def grad_strides(g: torch.Tensor) -> tuple[int, int, int]:
    """(stride_n, stride_c, stride_p) of a buffer from :func:`new_grad` (pixels are flat)."""
    return g.stride(0), g.stride(1), g.stride(3)


def direction_counts(lay: Layout) -> tuple[int, int, int]:
    """Element counts of the vertical, horizontal and diagonal pairs (each at least 1).

    A direction without pairs has no valid neighbour anywhere, so its count is never used.
    """
    c, h, w = lay.c, lay.h, lay.w
    return max(c * (h - 1) * w, 1), max(c * h * (w - 1), 1), max(c * (h - 1) * (w - 1), 1)


def split_float(x: float) -> tuple[float, float]:
    """Split ``x`` into float32 ``hi + lo`` (Triton passes Python floats as float32).

    The kernels rebuild ``hi + lo`` in their accumulation dtype, so float64 inputs see
    the scalars at about 48-bit precision while float32 ones see ``float32(x)``.
    """
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


# ------------------------------------------------------------- size-independent kernels
# Integer kernel arguments whose value depends on the image size or the batch (sizes,
# strides, counts, block counts, the per-image K floor): Triton must not specialise on them
# (== 1, % 16), or most new sizes would compile new variants.
SIZE_DEPENDENT = frozenset({
    "H", "W", "HW", "N", "n_pblocks", "n_parts", "s_n", "s_c", "s_h", "g_n", "g_c", "t_n", "t_h",
    "cnt_v", "cnt_h", "cnt_d", "kmin_scalar", "per_image",
})  # fmt: skip


def jit_any_size(fn: Any) -> Any:
    """``triton.jit`` with the arguments of :data:`SIZE_DEPENDENT` in ``do_not_specialize``."""
    params = inspect.signature(fn).parameters
    return triton.jit(fn, do_not_specialize=[p for p in params if p in SIZE_DEPENDENT])


# ------------------------------------------------------------------- launch geometry
@dataclass(frozen=True)
class Geometry:
    """Tile sizes and warps for one kernel launch."""

    block_p: int
    block_c: int
    num_warps: int

    def n_pblocks(self, hw: int) -> int:
        return triton.cdiv(hw, self.block_p)


def geometry(lay: Layout, *, stencil: bool) -> Geometry:
    """Tile for ``lay``: contiguous axis wide, about 2K (stencil) or 4K elements per tile.

    Under the interpreter: few, big programs (a program costs ~0.4 ms there).
    """
    c_pow2 = triton.next_power_of_2(lay.c)
    if interpreting() or (not compiling() and lay.r.device.type != "cuda"):
        block_c = min(c_pow2, 256)
        block_p = max(16, min(triton.next_power_of_2(lay.hw), 32768 // block_c))
        return Geometry(block_p, block_c, 4)
    # Checked with ptxas for sm_90 (python -m dynaguide.kernels._compile_check): registers
    # grow with the elements each thread holds. The stencil kernels hold nine neighbour
    # tiles, their masks and 64-bit addresses: at 4 elements per thread (1024 per program)
    # pass 2 needed 156 registers (one 256-thread CTA per SM), at 2 (512) it needs 64. The
    # others hold one tile: 8 per thread gave 140 (guidance), 4 gives ~70.
    elems = 512 if stencil else 1024
    # channels-last: one warp row = 32 channels = 128 contiguous bytes (fp32)
    block_c = min(c_pow2, 32) if lay.channels_last else min(c_pow2, 4 if stencil else 8)
    block_p = max(16, elems // block_c)
    num_warps = 8
    return Geometry(block_p, block_c, num_warps)


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
