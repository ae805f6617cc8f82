"""SmooSeg's smoothness loss: the plain PyTorch reference.

For two maps of patch features ``a`` and ``b`` (the same image twice, or an image against
another image of the batch) and their soft class assignments, every pair of patches
(i in a, j in b) contributes ``(F_ij - shift) * (1 - S_ij)``:

* ``F_ij`` is the cosine similarity of the two patches' features, taken without gradient.
  With ``pointwise=True`` each row i is centred (its mean over j subtracted) and the global
  mean of F added back, so the pull or push a patch gets does not depend on how similar it
  is to everything;
* ``S_ij`` is the cosine similarity of the two patches' L2-normalised soft assignments (in
  [0, 1] since the assignments are non-negative).

Pairs whose feature similarity is above ``shift`` are pulled toward one label, those below
it pushed apart. The loss is the mean over all pairs and over the batch.

Two implementations here, one more in :mod:`dynaguide.kernels.smoothness`:

* :func:`smoothness_loss_reference` materialises the (B, N_a, N_b) similarity matrices: it
  is the reference the fast paths are tested against;
* :func:`smoothness_loss_factorised` uses that the loss is linear in ``S``. With ``x_i``,
  ``y_j`` the L2-normalised features, ``a_i``, ``b_j`` the normalised codes of one image
  pair, ``r_i = x_i . ybar`` (ybar the mean of the y_j) and ``g`` the global mean of the
  cosine similarities::

      sum_ij F_ij S_ij = <X^T A, Y^T B>_F - P sum_i r_i a_i . (sum_j b_j) + P g (sum a).(sum b)
      sum_ij S_ij      = (sum_i a_i) . (sum_j b_j)

  (P = 1 with pointwise centring, 0 without; ``sum_i r_i a_i = (X^T A)^T ybar``). Only the
  (D, K) matrices ``X^T A`` and ``Y^T B`` are formed: O(N D K) work and memory instead of
  O(N M (D + K)) work and O(N M) memory. The feature normalisation is folded into the
  codes' row weights, so the features are never copied.

:func:`smoothness_loss` checks the inputs once and dispatches: the Triton kernel for CUDA
tensors when Triton is installed, else the factorised form.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def _check_maps(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (B, C, h, w), got {type(x).__name__}"
        )
    if x.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, h, w), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def _flat_normalised(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C), each row L2-normalised (eps 1e-10, as the paper's code)."""
    return F.normalize(x.flatten(2), dim=1, eps=1e-10).transpose(1, 2)


def feature_similarity(
    feats_a: torch.Tensor, feats_b: torch.Tensor, *, pointwise: bool = True
) -> torch.Tensor:
    """Cosine similarity of every patch of ``feats_a`` with every patch of ``feats_b``.

    Returns a (B, h_a*w_a, h_b*w_b) tensor without gradient. With ``pointwise`` each row is
    centred and the global mean added back.
    """
    _check_maps("feats_a", feats_a)
    _check_maps("feats_b", feats_b)
    with torch.no_grad():
        fa, fb = _flat_normalised(feats_a), _flat_normalised(feats_b)
        sim = fa @ fb.transpose(1, 2)
        if pointwise:
            global_mean = sim.mean()
            sim = sim - sim.mean(dim=2, keepdim=True)
            sim = sim - sim.mean() + global_mean
    return sim


Method = Literal["auto", "reference", "factorised", "triton"]
_EPS = 1e-10  # the paper's normalisation eps
_TRITON_MAX_CODES = 256  # dynaguide.kernels.smoothness.MAX_CODES (the codes are one tile)


def _check_pair(
    feats_a: torch.Tensor, feats_b: torch.Tensor, codes_a: torch.Tensor, codes_b: torch.Tensor
) -> None:
    """Validate the four maps of :func:`smoothness_loss` (errors name the input)."""
    for name, f, c in (("a", feats_a, codes_a), ("b", feats_b, codes_b)):
        _check_maps(f"feats_{name}", f)
        _check_maps(f"codes_{name}", c)
        if f.shape[0] != c.shape[0] or f.shape[2:] != c.shape[2:]:
            raise ValueError(
                f"feats_{name} {tuple(f.shape)} and codes_{name} {tuple(c.shape)} must share "
                "the batch size and the spatial size"
            )
    if feats_a.shape[0] != feats_b.shape[0]:
        raise ValueError(
            f"feats_a and feats_b must have the same batch size, got {feats_a.shape[0]} "
            f"and {feats_b.shape[0]}"
        )
    if feats_a.shape[1] != feats_b.shape[1] or codes_a.shape[1] != codes_b.shape[1]:
        raise ValueError("a and b must have the same number of feature and code channels")
    devices = {t.device for t in (feats_a, feats_b, codes_a, codes_b)}
    if len(devices) > 1:
        raise ValueError(
            f"feats_a, feats_b, codes_a and codes_b must share a device, got {devices}"
        )


def smoothness_loss_reference(
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    codes_a: torch.Tensor,
    codes_b: torch.Tensor,
    *,
    shift: float,
    pointwise: bool = True,
) -> torch.Tensor:
    """The loss with the (B, N_a, N_b) similarity matrices materialised (the reference)."""
    _check_pair(feats_a, feats_b, codes_a, codes_b)
    return _reference(feats_a, feats_b, codes_a, codes_b, shift, pointwise)


