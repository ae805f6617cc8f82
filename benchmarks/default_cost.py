"""End-to-end cost of the default ``dg.segment`` against ONE iteration of the authors' loop.

Side by side in one run, on one full-size BSDS500 val image (481x321), turn by turn:
  * ``authors_iteration``: one training iteration of the authors' released DynaGuide loop
    at full size (the ``dynaguide-reference`` preset's network and objective written out in
    plain PyTorch as ``AuthorsLoop`` in ``benchmarks/refine_cpu.py``);
  * ``default_segment``: ``dynaguide.segment(path)`` with every default, end to end (load,
    guide, refinement, upsampling, post-processing).
The figure of merit is the ratio of the medians: how many authors' iterations the whole
default segmentation costs (the target is at most 5).

    python benchmarks/default_cost.py [--repeats 3] [--image ID] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from refine_cpu import VAL, AuthorsLoop

import dynaguide as dg
from dynaguide.bench_utils import summarize, write_results
from dynaguide.config import get_preset
from dynaguide.guidance import compute_guide_labels
from dynaguide.io import load_image


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write benchmarks/results/default_cost-cpu.json."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--image", default="101085", help="BSDS500 val image id")
    ap.add_argument("--data", type=Path, default=VAL, help="folder of val images")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)

    path = args.data / f"{args.image}.jpg"
    image = load_image(path)
    authors_cfg = get_preset("dynaguide-reference")
    guide, _ = compute_guide_labels(authors_cfg.default_guidance, image)
    authors = AuthorsLoop(image, guide, authors_cfg, seed=0)
    authors.step()  # warm-up
    dg.segment(path)  # warm-up (imports, first-call costs)
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {"authors_iteration": [], "default_segment": []}
    last = None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        authors.step()
        times["authors_iteration"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        last = dg.segment(path)
        times["default_segment"].append(time.perf_counter() - t0)
    assert last is not None
    stats = {k: summarize(v) for k, v in times.items()}
    ratio = stats["default_segment"]["median"] / stats["authors_iteration"]["median"]
    for k, s in stats.items():
        print(f"{k:>18}: median {s['median']:.3f} s")
    print(f"default segment = {ratio:.2f} authors' iterations (target <= 5)")
    payload = {
        "benchmark": "default_cost",
        "image": path.name,
        "size": list(image.shape[:2]),
        "threads": torch.get_num_threads(),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "default_preset": last.config.name,
        "default_guide": last.extra.get("guide"),
        "default_iterations": last.n_iter,
        "default_stop_reason": last.stop_reason,
        "default_segments": last.n_labels,
        "authors_preset": authors_cfg.name,
        "seconds": stats,
        "default_in_authors_iterations": ratio,
    }
    print("wrote", write_results("default_cost", torch.device("cpu"), payload, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
