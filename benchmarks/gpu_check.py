"""The first thing to run on a GPU (H100/H200): correctness and speed checks in one command.

    python benchmarks/gpu_check.py            # on the GPU machine, about 5-8 minutes
    python benchmarks/gpu_check.py --tiny     # dry run at tiny sizes, also on CPU

Every figure goes to ``benchmarks/results/gpu-check-<device>.json`` (rewritten after each
section, so an interrupted run keeps what it measured), with the device, commit, command
and library versions. Sections, in this order (a section that fails records its error and
the next one runs; after ``--budget`` seconds the remaining ones are skipped):

  env          torch / CUDA / cuDNN / Triton versions, the device, ``dynaguide._native``
               built with CUDA, the loss backends.
  sync_debug   fused training iterations (eager unguided, eager guided without alignment
               refresh, CUDA-graph replays) under ``torch.cuda.set_sync_debug_mode("error")``.
  repeat       bitwise repeatability: two runs of 20 fused iterations from the same seed
               (cuDNN default, then deterministic).
  fp64         the fused objective and gradient against the float64 torch reference:
               2x100x321x481 float32 and 32x100x1024x1024 bfloat16 (the latter per image).
  refine       200 iterations at 321x481 (synthetic image unless BSDS500 is found) of
               eager fused / CUDA graph / graph+bf16 / library torch reference / the
               authors' loop (benchmarks/refine_cpu.py); ms per iteration, final K, label
               agreement with the eager run, times the bf16 floor.
  losses       fused losses vs the torch composite vs a copy (triton.testing.do_bench;
               benchmarks/kernels.py) at 1 and 8 x 100x481x321.
  native       CUDA argmax+relabel and connected components vs the torch fallback / the
               CPU kernels (timings and equality).
  batched      grouped refinement steps of 1, 8, 32 images (and 32 in bf16): images x
               iterations per second, against one at a time and the floor.
  smoothness   SmooSeg's smoothness loss: reference / factorised / Triton kernel at batch 32,
               784 patches, D 384, K 27 (benchmarks/smoothness_loss.py): times, peak memory,
               errors against float64.
  tests        ``pytest -m gpu`` and the device-agnostic Triton tests on CUDA (last: they
               compile many kernel variants).

Without CUDA and without ``--tiny`` it refuses (exit status 2). The timing sections live in
benchmarks/gpu_check_perf.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # --tiny runs the fused kernels on CPU

from dynaguide.bench_utils import environment, summarize, time_calls
from dynaguide.config import get_preset

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VAL = ROOT.parent / "shared" / "data" / "bsds500" / "val" / "images"


def _sibling(name: str) -> Any:
    """Import benchmarks/<name>.py (shared code of the other benchmark scripts)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


class Check:
    """Run state: device, sizes, the payload written after each section."""

    def __init__(self, args: argparse.Namespace):
        self.tiny = args.tiny
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cuda = self.device.type == "cuda"
        self.budget = args.budget
        self.t0 = time.perf_counter()
        self.out_dir = Path(args.out) if args.out else HERE / "results"
        name = torch.cuda.get_device_name(self.device) if self.cuda else "cpu"
        self.slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        self.payload: dict[str, Any] = {"benchmark": "gpu_check", "tiny": self.tiny, "sections": {}}
        self.h, self.w = (12, 16) if self.tiny else (321, 481)
        self.iters = 4 if self.tiny else 200
        self.image, self.guide, self.image_name = _test_image(self.h, self.w)

    @staticmethod
    def cfg(iters: int) -> Any:
        """The dynaguide preset running exactly ``iters`` iterations."""
        return _cfg(iters)

    @staticmethod
    def sibling(name: str) -> Any:
        """benchmarks/<name>.py as a module."""
        return _sibling(name)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def bench(self, fn: Callable[[], Any], grads: list[torch.Tensor] | None = None) -> dict:
        """Seconds per call: do_bench samples on CUDA, wall time on CPU."""
        if self.cuda:
            import triton.testing

            ms = triton.testing.do_bench(fn, grad_to_none=grads, return_mode="all")
            return summarize([m / 1e3 for m in ms])
        return summarize(time_calls(fn, repeats=2, warmup=1))

    def write(self) -> Path:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"gpu-check-{self.slug}.json"
        env = environment(self.device)
        body = {"environment": env, **self.payload, "seconds_total": time.perf_counter() - self.t0}
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(body, indent=2, default=float) + "\n")
        os.replace(tmp, path)
        return path


