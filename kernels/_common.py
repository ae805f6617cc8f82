"""Shared pieces of the fused loss kernels: checks, launch geometry, on-device helpers.

Conventions used by every kernel in :mod:`dynaguide.kernels`:

* The response is viewed as ``(N, C, H, W)`` with its own strides (NCHW, channels-last or
  any other strided view): nothing is copied. A program owns ``BLOCK_P`` consecutive pixels
  (row-major over ``H*W``) of one image and loops over the channels in blocks of
  ``BLOCK_C``; the tile is ``[BLOCK_P, BLOCK_C]``. With channels-last the channel axis is
  contiguous, with NCHW the pixel axis is; Triton specialises stride arguments equal to 1,
  so the contiguous axis is known at compile time and the loads coalesce either way.
* Offsets are int64 (program ids are cast before any multiplication).
* Accumulation is in float32 (float64 for float64 inputs); gradients are written in the
  input dtype.
* Per-image sums are written as one partial per program and summed by a finalisation
  kernel (deterministic, no float atomics). Integer counts (label histogram, valid pixels)
  use atomics, which are exact.
* Gradients are computed during the forward pass; backward only rescales them by
  ``grad_output`` (in place, skipped on device where ``grad_output == 1``).

Under ``TRITON_INTERPRET=1`` (CPU tests) every program costs about 0.4 ms, so the launch
geometry switches to a few big programs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
# Dynamic continuity weight modes: w = mu | K / beta | scf_mu / K.
WEIGHT_MODES = {"constant": 0, "fsf": 1, "dynaguide": 1, "scf": 2}


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# ------------------------------------------------------------------ compile-only mode
class _CompileOnlyDriver:
    """Minimal stand-in for Triton's active driver: reports a fixed GPU target.

    Lets :func:`compile_only` run Triton's real specialisation and code generation for a
    GPU on a machine that has none (nothing is launched).
    """

    def __init__(self, target: Any):
        self._target = target

    @classmethod
    def is_active(cls) -> bool:
        return False

    def get_current_target(self) -> Any:
        return self._target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty: str) -> str:  # pragma: no cover - not used
        raise NotImplementedError

    def get_benchmarker(self) -> Any:  # pragma: no cover - not used
        raise NotImplementedError


_compile_only: list[tuple[str, Any]] | None = None


@contextlib.contextmanager
def compile_only(arch: int = 90) -> Iterator[list[tuple[str, Any]]]:
    """Compile kernels for CUDA ``sm_<arch>`` instead of launching them.

    Inside the context, every kernel launch of this package is replaced by Triton's
    ``warmup`` (full specialisation on the real arguments, then code generation down to
    a cubin) against a fake driver, and the compiled kernels are collected in the yielded
    list as ``(kernel name, CompiledKernel)``. Outputs of the public functions are
    garbage in this mode. Needs ``TRITON_INTERPRET`` unset before this package is
    imported (the interpreter replaces kernels at definition time).

    Parameters
    ----------
    arch : int
        CUDA compute capability times ten (90 = H100).
    """
    global _compile_only
    if interpreting():
        raise RuntimeError(
            "compile_only() needs TRITON_INTERPRET unset when dynaguide.kernels is imported"
        )
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    previous = driver._active
    compiled: list[tuple[str, Any]] = []
    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", arch, 32)))  # type: ignore[arg-type]
    _compile_only = compiled
    try:
        yield compiled
    finally:
        _compile_only = None
        driver._active = previous


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """Launch ``kernel`` on ``grid`` (or only compile it inside :func:`compile_only`)."""
    if _compile_only is not None:
        compiled = kernel.warmup(*args, grid=grid, **meta)
        _compile_only.append((kernel.fn.__name__, compiled))
        return
    kernel[grid](*args, **meta)


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
    if not (dev == "cuda" or (dev == "cpu" and (interpreting() or _compile_only is not None))):
        raise ValueError(
            f"{name} is on {response.device}: the Triton kernels need a CUDA tensor "
            "(or TRITON_INTERPRET=1 for CPU tensors)"
        )
    r = response if response.dim() == 4 else response.unsqueeze(0)
    n, c, h, w = r.shape
    return Layout(r, response.dim() == 4, n, c, h, w, tuple(r.stride()))  # type: ignore[arg-type]


def check_target(target: torch.Tensor, lay: Layout, name: str = "target") -> torch.Tensor:
    """Validate guide labels against a response layout; return them viewed as (N, H, W)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(
            f"{name} must be an int64, int32, int16 or uint8 tensor, got {target.dtype}"
        )
    t = target if lay.batched else target.unsqueeze(0)
    if tuple(t.shape) != (lay.n, lay.h, lay.w):
        raise ValueError(
            f"{name} shape {tuple(target.shape)} does not match response {tuple(lay.r.shape)} "
            "(expected the response's (N,) H, W)"
        )
    if t.device != lay.r.device:
        raise ValueError(f"{name} is on {t.device} but response is on {lay.r.device}")
    return t


