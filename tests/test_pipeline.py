"""The per-image pipeline: sizes, memory fit, upsampling, schedules, budgets, features."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

import dynaguide
from dynaguide.config import get_preset
from dynaguide.pipeline import refinement_size, resize_labels
from dynaguide.refine import (
    RefineStep,
    guidance_weight_at,
    guide_boundary_band,
    image_tensor,
    refine,
)


def _image(h: int = 24, w: int = 28, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (200, 30, 30)
    img[h // 2 :, w // 2 :] = (20, 180, 40)
    img[: h // 2, w // 2 :] = (30, 40, 220)
    return np.clip(img.astype(int) + rng.integers(-20, 20, size=img.shape), 0, 255).astype(np.uint8)


def test_work_pixels_caps_the_refinement_size():
    assert refinement_size(321, 481, scale=None, max_pixels=None, work_pixels=50_000) == (182, 273)
    h, w = refinement_size(1000, 1000, scale=0.5, max_pixels=100_000, work_pixels=50_000)
    assert h * w <= 50_000 and abs(h - w) <= 1
    seg = dynaguide.segment(_image(48, 56), guidance=None, max_iter=2, work_pixels=600)
    h, w = seg.extra["refine_size"]
    assert h * w <= 600 and seg.labels.shape == (48, 56)


def test_resize_labels_is_exact_for_large_ids():
    labels = np.array([[2**30, 2**30 + 1], [5, 2**24 + 1]], np.int32)
    out = resize_labels(labels, (4, 4))
    assert set(np.unique(out)) == set(np.unique(labels))
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(labels.astype(np.float64))[None, None], size=(4, 4), mode="nearest-exact"
    )[0, 0]
    np.testing.assert_array_equal(out, ref.numpy().astype(np.int64))


def test_memory_fit_shrinks_instead_of_failing(monkeypatch):
    monkeypatch.setattr("dynaguide.batch_memory.free_memory", lambda device: 64 * 2**20)
    img = np.zeros((900, 900, 3), np.uint8)
    img[:, 450:] = 255
    with pytest.warns(UserWarning, match="to fit"):
        seg = dynaguide.segment(img, preset="dfc", guidance=None, max_iter=1)
    h, w = seg.extra["refine_size"]
    assert h * w < 900 * 900 and seg.labels.shape == (900, 900)


class _FixedResponse(torch.nn.Module):
    """A stand-in network whose response is a fixed map (with one parameter for .device)."""

    def __init__(self, response: torch.Tensor):
        super().__init__()
        self.response = response
        self.p = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.response


def test_bilinear_upsampling_equals_interpolate_then_argmax(monkeypatch):
    from dynaguide.pipeline import Prepared, full_size_labels
    from dynaguide.refine import RefineResult

    gen = torch.Generator().manual_seed(0)
    work = torch.randn(1, 5, 9, 13, generator=gen)
    model = _FixedResponse(work)
    result = RefineResult(work[0].argmax(0), 1, [0.0], [5], "", None, 0.0, model)
    rgb = np.zeros((37, 51, 3), np.uint8)
    prepared = Prepared(rgb, np.zeros((9, 13, 3), np.uint8), None, None, None, "image")
    cfg = get_preset("dynaguide").replace(upsample="bilinear")
    monkeypatch.setattr("dynaguide.pipeline._BAND_PIXELS", 51 * 4)  # several bands
    out = full_size_labels(result, prepared, cfg)
    ref = torch.nn.functional.interpolate(work.double(), size=(37, 51), mode="bilinear",
                                          align_corners=False)[0].argmax(0)  # fmt: skip
    assert (out == ref.numpy()).mean() > 0.999  # float32 vs float64 ties only
    near = full_size_labels(result, prepared, cfg.replace(upsample="nearest"))
    np.testing.assert_array_equal(near, resize_labels(work[0].argmax(0).numpy(), (37, 51)))


def test_bilinear_segment_end_to_end():
    img = np.repeat(np.repeat(_image(), 3, axis=0), 3, axis=1)  # 72 x 84
    seg = dynaguide.segment(img, guidance=None, upsample="bilinear", work_pixels=600, max_iter=5)
    assert seg.labels.shape == (72, 84) and seg.extra["refine_size"][0] < 72


def test_guidance_anneal_schedule():
    cfg = get_preset("dynaguide").replace(guidance_weight=2.0, guidance_anneal=10)
    assert guidance_weight_at(cfg, 0) == 2.0
    assert guidance_weight_at(cfg, 5) == pytest.approx(1.0)
    assert guidance_weight_at(cfg, 10) == 0.0 and guidance_weight_at(cfg, 50) == 0.0
    assert guidance_weight_at(cfg.replace(guidance_anneal=0), 50) == 2.0
    # once annealed to 0 the loss equals the unguided objective of the same network state
    guide = np.random.default_rng(0).integers(0, 3, size=(24, 28))
    a = RefineStep(_image(), cfg.replace(guidance_anneal=1), guide_labels=guide, seed=1)
    b = RefineStep(_image(), cfg.replace(guidance_weight=0.0), seed=1)
    a.step()
    b.step()
    la, _, _ = a.step()  # iteration 1: weight 0
    lb, _, _ = b.step()
    assert not torch.equal(la, lb)  # the first steps differed (guided vs not) ...
    a2 = RefineStep(_image(), cfg.replace(guidance_anneal=1), guide_labels=guide, seed=1)
    b2 = RefineStep(_image(), cfg.replace(guidance_weight=0.0), guide_labels=guide, seed=1)
    a2.iteration = b2.iteration = 5
    torch.testing.assert_close(a2.step()[0], b2.step()[0])  # ... weight 0: same loss


def test_guide_margin_band():
    g = torch.zeros(6, 8, dtype=torch.long)
    g[:, 4:] = 7
    band = guide_boundary_band(g, 1)
    expected = torch.zeros(6, 8, dtype=torch.bool)
    expected[:, 3:5] = True
    assert torch.equal(band, expected)
    assert torch.equal(guide_boundary_band(g, 2)[:, 2:6], torch.ones(6, 4, dtype=torch.bool))
    big = torch.full((4, 4), 2**40, dtype=torch.long)
    big[:, 2:] += 1  # ids beyond float32's exact range still separate
    assert bool(guide_boundary_band(big, 1).any())
    cfg = get_preset("dynaguide").replace(guide_margin=1, max_iter=3)
    step = RefineStep(_image(), cfg, guide_labels=g.repeat(4, 4)[:24, :28].numpy(), seed=0)
    assert int((step.aligner.guide < 0).sum()) > 0


def test_input_features_channels():
    img = _image()
    for features, c in (("rgb", 3), ("rgb+xy", 5), ("rgb+lab", 6), ("rgb+lab+xy", 8)):
        cfg = get_preset("dynaguide").replace(input_features=features, max_iter=2)
        x = image_tensor(img, cfg, torch.device("cpu"))
        assert x.shape == (1, c, 24, 28) and cfg.in_channels == c
        assert refine(img, cfg, seed=0).labels.shape == (24, 28)
    x = image_tensor(img, get_preset("dfc").replace(input_features="rgb+xy"), torch.device("cpu"))
    assert float(x[0, 3, 0, 0]) == 0.0 and float(x[0, 3, -1, 0]) == 1.0
    assert float(x[0, 4, 0, -1]) == 1.0
    assert float(x[0, :6].abs().max()) <= 1.0 + 1e-6


def test_time_budget_stops_the_loop():
    cfg = get_preset("dynaguide").replace(max_iter=100_000, min_labels=0, time_budget=0.3)
    t0 = time.perf_counter()
    res = refine(_image(), cfg, seed=0)
    assert res.stop_reason.startswith("time budget") and res.n_iter < 100_000
    assert time.perf_counter() - t0 < 5.0
    seg = dynaguide.segment(_image(), guidance=None, max_iter=100_000, min_labels=0,
                            time_budget=0.3)  # fmt: skip
    assert seg.stop_reason.startswith("time budget")
    with pytest.raises(ValueError, match="time_budget"):
        get_preset("dynaguide").replace(time_budget=0)


def test_postprocess_settings_in_segment():
    seg = dynaguide.segment(_image(48, 56), preset="dynaguide", guidance=None, max_iter=5,
                            connectivity=8, min_area=0.05)  # fmt: skip
    areas = np.bincount(seg.labels.ravel())
    assert areas.min() >= 0.05 * seg.labels.size or seg.n_labels == 1
    with pytest.raises(ValueError, match="connectivity"):
        dynaguide.segment(_image(), preset="dynaguide", guidance=None, max_iter=2, min_area=0.1)


def test_max_iter_zero_post_processes_the_guide_alone():
    img = _image(48, 56)
    guide = np.zeros((48, 56), np.int64)
    guide[:, 28:] = 5
    guide[3, 3] = 9  # a one-pixel speck, merged away by min_area
    seg = dynaguide.segment(img, guidance=guide, max_iter=0, connectivity=8, min_area=10)
    assert seg.n_iter == 0 and seg.stop_reason.startswith("no refinement")
    assert seg.n_labels == 2 and (seg.labels[:, :28] == seg.labels[0, 0]).all()
    segs = dynaguide.segment_batch(
        [img, img], guidance=guide, max_iter=0, batch_size=2, connectivity=8, min_area=10
    )
    assert all(np.array_equal(s.labels, seg.labels) for s in segs)
    with pytest.raises(ValueError, match="needs a guide"):
        dynaguide.segment(img, guidance=None, max_iter=0)


def test_memory_fit_ignores_images_that_are_not_refined(monkeypatch):
    monkeypatch.setattr("dynaguide.batch_memory.free_memory", lambda device: 1024)
    img = np.zeros((40, 60, 3), np.uint8)
    img[:, 30:] = 200
    seg = dynaguide.segment(img)  # the default runs no network: nothing to fit
    assert seg.extra["refine_size"] == [40, 60] and seg.n_labels == 2