def _test_image(h: int, w: int) -> tuple[np.ndarray, np.ndarray, str]:
    """A BSDS500 val image (resized) when present, else a synthetic one; a block guide."""
    images = sorted(VAL.glob("*.jpg")) if VAL.is_dir() else []
    if images:
        from dynaguide.io import load_image

        img = load_image(images[0])
        if img.shape[:2] != (h, w):
            if img.shape[:2] == (w, h):
                img = np.ascontiguousarray(img.transpose(1, 0, 2))
            else:
                img = np.ascontiguousarray(
                    img[:: max(1, img.shape[0] // h), :: max(1, img.shape[1] // w)][:h, :w]
                )
        name = images[0].name
    else:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:h, 0:w]
        regions = (yy * 4 // h) * 5 + (xx * 5 // w)
        palette = rng.integers(0, 256, size=(20, 3))
        img = np.clip(palette[regions] + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        name = "synthetic"
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    guide = (yy * 3 // img.shape[0]) * 4 + (xx * 4 // img.shape[1])
    return img, guide, name


def _cfg(iters: int):
    return get_preset("dynaguide").replace(max_iter=iters, min_labels=0, convergence_tol=0.0)


# ----------------------------------------------------------------------------- sections
def sec_env(ck: Check) -> dict[str, Any]:
    import dynaguide

    out: dict[str, Any] = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if ck.cuda else None,
        "python": platform.python_version(),
        "dynaguide_env": dynaguide.env_report(),
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if ck.cuda:
        p = torch.cuda.get_device_properties(ck.device)
        out["device"] = {
            "name": p.name,
            "capability": f"{p.major}.{p.minor}",
            "memory_GiB": p.total_memory / 2**30,
            "sms": p.multi_processor_count,
        }
    from dynaguide.label_ops import native_module

    mod = native_module()
    out["native_built"] = mod is not None
    out["native_has_cuda"] = bool(mod is not None and mod.has_cuda())
    out["native_cuda_devices"] = int(mod.cuda_device_count()) if mod is not None else 0
    return out


def sec_sync_debug(ck: Check) -> dict[str, Any]:
    if not ck.cuda:
        return {"skipped": "needs CUDA"}
    from dynaguide.cuda_graph import CudaGraphStep
    from dynaguide.refine import RefineStep

    cfg = _cfg(50)
    out: dict[str, Any] = {}

    def under_error_mode(name: str, fn: Callable[[], Any], n: int = 10) -> None:
        ck.sync()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(n):
                fn()
            out[name] = "no host synchronisation"
        except RuntimeError as e:
            out[name] = f"FAILED: {e}"[:500]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        ck.sync()

    plain = RefineStep(ck.image, cfg, device=ck.device, seed=0)
    plain.step()
    under_error_mode("eager_unguided", plain.step)
    guided = RefineStep(ck.image, cfg, guide_labels=ck.guide, device=ck.device, seed=0)
    guided.step()
    guided.step()
    under_error_mode("eager_guided_no_refresh", lambda: guided.step(refresh_alignment=False))
    graph = CudaGraphStep(
        RefineStep(ck.image, cfg, guide_labels=ck.guide, device=ck.device, seed=0)
    )
    for _ in range(4):
        graph(refresh_alignment=False)
    under_error_mode("graph_replay_guided", lambda: graph(refresh_alignment=False))
    graph.close()
    return out


def sec_repeat(ck: Check) -> dict[str, Any]:
    from dynaguide.refine import RefineStep

    cfg = _cfg(20)
    out: dict[str, Any] = {}
    for mode in ("cudnn_default", "cudnn_deterministic"):
        prev = torch.backends.cudnn.deterministic
        torch.backends.cudnn.deterministic = mode == "cudnn_deterministic"
        try:
            runs = []
            for _ in range(2):
                st = RefineStep(ck.image, cfg, guide_labels=ck.guide, device=ck.device, seed=0)
                hist = [st.step() for _ in range(3 if ck.tiny else 20)]
                runs.append(([float(h[0]) for h in hist], hist[-1][1].cpu()))
        finally:
            torch.backends.cudnn.deterministic = prev
        (la, ya), (lb, yb) = runs
        out[mode] = {
            "losses_bitwise_equal": la == lb,
            "labels_bitwise_equal": bool(torch.equal(ya, yb)),
            "max_loss_rel_diff": max(
                abs(a - b) / max(abs(a), 1e-30) for a, b in zip(la, lb, strict=True)
            ),
            "label_agreement": float((ya == yb).float().mean()),
        }
    return out


def _compare_fused(r: torch.Tensor, t: torch.Tensor) -> dict[str, Any]:
    """Fused per-image losses and gradient of ``r`` against the float64 reference."""
    import dynaguide.kernels as K

    x = r.detach().requires_grad_()
    loss, labels, k = K.dynaguide_loss(x, t, weight="dynaguide", reduction="none")
    loss.sum().backward()
    errs = {"loss": 0.0, "grad": 0.0, "labels_equal": True, "k_equal": True}
    for n in range(r.shape[0]):
        ref = r[n : n + 1].detach().double().requires_grad_()
        want, wl, wk = K.dynaguide_loss_reference(
            ref, t[n : n + 1], weight="dynaguide", reduction="none"
        )
        want.sum().backward()
        errs["loss"] = max(
            errs["loss"],
            abs(float(loss[n].detach()) - float(want[0].detach())) / abs(float(want[0].detach())),
        )
        g, gw = x.grad[n].double(), ref.grad[0]
        errs["grad"] = max(errs["grad"], float((g - gw).abs().max() / gw.abs().max()))
        errs["labels_equal"] &= bool(torch.equal(labels[n], wl[0]))
        errs["k_equal"] &= int(k[n]) == int(wk[0])
        del ref, want, wl, wk, g, gw
    return {"loss_max_rel_err": errs["loss"], "grad_max_norm_rel_err": errs["grad"],
            "labels_equal": errs["labels_equal"], "k_equal": errs["k_equal"]}  # fmt: skip


def sec_fp64(ck: Check) -> dict[str, Any]:
    gen = torch.Generator(device=ck.device.type).manual_seed(0)
    cases = {
        "float32 2x100x321x481": ((2, 100, 321, 481), torch.float32),
        "bfloat16 32x100x1024x1024": ((32, 100, 1024, 1024), torch.bfloat16),
    }
    if ck.tiny:
        cases = {"float32 2x8x12x10": ((2, 8, 12, 10), torch.float32),
                 "bfloat16 3x8x16x16": ((3, 8, 16, 16), torch.bfloat16)}  # fmt: skip
    out = {}
    for name, (shape, dtype) in cases.items():
        n, c, h, w = shape
        r = (torch.randn(shape, device=ck.device, generator=gen) * 2).to(dtype)
        r = r.contiguous(memory_format=torch.channels_last)
        t = torch.randint(-1, c, (n, h, w), device=ck.device, generator=gen)
        out[name] = _compare_fused(r, t)
        del r, t
        if ck.cuda:
            torch.cuda.empty_cache()
    return out


def sec_tests(ck: Check) -> dict[str, Any]:
    tests = ROOT / "tests"
    runs = {
        "pytest -m gpu": ["-m", "gpu", str(tests)],
        "triton on CUDA": [str(tests / "test_kernels.py"), str(tests / "test_cuda_graph.py"),
                           str(tests / "test_kernels_smoothness.py"),
                           str(tests / "test_batched.py") + "::test_fused_triton_objective_matches_solo"],
    }  # fmt: skip
    if ck.tiny:
        runs = {
            "pytest -m gpu (tiny: one module)": ["-m", "gpu", str(tests / "test_kernels_launch.py")]
        }
    out = {}
    for i, (name, args) in enumerate(runs.items()):
        t = time.perf_counter()
        # what is left of the budget (plus a minute) shared by the remaining runs
        left = ck.budget + 60 - (t - ck.t0)
        limit = 60 if ck.tiny else max(30.0, min(300.0, left / (len(runs) - i)))
        try:
            # from a temporary folder: the source tree must not shadow the installed package
            proc = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir",
                 str(ROOT), "-c", str(ROOT / "pyproject.toml"), *args],
                cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=limit,
            )  # fmt: skip
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            out[name] = {"returncode": proc.returncode, "summary": tail[-1] if tail else "",
                         "tail": tail, "seconds": time.perf_counter() - t}  # fmt: skip
        except subprocess.TimeoutExpired:
            out[name] = {
                "returncode": None,
                "summary": "timed out",
                "seconds": time.perf_counter() - t,
            }
    return out


def sec_smoothness(ck: Check) -> dict[str, Any]:
    sizes = (2, 4, 16, 3) if ck.tiny else (32, 28, 384, 27)
    args = argparse.Namespace(batch=sizes[0], side=sizes[1], dim=sizes[2], classes=sizes[3],
                              repeats=1 if ck.tiny else 5)  # fmt: skip
    return _sibling("smoothness_loss").cuda_section(args, device=ck.device.type)


_perf = _sibling("gpu_check_perf")  # the timing sections
SECTIONS: dict[str, Callable[[Check], dict[str, Any]]] = {
    "env": sec_env,
    "sync_debug": sec_sync_debug,
    "repeat": sec_repeat,
    "fp64": sec_fp64,
    "refine": _perf.sec_refine,
    "losses": _perf.sec_losses,
    "native": _perf.sec_native,
    "batched": _perf.sec_batched,
    "smoothness": sec_smoothness,
    "tests": sec_tests,
}


def main(argv: list[str] | None = None) -> int:
    """Run the sections, write the JSON after each; exit 0 when every section ran."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiny", action="store_true", help="dry run at tiny sizes (CPU allowed)")
    ap.add_argument(
        "--budget", type=float, default=420.0, help="seconds before later sections are skipped"
    )
    ap.add_argument("--only", default=None, help="comma-separated sections (default: all)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() and not args.tiny:
        print("gpu_check needs a CUDA device (run with --tiny for a CPU dry run)", file=sys.stderr)
        return 2
    wanted = list(SECTIONS) if args.only is None else args.only.split(",")
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    ck = Check(args)
    failed = 0
    for name in wanted:
        if time.perf_counter() - ck.t0 > ck.budget:
            ck.payload["sections"][name] = {"skipped": f"time budget of {ck.budget:.0f} s spent"}
            continue
        t = time.perf_counter()
        try:
            result = SECTIONS[name](ck)
        except Exception as e:
            failed += 1
            result = {
                "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()[-3000:],
            }
        result["seconds"] = time.perf_counter() - t
        ck.payload["sections"][name] = result
        path = ck.write()
        print(
            f"[{time.perf_counter() - ck.t0:6.1f} s] {name}: {'error' if 'error' in result else 'done'}",
            flush=True,
        )
    print("wrote", path)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
