"""Images/s of the Ray runner (``segment_dataset``) vs one in-process ``segment_batch``.

Side by side in one run, on the first ``--limit`` BSDS500 val images refined at ``--scale``
for ``--max-iter`` iterations (default preset, its k-means guide, seed 0), reading the JPEG
files from disk in both paths:

  * in-process: :func:`dynaguide.segment_batch` over the paths, with 1 torch thread and with
    ``--workers`` threads;
  * Ray: :func:`dynaguide.distributed.segment_dataset` on a local cluster of ``--workers``
    CPUs, one 1-thread worker per CPU (``OMP_NUM_THREADS=1``), files output. Wall time from
    the call to its return (worker start-up included; ``ray.init`` timed apart), and a
    steady-state rate: images finished after every worker delivered its first one, over
    the time since then.

Also measured, for the scaling model in ``benchmarks/NOTES.md``: bytes per image read
(JPEG), written (files and Parquet formats, always at the image's full size) and sent
through Ray's object store (input rows, status records), and the same outputs for
segmentations with as few segments as at convergence (the human annotations). The model's
GPU figures are derived, not measured: convolution FLOPs over a published peak rate.

    OMP_NUM_THREADS=1 python benchmarks/ray_throughput.py [--limit 16] [--scale 0.2] \\
        [--max-iter 10] [--workers 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import dynaguide
from dynaguide.api import build_config
from dynaguide.bench_utils import summarize, write_results
from dynaguide.build_info import build_commit
from dynaguide.model import conv_flops_per_pixel
from dynaguide.rle import labels_to_rles

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "bsds500" / "val" / "images"
#: NVIDIA H100 SXM5 dense BF16 tensor-core peak (datasheet; 1979 TFLOP/s is with sparsity).
H100_BF16_DENSE = 989.4e12
#: NVIDIA H100 SXM5 HBM3 bandwidth (datasheet).
H100_HBM_BYTES_S = 3.35e12
BSDS_SIZE = (321, 481)


def _folder_bytes(folder: Path, *, skip_hidden: bool = True) -> tuple[int, int]:
    files = [
        p
        for p in folder.rglob("*")
        if p.is_file() and not (skip_hidden and ".dynaguide" in p.parts)
    ]
    return sum(p.stat().st_size for p in files), len(files)


def _in_process(paths: list[Path], kwargs: dict[str, Any], threads: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        segs = dynaguide.segment_batch(paths, **kwargs)
        times.append(time.perf_counter() - t)
    assert all(s is not None for s in segs)
    s = summarize(times)
    return {"threads": threads, "seconds": s, "images_per_s": len(paths) / s["median"]}


def _ray_runs(
    paths: list[Path], kwargs: dict[str, Any], workers: int, repeats: int, tmp: Path
) -> dict:
    import pyarrow as pa
    import ray

    from dynaguide.distributed import segment_dataset

    t = time.perf_counter()
    env = {"OMP_NUM_THREADS": "1"}
    ray.init(num_cpus=workers, include_dashboard=False, runtime_env={"env_vars": env})
    init_s = time.perf_counter() - t
    walls, steady, first = [], [], []
    records: list[dict[str, Any]] = []
    try:
        for r in range(repeats):
            out = tmp / f"ray-{r}"
            arrivals: list[float] = []
            records = []

            def progress(rec: dict[str, Any], arrivals=arrivals, records=records) -> None:
                arrivals.append(time.perf_counter())
                records.append(rec)

            t0 = time.perf_counter()
            run = segment_dataset(
                paths, out, num_workers=workers, batch_size=1, progress=progress, **kwargs
            )
            walls.append(time.perf_counter() - t0)
            assert run.segmented == len(paths), run
            first.append(arrivals[0] - t0)
            k = min(workers, len(arrivals) - 1)
            steady.append((len(arrivals) - k) / (arrivals[-1] - arrivals[k - 1]))
        parquet_out = tmp / "ray-parquet"
        segment_dataset(
            paths, parquet_out, num_workers=workers, batch_size=8, output_format="parquet", **kwargs
        )
    finally:
        ray.shutdown()
    n = len(paths)
    rows = [{"id": p.stem, "path": str(p.resolve()), "name": str(p)} for p in paths]
    (tmp / "ray-0" / "errors.jsonl").unlink()  # empty: not an output of an image
    files_bytes, files_count = _folder_bytes(tmp / "ray-0")
    marker_bytes, marker_count = _folder_bytes(
        tmp / "ray-0" / ".dynaguide" / "done", skip_hidden=False
    )
    return {
        "workers": workers,
        "ray_init_s": init_s,
        "seconds": summarize(walls),
        "images_per_s": n / summarize(walls)["median"],
        "first_result_s": summarize(first),
        "steady_images_per_s": summarize(steady),
        "bytes_per_image": {
            "files_outputs": files_bytes / n,
            "files_per_image": files_count / n,
            "done_markers": marker_bytes / max(1, marker_count),
            "parquet": _folder_bytes(parquet_out / "segments")[0] / n,
            "object_store_input_row": pa.Table.from_pylist(rows).nbytes / n,
            "object_store_status_record": pa.Table.from_pylist(records).nbytes / n,
        },
    }


def _converged_outputs(paths: list[Path], tmp: Path) -> dict[str, Any]:
    """Output sizes per image for segmentations with few segments, as at convergence: the
    first human annotation of each image (BSDS500 ``gt/*.npz``, 5-40 segments) saved as a
    result. A short CPU run stops with many more labels than a converged one."""
    import numpy as np

    from dynaguide.segmentation import Segmentation

    sizes: dict[str, list[float]] = {"labels_png": [], "overlay_png": [], "rle_counts": []}
    ks = []
    for path in paths:
        gt = path.parent.parent / "gt" / f"{path.stem}.npz"
        if not gt.is_file():
            continue
        compact, k = dynaguide.relabel_compact(np.load(gt)["a0"].astype(np.int64))
        rgb = dynaguide.io.load_image(path)
        seg = Segmentation(
            labels=compact.astype(np.int32), n_labels=int(k), n_iter=0, history={},
            guide_labels=None, image=rgb, config={}, seconds=0.0, stop_reason="annotation",
        )  # fmt: skip
        files = seg.save(tmp / "gt", path.stem)
        sizes["labels_png"].append(files["labels"].stat().st_size)
        sizes["overlay_png"].append(files["overlay"].stat().st_size)
        sizes["rle_counts"].append(sum(len(r["counts"]) for r in labels_to_rles(seg.labels, k)))
        ks.append(int(k))
    n = max(1, len(ks))
    return {
        "images": len(ks),
        "mean_segments": sum(ks) / n,
        **{f"{k}_bytes": sum(v) / n for k, v in sizes.items()},
    }


def _cpu_side_seconds(paths: list[Path], tmp: Path, repeats: int = 3) -> dict[str, Any]:
    """CPU work of a worker per full-size image besides the refinement (median seconds):
    decoding the JPEG, the k-means guide, writing the files of one result."""
    import numpy as np

    from dynaguide.guidance import get_guide
    from dynaguide.segmentation import Segmentation

    guide = get_guide("kmeans")
    timings: dict[str, list[float]] = {"decode": [], "kmeans_guide": [], "save_files": []}
    for path in paths[:repeats]:
        t = time.perf_counter()
        rgb = dynaguide.io.load_image(path)
        timings["decode"].append(time.perf_counter() - t)
        t = time.perf_counter()
        labels = np.asarray(guide(rgb))
        timings["kmeans_guide"].append(time.perf_counter() - t)
        compact, k = dynaguide.relabel_compact(labels.astype(np.int64))
        seg = Segmentation(
            labels=compact.astype(np.int32), n_labels=int(k), n_iter=0, history={},
            guide_labels=None, image=rgb, config={}, seconds=0.0, stop_reason="timing",
        )  # fmt: skip
        t = time.perf_counter()
        seg.save(tmp / "cpu-side", path.stem)
        timings["save_files"].append(time.perf_counter() - t)
    return {k: summarize(v)["median"] for k, v in timings.items()}


def _history_bytes_per_iteration(out: Path) -> float:
    """JSON bytes the per-iteration history adds (loss and K per iteration)."""
    data = [json.loads(p.read_text()) for p in out.glob("*.json")]
    return sum(len(json.dumps(d["history"])) for d in data) / sum(d["n_iter"] for d in data)


def scaling_model(preset: str, gpus: int = 100) -> dict[str, Any]:
    """Compute floor of one BSDS-size image on an H100 (an ESTIMATE from FLOPs and the
    datasheet peak, not a measurement) and what ``gpus`` of them would ask of the rest."""
    config = build_config(preset)
    h, w = BSDS_SIZE
    flops_iter = conv_flops_per_pixel(config) * h * w
    floor_iter = flops_iter / H100_BF16_DENSE
    # bf16 activations of width n_channels, read or written about 24 times per iteration
    # (3 convs + BN + ReLU forward, twice that backward, the losses): a memory-bound floor
    traffic_iter = 24 * config.n_channels * h * w * 2
    memory_iter = traffic_iter / H100_HBM_BYTES_S
    per_image = {it: it * (floor_iter + memory_iter) for it in (300, 1000)}
    return {
        "estimate": True,
        "preset": config.name,
        "size": [h, w],
        "conv_gflop_per_iteration": flops_iter / 1e9,
        "h100_bf16_dense_flops": H100_BF16_DENSE,
        "compute_floor_ms_per_iteration": floor_iter * 1e3,
        "memory_floor_ms_per_iteration": memory_iter * 1e3,
        "floor_s_per_image": per_image,
        "gpus": gpus,
        "cluster_images_per_s_at_floor": {it: gpus / s for it, s in per_image.items()},
    }


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and write ``benchmarks/results/ray_throughput-cpu.json``."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--preset", default="dynaguide")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--scale", type=float, default=0.2)
    ap.add_argument("--max-iter", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("note: run with OMP_NUM_THREADS=1 (one thread per worker)", file=sys.stderr)
    paths = sorted(Path(args.data).glob("*.jpg"))[: args.limit]
    if not paths:
        raise SystemExit(f"no .jpg images in {args.data}")
    kwargs = {"preset": args.preset, "max_iter": args.max_iter, "scale": args.scale, "seed": 0}
    load_start = list(os.getloadavg())
    dynaguide.segment_batch(paths[:1], **kwargs)  # warm-up: imports, native extension
    tmp = Path(tempfile.mkdtemp(prefix="ray-throughput-"))
    try:
        one = _in_process(paths, kwargs, 1, args.repeats)
        many = _in_process(paths, kwargs, args.workers, args.repeats)
        ray_result = _ray_runs(paths, kwargs, args.workers, args.repeats, tmp)
        ray_result["history_bytes_per_iteration"] = _history_bytes_per_iteration(tmp / "ray-0")
        converged = _converged_outputs(paths, tmp)
        cpu_side = _cpu_side_seconds(paths, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    payload = {
        "benchmark": "ray_throughput",
        "commit": build_commit(),
        "images": [p.name for p in paths],
        "scale": args.scale,
        "max_iter": args.max_iter,
        "load_average_at_start": load_start,
        "load_average_at_end": list(os.getloadavg()),
        "input_jpeg_bytes_per_image": sum(p.stat().st_size for p in paths) / len(paths),
        "in_process_1_thread": one,
        f"in_process_{args.workers}_threads": many,
        "ray": ray_result,
        "ratio_ray_vs_in_process_1_thread": ray_result["images_per_s"] / one["images_per_s"],
        "ratio_ray_steady_vs_in_process_1_thread": (
            ray_result["steady_images_per_s"]["median"] / one["images_per_s"]
        ),
        "converged_outputs_proxy": converged,
        "cpu_side_seconds_per_full_size_image": cpu_side,
        "scaling_model": scaling_model(args.preset),
    }
    out = args.out if args.out is not None else ROOT / "benchmarks" / "results"
    path = write_results("ray_throughput", torch.device("cpu"), payload, out)
    print(json.dumps({k: payload[k] for k in payload if k.startswith("ratio")}, indent=1))
    print(
        f"in-process 1 thread {one['images_per_s']:.2f} img/s, {args.workers} threads "
        f"{many['images_per_s']:.2f} img/s; Ray {args.workers} workers "
        f"{ray_result['images_per_s']:.2f} img/s end to end, "
        f"{ray_result['steady_images_per_s']['median']:.2f} img/s steady; written to {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
