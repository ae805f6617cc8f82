"""Dense CRF (native permutohedral-lattice mean field) on a 481x321 image, CPU.

SmooSeg's settings (10 iterations, Gaussian sxy 1 w 3, bilateral sxy 67 srgb 3 w 4), with
K = 5 (a DynaGuide-like label count) and K = 27 (SmooSeg's COCO-Stuff classes) random
class scores as the unary; the first BSDS500 val image (a synthetic one if the data is
absent). Wall clock of :func:`dynaguide.crf.dense_crf`, min / median / max over repeats
after one warm-up, the process CPU time of the same calls, and the lattice sizes of the
two kernels.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/crf.py [--repeats 3]

Writes ``benchmarks/results/crf-cpu.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dynaguide import crf
from dynaguide.bench_utils import summarize, time_calls, write_results
from dynaguide.label_ops import native_module

VAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bsds500" / "val" / "images"


def load_image() -> tuple[np.ndarray, str]:
    """The first BSDS500 val image as (H, W, 3) uint8, or a synthetic 321x481 one."""
    files = sorted(VAL.glob("*.jpg")) if VAL.is_dir() else []
    if files:
        from PIL import Image

        return np.asarray(Image.open(files[0]).convert("RGB")), files[0].name
    rng = np.random.default_rng(0)
    img = np.zeros((321, 481, 3), np.uint8)
    img[:, 240:] = (40, 90, 200)
    img[160:, :] += np.uint8(100)
    noisy = img + rng.normal(0, 10, img.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8), "synthetic 321x481"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--classes", type=int, nargs="+", default=[5, 27])
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    img, name = load_image()
    h, w = img.shape[:2]
    rng = np.random.default_rng(0)
    rows = {}
    for k in args.classes:
        scores = rng.normal(0, 1, (k, h, w)).astype(np.float32)
        cpu: list[float] = []

        def run(s=scores, cpu=cpu) -> None:
            c0 = time.process_time()
            crf.dense_crf(img, s, logits=True)
            cpu.append(time.process_time() - c0)

        t = summarize(time_calls(run, repeats=args.repeats))
        c = summarize(cpu[1:])  # without the warm-up
        rows[f"K={k}"] = {"wall_s": t, "process_cpu_s": c}
        print(f"K={k:3d}: wall {t['median']:.2f} s, CPU {c['median']:.2f} s "
              f"(10 iterations, {h}x{w})", flush=True)  # fmt: skip
    lattice_points = {}
    for kernel, (sxy, srgb) in {"gaussian": (1.0, None), "bilateral": (67.0, 3.0)}.items():
        f = np.ascontiguousarray(crf.crf_features(img, sxy, srgb), dtype=np.float32)
        ones = np.ones((f.shape[0], 1), np.float32)
        lattice_points[kernel] = int(
            native_module().permutohedral_filter(f, ones, np.empty_like(ones))
        )
    payload = {
        "image": name,
        "size_hw": [h, w],
        "iterations": 10,
        "settings": "gaussian sxy 1 w 3, bilateral sxy 67 srgb 3 w 4",
        "lattice_points": lattice_points,
        "timing": "wall clock and process CPU time, one warm-up, min/median/max over repeats "
        "(seconds); the machine is shared, so the CPU time is the steadier figure",
        "loadavg_after": os.getloadavg(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "rows": rows,
    }
    path = write_results("crf", torch.device("cpu"), payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
