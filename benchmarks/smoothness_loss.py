"""SmooSeg smoothness loss: the reference vs the factorised form vs the Triton kernel.

At SmooSeg's training sizes (batch 32, 224x224 crops at patch 8: 28x28 = 784 patches,
ViT-S features D = 384, K = 27 classes), forward + backward (gradients into both codes,
``grad_output`` != 1), pointwise centring, a = b paired with a derangement of the batch:

* memory: extra bytes a call needs beyond its inputs. On CPU measured as the rise of the
  peak resident set (``VmHWM`` after ``/proc/self/clear_refs``, a fresh process per
  method), and given by formula: the reference's N x M matrices, the kernel's exact
  buffers (it allocates nothing else: norms, partial Gram matrices, code gradients).
  On CUDA: ``torch.cuda.max_memory_allocated`` above the inputs;
* time: wall clock of forward + backward, min / median / max over repeats after one
  warm-up (CPU: reference and factorised, with their process CPU time, steadier on a
  shared machine; CUDA: the three methods);
* error of each method's loss and code gradients against the float64 reference.

Usage::

    python benchmarks/smoothness_loss.py [--repeats 5] [--batch 32] [--side 28]
    python benchmarks/smoothness_loss.py --gpu-only   # the CUDA section alone (gpu_check)

Writes ``benchmarks/results/smoothness_loss-<cpu|cuda>.json`` (GPU figures are "not
measured" without a CUDA device).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dynaguide.bench_utils import summarize, time_calls, write_results
from dynaguide.smooseg import derangement, smoothness_loss, smoothness_loss_reference

METHODS = ("reference", "factorised", "triton")


def make_inputs(b: int, side: int, d: int, k: int, device: str, seed: int = 0):
    """Features (B, D, side, side) with their batch permutation (an input, as in training,
    where it is one gather before the loss), codes (softmax over K), a derangement."""
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, d, side, side, generator=gen)
    codes = torch.randn(b, k, side, side, generator=gen).softmax(1)
    perm = derangement(b, generator=gen)
    return (feats.to(device), feats[perm].to(device)), codes.to(device), perm.to(device)


def fwd_bwd(method: str, feats, codes, perm, dtype=None):
    """One call as in SmooSeg's inter-image term: a against a permutation of the batch."""
    c = codes.detach().to(dtype or codes.dtype).requires_grad_()
    loss = smoothness_loss(*feats, c, c[perm], shift=0.3, pointwise=True, method=method)
    (loss * 0.5).backward()
    return loss.detach(), c.grad


