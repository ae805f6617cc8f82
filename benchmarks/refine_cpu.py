"""Per-iteration time of one preset on a full-size BSDS500 val image, on CPU.

Three paths, side by side in one run, each with the preset's network and objective:
  * authors_loop: the iteration as the authors' released training loop writes it, in plain
                  PyTorch (written out below, not their code): NCHW float32 network of
                  nn.Conv2d -> ReLU -> nn.BatchNorm2d blocks, the response permuted to a
                  contiguous (H*W, C) matrix, argmax with ``torch.max``, K by ``np.unique``
                  on the host, cross-entropy by ``nn.CrossEntropyLoss``, the four shifted
                  differences against zero targets with ``nn.SmoothL1Loss`` (or L1), and
                  the sorted-id modulo guide mapping rebuilt every iteration with a Python
                  loop over the label values;
  * reference:    this library with the plain torch losses and NCHW convolutions;
  * default:      this library as ``refine`` runs it on CPU (channels-last, fused ReLU +
                  BatchNorm, input-conv weight gradients by GEMM, native fused losses,
                  freed activation blocks kept in the process: dynaguide.cpu_runtime).
The authors' loop is timed twice: as it runs on its own (glibc defaults) and with the
same heap reuse as the library (authors_loop_heap_reuse).
Median of several iterations after warm-up, the paths taking turns iteration by
iteration; the compute floor is ~96 GFLOP per
iteration (``dynaguide.model.conv_flops_per_pixel``) over the fp32 matmul rate measured in
the same run.

    OMP_NUM_THREADS=2 python benchmarks/refine_cpu.py [--iters 5] [--image ID] [--size HxW]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dynaguide import cpu_runtime
from dynaguide.bench_utils import matmul_rate, summarize, write_results
from dynaguide.config import RefineConfig, get_preset
from dynaguide.guidance import compute_guide_labels
from dynaguide.io import load_image
from dynaguide.model import build_model, conv_flops_per_pixel, cpu_has_native_bf16
from dynaguide.refine import RefineStep

VAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bsds500" / "val" / "images"


class AuthorsNet(nn.Module):
    """The preset's network written as the released code writes it (NCHW, module calls)."""

    def __init__(self, cfg: RefineConfig):
        super().__init__()
        p = cfg.n_channels
        self.conv = nn.ModuleList(
            nn.Conv2d(3 if i == 0 else p, p, 3, padding=1) for i in range(cfg.n_conv)
        )
        self.bn = nn.ModuleList(nn.BatchNorm2d(p) for _ in range(cfg.n_conv))
        self.skip_mode = cfg.skip
        self.skip = nn.Conv2d(3, p, 3, padding=1) if cfg.skip == "separate" else None
        self.conv_out = nn.Conv2d(p, p, 1)
        self.bn_out = nn.BatchNorm2d(p)
        self.relu = nn.ReLU()

    def load_from(self, lib: nn.Module) -> None:
        """Copy the weights of a :class:`dynaguide.model.RefineNet` (same initial network)."""
        src = lib.state_dict()
        names = {
            "conv": "convs",
            "bn": "norms",
            "skip": "skip",
            "conv_out": "classifier",
            "bn_out": "out_norm",
        }
        mine = {}
        for key in self.state_dict():
            head, rest = key.split(".", 1)
            mine[key] = src[f"{names[head]}.{rest}"]
        self.load_state_dict(mine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn[0](self.relu(self.conv[0](x)))
        for conv, bn in zip(self.conv[1:], self.bn[1:], strict=True):
            h = bn(self.relu(conv(h)))
        if self.skip_mode == "shared":
            h = h + self.conv[0](x)  # the released code calls the first conv a second time
        elif self.skip is not None:
            h = h + self.skip(x)
        return self.bn_out(self.conv_out(h))


class AuthorsLoop:
    """One training iteration of the released loop (forward, losses, backward, SGD step)."""

    def __init__(
        self,
        image: np.ndarray,
        guide: np.ndarray | None,
        cfg: RefineConfig,
        seed: int,
        device: str | torch.device = "cpu",
    ):
        self.cfg = cfg
        self.device = torch.device(device)
        x = torch.from_numpy(
            np.ascontiguousarray(image[..., ::-1] if cfg.input_order == "bgr" else image)
        )
        self.x = (x.permute(2, 0, 1).unsqueeze(0).float() / 255.0).to(self.device)
        self.model = AuthorsNet(cfg)
        self.model.load_from(build_model(cfg, seed=seed))
        self.model.to(self.device).train()
        self.opt = torch.optim.SGD(
            self.model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.ce = nn.CrossEntropyLoss()
        self.cont = nn.L1Loss() if cfg.penalty == "l1" else nn.SmoothL1Loss(beta=cfg.delta)
        h, w = image.shape[:2]
        c = cfg.n_channels
        self.zeros = {
            "y": torch.zeros(h - 1, w, c, device=self.device),
            "x": torch.zeros(h, w - 1, c, device=self.device),
            "d": torch.zeros(h - 1, w - 1, c, device=self.device),
        }
        self.guide = None if guide is None else np.asarray(guide).reshape(-1)

    def _remap(self, im_target: np.ndarray) -> torch.Tensor:
        """The i-th smallest guide value -> the (i mod |U_C|)-th smallest live CNN label."""
        live = np.unique(im_target)
        out = np.zeros_like(self.guide)
        for i, value in enumerate(np.unique(self.guide)):
            out[self.guide == value] = live[i % len(live)]
        return torch.from_numpy(out.astype(np.int64)).to(self.device)

    def step(self) -> float:
        cfg = self.cfg
        h, w = self.x.shape[2:]
        self.opt.zero_grad()
        output = self.model(self.x)[0]
        output = output.permute(1, 2, 0).contiguous().view(-1, cfg.n_channels)
        _, target = torch.max(output, 1)
        im_target = target.data.cpu().numpy()
        n_labels = len(np.unique(im_target))
        hp = output.reshape(h, w, cfg.n_channels)
        cont = self.cont(hp[1:] - hp[:-1], self.zeros["y"]) + self.cont(
            hp[:, 1:] - hp[:, :-1], self.zeros["x"]
        )
        if cfg.neighbors == 8:
            cont = cont + self.cont(hp[1:, 1:] - hp[:-1, :-1], self.zeros["d"])
            cont = cont + self.cont(hp[1:, :-1] - hp[:-1, 1:], self.zeros["d"])
        if cfg.weight_mode == "constant":
            weight = cfg.mu
        elif cfg.weight_mode == "scf":
            weight = cfg.scf_mu / n_labels
        else:
            weight = n_labels / cfg.beta
        loss = cfg.similarity_weight * self.ce(output, target) + weight * cont
        if self.guide is not None and cfg.guidance_weight > 0:
            loss = loss + cfg.guidance_weight * self.ce(output, self._remap(im_target))
        loss.backward()
        self.opt.step()
        return loss.item()


def main() -> None:
    """Run the benchmark and write benchmarks/results/refine_cpu-cpu.json."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--iters", type=int, default=5, help="timed iterations per path")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--image", default=None, help="BSDS500 val image id (default: first)")
    ap.add_argument("--size", default=None, help="resize to HxW (e.g. 64x96 for a smoke run)")
    ap.add_argument("--preset", default="dynaguide")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()

    if args.image:
        path = VAL / f"{args.image}.jpg"
    else:
        images = sorted(VAL.glob("*.jpg"))
        if not images:
            raise SystemExit(f"no BSDS500 val images under {VAL}")
        path = images[0]
    image = load_image(path)
    if args.size:
        from skimage.transform import resize

        h, w = (int(v) for v in args.size.lower().split("x"))
        image = (resize(image, (h, w), preserve_range=True, anti_aliasing=True)).astype(np.uint8)
    h, w = image.shape[:2]
    cfg = get_preset(args.preset)
    guide, _ = compute_guide_labels(cfg.default_guidance, image)
    cpu = torch.device("cpu")

    # The authors' loop runs as it runs without this library (glibc returns the freed
    # activation blocks to the system after every iteration; cpu_runtime.paused), and once more
    # with the library's heap reuse, to show what that setting alone is worth.
    authors = AuthorsLoop(image, guide, cfg, seed=0)

    def authors_as_released() -> float:
        with cpu_runtime.paused():
            return authors.step()

    steps = {
        "authors_loop": (authors_as_released, {"layout": "NCHW", "heap_reuse": "False"}),
        "authors_loop_heap_reuse": (authors.step, {"layout": "NCHW", "heap_reuse": "True"}),
    }
    lib_paths = {
        "reference": {"backend": "torch", "channels_last": False},
        "default": {"backend": None, "channels_last": True},
    }
    if cpu_has_native_bf16():  # amp=True: hidden 3x3 convolutions in bf16, the rest float32
        lib_paths["amp_bf16"] = {"backend": None, "channels_last": True, "amp": True}
    for name, opts in lib_paths.items():
        step = RefineStep(image, cfg, guide_labels=guide, device=cpu, seed=0, **opts)
        steps[name] = (step.step, {**{k: str(v) for k, v in opts.items()}, "heap_reuse": "True"})
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    # Round robin: one iteration of each path in turn, so that a change of machine load
    # during the run affects every path alike (the ratios are what this benchmark is for).
    for fn, _ in steps.values():
        for _ in range(args.warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.iters):
        for name, (fn, _) in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    figures = {}
    for name, (_, opts) in steps.items():
        figures[name] = {"seconds_per_iter": summarize(times[name]), **opts}
        med = figures[name]["seconds_per_iter"]["median"]
        print(f"{name:>12}: median {med:.3f} s/iter  ({opts})")

    def med(name: str) -> float:
        return figures[name]["seconds_per_iter"]["median"]

    gflop = conv_flops_per_pixel(cfg) * h * w / 1e9
    rate = matmul_rate(cpu)
    floor = gflop * 1e9 / rate
    speedup = med("authors_loop") / med("default")
    print(f"speedup default vs authors' loop: {speedup:.2f}x")
    print(f"speedup default vs reference path: {med('reference') / med('default'):.2f}x")
    reuse = med("authors_loop_heap_reuse") / med("default")
    print(f"speedup default vs authors' loop with the same heap reuse: {reuse:.2f}x")
    print(
        f"compute floor: {gflop:.1f} GFLOP/iter at {rate / 1e9:.0f} GFLOP/s (fp32 matmul, this run) = {floor:.3f} s/iter"
    )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    # Ratios within each round (the two paths ran seconds apart, under about the same load):
    # robust to load that changes during the run, unlike a ratio of medians.
    rounds = [a / d for a, d in zip(times["authors_loop"], times["default"], strict=True)]
    rounds.sort()
    round_median = statistics.median(rounds)
    print(
        f"per-round speedup default vs authors' loop: median {round_median:.2f}x "
        f"(min {rounds[0]:.2f}x, max {rounds[-1]:.2f}x over {len(rounds)} rounds); "
        f"fastest iterations: {min(times['authors_loop']) / min(times['default']):.2f}x"
    )
    amp_figures = {}
    if "amp_bf16" in steps:
        amp_rounds = sorted(
            a / d for a, d in zip(times["authors_loop"], times["amp_bf16"], strict=True)
        )
        amp_figures = {
            "speedup_amp_bf16_vs_authors_loop": med("authors_loop") / med("amp_bf16"),
            "speedup_amp_bf16_vs_authors_loop_per_round_median": statistics.median(amp_rounds),
            "speedup_amp_bf16_vs_default": med("default") / med("amp_bf16"),
        }
        print(
            f"speedup amp (bf16 hidden convolutions) vs authors' loop: "
            f"{amp_figures['speedup_amp_bf16_vs_authors_loop']:.2f}x (per-round median "
            f"{amp_figures['speedup_amp_bf16_vs_authors_loop_per_round_median']:.2f}x), "
            f"vs default {amp_figures['speedup_amp_bf16_vs_default']:.2f}x"
        )
    payload = {
        "benchmark": "refine_cpu",
        "image": path.name,
        "size": [h, w],
        "preset": cfg.name,
        "threads": torch.get_num_threads(),
        "load_average_before": list(load_before) if load_before else None,
        "load_average_after": list(load) if load else None,
        "paths": figures,
        "speedup_default_vs_authors_loop": speedup,
        "speedup_default_vs_authors_loop_per_round": {
            "median": round_median,
            "min": rounds[0],
            "max": rounds[-1],
            "all": rounds,
        },
        "speedup_default_vs_authors_loop_fastest": min(times["authors_loop"])
        / min(times["default"]),
        "speedup_default_vs_reference": med("reference") / med("default"),
        "speedup_default_vs_authors_loop_heap_reuse": reuse,
        "gflop_per_iter": gflop,
        "matmul_gflops": rate / 1e9,
        "floor_seconds_per_iter": floor,
        "default_fraction_of_floor": floor / med("default"),
        **amp_figures,
    }
    print("wrote", write_results("refine_cpu", cpu, payload, args.out))


if __name__ == "__main__":
    main()
