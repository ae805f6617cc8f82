"""The optimisation loop: determinism, stopping rules, dynamic weights, final pass, guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dynaguide.config import get_preset
from dynaguide.refine import RefineStep, dynamic_weight, refine


def _image(h: int = 24, w: int = 28, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = (200, 30, 30)
    img[h // 2 :, w // 2 :] = (20, 180, 40)
    img[: h // 2, w // 2 :] = (30, 40, 220)
    noise = rng.integers(-20, 20, size=img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def test_deterministic_for_a_seed():
    cfg = get_preset("dynaguide").replace(max_iter=8, min_labels=0)
    guide = np.random.default_rng(1).integers(0, 3, size=(24, 28))
    a = refine(_image(), cfg, guide_labels=guide, seed=3)
    b = refine(_image(), cfg, guide_labels=guide, seed=3)
    c = refine(_image(), cfg, guide_labels=guide, seed=4)
    assert torch.equal(a.labels, b.labels) and a.loss_history == b.loss_history
    assert a.loss_history != c.loss_history


def test_dynamic_weights():
    k = torch.tensor([5, 100])
    cfg = get_preset("dynaseg-fsf")
    torch.testing.assert_close(dynamic_weight(cfg, k), torch.tensor([5 / 15, 100 / 15]))
    torch.testing.assert_close(
        dynamic_weight(get_preset("dynaseg-scf"), k), torch.tensor([10.0, 0.5])
    )
    torch.testing.assert_close(
        dynamic_weight(get_preset("dynaguide"), k), torch.tensor([5 / 15, 100 / 15])
    )
    torch.testing.assert_close(
        dynamic_weight(get_preset("dfc").replace(mu=5.0), k), torch.tensor([5.0, 5.0])
    )


def test_stops_at_min_labels():
    cfg = get_preset("dfc").replace(max_iter=200, min_labels=60, convergence_tol=0.0)
    res = refine(_image(), cfg, seed=0)
    assert res.stop_reason == "K <= 60"
    assert res.k_history[-1] <= 60 and all(k > 60 for k in res.k_history[:-1])
    assert res.n_iter == len(res.k_history) < 200


def test_convergence_rule_stops_early():
    # a uniform image: labels settle immediately, nothing changes over a window
    img = np.full((16, 16, 3), 128, np.uint8)
    cfg = get_preset("dfc").replace(
        max_iter=300, min_labels=0, convergence_tol=0.01, convergence_window=5
    )
    res = refine(img, cfg, seed=0)
    assert res.stop_reason.startswith("converged")
    assert res.n_iter < 300


def test_max_iter_and_history_lengths():
    cfg = get_preset("dynaseg-scf").replace(max_iter=6, min_labels=0, convergence_tol=0.0)
    res = refine(_image(), cfg, seed=0)
    assert res.n_iter == 6 and len(res.loss_history) == 6 and len(res.k_history) == 6
    assert res.stop_reason == "max_iter (6)"
    assert res.opt_clusters is not None and 3 <= res.opt_clusters <= 26


def test_silhouette_floor_enters_weight():
    cfg = get_preset("dynaseg-scf").replace(max_iter=1, silhouette_k=(7, 7))
    step = RefineStep(_image(), cfg)
    assert step.opt_clusters == 7 and int(step.k_floor) == 7


@pytest.mark.parametrize("final_pass", ["last", "train", "eval"])
def test_final_pass_modes(final_pass):
    cfg = get_preset("dfc").replace(max_iter=5, min_labels=0, final_pass=final_pass)
    res = refine(_image(), cfg, seed=0)
    assert res.labels.shape == (24, 28) and res.labels.dtype == torch.int64
    assert int(res.labels.max()) < cfg.n_channels


def test_guidance_merges_what_the_guide_merges():
    """Four colour quadrants, a guide that says "left half, right half": the result follows the guide."""
    rng = np.random.default_rng(0)
    img = np.zeros((20, 20, 3), np.uint8)
    img[:10, :10], img[10:, :10] = (200, 30, 30), (30, 30, 200)
    img[:10, 10:], img[10:, 10:] = (30, 200, 30), (200, 200, 30)
    img = np.clip(img + rng.integers(-15, 15, img.shape), 0, 255).astype(np.uint8)
    guide = np.zeros((20, 20), np.int64)
    guide[:, 10:] = 1
    cfg = get_preset("dynaguide").replace(
        max_iter=40, min_labels=0, convergence_tol=0.0, guidance_weight=2.0
    )
    unguided = refine(img, cfg, seed=0).labels.numpy()
    guided = refine(img, cfg, guide_labels=guide, seed=0).labels.numpy()
    # without the guide the four colours keep more than two segments
    assert len(np.unique(unguided)) > 2
    left, right = np.unique(guided[:, :10]), np.unique(guided[:, 10:])
    assert len(left) == 1 and len(right) == 1 and left[0] != right[0]


def test_vote_guidance_keeps_the_guides_boundaries():
    """With superpixel voting, every guide region ends up one label; regions may share one."""
    img = _image()
    guide = np.zeros((24, 28), np.int64)
    guide[:, 7:14], guide[:, 14:21], guide[:, 21:] = 1, 2, 3  # four vertical stripes
    cfg = get_preset("dynaguide").replace(
        max_iter=40, min_labels=0, convergence_tol=0.0, guidance_weight=3.0, alignment="vote"
    )
    labels = refine(img, cfg, guide_labels=guide, seed=0).labels.numpy()
    for g in range(4):
        values, counts = np.unique(labels[guide == g], return_counts=True)
        assert counts.max() >= 0.95 * counts.sum(), (g, values, counts)


def test_reference_path_matches_default_path():
    """NCHW + torch losses (reference path) and the default path give the same run."""
    cfg = get_preset("dynaguide").replace(max_iter=4, min_labels=0)
    guide = np.random.default_rng(0).integers(0, 3, size=(24, 28))
    a = refine(_image(), cfg, guide_labels=guide, seed=0, backend="torch", channels_last=False)
    b = refine(_image(), cfg, guide_labels=guide, seed=0)
    np.testing.assert_allclose(a.loss_history, b.loss_history, rtol=1e-4)


def test_fused_triton_objective_matches_reference_path():
    """The fused Triton objective (interpreted on CPU) trains like the plain reference path."""
    pytest.importorskip("triton")
    from dynaguide import backend

    if not (backend.available("triton") and backend._runs_on("triton", torch.device("cpu"))):
        pytest.skip("Triton is not runnable on CPU here (TRITON_INTERPRET is not set)")
    img = _image(10, 12)
    guide = np.random.default_rng(0).integers(0, 3, size=(10, 12))
    cfg = get_preset("dynaguide").replace(max_iter=3, min_labels=0, n_channels=16)
    fused = RefineStep(img, cfg, guide_labels=guide, backend="triton")
    assert fused.fused is not None
    ref = RefineStep(img, cfg, guide_labels=guide, backend="torch", channels_last=False)
    for _ in range(3):
        lf, labf, kf = fused.step()
        lr, labr, kr = ref.step()
        torch.testing.assert_close(lf.double(), lr.double(), rtol=1e-4, atol=1e-6)
        assert torch.equal(labf, labr) and int(kf) == int(kr)


def _amp_dtypes(device):
    """(response dtype, loss dtype, parameter dtypes) of one amp=True iteration."""
    cfg = get_preset("dynaguide").replace(max_iter=2, silhouette="off")
    st = RefineStep(_image(12, 14), cfg, seed=0, amp=True, device=device)
    seen = []
    st.model.register_forward_hook(lambda mod, args, out: seen.append(out.dtype))
    loss, labels, k = st.step()
    return seen[0], loss.dtype, {p.dtype for p in st.model.parameters()}, labels, k


def test_amp_on_cpu_keeps_the_response_losses_and_parameters_in_float32():
    """amp=True on CPU: only the hidden 3x3 convolutions run in bfloat16 (tests/test_amp_cpu.py);
    the response, the losses and the parameters (and their SGD state) stay float32."""
    response, loss, params, labels, k = _amp_dtypes("cpu")
    assert response == torch.float32 and loss == torch.float32 and params == {torch.float32}
    assert labels.shape == (12, 14) and 1 <= int(k) <= 100


@pytest.mark.gpu
def test_amp_on_gpu():
    response, loss, params, labels, k = _amp_dtypes("cuda")
    assert response == torch.bfloat16 and loss == torch.float32 and params == {torch.float32}
    assert labels.device.type == "cuda" and 1 <= int(k) <= 100
