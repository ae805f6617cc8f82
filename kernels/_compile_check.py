"""Compile every loss kernel for a CUDA GPU on a machine without one.

``python -m dynaguide.kernels._compile_check [--arch 90]`` runs the public functions under
:func:`dynaguide.kernels.compile_only` (Triton's real argument specialisation and code
generation down to a cubin, nothing launched) for float32 channels-last, bfloat16 NCHW
and float32 NCHW responses of 100 channels, and prints one JSON line per kernel with its
registers and spill bytes (from the ptxas bundled with Triton, when present). With
``--variants K`` it counts instead how many variants of each kernel the training loop's
calls compile over the first K image sizes of :data:`SIZES` (one per configuration means
new image sizes reuse the compiled kernels). It needs ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch


def _ptxas() -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return str(bundled) if bundled.exists() else shutil.which("ptxas")


def _resources(ptx: str, arch: int) -> dict[str, int | None]:
    """Registers and spill-store bytes of one kernel's PTX, via ``ptxas -v``."""
    exe = _ptxas()
    if exe is None:
        return {"registers": None, "spill_bytes": None}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        suffix = "a" if arch >= 90 else ""
        out = subprocess.run(
            [exe, f"-arch=sm_{arch}{suffix}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(spill.group(1)) if spill else None,
    }


def compile_report(arch: int = 90, *, quick: bool = False) -> list[dict[str, Any]]:
    """Compile all kernels (standalone ops, fused passes, finalisation, backward rescale).

    ``quick`` skips the float32 NCHW and the H=W=1 cases.
    """
    import dynaguide.kernels as K

    cases = {
        "float32 channels-last": torch.randn(2, 100, 24, 16).contiguous(
            memory_format=torch.channels_last
        ),
        "bfloat16 NCHW": torch.randn(2, 100, 24, 16).bfloat16(),
        "float32 NCHW": torch.randn(2, 100, 24, 16),
    }
    # Edge shapes: integer arguments equal to 1 (C, H, W, H*W, k_min, ignore_index) are
    # specialised to constants by Triton, a path the interpreter never takes.
    cases["float32 edge C=1 H=1"] = torch.randn(1, 1, 1, 5)
    cases["float32 edge H=W=1"] = torch.randn(2, 3, 1, 1)
    if quick:
        for case in ("float32 NCHW", "float32 edge H=W=1"):
            del cases[case]
    rows: list[dict[str, Any]] = []
    for case, x in cases.items():
        n, c, h, w = x.shape
        t = torch.randint(-1, c, (n, h, w))
        with K.compile_only(arch) as compiled:
            r = x.requires_grad_()
            K.continuity_loss(r, penalty="huber", neighbors=8).backward()
            K.continuity_loss(r, penalty="l1", neighbors=4, reduction="none").sum().backward()
            K.similarity_loss(r)[0].backward()
            K.guidance_loss(r, t, ignore_index=1 if "edge" in case else -1).backward()
            K.dynaguide_loss(r, t, weight="scf", k_min=torch.full((n,), 3)).loss.backward()
            K.dynaguide_loss(r, weight="fsf", k_min=1).loss.backward()
        seen: set[str] = set()
        for name, kernel in compiled:
            key = f"{name}/{kernel.hash}"
            if key in seen:
                continue
            seen.add(key)
            row = {"case": case, "kernel": name, "num_warps": kernel.metadata.num_warps}
            row.update(_resources(kernel.asm["ptx"], arch))
            rows.append(row)
    return rows


# Image sizes that differ in every way Triton used to specialise on: H*W, H and W even/odd,
# multiples of 16 or not, 1-pixel rows, portrait and landscape.
SIZES = [(321, 481), (481, 321), (320, 480), (17, 33), (16, 16), (1, 40), (40, 1), (31, 64),
         (64, 31), (100, 75), (7, 9), (256, 256)]  # fmt: skip


def variant_report(
    sizes: list[tuple[int, int]] | None = None, arch: int = 90, channels: int = 100
) -> dict[str, int]:
    """Distinct compiled variants per kernel over image ``sizes`` (default :data:`SIZES`).

    Runs the training loop's calls (the fused objective with and without guidance, as
    channels-last float32 and bfloat16, forward and backward) for each size under
    :func:`compile_only`; a size that needs no new compilation reuses Triton's cached
    kernel, so the counts are the number of specialisations a run over these sizes compiles.
    """
    import dynaguide.kernels as K

    variants: dict[str, set[str]] = {}
    for h, w in sizes or SIZES:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(1, channels, h, w, dtype=dtype).contiguous(
                memory_format=torch.channels_last
            )
            t = torch.randint(-1, channels, (h, w))
            with K.compile_only(arch) as compiled:
                r = x[0].requires_grad_()
                K.dynaguide_loss(r, t, weight="dynaguide", k_min=torch.tensor(0)).loss.backward()
                r.grad = None
                K.dynaguide_loss(r, weight="dynaguide", k_min=1).loss.backward()
            for name, kernel in compiled:
                variants.setdefault(name, set()).add(kernel.hash)
    return {name: len(v) for name, v in sorted(variants.items())}


def main(argv: list[str] | None = None) -> int:
    """Print one JSON object per compiled kernel; exit status 0 when all compiled."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90)")
    parser.add_argument("--quick", action="store_true", help="three cases instead of five")
    parser.add_argument(
        "--variants",
        type=int,
        default=0,
        metavar="K",
        help="instead: compiled variants per kernel over the first K sizes of SIZES",
    )
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter replaces kernels at definition time")
    if args.variants:
        sizes = SIZES[: args.variants]
        print(json.dumps({"sizes": sizes, "variants": variant_report(sizes, args.arch)}))
        return 0
    for row in compile_report(args.arch, quick=args.quick):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
