"""SmooSeg smoothness loss: the reference against a brute-force float64 loop."""

from __future__ import annotations

import math

import pytest
import torch
from smoothness_helpers import max_rel, random_maps

from dynaguide.smooseg import (
    derangement,
    feature_similarity,
    smoothness_loss,
    smoothness_loss_factorised,
    smoothness_loss_reference,
)


def _brute(fa, fb, ca, cb, shift, pointwise):
    B = fa.shape[0]
    total, count = 0.0, 0
    sims = []
    for n in range(B):
        xa = fa[n].flatten(1).T
        xb = fb[n].flatten(1).T
        rows = []
        for i in range(xa.shape[0]):
            rows.append(
                [float(xa[i] @ xb[j] / (xa[i].norm() * xb[j].norm())) for j in range(xb.shape[0])]
            )
        sims.append(rows)
    flat = [v for img in sims for row in img for v in row]
    gmean = sum(flat) / len(flat)
    for n in range(B):
        pa = ca[n].flatten(1).T
        pb = cb[n].flatten(1).T
        for i, row in enumerate(sims[n]):
            rmean = sum(row) / len(row)
            for j, f in enumerate(row):
                if pointwise:
                    f = f - rmean + gmean
                s = float(pa[i] @ pb[j] / (pa[i].norm() * pb[j].norm()))
                total += (f - shift) * (1 - s)
                count += 1
    return total / count


@pytest.mark.parametrize("pointwise", [True, False])
def test_reference_matches_brute_force(pointwise):
    g = torch.Generator().manual_seed(3)
    fa = torch.randn(2, 5, 3, 2, generator=g, dtype=torch.float64)
    fb = torch.randn(2, 5, 2, 3, generator=g, dtype=torch.float64)
    ca = torch.rand(2, 4, 3, 2, generator=g, dtype=torch.float64)
    cb = torch.rand(2, 4, 2, 3, generator=g, dtype=torch.float64)
    got = smoothness_loss(fa, fb, ca, cb, shift=0.3, pointwise=pointwise)
    assert math.isclose(float(got), _brute(fa, fb, ca, cb, 0.3, pointwise), rel_tol=1e-12)


def test_no_gradient_into_features_and_pointwise_rows_centred():
    g = torch.Generator().manual_seed(0)
    fa = torch.randn(2, 6, 4, 4, generator=g, requires_grad=True)
    ca = torch.rand(2, 3, 4, 4, generator=g, requires_grad=True)
    loss = smoothness_loss(fa, fa, ca, ca, shift=0.1)
    loss.backward()
    assert fa.grad is None and ca.grad is not None and torch.isfinite(ca.grad).all()
    sim = feature_similarity(fa, fa)
    row_means = sim.mean(dim=2)
    torch.testing.assert_close(row_means, torch.full_like(row_means, float(row_means.mean())))


def test_bad_shapes_are_named():
    f = torch.randn(2, 6, 4, 4)
    c = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="feats_a"):
        smoothness_loss(f[0], f, c, c, shift=0.0)
    with pytest.raises(ValueError, match="codes_b"):
        smoothness_loss(f, f, c, c[:, :, :2], shift=0.0)
    with pytest.raises(TypeError, match="codes_a"):
        smoothness_loss(f, f, c.numpy(), c, shift=0.0)


def test_derangement_has_no_fixed_point():
    g = torch.Generator().manual_seed(1)
    for n in (2, 3, 7):
        for _ in range(20):
            p = derangement(n, generator=g)
            assert sorted(p.tolist()) == list(range(n))
            assert not (p == torch.arange(n)).any()
    with pytest.raises(ValueError, match="n >= 2"):
        derangement(1)


# ------------------------------------------------------------------ factorised form
def _inputs(seed, dtype, shape_a=(3, 24, 5, 7), shape_b=(3, 24, 6, 4), k=5):
    return random_maps(seed, shape_a, shape_b, k, dtype)


def _loss_and_grads(fn, fa, fb, ca, cb, **kw):
    ca, cb = ca.detach().requires_grad_(), cb.detach().requires_grad_()
    loss = fn(fa, fb, ca, cb, **kw)
    return (loss, *torch.autograd.grad(loss, (ca, cb)))


_max_rel = max_rel


@pytest.mark.parametrize("pointwise", [True, False])
@pytest.mark.parametrize("seed", [0, 1])
def test_factorised_equals_reference_float64(pointwise, seed):
    x = _inputs(seed, torch.float64)
    want = _loss_and_grads(smoothness_loss_reference, *x, shift=0.25, pointwise=pointwise)
    got = _loss_and_grads(smoothness_loss_factorised, *x, shift=0.25, pointwise=pointwise)
    for g, w, what in zip(got, want, ("loss", "grad codes_a", "grad codes_b"), strict=True):
        assert _max_rel(g, w) <= 1e-12, what


@pytest.mark.parametrize("pointwise", [True, False])
def test_factorised_float32_within_1e5_of_float64(pointwise):
    x = _inputs(7, torch.float64, shape_a=(4, 64, 8, 8), shape_b=(4, 64, 8, 8), k=9)
    want = _loss_and_grads(smoothness_loss_reference, *x, shift=0.1, pointwise=pointwise)
    got = _loss_and_grads(smoothness_loss, *[t.float() for t in x], shift=0.1, pointwise=pointwise)
    assert got[0].dtype == torch.float32
    for g, w, what in zip(got, want, ("loss", "grad codes_a", "grad codes_b"), strict=True):
        assert _max_rel(g, w) <= 1e-5, what


def test_default_method_on_cpu_is_factorised_and_never_imports_triton():
    code = (
        "import sys, torch\n"
        "from dynaguide.smooseg import smoothness_loss\n"
        "f = torch.randn(2, 8, 3, 3); c = torch.rand(2, 4, 3, 3)\n"
        "smoothness_loss(f, f, c, c, shift=0.0)\n"
        "assert 'triton' not in sys.modules, 'triton was imported'\n"
    )
    import subprocess
    import sys

    subprocess.run([sys.executable, "-P", "-c", code], check=True)


def test_methods_agree_and_bad_method_is_named():
    x = _inputs(3, torch.float64)
    ref = smoothness_loss(*x, shift=0.2, method="reference")
    fac = smoothness_loss(*x, shift=0.2, method="factorised")
    assert math.isclose(float(ref), float(fac), rel_tol=1e-12)
    with pytest.raises(ValueError, match="method"):
        smoothness_loss(*x, shift=0.2, method="direct")
    with pytest.raises(ValueError, match="feats_a"):
        smoothness_loss_factorised(x[0][0], *x[1:], shift=0.0)
