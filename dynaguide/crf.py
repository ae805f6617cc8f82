"""Fully connected CRF post-processing (Krähenbühl & Koltun, NeurIPS 2011).

Every pixel is connected to every other one. The energy of a labelling x is
``sum_i psi_u(x_i) + sum_{i<j} [x_i != x_j] sum_m w_m k_m(f_i, f_j)`` (Potts compatibility)
with two Gaussian kernels:

* the smoothness ("Gaussian") kernel over positions, ``f = (x, y) / gaussian_sxy``;
* the appearance ("bilateral") kernel over positions and colour,
  ``f = (x / bilateral_sxy, y / bilateral_sxy, r / bilateral_srgb, g / ..., b / ...)``;

each ``k(f_i, f_j) = exp(-|f_i - f_j|^2 / 2)``, normalised symmetrically as the widely used
implementation of the paper does by default: ``Kn = D^-1/2 K D^-1/2`` with ``D = diag(K 1)``
(self-pairs included). Mean-field inference starts from ``Q = softmax(-psi_u)`` and repeats

    Q <- softmax(-psi_u + sum_m w_m Kn_m Q)

(the Potts penalty ``sum_{l' != l} (Kn Q)_{l'}`` differs from ``-(Kn Q)_l`` by a term that
is the same for every label, which the softmax removes).

:func:`dense_crf` runs it in the native extension, where the Gaussian filtering is done on a
permutohedral lattice (Adams, Baek & Davis, Eurographics 2010) in O(N d^2) instead of
O(N^2). That filtering is approximate: the symmetric normalisation cancels the lattice's
gain, and what remains differs from the exact filter by a few percent (see
``tests/test_crf.py``). :func:`dense_crf_reference` runs the same iterations in numpy with
the exact O(N^2) Gaussian sums (small images only), or with the lattice, for the tests.

SmooSeg's evaluation settings are the defaults: 10 iterations, Gaussian sxy 1 weight 3,
bilateral sxy 67, srgb 3, weight 4.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
    "crf_features",
    "dense_crf",
    "dense_crf_reference",
    "exact_gaussian_filter",
    "lattice_gaussian_filter",
    "unary_energy",
]

# SmooSeg's evaluation settings, the defaults of dense_crf.
DEFAULTS: dict[str, Any] = dict(iterations=10, gaussian_sxy=1.0, gaussian_weight=3.0,
                                bilateral_sxy=67.0, bilateral_srgb=3.0, bilateral_weight=4.0)  # fmt: skip
PROB_CLIP = 1e-5  # probabilities below this are clipped before -log (as pydensecrf's helper)
_EXACT_MAX_PIXELS = 4096


def _as_numpy(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")
    return x


def _check_image(image: Any) -> np.ndarray:
    image = _as_numpy(image, "image")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image must have shape (H, W, 3), got {image.shape}")
    if image.dtype != np.uint8:
        raise TypeError(f"image must be uint8 RGB, got {image.dtype}")
    return np.ascontiguousarray(image)


def unary_energy(unary: Any, shape: tuple[int, int], *, logits: bool = False) -> np.ndarray:
    """Validated (K, H, W) float64 unary energies ``psi_u``.

    ``unary``: per-class probabilities (``-log(max(p, 1e-5))``; each pixel's need not sum
    to 1) or, with ``logits``, class scores (``-(s - max_l s)``, the same softmax).
    """
    u = _as_numpy(unary, "unary")
    if u.ndim != 3 or u.shape[0] < 1:
        raise ValueError(f"unary must have shape (K, H, W), got {u.shape}")
    if tuple(u.shape[1:]) != tuple(shape):
        raise ValueError(f"unary has spatial size {u.shape[1:]}, the image {tuple(shape)}")
    if not np.issubdtype(u.dtype, np.floating):
        raise TypeError(f"unary must be a floating-point array, got {u.dtype}")
    u = u.astype(np.float64)
    if not np.isfinite(u).all():
        raise ValueError("unary holds NaN or infinite values")
    if logits:
        return -(u - u.max(axis=0, keepdims=True))
    if (u < 0).any() or (u > 1 + 1e-6).any():
        raise ValueError("unary must hold probabilities in [0, 1] (or pass logits=True)")
    return -np.log(np.maximum(u, PROB_CLIP))


def _check_params(iterations: int, **positive: float) -> None:
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)):
        raise TypeError(f"iterations must be an int, got {type(iterations).__name__}")
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}")
    for name, value in positive.items():
        if not (isinstance(value, (int, float, np.floating)) and np.isfinite(value)):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if name.endswith("weight") and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
        if not name.endswith("weight") and value <= 0:
            raise ValueError(f"{name} must be > 0, got {value!r}")


def dense_crf(
    image: Any,
    unary: Any,
    *,
    iterations: int = 10,
    gaussian_sxy: float = 1.0,
    gaussian_weight: float = 3.0,
    bilateral_sxy: float = 67.0,
    bilateral_srgb: float = 3.0,
    bilateral_weight: float = 4.0,
    logits: bool = False,
) -> np.ndarray:
    """Dense-CRF marginals by mean field with permutohedral-lattice filtering (native, CPU).

    Parameters
    ----------
    image : (H, W, 3) uint8 RGB (numpy array or CPU tensor).
    unary : (K, H, W) float class probabilities (such as a softmax; clipped at 1e-5 before
        ``-log``), or class scores with ``logits=True``.
    iterations : mean-field iterations (0 returns the unary's softmax).
    gaussian_sxy, gaussian_weight : position kernel's standard deviation (pixels), weight.
    bilateral_sxy, bilateral_srgb, bilateral_weight : appearance kernel's position and
        colour standard deviations (pixels, 0-255 intensity units), weight.

    Returns
    -------
    (K, H, W) float32 marginals (each pixel's sum to 1); ``argmax(0)`` gives the labels.
    """
    from dynaguide.label_ops import native_module

    img = _check_image(image)
    energy = unary_energy(unary, img.shape[:2], logits=logits)
    energy = np.ascontiguousarray(energy, dtype=np.float32)
    params = dict(gaussian_sxy=gaussian_sxy, gaussian_weight=gaussian_weight,
                  bilateral_sxy=bilateral_sxy, bilateral_srgb=bilateral_srgb,
                  bilateral_weight=bilateral_weight)  # fmt: skip
    _check_params(iterations, **params)
    mod = native_module()
    if mod is None or not hasattr(mod, "dense_crf"):
        raise RuntimeError("dense_crf needs the native extension dynaguide._native (not built)")
    out = np.empty_like(energy)
    mod.dense_crf(img, energy, out, int(iterations), *(float(v) for v in params.values()))
    return out


# ------------------------------------------------------------------------- references
def crf_features(image: np.ndarray, sxy: float, srgb: float | None = None) -> np.ndarray:
    """(H*W, 2) positions / sxy, or with ``srgb`` (H*W, 5) positions / sxy and RGB / srgb,
    float64, pixels in row-major order (x is the column)."""
    h, w = image.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w]
    pos = np.stack([xs.ravel(), ys.ravel()], axis=1) / sxy
    if srgb is None:
        return pos.astype(np.float64)
    return np.concatenate([pos, image.reshape(-1, 3) / srgb], axis=1).astype(np.float64)


def exact_gaussian_filter(features: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``sum_j exp(-|f_i - f_j|^2 / 2) v_j`` exactly (O(N^2) memory: small inputs only)."""
    if features.shape[0] > _EXACT_MAX_PIXELS:
        raise ValueError(
            f"exact filtering of {features.shape[0]} points needs an N x N matrix; "
            f"use at most {_EXACT_MAX_PIXELS}"
        )
    f = features.astype(np.float64)
    sq = (f * f).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * f @ f.T, 0.0)
    return np.exp(-0.5 * d2) @ values.astype(np.float64)


def lattice_gaussian_filter(features: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The permutohedral-lattice approximation of :func:`exact_gaussian_filter` (native,
    float32; equal to it up to a gain that is nearly the same for every point)."""
    from dynaguide.label_ops import native_module

    mod = native_module()
    if mod is None or not hasattr(mod, "permutohedral_filter"):
        raise RuntimeError("the lattice needs the native extension dynaguide._native")
    f = np.ascontiguousarray(features, dtype=np.float32)
    v = np.ascontiguousarray(values, dtype=np.float32)
    out = np.empty_like(v)
    mod.permutohedral_filter(f, v, out)
    return out.astype(np.float64)


def normalised_filter(
    filt: Callable[[np.ndarray, np.ndarray], np.ndarray], features: np.ndarray
) -> Callable[[np.ndarray], np.ndarray]:
    """``Q -> D^-1/2 K D^-1/2 Q`` with ``K`` applied by ``filt`` and ``D = K 1``."""
    norm = 1.0 / np.sqrt(filt(features, np.ones((features.shape[0], 1)))[:, 0] + 1e-20)
    return lambda q: norm[:, None] * filt(features, norm[:, None] * q)


def dense_crf_reference(
    image: Any, unary: Any, *, logits: bool = False, filtering: str = "exact", **settings: Any
) -> np.ndarray:
    """The mean field of :func:`dense_crf` in float64 numpy, with ``filtering="exact"``
    (O(N^2) Gaussian sums, at most 4096 pixels) or ``"lattice"`` (the native lattice).

    ``settings``: :func:`dense_crf`'s ``iterations`` and kernel parameters (same defaults).
    """
    if filtering not in ("exact", "lattice"):
        raise ValueError(f"filtering must be 'exact' or 'lattice', got {filtering!r}")
    img = _check_image(image)
    h, w = img.shape[:2]
    energy = unary_energy(unary, (h, w), logits=logits).reshape(-1, h * w).T
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"unknown dense-CRF settings {sorted(unknown)}; known: {list(DEFAULTS)}")
    p = {**DEFAULTS, **settings}
    iterations = p.pop("iterations")
    _check_params(iterations, **p)
    filt = exact_gaussian_filter if filtering == "exact" else lattice_gaussian_filter
    gauss = normalised_filter(filt, crf_features(img, p["gaussian_sxy"]))
    bilat = normalised_filter(filt, crf_features(img, p["bilateral_sxy"], p["bilateral_srgb"]))
    wg, wb = p["gaussian_weight"], p["bilateral_weight"]
    q = _softmax(-energy)
    for _ in range(iterations):
        q = _softmax(-energy + wg * gauss(q) + wb * bilat(q))
    return q.T.reshape(-1, h, w)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)
