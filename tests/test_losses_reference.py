"""The plain PyTorch loss references against independent per-pixel loops (float64)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dynaguide import losses
from dynaguide.backend import BackendUnavailableError


def _naive_continuity(r: torch.Tensor, penalty: str, neighbors: int, delta: float) -> float:
    """Loop over pixel pairs; r is (C, H, W) float64."""
    c, h, w = r.shape
    offsets = [((1, 0), (0, 0)), ((0, 1), (0, 0))]
    if neighbors == 8:
        offsets += [((1, 1), (0, 0)), ((1, 0), (0, 1))]
    total = 0.0
    for (ai, aj), (bi, bj) in offsets:
        acc, count = 0.0, 0
        for i, j in itertools.product(range(h), range(w)):
            pi, pj, qi, qj = i + ai, j + aj, i + bi, j + bj
            if max(pi, qi) >= h or max(pj, qj) >= w:
                continue
            for ch in range(c):
                d = float(r[ch, pi, pj] - r[ch, qi, qj])
                if penalty == "l1":
                    acc += abs(d)
                else:
                    acc += 0.5 * d * d if abs(d) < delta else delta * (abs(d) - 0.5 * delta)
                count += 1
        total += acc / count if count else 0.0
    return total


@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 1, 6), (4, 5, 1), (1, 2, 2), (3, 1, 1)])
@pytest.mark.parametrize("penalty", ["l1", "huber"])
@pytest.mark.parametrize("neighbors", [4, 8])
def test_continuity_matches_loops(shape, penalty, neighbors):
    r = torch.randn(shape, dtype=torch.float64) * 1.5
    delta = 0.7
    got = losses.continuity_loss_reference(r, penalty=penalty, neighbors=neighbors, delta=delta)
    want = _naive_continuity(r, penalty, neighbors, delta)
    assert math.isclose(float(got), want, rel_tol=1e-12, abs_tol=1e-12)


def test_continuity_batch_reductions():
    r = torch.randn(3, 4, 6, 7, dtype=torch.float64)
    per = losses.continuity_loss_reference(r, reduction="none")
    assert per.shape == (3,)
    singles = torch.stack([losses.continuity_loss_reference(r[i]) for i in range(3)])
    torch.testing.assert_close(per, singles)
    torch.testing.assert_close(losses.continuity_loss_reference(r, reduction="sum"), singles.sum())
    torch.testing.assert_close(losses.continuity_loss_reference(r), singles.mean())


def test_huber_delta_one_is_smooth_l1():
    r = torch.randn(5, 9, 8, dtype=torch.float64) * 2
    got = losses.continuity_loss_reference(r, penalty="huber", neighbors=4, delta=1.0)
    sl1 = torch.nn.SmoothL1Loss()
    z = torch.zeros(())
    want = sl1(r[:, 1:] - r[:, :-1], z.expand(5, 8, 8).double()) + sl1(
        r[:, :, 1:] - r[:, :, :-1], z.expand(5, 9, 7).double()
    )
    torch.testing.assert_close(got, want)


def test_similarity_semantics():
    r = torch.randn(2, 6, 5, 4, dtype=torch.float64, requires_grad=True)
    loss, labels, k = losses.similarity_loss_reference(r, reduction="none")
    want_labels = r.detach().argmax(1)
    assert torch.equal(labels, want_labels)
    for i in range(2):
        assert int(k[i]) == len(torch.unique(want_labels[i]))
        logp = torch.log_softmax(r[i].detach(), 0)
        want = -logp.gather(0, want_labels[i][None]).mean()
        torch.testing.assert_close(loss[i].detach(), want)
    # gradient of the mean CE against fixed labels: (softmax - onehot) / (H*W) / N
    loss.sum().backward()
    p = torch.softmax(r.detach(), 1)
    onehot = torch.nn.functional.one_hot(want_labels, 6).permute(0, 3, 1, 2)
    torch.testing.assert_close(r.grad, (p - onehot) / 20)


def test_guidance_ignore_index():
    r = torch.randn(4, 3, 3, dtype=torch.float64)
    t = torch.tensor([[0, 1, -1], [2, -1, 3], [-1, -1, -1]])
    got = losses.guidance_loss_reference(r, t)
    logp = torch.log_softmax(r, 0)
    vals = [-logp[t[i, j], i, j] for i in range(3) for j in range(3) if t[i, j] >= 0]
    torch.testing.assert_close(got, torch.stack(vals).mean())
    none = torch.full((3, 3), -1)
    assert float(losses.guidance_loss_reference(r, none)) == 0.0


def test_gradcheck_references():
    r = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    for penalty in ("l1", "huber"):
        assert torch.autograd.gradcheck(
            lambda x, p=penalty: losses.continuity_loss_reference(x, penalty=p, delta=0.5), (r,)
        )
    t = torch.randint(-1, 3, (4, 5))
    assert torch.autograd.gradcheck(lambda x: losses.guidance_loss_reference(x, t), (r,))


@pytest.mark.parametrize(
    "bad, err",
    [
        (torch.randn(4, 5), ValueError),
        (torch.randn(1, 2, 3, 4, 5), ValueError),
        (torch.zeros(3, 0, 4), ValueError),
        (torch.ones(3, 4, 5, dtype=torch.int64), TypeError),
        ([[1.0]], TypeError),
    ],
)
def test_bad_response(bad, err):
    with pytest.raises(err, match="response"):
        losses.continuity_loss(bad)
    with pytest.raises(err, match="response"):
        losses.similarity_loss(bad)


def test_bad_options_and_target():
    r = torch.randn(3, 4, 5)
    with pytest.raises(ValueError, match="penalty"):
        losses.continuity_loss(r, penalty="l2")
    with pytest.raises(ValueError, match="neighbors"):
        losses.continuity_loss(r, neighbors=6)
    with pytest.raises(ValueError, match="delta"):
        losses.continuity_loss(r, delta=0)
    with pytest.raises(ValueError, match="reduction"):
        losses.continuity_loss(r, reduction="avg", backend="torch")
    with pytest.raises(ValueError, match="target shape"):
        losses.guidance_loss(r, torch.zeros(4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        losses.guidance_loss(r, torch.zeros(4, 5))


def test_forced_backend_errors(monkeypatch):
    r = torch.randn(3, 4, 5)
    with pytest.raises(BackendUnavailableError):
        losses.continuity_loss(r, backend="cudnn")
    monkeypatch.setenv("DYNAGUIDE_BACKEND", "bogus")
    with pytest.raises(BackendUnavailableError, match="DYNAGUIDE_BACKEND"):
        losses.continuity_loss(r)
    monkeypatch.setenv("DYNAGUIDE_BACKEND", "torch")
    torch.testing.assert_close(losses.continuity_loss(r), losses.continuity_loss_reference(r))


def test_every_backend_agrees_with_reference():
    """Whatever fast path is available for CPU tensors matches the float64 reference."""
    from dynaguide import backend

    r64 = torch.randn(2, 7, 9, 11, dtype=torch.float64)
    r = r64.float().requires_grad_(True)
    for name in ("torch", "native", "triton"):
        if not (backend.available(name) and backend._runs_on(name, r.device)):
            continue
        try:
            loss = losses.continuity_loss(r, backend=name)
        except BackendUnavailableError:
            continue  # this backend does not implement the op
        want = losses.continuity_loss_reference(r64)
        torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-7)
