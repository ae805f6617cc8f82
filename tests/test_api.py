"""segment / segment_batch end to end on small inputs, and their input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import dynaguide
from dynaguide.pipeline import refinement_size


def _image(h: int = 20, w: int = 26) -> np.ndarray:
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (220, 40, 40)
    img[:, w // 2 :] = (40, 40, 220)
    return img


def test_segment_basic_contract():
    seg = dynaguide.segment(_image(), max_iter=6, min_labels=0)
    assert seg.labels.shape == (20, 26) and seg.labels.dtype == np.int32
    k = seg.n_labels
    assert sorted(np.unique(seg.labels).tolist()) == list(range(k))
    assert seg.n_iter == 6 == len(seg.history["loss"]) == len(seg.history["n_labels"])
    assert seg.guide_labels is not None and seg.guide_labels.shape == (
        20,
        26,
    )  # default guide: kmeans
    assert seg.overlay().shape == (20, 26, 3)


@pytest.mark.parametrize(
    "preset", ["dfc", "dynaseg-scf", "dynaseg-fsf", "dynaguide", "dynaguide-reference"]
)
def test_every_preset_runs(preset):
    seg = dynaguide.segment(_image(), preset=preset, max_iter=3, silhouette_k=(3, 4))
    assert seg.config.name == preset and seg.labels.shape == (20, 26)


@pytest.mark.parametrize("guidance", [None, "none", "felzenszwalb", "slic", "kmeans"])
def test_guidance_forms(guidance):
    seg = dynaguide.segment(_image(), guidance=guidance, max_iter=3)
    assert (seg.guide_labels is None) == (guidance in (None, "none"))


def test_guidance_array_callable_and_errors():
    img = _image()
    arr = np.zeros((20, 26), np.int64)
    arr[10:] = 1
    assert np.array_equal(dynaguide.segment(img, guidance=arr, max_iter=2).guide_labels, arr)
    seg = dynaguide.segment(img, guidance=lambda im: (im[..., 0] > 100).astype(int), max_iter=2)
    assert seg.guide_labels.max() == 1
    seg_t = dynaguide.segment(img, guidance=torch.from_numpy(arr), max_iter=2)
    assert np.array_equal(seg_t.guide_labels, arr)
    with pytest.raises(ValueError, match="shape"):
        dynaguide.segment(img, guidance=np.zeros((5, 5), int), max_iter=2)
    with pytest.raises(ValueError, match="shape"):
        dynaguide.segment(img, guidance=lambda im: np.zeros((3, 3), int), max_iter=2)
    with pytest.raises(TypeError, match="non-integer"):
        dynaguide.segment(img, guidance=np.full((20, 26), 0.5), max_iter=2)
    with pytest.raises(KeyError, match="registered guides"):
        dynaguide.segment(img, guidance="segformerr", max_iter=2)
    with pytest.raises(TypeError, match="guidance"):
        dynaguide.segment(img, guidance=3.5, max_iter=2)


def test_scale_and_downscale_policy():
    img = np.repeat(np.repeat(_image(), 4, axis=0), 4, axis=1)  # 80 x 104
    seg = dynaguide.segment(img, scale=0.25, max_iter=2)
    assert seg.labels.shape == (80, 104)
    assert seg.extra["refine_size"] == [20, 26]
    seg = dynaguide.segment(img, max_pixels=1000, max_iter=2)
    h, w = seg.extra["refine_size"]
    assert h * w <= 1000 and seg.labels.shape == (80, 104)
    assert refinement_size(2000, 2000, scale=None, max_pixels=4_000_000) == (2000, 2000)
    assert (
        refinement_size(5000, 5000, scale=None, max_pixels=4_000_000)[0]
        * refinement_size(5000, 5000, scale=None, max_pixels=4_000_000)[1]
        <= 4_000_000
    )
    with pytest.raises(ValueError, match="scale"):
        dynaguide.segment(img, scale=1.5)


def test_huge_image_without_limit_gives_memory_error(monkeypatch):
    monkeypatch.setattr("dynaguide.batch_memory.free_memory", lambda device: 8 * 2**30)
    img = np.zeros((3000, 3000, 3), np.uint8)  # 9 MP: ~57 GB of activations at 100 channels
    with pytest.raises(MemoryError, match="scale="):
        dynaguide.segment(img, max_pixels=None, max_iter=1)


def test_bad_arguments():
    img = _image()
    with pytest.raises(ValueError, match="device"):
        dynaguide.segment(img, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            dynaguide.segment(img, device="cuda")
    with pytest.raises(KeyError, match="known presets"):
        dynaguide.segment(img, preset="nope")
    with pytest.raises(TypeError, match="unknown RefineConfig field"):
        dynaguide.segment(img, max_iterations=3)
    with pytest.raises(TypeError, match="seed"):
        dynaguide.segment(img, seed=1.5)
    with pytest.raises(ValueError):
        dynaguide.segment(np.zeros((1, 1, 3), np.uint8))
    with pytest.raises(ValueError):
        dynaguide.segment(np.full((8, 8, 3), np.nan, np.float32))


def test_deterministic_cpu():
    a = dynaguide.segment(_image(), max_iter=5, seed=7)
    b = dynaguide.segment(_image(), max_iter=5, seed=7)
    assert np.array_equal(a.labels, b.labels) and a.history == b.history


def test_segment_batch_skips_bad_inputs(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.warns(UserWarning, match="broken.jpg"):
        out = dynaguide.segment_batch(
            [_image(), str(bad), _image(16, 16)], on_error="skip", max_iter=2
        )
    assert out[1] is None and out[0] is not None and out[2].labels.shape == (16, 16)
    with pytest.raises(ValueError):
        dynaguide.segment_batch([str(bad)], max_iter=2)
    with pytest.raises(ValueError, match="on_error"):
        dynaguide.segment_batch([], on_error="ignore")
