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
    assert data["benchmark"] == "kernels" and data["rows"]
    ops = {row["op"] for row in data["rows"]}
    want = {"continuity (huber, 8)", "similarity", "guidance", "fused dynaguide_loss"}
    assert {op + " fwd+bwd" for op in want} <= ops, ops
    for row in data["rows"]:
        for key in ("fast_s", "reference_s"):
            s = row[key]
            assert 0 < s["min"] <= s["median"] <= s["max"], (row["op"], key, s)
        assert row["speedup_median"] == pytest.approx(
            row["reference_s"]["median"] / row["fast_s"]["median"]
        )
        assert len(row["shape"]) in (3, 4) and row["response_bytes"] > 0


def test_refine_cpu_authors_loop_matches_the_library_objective():
    """The benchmark's written-out authors' loop computes the library's objective: with the
    released code's guide mapping, its first iterations' losses equal the reference path's."""
    import numpy as np

    from dynaguide.config import get_preset
    from dynaguide.refine import RefineStep

    module = _load("refine_cpu")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(14, 17, 3), dtype=np.uint8)
    guide = rng.integers(0, 5, size=(14, 17))
    for preset in ("dynaguide", "dfc", "dynaguide-reference"):
        cfg = get_preset(preset).replace(alignment="reference", silhouette="off")
        authors = module.AuthorsLoop(image, guide, cfg, seed=3)
        lib = RefineStep(
            image, cfg, guide_labels=guide, seed=3, backend="torch", channels_last=False
        )
        for _ in range(3):
            expected = float(lib.step()[0])
            assert abs(authors.step() - expected) <= 1e-5 * abs(expected), preset


@pytest.mark.skipif(not VAL.is_dir(), reason=f"BSDS500 val images not found at {VAL}")
def test_refine_cpu_script_tiny(tmp_path, monkeypatch):
    argv = [
        "refine_cpu.py",
        "--size",
        "24x32",
        "--iters",
        "1",
        "--warmup",
        "1",
        "--out",
        str(tmp_path),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    _load("refine_cpu").main()
    data = json.loads((tmp_path / "refine_cpu-cpu.json").read_text())
    from dynaguide.model import cpu_has_native_bf16

    paths = {"authors_loop", "authors_loop_heap_reuse", "reference", "default"}
    if cpu_has_native_bf16():
        paths.add("amp_bf16")
        assert data["speedup_amp_bf16_vs_authors_loop"] > 0
    assert set(data["paths"]) == paths
    assert data["speedup_default_vs_authors_loop"] > 0


def test_gpu_check_tiny_dry_run(tmp_path):
    """--tiny runs every section at tiny sizes (CUDA-only ones record that they were
    skipped) and writes one JSON; without CUDA and without --tiny the script refuses."""
    import torch

    module = _load("gpu_check")
    if not torch.cuda.is_available():
        assert module.main(["--out", str(tmp_path)]) == 2
    assert module.main(["--tiny", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("gpu-check-*.json")
    data = json.loads(path.read_text())
    assert set(data["sections"]) == set(module.SECTIONS)
    assert data["environment"]["command"] and data["environment"]["commit"]
    sec = data["sections"]
    assert all("error" not in v for v in sec.values()), {k: v.get("error") for k, v in sec.items()}
    cases = {k: v for k, v in sec["fp64"].items() if isinstance(v, dict)}
    assert len(cases) == 2
    for case in cases.values():
        assert case["labels_equal"] and case["k_equal"]
    f32 = next(v for k, v in cases.items() if k.startswith("float32"))
    assert f32["loss_max_rel_err"] < 1e-5 and f32["grad_max_norm_rel_err"] < 1e-5
    assert sec["refine"]["paths"]["eager_fused"]["n_iter"] == sec["refine"]["iterations"]
    assert sec["tests"]["pytest -m gpu (tiny: one module)"]["returncode"] == 0


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


def test_smoothness_loss_script_tiny(tmp_path):
    module = _load("smoothness_loss")
    argv = ["--batch", "2", "--side", "3", "--dim", "8", "--classes", "3", "--repeats", "1"]
    assert module.main([*argv, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "smoothness_loss-cpu.json").read_text())
    assert data["cpu"]["errors_vs_float64"]["factorised"]["loss"] < 1e-5
    assert isinstance(data["cpu"]["measured_peak_rss_rise_bytes"]["factorised"], int)
    assert data["cuda"] == "not measured (no CUDA)" or "triton" in data["cuda"]


def test_crf_script_tiny(tmp_path):
    pytest.importorskip("dynaguide._native")
    module = _load("crf")
    assert module.main(["--repeats", "1", "--classes", "2", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "crf-cpu.json").read_text())
    assert data["rows"]["K=2"]["wall_s"]["n"] == 1 and data["lattice_points"]["bilateral"] > 0
