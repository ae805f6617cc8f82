"""dynaguide.native_losses (fused C++ losses) vs the float64 references in dynaguide.losses.

float32 results (losses and gradients) must be within 1e-5 of the float64 reference,
relative to the reference's largest magnitude; float64 within 1e-10.
"""

from __future__ import annotations

import pytest
import torch

from dynaguide import backend as _backend
from dynaguide import losses

pytestmark = pytest.mark.skipif(not _backend.available("native"), reason="_native not built")

if _backend.available("native"):
    from dynaguide import native_losses as nl

SHAPES = [
    (7, 1, 1),
    (7, 1, 97),
    (7, 97, 1),
    (7, 2, 3),
    (100, 3, 2),
    (129, 5, 7),
    (1, 6, 5),
    (7, 33, 97),
    (2, 7, 5, 6),
    (3, 100, 2, 3),
]
LAYOUTS = ["contiguous", "channels_last", "strided"]
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def _make(shape, layout, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    r64 = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5
    r = r64.to(dtype)
    if layout == "channels_last":
        r4 = r if r.dim() == 4 else r.unsqueeze(0)
        r4 = r4.to(memory_format=torch.channels_last)
        r = r4 if r.dim() == 4 else r4[0]
    elif layout == "strided":  # neither layout: the wrapper copies
        r = r.transpose(-1, -2).contiguous().transpose(-1, -2)
    return r, r.detach().to(torch.float64)


def _close(got, want, dtype, what):
    got, want = got.detach().to(torch.float64), want.detach().to(torch.float64)
    assert got.shape == want.shape, what
    scale = want.abs().max().clamp_min(1e-30)
    err = float((got - want).abs().max() / scale)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g}"