def formula_bytes(b: int, n: int, d: int, k: int, elem: int = 4) -> dict[str, int]:
    """Buffers of each method by formula (bytes; float32, M = N).

    Reference, a lower bound: the (B, N, M) feature similarity, code similarity and their
    product alive at once (3 B N M; the centring and autograd's saved operands add more,
    see the measured figure). Factorised: the normalised and weighted (B, N, K) codes of
    both sides and their gradients (about 10 B N K; the features are never copied) plus
    O(B D K). Kernel: its own buffers exactly (inverse norms, one pixel chunk's partial
    Gram matrices and sums, the (B, K, N) code gradients, both sides) plus about eight
    (B, D, K) temporaries of the torch combination step.
    """
    chunks = -(-n // 1024)  # the kernel's pixel chunk on CUDA
    per_side = b * n + b * chunks * (d * k + d + k) + b * k * n
    return {
        "reference_lower_bound": 3 * b * n * n * elem,
        "factorised_estimate": (10 * b * n * k + 8 * b * d * k) * elem,
        "triton": (2 * per_side + 8 * b * d * k) * elem,
    }


_CHILD = """
import sys, torch
sys.path.insert(0, {here!r})
import smoothness_loss as s
feats, codes, perm = s.make_inputs({b}, {side}, {d}, {k}, "cpu")
rss = lambda key: int([l for l in open("/proc/self/status") if l.startswith(key)][0].split()[1])
before = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")
s.fwd_bwd({method!r}, feats, codes, perm)
print((rss("VmHWM:") - before) * 1024)
"""


def measured_rss_bytes(method: str, b: int, side: int, d: int, k: int) -> int | str:
    """Peak resident-set rise of one fwd+bwd in a fresh process (bytes)."""
    code = _CHILD.format(here=str(Path(__file__).parent), b=b, side=side, d=d, k=k, method=method)
    proc = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"failed: {proc.stderr.strip().splitlines()[-1:]}"
    return int(proc.stdout.strip().splitlines()[-1])


def errors(methods, feats, codes, perm) -> dict[str, dict[str, float]]:
    """Max-norm relative errors of loss and code gradient against the float64 reference."""
    c = codes.double().requires_grad_()
    want = smoothness_loss_reference(*(f.double() for f in feats), c, c[perm], shift=0.3)
    (want * 0.5).backward()
    want = want.detach()
    out = {}
    for m in methods:
        loss, grad = fwd_bwd(m, feats, codes, perm)
        out[m] = {
            "loss": abs(float(loss) - float(want)) / abs(float(want)),
            "grad": float((grad.double() - c.grad).abs().max() / c.grad.abs().max()),
        }
    return out


def cuda_section(args, device: str = "cuda") -> dict[str, Any]:
    """Times, peak memory above the inputs and errors of the three methods on CUDA
    (``device="cpu"`` runs the same calls with the kernel in the interpreter, for a dry
    run: its times mean nothing and it has no memory figures)."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    feats, codes, perm = make_inputs(args.batch, args.side, args.dim, args.classes, device)
    out: dict[str, Any] = {"errors_vs_float64": errors(METHODS, feats, codes, perm)}
    for m in METHODS:
        fwd_bwd(m, feats, codes, perm)  # warm-up (compiles the kernels)
        peak: int | str = "not measured (CPU)"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fwd_bwd(m, feats, codes, perm)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        t = summarize(
            time_calls(lambda m=m: fwd_bwd(m, feats, codes, perm), repeats=args.repeats * 4,
                       device=dev)
        )  # fmt: skip
        out[m] = {"fwd_bwd_s": t, "peak_bytes_above_inputs": peak}
        print(f"{device} {m:10s} {t['median'] * 1e3:8.3f} ms  peak {peak}", flush=True)
    loss, grad = fwd_bwd("triton", feats, codes, perm, dtype=torch.bfloat16)
    out["triton_bf16_codes"] = {"loss": float(loss), "grad_finite": bool(grad.isfinite().all())}
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--side", type=int, default=28, help="patches per side (224 / 8)")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=27)
    ap.add_argument("--gpu-only", action="store_true", help="only the CUDA section")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    b, side, d, k = args.batch, args.side, args.dim, args.classes
    n = side * side
    sizes = {"batch": b, "patches": n, "dim": d, "classes": k, "shift": 0.3}
    if args.gpu_only:
        if not torch.cuda.is_available():
            print("no CUDA device: nothing measured", file=sys.stderr)
            return 2
        payload = {"sizes": sizes, "cuda": cuda_section(args)}
        path = write_results("smoothness_loss", torch.device("cuda"), payload, args.out)
        print(f"wrote {path}")
        return 0
    feats, codes, perm = make_inputs(b, side, d, k, "cpu")
    cpu: dict[str, Any] = {"formula_bytes": formula_bytes(b, n, d, k)}
    cpu["measured_peak_rss_rise_bytes"] = {
        m: measured_rss_bytes(m, b, side, d, k) for m in ("reference", "factorised")
    }
    cpu["errors_vs_float64"] = errors(("reference", "factorised"), feats, codes, perm)
    for m in ("reference", "factorised"):
        used: list[float] = []

        def run(m=m, used=used) -> None:
            c0 = time.process_time()
            fwd_bwd(m, feats, codes, perm)
            used.append(time.process_time() - c0)

        t = summarize(time_calls(run, repeats=args.repeats))
        cpu[m] = {"fwd_bwd_s": t, "fwd_bwd_process_cpu_s": summarize(used[1:])}
        print(f"cpu  {m:10s} {t['median'] * 1e3:8.1f} ms wall, "
              f"{cpu[m]['fwd_bwd_process_cpu_s']['median'] * 1e3:8.1f} ms CPU, rss rise "
              f"{cpu['measured_peak_rss_rise_bytes'][m]}", flush=True)  # fmt: skip
    print("formula bytes:", json.dumps(cpu["formula_bytes"]))
    cpu["loadavg_after"] = os.getloadavg()
    payload = {"sizes": sizes, "cpu": cpu}
    payload["cuda"] = cuda_section(args) if torch.cuda.is_available() else "not measured (no CUDA)"
    path = write_results("smoothness_loss", torch.device("cpu"), payload, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
