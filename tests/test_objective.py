"""The one objective (dynaguide.objective): a batch of N images gives every image exactly
the loss and gradient it has alone, with its own w(K_n), reduced by "mean" or "sum"."""

from __future__ import annotations

import pytest
import torch

from dynaguide import backend as _backend
from dynaguide.config import get_preset
from dynaguide.objective import continuity_weight, dynamic_weight, objective

CL = torch.channels_last


def _batch(seed):
    """Three images whose argmax label counts differ (so w(K_n) differs per image)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 6, 5, 7, generator=g, dtype=torch.float64)
    x[0, 0] += 10.0  # one label
    x[1, :3] += torch.randn(3, 5, 7, generator=g, dtype=torch.float64) * 5  # a few labels
    return x.contiguous(memory_format=CL)


def _target(seed):
    g = torch.Generator().manual_seed(seed + 7)
    t = torch.randint(-1, 6, (3, 5, 7), generator=g)
    return t


def _loss_and_grad(x, cfg, k_floor, target, reduction, backend):
    r = x.detach().clone().requires_grad_()
    target_of = None if target is None else (lambda lab: target)
    loss, _, k = objective(r, cfg, k_floor, target_of, backend=backend, reduction=reduction)
    loss.sum().backward()
    return loss.detach(), k, r.grad


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("preset", ["dynaguide", "dynaseg-scf"])
@pytest.mark.parametrize("guided", [False, True])
def test_batch_equals_each_image_alone(backend, preset, guided):
    if not _backend.available(backend):
        pytest.skip(f"backend {backend} not available")
    cfg = get_preset(preset)
    x, t = _batch(1), _target(1)
    floor = torch.tensor([0, 4, 0])
    alone = [
        _loss_and_grad(x[i], cfg, floor[i], t[i] if guided else None, "mean", backend)
        for i in range(3)
    ]
    ks = [int(a[1]) for a in alone]
    assert len(set(ks)) == 3, ks  # the per-image weights really differ
    want = torch.stack([a[0] for a in alone])
    for reduction, scale in (("none", 1.0), ("sum", 1.0), ("mean", 1 / 3)):
        loss, k, grad = _loss_and_grad(x, cfg, floor, t if guided else None, reduction, backend)
        assert k.tolist() == ks
        expect = {"none": want, "sum": want.sum(), "mean": want.mean()}[reduction]
        assert loss.shape == expect.shape
        torch.testing.assert_close(loss, expect, rtol=1e-12, atol=1e-12)
        for i in range(3):
            torch.testing.assert_close(grad[i], alone[i][2] * scale, rtol=1e-10, atol=1e-14)


def test_weight_formula_is_the_configs():
    k = torch.tensor([1, 5, 30])
    torch.testing.assert_close(
        continuity_weight("fsf", k, beta=10.0), torch.tensor([0.1, 0.5, 3.0])
    )
    torch.testing.assert_close(
        continuity_weight("scf", k, scf_mu=30.0), torch.tensor([30.0, 6.0, 1.0])
    )
    torch.testing.assert_close(continuity_weight("constant", k, mu=2.0), torch.full((3,), 2.0))
    assert continuity_weight("fsf", k, dtype=torch.float64).dtype == torch.float64
    cfg = get_preset("dynaguide")
    torch.testing.assert_close(dynamic_weight(cfg, k), k.float() / cfg.beta)
    with pytest.raises(ValueError, match="weight must be one of"):
        continuity_weight("linear", k)
