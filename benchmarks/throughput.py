"""Batched vs one-at-a-time refinement throughput, and the batched memory estimate.

Side by side in one run, on the first ``--limit`` BSDS500 val images at ``--scale``
(the preset's default guide computed beforehand, not timed):

  * sequential: :func:`dynaguide.refine.refine` on one image after another;
  * batched:    :func:`dynaguide.batched_refine.refine_batch` (grouped convolutions);
  * vmap:       the same with ``method="vmap"`` (``torch.func.vmap`` over stacked parameters).

Images/s from the median of ``--repeats`` interleaved runs, next to the compute floor
(convolution FLOPs of all iterations run over the matmul rate measured in the same run).
This is ``dynaguide bench --sections throughput --vmap``; the results go to
``benchmarks/results/throughput-<device>.json``.

``--memory`` also checks :func:`dynaguide.batched_refine.estimate_refine_bytes`: in a fresh
subprocess per case, the growth of the peak resident set (``ru_maxrss``) over two training
iterations, against the estimate (CPU only; on CUDA compare with
``torch.cuda.max_memory_allocated``).

    python benchmarks/throughput.py [--limit 8] [--scale 0.25] [--max-iter 20] [--memory]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from dynaguide import bench_cli as bench
from dynaguide.api import build_config, resolve_device
from dynaguide.bench_utils import matmul_rate, write_results
from dynaguide.guidance import compute_guide_labels

#: BSDS500 val images of the development checkout (``../shared`` beside the repository).
VAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bsds500" / "val" / "images"

_MEMORY_PROBE = r"""
import json, resource, sys
import numpy as np, torch
from dynaguide.config import get_preset
from dynaguide.batched_refine import BatchedRefiner, estimate_refine_bytes
from dynaguide.refine import RefineStep
h, w, n, backend, preset = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
backend = None if backend == "default" else backend
cfg = get_preset(preset)
rng = np.random.default_rng(0)
ims = [rng.integers(0, 256, (h, w, 3)).astype(np.uint8) for _ in range(n)]
guides = [rng.integers(0, 5, (h, w)) for _ in range(n)]
if n == 1:
    st = RefineStep(ims[0], cfg, guide_labels=guides[0], backend=backend)
    step = st.step
else:
    eng = BatchedRefiner(cfg, torch.device("cpu"), (h, w), backend=backend)
    eng.rebuild([], [eng.new_slot(i, im, g, i) for i, (im, g) in enumerate(zip(ims, guides))])
    step = lambda: eng.step([True] * n)
def rss():
    with open("/proc/self/status") as fh:
        return next(int(l.split()[1]) * 1024 for l in fh if l.startswith("VmRSS"))
