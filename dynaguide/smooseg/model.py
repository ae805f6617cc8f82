"""SmooSeg's trainable head: projector, student/teacher prototypes, losses and prediction.

Following Lan et al., "SmooSeg: Smoothness Prior for Unsupervised Semantic Segmentation"
(NeurIPS 2023) as their code runs it:

* **projector** ``z = W1 drop(f) + W3 SiLU(W2 drop(f))`` with 1x1 convolutions (D -> 64 and
  D -> D -> 64); each ``drop`` is ``Dropout2d(0.2)`` with its own mask, and a third
  independently dropped copy of ``f`` is the "signal" of the smoothness loss;
* **prototypes**: student ``P_s`` (K x 64, trainable, Xavier-normal then L2-normalised) and
  teacher ``P_t`` (a buffer, updated after every optimiser step by
  ``P_t <- alpha P_t + (1 - alpha) P_s``, alpha = 0.998). With ``z_hat`` the L2-normalised
  ``z``: ``s_loc = cos(sg(z_hat), P_s)`` (gradient into the student prototypes only) and
  ``s_glob = cos(z_hat, sg(P_t))`` (gradient into the projector only);
* **losses**: ``L_smooth = l(signal, signal; b1) + l(signal, signal[perm]; b2)`` on the soft
  assignments ``softmax(s_glob / T)`` (T = 0.1, ``perm`` a permutation of the batch without
  fixed point), and ``L_data = CE(s_loc, argmax s_glob)`` (untempered cosine logits);
* **prediction**: ``argmax log_softmax(2 s_glob)``, with the codes ``z`` of the image and of
  its mirror image averaged (horizontal-flip test-time augmentation).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynaguide.smooseg.smoothness import derangement, smoothness_loss

__all__ = [
    "Projector",
    "Prototypes",
    "SmooSegConfig",
    "SmooSegHead",
    "make_optimizer",
    "smooseg_losses",
]


@dataclass(frozen=True)
class SmooSegConfig:
    """Hyperparameters of the head and its training (defaults: the authors' configuration;
    the shifts are their Cityscapes / default values).

    Attributes
    ----------
    n_classes : int
        K, the number of prototypes.
    feat_dim : int
        D, the backbone's feature size.
    dim : int
        Code size (64).
    dropout : float
        Dropout2d probability of the three feature copies (0.2).
    temperature : float
        T of the soft assignments in the smoothness loss (0.1).
    alpha : float
        EMA factor of the teacher prototypes (0.998).
    pos_intra_shift, neg_inter_shift : float
        b1 (pairs within an image) and b2 (pairs across images).
    pointwise : bool
        Row centring of the feature similarities.
    lr_projector, lr_prototypes : float
        Adam learning rates (1e-4 and 5e-4).
    """

    n_classes: int
    feat_dim: int
    dim: int = 64
    dropout: float = 0.2
    temperature: float = 0.1
    alpha: float = 0.998
    pos_intra_shift: float = -0.02
    neg_inter_shift: float = 0.5
    pointwise: bool = True
    lr_projector: float = 1e-4
    lr_prototypes: float = 5e-4

    def __post_init__(self) -> None:
        """Validate every field (ValueError naming it)."""
        for name, lo, hi in (("n_classes", 2, 4096), ("feat_dim", 1, 1 << 16), ("dim", 1, 4096)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"SmooSegConfig.{name} must be an int in [{lo}, {hi}], got {v!r}")
        checks = (
            ("dropout", 0.0, 0.99),
            ("temperature", 1e-4, 100.0),
            ("alpha", 0.0, 1.0),
            ("pos_intra_shift", -2.0, 2.0),
            ("neg_inter_shift", -2.0, 2.0),
            ("lr_projector", 0.0, 10.0),
            ("lr_prototypes", 0.0, 10.0),
        )
        for name, lo, hi in checks:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise ValueError(
                    f"SmooSegConfig.{name} must be a number in [{lo}, {hi}], got {v!r}"
                )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return dataclasses.asdict(self)


class Projector(nn.Module):
    """``f (B, D, h, w) -> (signal, z)``: the dropped feature copy and the 64-d codes."""

    def __init__(self, feat_dim: int, dim: int = 64, dropout: float = 0.2) -> None:
        super().__init__()
        self.linear = nn.Conv2d(feat_dim, dim, 1)
        self.nonlinear = nn.Sequential(
            nn.Conv2d(feat_dim, feat_dim, 1), nn.SiLU(), nn.Conv2d(feat_dim, dim, 1)
        )
        self.drop = nn.Dropout2d(dropout)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Three independent Dropout2d masks: linear branch, nonlinear branch, signal."""
        z = self.linear(self.drop(feats)) + self.nonlinear(self.drop(feats))
        return self.drop(feats), z


