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
it pushed apart. The loss is the mean over all pairs and over the batch. This module
materialises the (B, N_a, N_b) similarity matrices: it is the reference the fast paths are
tested against.
"""

from __future__ import annotations

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


def smoothness_loss(
    feats_a: torch.Tensor,
    feats_b: torch.Tensor,
    codes_a: torch.Tensor,
    codes_b: torch.Tensor,
    *,
    shift: float,
    pointwise: bool = True,
) -> torch.Tensor:
    """Mean over patch pairs of ``(F_ij - shift) * (1 - S_ij)`` (see the module docstring).

    ``feats_*`` are (B, D, h, w) features (no gradient flows into them); ``codes_*`` are
    (B, K, h, w) non-negative soft assignments, such as a softmax over classes. ``a`` and
    ``b`` must have the same batch size, ``feats_x`` and ``codes_x`` the same spatial size.
    """
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
    sim = feature_similarity(feats_a, feats_b, pointwise=pointwise)
    ca, cb = _flat_normalised(codes_a), _flat_normalised(codes_b)
    code_sim = ca @ cb.transpose(1, 2)
    return ((sim.to(code_sim.dtype) - shift) * (1.0 - code_sim)).mean()


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
