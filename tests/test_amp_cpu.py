"""amp on CPU: the hidden 3x3 convolutions in bfloat16, everything else float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynaguide import model as model_mod
from dynaguide.config import get_preset
from dynaguide.model import build_model, mixed_precision
from dynaguide.refine import RefineStep

needs_bf16 = pytest.mark.skipif(
    not model_mod.cpu_has_native_bf16(), reason="this CPU has no native bfloat16"
)


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)


def test_without_amp_nothing_changes():
    m = build_model(get_preset("dynaguide"), seed=0)
    assert mixed_precision(m, torch.device("cpu"), False) is False
    assert m.hidden_dtype is None


def test_cuda_uses_autocast():
    m = build_model(get_preset("dynaguide"), seed=0)
    assert mixed_precision(m, torch.device("cuda"), True) is True
    assert m.hidden_dtype is None


def test_cpu_without_native_bf16_warns_and_keeps_float32(monkeypatch):
    monkeypatch.setattr(model_mod, "cpu_has_native_bf16", lambda: False)
    m = build_model(get_preset("dynaguide"), seed=0)
    with pytest.warns(RuntimeWarning, match="native bfloat16"):
        assert mixed_precision(m, torch.device("cpu"), True) is False
    assert m.hidden_dtype is None


@needs_bf16
def test_hidden_convolution_runs_in_bf16_and_matches_float64():
    cfg = get_preset("dynaguide").replace(n_channels=16)
    m = build_model(cfg, seed=0)
    assert mixed_precision(m, torch.device("cpu"), True) is False
    assert m.hidden_dtype == torch.bfloat16
    conv = m.convs[1]
    h = torch.randn(1, 16, 9, 11, generator=torch.Generator().manual_seed(1))
    got = m._hidden_conv(conv, h)
    assert got.dtype == torch.float32
    b16 = torch.bfloat16
    want = torch.nn.functional.conv2d(
        h.to(b16).double(), conv.weight.to(b16).double(), conv.bias.to(b16).double(), padding=1
    )
    # bf16 inputs, fp32 accumulation, bf16 output rounding: ~2^-8 relative
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)
    exact = conv(h)
    assert not torch.equal(got, exact)  # the bf16 path ran


@needs_bf16
def test_amp_training_tracks_float32_with_float32_gradients():
    cfg = get_preset("dynaguide").replace(n_channels=16, max_iter=4)
    fp32 = RefineStep(_image(), cfg, seed=0)
    bf16 = RefineStep(_image(), cfg, seed=0, amp=True)
    assert bf16.model.hidden_dtype == torch.bfloat16 and not bf16.autocast
    for _ in range(3):
        la, _, _ = fp32.step()
        lb, _, _ = bf16.step()
        assert abs(float(lb) - float(la)) <= 2e-2 * abs(float(la))
    for p in bf16.model.parameters():
        assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all()
    again = RefineStep(_image(), cfg, seed=0, amp=True)
    for _ in range(3):
        again.step()
    for p, q in zip(bf16.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(p, q)  # deterministic for a seed
