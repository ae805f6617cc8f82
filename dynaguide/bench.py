"""``dynaguide bench``: kernel, per-iteration and throughput speed, side by side in one run.

Three sections, each a ratio measured in the same process on the same inputs:

(a) losses
    The whole objective (similarity + w(K) * continuity + guidance), forward and
    backward, on one random ``(C, H, W)`` response: the device's fast path (the fused
    Triton kernel ``dynaguide.kernels.dynaguide_loss`` on CUDA; the native fused CPU
    losses of ``dynaguide.native_losses`` on CPU) against the plain PyTorch composite
    (``backend="torch"``). Without a fast path on the device the section says so
    instead of timing the reference twice. Floor: the fused kernel's HBM traffic (two
    reads of the response and one write of its gradient) over the copy bandwidth
    measured in the same run.
(b) one image
    Median time of one training iteration (:class:`dynaguide.refine.RefineStep`):
    the default path (channels-last convolutions, the dispatcher's loss backend) against
    the reference path (NCHW, ``backend="torch"``). Floor: the convolution FLOPs
    (:func:`dynaguide.model.conv_flops_per_pixel`) over the matmul rate measured in the
    same run (:func:`dynaguide.benchmarking.matmul_rate`, bf16 on CUDA, fp32 on CPU).
(c) throughput
    Images per second over BSDS500 val images (``--limit``, ``--scale``,
    ``--max-iter``, the preset's default guide computed beforehand and not timed):
    :func:`dynaguide.batched.refine_batch` against one :func:`dynaguide.refine.refine`
    after another. Both give the same results (the run counts the images whose labels
    are identical); the floor is the FLOPs of all the iterations actually run over the
    matmul rate.

Results go to ``benchmarks/results/bench-<device>.json`` (``bench-tiny-<device>.json``
with ``--tiny``, so a smoke run never overwrites real figures) via
:func:`dynaguide.benchmarking.write_results`.

    dynaguide bench --device cuda
    dynaguide bench --tiny --out /tmp/bench          # < 1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dynaguide.cli_types import fraction as _scale
from dynaguide.cli_types import positive_int as _positive_int

__all__ = [
    "DEFAULT_DATA",
    "add_arguments",
    "bench_image",
    "bench_losses",
    "bench_step",
    "bench_throughput",
    "build_parser",
    "copy_rate",
    "load_images",
    "main",
    "register",
    "run",
]

#: BSDS500 validation images of the development checkout (``../shared`` beside the repo).
DEFAULT_DATA = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "bsds500" / "val" / "images"
)

_FULL = {"limit": 8, "max_iter": 20, "scale": 0.5, "repeats": 7, "throughput_repeats": 3,
         "loss_size": (321, 481)}  # fmt: skip
_TINY = {"limit": 3, "max_iter": 3, "scale": 0.08, "repeats": 3, "throughput_repeats": 1,
         "loss_size": (24, 32)}  # fmt: skip


# --------------------------------------------------------------------------- CLI


def _batch_size(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected 'auto' or an integer >= 1, got {text!r}"
        ) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to ``parser``."""
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    parser.add_argument(
        "--tiny", action="store_true", help="small sizes and few repeats (a smoke run for CI)"
    )
    parser.add_argument("--preset", default="dynaguide", help="(default %(default)s)")
    parser.add_argument(
        "--data",
        type=Path,
        default=DEFAULT_DATA,
        help="folder of images for the throughput section",
    )
    parser.add_argument(
        "--limit", type=_positive_int, default=None, help="images (default 8; tiny 3)"
    )
    parser.add_argument(
        "--max-iter", type=_positive_int, default=None, help="iteration budget (default 20; tiny 3)"
    )
    parser.add_argument(
        "--scale", type=_scale, default=None, help="refinement scale (default 0.5; tiny 0.08)"
    )
    parser.add_argument(
        "--batch-size", type=_batch_size, default="auto", help="'auto' or an int (default auto)"
    )
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        default=None,
        help="timed calls in (a), (b) (default 7; tiny 3)",
    )
    parser.add_argument(
        "--throughput-repeats", type=_positive_int, default=None,
        help="timed runs per path in (c) (default 3; tiny 1)",
    )  # fmt: skip
    parser.add_argument(
        "--sections", default="losses,image,throughput",
        help="comma-separated subset of losses,image,throughput (default all)",
    )  # fmt: skip
    parser.add_argument(
        "--vmap", action="store_true", help="also time torch.func.vmap batching in (c)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default benchmarks/results)"
    )


