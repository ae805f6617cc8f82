"""Fused native CPU losses vs the plain PyTorch reference losses, forward + backward.

Side by side in one run, same (C, H, W) float32 response (default 100 x 321 x 481, a
BSDS500 image with the 100-channel net), contiguous and channels-last (the refine
loop's layout):

* each loss alone: continuity (Huber, 8 neighbours), similarity (CE vs argmax + K),
  guidance (CE vs a target with 10 % ignored pixels);
* the refine-loop composite ``similarity + w * continuity`` (+ guidance);
* for scale, the RefineNet forward + backward on the same image size, so the loss
  share of one iteration can be read off.

Each figure is the wall-clock time of forward + backward (gradient w.r.t. the response,
grad_output != 1), min / median / max over repeats after one warm-up.

Usage::

    python benchmarks/cpu_losses.py [--repeats 7] [--size 100 321 481]

Prints a table and writes ``benchmarks/results/cpu_losses-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from dynaguide import losses
from dynaguide.build_info import build_commit
from dynaguide.model import RefineNet

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relabel import RESULTS, _triton_version, cpu_name, timeit


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--size", type=int, nargs=3, default=[100, 321, 481], metavar=("C", "H", "W")
    )
    parser.add_argument("--no-model", action="store_true", help="skip the RefineNet timing")
    args = parser.parse_args(argv)
    try:
        from dynaguide import native_losses as nl
    except ImportError as exc:
        print(f"native losses unavailable: {exc}", file=sys.stderr)
        return 1
    c, h, w = args.size
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1, c, h, w, generator=gen)
    target = torch.randint(0, c, (h, w), generator=gen)
    target[torch.rand(h, w, generator=gen) < 0.1] = -1
    load_before = os.getloadavg()
    rows: list[dict] = []

    def fwd_bwd(
        loss_fn: Callable[[torch.Tensor], torch.Tensor], r0: torch.Tensor
    ) -> Callable[[], None]:
        def run() -> None:
            r = r0.detach().requires_grad_(True)
            (loss_fn(r) * 0.75).backward()  # non-unit grad_output, as in the refine loop

        return run

    ops = {
        "continuity huber/8": (
            lambda r: losses.continuity_loss_reference(r),
            lambda r: nl.continuity_loss(r),
        ),
        "similarity": (
            lambda r: losses.similarity_loss_reference(r)[0],
            lambda r: nl.similarity_loss(r)[0],
        ),
        "guidance": (
            lambda r: losses.guidance_loss_reference(r, target),
            lambda r: nl.guidance_loss(r, target),
        ),
        "sim + 5*cont": (
            lambda r: (
                losses.similarity_loss_reference(r)[0] + 5 * losses.continuity_loss_reference(r)
            ),
            lambda r: nl.similarity_loss(r)[0] + 5 * nl.continuity_loss(r),
        ),
        "sim + 5*cont + guide": (
            lambda r: (
                losses.similarity_loss_reference(r)[0]
                + 5 * losses.continuity_loss_reference(r)
                + losses.guidance_loss_reference(r, target)
            ),
            lambda r: (
                nl.similarity_loss(r)[0] + 5 * nl.continuity_loss(r) + nl.guidance_loss(r, target)
            ),
        ),
    }
    for layout in ("contiguous", "channels_last"):
        r0 = base[0] if layout == "contiguous" else base.to(memory_format=torch.channels_last)[0]
        for name, (ref_fn, fast_fn) in ops.items():
            t_ref = timeit(fwd_bwd(ref_fn, r0), args.repeats)
            t_fast = timeit(fwd_bwd(fast_fn, r0), args.repeats)
            speedup = t_ref["median"] / t_fast["median"]
            rows.append(
                {
                    "op": name,
                    "layout": layout,
                    "torch_reference_s": t_ref,
                    "native_s": t_fast,
                    "speedup": speedup,
                }
            )
            print(
                f"{name:22s} {layout:14s} torch {t_ref['median'] * 1e3:9.1f} ms   "
                f"native {t_fast['median'] * 1e3:8.1f} ms   {speedup:6.1f}x",
                flush=True,
            )

    model_row = None
    if not args.no_model:
        model = RefineNet(c, 2, "none").to(memory_format=torch.channels_last)
        x = torch.randn(1, 3, h, w, generator=gen).to(memory_format=torch.channels_last)

        def model_fb() -> None:
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()

        model_row = timeit(model_fb, max(3, args.repeats // 2))
        print(f"RefineNet({c}, 2 conv) fwd+bwd {model_row['median'] * 1e3:9.1f} ms (for scale)")

    result = {
        "benchmark": "cpu_losses",
        "device": cpu_name(),
        "torch": torch.__version__,
        "triton": _triton_version(),
        "torch_threads": torch.get_num_threads(),
        "native_threads": __import__("dynaguide._native", fromlist=["x"]).max_threads(),
        "commit": build_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "size_chw": [c, h, w],
        "repeats": args.repeats,
        "loadavg_before_after": [load_before, os.getloadavg()],
        "timing": "wall clock fwd+bwd, one warm-up, min/median/max over repeats (seconds)",
        "rows": rows,
        "refinenet_fwd_bwd_s": model_row,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "cpu_losses-cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
