"""Random inputs and error measure shared by the smoothness-loss tests."""

from __future__ import annotations

import torch


def random_maps(seed, shape_a, shape_b, k, dtype=torch.float64):
    """Features of ``shape_a`` / ``shape_b`` (B, D, h, w) and non-negative codes with ``k``
    channels on the same grids, drawn in float64 from ``seed`` then cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    fa = torch.randn(shape_a, generator=g, dtype=torch.float64)
    fb = torch.randn(shape_b, generator=g, dtype=torch.float64)
    ca = torch.rand((shape_a[0], k, *shape_a[2:]), generator=g, dtype=torch.float64)
    cb = torch.rand((shape_b[0], k, *shape_b[2:]), generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (fa, fb, ca, cb)]


def max_rel(got, want) -> float:
    """``max|got - want| / max|want|`` in float64 on the CPU."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))
