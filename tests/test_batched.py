"""Batched refinement equals refining every image alone (dynaguide.batched_refine)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from dynaguide.batched_refine import (
    BatchedRefiner,
    auto_batch_size,
    estimate_refine_bytes,
    refine_batch,
)
from dynaguide.config import get_preset
from dynaguide.refine import RefineResult, refine


def _image(h: int, w: int, seed: int) -> np.ndarray:
    """Three noisy colour regions, different per seed."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8)
    img[:, : w // 2] = rng.integers(0, 256, 3)
    img[h // 2 :, w // 2 :] = rng.integers(0, 256, 3)
    img[: h // 2, w // 2 :] = rng.integers(0, 256, 3)
    noise = rng.integers(-25, 25, size=img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


def _guide(img: np.ndarray, seed: int) -> np.ndarray:
    g = np.random.default_rng(100 + seed).integers(0, 4, size=img.shape[:2])
    g[0, :] = -1  # some unguided pixels
    return g


def _assert_same(solo: RefineResult, batched: RefineResult, *, exact_loss: bool = False) -> None:
    assert batched.stop_reason == solo.stop_reason
    assert batched.n_iter == solo.n_iter
    assert batched.k_history == solo.k_history
    assert torch.equal(batched.labels, solo.labels)
    assert batched.opt_clusters == solo.opt_clusters
    tol = 0.0 if exact_loss else 1e-5
    np.testing.assert_allclose(batched.loss_history, solo.loss_history, rtol=tol, atol=tol)


def test_matches_solo_refinement_with_joins_buckets_guidance_and_stops():
    """5 images in 2 size buckets, batch of 2 (images join mid-run), stops at different
    iterations (K floor for some, max_iter for others), guidance on some images only."""
    cfg = get_preset("dynaguide").replace(max_iter=7, min_labels=16, convergence_tol=0.0)
    images = [
        _image(16, 20, 0),
        _image(12, 18, 1),
        _image(16, 20, 2),
        _image(16, 20, 3),
        _image(12, 18, 4),
    ]
    guides = [_guide(img, i) if i != 2 else None for i, img in enumerate(images)]
    seeds = [5, 6, 7, 8, 9]
    solo = [
        refine(img, cfg, guide_labels=g, seed=s)
        for img, g, s in zip(images, guides, seeds, strict=True)
    ]
    calls: list[tuple[int, int]] = []
    finished: list[int] = []
    batched = refine_batch(
        images, cfg, guide_labels=guides, seed=seeds, batch_size=2,
        callback=lambda i, it, loss, k: calls.append((i, it)),
        on_result=lambda i, res: finished.append(i),
    )  # fmt: skip
    for a, b in zip(solo, batched, strict=True):
        _assert_same(a, b)
    # the scenario really covers different stopping iterations and both stop rules
    assert len({r.n_iter for r in solo}) > 1
    assert {r.stop_reason.split(" ")[0] for r in solo} == {"K", "max_iter"}
    assert sorted(finished) == list(range(5))
    # CPU checks every iteration: one callback per image and iteration
    assert sorted(calls) == sorted((i, it) for i, r in enumerate(solo) for it in range(r.n_iter))


def test_sparse_checks_as_on_cuda(monkeypatch):
    """check_every > 1 (the CUDA schedule, forced on CPU): K-floor windows, joins only at
    check boundaries, the extra check at max_iter, callbacks only at checks."""
    import dynaguide.refine as refine_mod

    every = 3
    # the solo loop with the CUDA schedule
    monkeypatch.setattr(refine_mod, "check_interval", lambda config, device: every)
    cfg = get_preset("dynaguide").replace(max_iter=7, min_labels=18, convergence_tol=0.0)
    images = [_image(12, 14, s) for s in range(4)]
    guides = [_guide(img, i) if i % 2 else None for i, img in enumerate(images)]
    solo = [
        refine(img, cfg, guide_labels=g, seed=i)
        for i, (img, g) in enumerate(zip(images, guides, strict=True))
    ]
    calls: list[tuple[int, int]] = []
    batched = refine_batch(
        images, cfg, guide_labels=guides, seed=[0, 1, 2, 3], batch_size=2, check_every=every,
        callback=lambda i, it, loss, k: calls.append((i, it)),
    )  # fmt: skip
    for a, b in zip(solo, batched, strict=True):
        _assert_same(a, b)
    assert {r.n_iter for r in solo} <= {3, 6, 7} and len({r.n_iter for r in solo}) > 1
    expected = {(i, it) for i, r in enumerate(solo) for it in (2, 5, 6) if it < r.n_iter}
    assert set(calls) == expected and len(calls) == len(expected)
    with pytest.raises(ValueError, match="check_every"):
        refine_batch(images[:1], cfg, check_every=0)


def _assert_close_runs(solo: RefineResult, batched: RefineResult) -> None:
    """Solo and batched runs on a GPU: grouped and single convolutions round differently
    (and cuDNN may pick nondeterministic algorithms), so near-ties of the argmax can flip
    and a K-floor stop can move by an iteration. Same first loss, labels on nearly every
    pixel, losses close."""
    assert abs(batched.n_iter - solo.n_iter) <= 1
    n = min(solo.n_iter, batched.n_iter)
    np.testing.assert_allclose(batched.loss_history[:1], solo.loss_history[:1], rtol=1e-4)
    np.testing.assert_allclose(batched.loss_history[:n], solo.loss_history[:n], rtol=2e-2)
    assert np.all(np.abs(np.subtract(batched.k_history[:n], solo.k_history[:n])) <= 3)
    agree = (batched.labels == solo.labels).float().mean().item()
    assert agree >= 0.9, agree


def test_fused_triton_objective_matches_solo(monkeypatch):
    """The Triton backend (fused objective, guide aligned to the previous labels): mixed
    batches where a guided image's first iteration takes the unfused path while the others
    take the fused one, at the start and at a join. On CUDA tensors when a GPU is present,
    else on CPU tensors under TRITON_INTERPRET=1 (set by conftest), bit for bit there."""
    from dynaguide import backend

    on_gpu = torch.cuda.is_available()
    if not backend.available("triton") or not (on_gpu or os.environ.get("TRITON_INTERPRET") == "1"):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1 (set by conftest without a GPU)")
    device = "cuda" if on_gpu else "cpu"
    if on_gpu:  # fewer sources of divergence: no TF32, deterministic cuDNN algorithms
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = get_preset("dynaguide").replace(max_iter=5, min_labels=20, convergence_tol=0.0)
    images = [_image(12, 14, s) for s in range(3)]
    guides = [_guide(images[0], 0), None, _guide(images[2], 2)]
    solo = [
        refine(im, cfg, guide_labels=g, seed=i, backend="triton", device=device)
        for i, (im, g) in enumerate(zip(images, guides, strict=True))
    ]
    batched = refine_batch(
        images, cfg, guide_labels=guides, seed=[0, 1, 2], batch_size=2, backend="triton",
        device=device,
    )  # fmt: skip
    for a, b in zip(solo, batched, strict=True):
        assert b.labels.device.type == device
        (_assert_close_runs if on_gpu else _assert_same)(a, b)
    if not on_gpu:  # the scenario (verified on CPU): image 2 joined while image 1 went on
        assert solo[0].n_iter < solo[1].n_iter


def test_vmap_matches_grouped():
    cfg = get_preset("dynaguide").replace(max_iter=4, min_labels=0, convergence_tol=0.0)
    images = [_image(10, 12, s) for s in range(2)]
    guides = [_guide(images[0], 0), None]
    grouped = refine_batch(images, cfg, guide_labels=guides, seed=[0, 1], channels_last=False)
    vmapped = refine_batch(images, cfg, guide_labels=guides, seed=[0, 1], method="vmap")
    solo = [
        refine(im, cfg, guide_labels=g, seed=s, channels_last=False)
        for s, (im, g) in enumerate(zip(images, guides, strict=True))
    ]
    for a, b, c in zip(grouped, vmapped, solo, strict=True):
        assert torch.equal(a.labels, b.labels) and a.k_history == b.k_history
        np.testing.assert_allclose(b.loss_history, a.loss_history, rtol=1e-5)
        # NCHW grouped convs are not bit-identical to solo ones: values within round-off
        np.testing.assert_allclose(c.loss_history[:2], a.loss_history[:2], rtol=1e-5)
    with pytest.raises(ValueError, match="channels_last=False"):
        refine_batch(images, cfg, method="vmap", channels_last=True)


def test_grouped_forward_and_gradient_equal_solo():
    """One forward/backward of the grouped network against each solo network."""
    cfg = get_preset("dynaguide").replace(n_channels=8)
    images = [_image(9, 11, s) for s in range(3)]
    engine = BatchedRefiner(cfg, torch.device("cpu"), (9, 11))
    engine.rebuild([], [engine.new_slot(i, im, None, seed=i) for i, im in enumerate(images)])
    out = engine.forward()
    coef = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    (out * coef).sum().backward()
    from dynaguide.refine import RefineStep

    for i, im in enumerate(images):
        solo = RefineStep(im, cfg, seed=i)
        r = solo.model(solo.x)
        torch.testing.assert_close(out[i], r[0], rtol=1e-5, atol=1e-5)
        (r[0] * coef[i]).sum().backward()
        grads = dict(solo.model.named_parameters())
        for name, p in grads.items():
            lay = engine.net.layout[name]
            err = (lay.to_solo(engine.net.params[name].grad[i]) - p.grad).abs().max().item()
            # round-off relative to the gradient scale of the layer: biases before a
            # BatchNorm have a zero gradient in exact arithmetic, so only the round-off of
            # the layer's (weight-sized) terms is left there
            weight = grads.get(name.replace(".bias", ".weight"), p)
            scale = max(1.0, p.grad.abs().max().item(), weight.grad.abs().max().item())
            assert err <= 1e-5 * scale, (name, err)


def test_bad_inputs():
    cfg = get_preset("dfc").replace(max_iter=2)
    img = _image(8, 8, 0)
    with pytest.raises(ValueError, match=r"images\[1\]"):
        refine_batch([img, img[..., 0]], cfg)
    with pytest.raises(ValueError, match=r"images\[0\]"):
        refine_batch([img.astype(np.float32)], cfg)
    with pytest.raises(TypeError, match="single array"):
        refine_batch(img, cfg)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        refine_batch([img], cfg, batch_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        refine_batch([img], cfg, batch_size="big")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="guide_labels has 2 entries"):
        refine_batch([img], cfg, guide_labels=[None, None])
    with pytest.raises(ValueError, match=r"guide_labels\[0\]"):
        refine_batch([img], cfg, guide_labels=[np.zeros((3, 3), int)])
    with pytest.raises(ValueError, match="seed has 1 entries"):
        refine_batch([img, img], cfg, seed=[1])
    with pytest.raises(ValueError, match="method"):
        refine_batch([img], cfg, method="loop")  # type: ignore[arg-type]
    assert refine_batch([], cfg) == []


def test_auto_batch_size_and_memory_error():
    cfg = get_preset("dynaguide")
    per = estimate_refine_bytes(321, 481, cfg)
    assert per == 4 * (10 + 100 * 20) * 321 * 481  # documented: 2010 floats per pixel
    cpu = torch.device("cpu")
    assert auto_batch_size((321, 481), cfg, cpu, free=10 * per) == 7  # 70 % of 10 images
    assert auto_batch_size((321, 481), cfg, cpu, free=10 * per, n_images=3) == 3
    assert auto_batch_size((32, 32), cfg, cpu, free=2**50) == 64  # capped
    with pytest.raises(MemoryError, match="481x321"):
        auto_batch_size((321, 481), cfg, cpu, free=per)
    assert auto_batch_size((16, 16), cfg, cpu) >= 1  # real free memory


def test_segment_batch_batched_equals_sequential(tmp_path):
    import dynaguide

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    inputs = [_image(16, 20, 0), str(bad), _image(20, 16, 1), _image(16, 20, 2)]
    kw = {"preset": "dynaguide", "max_iter": 4, "seed": 3, "min_labels": 0}
    with pytest.warns(UserWarning, match="broken.png"):
        seq = dynaguide.segment_batch(inputs, on_error="skip", batch_size=1, **kw)
    seen: list[int] = []
    with pytest.warns(UserWarning, match="broken.png"):
        bat = dynaguide.segment_batch(
            inputs, on_error="skip", batch_size="auto", progress=lambda i, s: seen.append(i), **kw
        )
    assert seq[1] is None and bat[1] is None and sorted(seen) == [0, 1, 2, 3]
    for a, b in zip(seq, bat, strict=True):
        if a is None:
            continue
        assert b is not None and b.extra["batched"]
        np.testing.assert_array_equal(a.labels, b.labels)
        assert a.history["n_labels"] == b.history["n_labels"] and a.stop_reason == b.stop_reason
        np.testing.assert_allclose(a.history["loss"], b.history["loss"], rtol=1e-5)
        assert a.extra["guide"] == b.extra["guide"] == "kmeans"
    with pytest.raises(ValueError):  # the broken file, with on_error="raise"
        dynaguide.segment_batch(inputs, batch_size=2, **kw)
    with pytest.raises(ValueError, match="callback"):
        dynaguide.segment_batch(
            inputs[:1], preset="dynaguide", batch_size=2, callback=lambda *a: None
        )
    with pytest.raises(ValueError, match="batch_size"):
        dynaguide.segment_batch(inputs[:1], batch_size=0)
    with pytest.raises(TypeError, match="unknown RefineConfig field"):
        dynaguide.segment_batch(inputs[:1], batch_size=2, not_a_field=1)


def test_memory_error_when_one_image_does_not_fit(monkeypatch):
    import dynaguide
    import dynaguide.batch_memory as memory_mod

    monkeypatch.setattr(memory_mod, "free_memory", lambda device: 1000)
    cfg = get_preset("dfc").replace(max_iter=2)
    with pytest.raises(MemoryError, match="20x16"):
        refine_batch([_image(16, 20, 0)], cfg, batch_size=2)
    with pytest.warns(UserWarning, match="needs about"):
        out = dynaguide.segment_batch(
            [_image(16, 20, 0)], on_error="skip", batch_size=2, max_iter=2
        )
    assert out == [None]


def test_batched_annealing_and_time_budget_match_solo():
    cfg = get_preset("dynaguide").replace(max_iter=6, min_labels=0, guidance_anneal=4)
    imgs = [_image(16, 20, s) for s in (0, 1)]
    guides = [np.random.default_rng(s).integers(0, 3, size=(16, 20)) for s in (0, 1)]
    batched = refine_batch(imgs, cfg, guide_labels=guides, batch_size=2, seed=2)
    for img, guide, res in zip(imgs, guides, batched, strict=True):
        solo = refine(img, cfg, guide_labels=guide, seed=2)
        assert torch.equal(solo.labels, res.labels)
        # the solo CPU path sums the objective in the native one-buffer kernel, the batched one
        # in the three separate losses: the same loss up to float32 summation order
        np.testing.assert_allclose(solo.loss_history, res.loss_history, rtol=1e-4, atol=1e-6)
    slow = cfg.replace(max_iter=100_000, time_budget=0.2, guidance_anneal=0)
    for res in refine_batch(imgs, slow, batch_size=2):
        assert res.stop_reason.startswith("time budget") and res.n_iter < 100_000
