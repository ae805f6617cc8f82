"""Guidance models: ONNX Runtime vs torch eager, side by side in one run.

Randomly initialised models built from configs (no weights are downloaded; speed does not
depend on the weight values):

* SegFormer-b0 (``SegformerConfig()`` defaults: MiT-b0 encoder, 256-wide decoder, 150
  ADE20K classes);
* ViT-S/16 (384 wide, 12 layers, 6 heads), exported as DiffSeg's patch-attention provider
  (last layer, CLS dropped, rows renormalised, heads averaged).

Rows (each timed for both runtimes on the same inputs, median/min/max of ``--repeats``
calls after warm-up):

* ``*-network``: the network alone on a 321x481 input (the BSDS500 size; ViT at 320x480,
  a multiple of its patch);
* ``segformer-guide``: the whole guide on a 321x481 RGB image (preprocess to the processor's
  512x512, network, bilinear resize of the logits to 321x481, argmax);
* ``diffseg-guide``: the whole DiffSeg guide on the same image (ViT-S/16 at 320x480,
  20x30 grid, merging with 16x16 anchors, NMS to 321x481). The merging is torch in both
  rows; only the attention provider differs.

On CUDA (torch sees a GPU and onnxruntime-gpu has the CUDA provider) the same rows run on
the GPU, with CUDA-synchronised timing and ORT I/O binding.

    python benchmarks/guidance.py [--repeats 10] [--device cpu|cuda] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynaguide.bench_utils import summarize, time_calls, write_results

H, W = 321, 481


def _build(folder: Path) -> tuple[Path, Path]:
    from transformers import (
        SegformerConfig,
        SegformerForSemanticSegmentation,
        ViTConfig,
        ViTModel,
    )

    torch.manual_seed(0)
    seg = folder / "segformer-b0"
    SegformerForSemanticSegmentation(SegformerConfig(num_labels=150)).save_pretrained(str(seg))
    vit = folder / "vit-s16"
    cfg = ViTConfig(
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=6,
        intermediate_size=1536,
        patch_size=16,
        image_size=224,
    )
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(str(vit))
    return seg, vit


def _row(
    name: str, fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device
) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name}
    for runtime, fn in fns.items():
        row[runtime] = summarize(time_calls(fn, repeats=repeats, warmup=2, device=device))
    row["speedup_ort_vs_torch"] = row["torch"]["median"] / row["onnxruntime"]["median"]
    return row


def main() -> None:
    """Run the benchmark; write ``benchmarks/results/guidance-<device>.json``."""
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--repeats", type=int, default=10, help="timed calls per row and runtime")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import onnxruntime as ort
    from dynaguide.export import export_segformer
    from dynaguide.export.ort_session import OrtSession

    from dynaguide.guidance.diffseg import (
        DiffSegGuide,
        PatchAttention,
        export_vit_attention,
        load_vit,
    )
    from dynaguide.guidance.segformer import SegFormerGuide, load_segformer

    device = torch.device(args.device)
    if device.type == "cuda" and not (
        torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    ):
        raise SystemExit("--device cuda needs a GPU in torch and onnxruntime-gpu's CUDA provider")

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    rows = []
    exports = {}
    with tempfile.TemporaryDirectory(prefix="dynaguide-bench-") as tmp:
        seg_dir, vit_dir = _build(Path(tmp))
        seg_onnx, vit_onnx = Path(tmp) / "segformer-b0.onnx", Path(tmp) / "vit-s16.onnx"
        for name, rep in (
            ("segformer-b0", export_segformer(seg_dir, seg_onnx)),
            ("vit-s16-attention", export_vit_attention(vit_dir, vit_onnx, layers=(-1,))),
        ):
            exports[name] = {
                "exporter": rep.exporter,
                "dynamic_hw": rep.dynamic,
                "export_seconds": rep.seconds,
                "max_abs_diff": rep.max_abs_diff,
            }

        # the networks alone
        seg_model = load_segformer(seg_dir).to(device)
        vit_module = PatchAttention(load_vit(vit_dir), (-1,)).eval().to(device)
        seg_sess = OrtSession(seg_onnx, device=device.type)
        vit_sess = OrtSession(vit_onnx, device=device.type)
        x_seg = rng.standard_normal((1, 3, H, W)).astype(np.float32)
        x_vit = rng.standard_normal((1, 3, 320, 480)).astype(np.float32)
        t_seg, t_vit = torch.from_numpy(x_seg).to(device), torch.from_numpy(x_vit).to(device)

        def torch_seg() -> Any:
            with torch.inference_mode():
                return seg_model(pixel_values=t_seg).logits

        def torch_vit() -> Any:
            with torch.inference_mode():
                return vit_module(t_vit)

        keep = ("logits",) if device.type == "cuda" else ()
        rows.append(
            _row(
                "segformer-b0-network 321x481",
                {
                    "torch": torch_seg,
                    "onnxruntime": lambda: seg_sess.run_bound(
                        {"pixel_values": x_seg}, keep_on_device=keep
                    ),
                },
                args.repeats,
                device,
            )
        )
        keep = ("attention",) if device.type == "cuda" else ()
        rows.append(
            _row(
                "vit-s16-attention-network 320x480",
                {
                    "torch": torch_vit,
                    "onnxruntime": lambda: vit_sess.run_bound(
                        {"pixel_values": x_vit}, keep_on_device=keep
                    ),
                },
                args.repeats,
                device,
            )
        )

        # whole guides on an RGB image
        dev = device.type
        g_seg = {
            "torch": SegFormerGuide(seg_dir, backend="torch", device=dev),
            "onnxruntime": SegFormerGuide(seg_onnx, device=dev),
        }
        rows.append(
            _row(
                "segformer-guide image 321x481 (net at 512x512)",
                {k: (lambda g=g: g(image)) for k, g in g_seg.items()},
                args.repeats,
                device,
            )
        )
        merge = {"merge_device": dev, "size": 480}
        g_diff = {
            "torch": DiffSegGuide(vit_dir, backend="torch", layers=(-1,), device=dev, **merge),
            "onnxruntime": DiffSegGuide(vit_onnx, device=dev, **merge),
        }
        rows.append(
            _row(
                "diffseg-guide image 321x481 (ViT-S/16 at 320x480, 20x30 grid)",
                {k: (lambda g=g: g(image)) for k, g in g_diff.items()},
                args.repeats,
                device,
            )
        )
        labels = {k: g(image) for k, g in g_seg.items()}
        agree = float((labels["torch"] == labels["onnxruntime"]).mean())

    head = f"{'torch ms (min/med/max)':>26s} {'ORT ms (min/med/max)':>24s} {'torch/ORT':>9s}"
    print(f"{'row':66s} {head}")
    for r in rows:
        t, o = r["torch"], r["onnxruntime"]
        print(
            f"{r['name']:66s} "
            f"{t['min'] * 1e3:7.1f}/{t['median'] * 1e3:7.1f}/{t['max'] * 1e3:7.1f}   "
            f"{o['min'] * 1e3:7.1f}/{o['median'] * 1e3:7.1f}/{o['max'] * 1e3:7.1f}  "
            f"{r['speedup_ort_vs_torch']:8.2f}x"
        )
    for name, e in exports.items():
        print(f"export {name}: {e}")
    print(f"segformer guide labels, torch vs ORT agreement: {agree:.6f}")
    payload = {
        "repeats": args.repeats,
        "image": [H, W],
        "onnxruntime": ort.__version__,
        "ort_providers": seg_sess.providers,
        "exports": exports,
        "rows": rows,
        "segformer_label_agreement": agree,
    }
    path = write_results("guidance", device, payload, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
