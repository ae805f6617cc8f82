"""Fused Triton loss kernels vs the plain PyTorch reference composite, forward + backward.

Side by side in one run, on the same random response (channels-last float32 unless said):
  * fused:     dynaguide.kernels.dynaguide_loss (similarity + K/15 * Huber-8 continuity +
               guidance, with ignore_index) then backward;
  * reference: dynaguide.kernels.dynaguide_loss_reference, the composite of the torch
               references in dynaguide.losses (what the training loop runs without Triton);
  * the three standalone kernels against their references;
  * copy:      response.clone(), the bandwidth yardstick measured in the same run.

"min-traffic GB/s" counts what any implementation must move: read the response once and
write its gradient once (2 x response bytes); the copy moves the same 2 x bytes, so
"% of copy" = t_copy / t_op. The fused design moves about 3 x (two reads, one write).

GPU: triton.testing.do_bench (all samples -> min/median/max). Without CUDA the kernels run
in Triton's CPU interpreter (TRITON_INTERPRET=1, set here when absent) at a tiny size:
those timings say only that the script works; they are NOT performance figures.

    python benchmarks/kernels.py                 # GPU: 100x481x321, batch 1 and 8
    python benchmarks/kernels.py --tiny          # CPU interpreter smoke run
    python benchmarks/kernels.py --compile-report  # + registers/spills per kernel for sm_90
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dynaguide.kernels as K

from dynaguide import losses
from dynaguide.bench_utils import summarize, time_calls, write_results

NOT_PERF = "CPU interpreter (TRITON_INTERPRET=1): timings are NOT performance figures"


def _timer(
    device: torch.device, reps: int
) -> Callable[[Callable[[], Any], list[torch.Tensor]], list[float]]:
    """Seconds per call of ``fn``: do_bench samples on CUDA, wall time in the interpreter."""
    if device.type == "cuda":
        import triton.testing

        def bench(fn: Callable[[], Any], grads: list[torch.Tensor]) -> list[float]:
            ms = triton.testing.do_bench(
                fn, warmup=25, rep=100, grad_to_none=grads, return_mode="all"
            )
            return [m / 1e3 for m in ms]

        return bench

    def wall(fn: Callable[[], Any], grads: list[torch.Tensor]) -> list[float]:
        def call() -> None:
            for g in grads:
                g.grad = None
            fn()

        return time_calls(call, repeats=reps, warmup=1, device=device)

    return wall


def _step(loss_fn: Callable[[], Any]) -> Callable[[], None]:
    def run() -> None:
        out = loss_fn()
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()

    return run


def _cases(
    shape: tuple[int, ...], device: torch.device, full: bool
) -> list[tuple[str, torch.Tensor]]:
    x = torch.randn(shape, device=device) * 2.0
    cases = [("float32 channels-last", x.contiguous(memory_format=torch.channels_last))]
    if full:
        cases.append(("float32 NCHW", x.contiguous()))
        cases.append(
            (
                "bfloat16 channels-last",
                x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last),
            )
        )
    return cases


def run(shapes: list[tuple[int, ...]], device: torch.device, reps: int) -> list[dict[str, Any]]:
    """Time every op on every shape/layout; return one row per (op, shape, layout)."""
    bench = _timer(device, reps)
    rows: list[dict[str, Any]] = []
    for shape in shapes:
        for li, (layout, x0) in enumerate(_cases(shape, device, full=True)):
            r = x0.detach().requires_grad_()
            n, c, h, w = shape
            gen = torch.Generator(device=device.type).manual_seed(0)
            t = torch.randint(-1, c, (n, h, w), device=device, generator=gen)
            nbytes = r.numel() * r.element_size()
            copy = summarize(bench(lambda r=r: r.detach().clone(), []))
            ops: dict[str, tuple[Callable[[], Any], Callable[[], Any]]] = {
                "fused dynaguide_loss": (
                    lambda r=r, t=t: K.dynaguide_loss(r, t, weight="dynaguide"),
                    lambda r=r, t=t: K.dynaguide_loss_reference(r, t, weight="dynaguide"),
                ),
            }
            if li == 0:  # standalone kernels on the main layout only
                ops["continuity (huber, 8)"] = (
                    lambda r=r: K.continuity_loss(r),
                    lambda r=r: losses.continuity_loss_reference(r),
                )
                ops["similarity"] = (
                    lambda r=r: K.similarity_loss(r),
                    lambda r=r: losses.similarity_loss_reference(r),
                )
                ops["guidance"] = (
                    lambda r=r, t=t: K.guidance_loss(r, t),
                    lambda r=r, t=t: losses.guidance_loss_reference(r, t),
                )
            for op, (fast, ref) in ops.items():
                tf = summarize(bench(_step(fast), [r]))
                tr = summarize(bench(_step(ref), [r]))
                row = {
                    "op": op + " fwd+bwd",
                    "shape": list(shape),
                    "layout": layout,
                    "response_bytes": nbytes,
                    "fast_s": tf,
                    "reference_s": tr,
                    "copy_s": copy,
                    "speedup_median": tr["median"] / tf["median"],
                    "min_traffic_GBps_median": 2 * nbytes / tf["median"] / 1e9,
                    "copy_GBps_median": 2 * nbytes / copy["median"] / 1e9,
                    "fraction_of_copy_median": copy["median"] / tf["median"],
                }
                rows.append(row)
                print(
                    f"{op:24s} {'x'.join(map(str, shape)):>16s} {layout:23s} "
                    f"{tf['median'] * 1e3:9.3f} {tr['median'] * 1e3:9.3f} "
                    f"{row['speedup_median']:7.2f}x "
                    f"{row['min_traffic_GBps_median']:8.1f} {row['copy_GBps_median']:8.1f} "
                    f"{100 * row['fraction_of_copy_median']:6.1f}%",
                    flush=True,
                )
    return rows


def compile_report(*extra: str) -> list[dict[str, Any]]:
    """Registers / spills per kernel for sm_90 (subprocess: needs TRITON_INTERPRET unset);
    with ``--variants K``: compiled variants per kernel over K image sizes."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "dynaguide.kernels._compile_check", "--arch", "90", *extra],
        env=env,
        cwd=tempfile.gettempdir(),  # not the source tree, which would shadow the installed package
        capture_output=True,
        text=True,
        check=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and write benchmarks/results/kernels-<device>.json."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (CPU interpreter smoke run)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions without CUDA")
    ap.add_argument(
        "--compile-report", action="store_true", help="add ptxas registers/spills for sm_90"
    )
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    interp = K.interpreting()
    if device.type == "cpu" and not args.tiny:
        print("no CUDA: running the --tiny sizes in the Triton interpreter")
        args.tiny = True
    shapes = (
        [(1, 16, 12, 10), (2, 16, 12, 10)]
        if args.tiny
        else [(1, 100, 481, 321), (8, 100, 481, 321)]
    )
    if interp:
        print(f"*** {NOT_PERF} ***")
    print(
        f"{'op':24s} {'shape':>16s} {'layout':23s} {'fast ms':>9s} {'ref ms':>9s} {'speedup':>8s} "
        f"{'GB/s':>8s} {'copy':>8s} {'%copy':>7s}"
    )
    t0 = time.perf_counter()
    rows = run(shapes, device, args.reps)
    payload: dict[str, Any] = {
        "benchmark": "kernels",
        "interpreter": interp,
        "note": NOT_PERF
        if interp
        else "do_bench samples (ms->s) after warm-up; ratios measured side by side",
        "performance_figures": not interp,
        "rows": rows,
        "seconds_total": time.perf_counter() - t0,
    }
    if args.compile_report:
        payload["compile_report_sm90"] = compile_report()
        for row in payload["compile_report_sm90"]:
            print(
                f"sm_90 {row['case']:22s} {row['kernel']:20s} "
                f"regs={row['registers']} spill={row['spill_bytes']}"
            )
        payload["compile_variants_sm90"] = compile_report("--variants", "12")[0]
        print("sm_90 compiled variants over 12 image sizes:", payload["compile_variants_sm90"])
    if interp:
        print(f"*** {NOT_PERF} ***")
    path = write_results("kernels", device, payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
