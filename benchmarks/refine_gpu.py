"""One whole refinement of a BSDS500 image: fused + CUDA graph vs the torch reference path.

Side by side in one run, on the same GPU, same image, same seed, default preset:
  * reference: NCHW convolutions, plain PyTorch losses (backend "torch"), no graph;
  * fused:     channels-last, the fused Triton objective, the iteration captured in a CUDA
               graph and replayed;
  * fused+bf16: as fused, with bf16 autocast for the convolutions (its effect on the result
               is measured: label agreement with the float32 run after relabel matching,
               and the final K).
All stopping rules except max_iter are off so every path runs exactly ``--iters`` iterations.
The floor is the preset's training FLOPs (``conv_flops_per_pixel``) over the bf16 matmul
rate measured in the same run.

    python benchmarks/refine_gpu.py                   # GPU: 481x321, 1000 iterations
    python benchmarks/refine_gpu.py --tiny            # CPU smoke run (tiny size, few iterations)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from dynaguide.bench_utils import matmul_rate, write_results
from dynaguide.config import get_preset
from dynaguide.guidance import compute_guide_labels
from dynaguide.io import load_image
from dynaguide.model import conv_flops_per_pixel
from dynaguide.refine import refine

VAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bsds500" / "val" / "images"


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of pixels on which two label maps agree after a best one-to-one matching."""
    from scipy.optimize import linear_sum_assignment

    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    table = np.zeros((ia.max() + 1, ib.max() + 1), np.int64)
    np.add.at(table, (ia.ravel(), ib.ravel()), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / a.size)


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write benchmarks/results/refine_gpu-<device>.json."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--iters", type=int, default=1000)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: 24x32 image, 5 iterations")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    images = sorted(VAL.glob("*.jpg"))
    if not images:
        raise SystemExit(f"no BSDS500 val images under {VAL}")
    image = load_image(images[0])
    iters = args.iters
    if args.tiny:
        image, iters = np.ascontiguousarray(image[::10, ::10]), 5
    cfg = get_preset("dynaguide").replace(max_iter=iters, min_labels=0, convergence_tol=0.0)
    guide, _ = compute_guide_labels(cfg.default_guidance, image)
    cuda = device.type == "cuda"
    paths = {
        "reference": {"backend": "torch", "channels_last": False},
        "fused": {"channels_last": True, "cuda_graph": cuda},
        "fused_bf16": {"channels_last": True, "cuda_graph": cuda, "amp": True},
    }
    results, labels = {}, {}
    for name, opts in paths.items():
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        res = refine(image, cfg, guide_labels=guide, device=device, seed=0, **opts)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t
        labels[name] = res.labels.cpu().numpy()
        results[name] = {
            "options": {k: str(v) for k, v in opts.items()},
            "seconds_total": seconds,
            "seconds_per_iter": seconds / res.n_iter,
            "n_iter": res.n_iter,
            "final_k": res.k_history[-1],
        }
        print(
            f"{name:>11}: {seconds:8.3f} s for {res.n_iter} iterations, final K {res.k_history[-1]}"
        )
    for name in ("fused", "fused_bf16"):
        results[name]["speedup_vs_reference"] = (
            results["reference"]["seconds_total"] / results[name]["seconds_total"]
        )
        results[name]["label_agreement_vs_reference"] = _agreement(
            labels[name], labels["reference"]
        )
    h, w = image.shape[:2]
    gflop = conv_flops_per_pixel(cfg) * h * w / 1e9
    rate = matmul_rate(device, dtype=torch.bfloat16 if cuda else torch.float32)
    floor = gflop * 1e9 / rate * iters
    for name in results:
        results[name]["x_floor"] = results[name]["seconds_total"] / floor
    payload = {
        "benchmark": "refine_gpu",
        "not_performance_figures": None
        if cuda
        else "CPU smoke run (--tiny): checks the script, not speed",
        "image": images[0].name,
        "size": [h, w],
        "iterations": iters,
        "preset": cfg.name,
        "paths": results,
        "gflop_per_iter": gflop,
        "matmul_gflops": rate / 1e9,
        "matmul_dtype": "bf16" if cuda else "fp32",
        "floor_seconds_total": floor,
    }
    print(
        f"floor: {gflop:.2f} GFLOP/iter at {rate / 1e9:.0f} GFLOP/s -> {floor:.3f} s for {iters} iterations"
    )
    print("wrote", write_results("refine_gpu", device, payload, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
