"""The benchmark scripts run end to end at a tiny size (they are known to work, not timed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VAL = ROOT.parent / "shared" / "data" / "bsds500" / "val" / "images"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", ROOT / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not VAL.is_dir(), reason=f"BSDS500 val images not found at {VAL}")
def test_refine_gpu_script_tiny(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["refine_gpu.py", "--tiny"])
    assert _load("refine_gpu").main(["--tiny", "--device", "cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "refine_gpu-cpu.json").read_text())
    assert set(data["paths"]) == {"reference", "fused", "fused_bf16"}
    assert data["paths"]["fused"]["n_iter"] == data["iterations"] == 5
    assert data["environment"]["command"].startswith("refine_gpu.py")


def test_kernels_script_tiny(tmp_path):
    pytest.importorskip("triton")
    module = _load("kernels")
    assert module.main(["--tiny", "--reps", "1", "--out", str(tmp_path)]) == 0
    data = json.loads(next(tmp_path.glob("kernels-*.json")).read_text())
    assert data
