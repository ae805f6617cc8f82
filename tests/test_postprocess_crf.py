"""The dense CRF as a DynaGuide post-process: postprocess(crf_iterations=...), RefineConfig."""

from __future__ import annotations

import numpy as np
import pytest

import dynaguide
from dynaguide import crf
from dynaguide.config import RefineConfig
from dynaguide.label_ops import native_module
from dynaguide.postprocess import crf_refine, postprocess

pytestmark = pytest.mark.skipif(
    native_module() is None or not hasattr(native_module(), "dense_crf"),
    reason="dynaguide._native is not built",
)


def _two_regions(seed: int = 0, h: int = 30, w: int = 36):
    rng = np.random.default_rng(seed)
    truth = np.zeros((h, w), np.int64)
    truth[:, w // 2 :] = 1
    colours = np.array([[200, 40, 40], [30, 60, 210]])
    img = np.clip(colours[truth] + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8)
    noisy = truth.copy()
    flip = rng.random((h, w)) < 0.08
    noisy[flip] = 1 - noisy[flip]
    return img, truth, noisy


def test_crf_refine_removes_label_noise_along_colour():
    img, truth, noisy = _two_regions()
    out = crf_refine(noisy, img, iterations=5)
    assert out.dtype == np.int64 and out.shape == truth.shape
    assert (out == truth).mean() > 0.99 > (noisy == truth).mean()


def test_crf_refine_with_a_probability_unary_is_the_crf_argmax():
    img, truth, _ = _two_regions(1)
    rng = np.random.default_rng(2)
    s = 1.2 * np.eye(2)[truth].transpose(2, 0, 1) + rng.normal(0, 1, (2, *truth.shape))
    p = (np.exp(s) / np.exp(s).sum(0)).astype(np.float32)
    got = postprocess(truth * 7, img, connectivity=0, crf_iterations=4, crf_unary=p)
    np.testing.assert_array_equal(got, crf.dense_crf(img, p, iterations=4).argmax(0))


def test_single_label_and_off_are_unchanged():
    img, truth, noisy = _two_regions(3)
    np.testing.assert_array_equal(crf_refine(np.full_like(truth, 4), img), 0)
    np.testing.assert_array_equal(
        postprocess(noisy, img, connectivity=0, crf_iterations=0),
        postprocess(noisy, img, connectivity=0),
    )
    with pytest.raises(ValueError, match="crf_iterations"):
        postprocess(noisy, img, crf_iterations=-1)


def test_refine_config_field_and_segment():
    with pytest.raises(ValueError, match="crf_iterations"):
        RefineConfig(crf_iterations=-2)
    img, truth, noisy = _two_regions(4)
    off = dict(max_iter=0, connectivity=0, min_area=0.0, merge=None)  # no region clean-up
    seg = dynaguide.segment(img, guidance=noisy, crf_iterations=5, **off)
    agree = max((seg.labels == truth).mean(), (seg.labels == 1 - truth).mean())
    assert seg.config.crf_iterations == 5 and agree > 0.99
    plain = dynaguide.segment(img, guidance=noisy, **off)
    assert max((plain.labels == truth).mean(), (plain.labels == 1 - truth).mean()) < 0.95