base = rss()
step(); step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"measured": peak - base, "estimate": estimate_refine_bytes(h, w, cfg) * n}))
"""


def memory_check(preset: str) -> list[dict[str, Any]]:
    """Peak RSS growth vs :func:`estimate_refine_bytes`, one subprocess per case (CPU)."""
    cases = [
        (321, 481, 1, "torch"),
        (321, 481, 1, "default"),
        (160, 240, 4, "torch"),
        (160, 240, 4, "default"),
    ]
    rows = []
    for h, w, n, backend in cases:
        cmd = [sys.executable, "-c", _MEMORY_PROBE, str(h), str(w), str(n), backend, preset]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rows.append(
            {
                "size": [h, w],
                "images": n,
                "losses": backend,
                **r,
                "ratio": r["measured"] / r["estimate"],
            }
        )
        print(
            f"  {n} x {w}x{h}, {backend:>7} losses: peak RSS growth {r['measured'] / 2**20:7.0f} MiB, "
            f"estimate {r['estimate'] / 2**20:7.0f} MiB, measured/estimate {rows[-1]['ratio']:.2f}"
        )
    return rows


def main() -> None:
    """Run the step and throughput comparisons (and the memory check); write the results."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--preset", default="dynaguide")
    ap.add_argument("--data", default=str(VAL), help="image folder (default %(default)s)")
    ap.add_argument("--limit", type=int, default=8)
    ap.add_argument("--scale", type=float, default=0.25)
    ap.add_argument("--max-iter", type=int, default=20)
    ap.add_argument("--batch-size", default="auto")
    ap.add_argument("--repeats", type=int, default=3, help="end-to-end runs per path")
    ap.add_argument("--step-repeats", type=int, default=10, help="timed iterations per path")
    ap.add_argument("--sections", default="step,throughput", help="step and/or throughput")
    ap.add_argument("--no-vmap", action="store_true", help="skip the vmap variant end to end")
    ap.add_argument("--memory", action="store_true", help="also check the memory estimate (CPU)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()

    device = resolve_device(args.device)
    config = build_config(args.preset, max_iter=args.max_iter)
    batch_size: int | str = args.batch_size if args.batch_size == "auto" else int(args.batch_size)
    sections = set(args.sections.split(","))
    images, names = bench.load_images(Path(args.data), args.limit, args.scale, config)
    guides = [compute_guide_labels(config.default_guidance, im)[0] for im in images]
    rate = matmul_rate(device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(
        f"preset {config.name}, {torch.get_num_threads()} threads, "
        f"matmul {rate / 1e9:.1f} GFLOP/s (this run)"
    )
    payload: dict[str, Any] = {
        "benchmark": "throughput",
        "preset": config.name,
        "images": names,
        "scale": args.scale,
        "matmul_gflops": rate / 1e9,
        # other processes on the machine distort CPU timings (OpenMP threads get preempted)
        "load_average_at_start": list(os.getloadavg()),
    }
    if "step" in sections:
        step = bench.bench_step(images, guides, config, device, repeats=args.step_repeats)
        h, w = step["size"]
        print(
            f"one training iteration of {step['images']} images of {w}x{h} "
            f"(min / median of {args.step_repeats}, interleaved):"
        )
        for name, t in step["seconds_per_iter"].items():
            sp = step["speedup_vs_sequential"].get(name)
            extra = f"   {sp:.2f}x vs sequential (median)" if sp else ""
            print(f"  {name:<13}{t['min'] * 1e3:9.1f} ms{t['median'] * 1e3:9.1f} ms{extra}")
        payload["step"] = step
    if "throughput" in sections:
        res = bench.bench_throughput(
            images, guides, config, device, batch_size=batch_size, rate=rate,
            repeats=args.repeats, vmap=not args.no_vmap,
        )  # fmt: skip
        sizes = ", ".join(f"{w}x{h}" for h, w in res["sizes"])
        print(
            f"end to end: {res['images']} images ({sizes}), max_iter {args.max_iter}, "
            f"{res['iterations']} iterations, batch {res['batch_size']}"
        )
        print(
            f"  {'path':<12}{'images/s':>10}{'median s':>10}{'min s':>9}{'max s':>9}{'floor%':>8}"
        )
        fips = res["floor_images_per_second"]
        for name, ips in res["images_per_second"].items():
            t = res["seconds"][name]
            print(
                f"  {name:<12}{ips:10.3f}{t['median']:10.2f}{t['min']:9.2f}{t['max']:9.2f}"
                f"{ips / fips:8.1%}"
            )
        ips = res["images_per_second"]
        line = f"  batched / sequential {res['speedup_batched_vs_sequential']:.2f}x"
        if "vmap" in ips:
            line += f", grouped / vmap {ips['batched'] / ips['vmap']:.2f}x"
        print(
            f"{line}; identical labels {res['identical_results']}/{res['images']} images, "
            f"{res['pixels_differing']} of {res['pixels']} pixels differ (float32 round-off)"
        )
        payload["throughput"] = res
    if args.memory:
        if device.type != "cpu":
            print("--memory measures the CPU process; skipped on", device)
        else:
            print("memory estimate check (peak RSS growth over two iterations):")
            payload["memory"] = memory_check(args.preset)
    payload["load_average_at_end"] = list(os.getloadavg())
    print("wrote", write_results("throughput", device, payload, args.out))


if __name__ == "__main__":
    main()