def check_reduction(reduction: str) -> int:
    """Reduction code for the kernels; raises ValueError on an unknown name."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return REDUCTIONS[reduction]


def check_continuity_options(penalty: str, neighbors: int, delta: float) -> None:
    """Validate continuity options with messages naming the argument."""
    if penalty not in ("l1", "huber"):
        raise ValueError(f"penalty must be 'l1' or 'huber', got {penalty!r}")
    if neighbors not in (4, 8) or isinstance(neighbors, bool):
        raise ValueError(f"neighbors must be 4 or 8, got {neighbors!r}")
    if (
        not isinstance(delta, (int, float))
        or isinstance(delta, bool)
        or not (0 < delta < float("inf"))
    ):
        raise ValueError(f"delta must be a finite number > 0, got {delta!r}")


def check_int(name: str, value: Any) -> int:
    """An int (not bool) argument, e.g. ``ignore_index``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def new_grad(lay: Layout) -> torch.Tensor:
    """Dense, image-major gradient buffer in the response's memory format (no copy of data)."""
    fmt = torch.channels_last if lay.channels_last else torch.contiguous_format
    return torch.empty(
        (lay.n, lay.c, lay.h, lay.w), dtype=lay.r.dtype, device=lay.r.device, memory_format=fmt
    )


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
    if interpreting() or (_compile_only is None and lay.r.device.type != "cuda"):
        block_c = min(c_pow2, 256)
        block_p = max(16, min(triton.next_power_of_2(lay.hw), 32768 // block_c))
        return Geometry(block_p, block_c, 4)
    # Checked with ptxas for sm_90 (see benchmarks/kernels.py --compile-report): the
    # stencil kernels hold nine neighbour tiles and their masks, so they get 4 elements per
    # thread (~110-140 registers, no spills); the others 8 (~100-130 registers).
    elems = 1024 if stencil else 2048
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
def _pixels(pid_p, HW, W, s_h, s_w, BLOCK_P: tl.constexpr, FLAT: tl.constexpr):
    """Pixel indices of a program: (p, in-range mask, row i, column j, element offset)."""
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    pmask = p < HW
    i = p // W
    j = p - i * W
    off = p * s_w if FLAT else i * s_h + j * s_w
    return p, pmask, i, j, off


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
        ptrs = base + pix[:, None] + c.to(tl.int64)[None, :] * s_c
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


# ------------------------------------------------------------------- finalisation
@triton.jit
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
        BLOCK_PART=min(1024, triton.next_power_of_2(n_parts)),
        BLOCK_BINS=min(1024, triton.next_power_of_2(lay.c)),
        num_warps=4,
    )
    loss = (per_image if lay.batched else per_image[0]) if reduction == 0 else reduced
    return loss, k


# ---------------------------------------------------------------------- backward
@triton.jit
def _scale_grad_kernel(
    g_ptr,
    go_ptr,
    go_stride,
    numel,
    per_image,
    PER_IMAGE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """g *= grad_output (in place), one value per image or one scalar.

    The check ``grad_output == 1`` happens on the device, per program: programs whose
    factors are all 1 neither read nor write, so ``loss.backward()`` costs no pass over
    the gradient and the host never synchronises.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel
    if PER_IMAGE:
        go = tl.load(go_ptr + (offs // per_image) * go_stride, mask=mask, other=1.0).to(ACC)
    else:
        go = tl.load(go_ptr + offs * 0, mask=mask, other=1.0).to(ACC)
    if tl.sum((go != 1.0).to(tl.int32), axis=0) > 0:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
        tl.store(g_ptr + offs, (g * go).to(g_ptr.dtype.element_ty), mask=mask)


def scale_grad_(grad: torch.Tensor, grad_output: torch.Tensor, batched: bool) -> torch.Tensor:
    """Scale the stored gradient (N, C, H, W) by ``grad_output`` in place; return it shaped
    like the response ((C, H, W) when not ``batched``)."""
    n = grad.shape[0]
    per_image = grad_output.dim() > 0 and grad_output.numel() > 1
    numel = grad.numel()
    block = 32768 if interpreting() else 4096
    go = grad_output if grad_output.dim() > 0 else grad_output.reshape(1)
    launch(
        _scale_grad_kernel,
        (triton.cdiv(numel, block),),
        grad,
        go,
        go.stride(0) if per_image else 0,
        numel,
        numel // n,
        PER_IMAGE=per_image,
        ACC=tl.float64 if grad.dtype == torch.float64 else tl.float32,
        BLOCK=block,
        num_warps=8,
    )
    return grad if batched else grad[0]


class GradStore:
    """Helpers shared by the autograd Functions: the gradient is computed in forward,
    saved, and backward rescales it in place (only once: a second backward through the
    same graph would see an already scaled gradient, so it raises)."""

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
        return scale_grad_(grad, grad_output, ctx.batched)
