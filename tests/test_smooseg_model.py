"""SmooSeg head: stop-gradients, EMA, independent dropout masks, determinism, loss values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynaguide.smooseg.model import (
    SmooSegConfig,
    SmooSegHead,
    make_optimizer,
    smooseg_losses,
)


def _feats(b=3, d=12, h=5, w=6, seed=0) -> torch.Tensor:
    return torch.randn(b, d, h, w, generator=torch.Generator().manual_seed(seed))


def _head(d=12, k=4, seed=0, **kw) -> SmooSegHead:
    torch.manual_seed(seed)
    return SmooSegHead(SmooSegConfig(n_classes=k, feat_dim=d, dim=8, **kw))


def _grads(head: SmooSegHead) -> dict[str, torch.Tensor | None]:
    return {n: p.grad for n, p in head.named_parameters()}


def test_stop_gradients_are_where_smooseg_puts_them() -> None:
    head = _head()
    feats = _feats().requires_grad_(True)
    signal, s_loc, s_glob = head(feats)
    out = smooseg_losses(
        signal, s_loc, s_glob, head.config, generator=torch.Generator().manual_seed(1)
    )
    out["data"].backward(retain_graph=True)
    g = _grads(head)
    assert g["prototypes.student"] is not None and g["prototypes.student"].abs().sum() > 0
    assert all(v is None for n, v in g.items() if n.startswith("projector")), "data -> student only"
    assert feats.grad is None
    head.zero_grad(set_to_none=True)
    (into_signal,) = torch.autograd.grad(
        out["smooth"], signal, retain_graph=True, allow_unused=True
    )
    assert into_signal is None, "the feature similarities carry no gradient"
    out["smooth"].backward()
    g = _grads(head)
    assert g["prototypes.student"] is None, "the smoothness term reaches the projector only"
    assert all(
        v is not None and v.abs().sum() > 0 for n, v in g.items() if n.startswith("projector")
    )
    assert not head.prototypes.teacher.requires_grad
    assert "prototypes.teacher" in head.state_dict()


def test_prototypes_start_normalised_and_teacher_follows_by_ema() -> None:
    head = _head(alpha=0.9)
    protos = head.prototypes
    np.testing.assert_allclose(protos.student.detach().norm(dim=1).numpy(), 1.0, rtol=1e-6)
    assert torch.equal(protos.student.detach(), protos.teacher)
    opt = make_optimizer(head)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 5e-4]
    assert opt.param_groups[1]["params"][0] is protos.student
    teacher0 = protos.teacher.clone()
    signal, s_loc, s_glob = head(_feats())
    smooseg_losses(signal, s_loc, s_glob, head.config)["loss"].backward()
    opt.step()
    assert torch.equal(protos.teacher, teacher0), "the teacher does not train"
    protos.ema_update()
    expected = 0.9 * teacher0.double() + 0.1 * protos.student.detach().double()
    torch.testing.assert_close(protos.teacher.double(), expected, rtol=1e-6, atol=1e-7)


def test_three_dropout_masks_are_independent() -> None:
    head = _head(d=64, dropout=0.5).train()
    seen: dict[str, torch.Tensor] = {}
    head.projector.linear.register_forward_pre_hook(lambda m, a: seen.__setitem__("lin", a[0]))
    head.projector.nonlinear[0].register_forward_pre_hook(
        lambda m, a: seen.__setitem__("non", a[0])
    )
    feats = torch.ones(2, 64, 3, 3)
    signal, _, _ = head(feats)
    masks = [(x[:, :, 0, 0] != 0) for x in (seen["lin"], seen["non"], signal)]
    for m in masks:
        assert 0 < m.float().mean() < 1
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[0], masks[2])
    assert not torch.equal(masks[1], masks[2])
    head.eval()
    signal, _, _ = head(feats)
    assert torch.equal(signal, feats) and torch.equal(seen["lin"], feats)


def _train(seed: int, steps: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    head = SmooSegHead(SmooSegConfig(n_classes=3, feat_dim=12, dim=8))
    opt = make_optimizer(head)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        opt.zero_grad()
        smooseg_losses(*head(_feats(seed=step)), head.config, generator=gen)["loss"].backward()
        opt.step()
        head.prototypes.ema_update()
    return {k: v.clone() for k, v in head.state_dict().items()}


def test_cpu_training_is_deterministic_per_seed() -> None:
    a, b, c = _train(0), _train(0), _train(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def _reference_losses(head: SmooSegHead, feats: torch.Tensor, perm: np.ndarray) -> dict[str, float]:
    """Float64 composite written from the formulas, loops over the pairs (eval mode)."""
    cfg = head.config
    sd = {k: v.detach().double().numpy() for k, v in head.state_dict().items()}
    f = feats.double().numpy()
    b, d, h, w = f.shape
    x = f.reshape(b, d, h * w).transpose(0, 2, 1)  # (b, n, d)

    def conv(t, name):
        return t @ sd[name + ".weight"][:, :, 0, 0].T + sd[name + ".bias"]

    hid = conv(x, "projector.nonlinear.0")
    hid = hid / (1 + np.exp(-hid))
    z = conv(x, "projector.linear") + conv(hid, "projector.nonlinear.2")
    zh = z / np.linalg.norm(z, axis=2, keepdims=True)
    ps = sd["prototypes.student"] / np.linalg.norm(sd["prototypes.student"], axis=1, keepdims=True)
    pt = sd["prototypes.teacher"] / np.linalg.norm(sd["prototypes.teacher"], axis=1, keepdims=True)
    s_loc, s_glob = zh @ ps.T, zh @ pt.T
    e = np.exp((s_glob - s_glob.max(2, keepdims=True)) / cfg.temperature)
    p = e / e.sum(2, keepdims=True)

    def pair_loss(fa, fb, pa, pb, shift):
        # pointwise centring: each row minus its mean, plus the mean over the whole batch
        n = fa.shape[1]
        fsim = np.zeros((b, n, n))
        for i in range(b):
            for j in range(n):
                for k in range(n):
                    u, v = fa[i, j], fb[i, k]
                    fsim[i, j, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
        fsim = fsim - fsim.mean(2, keepdims=True) + fsim.mean()
        total = 0.0
        for i in range(b):
            qa = pa[i] / np.linalg.norm(pa[i], axis=1, keepdims=True)
            qb = pb[i] / np.linalg.norm(pb[i], axis=1, keepdims=True)
            total += ((fsim[i] - shift) * (1 - qa @ qb.T)).mean()
        return total / b

    intra = pair_loss(x, x, p, p, cfg.pos_intra_shift)
    inter = pair_loss(x, x[perm], p, p[perm], cfg.neg_inter_shift)
    target = s_glob.argmax(2)
    lse = np.log(np.exp(s_loc).sum(2))
    data = float((lse - np.take_along_axis(s_loc, target[..., None], 2)[..., 0]).mean())
    return {"intra": intra, "inter": inter, "data": data, "loss": intra + inter + data}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_match_a_float64_composite(seed: int) -> None:
    from dynaguide.smooseg.smoothness import derangement

    head = _head(seed=seed).eval()
    with torch.no_grad():  # move the teacher away from the student
        head.prototypes.teacher.add_(0.3 * torch.randn_like(head.prototypes.teacher))
    feats = _feats(b=4, seed=seed + 10)
    got = smooseg_losses(*head(feats), head.config, generator=torch.Generator().manual_seed(seed))
    perm = derangement(4, generator=torch.Generator().manual_seed(seed)).numpy()
    ref = _reference_losses(head, feats, perm)
    for key, value in ref.items():
        assert float(got[key].detach()) == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_bad_features_and_batches_are_refused() -> None:
    head = _head()
    with pytest.raises(ValueError, match="feat_dim=12"):
        head(torch.randn(2, 7, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 12, h, w\)"):
        head(torch.randn(12, 4, 4))
    with pytest.raises(ValueError, match="at least 2 images"):
        smooseg_losses(*head(torch.randn(1, 12, 4, 4)), head.config)
    with pytest.raises(ValueError, match="n_classes"):
        SmooSegConfig(n_classes=1, feat_dim=4)
    with pytest.raises(ValueError, match="alpha"):
        SmooSegConfig(n_classes=3, feat_dim=4, alpha=1.5)


def test_prediction_uses_flip_averaged_codes() -> None:
    head = _head().eval()
    feats = _feats()
    z = head.codes(feats, flip=True)
    z0 = head.projector(feats)[1]
    z1 = head.projector(feats.flip(-1))[1].flip(-1)
    torch.testing.assert_close(z, (z0 + z1) / 2)
    logp = head.class_log_probs(z)
    torch.testing.assert_close(logp, torch.log_softmax(2 * head.prototypes(z)[1], 1))
    torch.testing.assert_close(logp.exp().sum(1), torch.ones(3, 5, 6))


def test_package_exports_resolve() -> None:
    import dynaguide.smooseg as ss

    for name in ss.__all__:
        assert getattr(ss, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ss.nope  # noqa: B018
