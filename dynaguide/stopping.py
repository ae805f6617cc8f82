"""The stopping rules of N refinements at once (one image is N = 1).

Every refinement (one image, or one slot of a batch) stops at the first of:

* ``K <= floor``: some iteration since the previous check had at most ``floor`` distinct
  argmax labels (``floor`` is ``config.min_labels``, or ``opt_nC - 1`` after a silhouette
  phase with ``config.silhouette_stop``; 0 disables the rule);
* convergence: with ``config.convergence_tol > 0`` the labels are snapshotted at the
  first check and compared with the current ones at the first check at least
  ``config.convergence_window`` iterations later; fewer than ``convergence_tol`` of the
  pixels changed stops it, otherwise the current labels become the snapshot;
* the time budget (a deadline per refinement);
* ``config.max_iter`` iterations.

Checks run every ``every`` iterations (:func:`check_interval`: every iteration on CPU,
where reading a number costs nothing, ``config.check_every`` on CUDA) and read the device
once for the whole batch. The loss window since the previous check is also tested for NaN
or infinity, so a caller can report divergence.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dynaguide.config import RefineConfig

__all__ = ["CheckResult", "Stopper", "check_interval", "stop_floor"]


def check_interval(config: RefineConfig, device: torch.device) -> int:
    """Iterations between stopping checks: 1 on CPU, ``config.check_every`` elsewhere."""
    return 1 if device.type == "cpu" else config.check_every


def stop_floor(config: RefineConfig, opt_clusters: int | None) -> int:
    """The K floor of the ``K <= floor`` rule: ``opt_nC - 1`` after a silhouette phase with
    ``silhouette_stop``, else ``config.min_labels`` (0 disables the rule)."""
    if opt_clusters is not None and config.silhouette_stop:
        return opt_clusters - 1
    return config.min_labels


@dataclass
class CheckResult:
    """What one :meth:`Stopper.check` read from the device, one entry per refinement."""

    reasons: list[str | None]  # why to stop now (None: go on; always None where not due)
    loss: list[float]  # loss of the iteration just done
    k: list[int]  # K of the iteration just done
    finite: list[bool]  # every loss since the previous check is finite


class Stopper:
    """Stopping rules of the N refinements of one size, vectorised over N.

    Parameters
    ----------
    config : RefineConfig
    device : torch.device
    size : (H, W)
        Label map size shared by the refinements.
    every : int
        Iterations between checks (:func:`check_interval`).

    Membership follows the batch: :meth:`rebuild` keeps some refinements (in a new order)
    and appends new ones; the snapshot and per-refinement state move with them.
    """

    def __init__(
        self, config: RefineConfig, device: torch.device, size: tuple[int, int], every: int
    ):
        self.config = config
        self.device = device
        self.every = every
        h, w = size
        self.floor = torch.zeros(0, dtype=torch.long, device=device)
        self.floors: list[int] = []  # the same on the host (for the stop message)
        self.snapshot = torch.zeros(0, h, w, dtype=torch.long, device=device)
        self.snap_iter: list[int | None] = []
        self.deadlines: list[float | None] = []
        self.budgets: list[float | None] = []
        self._cols = torch.arange(config.max_iter, device=device)
        self._size = size

    def __len__(self) -> int:
        return len(self.snap_iter)

    def rebuild(
        self,
        keep: Sequence[int],
        floors: Sequence[int],
        deadlines: Sequence[float | None],
        budgets: Sequence[float | None] | None = None,
    ) -> None:
        """Keep the refinements at positions ``keep`` and append new ones with the given
        K ``floors`` and ``deadlines`` (``time.perf_counter()`` values or None); ``budgets``
        (seconds, for the stop message) default to ``config.time_budget``."""
        dev = self.device
        if budgets is None:
            budgets = [self.config.time_budget] * len(floors)
        if not len(floors) == len(deadlines) == len(budgets):
            raise ValueError("floors, deadlines and budgets must have one entry per newcomer")
        idx = torch.tensor(list(keep), dtype=torch.long, device=dev)
        h, w = self._size
        new_floor = torch.tensor([int(f) for f in floors], dtype=torch.long, device=dev)
        self.floor = torch.cat([self.floor.index_select(0, idx), new_floor])
        fresh = torch.zeros(len(floors), h, w, dtype=torch.long, device=dev)
        self.snapshot = torch.cat([self.snapshot.index_select(0, idx), fresh])
        self.floors = [self.floors[p] for p in keep] + [int(f) for f in floors]
        self.snap_iter = [self.snap_iter[p] for p in keep] + [None] * len(floors)
        self.deadlines = [self.deadlines[p] for p in keep] + list(deadlines)
        self.budgets = [self.budgets[p] for p in keep] + list(budgets)

    def check(
        self,
        due: Sequence[bool],
        its: Sequence[int],
        hist_loss: torch.Tensor,
        hist_k: torch.Tensor,
        labels: torch.Tensor,
    ) -> CheckResult:
        """Evaluate the rules of the refinements flagged in ``due``.

        Parameters
        ----------
        due : sequence of bool, (N,)
            Which refinements reach a check with this iteration.
        its : sequence of int, (N,)
            0-based iteration each refinement just did.
        hist_loss, hist_k : Tensor (N, max_iter)
            Loss and K histories on the device (filled up to ``its``).
        labels : Tensor (N, H, W)
            Argmax labels of the iteration just done.

        Returns
        -------
        CheckResult
            With one device-to-host transfer for the whole batch.
        """
        cfg, dev, every = self.config, self.device, self.every
        n = len(self)
        if not len(due) == len(its) == hist_loss.shape[0] == hist_k.shape[0] == n:
            raise ValueError(f"due, its and the histories must have {n} rows")
        hi = torch.tensor(list(its), dtype=torch.long, device=dev)
        lo = (hi + 1 - every).clamp_min(0)
        cols = self._cols[: hist_k.shape[1]]
        window = (cols >= lo.unsqueeze(1)) & (cols <= hi.unsqueeze(1))
        hit = ((hist_k <= self.floor.unsqueeze(1)) & window).any(1) & (self.floor > 0)
        finite = (torch.isfinite(hist_loss) | ~window).all(1)
        rows = [hit.double(), finite.double()]
        snap_update: list[bool] = []
        if cfg.convergence_tol > 0:
            snap_update = [
                bool(d) and (s is None or i - s >= cfg.convergence_window)
                for d, s, i in zip(due, self.snap_iter, its, strict=True)
            ]
            if any(snap_update):  # compare and snapshot only where a window has passed
                rows.append((labels != self.snapshot).float().mean(dim=(1, 2)).double())
                mask = torch.tensor(snap_update, device=dev).view(-1, 1, 1)
                self.snapshot = torch.where(mask, labels, self.snapshot)
            else:
                rows.append(torch.zeros(n, dtype=torch.float64, device=dev))
        col = hi.unsqueeze(1)
        rows += [hist_loss.gather(1, col)[:, 0].double(), hist_k.gather(1, col)[:, 0].double()]
        table = torch.stack(rows).cpu().tolist()  # the one host synchronisation
        now = time.perf_counter()
        reasons: list[str | None] = []
        for p in range(n):
            reasons.append(self._reason(p, bool(due[p]), its[p], table, snap_update, now))
        return CheckResult(
            reasons=reasons,
            loss=table[-2],
            k=[int(v) for v in table[-1]],
            finite=[bool(v) for v in table[1]],
        )

    def _reason(
        self, p: int, due: bool, it: int, table: list[list[float]], snap: list[bool], now: float
    ) -> str | None:
        """Stop reason of refinement ``p`` from the transferred ``table`` (rows: floor hit,
        finite, [changed share], loss, K)."""
        if not due:
            return None
        cfg = self.config
        if table[0][p]:
            return f"K <= {self.floors[p]}"
        if snap and snap[p]:
            first = self.snap_iter[p] is None
            self.snap_iter[p] = it
            changed = table[2][p]
            if not first and changed < cfg.convergence_tol:
                return (
                    f"converged ({changed:.2e} of pixels changed over "
                    f"{cfg.convergence_window} iterations)"
                )
        deadline = self.deadlines[p]
        if deadline is not None and now > deadline:
            budget = self.budgets[p]
            return "time budget" + (f" ({budget:g} s)" if budget is not None else "")
        if it + 1 >= cfg.max_iter:
            return f"max_iter ({cfg.max_iter})"
        return None
