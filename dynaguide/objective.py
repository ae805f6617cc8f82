"""The refinement objective, written once: ``sim_w * sim + w(K_eff) * continuity + g_w * guide``.

For one image, with ``K`` the number of distinct argmax labels of the current response
and ``K_eff = max(K, k_floor)`` (``k_floor`` is the silhouette phase's cluster count, 0
without one), the continuity weight ``w`` (:func:`continuity_weight`) is

* ``mu`` ("constant": DFC, Kim et al. 2020),
* ``K_eff / beta`` ("fsf" and its alias "dynaguide": DynaSeg's feature-similarity-first
  schedule, Guermazi et al. 2024),
* ``scf_mu / K_eff`` ("scf": DynaSeg's spatial-continuity-first schedule).

A batch of N images is N independent objectives: each image's total is formed from its
*own* losses and weights, then the totals are reduced ("mean": their average, "sum",
"none": the (N,) totals). So an image's contribution to a batch is exactly its loss
alone (divided by N for "mean").

Three implementations compute it: :func:`compose` from the three losses of
:mod:`dynaguide.losses` (any backend), the native one-buffer CPU objective
(:mod:`dynaguide.native_objective`) and the fused Triton kernel pair
(``dynaguide.kernels.dynaguide_loss``); :func:`objective` picks between the first two and
:func:`fused_objective` calls the third with a config's weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from dynaguide import losses, native_objective, op_checks
from dynaguide.config import RefineConfig
from dynaguide.guidance.align import IGNORE_INDEX

__all__ = [
    "WEIGHT_MODES",
    "ContinuityWeight",
    "ObjectiveResult",
    "compose",
    "continuity_weight",
    "dynamic_weight",
    "fused_objective",
    "guidance_weight_at",
    "objective",
    "objective_reference",
]

#: Continuity weight modes and the code the Triton kernels take.
WEIGHT_MODES = {"constant": 0, "fsf": 1, "dynaguide": 1, "scf": 2}
TargetOf = Callable[[torch.Tensor], torch.Tensor]


class ObjectiveResult(NamedTuple):
    """An objective's value (unpacks as ``loss, labels, n_labels``)."""

    loss: torch.Tensor
    labels: torch.Tensor
    n_labels: torch.Tensor


