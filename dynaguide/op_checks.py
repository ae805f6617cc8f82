"""Input checks shared by every backend of the loss ops (torch reference, native, Triton).

One set of rules and messages: a bad argument gives the same exception, naming the
argument, whichever backend would have run the op. Messages are built only when a check
fails. Nothing here imports triton or the native extension.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = [
    "REDUCTIONS",
    "TARGET_DTYPES",
    "check_continuity_options",
    "check_int",
    "check_number",
    "check_reduction",
    "check_response",
    "check_target",
    "check_target_values",
    "reduce",
]

#: Integer dtypes a guide target may have.
TARGET_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)
#: Reduction names and the codes the kernels take.
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def check_response(response: Any, name: str = "response") -> torch.Tensor:
    """Validate a response map, shape (C, H, W) or (N, C, H, W) floating, and return it as
    (N, C, H, W) (a view)."""
    if not isinstance(response, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(response).__name__}")
    if response.dim() not in (3, 4):
        raise ValueError(
            f"{name} must have shape (C, H, W) or (N, C, H, W), got {tuple(response.shape)}"
        )
    if not response.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got {response.dtype}")
    if response.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(response.shape)}")
    return response if response.dim() == 4 else response.unsqueeze(0)


def check_target(
    target: Any, response: torch.Tensor, batched: bool, name: str = "target"
) -> torch.Tensor:
    """Validate guide labels against a response ``(N, C, H, W)``; return them as (N, H, W).

    ``batched``: whether the caller passed an (N, C, H, W) response (then the target is
    (N, H, W), else (H, W)).
    """
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype not in TARGET_DTYPES:
        raise TypeError(
            f"{name} must be an integer tensor (int64, int32, int16 or uint8), got {target.dtype}"
        )
    t = target if batched else target.unsqueeze(0)
    n, _, h, w = response.shape
    if tuple(t.shape) != (n, h, w):
        raise ValueError(
            f"{name} shape {tuple(target.shape)} does not match response "
            f"{tuple(response.shape if batched else response.shape[1:])} "
            "(expected the response's (N,) H, W)"
        )
    if t.device != response.device:
        raise ValueError(f"{name} is on {t.device} but response is on {response.device}")
    return t


def check_target_values(
    target: torch.Tensor, n_channels: int, ignore_index: int, name: str = "target"
) -> None:
    """Raise ValueError when a target holds a class ``>= n_channels`` (other than
    ``ignore_index``). Negative values other than ``ignore_index`` count as class 0 in every
    backend and are accepted. Reads the tensor: one host synchronisation on a GPU."""
    bad = torch.where(target == ignore_index, -1, target.to(torch.int64)).max()
    if int(bad) >= n_channels:
        raise ValueError(
            f"{name} holds class {int(bad)} but the response has only {n_channels} channels "
            f"(valid: 0..{n_channels - 1}, or ignore_index={ignore_index})"
        )


def check_reduction(reduction: Any) -> int:
    """The kernels' code of ``reduction`` ("none", "mean", "sum"); ValueError otherwise."""
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return REDUCTIONS[reduction]


def reduce(per_image: torch.Tensor, reduction: str, batched: bool) -> torch.Tensor:
    """Reduce per-image losses (N,) over the images: "mean", "sum" or "none" (then (N,),
    or a 0-dim tensor for an unbatched call)."""
    check_reduction(reduction)
    if reduction == "none":
        return per_image if batched else per_image.squeeze(0)  # a view (no select copy)
    return per_image.mean() if reduction == "mean" else per_image.sum()


def check_continuity_options(penalty: Any, neighbors: Any, delta: Any) -> None:
    """Validate the continuity options with messages naming the argument."""
    if penalty not in ("l1", "huber"):
        raise ValueError(f"penalty must be 'l1' or 'huber', got {penalty!r}")
    if isinstance(neighbors, bool) or neighbors not in (4, 8):
        raise ValueError(f"neighbors must be 4 or 8, got {neighbors!r}")
    if (
        isinstance(delta, bool)
        or not isinstance(delta, (int, float, np.floating, np.integer))
        or not (0 < float(delta) < math.inf)
    ):
        raise ValueError(f"delta must be > 0 and finite, got {delta!r}")


def check_int(name: str, value: Any) -> int:
    """An int argument (not a bool), e.g. ``ignore_index``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def check_number(name: str, value: Any, *, positive: bool) -> float:
    """A finite real argument, ``> 0`` when ``positive`` else ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if not (v > 0 if positive else v >= 0) or v == math.inf:
        raise ValueError(
            f"{name} must be a finite number {'> 0' if positive else '>= 0'}, got {value!r}"
        )
    return v
