"""Shared helpers for the benchmark scripts and ``dynaguide bench``.

Timing summaries, the environment record (device, versions, build commit, command) and the
results JSON written to ``<out>/<name>-<device>.json`` (:func:`write_results`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dynaguide.build_info import build_commit


def summarize(seconds: list[float]) -> dict[str, float]:
    """min / median / max / p20 / p80 / n of a list of timings (seconds)."""
    if not seconds:
        raise ValueError("no timings to summarize")
    s = sorted(seconds)

    def q(f: float) -> float:
        return s[min(len(s) - 1, max(0, round(f * (len(s) - 1))))]

    return {
        "min": s[0],
        "median": statistics.median(s),
        "max": s[-1],
        "p20": q(0.2),
        "p80": q(0.8),
        "n": len(s),
    }


def time_calls(
    fn: Callable[[], Any], *, repeats: int, warmup: int = 1, device: torch.device | None = None
) -> list[float]:
    """Wall time of ``repeats`` calls of ``fn`` after ``warmup`` calls (CUDA-synchronised)."""
    sync = (
        torch.cuda.synchronize if device is not None and device.type == "cuda" else (lambda: None)
    )
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def device_name(device: torch.device) -> str:
    """Human-readable name of ``device`` (GPU model or CPU model string)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def _script_root() -> Path | None:
    """The repository of the running benchmark script (``<repo>/benchmarks/<script>.py``)."""
    script = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if script is not None and script.parent.name == "benchmarks":
        return script.parent.parent
    return None


def environment(device: torch.device) -> dict[str, Any]:
    """Device, library versions, commit and command line of this run."""
    env: dict[str, Any] = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "commit": build_commit(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def matmul_rate(
    device: torch.device, *, dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 5
) -> float:
    """Measured dense matmul rate in FLOP/s (the matrix-unit roofline of this run)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = summarize(time_calls(lambda: a @ b, repeats=repeats, warmup=2, device=device))["median"]
    return 2 * n**3 / t


def write_results(
    name: str, device: torch.device, payload: dict[str, Any], out_dir: str | Path | None = None
) -> Path:
    """Write ``payload`` plus the environment to ``<out_dir>/<name>-<device>.json`` atomically.

    The default folder is ``results/`` beside the running benchmark script (``python
    benchmarks/x.py`` in a checkout), else the current directory: never a path inside the
    installed package.
    """
    root = _script_root()
    if out_dir is not None:
        out = Path(out_dir)
    else:
        out = root / "benchmarks" / "results" if root is not None else Path.cwd()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{device.type}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(
        json.dumps({"environment": environment(device), **payload}, indent=2, default=float) + "\n"
    )
    os.replace(tmp, path)
    return path
