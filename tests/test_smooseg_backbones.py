"""SmooSeg backbones: the weight-free features, HF ViT / DINOv2 patch features (torch and
ONNX Runtime), user callables."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dynaguide.smooseg.backbones import (
    CallableBackbone,
    DenseFeatureBackbone,
    load_backbone,
    rgb_to_lab,
)


def test_lab_matches_scikit_image_in_float64() -> None:
    from skimage.color import rgb2lab

    x = torch.rand(2, 3, 17, 23, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = rgb_to_lab(x).numpy()
    ref = np.stack([rgb2lab(x[i].permute(1, 2, 0).numpy()) for i in range(2)]).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, ref, atol=5e-4)


def test_dense_features_shape_determinism_and_meaning() -> None:
    b = DenseFeatureBackbone()
    assert (b.dim, b.patch_size) == (14, 8) and b.name.startswith("texture")
    x = torch.rand(3, 3, 70, 41, generator=torch.Generator().manual_seed(1))
    f = b(x)
    assert f.shape == (3, 14, 8, 5) and f.dtype == torch.float32
    assert torch.equal(f, b(x.clone()))
    flat = b(torch.full((1, 3, 32, 32), 0.4))
    np.testing.assert_allclose(flat[0, 3:12].numpy(), 0.0, atol=1e-5)  # no texture
    yy = torch.arange(64.0).view(64, 1).expand(64, 64)
    stripes = ((torch.sin(yy * np.pi / 3) > 0).float() * 0.6 + 0.2).expand(1, 3, 64, 64)
    s = b(stripes)[0]
    gx, gy = s[3, 2:-2, 2:-2].mean(), s[4, 2:-2, 2:-2].mean()
    assert gy > 10 * gx, "horizontal stripes: vertical derivative energy dominates"
    torch.testing.assert_close(
        s[12, :, 0], ((torch.arange(8.0) + 0.5) / 8 * 2 - 1) * b.position_weight * b.gain
    )
    with pytest.raises(ValueError, match="smaller than one 8x8 patch"):
        b(torch.rand(1, 3, 4, 40))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        b(torch.rand(3, 16, 16))


def test_callable_backbone_checks_its_output() -> None:
    good = CallableBackbone(
        lambda x: torch.zeros(x.shape[0], 5, x.shape[2] // 4, x.shape[3] // 4),
        dim=5,
        patch_size=4,
        name="mine",
    )
    assert good(torch.rand(2, 3, 16, 20)).shape == (2, 5, 4, 5)
    bad = CallableBackbone(
        lambda x: torch.zeros(x.shape[0], 6, 4, 5), dim=5, patch_size=4, name="mine"
    )
    with pytest.raises(
        ValueError, match=r"backbone 'mine' returned features of shape \(2, 6, 4, 5\)"
    ):
        bad(torch.rand(2, 3, 16, 20))
    with pytest.raises(ValueError, match="floating tensor"):
        CallableBackbone(lambda x: np.zeros(3), dim=5, patch_size=4)(torch.rand(1, 3, 8, 8))
    assert isinstance(load_backbone(lambda x: x, dim=3, patch_size=1), CallableBackbone)
    assert isinstance(load_backbone("texture"), DenseFeatureBackbone)
    with pytest.raises(FileNotFoundError, match="neither 'texture'"):
        load_backbone("no/such/folder")
    with pytest.raises(TypeError, match="backbone must be"):
        load_backbone(3)


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    return pytest.importorskip("transformers")


def _save(hf, folder: Path, kind: str) -> Path:
    """A tiny random ViT (patch 8) or DINOv2 (patch 14, optionally 3 registers) folder."""
    torch.manual_seed(0)
    common = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    if kind == "vit":
        cfg = hf.ViTConfig(**common, intermediate_size=64, image_size=64, patch_size=8)
        model = hf.ViTModel(cfg, add_pooling_layer=False)
    else:
        dino = {**common, "mlp_ratio": 2, "image_size": 56, "patch_size": 14}
        model = (
            hf.Dinov2Model(hf.Dinov2Config(**dino))
            if kind == "dinov2"
            else hf.Dinov2WithRegistersModel(
                hf.Dinov2WithRegistersConfig(**dino, num_register_tokens=3)
            )
        )
    model.save_pretrained(str(folder))
    return folder


@pytest.mark.parametrize("kind", ["vit", "dinov2", "dinov2_with_registers"])
def test_vit_patch_features_are_the_normalised_last_layer_patch_tokens(
    hf, tmp_path: Path, kind: str
) -> None:
    from dynaguide.guidance.vit_attention import load_vit
    from dynaguide.smooseg.vit_backbone import HFViTBackbone

    folder = _save(hf, tmp_path / kind, kind)
    bb = HFViTBackbone(folder, device="cpu")
    p = bb.patch_size
    x = torch.rand(2, 3, 4 * p, 6 * p, generator=torch.Generator().manual_seed(3))
    feats = bb(x)
    assert feats.shape == (2, 32, 4, 6) and bb.dim == 32
    pre = bb.preprocessor
    norm = (x * 255 * pre.rescale_factor - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(
        pre.std
    ).view(1, 3, 1, 1)
    model = load_vit(folder)
    kw = {"interpolate_pos_encoding": True} if kind == "vit" else {}
    with torch.no_grad():
        out = model(pixel_values=norm, output_hidden_states=True, **kw)
    skip = 1 + (3 if kind == "dinov2_with_registers" else 0)
    last = model.layernorm(out.hidden_states[-1])  # the final LayerNorm on the last block
    ref = last[:, skip:].reshape(2, 4, 6, 32).permute(0, 3, 1, 2)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)
    assert not any(q.requires_grad for q in bb._module.parameters()) and not bb._module.training


@pytest.mark.parametrize("kind", ["vit", "dinov2"])
def test_vit_features_onnx_matches_torch_on_another_size(hf, tmp_path: Path, kind: str) -> None:
    from dynaguide.export import read_metadata
    from dynaguide.export.vit_features import export_vit_features

    from dynaguide.smooseg.vit_backbone import HFViTBackbone

    folder = _save(hf, tmp_path / kind, kind)
    report = export_vit_features(folder, tmp_path / f"{kind}.onnx")
    assert report.dynamic and report.max_abs_diff < 1e-4
    assert read_metadata(report.path)["dynaguide.kind"] == "vit-features"
    ort_bb = load_backbone(report.path, device="cpu")
    torch_bb = HFViTBackbone(folder, device="cpu")
    assert ort_bb.name == torch_bb.name, "a head trained on either runs on the other"
    p = torch_bb.patch_size
    x = torch.rand(2, 3, 7 * p, 3 * p, generator=torch.Generator().manual_seed(5))
    a, b = ort_bb(x), torch_bb(x)
    assert a.shape == b.shape == (2, 32, 7, 3)
    assert float((a - b).abs().max()) < 1e-4
    if kind == "dinov2":  # a folder run in ONNX Runtime: exported to a scratch folder, removed
        import tempfile

        before = set(Path(tempfile.gettempdir()).glob("dynaguide-vitfeat-*"))
        folder_ort = HFViTBackbone(folder, backend="onnxruntime", device="cpu")
        assert set(Path(tempfile.gettempdir()).glob("dynaguide-vitfeat-*")) == before
        assert float((folder_ort(x) - b).abs().max()) < 1e-4


def test_vit_backbone_bad_inputs(hf, tmp_path: Path) -> None:
    from dynaguide.smooseg.vit_backbone import HFViTBackbone

    with pytest.raises(ValueError, match="model_type"):
        seg = tmp_path / "seg"
        seg.mkdir()
        (seg / "config.json").write_text('{"model_type": "segformer"}')
        HFViTBackbone(seg)
    with pytest.raises(ValueError, match="backend"):
        HFViTBackbone(tmp_path, backend="tf")


def test_export_cli_writes_vit_features(hf, tmp_path: Path, capsys) -> None:
    from dynaguide.export import read_metadata

    from dynaguide.cli import main

    folder = _save(hf, tmp_path / "vit", "vit")
    out = tmp_path / "f.onnx"
    assert main(["export", "vit-features", str(folder), str(out)]) == 0
    assert "max_abs_diff" in capsys.readouterr().out
    meta = read_metadata(out)
    assert (meta["dynaguide.kind"], meta["dynaguide.dim"], meta["dynaguide.patch_size"]) == (
        "vit-features",
        "32",
        "8",
    )
