"""SmooSeg on the synthetic textured dataset, weight-free ``texture`` backbone, CPU.

Writes a train and a val split with :func:`dynaguide.smooseg.synthetic.write_textured_dataset`
(Voronoi cells, 3 classes, each a colour + pattern), trains a head on the train images (no
masks used) and scores it on val with one dataset-level Hungarian matching
(:func:`dynaguide.smooseg.evaluate.evaluate`), for each pair of shifts given.

    python benchmarks/smooseg_synthetic.py [--steps 600] [--batch-size 16] \\
        [--shifts B1 B2 [--shifts B1 B2 ...]] [--seeds 0 1 2] [--out benchmarks/results/quality/smooseg-synthetic.json]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dynaguide.bench_utils import environment
from dynaguide.smooseg.evaluate import evaluate
from dynaguide.smooseg.predict import SmooSegPredictor
from dynaguide.smooseg.synthetic import write_textured_dataset
from dynaguide.smooseg.train import TrainOptions, train
from dynaguide.writing import save_json


def main() -> int:
    """Run the measurement and write the JSON."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-images", type=int, default=32)
    p.add_argument("--val-images", type=int, default=16)
    p.add_argument("--size", type=int, nargs=2, default=(128, 192), metavar=("H", "W"))
    p.add_argument("--resolution", type=int, default=96, help="training crop side")
    p.add_argument("--eval-resolution", type=int, default=128)
    p.add_argument(
        "--shifts",
        nargs=2,
        type=float,
        action="append",
        metavar=("B1", "B2"),
        help="intra and inter shifts; repeat for more runs (default: -0.02 0.5)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    p.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).parent / "results" / "quality" / "smooseg-synthetic.json",
    )
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        size = tuple(a.size)
        write_textured_dataset(root / "train", n_images=a.train_images, size=size, seed=0)
        write_textured_dataset(root / "val", n_images=a.val_images, size=size, seed=1)
        runs = [(seed, b1, b2) for seed in a.seeds for b1, b2 in a.shifts or [(-0.02, 0.5)]]
        for seed, b1, b2 in runs:
            t0 = time.perf_counter()
            result = train(
                TrainOptions(
                    data=root / "train" / "images",
                    out=root / f"run{seed}_{b1}_{b2}",
                    n_classes=3,
                    steps=a.steps,
                    batch_size=a.batch_size,
                    resolution=a.resolution,
                    workers=0,
                    device="cpu",
                    seed=seed,
                    progress=False,
                    checkpoint_every=a.steps,
                    head={"pos_intra_shift": b1, "neg_inter_shift": b2},
                )
            )
            seconds = time.perf_counter() - t0
            scores = evaluate(
                SmooSegPredictor(result.checkpoint), root / "val", resolution=a.eval_resolution
            )
            row = {
                "seed": seed,
                "pos_intra_shift": b1,
                "neg_inter_shift": b2,
                "train_seconds": round(seconds, 1),
                "final_losses": result.losses,
                "pixel_accuracy": scores["pixel_accuracy"],
                "mIoU": scores["mIoU"],
                "per_class_iou": scores["per_class_iou"],
                "confusion": scores["confusion"],
                "clusters_used": int((np.asarray(scores["confusion"]).sum(0) > 0).sum()),
            }
            rows.append(row)
            print(
                f"seed={seed} b1={b1} b2={b2}: pixel accuracy {row['pixel_accuracy']:.4f}, mIoU {row['mIoU']:.4f}, {seconds:.0f} s"
            )
    payload = {
        "environment": environment(torch.device("cpu")),
        "dataset": {
            "generator": "dynaguide.smooseg.synthetic.write_textured_dataset",
            "train": {"n_images": a.train_images, "seed": 0},
            "val": {"n_images": a.val_images, "seed": 1},
            "size": list(a.size),
            "n_classes": 3,
        },
        "training": {
            "backbone": "texture (DenseFeatureBackbone defaults)",
            "steps": a.steps,
            "batch_size": a.batch_size,
            "resolution": a.resolution,
            "five_crop": True,
        },
        "evaluation": {
            "resolution": a.eval_resolution,
            "flip_tta": True,
            "matching": "one Hungarian over val",
        },
        "rows": rows,
    }
    save_json(a.out, payload)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
