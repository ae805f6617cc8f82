"""dynaguide.io: image loading policy, bad inputs, file readers and atomic writers."""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from dynaguide import io as dio
from dynaguide.io import (
    ImageReadError,
    list_images,
    load_image,
    read_label_png,
    save_json,
    save_label_png,
    save_rgb_png,
    write_atomic,
)

RNG = np.random.default_rng(1234)


def _rgb(h: int = 6, w: int = 7) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _assert_canonical(out: np.ndarray, shape: tuple[int, int]) -> None:
    assert out.dtype == np.uint8
    assert out.shape == (*shape, 3)
    assert out.flags.c_contiguous


# --------------------------------------------------------------------------- arrays


def test_rgb_uint8_is_copied_not_viewed() -> None:
    a = _rgb()
    out = load_image(a)
    _assert_canonical(out, (6, 7))
    np.testing.assert_array_equal(out, a)
    out[0, 0] = 7
    assert not np.shares_memory(out, a)


def test_non_contiguous_input_gives_contiguous_output() -> None:
    a = _rgb(10, 12)
    strided = a[::2, ::3]
    fortran = np.asfortranarray(a)
    np.testing.assert_array_equal(load_image(strided), strided)
    out = load_image(fortran)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, a)


@pytest.mark.parametrize("shape", [(5, 4), (5, 4, 1)])
def test_grayscale_is_replicated(shape: tuple[int, ...]) -> None:
    g = RNG.integers(0, 256, size=shape, dtype=np.uint8)
    out = load_image(g)
    _assert_canonical(out, (5, 4))
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], g.reshape(5, 4))


def test_rgba_alpha_is_dropped() -> None:
    a = RNG.integers(0, 256, size=(4, 5, 4), dtype=np.uint8)
    np.testing.assert_array_equal(load_image(a), a[:, :, :3])


