"""The CPU objective with one gradient buffer (dynaguide.native_objective) against the
plain PyTorch composite of the three losses (dynaguide.refine.objective, backend torch)."""

from __future__ import annotations

import pytest
import torch

from dynaguide import native_objective
from dynaguide.config import get_preset
from dynaguide.guidance.align import IGNORE_INDEX
from dynaguide.label_ops import native_module
from dynaguide.refine import objective

pytestmark = pytest.mark.skipif(
    native_module() is None or not hasattr(native_module(), "ce_pair_forward"),
    reason="native extension not built",
)
CL = torch.channels_last


def _response(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    if x.dim() == 3:
        return x.unsqueeze(0).contiguous(memory_format=CL)[0]
    return x.contiguous(memory_format=CL)


def _target_of(shape, c, seed):
    g = torch.Generator().manual_seed(seed + 1)
    t = torch.randint(-3, c, shape, generator=g)
    t[t == -2] = IGNORE_INDEX  # unguided pixels; -3 counts as class 0, as in the reference
    return lambda labels: t


def _run(x, cfg, k_floor, target_of, reduction, backend, scale):
    r = x.detach().clone().requires_grad_()
    # "mean" is the batch mean of the per-image objectives on every path
    loss, labels, k = objective(r, cfg, k_floor, target_of, backend=backend, reduction=reduction)
    (loss * scale).sum().backward()
    return loss.detach(), labels, k, r.grad


@pytest.mark.parametrize("preset", ["dynaguide", "dfc", "dynaseg-scf"])
@pytest.mark.parametrize(
    "shape,reduction", [((7, 9, 11), "mean"), ((3, 5, 6, 8), "none"), ((2, 4, 5, 3), "mean")]
)
@pytest.mark.parametrize("guided", [True, False])
def test_matches_the_three_loss_reference(preset, shape, reduction, guided):
    cfg = get_preset(preset)
    c, hw = shape[-3], shape[-2:]
    n = shape[0] if len(shape) == 4 else None
    target_of = _target_of((n, *hw) if n else hw, c, sum(shape)) if guided else None
    k_floor = torch.tensor(4) if n is None else torch.tensor([0, 4, 2][:n] + [0] * max(0, n - 3))
    scale = 1.0 if n is None else torch.linspace(0.5, 2.0, n)  # grad_output other than 1
    x64 = _response(shape, torch.float64, sum(shape) + len(preset))
    assert native_objective.usable(x64.requires_grad_(), None)
    want = _run(x64, cfg, k_floor, target_of, reduction, "torch", scale)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        got = _run(x64.detach().to(dtype), cfg, k_floor, target_of, reduction, None, scale)
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
        torch.testing.assert_close(got[0].double(), want[0], rtol=tol, atol=tol)
        err = (got[3].double() - want[3]).abs().max() / want[3].abs().max()
        assert err.item() <= tol, (dtype, err.item())
        assert got[3].is_contiguous(memory_format=CL) or got[3].dim() == 3


def test_refine_step_uses_it_and_reference_layouts_do_not():
    import numpy as np
    from torch.profiler import ProfilerActivity, profile

    from dynaguide.refine import RefineStep

    img = np.random.default_rng(0).integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    guide = np.random.default_rng(1).integers(0, 3, size=(10, 12))
    cfg = get_preset("dynaguide")
    for channels_last, expect in ((True, True), (False, False)):
        st = RefineStep(img, cfg, guide_labels=guide, seed=0, channels_last=channels_last)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            st.step()
        names = {e.name for e in prof.events()}
        assert ("_Objective" in names) == expect, sorted(n for n in names if n.startswith("_"))


def test_usable_only_where_it_applies():
    x = _response((4, 5, 6), torch.float32, 0).requires_grad_()
    assert native_objective.usable(x, None)
    assert not native_objective.usable(x, "torch")
    assert not native_objective.usable(x.detach(), None)  # no gradient wanted
    assert not native_objective.usable(torch.randn(4, 5, 6, requires_grad=True), None)  # NCHW
    assert not native_objective.usable(x.detach().bfloat16().requires_grad_(), None)
    with torch.no_grad():
        assert not native_objective.usable(x, None)


def test_one_backward_and_bad_targets():
    cfg = get_preset("dynaguide")
    x = _response((4, 5, 6), torch.float32, 1).requires_grad_()
    loss, _, _ = objective(x, cfg, torch.tensor(0), None)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward per forward"):
        loss.backward()
    with pytest.raises(ValueError, match="target holds class 9"):
        objective(x, cfg, torch.tensor(0), lambda lab: torch.full_like(lab, 9))
    with pytest.raises(ValueError, match="does not match labels"):
        objective(x, cfg, torch.tensor(0), lambda lab: torch.zeros(2, 2, dtype=torch.long))


_ISA_SCRIPT = """
import sys, torch
from dynaguide.config import get_preset
from dynaguide.refine import objective
from dynaguide.norm import relu_batch_norm
g = torch.Generator().manual_seed(3)
x = (torch.randn(1, 20, 33, 41, generator=g) * 2).contiguous(memory_format=torch.channels_last)
t = torch.randint(-1, 20, (33, 41), generator=g)
r = x[0].clone().requires_grad_()
loss, labels, k = objective(r, get_preset("dynaguide"), torch.tensor(0), lambda lab: t)
loss.backward()
z = x.clone().requires_grad_()
bn = torch.nn.BatchNorm2d(20)
y = relu_batch_norm(z, bn)
y.backward(x)
torch.save({"loss": loss.detach(), "labels": labels, "grad": r.grad, "y": y.detach(),
            "dz": z.grad, "dgamma": bn.weight.grad}, sys.argv[1])
"""


def test_instruction_set_variants_agree(tmp_path):
    """The AVX2 + FMA kernels and the baseline ones (DYNAGUIDE_CPU_ISA=base) compute the
    same values within float32 round-off (FMA changes the rounding, not the result)."""
    import os
    import subprocess
    import sys

    out = {}
    for isa in ("default", "base"):
        env = {**os.environ, "DYNAGUIDE_CPU_ISA": isa, "OMP_NUM_THREADS": "1"}
        path = tmp_path / f"{isa}.pt"
        subprocess.run(
            [sys.executable, "-c", _ISA_SCRIPT, str(path)], env=env, cwd=tmp_path,
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
        out[isa] = torch.load(path)
    a, b = out["default"], out["base"]
    assert torch.equal(a["labels"], b["labels"])
    for key in ("loss", "grad", "y", "dz", "dgamma"):
        scale = b[key].abs().max().item()
        assert (a[key] - b[key]).abs().max().item() <= 1e-5 * scale, key
