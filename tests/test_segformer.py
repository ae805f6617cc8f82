"""SegFormer guide: export (through the CLI), ORT vs torch, preprocessing parity, guide, errors.

No pretrained weights exist here: a tiny randomly initialised SegFormer is saved to a
temporary folder and exported once per module.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")

from dynaguide.export import OrtSession, read_metadata  # noqa: E402
from dynaguide.export.segformer import segformer_postprocess_model  # noqa: E402

from dynaguide.guidance import get_guide  # noqa: E402
from dynaguide.guidance.pretrained import ImagePreprocessor  # noqa: E402
from dynaguide.guidance.segformer import (  # noqa: E402
    SEGFORMER_DEFAULTS,
    SegFormerGuide,
    load_segformer,
    logits_to_labels,
)

PREPROCESS = {
    "image_processor_type": "SegformerImageProcessor",
    "size": {"height": 64, "width": 96},
    "image_mean": [0.4, 0.5, 0.6],
    "image_std": [0.2, 0.25, 0.3],
    "rescale_factor": 1 / 255,
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "resample": 2,
}


def _hf_processor(folder: Path | None = None):
    """The PIL-backed SegFormer processor (the torchvision backend resizes differently)."""
    cls = (
        getattr(transformers, "SegformerImageProcessorPil", None)
        or transformers.SegformerImageProcessor
    )
    if folder is None:
        return cls()
    return cls.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("segformer") / "tiny-segformer"
    cfg = transformers.SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 1],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=4,
    )
    torch.manual_seed(0)
    transformers.SegformerForSemanticSegmentation(cfg).save_pretrained(str(folder))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESS))
    return folder


@pytest.fixture(scope="module")
def exported(checkpoint: Path) -> tuple[Path, str]:
    """Export through ``dynaguide export segformer``; returns (onnx path, printed output)."""
    import argparse

    from dynaguide.export.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = checkpoint.parent / "tiny-segformer.onnx"
    args = parser.parse_args(["export", "segformer", str(checkpoint), str(out)])
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = args.func(args)
    assert rc == 0, buf.getvalue()
    return out, buf.getvalue()


@pytest.fixture(scope="module")
def torch_model(checkpoint: Path) -> torch.nn.Module:
    return load_segformer(checkpoint)


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_cli_export_is_dynamic_and_verified(exported: tuple[Path, str]) -> None:
    path, printed = exported
    diff = float(re.search(r"max_abs_diff (\S+)", printed).group(1))
    assert diff < 1e-4
    meta = read_metadata(path)
    assert meta["dynaguide.kind"] == "segformer"
    assert json.loads(meta["dynaguide.dynamic_hw"]) is True
    assert json.loads(meta["dynaguide.preprocess"])["size"] == [64, 96]
    assert not path.with_name(path.name + ".data").exists(), "small models are written as one file"


@pytest.mark.parametrize("shape", [(1, 3, 75, 133), (1, 3, 200, 40)])
def test_onnxruntime_matches_torch_on_fresh_inputs(exported, torch_model, shape) -> None:
    session = OrtSession(exported[0], device="cpu")
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    with torch.inference_mode():
        ref = torch_model(pixel_values=x).logits.numpy()
    got = session.run({"pixel_values": x.numpy()})["logits"]
    assert got.shape == ref.shape
    assert np.max(np.abs(got - ref)) < 1e-4


@pytest.mark.parametrize("hw", [(37, 53), (300, 211)])
def test_preprocessing_equals_hf_processor(checkpoint: Path, hw: tuple[int, int]) -> None:
    img = _image(*hw, seed=hw[0])
    ours = ImagePreprocessor.from_pretrained(checkpoint, defaults=SEGFORMER_DEFAULTS)(img)
    ref = _hf_processor(checkpoint)(images=img, return_tensors="np")["pixel_values"]
    assert ours.shape == ref.shape == (1, 3, 64, 96)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_default_preprocessing_equals_processor_defaults() -> None:
    img = _image(41, 29, seed=3)
    ours = SEGFORMER_DEFAULTS(img)
    ref = _hf_processor()(images=img, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_guide_onnx_equals_torch_backend(exported, checkpoint: Path) -> None:
    img = _image(61, 83, seed=5)
    g_ort = SegFormerGuide(exported[0], device="cpu")
    g_torch = SegFormerGuide(checkpoint, backend="torch", device="cpu")
    assert g_ort.providers == ["CPUExecutionProvider"]
    assert g_ort.preprocessor == g_torch.preprocessor
    np.testing.assert_allclose(g_ort.logits(img), g_torch.logits(img), rtol=0, atol=1e-4)
    a, b = g_ort(img), g_torch(img)
    assert a.shape == (61, 83) and a.dtype == np.int32
    assert (a == b).mean() > 0.999  # only exact ties could differ
    assert a.min() >= 0 and a.max() < 4


@pytest.mark.parametrize("size", [(61, 83), (9, 11)])
def test_postprocess_graph_matches_torch_and_binds_device_values(size) -> None:
    """Resize + argmax graph == torch bilinear + argmax; logits pass between sessions bound."""
    logits = torch.randn(1, 4, 17, 23, generator=torch.Generator().manual_seed(size[0]))
    ref = logits_to_labels(logits, size).numpy()
    post = OrtSession(segformer_postprocess_model(), device="cpu")
    value = ort.OrtValue.ortvalue_from_numpy(logits.numpy())
    out = post.run_bound({"logits": value, "size": np.array(size, np.int64)})
    labels = out["labels"].numpy()[0]
    assert labels.dtype == np.int32 and labels.shape == size
    assert (labels == ref).mean() > 0.999


def test_folder_with_onnx_path_reuses_matching_export(exported, checkpoint: Path) -> None:
    guide = SegFormerGuide(checkpoint, onnx_path=exported[0], device="cpu")
    assert guide.export_report is None, "an export of the same files must be reused"
    assert guide(_image(20, 30, seed=1)).shape == (20, 30)


def test_registry_builds_the_guide(exported) -> None:
    guide = get_guide("segformer", checkpoint=str(exported[0]), device="cpu")
    assert isinstance(guide, SegFormerGuide) and guide.name == "segformer"
    with pytest.raises(ValueError, match="checkpoint"):
        get_guide("segformer")


def test_bad_inputs(tmp_path: Path, exported, checkpoint: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SegFormerGuide(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        SegFormerGuide(tmp_path, backend="torch")
    other = tmp_path / "vit"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ValueError, match="'vit' checkpoint"):
        SegFormerGuide(other)
    empty = tmp_path / "no-weights"
    empty.mkdir()
    (empty / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="cannot load weights"):
        SegFormerGuide(empty, backend="torch")
    with pytest.raises(ValueError, match=r"\.onnx"):
        SegFormerGuide(checkpoint / "config.json")
    with pytest.raises(FileNotFoundError):
        SegFormerGuide(tmp_path / "nothing.onnx")
    with pytest.raises(ValueError, match="backend"):
        SegFormerGuide(exported[0], backend="tensorflow")
    with pytest.raises(ValueError, match="needs a checkpoint folder"):
        SegFormerGuide(exported[0], backend="torch")
    with pytest.raises(TypeError, match="path"):
        SegFormerGuide(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="device"):
        SegFormerGuide(exported[0], device="tpu")
    guide = SegFormerGuide(exported[0], device="cpu")
    with pytest.raises(ValueError, match="uint8"):
        guide(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        guide(np.zeros((8, 8), np.uint8))


def test_segment_end_to_end_with_onnx_guide(exported) -> None:
    import dynaguide

    if not hasattr(dynaguide, "segment"):
        pytest.skip("dynaguide.segment is not available yet")
    img = _image(40, 56, seed=9)
    guide = SegFormerGuide(exported[0], device="cpu")
    seg = dynaguide.segment(img, guidance=guide, max_iter=3, scale=0.5, preset="dynaguide")
    assert seg.labels.shape == (40, 56)
    assert seg.guide_labels is not None and seg.guide_labels.shape == (40, 56)


def test_a_named_guide_is_exported_once_per_batch_and_cli_run(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """3 images -> 1 ONNX export (before: one per image), in segment_batch and the CLI."""
    from dynaguide.export import segformer as module

    import dynaguide
    from dynaguide import cli

    exports: list[Path] = []
    real = module.export_segformer

    def counting(folder: Any, target: Any, **kwargs: Any) -> Any:
        exports.append(Path(target))
        return real(folder, target, **kwargs)

    monkeypatch.setattr(module, "export_segformer", counting)
    images = [_image(24, 32, seed=s) for s in range(3)]
    options = {"checkpoint": str(checkpoint), "device": "cpu", "verify": False}
    segs = dynaguide.segment_batch(
        images, guidance="segformer", guidance_options=options, preset="dynaguide",
        max_iter=2, device="cpu",
    )  # fmt: skip
    assert len(exports) == 1 and all(s.extra["guide"] == "segformer" for s in segs)
    folder = tmp_path / "in"
    folder.mkdir()
    from PIL import Image

    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i}.png")
    argv = ["segment", str(folder), str(tmp_path / "out"), "--preset", "dynaguide", "--quiet"]
    argv += ["--guidance", "segformer", "--max-iter", "2", "--device", "cpu"]
    argv += [f"--guide-option=checkpoint={checkpoint}", "--guide-option=verify=false"]
    assert cli.main(argv) == 0
    assert len(exports) == 2  # one more for the whole CLI run
