"""The engine of batched refinement: N per-image refinements of one size trained at once.

:class:`BatchedRefiner` keeps, per image (a *slot*), what a solo
:class:`dynaguide.refine.RefineStep` keeps: its network (a row of
:class:`dynaguide.grouped_net.GroupedNetwork`), its input, K floor, guide aligner and
target, loss and K histories and its stopping state (:class:`dynaguide.stopping.Stopper`).
One :meth:`~BatchedRefiner.step` trains every slot once; :meth:`~BatchedRefiner.check`
applies the stopping rules with one host transfer; slots leave and join between steps
(:meth:`~BatchedRefiner.rebuild`). The losses are computed per image (``reduction="none"``)
and summed: the gradient of the sum with respect to image i's parameters is image i's
solo gradient, since no other image's loss depends on them. The driver is
:func:`dynaguide.batched_refine.refine_batch`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from dynaguide.config import RefineConfig
from dynaguide.grouped_net import GroupedNetwork, Method, check_method, merged_rows
from dynaguide.guidance.align import IGNORE_INDEX, GuideAligner
from dynaguide.objective import fused_objective, guidance_weight_at, objective
from dynaguide.refine import RefineResult, RefineStep, final_labels, fused_kernel
from dynaguide.stopping import Stopper, stop_floor

__all__ = ["BatchCallback", "BatchedRefiner"]

#: ``callback(index, iteration, loss, K)``: called at every stopping check of image ``index``.
BatchCallback = Callable[[int, int, float, int], None]
#: ``on_result(index, result)``: called as soon as image ``index`` has finished.
ResultHook = Callable[[int, RefineResult], None]


@dataclass
class _Slot:
    """One image in the batch and its host-side bookkeeping."""

    index: int
    x: torch.Tensor  # (1, 3, H, W)
    aligner: GuideAligner | None
    k_floor: int  # opt_nC (0 without the silhouette phase): K_eff = max(K, k_floor)
    stop_floor: int  # stop once K <= stop_floor (0 disables)
    opt_clusters: int | None
    init: dict[str, torch.Tensor]  # solo state dict at join time (dropped after the join)
    bn_batches: int  # num_batches_tracked of every BatchNorm
    t0: float
    it: int = 0  # iterations done
    last_target: torch.Tensor | None = field(default=None, repr=False)


class BatchedRefiner:
    """N per-image refinements of one size, trained as one grouped network.

    Most users want :func:`refine_batch`; this class is the engine: ``add`` images,
    ``step`` them all once, ``check`` the stopping rules and ``finish`` the ones done.

    Parameters
    ----------
    config : RefineConfig
    device : torch.device
    size : (H, W)
        Size shared by every image of this refiner.
    backend : str, optional
        Forces the loss backend (``"torch"`` = plain reference).
    channels_last : bool, optional
        Channels-last convolutions (as :func:`dynaguide.refine.refine`); default True for
        ``"grouped"``, False for ``"vmap"`` (which cannot use them).
    method : {"grouped", "vmap"}
        Grouped convolutions (default) or ``torch.func.vmap`` over ``functional_call``.
    amp : bool
        bf16 autocast for the network (as :class:`dynaguide.refine.RefineStep`).
    check_every : int, optional
        Iterations between stopping checks (default: 1 on CPU, ``config.check_every``
        on CUDA, as :func:`dynaguide.refine.refine`).
    """

    def __init__(
        self,
        config: RefineConfig,
        device: torch.device,
        size: tuple[int, int],
        *,
        backend: str | None = None,
        channels_last: bool | None = None,
        method: Method = "grouped",
        amp: bool = False,
        check_every: int | None = None,
    ):
        channels_last = check_method(method, channels_last)
        self.config = config
        self.device = device
        self.size = size
        self.backend = backend
        self.net = GroupedNetwork(
            config, device, channels_last=channels_last, method=method, amp=amp
        )
        self.fmt = self.net.fmt
        if check_every is None:
            check_every = 1 if device.type == "cpu" else config.check_every
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
        self.every = check_every
        self.slots: list[_Slot] = []
        # per-slot device state, (N, ...) each; filled by rebuild()
        h, w = size
        self.x = torch.zeros(1, 0, h, w, device=device)
        self.k_floor = torch.zeros(0, dtype=torch.long, device=device)
        self.hist_loss = torch.zeros(0, config.max_iter, device=device)
        self.hist_k = torch.zeros(0, config.max_iter, dtype=torch.long, device=device)
        self.targets = torch.zeros(0, h, w, dtype=torch.long, device=device)
        self.prev_labels = torch.zeros(0, h, w, dtype=torch.long, device=device)
        self.its = torch.zeros(0, dtype=torch.long, device=device)
        self.stopper = Stopper(config, device, size, check_every)
        # The fused kernel takes one guidance weight for the batch; an annealed weight
        # differs per image (each slot is at its own iteration): use the three losses.
        self.fused = None if config.guidance_anneal > 0 else fused_kernel(device, backend)

    # ------------------------------------------------------------------ membership
    def __len__(self) -> int:
        return len(self.slots)

    def new_slot(
        self, index: int, image: np.ndarray, guide_labels: np.ndarray | None, seed: int
    ) -> _Slot:
        """Build image ``index``'s network exactly as :class:`RefineStep` does (same seed,
        same silhouette phase, same guide aligner) and return it as a slot for :meth:`rebuild`."""
        cfg = self.config
        solo = RefineStep(
            image, cfg, guide_labels=guide_labels, device=self.device, seed=seed,
            backend=self.backend, channels_last=self.fmt == torch.channels_last,
        )  # fmt: skip
        floor = stop_floor(cfg, solo.opt_clusters)
        nbt = int(solo.model.out_norm.num_batches_tracked)
        state = {k: v.detach() for k, v in solo.model.state_dict().items()}
        return _Slot(
            index=index, x=solo.x, aligner=solo.aligner, k_floor=solo.opt_clusters or 0,
            stop_floor=floor, opt_clusters=solo.opt_clusters, init=state, bn_batches=nbt,
            t0=time.perf_counter(),
        )  # fmt: skip

    def rebuild(self, keep: Sequence[int], new: Sequence[_Slot]) -> None:
        """Keep the slots at positions ``keep`` (parameters, momentum, buffers, histories
        sliced) and append the ``new`` ones (fresh parameters, zero momentum)."""
        cfg, dev = self.config, self.device
        keep_idx = torch.tensor(list(keep), dtype=torch.long, device=dev)

        def merged(old: torch.Tensor, rows: list[torch.Tensor]) -> torch.Tensor:
            return merged_rows(old, keep_idx, rows)

        self.net.rebuild(keep, [s.init for s in new])
        for s in new:
            s.init = {}
        self.slots = [self.slots[p] for p in keep] + list(new)
        n = len(self.slots)
        h, w = self.size
        self.x = torch.cat([s.x for s in self.slots], dim=1).contiguous(memory_format=self.fmt)
        self.k_floor = torch.tensor([s.k_floor for s in self.slots], dtype=torch.long, device=dev)
        fresh = len(new)
        self.hist_loss = merged(self.hist_loss, [torch.zeros(cfg.max_iter, device=dev)] * fresh)
        self.hist_k = merged(
            self.hist_k, [torch.zeros(cfg.max_iter, dtype=torch.long, device=dev)] * fresh
        )
        self.stopper.rebuild(
            keep,
            [s.stop_floor for s in new],
            [None if cfg.time_budget is None else s.t0 + cfg.time_budget for s in new],
        )
        self.targets = merged(
            self.targets,
            [torch.full((h, w), IGNORE_INDEX, dtype=torch.long, device=dev)] * fresh,
        )
        self.prev_labels = merged(
            self.prev_labels, [torch.zeros(h, w, dtype=torch.long, device=dev)] * fresh
        )
        for s in new:
            s.last_target = None
        self.its = torch.tensor([s.it for s in self.slots], dtype=torch.long, device=dev)
        assert self.hist_loss.shape[0] == n

    def forward(self) -> torch.Tensor:
        """Response maps of all slots, (N, C, H, W), with the current parameters."""
        return self.net.forward(self.x)

    # ------------------------------------------------------------------ one iteration
    def step(self, refresh: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One training iteration of every slot; returns per-image (loss (N,), labels
        (N, H, W), K (N,)) as device tensors, and records loss and K in the histories.

        The objective is computed as :meth:`dynaguide.refine.RefineStep.step` computes it
        for each image: with the fused Triton objective where the loss backend is Triton
        (guide targets aligned to the previous iteration's labels; a guided image's first
        iteration, which has none, takes the unfused path), else with the three losses of
        :mod:`dynaguide.losses`.
        """
        opt = self.net.opt
        assert opt is not None
        opt.zero_grad(set_to_none=True)
        response = self.forward()
        n = len(self.slots)
        everyone = list(range(n))
        ready = everyone
        if self.fused is not None:
            ready = [p for p, s in enumerate(self.slots) if s.aligner is None or s.it > 0]
        if self.fused is None or not ready:
            loss, labels, k = self._unfused(response, everyone, refresh)
        elif len(ready) == n:
            loss, labels, k = self._fused(response, everyone, refresh)
        else:  # guided newcomers this iteration: split the batch as the solo loops would
            first = [p for p in everyone if p not in ready]
            idx_r = torch.tensor(ready, dtype=torch.long, device=self.device)
            idx_f = torch.tensor(first, dtype=torch.long, device=self.device)
            lr, lab_r, k_r = self._fused(response.index_select(0, idx_r), ready, refresh)
            lf, lab_f, k_f = self._unfused(response.index_select(0, idx_f), first, refresh)
            loss = lr.new_zeros(n).index_copy(0, idx_r, lr).index_copy(0, idx_f, lf.to(lr.dtype))
            labels = lab_r.new_empty(n, *lab_r.shape[1:])
            labels.index_copy_(0, idx_r, lab_r).index_copy_(0, idx_f, lab_f)
            k = k_r.new_empty(n).index_copy_(0, idx_r, k_r).index_copy_(0, idx_f, k_f)
        loss.sum().backward()
        opt.step()
        self.prev_labels = labels
        loss = loss.detach()
        col = self.its.unsqueeze(1)
        self.hist_loss.scatter_(1, col, loss.unsqueeze(1))
        self.hist_k.scatter_(1, col, k.unsqueeze(1))
        self.its += 1
        for s in self.slots:
            s.it += 1
            s.bn_batches += 1
        return loss, labels, k

    def _rows(self, t: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """Rows ``positions`` of a per-slot tensor (the tensor itself for all slots)."""
        if len(positions) == len(self.slots):
            return t
        return t.index_select(0, torch.tensor(list(positions), dtype=torch.long, device=t.device))

    def _unfused(
        self, response: torch.Tensor, positions: Sequence[int], refresh: Sequence[bool]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image objective of the slots ``positions`` (rows of ``response``), three losses."""
        target_of = None
        if any(self.slots[p].aligner is not None for p in positions):

            def target_of(labels: torch.Tensor) -> torch.Tensor:
                self._update_targets(positions, labels, refresh)
                return self._rows(self.targets, positions)

        k_floor = self._rows(self.k_floor, positions)
        gw = None
        if self.config.guidance_anneal > 0:
            weights = [guidance_weight_at(self.config, self.slots[p].it) for p in positions]
            gw = torch.tensor(weights, dtype=torch.float32, device=response.device)
        return objective(
            response, self.config, k_floor, target_of, backend=self.backend, reduction="none",
            guidance_weight=gw,
        )  # fmt: skip

    def _fused(
        self, response: torch.Tensor, positions: Sequence[int], refresh: Sequence[bool]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image objective of the slots ``positions`` through the fused Triton kernel."""
        assert self.fused is not None
        target = None
        if any(self.slots[p].aligner is not None for p in positions):
            self._update_targets(positions, self._rows(self.prev_labels, positions), refresh)
            target = self._rows(self.targets, positions)
        k_floor = self._rows(self.k_floor, positions)
        return fused_objective(self.fused, response, target, self.config, k_floor, reduction="none")

    def _update_targets(
        self, positions: Sequence[int], labels: torch.Tensor, refresh: Sequence[bool]
    ) -> None:
        """Align the guide of each slot in ``positions`` to its row of ``labels``
        (``labels[j]`` belongs to ``positions[j]``) into the per-slot target buffer."""
        for j, p in enumerate(positions):
            s = self.slots[p]
            if s.aligner is None:
                continue
            t = s.aligner.target(labels[j], refresh=refresh[p])
            # The aligner may update its target buffer in place (for CUDA graphs), so a
            # refresh always copies; without one it returns its previous target unchanged.
            if refresh[p] or t is not s.last_target:
                self.targets[p].copy_(t)
                s.last_target = t

    # ------------------------------------------------------------------ stopping
    def due(self) -> list[bool]:
        """Which slots reach one of their own stopping checks with the next iteration."""
        mx, every = self.config.max_iter, self.every
        return [(s.it + 1) % every == 0 or s.it + 1 == mx for s in self.slots]

    def check(
        self, due: Sequence[bool], labels: torch.Tensor, callback: BatchCallback | None = None
    ) -> dict[int, str]:
        """Stopping rules of the slots flagged in ``due`` (after their iteration), by
        :class:`dynaguide.stopping.Stopper` (the rules of a solo refinement) with a single
        device-to-host transfer. Returns ``{position: stop reason}``."""
        its = [s.it - 1 for s in self.slots]  # 0-based iteration just done
        res = self.stopper.check(due, its, self.hist_loss, self.hist_k, labels)
        out: dict[int, str] = {}
        for p, s in enumerate(self.slots):
            if not due[p]:
                continue
            if callback is not None:
                callback(s.index, its[p], res.loss[p], res.k[p])
            reason = res.reasons[p]
            if reason is not None:
                out[p] = reason
        return out

    def finish(self, p: int, reason: str, last: torch.Tensor) -> RefineResult:
        """The :class:`RefineResult` of the slot at position ``p``."""
        s = self.slots[p]
        n = s.it
        model = self.net.extract_model(p, s.bn_batches)
        labels = final_labels(model, s.x, last[p].clone(), self.config)
        return RefineResult(
            labels=labels,
            n_iter=n,
            loss_history=self.hist_loss[p, :n].tolist(),
            k_history=self.hist_k[p, :n].tolist(),
            stop_reason=reason,
            opt_clusters=s.opt_clusters,
            seconds=time.perf_counter() - s.t0,
            model=model,
        )


# --------------------------------------------------------------------------- driver
