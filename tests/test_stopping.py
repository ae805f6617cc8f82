"""The stopping rules vectorised over N (dynaguide.stopping) against a scalar oracle: the
rules of the former single-image stopper written as a plain loop over one image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynaguide.config import get_preset
from dynaguide.stopping import Stopper, check_interval, stop_floor

MAX_ITER = 14
H, W = 4, 5


def _oracle(cfg, floor, every, k_hist, labels_hist):
    """(stop iteration 1-based, reason) of one image: the single-image rules, one scalar
    check at a time (K window since the last check, snapshot compared after the window)."""
    snapshot, snap_iter = None, 0
    for it in range(cfg.max_iter):
        if not ((it + 1) % every == 0 or it + 1 == cfg.max_iter):
            continue
        lo = max(0, it + 1 - every)
        if floor > 0 and min(k_hist[lo : it + 1]) <= floor:
            return it + 1, f"K <= {floor}"
        if cfg.convergence_tol > 0:
            if snapshot is None:
                snapshot, snap_iter = labels_hist[it].copy(), it
            elif it - snap_iter >= cfg.convergence_window:
                changed = float((labels_hist[it] != snapshot).mean())
                snapshot, snap_iter = labels_hist[it].copy(), it
                if changed < cfg.convergence_tol:
                    return it + 1, (
                        f"converged ({changed:.2e} of pixels changed over "
                        f"{cfg.convergence_window} iterations)"
                    )
    return cfg.max_iter, f"max_iter ({cfg.max_iter})"


def _histories(seed):
    """Three images: one whose K falls to the floor, one whose labels freeze, one that runs
    to max_iter (K stays high, labels keep changing)."""
    rng = np.random.default_rng(seed)
    k = np.full((3, MAX_ITER), 20)
    k[0, 5 + seed % 3 :] = 2  # hits the floor
    labels = rng.integers(0, 4, size=(3, MAX_ITER, H, W))
    freeze = 6 + seed % 4
    labels[1, freeze:] = labels[1, freeze]  # converges once a window has passed unchanged
    return k, labels


def _run(stopper, cfg, k, labels, order):
    """Drive ``stopper`` over the images ``order`` (all in one batch) until each stops."""
    n = len(order)
    hist_k = torch.zeros(n, cfg.max_iter, dtype=torch.long)
    hist_loss = torch.zeros(n, cfg.max_iter)
    stopped: dict[int, tuple[int, str]] = {}
    for it in range(cfg.max_iter):
        live = [j for j in range(n) if order[j] not in stopped]
        if not live:
            break
        hist_k[:, it] = torch.as_tensor(k[order, it])
        hist_loss[:, it] = float(it)
        due = [
            j in live and ((it + 1) % stopper.every == 0 or it + 1 == cfg.max_iter)
            for j in range(n)
        ]
        lab = torch.as_tensor(labels[order, it])
        res = stopper.check(due, [it] * n, hist_loss, hist_k, lab)
        assert res.k == [int(v) for v in k[order, it]] and all(res.finite)
        for j in live:
            if res.reasons[j] is not None:
                stopped[order[j]] = (it + 1, res.reasons[j])
    return stopped


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_of_three_equals_each_alone_and_the_oracle(every, seed):
    cfg = get_preset("dynaguide").replace(
        max_iter=MAX_ITER, min_labels=3, convergence_tol=0.01, convergence_window=2
    )
    k, labels = _histories(seed)
    floor = stop_floor(cfg, None)
    batch = Stopper(cfg, torch.device("cpu"), (H, W), every)
    batch.rebuild([], [floor] * 3, [None] * 3)
    together = _run(batch, cfg, k, labels, [0, 1, 2])
    for i in range(3):
        alone = Stopper(cfg, torch.device("cpu"), (H, W), every)
        alone.rebuild([], [floor], [None])
        assert _run(alone, cfg, k, labels, [i]) == {i: together[i]}
        assert together[i] == _oracle(cfg, floor, every, list(k[i]), labels[i])
    iters = {together[i][0] for i in range(3)}
    assert len(iters) == 3, together  # three different stop iterations
    assert [together[i][1].split(" ")[0] for i in range(3)] == ["K", "converged", "max_iter"]


def test_membership_moves_state_and_deadlines():
    cfg = get_preset("dynaguide").replace(max_iter=MAX_ITER, min_labels=0, convergence_tol=0.0)
    st = Stopper(cfg, torch.device("cpu"), (H, W), 1)
    st.rebuild([], [0, 5], [None, 0.0], [None, 2.5])  # the second one is past its deadline
    hist_k = torch.full((2, MAX_ITER), 9)
    hist_loss = torch.zeros(2, MAX_ITER)
    res = st.check([True, True], [0, 0], hist_loss, hist_k, torch.zeros(2, H, W, dtype=torch.long))
    assert res.reasons == [None, "time budget (2.5 s)"]
    st.rebuild([1], [4], [None])  # keep the second, add a third
    assert st.floors == [5, 4] and st.deadlines == [0.0, None] and len(st) == 2
    hist_loss[1, 1] = float("nan")
    res = st.check([False, True], [1, 1], hist_loss, hist_k, torch.zeros(2, H, W, dtype=torch.long))
    assert res.reasons[0] is None and res.finite == [True, False]
    with pytest.raises(ValueError, match="rows"):
        st.check([True], [1], hist_loss, hist_k, torch.zeros(2, H, W, dtype=torch.long))


def test_interval_and_floor():
    cfg = get_preset("dynaguide").replace(check_every=7, min_labels=3)
    assert check_interval(cfg, torch.device("cpu")) == 1
    assert check_interval(cfg, torch.device("meta")) == 7
    assert stop_floor(cfg, None) == 3
    assert stop_floor(cfg.replace(silhouette_stop=True), 6) == 5
