"""``dynaguide export``: ONNX export of guidance models and the refine net.

::

    dynaguide export segformer CHECKPOINT_DIR model.onnx
    dynaguide export vit-attention CHECKPOINT_DIR attn.onnx --layers -1 --size 320 480
    dynaguide export refine-net net.pt net.onnx --bn auto

Each subcommand verifies the export against torch on a fresh random input of a size other
than the export size and prints the largest absolute difference. Exit codes: 0 success,
1 export or verification failed, 2 usage error (missing or wrong input).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["register"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def register(subparsers: Any) -> None:
    """Add the ``export`` subcommand (with ``segformer``, ``vit-attention``, ``vit-features``,
    ``refine-net``).

    Parameters
    ----------
    subparsers : argparse._SubParsersAction
        The top-level parser's subparsers.
    """
    parser = subparsers.add_parser(
        "export",
        help="export guidance models / the refine net to ONNX (verified against torch)",
        description="Export to ONNX with dynamic height and width, then verify against torch.",
    )
    sub = parser.add_subparsers(
        dest="export_kind", metavar="{segformer,vit-attention,vit-features,refine-net}"
    )
    parser.set_defaults(func=lambda args: _usage(parser))

    seg = sub.add_parser("segformer", help="a local SegFormer checkpoint folder")
    seg.add_argument("checkpoint", help="folder written by save_pretrained (config.json + weights)")
    seg.add_argument("out", help="output .onnx file")
    _common(seg, atol=1e-3)
    seg.set_defaults(func=_run(_segformer))

    vit = sub.add_parser("vit-attention", help="ViT / DINO / DINOv2 patch self-attention")
    vit.add_argument("checkpoint", help="folder written by save_pretrained (config.json + weights)")
    vit.add_argument("out", help="output .onnx file")
    vit.add_argument(
        "--layers", type=int, nargs="+", default=[-1], help="layers to average (default: -1)"
    )
    vit.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="export input size; the fixed size if the model cannot export with dynamic H, W",
    )
    _common(vit, atol=1e-3)
    vit.set_defaults(func=_run(_vit))

    feat = sub.add_parser("vit-features", help="ViT / DINO / DINOv2 patch features (SmooSeg)")
    feat.add_argument(
        "checkpoint", help="folder written by save_pretrained (config.json + weights)"
    )
    feat.add_argument("out", help="output .onnx file")
    feat.add_argument(
        "--size", type=int, nargs=2, metavar=("H", "W"), help="export input size (multiples of p)"
    )
    _common(feat, atol=1e-4)
    feat.set_defaults(func=_run(_vit_features))

    ref = sub.add_parser("refine-net", help="a trained per-image refine net (.pt)")
    ref.add_argument("checkpoint", help=".pt holding {'config': dict, 'state_dict': ...}")
    ref.add_argument("out", help="output .onnx file")
    ref.add_argument(
        "--bn",
        choices=("auto", "batch", "eval"),
        default="auto",
        help="BatchNorm statistics: per-image batch statistics or running ones "
        "(auto: follow the config's final_pass)",
    )
    _common(ref, atol=1e-4)
    ref.set_defaults(func=_run(_refine))


def _common(parser: argparse.ArgumentParser, *, atol: float) -> None:
    parser.add_argument(
        "--atol",
        type=_tolerance,
        default=atol,
        help=f"verification tolerance on max|ort - torch| / max(1, max|torch|) (default {atol})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return EXIT_USAGE


def _segformer(args: argparse.Namespace) -> Any:
    from dynaguide.export.segformer import export_segformer

    return export_segformer(args.checkpoint, args.out, atol=args.atol, seed=args.seed)


def _vit(args: argparse.Namespace) -> Any:
    from dynaguide.export.vit_attention import export_vit_attention

    size = tuple(args.size) if args.size else None
    return export_vit_attention(
        args.checkpoint, args.out, layers=args.layers, size=size, atol=args.atol, seed=args.seed
    )


def _vit_features(args: argparse.Namespace) -> Any:
    from dynaguide.export.vit_features import export_vit_features

    size = tuple(args.size) if args.size else None
    return export_vit_features(args.checkpoint, args.out, size=size, atol=args.atol, seed=args.seed)


def _refine(args: argparse.Namespace) -> Any:
    from dynaguide.export.refine import export_refine_net

    return export_refine_net(args.checkpoint, args.out, bn=args.bn, atol=args.atol, seed=args.seed)


def _run(fn: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        try:
            report = fn(args)
        except (OSError, ValueError, TypeError, KeyError) as exc:  # names the input
            print(f"dynaguide export {args.export_kind}: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        except (RuntimeError, ImportError, MemoryError) as exc:
            print(f"dynaguide export {args.export_kind}: failed: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(report.summary())
        print(f"max_abs_diff {report.max_abs_diff:.6g}")
        return EXIT_OK

    return command
