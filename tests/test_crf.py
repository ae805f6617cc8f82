"""Dense CRF: mean field against explicit formulas, the lattice against exact filtering.

Measured tolerances (fixed seeds, 12x10 images): the permutohedral lattice's normalised
messages differ from the exact ones by at most ~6% (position kernel, sxy 1) and ~18%
(bilateral kernels) of the largest message; after SmooSeg's 10 iterations the marginals
differ by at most 0.01 on average and at least 98% of the labels agree.
"""

from __future__ import annotations

import numpy as np
import pytest

from dynaguide import crf
from dynaguide.label_ops import native_module

needs_native = pytest.mark.skipif(
    native_module() is None or not hasattr(native_module(), "dense_crf"),
    reason="dynaguide._native is not built",
)


def _scene(seed: int, h: int = 12, w: int = 10, k: int = 3, noise: float = 1.0):
    """Three colour regions, an image with noise and a noisy unary favouring the truth."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((h, w), int)
    truth[:, 4:] = 1
    truth[7:, 6:] = 2
    colours = np.array([[200, 30, 30], [20, 40, 220], [30, 200, 60]])
    img = np.clip(colours[truth] + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)
    s = 1.5 * np.eye(k)[truth].transpose(2, 0, 1) + rng.normal(0, noise, (k, h, w))
    p = np.exp(s) / np.exp(s).sum(0)
    return img, p, truth


def _brute_force(img, p, iterations, ws, sxys, srgbs):
    """Mean field written out pixel by pixel (float64), kernels and normalisation explicit."""
    h, w = img.shape[:2]
    n, k = h * w, p.shape[0]
    pix = [(y, x) for y in range(h) for x in range(w)]
    kernels = []
    for sxy, srgb in zip(sxys, srgbs, strict=True):
        mat = np.zeros((n, n))
        for i, (yi, xi) in enumerate(pix):
            for j, (yj, xj) in enumerate(pix):
                d2 = ((xi - xj) ** 2 + (yi - yj) ** 2) / sxy**2
                if srgb is not None:
                    d2 += float(((img[yi, xi].astype(float) - img[yj, xj]) ** 2).sum()) / srgb**2
                mat[i, j] = np.exp(-d2 / 2)
        deg = mat.sum(1)
        kernels.append(mat / np.sqrt(deg[:, None] * deg[None, :]))
    u = -np.log(np.maximum(p.reshape(k, n).T, 1e-5))
    q = np.exp(-u) / np.exp(-u).sum(1, keepdims=True)
    for _ in range(iterations):
        new = np.empty_like(q)
        for i in range(n):
            e = -u[i].copy()
            for wm, km in zip(ws, kernels, strict=True):
                e += wm * sum(km[i, j] * q[j] for j in range(n))
            e = np.exp(e - e.max())
            new[i] = e / e.sum()
        q = new
    return q.T.reshape(k, h, w)


def test_exact_mean_field_equals_the_formulas():
    img, p, _ = _scene(0, h=5, w=4)
    want = _brute_force(img, p, 3, (3.0, 4.0), (1.5, 7.0), (None, 20.0))
    got = crf.dense_crf_reference(
        img, p, iterations=3, gaussian_sxy=1.5, gaussian_weight=3.0, bilateral_sxy=7.0,
        bilateral_srgb=20.0, bilateral_weight=4.0,
    )  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


@needs_native
def test_native_mean_field_equals_the_numpy_one_on_the_same_lattice():
    img, p, _ = _scene(1)
    want = crf.dense_crf_reference(img, p, filtering="lattice")
    got = crf.dense_crf(img, p)
    assert got.dtype == np.float32 and got.shape == p.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(got.sum(0), 1.0, atol=1e-5)


@needs_native
@pytest.mark.parametrize(
    "sxy,srgb,tol", [(1.0, None, 0.08), (3.0, None, 0.08), (67.0, 3.0, 0.25), (5.0, 10.0, 0.25)]
)
def test_lattice_messages_approximate_exact_filtering(sxy, srgb, tol):
    img, _, _ = _scene(2)
    rng = np.random.default_rng(3)
    f = crf.crf_features(img, sxy, srgb)
    q = rng.random((f.shape[0], 4))
    want = crf.normalised_filter(crf.exact_gaussian_filter, f)(q)
    got = crf.normalised_filter(crf.lattice_gaussian_filter, f)(q)
    assert np.abs(got - want).max() <= tol * np.abs(want).max()


@needs_native
def test_lattice_gain_is_nearly_uniform():
    """Unnormalised, the lattice is the exact Gaussian sum times a gain that varies by a few
    percent from point to point (dense random points in 2 and 3 dimensions)."""
    rng = np.random.default_rng(4)
    for d, spread in ((2, 5.0), (3, 4.0)):
        f = rng.random((1500, d)) * spread
        v = rng.random((1500, 2)) + 0.5
        ratio = crf.lattice_gaussian_filter(f, v) / crf.exact_gaussian_filter(f, v)
        assert ratio.std() / ratio.mean() < 0.05, d


@needs_native
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_lattice_marginals_close_to_exact_and_better_than_the_unary(seed):
    img, p, truth = _scene(seed)
    exact = crf.dense_crf_reference(img, p)
    got = crf.dense_crf(img, p)
    assert np.abs(got - exact).mean() <= 0.02
    assert (got.argmax(0) == exact.argmax(0)).mean() >= 0.97
    assert (got.argmax(0) == truth).mean() > (p.argmax(0) == truth).mean()


@needs_native
def test_zero_iterations_and_logits():
    img, p, _ = _scene(5)
    np.testing.assert_allclose(crf.dense_crf(img, p, iterations=0), p, atol=1e-6)
    logits = np.log(p) + 3.0  # any per-pixel shift
    np.testing.assert_allclose(
        crf.dense_crf(img, logits, logits=True), crf.dense_crf(img, p), atol=1e-5
    )


@needs_native
def test_bad_inputs_name_the_argument():
    img, p, _ = _scene(6)
    with pytest.raises(TypeError, match="image"):
        crf.dense_crf(img.astype(np.float32), p)
    with pytest.raises(ValueError, match="image"):
        crf.dense_crf(img[..., :2], p)
    with pytest.raises(ValueError, match="unary"):
        crf.dense_crf(img, p[:, :5])
    with pytest.raises(ValueError, match="unary"):
        crf.dense_crf(img, p[0])
    with pytest.raises(ValueError, match="probabilities"):
        crf.dense_crf(img, p * 3)
    with pytest.raises(TypeError, match="unary"):
        crf.dense_crf(img, (p > 0.5).astype(np.int64))
    with pytest.raises(ValueError, match="bilateral_srgb"):
        crf.dense_crf(img, p, bilateral_srgb=0)
    with pytest.raises(ValueError, match="iterations"):
        crf.dense_crf(img, p, iterations=-1)
    with pytest.raises(ValueError, match="filtering"):
        crf.dense_crf_reference(img, p, filtering="fast")