class Prototypes(nn.Module):
    """Student prototypes (a parameter) and their EMA teacher (a buffer), K x dim."""

    def __init__(self, n_classes: int, dim: int = 64, alpha: float = 0.998) -> None:
        super().__init__()
        w = torch.empty(n_classes, dim)
        nn.init.xavier_normal_(w)
        w = F.normalize(w, dim=1)
        self.student = nn.Parameter(w)
        self.register_buffer("teacher", w.clone())
        self.alpha = float(alpha)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s_loc, s_glob)``, each (B, K, h, w) cosines, with the stop-gradients of SmooSeg."""
        z_hat = F.normalize(z, dim=1)
        p_s = F.normalize(self.student, dim=1)
        p_t = F.normalize(self.teacher, dim=1).detach()
        s_loc = torch.einsum("bchw,kc->bkhw", z_hat.detach(), p_s)
        s_glob = torch.einsum("bchw,kc->bkhw", z_hat, p_t.to(z_hat.dtype))
        return s_loc, s_glob

    @torch.no_grad()
    def ema_update(self) -> None:
        """``teacher <- alpha * teacher + (1 - alpha) * student`` (after each optimiser step)."""
        self.teacher.mul_(self.alpha).add_(self.student.detach(), alpha=1.0 - self.alpha)


class SmooSegHead(nn.Module):
    """Projector + prototypes. ``forward(feats) -> (signal, s_loc, s_glob)``."""

    def __init__(self, config: SmooSegConfig) -> None:
        super().__init__()
        if not isinstance(config, SmooSegConfig):
            raise TypeError(f"config must be a SmooSegConfig, got {type(config).__name__}")
        self.config = config
        self.projector = Projector(config.feat_dim, config.dim, config.dropout)
        self.prototypes = Prototypes(config.n_classes, config.dim, config.alpha)

    def _check(self, feats: Any) -> torch.Tensor:
        if not isinstance(feats, torch.Tensor) or feats.ndim != 4:
            raise ValueError(
                f"SmooSeg head: features must be a (B, {self.config.feat_dim}, h, w) tensor, got "
                f"{type(feats).__name__} {tuple(getattr(feats, 'shape', ()))}"
            )
        if feats.shape[1] != self.config.feat_dim:
            raise ValueError(
                f"SmooSeg head: features have {feats.shape[1]} channels, the head was built for "
                f"feat_dim={self.config.feat_dim} (features of shape {tuple(feats.shape)})"
            )
        return feats

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dropped signal (B, D, h, w), s_loc and s_glob (B, K, h, w)."""
        signal, z = self.projector(self._check(feats))
        s_loc, s_glob = self.prototypes(z)
        return signal, s_loc, s_glob

    def codes(self, feats: torch.Tensor, *, flip: bool = True) -> torch.Tensor:
        """Codes ``z`` (B, dim, h, w) of the features; with ``flip`` the average with the codes of
        the mirrored features (call in eval mode: no dropout)."""
        z = self.projector(self._check(feats))[1]
        if flip:
            z = (z + self.projector(feats.flip(-1))[1].flip(-1)) / 2
        return z

    def class_log_probs(self, z: torch.Tensor) -> torch.Tensor:
        """``log_softmax(2 s_glob)`` (B, K, h, w) of codes ``z`` at any resolution."""
        return torch.log_softmax(2.0 * self.prototypes(z)[1], dim=1)


def smooseg_losses(
    signal: torch.Tensor,
    s_loc: torch.Tensor,
    s_glob: torch.Tensor,
    config: SmooSegConfig,
    *,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """``{"loss", "smooth", "data", "intra", "inter"}`` of one training batch (B >= 2).

    ``smooth = intra + inter`` with ``intra = l(signal, signal; b1)`` and
    ``inter = l(signal, signal[perm]; b2)`` on ``softmax(s_glob / T)``; ``perm`` is a
    derangement of the batch drawn from ``generator``; ``data = CE(s_loc, argmax s_glob)``.
    """
    if signal.shape[0] < 2:
        raise ValueError(
            f"SmooSeg training needs batches of at least 2 images (cross-image pairs), got "
            f"{signal.shape[0]}"
        )
    probs = torch.softmax(s_glob.float() / config.temperature, dim=1)
    sig = signal.float()
    perm = derangement(sig.shape[0], generator=generator).to(sig.device)
    kw = {"pointwise": config.pointwise}
    intra = smoothness_loss(sig, sig, probs, probs, shift=config.pos_intra_shift, **kw)
    inter = smoothness_loss(sig, sig[perm], probs, probs[perm], shift=config.neg_inter_shift, **kw)
    target = s_glob.detach().argmax(1)
    data = F.cross_entropy(s_loc.float(), target)
    smooth = intra + inter
    return {"loss": smooth + data, "smooth": smooth, "data": data, "intra": intra, "inter": inter}


def make_optimizer(head: SmooSegHead, config: SmooSegConfig | None = None) -> torch.optim.Adam:
    """Adam with two parameter groups: the projector (``lr_projector``) and the student
    prototypes (``lr_prototypes``)."""
    cfg = config or head.config
    return torch.optim.Adam(
        [
            {"params": list(head.projector.parameters()), "lr": cfg.lr_projector},
            {"params": [head.prototypes.student], "lr": cfg.lr_prototypes},
        ]
    )


def is_finite(value: torch.Tensor) -> bool:
    """Whether a scalar loss is finite."""
    return math.isfinite(float(value.detach()))
