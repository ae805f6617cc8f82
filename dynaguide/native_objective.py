"""The refinement objective on CPU with one gradient buffer (native extension).

``sim_w * CE(r, argmax r) + w(K) * continuity(r) + guide_w * CE_ignore(r, target)`` with
the same semantics as the three losses of :mod:`dynaguide.losses` composed by
:func:`dynaguide.objective.objective` (the guide target is aligned to the labels of this very
forward pass), in fewer passes over the response than the three native losses and
autograd's sums of their gradients:

* forward: the similarity kernel (argmax labels, K, the loss; no gradient), the host-side
  guide alignment of those labels, the continuity loss, then one kernel that computes the
  softmax once per pixel and writes the summed similarity + guidance gradient (and the
  guidance loss);
* backward: the continuity gradient is added into that same buffer (times
  ``w(K) * grad_output``), which is returned.

Three reads of the response and one written gradient forward, one read and one
read-modify-write backward, against eight reads and five writes for the separate losses.
Channels-last float32/float64 responses only; anything else takes the separate losses.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["objective", "usable"]

TargetOf = Callable[[torch.Tensor], torch.Tensor]
WeightOf = Callable[[torch.Tensor], torch.Tensor]


def _native() -> Any:
    return importlib.import_module("dynaguide._native")


def _channels_last(x: torch.Tensor) -> bool:
    """Each image of x (N, C, H, W) dense channels-last."""
    _, c, h, w = x.shape
    _, sc, sh, sw = x.stride()
    return (c == 1 or sc == 1) and (w == 1 or sw == c) and (h == 1 or sh == w * c)


def usable(response: torch.Tensor, backend: str | None) -> bool:
    """Whether :func:`objective` applies: the native losses would run, on a float32/float64
    channels-last CPU response that requires grad."""
    from dynaguide import dispatch

    if response.device.type != "cpu" or response.dim() not in (3, 4):
        return False
    if response.dtype not in (torch.float32, torch.float64) or not response.requires_grad:
        return False
    if not torch.is_grad_enabled():
        return False
    if dispatch.resolve("similarity_loss", response.device, backend).backend != "native":
        return False
    if not hasattr(_native(), "ce_pair_forward"):
        return False
    x = response if response.dim() == 4 else response.unsqueeze(0)
    return _channels_last(x)


class _Objective(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        response: torch.Tensor,
        target_of: TargetOf | None,
        weight_of: WeightOf,
        opts: dict[str, Any],
        reduction: str,
    ) -> Any:
        nat = _native()
        batched = response.dim() == 4
        x = (response if batched else response.unsqueeze(0)).detach()
        n, _, h, w = x.shape
        labels = torch.empty((n, h, w), dtype=torch.int64)
        k = torch.empty(n, dtype=torch.int64)
        sim = torch.empty(n, dtype=torch.float64)
        nat.similarity_forward(x, labels, None, sim, k)
        lab_out, k_out = (labels, k) if batched else (labels[0], k[0])
        target = None
        if target_of is not None:
            t = target_of(lab_out)
            if tuple(t.shape) != tuple(lab_out.shape):
                raise ValueError(
                    f"target shape {tuple(t.shape)} does not match labels {tuple(lab_out.shape)}"
                )
            target = t.reshape(n, h, w).to(torch.int64).contiguous()
        w_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        weight = weight_of(k_out, w_dtype).detach().to(torch.float64).reshape(-1).expand(n)
        cont = torch.empty(n, dtype=torch.float64)
        l1, neighbors, delta = opts["penalty"] == "l1", opts["neighbors"], float(opts["delta"])
        nat.continuity_forward(x, l1, neighbors, delta, cont)
        red = 1.0 / n if reduction == "mean" else 1.0
        sim_w, guide_w = float(opts["similarity_weight"]), float(opts["guidance_weight"])
        a = torch.full((n,), sim_w * red / (h * w), dtype=torch.float64)
        b = torch.full((n,), guide_w * red if target is not None else 0.0, dtype=torch.float64)
        grad = torch.empty_like(x)
        guide = torch.zeros(n, dtype=torch.float64)
        nat.ce_pair_forward(x, labels, target, int(opts["ignore_index"]), a, b, grad, guide)
        per_image = sim_w * sim + weight * cont
        if target is not None:
            per_image = per_image + guide_w * guide
        ctx.save_for_backward(x)
        ctx.grad, ctx.batched, ctx.reduction = grad, batched, reduction
        ctx.cont = (l1, neighbors, delta)
        ctx.cont_scale = (weight * red).contiguous()
        ctx.mark_non_differentiable(lab_out, k_out)
        out_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        if reduction == "none":
            total = per_image if batched else per_image[0]
        else:
            total = per_image.mean() if reduction == "mean" else per_image.sum()
        return total.to(out_dtype), lab_out, k_out

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, _labels: Any, _k: Any) -> Any:
        if ctx.grad is None:
            raise RuntimeError(
                "the native objective supports one backward per forward (its gradient buffer "
                "is completed in place); recompute the loss instead of retain_graph=True"
            )
        (x,) = ctx.saved_tensors
        grad, ctx.grad = ctx.grad, None
        n = x.shape[0]
        factor = grad_output.detach().to(torch.float64).reshape(-1).expand(n).contiguous()
        if not bool((factor == 1).all()):
            grad.mul_(factor.to(grad.dtype).reshape(-1, 1, 1, 1))
        scale = (ctx.cont_scale * factor).contiguous()
        _native().continuity_backward(x, *ctx.cont, scale, grad, True)
        return (grad if ctx.batched else grad[0]), None, None, None, None


def objective(
    response: torch.Tensor,
    target_of: TargetOf | None,
    weight_of: WeightOf,
    *,
    similarity_weight: float,
    guidance_weight: float,
    penalty: str,
    neighbors: int,
    delta: float,
    ignore_index: int,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The objective and its labels and K, as (loss, labels, K); see the module docstring.

    Parameters
    ----------
    response : Tensor (C, H, W) or (N, C, H, W)
        Channels-last float32/float64 CPU response (:func:`usable`).
    target_of : callable(labels) -> target, optional
        Guide target (labels' shape, int, ``ignore_index`` where unguided) for the argmax
        labels of this forward pass; None drops the guidance term.
    weight_of : callable(K) -> w
        Continuity weight per image from the label counts (0-dim or (N,)).
    similarity_weight, guidance_weight : float
    penalty, neighbors, delta, ignore_index
        As :func:`dynaguide.losses.continuity_loss` and :func:`dynaguide.losses.guidance_loss`.
    reduction : {"mean", "sum", "none"}
        Over the N images.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    opts = {
        "similarity_weight": similarity_weight,
        "guidance_weight": guidance_weight,
        "penalty": penalty,
        "neighbors": neighbors,
        "delta": delta,
        "ignore_index": ignore_index,
    }
    loss, labels, k = _Objective.apply(response, target_of, weight_of, opts, reduction)
    return loss, labels, k
