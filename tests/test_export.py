"""``dynaguide export refine-net``, the exporter fallback, ORT sessions and lazy imports."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

from dynaguide.export import ExportReport, OrtSession, export_onnx, read_metadata  # noqa: E402
from dynaguide.export.cli import register  # noqa: E402
from dynaguide.export.ort_session import select_providers  # noqa: E402

from dynaguide.config import get_preset  # noqa: E402
from dynaguide.model import build_model  # noqa: E402


def _cli(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["export", *argv])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = args.func(args)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def refine_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    cfg = get_preset("dynaguide").replace(n_channels=6, n_conv=2, final_pass="last")
    model = build_model(cfg, seed=0)
    model.train()
    with torch.no_grad():  # move the BN running statistics away from their initial values
        for i in range(3):
            model(torch.rand(1, 3, 20, 24, generator=torch.Generator().manual_seed(i)) * 4)
    path = tmp_path_factory.mktemp("refine") / "net.pt"
    torch.save({"config": cfg.to_dict(), "state_dict": model.state_dict()}, path)
    return path, model


@pytest.mark.parametrize("bn", ["auto", "eval"])
def test_refine_net_export_matches_torch(refine_checkpoint, tmp_path: Path, bn: str) -> None:
    path, model = refine_checkpoint
    out = tmp_path / f"net-{bn}.onnx"
    rc, printed, err = _cli("refine-net", str(path), str(out), "--bn", bn)
    assert rc == 0, err
    assert float(re.search(r"max_abs_diff (\S+)", printed).group(1)) < 1e-4
    meta = read_metadata(out)
    mode = "batch" if bn == "auto" else "eval"  # final_pass="last" -> batch statistics
    assert meta["dynaguide.batchnorm"] == mode and json.loads(meta["dynaguide.dynamic_hw"])
    x = torch.randn(1, 3, 29, 41, generator=torch.Generator().manual_seed(3))
    ref_model = build_model(get_preset("dynaguide").replace(n_channels=6), seed=None)
    ref_model.load_state_dict(model.state_dict())
    ref_model.train(mode == "batch")
    with torch.no_grad():
        ref = ref_model(x).numpy()
    got = OrtSession(out, device="cpu").run({"image": x.numpy()})["response"]
    assert got.shape == (1, 6, 29, 41)
    assert np.abs(got - ref).max() < 1e-4 * max(1.0, np.abs(ref).max())


def test_refine_net_bad_checkpoints(tmp_path: Path) -> None:
    rc, _, err = _cli("refine-net", str(tmp_path / "missing.pt"), str(tmp_path / "x.onnx"))
    assert rc == 2 and "does not exist" in err
    bad = tmp_path / "bad.pt"
    torch.save({"weights": 1}, bad)
    rc, _, err = _cli("refine-net", str(bad), str(tmp_path / "x.onnx"))
    assert rc == 2 and "'config' and 'state_dict'" in err
    wrong = tmp_path / "wrong.pt"
    cfg = get_preset("dynaguide").replace(n_channels=6)
    torch.save(
        {
            "config": cfg.replace(n_channels=8).to_dict(),
            "state_dict": build_model(cfg).state_dict(),
        },
        wrong,
    )
    rc, _, err = _cli("refine-net", str(wrong), str(tmp_path / "x.onnx"))
    assert rc == 2 and "does not fit" in err
    rc, _, err = _cli("segformer", str(tmp_path / "none"), str(tmp_path / "x.onnx"))
    assert rc == 2 and "does not exist" in err


class _DataDependent(torch.nn.Module):
    """A branch on tensor values: torch.export cannot capture it, tracing can."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > -100.0:
            return x * 2.0 + 1.0
        return x


def test_exporter_falls_back_to_torchscript_with_reason(tmp_path: Path, caplog) -> None:
    with caplog.at_level("WARNING", logger="dynaguide.export"):
        report = export_onnx(
            _DataDependent(),
            torch.randn(1, 3, 8, 12),
            tmp_path / "dd.onnx",
            input_name="x",
            output_names=["y"],
        )
    assert isinstance(report, ExportReport)
    assert report.exporter == "torchscript" and report.dynamic
    assert report.fallback_reason and "dynamo exporter failed" in report.fallback_reason
    assert any("TorchScript" in r.message for r in caplog.records)
    x = np.random.default_rng(0).standard_normal((1, 3, 5, 7)).astype(np.float32)
    np.testing.assert_allclose(
        OrtSession(report.path, device="cpu").run({"x": x})["y"], x * 2 + 1, rtol=1e-6
    )
    with pytest.raises(ValueError, match="example"):
        export_onnx(
            _DataDependent(),
            torch.randn(3, 8, 12),
            tmp_path / "e.onnx",
            input_name="x",
            output_names=["y"],
        )


def test_providers_and_sessions(tmp_path: Path) -> None:
    assert select_providers("cpu") == ["CPUExecutionProvider"]
    assert select_providers("auto")[-1] == "CPUExecutionProvider"
    with pytest.raises(ValueError, match="device"):
        select_providers("gpu")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(ValueError, match="CUDAExecutionProvider"):
            select_providers("cuda")
    report = export_onnx(
        _DataDependent(),
        torch.randn(1, 3, 8, 12),
        tmp_path / "dd.onnx",
        input_name="x",
        output_names=["y"],
    )
    session = OrtSession(report.path, device="cpu", threads=1)
    with pytest.raises(ValueError, match="missing ONNX inputs"):
        session.run({})
    with pytest.raises(ValueError, match="threads"):
        OrtSession(report.path, threads=0)
    x = np.ones((1, 3, 2, 2), np.float32)
    bound = session.run_bound({"x": x}, keep_on_device=("y",))
    assert bound["y"].device_name().lower() == "cpu"
    np.testing.assert_array_equal(bound["y"].numpy(), 3 * x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and onnxruntime-gpu")
def test_cuda_session_keeps_outputs_on_device(tmp_path: Path) -> None:
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDAExecutionProvider")
    report = export_onnx(
        _DataDependent(),
        torch.randn(1, 3, 8, 12),
        tmp_path / "dd.onnx",
        input_name="x",
        output_names=["y"],
    )
    session = OrtSession(report.path, device="cuda")
    x = np.ones((1, 3, 2, 2), np.float32)
    bound = session.run_bound({"x": x}, keep_on_device=("y",))
    assert bound["y"].device_name().lower() == "cuda"
    np.testing.assert_array_equal(bound["y"].numpy(), 3 * x)


def test_import_dynaguide_stays_light() -> None:
    code = (
        "import sys, dynaguide, dynaguide.guidance, dynaguide.export, dynaguide.export.cli;"
        "names = ('onnxruntime', 'onnx', 'transformers', 'onnxscript');"
        "heavy = [m for m in names if m in sys.modules];"
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=tempfile.gettempdir(),
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
