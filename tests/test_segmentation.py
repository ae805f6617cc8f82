"""dynaguide.segmentation: validation, overlay, palette, to_dict and save."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import dynaguide.segmentation as segmod
from dynaguide.io import read_label_png
from dynaguide.segmentation import Segmentation, label_colors


@dataclasses.dataclass(frozen=True)
class _Config:
    name: str = "test"
    max_iter: int = 5
    k: tuple[int, int] = (3, 4)


def _make(h: int = 12, w: int = 16, k: int = 3, **changes: Any) -> Segmentation:
    rng = np.random.default_rng(0)
    labels = np.zeros((h, w), np.int32)
    for i in range(1, k):  # vertical stripes 0..k-1
        labels[:, i * w // k :] = i
    fields: dict[str, Any] = {
        "labels": labels,
        "n_labels": k,
        "n_iter": 4,
        "history": {"loss": [1.0, 0.5, 0.25, 0.125], "n_labels": [9, 6, 4, 3]},
        "guide_labels": None,
        "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "config": _Config(),
        "seconds": 0.5,
        "stop_reason": "max_iter (4)",
        "name": "photos/cat.jpg",
        "device": "cpu",
    }
    fields.update(changes)
    return Segmentation(**fields)


# --------------------------------------------------------------------------- validation


def test_valid_and_int32_conversion() -> None:
    seg = _make(labels=np.repeat(np.arange(3, dtype=np.int64), 4)[None].repeat(5, 0), h=5, w=12)
    assert seg.labels.dtype == np.int32
    assert seg.shape == (5, 12)


@pytest.mark.parametrize(
    ("changes", "exc", "pattern"),
    [
        ({"labels": np.zeros((12, 16, 1), np.int32)}, ValueError, "2-D"),
        ({"labels": [[0, 1]]}, ValueError, "2-D numpy array"),
        ({"labels": np.zeros((12, 16), np.float32)}, TypeError, "integer dtype"),
        ({"labels": np.full((12, 16), 3, np.int32)}, ValueError, r"\[0, 2\].*\[3, 3\]"),
        ({"labels": np.full((12, 16), -1, np.int32)}, ValueError, r"found range \[-1, -1\]"),
        ({"labels": np.zeros((12, 15), np.int32)}, ValueError, "does not match"),
        ({"n_labels": 0}, ValueError, "n_labels"),
        ({"n_labels": True}, ValueError, "n_labels"),
        ({"image": np.zeros((12, 16, 3), np.float32)}, ValueError, "uint8"),
        ({"image": np.zeros((12, 16), np.uint8)}, ValueError, r"\(H, W, 3\)"),
        ({"guide_labels": np.zeros((3, 3), np.int32)}, ValueError, "guide_labels"),
        ({"guide_labels": np.zeros((12, 16), np.float64)}, TypeError, "guide_labels"),
        ({"n_iter": -1}, ValueError, "n_iter"),
        ({"history": [1, 2]}, TypeError, "history"),
        ({"seconds": float("nan")}, ValueError, "seconds"),
        ({"stop_reason": 3}, TypeError, "stop_reason"),
        ({"name": 3}, TypeError, "name"),
        ({"extra": []}, TypeError, "extra"),
    ],
)
def test_validation(changes: dict[str, Any], exc: type, pattern: str) -> None:
    with pytest.raises(exc, match=pattern) as info:
        _make(**changes)
    if "name" not in changes:
        assert "photos/cat.jpg" in str(info.value)  # the input is named


# --------------------------------------------------------------------------- palette


def test_label_colors_deterministic_and_distinct() -> None:
    np.random.seed(1)
    a = label_colors(300)
    np.random.seed(2)
    b = label_colors(300)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and a.shape == (300, 3)
    assert len(np.unique(a, axis=0)) == 300
    np.testing.assert_array_equal(label_colors(10), a[:10])  # prefix-stable
    assert label_colors(0).shape == (0, 3)
    # consecutive ids get clearly different colours
    diff = np.abs(a[1:].astype(int) - a[:-1].astype(int)).sum(1)
    assert diff.min() > 60
    with pytest.raises(ValueError, match="n must be"):
        label_colors(-1)


def test_label_colors_match_colorsys() -> None:
    import colorsys

    c = label_colors(7)
    for k in range(7):
        h = (k * 0.618033988749895) % 1.0
        s = (0.85, 0.55)[k % 2]
        v = (0.95, 0.78, 0.62)[k % 3]
        expected = np.rint(np.array(colorsys.hsv_to_rgb(h, s, v)) * 255).astype(int)
        np.testing.assert_array_equal(c[k], expected)


# --------------------------------------------------------------------------- overlay


def test_overlay_extremes() -> None:
    seg = _make()
    plain = seg.overlay(alpha=0.0, boundaries=False)
    np.testing.assert_array_equal(plain, seg.image)
    solid = seg.overlay(alpha=1.0, boundaries=False)
    np.testing.assert_array_equal(solid, label_colors(3)[seg.labels])
    half = seg.overlay(alpha=0.5, boundaries=False)
    expected = np.rint(0.5 * seg.image + 0.5 * label_colors(3)[seg.labels].astype(float))
    assert np.abs(half.astype(int) - expected.astype(int)).max() <= 1


def test_overlay_boundaries() -> None:
    seg = _make(h=8, w=9, k=3)  # stripes at columns 3 and 6
    out = seg.overlay(boundary_color=(1, 2, 3))
    assert out.dtype == np.uint8 and out.shape == (8, 9, 3)
    is_b = np.all(out == [1, 2, 3], axis=-1)
    np.testing.assert_array_equal(np.where(is_b.any(0))[0], [2, 3, 5, 6])
    assert is_b[:, [2, 3, 5, 6]].all()
    single = _make(k=1).overlay(boundary_color=(1, 2, 3))
    assert not np.all(single == [1, 2, 3], axis=-1).any()


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "a", float("nan")])
def test_overlay_bad_alpha(alpha: Any) -> None:
    with pytest.raises(ValueError, match="alpha"):
        _make().overlay(alpha=alpha)


def test_overlay_bad_boundary_color() -> None:
    with pytest.raises(ValueError, match="boundary_color"):
        _make().overlay(boundary_color=(0, 0, 300))
    with pytest.raises(ValueError, match="boundary_color"):
        _make().overlay(boundary_color=(0, 0))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- to_dict / save


def test_to_dict_is_json_and_complete() -> None:
    seg = _make(history={"loss": [float("nan"), np.float32(0.5)], "n_labels": [np.int64(3), 3]})
    d = seg.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = json.loads(text)
    assert back["n_labels"] == 3
    assert back["n_iter"] == 4
    assert back["image_shape"] == [12, 16, 3]
    assert back["history"] == {"loss": [None, 0.5], "n_labels": [3, 3]}
    assert back["config"] == {"name": "test", "max_iter": 5, "k": [3, 4]}
    assert back["stop_reason"] == "max_iter (4)"
    assert back["device"] == "cpu"
    assert back["guided"] is False
    assert isinstance(back["dynaguide_version"], str)


def test_to_dict_prefers_config_to_dict() -> None:
    class Cfg:
        def to_dict(self) -> dict[str, Any]:
            return {"from": "to_dict"}

    assert _make(config=Cfg()).to_dict()["config"] == {"from": "to_dict"}
    assert _make(config={"x": 1}).to_dict()["config"] == {"x": 1}


def test_save_round_trip(tmp_path: Path) -> None:
    seg = _make(guide_labels=np.zeros((12, 16), np.int32), extra={"seed": np.int64(3)})
    paths = seg.save(tmp_path / "out")
    assert paths == {
        "labels": tmp_path / "out" / "cat.labels.png",
        "overlay": tmp_path / "out" / "cat.overlay.png",
        "json": tmp_path / "out" / "cat.json",
    }
    np.testing.assert_array_equal(read_label_png(paths["labels"]), seg.labels)
    with Image.open(paths["labels"]) as im:
        assert im.mode.startswith("I;16")
    np.testing.assert_array_equal(np.asarray(Image.open(paths["overlay"])), seg.overlay())
    data = json.loads(paths["json"].read_text())
    assert data.pop("formats") == ["labels", "overlay"]  # what save() wrote
    assert data == json.loads(json.dumps(seg.to_dict()))
    assert data["guided"] is True and data["extra"] == {"seed": 3}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        p.name for p in paths.values()
    )  # no temporary files left


def test_save_writes_json_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = segmod.write_atomic

    def fail(path: Any, data: bytes) -> Any:
        if str(path).endswith(".json"):
            raise OSError("no space left")
        return real(path, data)

    monkeypatch.setattr(segmod, "write_atomic", fail)
    seg = _make()
    with pytest.raises(OSError, match="no space"):
        seg.save(tmp_path, "x")
    assert (tmp_path / "x.labels.png").exists() and (tmp_path / "x.overlay.png").exists()
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize(
    ("name", "stem"),
    [("photos/cat.jpg", "cat"), (None, "segmentation"), ("astronaut", "astronaut"), ("a.b", "a.b")],
)
def test_default_stem(name: str | None, stem: str) -> None:
    assert _make(name=name).default_stem() == stem


@pytest.mark.parametrize("stem", ["", "a/b", "..", "a\\b"])
def test_save_bad_stem(tmp_path: Path, stem: str) -> None:
    with pytest.raises(ValueError, match="stem"):
        _make().save(tmp_path, stem)


def test_save_into_a_file_fails(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        _make().save(f)


def test_save_too_many_labels_for_png(tmp_path: Path) -> None:
    labels = np.arange(70000, dtype=np.int32).reshape(350, 200)
    seg = _make(
        labels=labels, n_labels=70000, image=np.zeros((350, 200, 3), np.uint8), h=350, w=200
    )
    with pytest.raises(ValueError, match="16-bit"):
        seg.save(tmp_path, "many")
