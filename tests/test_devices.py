"""device="auto", MPS requests, threads applied for a call and restored, env providers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynaguide
from dynaguide import cli
from dynaguide.devices import onnx_providers, resolve_device, torch_threads


def test_auto_picks_cuda_when_present_else_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected == resolve_device(None).type
    assert resolve_device(" AUTO ").type == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_unusable_devices_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no usable MPS backend"):
        resolve_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps").type == "mps"
    with pytest.raises(ValueError, match="invalid device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="not supported"):
        resolve_device("meta")


def test_segment_defaults_to_auto() -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    seg = dynaguide.segment(img, preset="dfc", max_iter=1)
    assert seg.device == str(resolve_device("auto"))


def test_threads_apply_for_the_call_and_are_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    real = dynaguide.api.refine

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(dynaguide.api, "refine", spy)
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    img = np.random.default_rng(0).integers(0, 256, (10, 12, 3), np.uint8)
    dynaguide.segment(img, preset="dfc", max_iter=1, device="cpu", num_threads=want)
    assert seen == [want] and torch.get_num_threads() == before
    dynaguide.segment_batch([img, img], preset="dfc", max_iter=1, device="cpu", num_threads=want)
    assert seen[1:] == [want, want] and torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(want):  # restored on errors too
        raise RuntimeError
    assert torch.get_num_threads() == before
    for bad, kind in ((0, ValueError), (1.5, TypeError), (True, TypeError)):
        with pytest.raises(kind, match="num_threads"):
            dynaguide.segment(img, preset="dfc", max_iter=1, device="cpu", num_threads=bad)
    assert torch.get_num_threads() == before


def test_env_lists_onnxruntime_providers(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    providers = onnx_providers()
    line = next(x for x in out.splitlines() if x.startswith("onnxruntime providers"))
    if isinstance(providers, list):
        assert "CPUExecutionProvider" in providers and all(p in line for p in providers)
    else:
        assert "not installed" in line
    assert "device auto" in out
