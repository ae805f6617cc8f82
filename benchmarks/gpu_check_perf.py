"""The timing sections of benchmarks/gpu_check.py (refine paths, fused losses, native CUDA
kernels, batched throughput); each takes the run state ``ck`` (gpu_check.Check) and returns
its figures. Run them through gpu_check.py.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from dynaguide.bench_utils import matmul_rate, summarize, time_calls
from dynaguide.model import conv_flops_per_pixel


def sec_refine(ck: Any) -> dict[str, Any]:
    from dynaguide.refine import refine

    refine_gpu = ck.sibling("refine_gpu")
    authors = ck.sibling("refine_cpu").AuthorsLoop
    cfg = ck.cfg(ck.iters)
    paths: dict[str, dict[str, Any]] = {
        "eager_fused": {"channels_last": True},
        "cuda_graph": {"channels_last": True, "cuda_graph": True},
        "cuda_graph_bf16": {"channels_last": True, "cuda_graph": True, "amp": True},
        "reference_torch": {"backend": "torch", "channels_last": False},
    }
    results: dict[str, Any] = {}
    labels: dict[str, np.ndarray] = {}
    for name, opts in paths.items():
        if opts.get("cuda_graph") and not ck.cuda:
            results[name] = {"skipped": "needs CUDA"}
            continue
        refine(
            ck.image, ck.cfg(3), guide_labels=ck.guide, device=ck.device, seed=0, **opts
        )  # compile
        ck.sync()
        t = time.perf_counter()
        res = refine(ck.image, cfg, guide_labels=ck.guide, device=ck.device, seed=0, **opts)
        ck.sync()
        sec = time.perf_counter() - t
        labels[name] = res.labels.cpu().numpy()
        results[name] = {"ms_per_iter": 1e3 * sec / res.n_iter, "n_iter": res.n_iter,
                         "final_k": res.k_history[-1], "options": {k: str(v) for k, v in opts.items()}}  # fmt: skip
    loop = authors(ck.image, ck.guide, cfg, seed=0, device=ck.device)
    loop.step()
    ck.sync()
    t = time.perf_counter()
    for _ in range(ck.iters):
        loop.step()
    ck.sync()
    results["authors_loop"] = {"ms_per_iter": 1e3 * (time.perf_counter() - t) / ck.iters}
    for name, lab in labels.items():
        results[name]["label_agreement_vs_eager"] = refine_gpu._agreement(
            lab, labels["eager_fused"]
        )
    gflop = conv_flops_per_pixel(cfg) * ck.h * ck.w / 1e9
    dtype = torch.bfloat16 if ck.cuda else torch.float32
    rate = matmul_rate(ck.device, dtype=dtype)
    floor_ms = gflop * 1e9 / rate * 1e3
    for r in results.values():
        if "ms_per_iter" in r:
            r["x_floor"] = r["ms_per_iter"] / floor_ms
            r["speedup_vs_authors_loop"] = results["authors_loop"]["ms_per_iter"] / r["ms_per_iter"]
    return {"image": ck.image_name, "size": [ck.h, ck.w], "iterations": ck.iters,
            "gflop_per_iter": gflop, "matmul_dtype": str(dtype), "matmul_gflops": rate / 1e9,
            "floor_ms_per_iter": floor_ms, "paths": results}  # fmt: skip


def sec_losses(ck: Any) -> dict[str, Any]:
    kbench = ck.sibling("kernels")
    shapes = [(1, 16, 12, 10)] if ck.tiny else [(1, 100, 481, 321), (8, 100, 481, 321)]
    return {"rows": kbench.run(shapes, ck.device, reps=2)}


def sec_native(ck: Any) -> dict[str, Any]:
    from dynaguide import label_ops as native

    out: dict[str, Any] = {}
    n_img = 2 if ck.tiny else 8
    c = 8 if ck.tiny else 100
    gen = torch.Generator(device=ck.device.type).manual_seed(1)
    for n in (1, n_img):
        x = torch.randn(n, c, ck.h, ck.w, device=ck.device, generator=gen)
        x = x.contiguous(memory_format=torch.channels_last)
        row: dict[str, Any] = {}
        if ck.cuda:
            lab = x.argmax(1)
            for name, lm in (("argmax_labels", lab), ("uniform", torch.zeros_like(lab))):
                cc = native.connected_components(lm, 8, backend="native")
                cpu = native.connected_components(lm.cpu().numpy(), 8, backend="native")
                row[f"cc_{name}_equal_cpu"] = bool(np.array_equal(cc.cpu().numpy(), cpu))
                row[f"cc_{name}_cuda_s"] = ck.bench(
                    lambda lm=lm: native.connected_components(lm, 8, backend="native")
                )
                host = lm.cpu().numpy()
                row[f"cc_{name}_cpu_s"] = summarize(time_calls(lambda h=host: native.connected_components(h, 8), repeats=3))  # fmt: skip
        else:
            lab = x.argmax(1).numpy()
            row["cc_argmax_labels_cpu_s"] = ck.bench(
                lambda h=lab: native.connected_components(h, 8)
            )
        out[f"{n}x{c}x{ck.h}x{ck.w}"] = row
    return out


def sec_batched(ck: Any) -> dict[str, Any]:
    from dynaguide.batched_refine import BatchedRefiner

    cfg = ck.cfg(1000)
    sizes = (
        [(1, False), (2, False)] if ck.tiny else [(1, False), (8, False), (32, False), (32, True)]
    )
    steps = 2 if ck.tiny else 20
    rows = []
    for n, amp in sizes:
        eng = BatchedRefiner(cfg, ck.device, (ck.h, ck.w), amp=amp)
        slots = [
            eng.new_slot(i, np.roll(ck.image, 7 * i, axis=1), ck.guide, seed=i) for i in range(n)
        ]
        eng.rebuild([], slots)
        for _ in range(3):
            eng.step([False] * n)
        ck.sync()
        t = time.perf_counter()
        for _ in range(steps):
            eng.step([False] * n)
        ck.sync()
        sec = (time.perf_counter() - t) / steps
        rows.append(
            {"images": n, "bf16": amp, "ms_per_step": 1e3 * sec, "image_iters_per_s": n / sec}
        )
        del eng, slots
        if ck.cuda:
            torch.cuda.empty_cache()
    base = rows[0]["image_iters_per_s"]
    gflop = conv_flops_per_pixel(cfg) * ck.h * ck.w / 1e9
    rate = matmul_rate(ck.device, dtype=torch.bfloat16 if ck.cuda else torch.float32)
    for r in rows:
        r["x_one_at_a_time"] = r["image_iters_per_s"] / base
        r["fraction_of_floor"] = r["image_iters_per_s"] * gflop * 1e9 / rate
    return {"rows": rows, "gflop_per_image_iter": gflop, "matmul_gflops": rate / 1e9}
