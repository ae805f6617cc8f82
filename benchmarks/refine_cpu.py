"""Per-iteration time of the default preset on a full-size BSDS500 val image, on CPU.

Side by side in one run:
  * reference path: NCHW convolutions + plain PyTorch losses (DYNAGUIDE backend "torch");
  * default path:   channels-last convolutions + the native fused losses (or whatever the
                    dispatcher picks for CPU tensors).
Median of several iterations after warm-up; the compute floor is 95-ish GFLOP per
iteration (``dynaguide.model.conv_flops_per_pixel``) over the matmul rate measured in the
same run.

    python benchmarks/refine_cpu.py [--iters 5] [--image ID] [--size HxW]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from dynaguide.benchmarking import matmul_rate, summarize, time_calls, write_results
from dynaguide.config import get_preset
from dynaguide.guidance import compute_guide_labels
from dynaguide.io import load_image
from dynaguide.model import conv_flops_per_pixel
from dynaguide.refine import RefineStep

VAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bsds500" / "val" / "images"


def main() -> None:
    """Run the benchmark and write benchmarks/results/refine_cpu-cpu.json."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per path")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--image", default=None, help="BSDS500 val image id (default: first)")
    ap.add_argument("--size", default=None, help="resize to HxW (e.g. 64x96 for a smoke run)")
    ap.add_argument("--preset", default="dynaguide")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()

    if args.image:
        path = VAL / f"{args.image}.jpg"
    else:
        images = sorted(VAL.glob("*.jpg"))
        if not images:
            raise SystemExit(f"no BSDS500 val images under {VAL}")
        path = images[0]
    image = load_image(path)
    if args.size:
        from skimage.transform import resize

        h, w = (int(v) for v in args.size.lower().split("x"))
        image = (resize(image, (h, w), preserve_range=True, anti_aliasing=True)).astype(np.uint8)
    h, w = image.shape[:2]
    cfg = get_preset(args.preset)
    guide, _ = compute_guide_labels(cfg.default_guidance, image)
    cpu = torch.device("cpu")

    paths = {
        "reference": {"backend": "torch", "channels_last": False},
        "default": {"backend": None, "channels_last": True},
    }
    figures = {}
    for name, opts in paths.items():
        step = RefineStep(image, cfg, guide_labels=guide, device=cpu, seed=0, **opts)
        times = time_calls(step.step, repeats=args.iters, warmup=args.warmup)
        figures[name] = {
            "seconds_per_iter": summarize(times),
            **{k: str(v) for k, v in opts.items()},
        }
        print(
            f"{name:>9}: median {figures[name]['seconds_per_iter']['median']:.3f} s/iter  ({opts})"
        )

    gflop = conv_flops_per_pixel(cfg) * h * w / 1e9
    rate = matmul_rate(cpu)
    floor = gflop * 1e9 / rate
    speedup = (
        figures["reference"]["seconds_per_iter"]["median"]
        / figures["default"]["seconds_per_iter"]["median"]
    )
    print(f"speedup default vs reference: {speedup:.2f}x")
    print(
        f"compute floor: {gflop:.1f} GFLOP/iter at {rate / 1e9:.0f} GFLOP/s (fp32 matmul, this run) = {floor:.3f} s/iter"
    )
    payload = {
        "benchmark": "refine_cpu",
        "image": path.name,
        "size": [h, w],
        "preset": cfg.name,
        "threads": torch.get_num_threads(),
        "paths": figures,
        "speedup_default_vs_reference": speedup,
        "gflop_per_iter": gflop,
        "matmul_gflops": rate / 1e9,
        "floor_seconds_per_iter": floor,
        "default_fraction_of_floor": floor / figures["default"]["seconds_per_iter"]["median"],
    }
    print("wrote", write_results("refine_cpu", cpu, payload, args.out))


if __name__ == "__main__":
    main()