def register(subparsers: Any) -> None:
    """Add the ``bench`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "bench",
        help="kernel, per-iteration and throughput speedups on this device",
        description=__doc__.split("\n\n", 1)[0] + " See `dynaguide.bench` for the sections.",
    )
    add_arguments(p)
    p.set_defaults(func=run, _parser=p)


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser with the ``bench`` options (for scripts)."""
    p = argparse.ArgumentParser(prog="dynaguide bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(p)
    p.set_defaults(func=run, _parser=p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the benchmark; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return run(args)


# --------------------------------------------------------------------------- helpers
def _median(seconds: list[float]) -> float:
    from dynaguide.benchmarking import summarize

    return summarize(seconds)["median"]


def copy_rate(device: Any, *, nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Measured memory bandwidth in bytes/s: a device-to-device copy reads and writes ``nbytes``."""
    import torch

    from dynaguide.benchmarking import time_calls

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


def _row(name: str, seconds: float, floor: float | None, unit: str = "ms") -> str:
    scale = 1e3 if unit == "ms" else 1.0
    fl = f"{floor * scale:10.3f}" if floor is not None else f"{'-':>10}"
    frac = f"{floor / seconds:7.1%}" if floor is not None and seconds > 0 else f"{'-':>7}"
    return f"  {name:<34}{seconds * scale:10.3f}{fl}{frac}"


# --------------------------------------------------------------------------- sections
def bench_losses(config: Any, device: Any, size: tuple[int, int], repeats: int) -> dict[str, Any]:
    """Section (a): fused fast path vs the torch composite, forward + backward."""
    import torch

    from dynaguide.benchmarking import summarize, time_calls

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
    from dynaguide.benchmarking import summarize, time_calls
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
    ``grouped`` (one :class:`dynaguide.batched.BatchedRefiner` step, channels-last),
    ``grouped_nchw`` (the same in NCHW, the layout vmap needs) and ``vmap``
    (``torch.func.vmap`` over ``functional_call``). Seconds per iteration of all N images.
    """
    from dynaguide.batched import BatchedRefiner
    from dynaguide.benchmarking import summarize, time_calls
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


def load_images(folder: Path, limit: int, scale: float, config: Any) -> tuple[list[Any], list[str]]:
    """The first ``limit`` images of ``folder`` at refinement size, and their names."""
    from dynaguide.io import list_images, load_image
    from dynaguide.pipeline import refinement_size, resize_image

    if not folder.is_dir():
        raise FileNotFoundError(f"no image folder {folder}; pass --data")
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
    from dynaguide.batched import refine_batch
    from dynaguide.benchmarking import summarize
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


# --------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    """Run the sections selected in ``args``; print a table and write the results JSON."""
    import torch

    from dynaguide.api import build_config, resolve_device
    from dynaguide.benchmarking import environment, matmul_rate, write_results
    from dynaguide.guidance import compute_guide_labels

    parser: argparse.ArgumentParser | None = getattr(args, "_parser", None)

    def fail(msg: str) -> int:
        if parser is not None:
            parser.error(msg)  # raises SystemExit(2)
        print(f"error: {msg}", file=sys.stderr)
        return 2

    try:
        device = resolve_device(args.device)
        config = build_config(args.preset)
    except (ValueError, KeyError) as exc:
        return fail(str(exc))
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - {"losses", "image", "throughput"})
    if unknown or not sections:
        return fail(f"--sections must name losses, image and/or throughput, got {args.sections!r}")
    d = _TINY if args.tiny else _FULL
    limit = args.limit or d["limit"]
    max_iter = args.max_iter or d["max_iter"]
    scale = args.scale or d["scale"]
    repeats = args.repeats or d["repeats"]
    config = config.replace(max_iter=max_iter)

    rate_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rate = matmul_rate(device, dtype=rate_dtype, n=512 if args.tiny else 2048)
    env = environment(device)
    print(
        f"dynaguide bench on {env['device']} (torch {env['torch']}, {env['torch_threads']} threads)"
    )
    print(
        f"matmul rate {rate / 1e9:.1f} GFLOP/s ({str(rate_dtype).replace('torch.', '')}, this run)"
    )
    payload: dict[str, Any] = {
        "benchmark": "bench",
        "tiny": bool(args.tiny),
        "preset": config.name,
        "matmul_gflops": rate / 1e9,
        "matmul_dtype": str(rate_dtype),
        # other processes distort CPU timings (preempted OpenMP threads): say how busy it was
        "load_average_at_start": list(os.getloadavg()),
    }
    header = f"  {'':<34}{'measured':>10}{'floor':>10}{'floor%':>7}"

    if "losses" in sections:
        bw = copy_rate(device, nbytes=(16 if args.tiny else 256) * 2**20)
        res = bench_losses(config, device, d["loss_size"], repeats)
        c, h, w = res["shape"]
        floor = 3 * c * h * w * 4 / bw  # 2 reads of the response + 1 gradient write
        res["copy_gbps"] = bw / 1e9
        res["floor_seconds"] = floor
        print(
            f"\n(a) objective fwd+bwd, response {c}x{h}x{w} float32 [ms]; floor = 3 passes at {bw / 1e9:.1f} GB/s"
        )
        print(header)
        print(_row("torch reference composite", res["reference"]["seconds"]["median"], floor))
        if res["fast_path"]:
            print(_row(f"fast path ({res['fast_path']})", res["fast"]["seconds"]["median"], floor))
            print(f"  speedup {res['speedup']:.2f}x (loss rel. diff {res['loss_rel_diff']:.1e})")
        else:
            print(f"  no fast path on {device.type}: {res['fast_path_note']}")
        payload["losses"] = res

    images: list[Any] = []
    names: list[str] = []
    guides: list[Any] = []
    if "image" in sections or "throughput" in sections:
        try:
            images, names = load_images(Path(args.data), limit, scale, config)
        except (FileNotFoundError, OSError, ValueError) as exc:
            return fail(str(exc))
        guides = [compute_guide_labels(config.default_guidance, im)[0] for im in images]
        payload["data"] = {"folder": str(args.data), "images": names, "scale": scale}

    if "image" in sections:
        if args.tiny:
            img, guide = images[0], guides[0]
        else:  # full resolution
            img, _ = load_images(Path(args.data), 1, 1.0, config)
            img = img[0]
            guide = compute_guide_labels(config.default_guidance, img)[0]
        res = bench_image(img, guide, config, device, repeats, rate)
        h, w = res["size"]
        print(
            f"\n(b) one training iteration, {names[0]} at {w}x{h} [ms]; floor = {res['gflop_per_iter']:.2f} GFLOP at the matmul rate"
        )
        print(header)
        floor = res["floor_seconds_per_iter"]
        print(
            _row(
                "reference (NCHW, torch losses)",
                res["reference"]["seconds_per_iter"]["median"],
                floor,
            )
        )
        print(
            _row(
                "default (channels-last, dispatch)",
                res["default"]["seconds_per_iter"]["median"],
                floor,
            )
        )
        print(f"  speedup {res['speedup']:.2f}x")
        payload["image"] = res

    if "throughput" in sections:
        try:
            res = bench_throughput(
                images, guides, config, device, batch_size=args.batch_size, rate=rate,
                repeats=args.throughput_repeats or d["throughput_repeats"], vmap=args.vmap,
            )  # fmt: skip
        except MemoryError as exc:
            return fail(str(exc))
        sizes = ", ".join(f"{w}x{h}" for h, w in res["sizes"])
        print(
            f"\n(c) throughput, {res['images']} images ({sizes}), max_iter {max_iter}, "
            f"{res['iterations']} iterations in all, batch {res['batch_size']} [images/s]; "
            f"floor = {res['gflop']:.1f} GFLOP at the matmul rate"
        )
        print(f"  {'':<34}{'measured':>10}{'floor':>10}{'floor%':>7}")
        fips = res["floor_images_per_second"]
        for name, ips in res["images_per_second"].items():
            print(f"  {name:<34}{ips:10.3f}{fips:10.3f}{ips / fips:7.1%}")
        print(
            f"  speedup batched vs sequential {res['speedup_batched_vs_sequential']:.2f}x; "
            f"identical labels for {res['identical_results']}/{res['images']} images "
            f"({res['pixels_differing']} of {res['pixels']} pixels differ)"
        )
        payload["throughput"] = res

    payload["load_average_at_end"] = list(os.getloadavg())
    path = write_results("bench-tiny" if args.tiny else "bench", device, payload, args.out)
    print(f"\nwrote {path}")
    return 0
