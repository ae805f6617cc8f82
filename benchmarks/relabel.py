"""Native label kernels vs their numpy / torch / scipy / scikit-image equivalents (CPU).

Measured side by side in one run, same inputs:

* relabel_sequential: native vs ``np.unique(return_inverse=True)``,
  ``skimage.segmentation.relabel_sequential`` and ``torch.unique``.
* connected_components: native (4/8) vs ``skimage.measure.label`` (the same equal-value
  semantics) and ``scipy.ndimage.label`` run once per label value.

Usage::

    python benchmarks/relabel.py [--repeats 9] [--quick]

Prints a table and writes ``benchmarks/results/relabel-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.ndimage as ndi
import torch
from skimage.measure import label as sk_label
from skimage.segmentation import relabel_sequential as sk_relabel

from dynaguide import label_ops as native
from dynaguide.build_info import build_commit

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    """CPU model name and logical core count."""
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical cores)"


def timeit(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    """Wall-clock seconds of ``fn`` after one warm-up call: min / median / max."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"min": min(times), "median": statistics.median(times), "max": max(times)}


def blob_labels(h: int, w: int, k: int, seed: int) -> np.ndarray:
    """A segmentation-like label map: argmax of k smoothed noise fields (blobby regions)."""
    rng = np.random.default_rng(seed)
    fields = ndi.gaussian_filter(rng.normal(size=(k, h // 4 + 1, w // 4 + 1)), sigma=(0, 2, 2))
    small = fields.argmax(axis=0)
    return np.kron(small, np.ones((4, 4), dtype=small.dtype))[:h, :w].astype(np.int32)


def sk_components(lab: np.ndarray, connectivity: int) -> np.ndarray:
    """Equal-value components with scikit-image (values shifted so none is background)."""
    shifted = np.unique(lab, return_inverse=True)[1].reshape(lab.shape) + 1
    return sk_label(shifted, background=0, connectivity=1 if connectivity == 4 else 2)


def scipy_components(lab: np.ndarray, connectivity: int) -> np.ndarray:
    """scipy.ndimage.label once per label value (how one would do it with scipy)."""
    structure = ndi.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    out = np.zeros(lab.shape, dtype=np.int32)
    offset = 0
    for v in np.unique(lab):
        comp, m = ndi.label(lab == v, structure=structure)
        out[comp > 0] = comp[comp > 0] + offset
        offset += m
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="small sizes only (smoke run)")
    args = parser.parse_args(argv)
    mod = native.native_module()
    if mod is None:
        print("dynaguide._native is not built: nothing to compare", file=sys.stderr)
        return 1
    rows: list[dict] = []
    load_before = os.getloadavg()

    def record(op: str, size: str, impl: str, fn: Callable[[], object], base: str | None) -> None:
        t = timeit(fn, args.repeats)
        row = {"op": op, "size": size, "impl": impl, "seconds": t}
        if base is not None:
            ref = next(r for r in rows if r["op"] == op and r["size"] == size and r["impl"] == base)
            row["speedup_vs_" + base] = ref["seconds"]["median"] / t["median"]
        rows.append(row)
        extra = "".join(f"  {k}={v:.2f}x" for k, v in row.items() if k.startswith("speedup"))
        print(f"{op:22s} {size:22s} {impl:26s} {t['median'] * 1e3:9.2f} ms{extra}", flush=True)

    rng = np.random.default_rng(0)
    label_sizes = [(321, 481)] if args.quick else [(321, 481), (1080, 1920)]
    for h, w in label_sizes:
        for kind, lab in (
            ("blobs k=20", blob_labels(h, w, 20, 1)),
            ("noise k=4", rng.integers(0, 4, (h, w)).astype(np.int32)),
        ):
            size = f"{h}x{w} {kind}"
            sparse = (lab.astype(np.int64) * 7919 + 11).astype(np.int64)
            record(
                "relabel_sequential",
                size,
                "np.unique",
                lambda s=sparse: np.unique(s, return_inverse=True),
                None,
            )
            record(
                "relabel_sequential",
                size,
                "skimage",
                lambda s=sparse: sk_relabel(s + 1),
                "np.unique",
            )
            st = torch.from_numpy(sparse)
            record(
                "relabel_sequential",
                size,
                "torch.unique",
                lambda st=st: torch.unique(st, return_inverse=True),
                "np.unique",
            )
            record(
                "relabel_sequential",
                size,
                "native",
                lambda s=sparse: native.relabel_compact(s, backend="native"),
                "np.unique",
            )
            for conn in (4, 8):
                op = f"connected_comp ({conn})"
                record(
                    op,
                    size,
                    "scipy per value",
                    lambda lab=lab, c=conn: scipy_components(lab, c),
                    None,
                )
                record(
                    op,
                    size,
                    "skimage label",
                    lambda lab=lab, c=conn: sk_components(lab, c),
                    "scipy per value",
                )
                record(
                    op,
                    size,
                    "native",
                    lambda lab=lab, c=conn: native.connected_components(lab, c, backend="native"),
                    "scipy per value",
                )
                rows[-1]["speedup_vs_skimage label"] = (
                    rows[-2]["seconds"]["median"] / rows[-1]["seconds"]["median"]
                )

    device = cpu_name()
    result = {
        "benchmark": "relabel",
        "device": device,
        "torch": torch.__version__,
        "triton": _triton_version(),
        "numpy": np.__version__,
        "native_threads": mod.max_threads(),
        "torch_threads": torch.get_num_threads(),
        "commit": build_commit(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "repeats": args.repeats,
        "loadavg_before_after": [load_before, os.getloadavg()],
        "timing": "wall clock, one warm-up call, min/median/max over repeats (seconds)",
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "relabel-cpu.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


def _triton_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("triton")
    except PackageNotFoundError:
        return "not installed"


if __name__ == "__main__":
    sys.exit(main())
