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
    same run (:func:`dynaguide.bench_utils.matmul_rate`, bf16 on CUDA, fp32 on CPU).
(c) throughput
    Images per second over BSDS500 val images (``--limit``, ``--scale``,
    ``--max-iter``, the preset's default guide computed beforehand and not timed):
    :func:`dynaguide.batched_refine.refine_batch` against one :func:`dynaguide.refine.refine`
    after another. Both give the same results (the run counts the images whose labels
    are identical); the floor is the FLOPs of all the iterations actually run over the
    matmul rate.

Results go to ``--out`` (default: the current directory) as ``bench-<device>.json``
(``bench-tiny-<device>.json`` with ``--tiny``, so a smoke run never overwrites real
figures) via :func:`dynaguide.bench_utils.write_results`.

    dynaguide bench --device cuda
    dynaguide bench --tiny --out /tmp/bench          # < 1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynaguide.bench_sections import (
    bench_image,
    bench_losses,
    bench_step,
    bench_throughput,
    copy_rate,
    load_images,
    table_row,
)
from dynaguide.cli_types import fraction as _scale
from dynaguide.cli_types import plain_text
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

#: Images of the image and throughput sections without ``--data``: None means the sample
#: images bundled with scikit-image (those of ``dynaguide demo``), so an installed package
#: never looks for a data folder of a checkout.
DEFAULT_DATA: Path | None = None

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
        help="folder of images for the image and throughput sections "
        "(default: scikit-image's bundled sample images, as dynaguide demo)",
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
        "--out",
        type=Path,
        default=Path("."),
        help="results folder (default: the current directory)",
    )


def register(subparsers: Any) -> None:
    """Add the ``bench`` subcommand to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "bench",
        help="kernel, per-iteration and throughput speedups on this device",
        description=plain_text(__doc__.split("\n\n", 1)[0])
        + " See dynaguide.bench_cli for the sections.",
    )
    add_arguments(p)
    p.set_defaults(func=run, _parser=p)


def build_parser() -> argparse.ArgumentParser:
    """A standalone parser with the ``bench`` options (for scripts)."""
    p = argparse.ArgumentParser(prog="dynaguide bench", description=plain_text(__doc__ or ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(p)
    p.set_defaults(func=run, _parser=p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and run the benchmark; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return run(args)


# --------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    """Run the sections selected in ``args``; print a table and write the results JSON."""
    import torch

    from dynaguide.api import build_config, resolve_device
    from dynaguide.bench_utils import environment, matmul_rate, write_results
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
        print(table_row("torch reference composite", res["reference"]["seconds"]["median"], floor))
        if res["fast_path"]:
            print(
                table_row(
                    f"fast path ({res['fast_path']})", res["fast"]["seconds"]["median"], floor
                )
            )
            print(f"  speedup {res['speedup']:.2f}x (loss rel. diff {res['loss_rel_diff']:.1e})")
        else:
            print(f"  no fast path on {device.type}: {res['fast_path_note']}")
        payload["losses"] = res

    images: list[Any] = []
    names: list[str] = []
    guides: list[Any] = []
    if "image" in sections or "throughput" in sections:
        try:
            images, names = load_images(args.data, limit, scale, config)
        except (FileNotFoundError, OSError, ValueError) as exc:
            return fail(str(exc))
        guides = [compute_guide_labels(config.default_guidance, im)[0] for im in images]
        payload["data"] = {
            "folder": str(args.data) if args.data is not None else "scikit-image samples",
            "images": names,
            "scale": scale,
        }

    if "image" in sections:
        if args.tiny:
            img, guide = images[0], guides[0]
        else:  # full resolution
            img, _ = load_images(args.data, 1, 1.0, config)
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
            table_row(
                "reference (NCHW, torch losses)",
                res["reference"]["seconds_per_iter"]["median"],
                floor,
            )
        )
        print(
            table_row(
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
