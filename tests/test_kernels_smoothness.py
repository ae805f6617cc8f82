"""SmooSeg smoothness-loss Triton kernel against the float64 PyTorch reference.

Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` is set
before ``dynaguide.kernels`` is imported, here or in conftest.py). Fixed seeds; errors are
relative in the max norm, ``max|got - want| <= rtol * max|want|``.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from dynaguide.kernels import smoothness as ks
from smoothness_helpers import max_rel, random_maps

from dynaguide.smooseg import smoothness_loss, smoothness_loss_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and type(ks._gram_kernel).__name__ != "InterpretedFunction":
    pytest.skip(
        "no CUDA, and dynaguide.kernels was imported before TRITON_INTERPRET=1 was set",
        allow_module_level=True,
    )

RTOL32 = 1e-5


_inputs = random_maps


def _run(fn, fa, fb, ca, cb, scale=1.0, **kw):
    ca, cb = ca.detach().requires_grad_(), cb.detach().requires_grad_()
    loss = fn(fa, fb, ca, cb, **kw)
    ga, gb = torch.autograd.grad(loss * scale, (ca, cb))
    return loss, ga, gb


_max_rel = max_rel


def _check(x, rtol, *, pointwise=True, shift=0.2, scale=1.0, dev=DEVICE, grad_rtol=None):
    want = _run(
        smoothness_loss_reference, *[t.double() for t in x], scale=scale, shift=shift,
        pointwise=pointwise,
    )  # fmt: skip
    got = _run(
        smoothness_loss, *[t.to(dev) for t in x], scale=scale, shift=shift,
        pointwise=pointwise, method="triton",
    )  # fmt: skip
    errs = {
        w: _max_rel(g, r) for w, g, r in zip(("loss", "grad_a", "grad_b"), got, want, strict=True)
    }
    tols = {"loss": rtol, "grad_a": grad_rtol or rtol, "grad_b": grad_rtol or rtol}
    assert all(errs[w] <= tols[w] for w in errs), errs
    return got, errs


@pytest.mark.parametrize("pointwise", [True, False])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, RTOL32), (torch.float64, 1e-12)])
def test_kernel_matches_float64_reference(pointwise, dtype, rtol):
    x = _inputs(11, (3, 40, 7, 5), (3, 40, 4, 6), 6, dtype)
    got, _ = _check(x, rtol, pointwise=pointwise)
    assert got[0].dtype == dtype and got[1].dtype == dtype


def test_several_blocks_chunks_and_grad_output(monkeypatch):
    """Many pixel blocks, pixel chunks and feature blocks (forced small) and a loss scaled
    before backward: the partial sums and the grad_output folding."""
    monkeypatch.setattr(ks, "_blocks", lambda d, k, n: (16, 16, 16, 32, 4))
    x = _inputs(5, (2, 50, 9, 8), (2, 50, 7, 9), 11, torch.float32)
    _check(x, RTOL32, scale=-3.5, shift=-0.1)


def test_strided_and_channels_last_views():
    g = torch.Generator().manual_seed(2)
    fa = torch.randn(2, 32, 8, 9, generator=g, dtype=torch.float64)[:, :, 1:7, 2:8]
    fb = torch.randn(2, 32, 5, 6, generator=g, dtype=torch.float64)
    fb = fb.contiguous(memory_format=torch.channels_last)
    ca = torch.rand(2, 7, 6, 6, generator=g, dtype=torch.float64)
    ca = ca.contiguous(memory_format=torch.channels_last)
    cb = torch.rand(2, 7, 6, 5, generator=g, dtype=torch.float64).transpose(2, 3)
    _check([t.float() for t in (fa, fb, ca, cb)], RTOL32)


def test_bfloat16_codes_and_features():
    x = _inputs(9, (2, 48, 6, 6), (2, 48, 6, 6), 5, torch.bfloat16)
    # the same bf16 values, float32 accumulation; the gradients are rounded to bfloat16
    # (within one bf16 ulp, 2**-7 relative: the interpreter's cast truncates)
    got, _ = _check(x, RTOL32, grad_rtol=2.0**-7)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16


def test_one_side_without_gradient_and_no_feature_gradient():
    x = _inputs(4, (2, 16, 4, 4), (2, 16, 4, 4), 3, torch.float32)
    fa = x[0].to(DEVICE).requires_grad_()
    ca = x[2].to(DEVICE).requires_grad_()
    loss = smoothness_loss(fa, x[1].to(DEVICE), ca, x[3].to(DEVICE), shift=0.0, method="triton")
    loss.backward()
    assert fa.grad is None and ca.grad is not None and torch.isfinite(ca.grad).all()


def test_zero_code_vector_takes_the_eps_branch():
    x = _inputs(6, (2, 16, 4, 4), (2, 16, 4, 4), 3, torch.float64)
    x[2][0, :, 1, 2] = 0.0
    _check(x, 1e-12)


def test_bad_inputs_are_named():
    x = _inputs(1, (2, 16, 4, 4), (2, 16, 4, 4), 3, torch.float32)
    fa, fb, ca, cb = (t.to(DEVICE) for t in x)
    with pytest.raises(TypeError, match="codes_b"):
        ks.smoothness_loss_triton(fa, fb, ca, (cb > 0.5).to(torch.int32), shift=0.0)
    with pytest.raises(ValueError, match="codes_a"):
        big = torch.rand(2, 300, 4, 4, device=DEVICE)
        ks.smoothness_loss_triton(fa, fb, big, big, shift=0.0)


_COMPILE = """
import json, torch
from dynaguide.kernels import compile_only
from dynaguide.kernels.smoothness import smoothness_loss_triton
names = set()
for dt in (torch.float32, torch.bfloat16, torch.float64):
    f = torch.randn(2, 384, 28, 28).to(dt)
    c = torch.rand(2, 27, 28, 28).to(dt).requires_grad_()
    with compile_only(90) as compiled:
        smoothness_loss_triton(f, f, c, c, shift=0.3).backward()
    names |= {name for name, _ in compiled}
print(json.dumps(sorted(names)))
"""


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the other tests compile the kernels")
def test_kernels_compile_for_sm90():
    """Triton's real code generation (the interpreter never lowers to PTX), float32,
    bfloat16 and float64, forward and backward, in a process without TRITON_INTERPRET."""
    import json
    import subprocess
    import sys
    import tempfile

    from triton.backends import backends

    if "nvidia" not in backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-P", "-c", _COMPILE],
        capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = json.loads(proc.stdout.strip().splitlines()[-1])
    assert names == ["_code_grad_kernel", "_gram_kernel", "_inv_norm_kernel"]