def _reference(feats_a, feats_b, codes_a, codes_b, shift: float, pointwise: bool) -> torch.Tensor:
    sim = feature_similarity(feats_a, feats_b, pointwise=pointwise)
    ca, cb = _flat_normalised(codes_a), _flat_normalised(codes_b)
    code_sim = ca @ cb.transpose(1, 2)
    return ((sim.to(code_sim.dtype) - shift) * (1.0 - code_sim)).mean()


def _acc_dtype(*xs: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16/fp16 accumulate in float32)."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def smoothness_loss_factorised(
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    codes_a: torch.Tensor,
    codes_b: torch.Tensor,
    *,
    shift: float,
    pointwise: bool = True,
) -> torch.Tensor:
    """The loss through the factorisation of the module docstring (no N_a x N_b matrix).

    Equal to :func:`smoothness_loss_reference` up to rounding; the result and the code
    gradients are in float32 (float64 if an input is float64).
    """
    _check_pair(feats_a, feats_b, codes_a, codes_b)
    return _factorised(feats_a, feats_b, codes_a, codes_b, float(shift), pointwise)


def _factorised(feats_a, feats_b, codes_a, codes_b, shift: float, pointwise: bool) -> torch.Tensor:
    acc = _acc_dtype(feats_a, feats_b, codes_a, codes_b)
    n_a, n_b = feats_a[0, 0].numel(), feats_b[0, 0].numel()
    with torch.no_grad():
        fa, fb = feats_a.flatten(2).to(acc), feats_b.flatten(2).to(acc)  # (B, D, N): no copy
        inv_a = 1.0 / torch.linalg.vector_norm(fa, dim=1).clamp_min(_EPS)  # (B, N_a)
        inv_b = 1.0 / torch.linalg.vector_norm(fb, dim=1).clamp_min(_EPS)
        xbar = torch.bmm(fa, inv_a.unsqueeze(2)).squeeze(2) / n_a  # mean normalised x (B, D)
        ybar = torch.bmm(fb, inv_b.unsqueeze(2)).squeeze(2) / n_b
        g = (xbar * ybar).sum(1).mean()  # global mean of the cosine similarities
    a = F.normalize(codes_a.flatten(2).to(acc), dim=1, eps=_EPS).transpose(1, 2)  # (B, N, K)
    b = F.normalize(codes_b.flatten(2).to(acc), dim=1, eps=_EPS).transpose(1, 2)
    ga = torch.bmm(fa, a * inv_a.unsqueeze(2))  # X^T A: (B, D, K)
    gb = torch.bmm(fb, b * inv_b.unsqueeze(2))
    abar, bbar = a.mean(1), b.mean(1)
    ab = (abar * bbar).sum(1)  # mean of S per image
    fs = (ga * gb).sum((1, 2)) / (n_a * n_b)  # mean of s_ij S_ij per image
    if pointwise:
        ra = torch.bmm(ybar.unsqueeze(1), ga).squeeze(1) / n_a  # mean_i r_i a_i: (B, K)
        fs = fs - (ra * bbar).sum(1) + g * ab
    return g - shift - fs.mean() + shift * ab.mean()


def smoothness_loss(
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    codes_a: torch.Tensor,
    codes_b: torch.Tensor,
    *,
    shift: float,
    pointwise: bool = True,
    method: Method = "auto",
) -> torch.Tensor:
    """Mean over patch pairs of ``(F_ij - shift) * (1 - S_ij)`` (see the module docstring).

    ``feats_*`` are (B, D, h, w) features (no gradient flows into them); ``codes_*`` are
    (B, K, h, w) non-negative soft assignments, such as a softmax over classes. ``a`` and
    ``b`` must have the same batch size, ``feats_x`` and ``codes_x`` the same spatial size.

    ``method``: ``"auto"`` (the Triton kernel for CUDA tensors when Triton is installed,
    else ``"factorised"``), ``"reference"`` (materialises the similarity matrices),
    ``"factorised"`` or ``"triton"`` (CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).
    The fast methods return float32 (float64 for float64 inputs); the reference returns
    the codes' dtype.
    """
    _check_pair(feats_a, feats_b, codes_a, codes_b)
    if method not in ("auto", "reference", "factorised", "triton"):
        raise ValueError(
            f"method must be 'auto', 'reference', 'factorised' or 'triton', got {method!r}"
        )
    if method == "auto":
        cuda = feats_a.device.type == "cuda" and codes_a.shape[1] <= _TRITON_MAX_CODES
        method = "triton" if cuda and _triton_available() else "factorised"
    if method == "reference":
        return _reference(feats_a, feats_b, codes_a, codes_b, shift, pointwise)
    if method == "factorised":
        return _factorised(feats_a, feats_b, codes_a, codes_b, float(shift), pointwise)
    from dynaguide.kernels.smoothness import smoothness_loss_triton

    return smoothness_loss_triton(
        feats_a, feats_b, codes_a, codes_b, shift=float(shift), pointwise=pointwise
    )


def _triton_available() -> bool:
    """Whether Triton imports (only asked for CUDA tensors: CPU calls never import it)."""
    from dynaguide import backend

    return backend.available("triton")


def derangement(n: int, *, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """A random permutation of ``range(n)`` with no fixed point (n >= 2), for pairing every
    image of a batch with another one. Uniform over permutations without fixed points
    (rejection sampling; about e tries on average)."""
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2 images, got n={n}")
    idx = torch.arange(n)
    while True:
        perm = torch.randperm(n, generator=generator)
        if not bool((perm == idx).any()):
            return perm.to(device) if device is not None else perm
