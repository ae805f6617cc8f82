"""Convolutions of the (constant) input image whose weight gradient is one matrix product.

The first layers of the refinement network (the first 3x3 conv and the separate skip conv)
see the image itself, which never changes during a refinement and needs no gradient.
Their weight gradient is ``dW = sum over pixels of gout[p] (x) patch(x)[p]``, i.e.
``gout^T (C x M) @ cols (M x 27)`` with ``cols`` the 3x3 patches of the image (im2col).
oneDNN's backward-weights kernel for 3 input channels is memory-bound and slow on CPU;
the matrix product reads the output gradient once, and the patch matrix (with a column of
ones that yields the bias gradient in the same product) is built once per image and kept.
It is also more accurate (one blocked float32 GEMM reduction).

The forward is the ordinary ``F.conv2d``; any case this path does not cover (CUDA, an
input that requires grad, other kernel sizes, strides or groups, autocast, functorch
transforms, a planar NCHW input: the reference path) is the plain ``conv(x)``.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynaguide.cpu_runtime import serial

__all__ = ["InputPatches", "input_conv"]


class InputPatches:
    """im2col of the last image seen, with a column of ones: (N*M, C_in*kh*kw + 1).

    Rebuilt when the image tensor changes (another object, or an in-place write).
    """

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._ref: weakref.ref | None = None
        self._cols: torch.Tensor | None = None

    def get(
        self, x: torch.Tensor, kernel: tuple[int, int], padding: tuple[int, int]
    ) -> torch.Tensor:
        """The patch matrix of ``x`` (N, C, H, W) for ``kernel`` and ``padding``."""
        key = (x._version, tuple(x.shape), x.dtype, kernel, padding)
        if self._ref is None or self._ref() is not x or self._key != key or self._cols is None:
            with torch.no_grad():
                n, _, h, w = x.shape
                cols = F.unfold(x, kernel, padding=padding)  # (N, C*kh*kw, H*W)
                cols = cols.transpose(1, 2).reshape(n * h * w, -1)
                self._cols = torch.cat([cols, cols.new_ones(n * h * w, 1)], 1)
            self._ref, self._key = weakref.ref(x), key
        return self._cols


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N*H*W, C) matrix of a (N, C, H, W) tensor (a view when channels-last)."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n * h * w, c)


class _InputConv(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        padding: tuple[int, int],
        patches: InputPatches,
    ) -> torch.Tensor:
        ctx.patches, ctx.padding, ctx.x = patches, padding, x
        ctx.wshape = weight.shape
        return F.conv2d(x, weight, bias, padding=padding)

    @staticmethod
    def backward(ctx: Any, gout: torch.Tensor) -> Any:
        cols = ctx.patches.get(ctx.x, tuple(ctx.wshape[2:]), ctx.padding)
        # (C_in*kh*kw + 1, C_out), transposed. One thread: this long-K, thin product ran
        # 2.3x faster on one MKL thread than on two (17.7 vs 41 ms at 481x321), measured.
        with serial():
            dwb = (cols.t() @ _rows(gout)).t()
        dw = dwb[:, :-1].reshape(ctx.wshape)
        db = dwb[:, -1].contiguous()
        return None, dw, db, None, None


def _usable(x: torch.Tensor, conv: nn.Conv2d) -> bool:
    if torch._C._functorch.is_functorch_wrapped_tensor(x):  # vmap / grad transforms
        return False
    if not torch.is_grad_enabled() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False  # nothing to gain without a backward; exporters see the plain conv
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype in (torch.float32, torch.float64)
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.requires_grad
        and conv.weight.dtype == x.dtype
        and conv.bias is not None
        and conv.stride == (1, 1)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
        and isinstance(conv.padding, tuple)
        and not torch.is_autocast_enabled("cpu")
    )


def input_conv(x: torch.Tensor, conv: nn.Conv2d, patches: InputPatches) -> torch.Tensor:
    """``conv(x)`` for an input that needs no gradient; on CPU the weight gradient is one
    GEMM against the cached patch matrix of ``x`` (see the module docstring)."""
    if not _usable(x, conv) or not (conv.weight.requires_grad or conv.bias.requires_grad):
        return conv(x)
    return _InputConv.apply(x, conv.weight, conv.bias, tuple(conv.padding), patches)