@given(hnp.arrays(np.uint16, (3, 2, 3), elements=st.integers(0, 65535)))
@settings(max_examples=50, deadline=None)
def test_uint16_scaled_by_257_with_rounding(a: np.ndarray) -> None:
    expected = np.rint(a.astype(np.float64) / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(load_image(a), expected)


def test_uint16_boundary_values() -> None:
    a = np.array([[0, 128, 129, 257], [385, 386, 65406, 65407]], dtype=np.uint16)
    out = load_image(a)[:, :, 0]
    np.testing.assert_array_equal(out, [[0, 0, 1, 1], [1, 2, 254, 255]])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_float_in_unit_range(dtype: type) -> None:
    a = np.array([[0.0, 0.5], [1.0, 0.2]], dtype=dtype)
    out = load_image(a)[:, :, 0]
    expected = np.rint(a.astype(np.float64) * 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)


@given(hnp.arrays(np.float64, (2, 3, 3), elements=st.floats(0.0, 1.0)))
@settings(max_examples=50, deadline=None)
def test_float_maps_to_rint_255(a: np.ndarray) -> None:
    np.testing.assert_array_equal(load_image(a), np.rint(a * 255).astype(np.uint8))


@pytest.mark.parametrize(
    ("value", "pattern"),
    [(1.5, r"found range \[0, 1\.5\]"), (-0.25, r"found range \[-0\.25, 0\.5\]")],
)
def test_float_out_of_range_names_input_and_range(value: float, pattern: str) -> None:
    a = np.full((3, 3), 0.5, np.float32)
    a[1, 1] = value
    if value > 1:
        a[0, 0] = 0.0
    with pytest.raises(ValueError, match=pattern) as info:
        load_image(a, name="my-frame")
    assert "my-frame" in str(info.value)
    # without a name, the description of the array is used
    with pytest.raises(ValueError, match=r"array of shape \(3, 3\) and dtype float32"):
        load_image(a)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_rejected(bad: float) -> None:
    a = np.full((4, 4, 3), 0.5, np.float64)
    a[2, 1, 0] = bad
    with pytest.raises(ValueError, match=r"NaN|infinite") as info:
        load_image(a, name="frame-7")
    assert "frame-7" in str(info.value)
    counts = "1 NaN and 0 infinite" if np.isnan(bad) else "0 NaN and 1 infinite"
    assert counts in str(info.value)


@pytest.mark.parametrize(
    "shape",
    [(1, 1), (1, 1, 3), (1, 8, 3), (8, 1), (0, 5), (5, 0, 3), (0, 0)],
)
def test_too_small_or_empty_rejected(shape: tuple[int, ...]) -> None:
    a = np.zeros(shape, np.uint8)
    with pytest.raises(ValueError, match="at least 2 pixels") as info:
        load_image(a)
    msg = str(info.value)
    assert "BatchNorm" in msg
    assert f"shape {shape}" in msg
    if 0 in shape:
        assert "empty" in msg


@pytest.mark.parametrize("shape", [(7,), (2, 3, 3, 3), (4, 4, 2), (4, 4, 5), ()])
def test_bad_ndim_or_channels_rejected(shape: tuple[int, ...]) -> None:
    a = np.zeros(shape, np.uint8)
    with pytest.raises(ValueError, match="expected") as info:
        load_image(a, name="bad-shape-input")
    assert "bad-shape-input" in str(info.value)
    assert str(tuple(shape)) in str(info.value)


def test_channels_first_array_hint() -> None:
    with pytest.raises(ValueError, match="moveaxis"):
        load_image(np.zeros((3, 10, 12), np.uint8))


@pytest.mark.parametrize("dtype", [np.bool_, np.int8, np.int32, np.int64, np.uint32, np.complex64])
def test_unsupported_dtypes_rejected(dtype: type) -> None:
    a = np.zeros((4, 4, 3), dtype)
    with pytest.raises(TypeError, match="unsupported dtype") as info:
        load_image(a)
    assert "array of shape (4, 4, 3)" in str(info.value)


def test_unsupported_type_rejected() -> None:
    with pytest.raises(TypeError, match=r"unsupported image type builtins\.list"):
        load_image([[1, 2], [3, 4]])
    with pytest.raises(TypeError, match=r"^thing: unsupported image type"):
        load_image(3.5, name="thing")


@given(
    hnp.arrays(
        st.sampled_from([np.uint8, np.uint16, np.float32, np.float64]),
        hnp.array_shapes(min_dims=2, max_dims=3, min_side=2, max_side=6),
        elements=st.integers(0, 1),
    )
)
@settings(max_examples=60, deadline=None)
def test_any_valid_shape_or_clear_error(a: np.ndarray) -> None:
    """Every 2-/3-dim array either converts to canonical form or raises ValueError."""
    if a.ndim == 3 and a.shape[2] not in (1, 3, 4):
        with pytest.raises(ValueError, match="channels"):
            load_image(a)
        return
    out = load_image(a)
    _assert_canonical(out, a.shape[:2])


# --------------------------------------------------------------------------- tensors


def test_tensor_chw_and_hwc() -> None:
    hwc = _rgb(5, 9)
    t_hwc = torch.from_numpy(hwc)
    t_chw = t_hwc.permute(2, 0, 1).contiguous()
    np.testing.assert_array_equal(load_image(t_hwc), hwc)
    np.testing.assert_array_equal(load_image(t_chw), hwc)
    np.testing.assert_array_equal(load_image(t_chw[None]), hwc)  # batch of one
    gray = torch.randint(0, 256, (1, 5, 9), dtype=torch.uint8)
    np.testing.assert_array_equal(load_image(gray)[:, :, 2], gray[0].numpy())


def test_tensor_ambiguous_shape_is_channels_last() -> None:
    """(3, 5, 3): first and last dims both look like channels -> read as (H, W, C)."""
    t = torch.randint(0, 256, (3, 5, 3), dtype=torch.uint8)
    np.testing.assert_array_equal(load_image(t), t.numpy())


def test_tensor_float_grad_and_bfloat16() -> None:
    t = torch.rand(3, 4, 6, requires_grad=True)
    out = load_image(t)
    expected = np.rint(t.detach().permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    np.testing.assert_array_equal(out, expected)
    b = torch.full((4, 6, 3), 0.5, dtype=torch.bfloat16)
    assert load_image(b)[0, 0, 0] == 128


def test_tensor_bad_inputs_named() -> None:
    with pytest.raises(TypeError, match=r"tensor of shape \(4, 4, 3\)"):
        load_image(torch.zeros(4, 4, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"unsupported dtype torch\.bool"):
        load_image(torch.zeros(4, 4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN") as info:
        load_image(torch.full((4, 4, 3), float("nan")), name="cam0")
    assert "cam0" in str(info.value)
    with pytest.raises(ValueError, match="at least 2 pixels"):
        load_image(torch.zeros(3, 1, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tensor_on_cuda() -> None:
    t = torch.rand(3, 8, 8, device="cuda")
    assert load_image(t).shape == (8, 8, 3)


# --------------------------------------------------------------------------- PIL images


def test_pil_modes() -> None:
    rgb = _rgb(6, 5)
    im = Image.fromarray(rgb)
    np.testing.assert_array_equal(load_image(im), rgb)
    np.testing.assert_array_equal(load_image(im.convert("RGBA")), rgb)
    gray = load_image(im.convert("L"))
    np.testing.assert_array_equal(gray[:, :, 0], np.asarray(im.convert("L")))
    la = load_image(im.convert("LA"))
    np.testing.assert_array_equal(la[:, :, 1], np.asarray(im.convert("L")))
    binary = load_image(im.convert("1"))
    assert set(np.unique(binary)) <= {0, 255}
    pal = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    np.testing.assert_array_equal(load_image(pal), np.asarray(pal.convert("RGB")))
    cmyk = im.convert("CMYK")
    np.testing.assert_array_equal(load_image(cmyk), np.asarray(cmyk.convert("RGB")))


def test_pil_16bit_int_and_float_modes() -> None:
    a16 = np.array([[0, 65535], [257, 1000]], dtype=np.uint16)
    out = load_image(Image.fromarray(a16))  # mode I;16
    np.testing.assert_array_equal(out[:, :, 0], [[0, 255], [1, 4]])
    i_mode = Image.fromarray(a16.astype(np.int32))
    assert i_mode.mode == "I"
    np.testing.assert_array_equal(load_image(i_mode)[:, :, 0], [[0, 255], [1, 4]])
    with pytest.raises(ValueError, match=r"values in \[-5, 70000\]") as info:
        load_image(Image.fromarray(np.array([[-5, 70000], [0, 0]], np.int32)))
    assert "PIL image (mode I, size 2x2)" in str(info.value)
    f_ok = Image.fromarray(np.array([[0.0, 1.0], [0.5, 0.25]], np.float32))
    np.testing.assert_array_equal(load_image(f_ok)[:, :, 0], [[0, 255], [128, 64]])
    with pytest.raises(ValueError, match=r"found range \[0, 3\]"):
        load_image(Image.fromarray(np.array([[0.0, 3.0], [0.5, 0.25]], np.float32)))


# --------------------------------------------------------------------------- files


def _save(tmp_path: Path, name: str, im: Image.Image, **kw: object) -> Path:
    p = tmp_path / name
    im.save(p, **kw)
    return p


def test_png_round_trip_and_path_types(tmp_path: Path) -> None:
    rgb = _rgb(9, 11)
    p = _save(tmp_path, "a.png", Image.fromarray(rgb))
    np.testing.assert_array_equal(load_image(p), rgb)
    np.testing.assert_array_equal(load_image(str(p)), rgb)


def test_16bit_png_file(tmp_path: Path) -> None:
    a16 = np.array([[0, 65535, 129], [128, 300, 40000]], dtype=np.uint16)
    p = _save(tmp_path, "g16.png", Image.fromarray(a16))
    with Image.open(p) as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    expected = np.rint(a16 / 257).astype(np.uint8)
    np.testing.assert_array_equal(load_image(p)[:, :, 0], expected)


def test_rgba_palette_gray_files(tmp_path: Path) -> None:
    rgb = _rgb(5, 6)
    rgba = np.dstack([rgb, np.full((5, 6), 10, np.uint8)])
    np.testing.assert_array_equal(
        load_image(_save(tmp_path, "a.png", Image.fromarray(rgba, "RGBA"))), rgb
    )
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    p = _save(tmp_path, "p.png", pal)
    np.testing.assert_array_equal(load_image(p), np.asarray(pal.convert("RGB")))
    g = _save(tmp_path, "g.bmp", Image.fromarray(rgb[:, :, 0]))
    np.testing.assert_array_equal(load_image(g)[:, :, 1], rgb[:, :, 0])


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    rgb = np.zeros((4, 10, 3), np.uint8)
    rgb[:, :5] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    p = _save(tmp_path, "rot.jpg", Image.fromarray(rgb), exif=exif, quality=95)
    out = load_image(p)
    assert out.shape == (10, 4, 3)
    assert out[1, 2].mean() > 200 and out[8, 2].mean() < 50  # white half now on top


def test_multiframe_gif_uses_first_frame(tmp_path: Path) -> None:
    f1 = Image.new("RGB", (4, 4), (255, 0, 0))
    f2 = Image.new("RGB", (4, 4), (0, 0, 255))
    p = tmp_path / "anim.gif"
    f1.save(p, save_all=True, append_images=[f2])
    out = load_image(p)
    assert out.shape == (4, 4, 3)
    assert out[0, 0, 0] > 200 and out[0, 0, 2] < 50


def test_corrupt_file(tmp_path: Path) -> None:
    p = tmp_path / "corrupt.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(RNG.integers(0, 256, 200, dtype=np.uint8)))
    with pytest.raises(ImageReadError) as info:
        load_image(p)
    assert str(p) in str(info.value)
    assert isinstance(info.value, ValueError)


def test_truncated_jpeg(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    p = tmp_path / "truncated.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError, match="truncated") as info:
        load_image(p)
    assert str(p) in str(info.value)


def test_lazy_truncated_pil_image(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    p = tmp_path / "lazy.jpg"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with Image.open(p) as im, pytest.raises(ImageReadError, match=r"PIL image \(mode RGB"):
        load_image(im)


def test_truncated_png(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    p = tmp_path / "truncated.png"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageReadError) as info:
        load_image(p)
    assert str(p) in str(info.value)


def test_non_image_and_missing_and_folder(tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    with pytest.raises(ImageReadError, match="cannot identify") as info:
        load_image(text)
    assert str(text) in str(info.value)
    with pytest.raises(ImageReadError, match="custom-name"):
        load_image(text, name="custom-name")
    missing = tmp_path / "missing.png"
    with pytest.raises(FileNotFoundError, match=r"missing\.png"):
        load_image(missing)
    with pytest.raises(ImageReadError, match="is a directory"):
        load_image(tmp_path)


def test_too_small_file_named(tmp_path: Path) -> None:
    p = _save(tmp_path, "dot.png", Image.new("RGB", (1, 1)))
    with pytest.raises(ValueError, match="BatchNorm") as info:
        load_image(p)
    assert str(p) in str(info.value)


def test_decompression_bomb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _save(tmp_path, "big.png", Image.new("RGB", (20, 20)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 400 px > 2 * 50: PIL refuses
    with pytest.raises(ImageReadError, match="decompression bomb") as info:
        load_image(p)
    assert str(p) in str(info.value)
    assert "MAX_IMAGE_PIXELS" in str(info.value)


# --------------------------------------------------------------------------- list_images


def test_list_images(tmp_path: Path) -> None:
    for name in ("b.png", "a.JPG", "c.jpeg", "d.tif", "e.webp", "f.bmp", "g.TIFF", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "z.png").write_bytes(b"x")
    found = [p.name for p in list_images(tmp_path)]
    assert found == ["a.JPG", "b.png", "c.jpeg", "d.tif", "e.webp", "f.bmp", "g.TIFF"]
    deep = list_images(tmp_path, recursive=True)
    assert sub / "z.png" in deep
    assert deep == sorted(deep)


def test_list_images_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match=r"file\.png"):
        list_images(f)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files") as info:
        list_images(empty)
    assert str(empty) in str(info.value)


# --------------------------------------------------------------------------- writers


def test_write_atomic(tmp_path: Path) -> None:
    target = tmp_path / "new" / "deeper" / "out.bin"
    assert write_atomic(target, b"first") == target
    assert target.read_bytes() == b"first"
    write_atomic(target, bytearray(b"second"))
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]  # no temp left
    umask = dio._umask()
    assert (target.stat().st_mode & 0o777) == (0o666 & ~umask)


def test_write_atomic_failure_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def boom(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(dio.os, "replace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_write_atomic_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="bytes-like"):
        write_atomic(tmp_path / "x", "text")  # type: ignore[arg-type]
    with pytest.raises(IsADirectoryError):
        write_atomic(tmp_path, b"x")


@given(
    hnp.arrays(
        st.sampled_from([np.int32, np.int64, np.uint16, np.uint8]),
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=9),
        elements=st.integers(0, 255),
    ),
    st.integers(0, 65535),
)
@settings(max_examples=40, deadline=None)
def test_label_png_round_trip(labels: np.ndarray, top: int) -> None:
    import tempfile

    labels = labels.copy()
    labels.flat[0] = top if labels.dtype != np.uint8 else top % 256
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "l.png"
        save_label_png(p, labels)
        back = read_label_png(p)
        assert back.dtype == np.int32
        np.testing.assert_array_equal(back, labels.astype(np.int64))
        with Image.open(p) as im:
            assert im.mode.startswith("I;16")


def test_label_png_errors(tmp_path: Path) -> None:
    p = tmp_path / "l.png"
    with pytest.raises(ValueError, match=r"found range \[0, 70000\]") as info:
        save_label_png(p, np.array([[0, 70000], [1, 2]]))
    assert str(p) in str(info.value)
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        save_label_png(p, np.array([[-1, 0], [1, 2]]))
    with pytest.raises(TypeError, match="integer dtype"):
        save_label_png(p, np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        save_label_png(p, np.zeros((2, 2, 3), np.int32))
    assert not p.exists()
    rgb = _save(tmp_path, "rgb.png", Image.fromarray(_rgb()))
    with pytest.raises(ImageReadError, match="not a single-channel label map"):
        read_label_png(rgb)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    with pytest.raises(ImageReadError, match=r"bad\.png"):
        read_label_png(bad)
    with pytest.raises(FileNotFoundError):
        read_label_png(tmp_path / "missing.png")


def test_read_palette_label_png(tmp_path: Path) -> None:
    idx = RNG.integers(0, 21, (5, 6), dtype=np.uint8)
    im = Image.fromarray(idx, mode="L").convert("P")
    im.putpalette(list(range(256)) * 3)
    p = _save(tmp_path, "mask.png", im)
    np.testing.assert_array_equal(read_label_png(p), idx)


def test_save_rgb_png(tmp_path: Path) -> None:
    rgb = _rgb(7, 3)
    p = save_rgb_png(tmp_path / "o" / "x.png", rgb)
    np.testing.assert_array_equal(np.asarray(Image.open(p)), rgb)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8") as info:
        save_rgb_png(tmp_path / "y.png", rgb.astype(np.float32))
    assert "y.png" in str(info.value)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        save_rgb_png(tmp_path / "y.png", rgb[:, :, 0])


@dataclasses.dataclass
class _Cfg:
    a: int = 1
    b: tuple[int, int] = (2, 3)


def test_save_json_conversions(tmp_path: Path) -> None:
    obj = {
        "i": np.int64(3),
        "f": np.float32(0.5),
        "nan": float("nan"),
        "arr": np.arange(3, dtype=np.uint8),
        "farr": np.array([1.0, np.inf]),
        "path": Path("x/y.png"),
        "cfg": _Cfg(),
        "tup": (1, 2),
        "t": torch.tensor([1, 2]),
        "b": np.bool_(True),
        7: "int key",
    }
    p = save_json(tmp_path / "sub" / "o.json", obj)
    data = json.loads(p.read_text())
    assert data == {
        "i": 3,
        "f": 0.5,
        "nan": None,
        "arr": [0, 1, 2],
        "farr": [1.0, None],
        "path": os.path.join("x", "y.png"),
        "cfg": {"a": 1, "b": [2, 3]},
        "tup": [1, 2],
        "t": [1, 2],
        "b": True,
        "7": "int key",
    }


def test_save_json_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"\['bad'\].*object") as info:
        save_json(tmp_path / "o.json", {"bad": object()})
    assert "o.json" in str(info.value)
    assert not (tmp_path / "o.json").exists()


def test_encoded_bytes_decode_like_the_file(tmp_path: Path) -> None:
    rgb = np.random.default_rng(5).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees when shown
    path = tmp_path / "rotated.jpg"
    Image.fromarray(rgb).save(path, exif=exif, quality=95)
    from_bytes = load_image(path.read_bytes())
    assert np.array_equal(from_bytes, load_image(path))
    assert from_bytes.shape == (9, 6, 3)  # EXIF orientation applied, as for the path
    assert np.array_equal(load_image(bytearray(path.read_bytes())), from_bytes)
    with pytest.raises(ImageReadError, match=r"bad\.jpg: not a readable image"):
        load_image(b"not an image", name="bad.jpg")
    with pytest.raises(ImageReadError, match=r"image file content \(3 bytes\)"):
        load_image(b"abc")
