"""One regression test per reproduced bad-input bug (resource bombs, batches, silent acceptance,
raw exceptions, minor items); the CLI data-safety rules are in test_cli_safety.py."""

from __future__ import annotations

import json
import os
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dynaguide
from dynaguide.errors import (
    GuideError,
    ImageReadError,
    ImageTooLargeError,
    ModelFileError,
    RefinementDivergedError,
)
from dynaguide.io import load_image


def _img(h: int = 8, w: int = 8, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_header(path: Path, side: int) -> Path:
    """A PNG whose header announces side x side pixels (the data is a few bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
        )

    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 9))
    )
    return path


# --------------------------------------------------------------------------- 5, 6: bombs


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_pixel_budget_refuses_before_decoding(tmp_path: Path, monkeypatch) -> None:
    path = _png_header(tmp_path / "huge.png", 13000)
    with pytest.raises(ImageTooLargeError) as info:
        load_image(path)
    msg = str(info.value)
    assert str(path) in msg and "64000000" in msg and "DYNAGUIDE_MAX_DECODE_PIXELS" in msg
    with pytest.raises(ImageTooLargeError, match=r"huge\.png"):
        dynaguide.segment(str(path), scale=0.001, max_iter=1)
    monkeypatch.setenv("DYNAGUIDE_MAX_DECODE_PIXELS", "100")
    small = tmp_path / "small.png"
    Image.fromarray(_img(12, 12)).save(small)  # 144 px > 100
    with pytest.raises(ImageTooLargeError, match="100 pixels"):
        load_image(small)
    with pytest.raises(ImageTooLargeError):  # a lazily opened PIL image: checked before load
        load_image(Image.open(small))
    monkeypatch.setenv("DYNAGUIDE_MAX_DECODE_PIXELS", "none")
    assert load_image(small).shape == (12, 12, 3)
    monkeypatch.setenv("DYNAGUIDE_MAX_DECODE_PIXELS", "lots")
    with pytest.raises(ValueError, match="DYNAGUIDE_MAX_DECODE_PIXELS"):
        load_image(small)


def test_large_downscale_is_reduced_first_and_small_ones_unchanged() -> None:
    from skimage.transform import resize

    from dynaguide.io import reduce_for_resize
    from dynaguide.pipeline import resize_image as _resize_image

    small = _img(300, 200)
    assert reduce_for_resize(small, (30, 20)) is small  # below 16 MP: results unchanged
    ref = np.clip(np.rint(resize(small, (30, 20), order=1, anti_aliasing=True,
                                 preserve_range=True)), 0, 255).astype(np.uint8)  # fmt: skip
    np.testing.assert_array_equal(_resize_image(small, (30, 20)), ref)
    big = np.zeros((4200, 4000, 3), np.uint8)  # 16.8 MP
    big[:, 2000:] = 200
    reduced = reduce_for_resize(big, (42, 40))
    assert reduced.shape == (84, 80, 3)  # factor 50: still twice the target
    out = _resize_image(big, (42, 40))
    assert out.shape == (42, 40, 3) and out[:, :18].max() == 0 and out[:, 22:].min() == 200


def test_onnx_metadata_size_is_bounded_before_allocating(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from dynaguide.guidance.pretrained import ImagePreprocessor
    from dynaguide.guidance.segformer import SegFormerGuide

    meta = {"dynaguide.preprocess": json.dumps({"size": [100000, 100000]})}
    with pytest.raises(ModelFileError, match=r"model\.onnx.*4096"):
        ImagePreprocessor.from_metadata(meta, source="model.onnx")
    path = _identity_onnx(tmp_path / "big.onnx", {"dynaguide.kind": "segformer", **meta})
    with pytest.raises(ModelFileError, match=r"big\.onnx"):
        SegFormerGuide(path, device="cpu")
    with pytest.raises(ValueError, match="4096"):
        ImagePreprocessor(size=(5000, 10))
    with pytest.raises(ValueError, match="finite"):
        ImagePreprocessor(mean=(float("nan"), 0, 0))


def test_refine_net_config_is_bounded_before_allocating(tmp_path: Path, monkeypatch) -> None:
    from dynaguide.export.refine import load_refine_checkpoint

    from dynaguide.config import get_preset
    from dynaguide.model import build_model

    cfg = get_preset("dfc").to_dict()
    torch.save({"config": {**cfg, "n_channels": 20000}, "state_dict": {}}, tmp_path / "huge.pt")
    with pytest.raises(ModelFileError, match=r"huge\.pt.*n_channels"):
        load_refine_checkpoint(tmp_path / "huge.pt")
    state = build_model(get_preset("dfc")).state_dict()
    # the largest allowed width with a 100-channel state: building it would take 38M floats
    torch.save({"config": {**cfg, "n_channels": 2048}, "state_dict": state}, tmp_path / "bad.pt")
    devices: list[str] = []
    real_reset = torch.nn.Conv2d.reset_parameters

    def record(self: torch.nn.Conv2d) -> None:
        devices.append(self.weight.device.type)
        real_reset(self)

    monkeypatch.setattr(torch.nn.Conv2d, "reset_parameters", record)
    with pytest.raises(ModelFileError, match="does not fit its config"):
        load_refine_checkpoint(tmp_path / "bad.pt")
    assert devices and set(devices) == {"meta"}  # shapes were compared before any allocation
    torch.save({"config": cfg, "state_dict": state}, tmp_path / "good.pt")
    model, config = load_refine_checkpoint(tmp_path / "good.pt")
    assert config.n_channels == 100 and not any(p.is_meta for p in model.parameters())


# --------------------------------------------------------------------------- 7: batches


def test_segment_batch_refuses_a_single_image_or_path() -> None:
    for single in (_img(), "photo.png", Path("photo.png"), torch.zeros(8, 8, 3), {"a": _img()}):
        with pytest.raises(TypeError, match="images must be a list"):
            dynaguide.segment_batch(single, max_iter=1)
    with pytest.raises(TypeError, match="images"):
        dynaguide.segment_batch(Image.new("RGB", (8, 8)), max_iter=1)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_segment_batch_skip_keeps_going_after_any_guide_error(batch_size: int) -> None:
    marked = _img(8, 8, 1)
    marked[0, 0] = (1, 2, 3)

    def guide(im: np.ndarray) -> np.ndarray:
        if tuple(im[0, 0]) == (1, 2, 3):
            return 1 // 0
        return (im[..., 0] > 127).astype(int)

    def meta_guide(im: np.ndarray):
        return (
            torch.zeros(im.shape[:2], device="meta")
            if tuple(im[0, 0]) == (1, 2, 3)
            else 0 * im[..., 0]
        )

    for g, kind in ((guide, "ZeroDivisionError"), (meta_guide, "meta")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = dynaguide.segment_batch(
                [_img(), marked, _img(8, 8, 2)], guidance=g, on_error="skip", max_iter=1,
                batch_size=batch_size,
            )  # fmt: skip
        assert out[0] is not None and out[1] is None and out[2] is not None
        text = " ".join(str(w.message) for w in caught)
        assert "input 1" in text and kind in text
    with pytest.raises(GuideError, match="ZeroDivisionError") as info:
        dynaguide.segment_batch([marked], guidance=guide, max_iter=1, batch_size=batch_size)
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_segment_batch_numpy_settings() -> None:
    out = dynaguide.segment_batch(
        [_img()], max_iter=np.int64(1), batch_size=np.int64(1), seed=np.int32(2), guidance=None
    )
    assert out[0].extra["seed"] == 2 and isinstance(out[0].extra["seed"], int)


# --------------------------------------------------------------------------- 8: silent


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("momentum", 5), ("momentum", 1.0), ("lr", float("inf")), ("lr", float("nan")),
        ("silhouette_k", (10**9, 10**9)), ("silhouette_k", (1.0, 5)), ("silhouette_k", (3, 5000)),
        ("min_labels", True), ("n_channels", True), ("max_iter", 10**12), ("max_iter", 2.0),
        ("n_channels", 20000), ("convergence_tol", 2.0), ("beta", float("inf")),
        ("max_pixels", True), ("neighbors", True), ("silhouette_stop", "yes"),
        ("mu", -1), ("weight_decay", float("nan")), ("default_guidance", 3),
    ],
)  # fmt: skip
def test_config_rejects_silently_accepted_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        dynaguide.RefineConfig(**{field: value})


def test_config_accepts_numpy_scalars_as_python_numbers() -> None:
    cfg = dynaguide.RefineConfig(max_iter=np.int64(7), lr=np.float32(0.5), silhouette_k=[3, 9])
    assert type(cfg.max_iter) is int and type(cfg.lr) is float and cfg.silhouette_k == (3, 9)
    assert json.dumps(cfg.to_dict())  # JSON-able


@pytest.mark.parametrize(
    ("guide", "options", "word"),
    [
        ("kmeans", {"n_clusters": -3}, "n_clusters"),
        ("kmeans", {"n_clusters": 0}, "n_clusters"),
        ("felzenszwalb", {"scale": -1}, "scale"),
        ("felzenszwalb", {"scale": True}, "scale"),
        ("felzenszwalb", {"sigma": float("nan")}, "sigma"),
        ("slic", {"n_segments": 0}, "n_segments"),
        ("slic", {"compactness": float("inf")}, "compactness"),
    ],
)
def test_guide_options_are_validated(guide: str, options: dict, word: str) -> None:
    with pytest.raises((ValueError, TypeError), match=word):
        dynaguide.segment(_img(), guidance=guide, guidance_options=options, max_iter=1)


def test_segment_scale_and_seed_types() -> None:
    with pytest.raises(ValueError, match="scale"):
        dynaguide.segment(_img(), scale=True, max_iter=1)
    assert dynaguide.segment(_img(), scale=np.float32(0.5), max_iter=1).labels.shape == (8, 8)
    for bad in (2**70, -1):
        with pytest.raises(ValueError, match="seed"):
            dynaguide.segment(_img(), seed=bad, max_iter=1)
    seg = dynaguide.segment(_img(), seed=np.int64(3), max_iter=np.int64(1), guidance=None)
    assert seg.extra["seed"] == 3 and seg.n_iter == 1


def test_guide_ids_above_2_24_are_not_merged_by_the_resize() -> None:
    g = np.arange(64, dtype=np.int64).reshape(8, 8) + 2**25  # 2**25 + k: float32 merges them
    seg = dynaguide.segment(_img(), guidance=g, scale=0.5, max_iter=1)
    assert len(np.unique(seg.guide_labels)) == 16  # 4x4 refinement grid, all ids distinct
    assert set(np.unique(seg.guide_labels)) <= set(g.ravel().tolist())


def test_nan_loss_stops_with_a_clear_error(monkeypatch) -> None:
    import dynaguide.refine as refine_mod

    real = refine_mod.objective
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, labels, k = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] >= 3 else loss), labels, k

    monkeypatch.setattr(refine_mod, "objective", poisoned)
    monkeypatch.setattr(refine_mod, "fused_kernel", lambda device, backend: None)
    with pytest.raises(RefinementDivergedError, match=r"probe\.png.*iteration 3"):
        dynaguide.segment(_img(), max_iter=10, min_labels=0, name="probe.png", guidance=None)
    calls["n"] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = dynaguide.segment_batch([_img()], on_error="skip", max_iter=10, min_labels=0)
    assert out == [None] and "diverged" in str(caught[0].message)


# --------------------------------------------------------------------------- 9: raw exceptions


def test_connected_components_connectivity_types() -> None:
    lab = np.zeros((3, 3), np.int32)
    for bad in (4.0, "8", True, 6, None):
        with pytest.raises(ValueError, match="connectivity"):
            dynaguide.connected_components(lab, bad)
    assert dynaguide.connected_components(lab, np.int64(4)).shape == (3, 3)
    from dynaguide.backend import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="backend"):  # documented
        dynaguide.relabel_compact(lab, backend="cuda")
    with pytest.raises(TypeError, match="backend"):
        dynaguide.relabel_compact(lab, backend=3)


def test_bsds_scores_with_uint64_labels_above_2_63() -> None:
    from dynaguide.eval import bsds_scores

    pred = np.full((6, 6), 2**63 + 5, np.uint64)
    pred[:, 3:] = 2**64 - 1
    gt = np.zeros((6, 6), np.uint16)
    gt[:, 3:] = 1
    ref = bsds_scores([(pred > 2**63 + 5).astype(np.int32)], [[gt]])
    got = bsds_scores([pred], [[gt]])
    assert got["All"] == ref["All"] == 1.0


def test_big_endian_arrays_are_accepted() -> None:
    le = np.random.default_rng(0).integers(0, 65536, (6, 7, 3)).astype("<u2")
    np.testing.assert_array_equal(load_image(le.astype(">u2")), load_image(le))
    f = np.random.default_rng(1).random((5, 5)).astype(">f4")
    np.testing.assert_array_equal(load_image(f), load_image(f.astype("<f4")))
    assert dynaguide.segment(le.astype(">u2"), max_iter=1, guidance=None).labels.shape == (6, 7)


def test_guide_failures_name_the_guide_and_the_image() -> None:
    def boom(image: np.ndarray) -> np.ndarray:
        raise ZeroDivisionError("division by zero")

    with pytest.raises(GuideError, match=r"guide 'boom' failed on probe\.png: ZeroDivisionError"):
        dynaguide.segment(_img(), guidance=boom, name="probe.png", max_iter=1)
    for bad in (lambda im: None, lambda im: "x", lambda im: object()):
        with pytest.raises((TypeError, ValueError), match=r"guide '<lambda>' for probe\.png"):
            dynaguide.segment(_img(), guidance=bad, name="probe.png", max_iter=1)
    t = dynaguide.segment(
        _img(), guidance=lambda im: torch.zeros(8, 8, dtype=torch.int64), max_iter=1
    )
    assert t.guide_labels is not None  # torch tensors from a guide are fine


def _identity_onnx(path: Path, meta: dict[str, str], *, int_input: bool = False) -> Path:
    """A one-node ONNX model with ``meta`` (benchmarks/bad_inputs.py builds it)."""
    import importlib.util
    import sys

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(
        "bad_inputs", root / "benchmarks" / "bad_inputs.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["bad_inputs"] = module
    spec.loader.exec_module(module)
    return module.onnx_identity(path, meta, int_input=int_input)


def test_corrupt_onnx_files_give_one_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from dynaguide.guidance.diffseg import DiffSegGuide
    from dynaguide.guidance.segformer import SegFormerGuide

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07garbage-protobuf" * 8)
    with pytest.raises(ModelFileError, match=r"garbage\.onnx: not a readable ONNX model"):
        SegFormerGuide(garbage, device="cpu")
    bad_json = _identity_onnx(
        tmp_path / "json.onnx", {"dynaguide.kind": "segformer", "dynaguide.preprocess": "{x"}
    )
    with pytest.raises(ModelFileError, match=r"json\.onnx: unreadable dynaguide\.preprocess"):
        SegFormerGuide(bad_json, device="cpu")
    int_in = _identity_onnx(tmp_path / "int.onnx", {"dynaguide.kind": "segformer"}, int_input=True)
    guide = SegFormerGuide(int_in, device="cpu")
    with pytest.raises(ModelFileError, match=r"int\.onnx: ONNX Runtime failed"):
        guide(_img(16, 16))
    with pytest.raises(GuideError, match=r"int\.onnx") as info:  # through segment: the image too
        dynaguide.segment(_img(16, 16), guidance=guide, name="probe.png", max_iter=1)
    assert "probe.png" in str(info.value)
    vit = {"dynaguide.kind": "vit-attention", "dynaguide.layers": "[1]"}
    for meta, word in (({**vit, "dynaguide.patch_size": "0"}, "patch_size"),
                       ({**vit, "dynaguide.patch_size": "8", "dynaguide.layers": "{"}, "metadata"),
                       ({**vit, "dynaguide.patch_size": "8"}, "attention output")):  # fmt: skip
        path = _identity_onnx(tmp_path / f"vit-{word.replace(' ', '-')}.onnx", meta)
        with pytest.raises(ModelFileError, match=word) as info:
            DiffSegGuide(path, device="cpu", size=64)(_img(16, 16))
        assert str(path) in str(info.value)


def test_corrupt_checkpoint_folders_give_one_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from dynaguide.guidance.diffseg import load_vit
    from dynaguide.guidance.segformer import load_segformer

    for model_type, loader in (("segformer", load_segformer), ("vit", load_vit)):
        for case, write in (
            ("safetensors", lambda d: (d / "model.safetensors").write_bytes(b"\x10" + b"\0" * 7 + b"junk" * 8)),
            ("bin", lambda d: (d / "pytorch_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'echo x'\ntR.")),
        ):  # fmt: skip
            folder = tmp_path / f"{model_type}-{case}"
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
            write(folder)
            with pytest.raises((ModelFileError, FileNotFoundError)) as info:
                loader(folder)
            assert str(folder) in str(info.value)
        listed = tmp_path / f"{model_type}-list"
        listed.mkdir()
        (listed / "config.json").write_text("[1, 2]")
        with pytest.raises(ModelFileError, match="JSON list"):
            loader(listed)


# --------------------------------------------------------------------------- 10: minor


def test_hw1_guidance_accepted_when_downscaled() -> None:
    g = (np.arange(64).reshape(8, 8, 1) // 16).astype(np.int64)
    for scale in (None, 0.5):
        seg = dynaguide.segment(_img(), guidance=g, scale=scale, max_iter=1)
        assert seg.guide_labels.shape == (8, 8)
    out = dynaguide.segment_batch([_img()], guidance=g, scale=0.5, max_iter=1, batch_size=2)
    assert out[0].guide_labels.shape == (8, 8)


def test_symlink_loop_and_broken_link_messages(tmp_path: Path) -> None:
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    with pytest.raises(ImageReadError, match="symbolic link loop"):
        load_image(loop)
    broken = tmp_path / "broken.png"
    broken.symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(FileNotFoundError, match="broken symbolic link"):
        load_image(broken)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageReadError, match="not a regular file"):
        load_image(fifo)  # would block forever if opened
    with pytest.raises(ImageReadError, match="invalid path"):
        load_image("bad\0name.png")


def test_long_stem_temp_names_fit(tmp_path: Path) -> None:
    seg = dynaguide.segment(_img(), max_iter=1, guidance=None)
    paths = seg.save(tmp_path, "s" * 235)
    assert all(p.is_file() for p in paths.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())
    with pytest.raises(ValueError, match="255 bytes"):
        seg.save(tmp_path, "s" * 250)


def test_eval_plot_images_are_exif_rotated(tmp_path: Path) -> None:
    from dynaguide.eval.datasets import DatasetItem

    rgb = _img(6, 10)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    path = tmp_path / "rot.jpg"
    Image.fromarray(rgb).save(path, exif=exif, quality=95)
    item = DatasetItem(
        id="rot", image_path=path, annotation_path=tmp_path / "x.npz", kind="bsds500"
    )
    assert item.load_image().shape == (10, 6, 3) == load_image(path).shape


def test_label_png_of_a_big_endian_array(tmp_path: Path) -> None:
    from dynaguide.io import read_label_png, save_label_png

    lab = np.arange(12, dtype=">u2").reshape(3, 4) * 1000
    save_label_png(tmp_path / "l.png", lab)
    np.testing.assert_array_equal(read_label_png(tmp_path / "l.png"), lab.astype(np.int64))