def _grad_output(loss, seed):
    if loss.dim() == 0:
        return torch.tensor(1.0, dtype=loss.dtype)
    return torch.randn(loss.shape, generator=torch.Generator().manual_seed(seed), dtype=loss.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(
    ("penalty", "neighbors", "delta"),
    [("huber", 8, 1.0), ("huber", 4, 0.3), ("l1", 8, 1.0), ("l1", 4, 1.0)],
)
def test_continuity(shape, layout, dtype, penalty, neighbors, delta):
    r, r64 = _make(shape, layout, dtype, seed=hash((shape, layout)) % 2**31)
    reduction = "none" if len(shape) == 4 else "mean"
    a = r.clone().requires_grad_(True)
    b = r64.clone().requires_grad_(True)
    opts = {"penalty": penalty, "neighbors": neighbors, "delta": delta, "reduction": reduction}
    la = nl.continuity_loss(a, **opts)
    lb = losses.continuity_loss_reference(b, **opts)
    assert la.dtype == dtype
    _close(la, lb, dtype, "loss")
    go = _grad_output(lb, seed=3)
    la.backward(go.to(dtype))
    assert a.grad.dtype == dtype
    if not lb.requires_grad:  # 1x1 images: the reference returns a constant 0
        assert torch.count_nonzero(a.grad) == 0
        return
    lb.backward(go)
    _close(a.grad, b.grad, dtype, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_similarity(shape, layout, dtype):
    r, r64 = _make(shape, layout, dtype, seed=hash((shape, layout, 1)) % 2**31)
    a = r.clone().requires_grad_(True)
    b = r64.clone().requires_grad_(True)
    for reduction in ("mean", "sum", "none"):
        la, laba, ka = nl.similarity_loss(a, reduction=reduction)
        lb, labb, kb = losses.similarity_loss_reference(b, reduction=reduction)
        _close(la, lb, dtype, f"loss {reduction}")
        assert torch.equal(laba, labb) and laba.dtype == torch.int64
        assert torch.equal(ka, kb) and ka.dtype == torch.int64
    a.grad = b.grad = None
    go = _grad_output(lb, seed=5)
    la.backward(go.to(dtype))
    lb.backward(go)
    _close(a.grad, b.grad, dtype, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_guidance(shape, layout, dtype):
    r, r64 = _make(shape, layout, dtype, seed=hash((shape, layout, 2)) % 2**31)
    c = shape[-3]
    tshape = shape[:-3] + shape[-2:]
    gen = torch.Generator().manual_seed(7)
    target = torch.randint(-1, c, tshape, generator=gen)
    target[torch.rand(tshape, generator=gen) < 0.1] = -3  # other negatives count as class 0
    a = r.clone().requires_grad_(True)
    b = r64.clone().requires_grad_(True)
    la = nl.guidance_loss(a, target.to(torch.int32), reduction="sum")
    lb = losses.guidance_loss_reference(b, target, reduction="sum")
    _close(la, lb, dtype, "loss")
    la.backward(torch.tensor(-2.5, dtype=dtype))
    lb.backward(torch.tensor(-2.5, dtype=torch.float64))
    _close(a.grad, b.grad, dtype, "grad")


def test_guidance_all_ignored_and_custom_index():
    r = torch.randn(5, 4, 6, requires_grad=True)
    t = torch.full((4, 6), 255)
    loss = nl.guidance_loss(r, t, ignore_index=255)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.count_nonzero(r.grad) == 0
    # One valid pixel; an ignore_index >= C is fine here (the reference cannot take it).
    t[1, 2] = 3
    want = -torch.log_softmax(r.detach().double()[:, 1, 2], dim=0)[3]
    _close(nl.guidance_loss(r, t, ignore_index=255), want, torch.float32, "loss")
    t = torch.full((4, 6), -5)
    t[0] = torch.tensor([0, 1, 2, 3, 4, -1])  # -1 is not ignored here: class 0
    r64 = r.detach().double()
    _close(
        nl.guidance_loss(r, t, ignore_index=-5),
        losses.guidance_loss_reference(r64, t, ignore_index=-5),
        torch.float32,
        "loss",
    )
    with pytest.raises(ValueError, match="target holds class 7"):
        nl.guidance_loss(r, torch.full((4, 6), 7))


def test_public_api_dispatches_to_native(monkeypatch):
    r = torch.randn(9, 11, 13, requires_grad=True)
    monkeypatch.setenv("DYNAGUIDE_BACKEND", "native")
    got = losses.continuity_loss(r) + losses.similarity_loss(r)[0]
    direct = nl.continuity_loss(r) + nl.similarity_loss(r)[0]
    assert torch.equal(got, direct)
    monkeypatch.setenv("DYNAGUIDE_BACKEND", "torch")
    _close(got, losses.continuity_loss(r) + losses.similarity_loss(r)[0], torch.float32, "loss")


def test_retain_graph_twice_and_no_grad():
    r = torch.randn(6, 7, 8, requires_grad=True)
    r64 = r.detach().double().requires_grad_(True)
    la = (
        nl.similarity_loss(r)[0]
        + nl.continuity_loss(r)
        + nl.guidance_loss(r, torch.zeros(7, 8, dtype=torch.long))
    )
    lb = losses.similarity_loss_reference(r64)[0] + losses.continuity_loss_reference(r64)
    lb = lb + losses.guidance_loss_reference(r64, torch.zeros(7, 8, dtype=torch.long))
    la.backward(retain_graph=True)
    la.backward()  # a second pass must not see a gradient buffer modified by the first
    lb.backward(torch.tensor(2.0, dtype=torch.float64))
    _close(r.grad, r64.grad, torch.float32, "grad")
    with torch.no_grad():
        loss, labels, k = nl.similarity_loss(r)
    assert loss.grad_fn is None and labels.shape == (7, 8) and int(k) >= 1


def test_bfloat16_is_computed_in_float32():
    r = torch.randn(8, 9, 10).to(torch.bfloat16).requires_grad_(True)
    r32 = r.detach().float().double().requires_grad_(True)
    la = nl.continuity_loss(r) + nl.similarity_loss(r)[0]
    lb = losses.continuity_loss_reference(r32) + losses.similarity_loss_reference(r32)[0]
    assert la.dtype == torch.float32
    _close(la, lb, torch.float32, "loss")
    la.backward()
    lb.backward()
    assert r.grad.dtype == torch.bfloat16
    # Each loss's gradient is rounded to bfloat16 before autograd adds them (in bfloat16).
    err = (r.grad.double() - r32.grad).abs().max() / r32.grad.abs().max()
    assert float(err) < 2 * 2**-8


def test_bad_inputs():
    r = torch.randn(3, 4, 5)
    with pytest.raises(TypeError, match=r"response must be a torch\.Tensor"):
        nl.continuity_loss(r.numpy())
    with pytest.raises(TypeError, match="response must be a floating tensor"):
        nl.similarity_loss(torch.zeros(3, 4, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="response must have shape"):
        nl.similarity_loss(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="response is empty"):
        nl.continuity_loss(torch.zeros(3, 0, 5))
    with pytest.raises(ValueError, match="reduction must be"):
        nl.similarity_loss(r, reduction="avg")
    with pytest.raises(ValueError, match="penalty must be"):
        nl.continuity_loss(r, penalty="l2")
    with pytest.raises(ValueError, match="neighbors must be 4 or 8"):
        nl.continuity_loss(r, neighbors=6)
    with pytest.raises(ValueError, match="delta must be > 0"):
        nl.continuity_loss(r, delta=0.0)
    with pytest.raises(ValueError, match="target shape"):
        nl.guidance_loss(r, torch.zeros(5, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="target must be an integer tensor"):
        nl.guidance_loss(r, torch.zeros(4, 5))


@pytest.mark.parametrize("name", ["continuity_loss", "similarity_loss", "guidance_loss"])
def test_signatures_match_public_api(name):
    import inspect

    public = inspect.signature(getattr(losses, name))
    params = [p for p in public.parameters.values() if p.name != "backend"]
    fast = inspect.signature(getattr(nl, name))
    assert list(fast.parameters.values()) == params
