"""Host side of the fused loss kernels: the response layout, checks and launch geometry.

A response is viewed as ``(N, C, H, W)`` with its own strides (:class:`Layout`); the
launch geometry (:func:`geometry`) picks block sizes from C only, so one compiled kernel
serves every image size (:func:`jit_any_size`). The conventions all kernels share are in
:mod:`dynaguide.kernels._common`.
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
