"""``dynaguide smooseg``: train a SmooSeg head, label images with it, score it.

    dynaguide smooseg train DATA OUT --backbone texture --n-classes 27 --steps 3000
    dynaguide smooseg predict OUT/checkpoint.pt IN PRED
    dynaguide smooseg eval OUT/checkpoint.pt VAL        # VAL/images + VAL/masks

``train`` runs under ``torchrun --nproc_per_node N -m dynaguide.cli smooseg train ...`` for
DistributedDataParallel. ``--resume`` continues the run in OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from dynaguide.cli_types import positive_int

__all__ = ["register"]


def register(subparsers: Any) -> None:
    """Add ``smooseg train|predict|eval`` to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "smooseg",
        help="SmooSeg: dataset-level semantic segmentation with a smoothness prior",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="smooseg_command", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="train a head on a folder of images")
    t.add_argument("data", type=Path, help="folder of training images")
    t.add_argument("out", type=Path, help="run folder (checkpoint.pt goes there)")
    t.add_argument(
        "--backbone",
        default="texture",
        help="'texture' (weight-free), or a local DINO/DINOv2/ViT folder or its vit-features .onnx",
    )
    t.add_argument("--n-classes", type=positive_int, required=True, help="number of classes K")
    t.add_argument("--steps", type=positive_int, required=True, help="optimiser steps in all")
    t.add_argument("--batch-size", type=positive_int, default=32, help="images per step (32)")
    t.add_argument("--resolution", type=positive_int, default=224, help="training crop side (224)")
    t.add_argument("--crop-ratio", type=float, default=0.5, help="five-crop side ratio (0.5)")
    t.add_argument("--no-five-crop", action="store_true", help="use each image once, uncropped")
    t.add_argument("--workers", type=int, default=2, help="DataLoader workers (2)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--checkpoint-every", type=positive_int, default=500)
    t.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    t.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="CUDA autocast")
    t.add_argument("--pos-intra-shift", type=float, default=None, help="b1 (default -0.02)")
    t.add_argument("--neg-inter-shift", type=float, default=None, help="b2 (default 0.5)")
    t.add_argument("--lr-projector", type=float, default=None, help="default 1e-4")
    t.add_argument("--lr-prototypes", type=float, default=None, help="default 5e-4")
    t.add_argument("--resume", action="store_true", help="continue the run in OUT")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train, _parser=t)

    pr = sub.add_parser("predict", help="label images with a trained head (segment's outputs)")
    pr.add_argument("checkpoint", type=Path)
    pr.add_argument("input", type=Path, help="an image or a folder of images")
    pr.add_argument("output", type=Path, help="output folder")
    _predictor_args(pr)
    pr.add_argument("--recursive", action="store_true")
    pr.add_argument("--resume", action="store_true", help="keep output sets already written")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=_predict, _parser=pr)

    ev = sub.add_parser("eval", help="pixel accuracy and mIoU on an images/ + masks/ folder")
    ev.add_argument("checkpoint", type=Path)
    ev.add_argument("dataset", type=Path, help="folder with images/ and masks/")
    _predictor_args(ev)
    ev.add_argument("--n-gt-classes", type=positive_int, default=None)
    ev.add_argument("--ignore-index", type=int, default=255)
    ev.add_argument("--limit", type=positive_int, default=None)
    ev.add_argument("--out", type=Path, default=None, help="write the scores as JSON there")
    ev.set_defaults(func=_eval, _parser=ev)


def _predictor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default=None, help="override the checkpoint's backbone path")
    p.add_argument("--resolution", type=positive_int, default=320, help="short side (320)")
    p.add_argument("--no-flip", action="store_true", help="no flip test-time augmentation")
    p.add_argument(
        "--crf", type=int, default=0, metavar="N",
        help="dense-CRF mean-field iterations after the argmax (the paper evaluates with 10; 0 = off)",
    )  # fmt: skip
    p.add_argument("--device", default="cpu")


def _predictor(args: argparse.Namespace) -> Any:
    from dynaguide.smooseg.predict import SmooSegPredictor

    return SmooSegPredictor(
        args.checkpoint,
        backbone=args.backbone,
        resolution=args.resolution,
        flip=not args.no_flip,
        crf_iterations=args.crf,
        device=args.device,
    )


def _train(args: argparse.Namespace) -> int:
    from dynaguide.smooseg.train import TrainOptions, train

    head = {
        k: getattr(args, k)
        for k in ("pos_intra_shift", "neg_inter_shift", "lr_projector", "lr_prototypes")
        if getattr(args, k) is not None
    }
    result = train(
        TrainOptions(
            data=args.data,
            out=args.out,
            n_classes=args.n_classes,
            steps=args.steps,
            backbone=args.backbone,
            batch_size=args.batch_size,
            resolution=args.resolution,
            crop_ratio=args.crop_ratio,
            five_crop=not args.no_five_crop,
            workers=args.workers,
            seed=args.seed,
            checkpoint_every=args.checkpoint_every,
            device=args.device,
            amp=args.amp,
            resume=args.resume,
            progress=not args.quiet,
            head=head,
        )
    )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports
    losses = ", ".join(f"{k}={v:.4f}" for k, v in result.losses.items())
    print(f"step {result.step}: {losses or 'no step run'}; checkpoint {result.checkpoint}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable image sample(s):", file=sys.stderr)
        for line in sorted(set(result.skipped)):
            print(f"  {line}", file=sys.stderr)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from dynaguide.smooseg.predict import predict_folder

    return predict_folder(
        _predictor(args),
        args.input,
        args.output,
        recursive=args.recursive,
        resume=args.resume,
        quiet=args.quiet,
    )


def _eval(args: argparse.Namespace) -> int:
    from dynaguide.smooseg.evaluate import evaluate
    from dynaguide.writing import save_json

    scores = evaluate(
        _predictor(args),
        args.dataset,
        resolution=args.resolution,
        n_gt_classes=args.n_gt_classes,
        ignore_index=args.ignore_index,
        limit=args.limit,
    )
    print(
        f"{len(scores['images'])} images: pixel accuracy {scores['pixel_accuracy']:.4f}, "
        f"mIoU {scores['mIoU']:.4f} (one Hungarian matching over the dataset)"
    )
    if args.out is not None:
        save_json(args.out, scores)
        print(f"scores in {args.out}")
    else:
        print(json.dumps({k: scores[k] for k in ("pixel_accuracy", "mIoU", "per_class_iou")}))
    return 0
