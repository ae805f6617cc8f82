"""The one dispatch registry (dynaguide.dispatch) and the one input-check module
(dynaguide.op_checks): every backend raises the same error for the same bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dynaguide import backend as _backend
from dynaguide import dispatch, losses
from dynaguide.backend import BackendUnavailableError

CPU = torch.device("cpu")


def _runnable(name):
    return _backend.available(name) and _backend._runs_on(name, CPU)


def _backends():
    """Backends that run CPU tensors here (Triton under TRITON_INTERPRET=1, set by conftest)."""
    return [b for b in ("torch", "native", "triton") if _runnable(b)]


def _guidance_calls(name):
    """(label, call(response, target)) of every entry point that computes a guidance loss
    on backend ``name``."""
    calls = [("losses.guidance_loss", lambda r, t: losses.guidance_loss(r, t, backend=name))]
    if name == "torch":
        calls.append(("reference", losses.guidance_loss_reference))
        from dynaguide.objective import objective_reference

        calls.append(("objective_reference", lambda r, t: objective_reference(r, t)))
    if name == "native":
        from dynaguide import native_losses

        calls.append(("native_losses", native_losses.guidance_loss))
    if name == "triton":
        from dynaguide import kernels

        calls.append(("kernels.guidance_loss", kernels.guidance_loss))
        calls.append(("kernels.dynaguide_loss", lambda r, t: kernels.dynaguide_loss(r, t)))
    return calls


@pytest.mark.parametrize("name", ["torch", "native", "triton"])
def test_same_errors_on_every_backend(name):
    if not _runnable(name):
        pytest.skip(f"backend {name} cannot run CPU tensors here")
    g = torch.Generator().manual_seed(0)
    r = torch.randn(4, 3, 5, generator=g)  # C = 4
    for label, call in _guidance_calls(name):
        with pytest.raises(ValueError, match="target holds class 7 but the response has only 4"):
            call(r, torch.full((3, 5), 7))
        with pytest.raises(ValueError, match="target shape"):
            call(r, torch.zeros(3, 4, dtype=torch.long))
        with pytest.raises(TypeError, match="target must be an integer tensor"):
            call(r, torch.zeros(3, 5))
        # ignore_index and other negative values are fine; class 3 is the last valid one
        t = torch.full((3, 5), -1)
        t[0, :3] = torch.tensor([3, -4, 0])
        out = call(r, t)
        assert torch.isfinite(out[0] if isinstance(out, tuple) else out), label


def test_parity_of_values_across_backends():
    g = torch.Generator().manual_seed(3)
    r64 = torch.randn(2, 5, 6, 7, generator=g, dtype=torch.float64)
    t = torch.randint(-1, 5, (2, 6, 7), generator=g)
    want = losses.guidance_loss_reference(r64, t, reduction="none")
    for name in _backends():
        got = losses.guidance_loss(r64.float(), t, reduction="none", backend=name)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_resolution_rules(monkeypatch):
    monkeypatch.delenv("DYNAGUIDE_BACKEND", raising=False)
    assert dispatch.resolve("similarity_loss", CPU, "torch").backend == "torch"
    assert set(dispatch.implementations("continuity_loss")) == {"torch", "native", "triton"}
    with pytest.raises(BackendUnavailableError, match="not one of"):
        dispatch.resolve("similarity_loss", CPU, "cudnn")
    with pytest.raises(TypeError, match="backend"):
        dispatch.resolve("similarity_loss", CPU, 3)
    with pytest.raises(BackendUnavailableError, match="no Triton implementation"):
        dispatch.resolve("relabel_compact", CPU, "triton")
    monkeypatch.setenv("DYNAGUIDE_BACKEND", "triton")  # no Triton label ops: ignored there
    assert dispatch.resolve("relabel_compact", CPU).backend in ("native", "torch")
    monkeypatch.setattr(_backend, "available", lambda name: name == "torch")
    monkeypatch.setenv("DYNAGUIDE_BACKEND", "native")
    with pytest.raises(BackendUnavailableError, match="forced by DYNAGUIDE_BACKEND"):
        dispatch.resolve("continuity_loss", CPU)
    monkeypatch.delenv("DYNAGUIDE_BACKEND")
    assert dispatch.resolve("continuity_loss", CPU).backend == "torch"  # silent fallback
    with pytest.raises(ValueError, match="backend must be one of"):
        dispatch.register("continuity_loss", "cuda", lambda r: r)


def test_cpu_loss_call_does_not_import_triton():
    """A CPU-only loss call (every loss and the objective, with backward) imports neither
    triton nor the Triton kernels; a short refinement does not import the kernels (torch's
    own optimisers import triton through torch._dynamo, which is not ours to avoid)."""
    code = (
        "import sys, torch, numpy as np\n"
        "import dynaguide\n"
        "from dynaguide import losses\n"
        "from dynaguide.config import get_preset\n"
        "from dynaguide.objective import objective\n"
        "r = torch.randn(4, 6, 7, requires_grad=True)\n"
        "losses.similarity_loss(r); losses.continuity_loss(r)\n"
        "losses.guidance_loss(r, torch.zeros(6, 7, dtype=torch.long))\n"
        "loss, _, _ = objective(r, get_preset('dynaguide'), torch.tensor(0)); loss.backward()\n"
        "bad = [m for m in sys.modules if m == 'triton' or m.startswith(('triton.', 'dynaguide.kernels'))]\n"
        "assert not bad, bad\n"
        "img = (np.random.default_rng(0).random((12, 14, 3)) * 255).astype(np.uint8)\n"
        "dynaguide.segment(img, max_iter=2, guidance=None)\n"
        "assert not [m for m in sys.modules if m.startswith('dynaguide.kernels')]\n"
        "print('ok')\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("DYNAGUIDE_BACKEND", "TRITON_INTERPRET")
    }
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