def continuity_weight(
    mode: str,
    k_eff: torch.Tensor,
    *,
    mu: float = 1.0,
    beta: float = 15.0,
    scf_mu: float = 50.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The continuity weight w(K_eff) on K's device (no host synchronisation).

    Parameters
    ----------
    mode : {"constant", "fsf", "dynaguide", "scf"}
        See the module docstring.
    k_eff : integer Tensor
        Number of labels (already floored), any shape.
    mu, beta, scf_mu : float
        Parameters of the modes.
    dtype : torch.dtype
        Dtype of the weight.

    Examples
    --------
    >>> continuity_weight("fsf", torch.tensor([30]), beta=15.0)
    tensor([2.])
    """
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weight must be one of {sorted(WEIGHT_MODES)}, got {mode!r}")
    kf = k_eff.to(dtype)
    if mode == "constant":
        return torch.full_like(kf, float(mu))
    if mode in ("fsf", "dynaguide"):
        return kf / beta
    return scf_mu / kf.clamp_min(1.0)


@dataclass(frozen=True)
class ContinuityWeight:
    """w(K) of one weight mode and its parameters (callable on an integer K tensor)."""

    mode: str
    mu: float = 1.0
    beta: float = 15.0
    scf_mu: float = 50.0

    @classmethod
    def from_config(cls, config: RefineConfig) -> ContinuityWeight:
        """The weight of ``config.weight_mode`` with the config's parameters."""
        return cls(config.weight_mode, config.mu, config.beta, config.scf_mu)

    def __call__(self, k_eff: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return continuity_weight(
            self.mode, k_eff, mu=self.mu, beta=self.beta, scf_mu=self.scf_mu, dtype=dtype
        )


def dynamic_weight(config: RefineConfig, k: torch.Tensor) -> torch.Tensor:
    """Continuity weight w(K) of ``config`` as a float32 device tensor."""
    return ContinuityWeight.from_config(config)(k)


def guidance_weight_at(config: RefineConfig, iteration: int) -> float:
    """Guidance weight of 0-based ``iteration``: constant, or decaying linearly to 0 over
    ``config.guidance_anneal`` iterations."""
    if config.guidance_anneal <= 0:
        return config.guidance_weight
    return config.guidance_weight * max(0.0, 1.0 - iteration / config.guidance_anneal)


def _k_eff(k: torch.Tensor, k_floor: int | torch.Tensor | None) -> torch.Tensor:
    if k_floor is None:
        return k
    if isinstance(k_floor, torch.Tensor):
        return torch.maximum(k, k_floor.to(k.dtype))
    return k.clamp_min(int(k_floor))


def compose(
    response: torch.Tensor,
    target_of: TargetOf | None,
    weight: ContinuityWeight,
    *,
    k_floor: int | torch.Tensor | None = None,
    similarity_weight: float = 1.0,
    guidance_weight: float | torch.Tensor = 1.0,
    penalty: losses.Penalty = "huber",
    neighbors: int = 8,
    delta: float = 1.0,
    ignore_index: int = IGNORE_INDEX,
    reduction: losses.Reduction = "mean",
    backend: str | None = None,
    validate: bool = True,
) -> ObjectiveResult:
    """The objective from the three losses of :mod:`dynaguide.losses`, per image, reduced.

    ``target_of(labels)`` gives the guide target for the current argmax labels (None: no
    guidance); ``guidance_weight`` may be a (N,) tensor (one weight per image). The
    continuity term is dropped when the weight is the constant 0.
    """
    op_checks.check_reduction(reduction)
    batched = op_checks.check_response(response).dim() == response.dim()
    r = response if batched else response.unsqueeze(0)  # its backward is a view, no copy
    sim, labels, k = losses.similarity_loss(r, reduction="none", backend=backend)
    if not batched:
        labels, k = labels[0], k[0]
    total = similarity_weight * sim
    if not (weight.mode == "constant" and weight.mu == 0):
        cont = losses.continuity_loss(
            r, penalty=penalty, neighbors=neighbors, delta=delta, reduction="none",
            backend=backend,
        )  # fmt: skip
        w = weight(_k_eff(k, k_floor), dtype=cont.dtype)
        total = total + w.reshape(-1) * cont
    gw = guidance_weight
    if target_of is not None and (isinstance(gw, torch.Tensor) or gw != 0):
        target = target_of(labels)
        guide = losses.guidance_loss(
            r, target if batched else target.unsqueeze(0), ignore_index=ignore_index,
            reduction="none", backend=backend, validate=validate,
        )  # fmt: skip
        total = total + (gw.to(guide.dtype) if isinstance(gw, torch.Tensor) else gw) * guide
    return ObjectiveResult(op_checks.reduce(total, reduction, batched), labels, k)


def objective(
    response: torch.Tensor,
    config: RefineConfig,
    k_floor: torch.Tensor,
    target_of: TargetOf | None = None,
    *,
    backend: str | None = None,
    reduction: losses.Reduction = "mean",
    guidance_weight: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``config``'s objective of ``response``: (loss, labels, K) as device tensors.

    ``guidance_weight`` overrides ``config.guidance_weight`` (the annealing schedule; a (N,)
    tensor gives each image of a batch its own). On CPU with the native losses the same
    objective runs with one gradient buffer (:mod:`dynaguide.native_objective`), else
    :func:`compose`. Targets from ``target_of`` are not range-checked (the refinement's
    come from the guide aligner; the native kernels check them anyway).
    """
    cfg = config
    gw = cfg.guidance_weight if guidance_weight is None else guidance_weight
    guided = target_of is not None and (isinstance(gw, torch.Tensor) or gw > 0)
    weight = ContinuityWeight.from_config(cfg)
    if native_objective.usable(response, backend) and not isinstance(gw, torch.Tensor):
        return native_objective.objective(
            response, target_of if guided else None,
            lambda k, dtype=torch.float32: weight(_k_eff(k, k_floor), dtype),
            similarity_weight=cfg.similarity_weight,
            guidance_weight=gw if guided else 0.0,
            penalty=cfg.penalty, neighbors=cfg.neighbors, delta=cfg.delta,
            ignore_index=IGNORE_INDEX, reduction=reduction,
        )  # fmt: skip
    out = compose(
        response, target_of if guided else None, weight, k_floor=k_floor,
        similarity_weight=cfg.similarity_weight, guidance_weight=gw, penalty=cfg.penalty,
        neighbors=cfg.neighbors, delta=cfg.delta, reduction=reduction, backend=backend,
        validate=False,
    )  # fmt: skip
    return out.loss, out.labels, out.n_labels


def fused_objective(
    fused: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    response: torch.Tensor,
    target: torch.Tensor | None,
    config: RefineConfig,
    k_floor: torch.Tensor,
    *,
    reduction: losses.Reduction = "mean",
    guidance_weight: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``config``'s objective through the fused entry point ``fused`` (one call; the
    ``fused_objective`` op of :mod:`dynaguide.dispatch`, e.g. the Triton kernel pair)."""
    cfg = config
    gw = cfg.guidance_weight if guidance_weight is None else guidance_weight
    out = fused(
        response, target, weight=cfg.weight_mode, mu=cfg.mu, beta=cfg.beta, scf_mu=cfg.scf_mu,
        k_min=k_floor, similarity_weight=cfg.similarity_weight,
        guidance_weight=gw if target is not None else 0.0,
        penalty=cfg.penalty, neighbors=cfg.neighbors, delta=cfg.delta,
        ignore_index=IGNORE_INDEX, reduction=reduction, validate=False,
    )  # fmt: skip
    return out[0], out[1], out[2]


def objective_reference(
    response: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    weight: str = "fsf",
    mu: float = 1.0,
    beta: float = 15.0,
    scf_mu: float = 50.0,
    k_min: int | torch.Tensor | None = None,
    similarity_weight: float = 1.0,
    guidance_weight: float = 1.0,
    penalty: str = "huber",
    neighbors: int = 8,
    delta: float = 1.0,
    ignore_index: int = -1,
    reduction: str = "mean",
    validate: bool = True,
) -> ObjectiveResult:
    """The objective from the plain PyTorch references, with the fused kernel's signature
    (``dynaguide.kernels.dynaguide_loss``): runs on any device.

    Returns ``(loss, labels, n_labels)``: the total, the int64 argmax labels and K (not
    ``K_eff``).
    """
    if weight not in WEIGHT_MODES:
        raise ValueError(f"weight must be one of {sorted(WEIGHT_MODES)}, got {weight!r}")
    return compose(
        response, None if target is None else (lambda _labels: target),
        ContinuityWeight(weight, mu, beta, scf_mu), k_floor=k_min,
        similarity_weight=similarity_weight, guidance_weight=guidance_weight,
        penalty=penalty, neighbors=neighbors, delta=delta, ignore_index=ignore_index,
        reduction=reduction, backend="torch", validate=validate,
    )  # fmt: skip
