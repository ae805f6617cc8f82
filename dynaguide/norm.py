"""``BatchNorm2d(relu(z))`` in training mode as one fused CPU operation (native extension).

The refinement network normalises every block with the batch statistics of the image
(Ioffe & Szegedy, 2015): per channel ``y = (a - mean) / sqrt(var + eps) * gamma + beta``
with ``a = relu(z)`` (or ``a = z`` for the classifier's norm) and the biased variance.
PyTorch runs ReLU, its backward and the BatchNorm forward and backward as separate passes
over the activation, and on CPU its channels-last BatchNorm backward is slow (and much
slower still for the (1, C, H, W) gradient of a squeezed response, whose batch stride is
not the dense one). Here a channels-last activation is viewed as an (M, C) matrix (M
pixels, C contiguous channels) and

* forward: one pass for the channel sums (float64), one that writes ``y``;
* backward: one pass for ``sum(gy)`` and ``sum(gy * a)``, one that writes
  ``dz = [z > 0] * gamma * invstd * (gy - mean(gy) - xhat * mean(gy * xhat))``.

The running statistics and ``num_batches_tracked`` are updated as
:class:`torch.nn.BatchNorm2d` updates them. Anything this path does not cover (CUDA,
planar NCHW, bf16 autocast, eval mode, a module without affine parameters or running
statistics, a single pixel) falls back to ``norm(torch.relu(z))``, which stays the
reference.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

__all__ = ["fused_available", "relu_batch_norm"]


def _native() -> Any:
    try:
        mod = importlib.import_module("dynaguide._native")
    except ImportError:
        return None
    return mod if hasattr(mod, "relu_bn_forward") else None


def fused_available() -> bool:
    """Whether the native extension provides the fused ReLU + BatchNorm kernels."""
    return _native() is not None


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """(M, C) view of a channels-last (N, C, H, W) tensor with unit channel stride, or None."""
    n, c, h, w = t.shape
    if c > 1 and t.stride(1) != 1:
        return None
    try:
        return t.permute(0, 2, 3, 1).view(n * h * w, c)
    except RuntimeError:  # pixels not on one uniform stride
        return None


def _usable(z: torch.Tensor, norm: nn.BatchNorm2d) -> bool:
    if torch._C._functorch.is_functorch_wrapped_tensor(z):  # vmap / grad transforms
        return False
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False  # exporters see the plain modules
    if not (
        z.device.type == "cpu"
        and z.dim() == 4
        and z.dtype in (torch.float32, torch.float64)
        and norm.training
        and norm.affine
        and norm.track_running_stats
        and norm.running_mean is not None
        and norm.running_var is not None
        and norm.weight.dtype == z.dtype
        and z.shape[0] * z.shape[2] * z.shape[3] > 1
        and not torch.is_autocast_enabled("cpu")
        and _native() is not None
    ):
        return False
    return _rows(z) is not None


class _ReluBatchNorm(torch.autograd.Function):
    """autograd Function: inputs (z, gamma, beta, residual), outputs (y, batch mean, biased var)."""

    @staticmethod
    def forward(
        ctx: Any,
        z: torch.Tensor,
        gamma: torch.Tensor,
        beta: torch.Tensor,
        residual: torch.Tensor | None,
        relu: bool,
        eps: float,
    ) -> Any:
        nat = _native()
        c = z.shape[1]
        zm = _rows(z)
        y = torch.empty_like(z, memory_format=torch.channels_last)
        stats = torch.empty((3, c), dtype=torch.float64)
        res = None if residual is None else _rows(residual.detach())
        nat.relu_bn_forward(
            zm, relu, gamma.detach(), beta.detach(), float(eps), res, _rows(y), *stats.unbind(0)
        )
        mean, var, invstd = stats.unbind(0)
        ctx.relu = relu
        ctx.save_for_backward(z, gamma, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor, _gm: Any, _gv: Any) -> Any:
        z, gamma, mean, invstd = ctx.saved_tensors
        gm = _rows(gy)
        if gm is None:  # an odd gradient layout: one copy into channels-last
            gy = gy.contiguous(memory_format=torch.channels_last)
            gm = _rows(gy)
        dz = torch.empty_like(z, memory_format=torch.channels_last)
        c = z.shape[1]
        dgb = torch.empty((2, c), dtype=torch.float64)
        _native().relu_bn_backward(
            _rows(z), gm, ctx.relu, gamma.detach(), mean, invstd, _rows(dz), *dgb.unbind(0)
        )
        dgamma, dbeta = (g.to(gamma.dtype) for g in dgb.unbind(0))
        return (
            dz if ctx.needs_input_grad[0] else None,
            dgamma if ctx.needs_input_grad[1] else None,
            dbeta if ctx.needs_input_grad[2] else None,
            gy if ctx.needs_input_grad[3] else None,  # d(y)/d(residual) = identity
            None,
            None,
        )


def _update_running_stats(
    norm: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int
) -> None:
    """As ``nn.BatchNorm2d`` in training: EMA (or cumulative average) of mean and unbiased var."""
    assert norm.running_mean is not None and norm.running_var is not None
    factor = 0.0 if norm.momentum is None else norm.momentum
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
        if norm.momentum is None:
            factor = 1.0 / float(norm.num_batches_tracked)
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        rm, rv = norm.running_mean, norm.running_var
        rm.copy_((rm.double() * (1.0 - factor) + mean * factor).to(rm.dtype))
        rv.copy_((rv.double() * (1.0 - factor) + unbiased * factor).to(rv.dtype))


def relu_batch_norm(
    z: torch.Tensor,
    norm: nn.BatchNorm2d,
    *,
    relu: bool = True,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``norm(torch.relu(z))`` (``norm(z)`` with ``relu=False``) ``+ residual`` if given,
    fused on CPU where possible.

    Parameters
    ----------
    z : Tensor (N, C, H, W)
        Activation (the output of a convolution).
    norm : nn.BatchNorm2d
        Its parameters, running statistics and mode are used (and the statistics updated in
        training mode) exactly as calling the module would.
    relu : bool
        Apply ReLU before the normalisation.
    residual : Tensor (N, C, H, W), optional
        Added to the output (a skip branch), in the same pass on the fused path.

    Returns
    -------
    Tensor (N, C, H, W), channels-last on the fused path.
    """
    fused = _usable(z, norm) and (
        residual is None
        or (residual.shape == z.shape and residual.dtype == z.dtype and _rows(residual) is not None)
    )
    if not fused:
        y = norm(torch.relu(z) if relu else z)
        return y if residual is None else y + residual
    y, mean, var = _ReluBatchNorm.apply(z, norm.weight, norm.bias, residual, relu, norm.eps)
    _update_running_stats(norm, mean, var, z.shape[0] * z.shape[2] * z.shape[3])
    return y
