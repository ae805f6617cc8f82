"""DiffSeg-style merging: plain float64 references, synthetic block attention, ViT providers."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dynaguide.guidance.diffseg import (
    DiffSegGuide,
    aggregate_attention,
    anchor_grid,
    diffseg_segment,
    kmeans_refine,
    merge_attention,
    nms_labels,
    pairwise_symmetric_kl,
)

# --------------------------------------------------------------------------------------
# Plain references (float64 loops, SPEC §5 literally)
# --------------------------------------------------------------------------------------


def _d(a: np.ndarray, b: np.ndarray) -> float:
    return float(0.5 * np.sum((a - b) * (np.log(a) - np.log(b))))


def _kl_reference(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return np.array([[_d(a, b) for b in q] for a in p])


def _aggregate_reference(maps: list[np.ndarray], out: tuple[int, int]) -> np.ndarray:
    gh, gw = out
    grids = [m.shape[-2:] for m in maps]
    w = np.array([np.sqrt(r * c) for r, c in grids])
    w = w / w.sum()
    agg = np.zeros((gh, gw, gh, gw))
    for m, (rh, rw), wr in zip(maps, grids, w, strict=True):
        m = m.mean(0) if m.ndim == 5 else m
        for u in range(gh):
            for v in range(gw):
                q = m[u * rh // gh, v * rw // gw]
                k = torch.from_numpy(q)[None, None]
                k = F.interpolate(k, size=(gh, gw), mode="bilinear", align_corners=False)[0, 0]
                k = k.numpy()
                agg[u, v] += wr * k / k.sum()
    return agg


def _merge_reference(a: np.ndarray, anchors: np.ndarray, taus: list[float]) -> np.ndarray:
    gh, gw = a.shape[:2]
    flat = a.reshape(gh * gw, gh * gw)
    props = []
    for r, c in anchors:
        anchor = flat[r * gw + c]
        members = [m for m in flat if _d(anchor, m) < taus[0]]
        props.append(np.mean(members, axis=0))
    for t in taus[1:]:
        matched: set[int] = set()
        merged = []
        for i, p in enumerate(props):
            if i in matched:
                continue
            matched.add(i)
            idx = [j for j, q in enumerate(props) if _d(p, q) < t]
            matched.update(idx)
            merged.append(np.mean([props[j] for j in idx], axis=0))
        props = merged
    return np.stack(props).reshape(-1, gh, gw)


def _blocks(gh: int, gw: int, rows: int, cols: int) -> np.ndarray:
    lab = np.zeros((gh, gw), np.int64)
    lab[rows:, :] += 2
    lab[:, cols:] += 1
    return lab


def _block_attention(labels: np.ndarray, *, seed: int, sharp: float = 6.0, noise: float = 0.3):
    """Softmax attention that concentrates each query on its own block."""
    gh, gw = labels.shape
    lab = labels.ravel()
    rng = np.random.default_rng(seed)
    logits = sharp * (lab[:, None] == lab[None, :]) + noise * rng.standard_normal(
        (lab.size, lab.size)
    )
    p = np.exp(logits - logits.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)).reshape(gh, gw, gh, gw)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist(), strict=True))
    return len(pairs) == len(np.unique(a)) == len(np.unique(b))


def _random_dists(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).gamma(0.5, size=(n, d)) + 1e-6
    return x / x.sum(1, keepdims=True)


# --------------------------------------------------------------------------------------
# Algorithm
# --------------------------------------------------------------------------------------


def test_anchor_grid_reference_layout_matches_diffseg() -> None:
    pts = anchor_grid(64, 16)
    assert pts.shape == (256, 2)
    axis = np.arange(1, 62, 4)
    np.testing.assert_array_equal(np.unique(pts[:, 0]), axis)
    np.testing.assert_array_equal(pts[:16, 1], axis)  # rows outer, as meshgrid 'ij'


def test_anchor_grid_sizes_are_parameters() -> None:
    pts = anchor_grid((20, 30), 16, layout="even")
    assert pts.shape == (16 * 16, 2)
    assert pts[:, 0].max() >= 18 and pts[:, 1].max() >= 28, "even layout covers the grid"
    assert len(np.unique(pts, axis=0)) == len(pts)
    small = anchor_grid((3, 5), 16)
    assert small.shape == (15, 2), "anchors per axis are clamped to the grid"
    assert anchor_grid((9, 9), 1).tolist() == [[4, 4]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pairwise_kl_matches_float64_reference(dtype: torch.dtype) -> None:
    p, q = _random_dists(9, 40, 0), _random_dists(13, 40, 1)
    ref = _kl_reference(p, q)
    for chunk in (1 << 20, 40 * 3):  # one chunk, then chunks of 3 rows
        got = pairwise_symmetric_kl(
            torch.from_numpy(p).to(dtype), torch.from_numpy(q).to(dtype), chunk_elements=chunk
        )
        err = np.abs(got.double().numpy() - ref).max() / np.abs(ref).max()
        assert err < (1e-12 if dtype == torch.float64 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_aggregation_matches_float64_reference(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(2)
    maps = []
    for r, heads in ((8, 2), (4, 3), (2, 1)):
        m = rng.random((heads, r, r, r, r)) + 0.01
        maps.append(m / m.sum((-1, -2), keepdims=True))
    ref = _aggregate_reference(maps, (8, 8))
    got = aggregate_attention([torch.from_numpy(m) for m in maps], dtype=dtype).double().numpy()
    assert got.shape == (8, 8, 8, 8)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert np.abs(got - ref).max() / np.abs(ref).max() < tol
    np.testing.assert_allclose(got.sum((-1, -2)), 1.0, atol=1e-5)


def test_aggregation_of_one_map_at_full_size_is_identity() -> None:
    a = _block_attention(_blocks(6, 7, 2, 3), seed=0)
    got = aggregate_attention([torch.from_numpy(a)], dtype=torch.float64).numpy()
    np.testing.assert_allclose(got, a, rtol=0, atol=1e-12)


def test_merging_matches_plain_reference() -> None:
    labels = _blocks(6, 8, 2, 5)
    a = _block_attention(labels, seed=4, noise=0.6)
    anchors = anchor_grid((6, 8), 4)
    taus = [0.8, 1.0, 1.2]
    ref = _merge_reference(a, anchors, taus)
    got = merge_attention(torch.from_numpy(a), anchors=anchors, tau=taus, n_iter=3).numpy()
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12)


def test_recovers_blocks_on_the_grid_and_upsampled() -> None:
    labels = _blocks(12, 16, 5, 7)
    a = torch.from_numpy(_block_attention(labels, seed=1)).float()
    got = diffseg_segment([a], (12, 16), num_points=6, tau=1.0)
    assert _same_partition(got, labels)
    up = diffseg_segment([a], (48, 64), num_points=6, tau=1.0)
    ref = np.kron(labels, np.ones((4, 4), np.int64))
    agree = sum(np.bincount(ref[up == k]).max() for k in np.unique(up)) / up.size
    assert agree > 0.97  # only pixels next to block boundaries may move
    assert up.dtype == np.int32


def test_anchor_order_does_not_matter_for_separated_blocks() -> None:
    labels = _blocks(10, 12, 3, 8)
    a = torch.from_numpy(_block_attention(labels, seed=7)).double()
    anchors = anchor_grid((10, 12), 5)
    perm = np.random.default_rng(0).permutation(len(anchors))
    first = merge_attention(a, anchors=anchors, n_iter=1, tau=1.0).reshape(len(anchors), -1)
    shuffled = merge_attention(a, anchors=anchors[perm], n_iter=1, tau=1.0).reshape(
        len(anchors), -1
    )
    np.testing.assert_allclose(shuffled.numpy(), first[perm].numpy(), rtol=0, atol=1e-12)
    lab1 = diffseg_segment(a, (10, 12), anchors=anchors, tau=1.0, dtype=torch.float64)
    lab2 = diffseg_segment(a, (10, 12), anchors=anchors[perm], tau=1.0, dtype=torch.float64)
    assert _same_partition(lab1, lab2) and _same_partition(lab1, labels)


def test_multi_resolution_blocks() -> None:
    coarse = _blocks(8, 8, 3, 5)
    fine = np.kron(coarse, np.ones((2, 2), np.int64))
    maps = [
        torch.from_numpy(_block_attention(fine, seed=1)).float(),
        torch.from_numpy(_block_attention(coarse, seed=2)).float()[None].repeat(2, 1, 1, 1, 1),
    ]
    got = diffseg_segment(maps, (16, 16), num_points=8, tau=1.0)
    assert _same_partition(got, fine)


def test_kmeans_refinement_keeps_the_blocks() -> None:
    labels = _blocks(8, 10, 3, 4)
    a = torch.from_numpy(_block_attention(labels, seed=3)).float()
    props = merge_attention(a, num_points=5, tau=1.0)
    refined = kmeans_refine(a, props)
    assert refined.shape[0] <= props.shape[0] and refined.shape[1:] == (8, 10)
    assert _same_partition(nms_labels(refined, (8, 10)), labels)
    assert _same_partition(diffseg_segment(a, (8, 10), num_points=5, tau=1.0, refine=True), labels)


def test_chunking_bounds_memory_without_changing_results() -> None:
    labels = _blocks(9, 11, 4, 6)
    a = torch.from_numpy(_block_attention(labels, seed=5, noise=0.5)).double()
    big = merge_attention(a, num_points=4, tau=1.0)
    small = merge_attention(a, num_points=4, tau=1.0, chunk_elements=150)
    np.testing.assert_allclose(small.numpy(), big.numpy(), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(
        nms_labels(big, (30, 40)), nms_labels(big, (30, 40), chunk_elements=2500)
    )


def test_bad_inputs_are_rejected() -> None:
    a = torch.from_numpy(_block_attention(_blocks(4, 4, 2, 2), seed=0)).float()
    with pytest.raises(ValueError, match="shape"):
        aggregate_attention([a.reshape(16, 16)])
    with pytest.raises(ValueError, match="non-negative"):
        aggregate_attention([-a])
    with pytest.raises(ValueError, match="at least one"):
        aggregate_attention([])
    with pytest.raises(ValueError, match="weights"):
        aggregate_attention([a, a], weights=[1.0])
    with pytest.raises(TypeError, match="floating"):
        aggregate_attention([torch.ones(2, 2, 2, 2, dtype=torch.int64)])
    with pytest.raises(ValueError, match="tau"):
        merge_attention(a, tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        merge_attention(a, tau=[1.0, 1.0], n_iter=3)
    with pytest.raises(ValueError, match="n_iter"):
        merge_attention(a, n_iter=0)
    with pytest.raises(ValueError, match="inside"):
        merge_attention(a, anchors=np.array([[4, 0]]))
    with pytest.raises(ValueError, match="layout"):
        anchor_grid(8, 4, layout="spiral")
    with pytest.raises(ValueError, match="chunk_elements"):
        merge_attention(a, chunk_elements=0)
    with pytest.raises(ValueError, match="out_size"):
        nms_labels(a[0], (0, 5))
    with pytest.raises(ValueError, match="exactly one"):
        DiffSegGuide()
    with pytest.raises(TypeError, match="callable"):
        DiffSegGuide(provider=3)  # type: ignore[arg-type]
    guide = DiffSegGuide(provider=lambda img: [a], tau=1.0, num_points=2)
    with pytest.raises(ValueError, match="uint8"):
        guide(np.zeros((4, 4), np.uint8))


def test_guide_with_a_custom_provider() -> None:
    labels = _blocks(6, 9, 2, 4)
    a = torch.from_numpy(_block_attention(labels, seed=6)).float()
    guide = DiffSegGuide(provider=lambda img: [a], tau=1.0, num_points=4)
    out = guide(np.zeros((24, 36, 3), np.uint8))
    assert out.shape == (24, 36) and out.dtype == np.int32
    ref = np.kron(labels, np.ones((4, 4), np.int64))
    agree = sum(np.bincount(ref[out == k]).max() for k in np.unique(out)) / out.size
    assert agree > 0.95


# --------------------------------------------------------------------------------------
# ViT / DINOv2 providers (tiny random checkpoints, ONNX export through the CLI)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    return pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def vit_folder(hf, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("vit") / "tiny-vit"
    cfg = hf.ViTConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=64,
        patch_size=8,
        initializer_range=0.5,  # sharper attention than the default 0.02: several segments
    )
    torch.manual_seed(0)
    hf.ViTModel(cfg, add_pooling_layer=False).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def vit_onnx(vit_folder: Path) -> tuple[Path, str]:
    from dynaguide.export.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    out = vit_folder.parent / "tiny-vit.onnx"
    args = parser.parse_args(
        ["export", "vit-attention", str(vit_folder), str(out), "--layers", "-1", "-2"]
    )
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = args.func(args)
    assert rc == 0, buf.getvalue()
    return out, buf.getvalue()


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_vit_export_is_dynamic_and_verified(vit_onnx) -> None:
    from dynaguide.export.onnx_model import read_metadata

    path, printed = vit_onnx
    assert float(re.search(r"max_abs_diff (\S+)", printed).group(1)) < 1e-5
    meta = read_metadata(path)
    assert json.loads(meta["dynaguide.dynamic_hw"]) is True
    assert json.loads(meta["dynaguide.layers"]) == [1, 2]
    assert meta["dynaguide.prefix_tokens"] == "1"


def test_onnx_provider_matches_torch_provider(vit_onnx, vit_folder: Path) -> None:
    from dynaguide.guidance.diffseg import ViTAttention

    img = _image(50, 73, seed=0)
    p_ort = ViTAttention(vit_onnx[0], size=(72, 104), device="cpu")
    p_torch = ViTAttention(
        vit_folder, backend="torch", layers=(-1, -2), size=(72, 104), device="cpu"
    )
    (a,), (b,) = p_ort(img), p_torch(img)
    assert a.shape == b.shape == (9, 13, 9, 13)
    assert float((a - b).abs().max()) < 1e-5
    np.testing.assert_allclose(a.sum((-1, -2)).numpy(), 1.0, atol=1e-5)
    default = ViTAttention(vit_onnx[0], device="cpu")
    assert default.input_size(321, 481) == (320, 480), "long side 480, multiples of the patch"


def test_patch_attention_drops_cls_and_registers(hf, tmp_path: Path) -> None:
    """Manual slicing of HF attentions equals the provider; truncating layers changes nothing."""
    from dynaguide.guidance.diffseg import ViTAttention, load_vit, vit_preprocessor

    folder = tmp_path / "tiny-dinov2-reg"
    cfg = hf.Dinov2WithRegistersConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        mlp_ratio=2,
        image_size=56,
        patch_size=14,
        num_register_tokens=4,
    )
    torch.manual_seed(1)
    hf.Dinov2WithRegistersModel(cfg).save_pretrained(str(folder))
    img = _image(40, 60, seed=2)
    x = torch.from_numpy(vit_preprocessor(folder, "dinov2_with_registers")(img, size=(56, 84)))
    with torch.inference_mode():
        att = load_vit(folder)(pixel_values=x, output_attentions=True).attentions
    assert att[0].shape[-1] == 1 + 4 + 4 * 6
    for layers in ((0,), (0, 2)):
        ref = 0
        for layer in layers:
            a = att[layer][0, :, 5:, 5:]
            ref = ref + (a / a.sum(-1, keepdim=True)).mean(0) / len(layers)
        prov = ViTAttention(folder, backend="torch", layers=layers, size=(56, 84), device="cpu")
        (got,) = prov(img)
        assert got.shape == (4, 6, 4, 6)
        torch.testing.assert_close(got.reshape(24, 24), ref, rtol=1e-5, atol=1e-6)
    assert len(prov._module.model.encoder.layer) == 3
    assert len(ViTAttention(folder, backend="torch", layers=(0,))._module.model.encoder.layer) == 1


def test_diffseg_guide_onnx_end_to_end(vit_onnx, vit_folder: Path) -> None:
    from dynaguide.guidance import get_guide

    img = _image(45, 67, seed=4)
    g_ort = get_guide(
        "diffseg", checkpoint=str(vit_onnx[0]), size=96, tau=1.0, num_points=6, device="cpu"
    )
    g_torch = DiffSegGuide(
        vit_folder, backend="torch", layers=(-1, -2), size=96, tau=1.0, num_points=6
    )
    a, b = g_ort(img), g_torch(img)
    assert a.shape == (45, 67) and a.dtype == np.int32
    assert len(np.unique(a)) > 3, "sharp random attention splits the image into segments"
    assert (a == b).mean() > 0.99
    with pytest.raises(ValueError, match="checkpoint"):
        get_guide("diffseg")


def test_provider_bad_inputs(vit_onnx, vit_folder: Path, tmp_path: Path) -> None:
    from dynaguide.guidance.diffseg import ViTAttention

    with pytest.raises(FileNotFoundError, match="does not exist"):
        ViTAttention(tmp_path / "missing")
    seg = tmp_path / "seg"
    seg.mkdir()
    (seg / "config.json").write_text(json.dumps({"model_type": "segformer"}))
    with pytest.raises(ValueError, match="model_type"):
        ViTAttention(seg)
    with pytest.raises(ValueError, match="out of range"):
        ViTAttention(vit_folder, backend="torch", layers=(5,))
    with pytest.raises(ValueError, match="size"):
        ViTAttention(vit_onnx[0], size=0)
    with pytest.raises(TypeError, match="only apply"):
        DiffSegGuide(provider=lambda img: [], layers=(1,))


def test_fixed_size_fallback_for_registers_model(hf, tmp_path: Path) -> None:
    """DINOv2 with registers cannot export with dynamic H, W: the fixed size is kept and used."""
    from dynaguide.export import export_vit_attention

    from dynaguide.guidance.diffseg import ViTAttention

    folder = tmp_path / "reg"
    cfg = hf.Dinov2WithRegistersConfig(
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=1,
        mlp_ratio=2,
        image_size=28,
        patch_size=14,
        num_register_tokens=2,
    )
    torch.manual_seed(2)
    hf.Dinov2WithRegistersModel(cfg).save_pretrained(str(folder))
    report = export_vit_attention(folder, tmp_path / "reg.onnx", size=(42, 70))
    assert report.dynamic is False and "fixed the image size" in report.fallback_reason
    assert report.max_abs_diff < 1e-5
    prov = ViTAttention(tmp_path / "reg.onnx", size=480, device="cpu")
    assert prov.fixed_size == (42, 70)
    img = _image(30, 50, seed=1)
    (a,) = prov(img)
    (b,) = ViTAttention(folder, backend="torch", size=(42, 70))(img)
    assert a.shape == (3, 5, 3, 5) and float((a - b).abs().max()) < 1e-5


def test_segment_end_to_end_with_diffseg_guide(vit_onnx) -> None:
    import dynaguide

    if not hasattr(dynaguide, "segment"):
        pytest.skip("dynaguide.segment is not available yet")
    img = _image(40, 56, seed=9)
    guide = DiffSegGuide(vit_onnx[0], size=64, tau=1.0, num_points=4, device="cpu")
    seg = dynaguide.segment(img, guidance=guide, max_iter=3, scale=0.5, preset="dynaguide")
    assert seg.labels.shape == (40, 56)
    assert seg.guide_labels is not None and seg.guide_labels.shape == (40, 56)
