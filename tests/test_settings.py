"""Guides built once per call / run / worker, seeds (int, numpy, Generator), the k-means
guide's seed, and the settings record every result JSON carries."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

import dynaguide
from dynaguide import cli
from dynaguide.guidance import base as registry
from dynaguide.guidance.classic import KMeansGuide
from dynaguide.settings import as_seed, resolve_guidance

FAST = {"preset": "dfc", "max_iter": 2, "device": "cpu"}


class _Counting:
    """A guide whose factory counts how often it is built."""

    builds = 0
    name = "counting"

    def __init__(self, seed: int = 0, bands: int = 2) -> None:
        type(self).builds += 1
        self.seed, self.bands = seed, bands

    def __call__(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        return (np.arange(w)[None, :] * self.bands // w).repeat(h, 0).astype(np.int32)


@pytest.fixture
def counting() -> Iterator[type[_Counting]]:
    _Counting.builds = 0
    dynaguide.register_guide("counting", _Counting, overwrite=True)
    yield _Counting
    registry._REGISTRY.pop("counting", None)


def _images(n: int = 3) -> list[np.ndarray]:
    return [np.random.default_rng(s).integers(0, 256, (12, 16, 3), np.uint8) for s in range(n)]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_segment_batch_builds_a_named_guide_once(counting: Any, batch_size: int) -> None:
    segs = dynaguide.segment_batch(
        _images(), guidance="counting", batch_size=batch_size, seed=7, **FAST
    )
    assert counting.builds == 1
    assert all(s.extra["guide"] == "counting" for s in segs)
    assert segs[0].extra["settings"]["guide_options"] == {"seed": 7}  # the call's seed


def test_cli_run_builds_a_named_guide_once(counting: Any, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for i, img in enumerate(_images()):
        Image.fromarray(img).save(folder / f"{i}.png")
    argv = ["segment", str(folder), str(tmp_path / "out"), "--guidance", "counting", "--quiet"]
    argv += ["--preset", "dfc", "--max-iter", "2", "--device", "cpu", "--guide-option", "bands=3"]
    assert cli.main(argv) == 0
    assert counting.builds == 1
    meta = json.loads((tmp_path / "out" / "0.json").read_text())
    assert meta["extra"]["settings"]["guide_options"] == {"bands": 3, "seed": 0}


def test_ray_worker_builds_the_guide_once_with_the_presets_options(tmp_path: Path) -> None:
    from dynaguide.distributed.store import OutputStore
    from dynaguide.distributed.worker import SegmentWorker

    worker = SegmentWorker(OutputStore(str(tmp_path)), "files", None, {"seed": 3})
    guide = worker.guidance  # the default preset's felzenszwalb with the preset's options
    assert guide.name == "felzenszwalb"
    assert guide.options == dynaguide.get_preset("felzenszwalb-merge").default_guidance_options


def test_a_guide_object_is_reused_across_calls(counting: Any) -> None:
    guide = dynaguide.get_guide("counting")
    for img in _images():
        seg = dynaguide.segment(img, guidance=guide, **FAST)
        assert seg.extra["guide"] == "counting"
    assert counting.builds == 1


def test_kmeans_seed_follows_the_call_seed() -> None:
    cfg = dynaguide.get_preset("dynaguide")
    assert resolve_guidance("kmeans", None, cfg, 11).guidance.seed == 11
    assert resolve_guidance("default", None, cfg, 5).guidance.seed == 5  # the preset's kmeans
    assert resolve_guidance("kmeans", {"seed": 2}, cfg, 11).guidance.seed == 2  # options win
    img = np.random.default_rng(0).integers(0, 256, (30, 40, 3), np.uint8)
    seg = dynaguide.segment(img, preset="dynaguide", max_iter=0, seed=4, device="cpu")
    expected = KMeansGuide(seed=4)(img)
    np.testing.assert_array_equal(seg.guide_labels, expected)
    assert seg.extra["settings"]["guide_options"] == {"seed": 4}


def test_seeds_accept_ints_numpy_integers_and_generators() -> None:
    assert as_seed(3) == 3 and as_seed(np.uint32(9)) == 9 and as_seed(np.int64(2**32 - 1))
    drawn = [as_seed(np.random.default_rng(123)) for _ in range(2)]
    assert drawn[0] == drawn[1]  # the same generator state gives the same seed
    gen = np.random.default_rng(123)
    assert as_seed(gen) == drawn[0] and as_seed(gen) != drawn[0]  # and it advances
    for bad, kind in ((1.5, TypeError), (True, TypeError), ("3", TypeError), (-1, ValueError),
                      (2**32, ValueError)):  # fmt: skip
        with pytest.raises(kind, match="seed"):
            as_seed(bad)
    img = _images(1)[0]
    a = dynaguide.segment(img, seed=np.random.default_rng(5), **FAST)
    b = dynaguide.segment(img, seed=as_seed(np.random.default_rng(5)), **FAST)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert a.extra["seed"] == b.extra["seed"] == a.extra["settings"]["seed"]
    with pytest.raises(TypeError, match="seed"):
        dynaguide.segment_batch([img], seed=0.5, **FAST)


def test_the_settings_record_is_complete(tmp_path: Path) -> None:
    img = _images(1)[0]
    seg = dynaguide.segment(img, preset="dynaguide", max_iter=3, n_channels=16, seed=2,
                            guidance="slic", guidance_options={"n_segments": 9}, device="cpu")  # fmt: skip
    rec = seg.extra["settings"]
    assert rec["preset"] == "dynaguide"
    assert rec["overrides"] == {"max_iter": 3, "n_channels": 16}
    assert (rec["guide"], rec["guide_options"], rec["seed"]) == ("slic", {"n_segments": 9}, 2)
    assert rec["device"] == "cpu" and rec["versions"]["dynaguide"] == dynaguide.__version__
    assert {"torch", "numpy", "python", "scikit-image"} <= set(rec["versions"])
    saved = json.loads(seg.save(tmp_path)["json"].read_text())
    assert saved["extra"]["settings"] == json.loads(json.dumps(rec))
    custom = dynaguide.get_preset("dfc").replace(name="mine", mu=2.0)
    rec = dynaguide.segment(img, preset=custom, max_iter=1, device="cpu").extra["settings"]
    assert rec["preset"] == "mine" and rec["overrides"]["mu"] == 2.0


def test_segment_batch_hands_failures_to_a_callable(tmp_path: Path) -> None:
    errors: dict[int, BaseException] = {}
    good = _images(1)[0]
    segs = dynaguide.segment_batch(
        [good, tmp_path / "missing.png", good], on_error=errors.__setitem__, **FAST
    )
    assert segs[1] is None and segs[0] is not None and segs[2] is not None
    assert list(errors) == [1] and "missing.png" in str(errors[1])
    with pytest.raises(ValueError, match="on_error must be"):
        dynaguide.segment_batch([good], on_error="ignore", **FAST)


def test_guide_options_are_recorded_as_plain_json() -> None:
    from dynaguide.settings import ResolvedGuide, settings_record

    opts = {"k": np.int64(3), "path": Path("/m/x.onnx"), "fn": len, "arr": np.zeros(4), "t": (1, 2)}
    rec = settings_record("dfc", dynaguide.get_preset("dfc"), ResolvedGuide(None, "g", opts), 0)
    assert rec["guide_options"]["k"] == 3 and rec["guide_options"]["path"] == "/m/x.onnx"
    assert rec["guide_options"]["t"] == [1, 2] and "len" in rec["guide_options"]["fn"]
    assert isinstance(rec["guide_options"]["arr"], str)
    json.dumps(rec)  # JSON-able as it is
