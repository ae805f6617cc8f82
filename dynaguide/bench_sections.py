"""The measurements of ``dynaguide bench``: (a) the objective, (b) one training iteration,
(c) batched throughput; each returns a JSON-ready dict. The command line and the report
are :mod:`dynaguide.bench_cli`.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "bench_image",
    "bench_losses",
    "bench_step",
    "bench_throughput",
    "copy_rate",
    "load_images",
    "table_row",
]


# --------------------------------------------------------------------------- helpers
def _median(seconds: list[float]) -> float:
    from dynaguide.bench_utils import summarize

    return summarize(seconds)["median"]


def copy_rate(device: Any, *, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Measured memory bandwidth in bytes/s: a device-to-device copy reads and writes ``nbytes``."""
    import torch

    from dynaguide.bench_utils import time_calls

    a = torch.empty(nbytes // 4, device=device).uniform_()
    b = torch.empty_like(a)
    t = _median(time_calls(lambda: b.copy_(a), repeats=repeats, warmup=2, device=device))
    return 2 * nbytes / t


def _loss_fast_path(device: Any) -> tuple[str | None, str]:
    """(name of the fast path, why) for the device: the loss backend that
    :mod:`dynaguide.dispatch` picks (honouring ``DYNAGUIDE_BACKEND``), None for the reference."""
    from dynaguide import dispatch
    from dynaguide.backend import BackendUnavailableError

    try:
        chosen = dispatch.resolve("similarity_loss", device).backend
    except BackendUnavailableError as exc:
        return None, str(exc)
    if chosen == "triton":
        return "triton", "fused Triton kernel dynaguide.kernels.dynaguide_loss"
    if chosen == "native":
        return "native", "native CPU objective (dynaguide.native_objective / native_losses)"
    return None, f"no fast loss backend for {device} (the torch reference was chosen)"


def _objective(config: Any, path: str) -> Callable[[Any, Any], Any]:
    """The refinement objective of ``config`` through ``path`` ("torch", "native", "triton"):
    :mod:`dynaguide.objective`, as the training loop calls it."""
    import torch

    from dynaguide import dispatch, objective

    def loss_of(r: Any, target: Any) -> Any:
        k_floor = torch.zeros((), dtype=torch.long, device=r.device)
        if path == "triton":
            fused = dispatch.resolve("fused_objective", r.device, "triton").fn
            return objective.fused_objective(fused, r, target, config, k_floor)[0]
        return objective.objective(r, config, k_floor, lambda _labels: target, backend=path)[0]

    return loss_of


def table_row(name: str, seconds: float, floor: float | None, unit: str = "ms") -> str:
    scale = 1e3 if unit == "ms" else 1.0
    fl = f"{floor * scale:10.3f}" if floor is not None else f"{'-':>10}"
    frac = f"{floor / seconds:7.1%}" if floor is not None and seconds > 0 else f"{'-':>7}"
    return f"  {name:<34}{seconds * scale:10.3f}{fl}{frac}"


# --------------------------------------------------------------------------- sections
def bench_losses(config: Any, device: Any, size: tuple[int, int], repeats: int) -> dict[str, Any]:
    """Section (a): fused fast path vs the torch composite, forward + backward."""
    import torch

    from dynaguide.bench_utils import summarize, time_calls

    fast, why = _loss_fast_path(device)
    h, w = size
    c = config.n_channels
    gen = torch.Generator(device="cpu").manual_seed(0)
    # (C, H, W) in the layout of a channels-last network's response, as in training
    r0 = torch.randn(h, w, c, generator=gen).to(device).permute(2, 0, 1)
    target = torch.randint(0, c, (h, w), generator=gen)
    target[: max(1, h // 8)] = -1  # some pixels without guidance
    target = target.to(device)
    out: dict[str, Any] = {"shape": [c, h, w], "fast_path": fast, "fast_path_note": why}
    paths = {"reference": "torch"} | ({"fast": fast} if fast else {})
    values: dict[str, float] = {}
    for name, path in paths.items():
        fn = _objective(config, path)
        r = r0.detach().clone().requires_grad_(True)

        def call(fn: Callable[[Any, Any], Any] = fn, r: Any = r) -> None:
            r.grad = None
            fn(r, target).backward()

        times = time_calls(call, repeats=repeats, warmup=2, device=device)
        out[name] = {"path": path, "seconds": summarize(times)}
        values[name] = float(fn(r0, target))
    if fast:
        out["speedup"] = out["reference"]["seconds"]["median"] / out["fast"]["seconds"]["median"]
        out["loss_rel_diff"] = abs(values["fast"] - values["reference"]) / max(
            abs(values["reference"]), 1e-12
        )
    return out


def bench_image(
    image: Any, guide: Any, config: Any, device: Any, repeats: int, rate: float
) -> dict[str, Any]:
    """Section (b): one training iteration, default path vs torch reference path."""
    from dynaguide.bench_utils import summarize, time_calls
    from dynaguide.model import conv_flops_per_pixel
    from dynaguide.refine import RefineStep

    h, w = image.shape[:2]
    out: dict[str, Any] = {"size": [h, w]}
    for name, opts in {
        "reference": {"backend": "torch", "channels_last": False},
        "default": {"backend": None, "channels_last": True},
    }.items():
        step = RefineStep(image, config, guide_labels=guide, device=device, seed=0, **opts)
        times = time_calls(step.step, repeats=repeats, warmup=2, device=device)
        out[name] = {"seconds_per_iter": summarize(times), **{k: str(v) for k, v in opts.items()}}
    out["speedup"] = (
        out["reference"]["seconds_per_iter"]["median"]
        / out["default"]["seconds_per_iter"]["median"]
    )
    out["gflop_per_iter"] = conv_flops_per_pixel(config) * h * w / 1e9
    out["floor_seconds_per_iter"] = out["gflop_per_iter"] * 1e9 / rate
    return out


def bench_step(
    images: Sequence[Any], guides: Sequence[Any], config: Any, device: Any, repeats: int
) -> dict[str, Any]:
    """One training iteration of N same-size images: N solo steps vs one batched step.

    Paths: ``sequential`` (N :class:`dynaguide.refine.RefineStep` steps, channels-last),
    ``grouped`` (one :class:`dynaguide.batched_refine.BatchedRefiner` step, channels-last),
    ``grouped_nchw`` (the same in NCHW, the layout vmap needs) and ``vmap``
    (``torch.func.vmap`` over ``functional_call``). Seconds per iteration of all N images.
    """
    from dynaguide.batched_refine import BatchedRefiner
    from dynaguide.bench_utils import summarize, time_calls
    from dynaguide.refine import RefineStep

    config = config.replace(max_iter=repeats + 2)  # room in the histories for every call
    size = images[0].shape[:2]
    picked = [(im, g) for im, g in zip(images, guides, strict=True) if im.shape[:2] == size]
    n = len(picked)
    solo = [
        RefineStep(im, config, guide_labels=g, device=device, seed=i)
        for i, (im, g) in enumerate(picked)
    ]
    engines = {}
    for name, opts in {
        "grouped": {"method": "grouped", "channels_last": True},
        "grouped_nchw": {"method": "grouped", "channels_last": False},
        "vmap": {"method": "vmap"},
    }.items():
        eng = BatchedRefiner(config, device, size, **opts)
        eng.rebuild([], [eng.new_slot(i, im, g, i) for i, (im, g) in enumerate(picked)])
        engines[name] = eng
    calls: dict[str, Callable[[], Any]] = {"sequential": lambda: [s.step() for s in solo]}
    for name, eng in engines.items():
        calls[name] = lambda eng=eng: eng.step([True] * n)
    times: dict[str, list[float]] = {k: [] for k in calls}
    for fn in calls.values():  # warm-up
        fn()
    for _ in range(repeats):  # interleaved
        for name, fn in calls.items():
            times[name] += time_calls(fn, repeats=1, warmup=0, device=device)
    out: dict[str, Any] = {"size": list(size), "images": n}
    out["seconds_per_iter"] = {k: summarize(v) for k, v in times.items()}
    med = {k: v["median"] for k, v in out["seconds_per_iter"].items()}
    out["speedup_vs_sequential"] = {
        k: med["sequential"] / v for k, v in med.items() if k != "sequential"
    }
    return out


def load_images(
    folder: Path | None, limit: int, scale: float, config: Any
) -> tuple[list[Any], list[str]]:
    """The first ``limit`` images of ``folder`` at refinement size, and their names
    (``folder=None``: scikit-image's bundled sample images, those of ``dynaguide demo``)."""
    from dynaguide.io import list_images, load_image
    from dynaguide.pipeline import refinement_size, resize_image

    if folder is None:
        from dynaguide.cli import bundled_demo_images

        paths = sorted(bundled_demo_images().values())[:limit]
    elif not folder.is_dir():
        raise FileNotFoundError(f"no image folder {folder}; pass --data")
    else:
        paths = list_images(folder)[:limit]
    if not paths:
        raise FileNotFoundError(f"no images in {folder}; pass --data")
    images = []
    for p in paths:
        rgb = load_image(p)
        size = refinement_size(*rgb.shape[:2], scale=scale, max_pixels=config.max_pixels)
        images.append(resize_image(rgb, size))
    return images, [p.name for p in paths]


def bench_throughput(
    images: Sequence[Any],
    guides: Sequence[Any],
    config: Any,
    device: Any,
    *,
    batch_size: int | str,
    rate: float,
    repeats: int = 1,
    vmap: bool = False,
) -> dict[str, Any]:
    """Section (c): images/s batched vs one at a time (and vmap with ``vmap=True``).

    Each path runs ``repeats`` times, interleaved; images/s use the median wall time.
    """
    import torch

    from dynaguide.batch_memory import auto_batch_size
    from dynaguide.batched_refine import refine_batch
    from dynaguide.bench_utils import summarize
    from dynaguide.model import conv_flops_per_pixel
    from dynaguide.refine import refine

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    n = len(images)
    warm = config.replace(max_iter=1)  # first-call costs (oneDNN primitives, allocator)
    refine(images[0], warm, guide_labels=guides[0], device=device)
    refine_batch(images[:2], warm, guide_labels=guides[:2], device=device, batch_size=2)

    runs: dict[str, list[float]] = {"sequential": [], "batched": []} | (
        {"vmap": []} if vmap else {}
    )
    seq: list[Any] = []
    bat: list[Any] = []
    for _ in range(repeats):  # interleaved, so drifting machine load hits every path alike
        sync()
        t = time.perf_counter()
        seq = [
            refine(im, config, guide_labels=g, device=device, seed=0)
            for im, g in zip(images, guides, strict=True)
        ]
        sync()
        runs["sequential"].append(time.perf_counter() - t)
        t = time.perf_counter()
        bat = refine_batch(
            images, config, guide_labels=guides, device=device, seed=0, batch_size=batch_size
        )
        sync()
        runs["batched"].append(time.perf_counter() - t)
        if vmap:
            t = time.perf_counter()
            refine_batch(
                images,
                config,
                guide_labels=guides,
                device=device,
                seed=0,
                batch_size=batch_size,
                method="vmap",
            )
            sync()
            runs["vmap"].append(time.perf_counter() - t)

    counts = Counter(im.shape[:2] for im in images)
    sizes = sorted(counts)
    flops = sum(
        conv_flops_per_pixel(config) * r.n_iter * im.shape[0] * im.shape[1]
        for r, im in zip(seq, images, strict=True)
    )
    floor = flops / rate
    differing = sum(int((a.labels != b.labels).sum()) for a, b in zip(seq, bat, strict=True))
    same = sum(
        bool(torch.equal(a.labels, b.labels)) and a.n_iter == b.n_iter
        for a, b in zip(seq, bat, strict=True)
    )
    return {
        "images": n,
        "sizes": [list(s) for s in sizes],
        "batch_size": {f"{w}x{h}": (auto_batch_size((h, w), config, device, n_images=counts[h, w]) if batch_size == "auto" else min(batch_size, counts[h, w])) for h, w in sizes},
        "iterations": sum(r.n_iter for r in seq),
        "seconds": {k: summarize(v) for k, v in runs.items()},
        "images_per_second": {k: n / summarize(v)["median"] for k, v in runs.items()},
        "speedup_batched_vs_sequential": summarize(runs["sequential"])["median"] / summarize(runs["batched"])["median"],
        "gflop": flops / 1e9,
        "floor_seconds": floor,
        "floor_images_per_second": n / floor,
        "identical_results": same,
        # batched = sequential up to float32 round-off, which the argmax can amplify
        "pixels_differing": differing,
        "pixels": sum(im.shape[0] * im.shape[1] for im in images),
    }  # fmt: skip
