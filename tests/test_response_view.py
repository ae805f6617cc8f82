"""The response fed to the losses is a view whose backward is a view (no full-size copy).

``model(x)[0]`` selects image 0 of an (1, C, H, W) output: autograd's backward of that
select allocates a zero (1, C, H, W) tensor in NCHW and copies the gradient into it, two
extra full-response passes per iteration (and an NCHW gradient entering a channels-last
convolution backward). ``model(x).squeeze(0)`` has a view as backward. These tests profile
one training iteration and look for the select backward and full-size zero fills.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from dynaguide import refine as refine_mod
from dynaguide.batched_refine import BatchedRefiner
from dynaguide.config import get_preset


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _profiled_ops(fn) -> list[tuple[str, list, str]]:
    """(op name, input shapes, parent op name) of every aten op that ``fn()`` runs."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return [
        (e.name, e.input_shapes, e.cpu_parent.name if e.cpu_parent is not None else "")
        for e in prof.events()
    ]


def _select_copies(ops: list[tuple[str, list, str]]) -> list[str]:
    """The select backward and the full-size zero fill and copy it runs."""
    return [
        f"{name} {shapes}"
        for name, shapes, parent in ops
        if name == "aten::select_backward" or parent == "aten::select_backward"
    ]


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("channels_last", [True, False])
def test_refine_step_backward_has_no_select_copy(backend, channels_last):
    from dynaguide import backend as be

    if not be.available(backend):
        pytest.skip(f"backend {backend} not available")
    cfg = get_preset("dynaguide").replace(max_iter=3, silhouette="off")
    img = _image(12, 14, 0)
    step = refine_mod.RefineStep(img, cfg, seed=1, backend=backend, channels_last=channels_last)
    step.step()  # warm-up (first iteration may allocate differently)
    ops = _profiled_ops(step.step)
    names = {n for n, *_ in ops}
    assert "aten::squeeze" in names or "aten::squeeze_" in names, sorted(names)[:40]
    assert _select_copies(ops) == []


def test_squeeze_view_gives_the_same_losses_labels_and_gradients():
    """``squeeze(0)`` and ``[0]`` are the same values; only the backward's memory differs."""
    cfg = get_preset("dynaguide")
    img = _image(10, 13, 2)
    guide = torch.from_numpy(np.random.default_rng(3).integers(-1, 4, size=(10, 13)))
    results = []
    for take in (lambda out: out[0], lambda out: out.squeeze(0)):
        step = refine_mod.RefineStep(img, cfg.replace(silhouette="off"), seed=4, backend="torch")
        step.opt.zero_grad(set_to_none=True)
        response = take(step.model(step.x))
        loss, labels, k = refine_mod.objective(
            response, cfg, step.k_floor, lambda lab: guide, backend="torch"
        )
        loss.backward()
        grads = [p.grad.clone() for p in step.model.parameters()]
        results.append((loss.detach(), labels, k, grads))
    (l0, lab0, k0, g0), (l1, lab1, k1, g1) = results
    assert torch.equal(lab0, lab1) and torch.equal(k0, k1)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=0)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_squeeze_backward_is_a_view():
    """The autograd node of the response: SqueezeBackward (a view), not SelectBackward."""
    out = torch.randn(1, 5, 4, 3, requires_grad=True).contiguous(memory_format=torch.channels_last)
    assert "Squeeze" in type(out.squeeze(0).grad_fn).__name__
    assert "Select" in type(out[0].grad_fn).__name__
    g = torch.randn(5, 4, 3).permute(0, 1, 2)
    (grad,) = torch.autograd.grad(out.squeeze(0), out, g)
    assert grad.data_ptr() == g.data_ptr()  # no copy: the same storage flows back


def test_batched_step_backward_has_no_select_copy():
    cfg = get_preset("dynaguide").replace(max_iter=3, silhouette="off")
    eng = BatchedRefiner(cfg, torch.device("cpu"), (12, 14), backend="torch")
    slots = [eng.new_slot(i, _image(12, 14, i), None, seed=i) for i in range(2)]
    eng.rebuild([], slots)
    eng.step([True, True])
    ops = _profiled_ops(lambda: eng.step([True, True]))
    assert _select_copies(ops) == []
