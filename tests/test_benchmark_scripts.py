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


@pytest.mark.skipif(not VAL.is_dir(), reason=f"BSDS500 val images not found at {VAL}")
def test_baselines_script_tiny(tmp_path):
    out = tmp_path / "baselines.json"
    argv = ["--data", str(VAL.parent), "--limit", "2", "--out", str(out)]
    argv += [
        "--methods",
        "felzenszwalb,kmeans",
        "--knobs",
        "felzenszwalb=300",
        "--knobs",
        "kmeans=4",
    ]
    assert _load("baselines").main(argv) == 0
    data = json.loads(out.read_text())
    assert data["n_images"] == 2 and set(data["methods"]) == {"felzenszwalb", "kmeans"}
    assert data["command"].startswith("baselines.py") and data["commit"]
    for method in data["methods"].values():
        for variant in ("raw", "cc8"):
            r = method[variant]
            assert r["n_images"] == 2 and len(r["by_knob"]) == 1
            for metric in ("covering", "pri", "voi", "f"):  # one knob value: ODS = OIS
                assert r["ods"][metric]["value"] == pytest.approx(r["ois"][metric]["value"])
            assert 0 < r["ods"]["covering"]["value"] <= 1
            assert 0 < r["segment_best_iou_at_ods"]["covering"]["All"] <= 1
    human = data["human_leave_one_out"]
    assert human["covering"] > data["single_segment"]["covering"]
    assert "published" in data["published"]["source"]
    assert data["timing"]["standard_image_scores_seconds"]["n_calls"] == 2 * 2 * 2
