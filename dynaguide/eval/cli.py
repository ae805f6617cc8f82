"""``dynaguide eval``: segment and score a dataset from the command line.

    dynaguide eval bsds500 ../shared/data/bsds500/val --preset dynaguide \\
        --guidance kmeans --scale 0.5 --max-iter 150 --limit 20

Writes ``<out>/report.json`` (per-image and total scores, raw and after
connected-component relabelling, with every protocol parameter), caches predictions in
``<out>/predictions/`` (``--resume`` continues an interrupted run) and, with
``--plot``, ``<out>/plots/{grid,history}.png``.

Exit status: 0 all images scored, 1 some image failed (report still written),
2 bad arguments or settings.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any

from dynaguide.cli_types import fraction as _scale
from dynaguide.cli_types import plain_text
from dynaguide.cli_types import positive_int as _positive_int
from dynaguide.config import DEFAULT_PRESET

__all__ = ["main", "register", "run"]


def register(subparsers: Any) -> None:
    """Add the ``eval`` sub-command to an ``argparse`` sub-parser collection."""
    p = subparsers.add_parser(
        "eval",
        help="segment a dataset and score it (BSDS500 All/Fine/Coarse, VOC-style folders)",
        description=plain_text(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "kind",
        choices=["bsds500", "folder"],
        help="bsds500: <dir>/images/*.jpg + <dir>/gt/*.npz; "
        "folder: <dir>/images/ + <dir>/masks/ (index PNGs, VOC protocol)",
    )
    p.add_argument(
        "dataset_dir", type=Path, help="dataset folder (a BSDS500 split, e.g. .../bsds500/val)"
    )
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"preset (default: {DEFAULT_PRESET})")
    p.add_argument(
        "--guidance",
        default="default",
        help="guide name, 'none', or 'default' (the preset's default guide)",
    )
    p.add_argument("--scale", type=_scale, default=None, help="refine at this fraction of the size")
    p.add_argument(
        "--max-iter", type=_positive_int, default=None, help="override the preset's budget"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="network initialisation seed (default: 0)")
    p.add_argument("--limit", type=_positive_int, default=None, help="only the first N images")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: "
        "eval-runs/<dataset>-<preset>-<guidance>-s<scale>-i<iter>-seed<seed>)",
    )
    p.add_argument(
        "--cc",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also score after connected-component relabelling (default: on)",
    )
    p.add_argument(
        "--connectivity",
        type=int,
        choices=[4, 8],
        default=8,
        help="connectivity of that relabelling (default: 8)",
    )
    p.add_argument(
        "--resize",
        action="store_true",
        help="nearest-neighbour resize predictions to the annotation size if they differ",
    )
    p.add_argument("--plot", action="store_true", help="write plots/grid.png and plots/history.png")
    p.add_argument("--resume", action="store_true", help="reuse the cached predictions in --out")
    p.add_argument(
        "--overwrite", action="store_true", help="recompute, replacing cached predictions"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _default_out(args: argparse.Namespace) -> Path:
    root = Path(args.dataset_dir).resolve()
    name = f"{root.parent.name}-{root.name}" if args.kind == "bsds500" else root.name
    tag = "-".join(
        [
            name,
            args.preset,
            str(args.guidance),
            f"s{args.scale if args.scale is not None else 1}",
            f"i{args.max_iter if args.max_iter is not None else 'preset'}",
            f"seed{args.seed}",
        ]
    )
    return Path("eval-runs") / re.sub(r"[^A-Za-z0-9._-]+", "_", tag)


def _fmt(v: float) -> str:
    return "  nan " if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _print_summary(report: dict[str, Any], out: Path) -> None:
    scores = report["scores"]
    bsds = "All" in scores["raw"]
    modes = ["All", "Fine", "Coarse", "Mean"] if bsds else ["mIoU"]
    print(f"{'scores':<8}" + "".join(f"{m:>9}" for m in modes) + "   GT segments")
    for key, s in scores.items():
        counts = "/".join(str(s["counts"][m]) for m in s["counts"])
        print(f"{key:<8}" + "".join(f"{_fmt(s[m]):>9}" for m in modes) + f"   {counts}")
    standard = {k: s["standard"] for k, s in scores.items() if "standard" in s}
    if standard:
        cols = [("Covering", "covering"), ("PRI", "pri"), ("VoI", "voi"), ("VoI bits", "voi_bits")]
        cols += [("P", "precision"), ("R", "recall"), ("F", "f")]
        print(
            f"{'standard':<8}"
            + "".join(f"{c:>9}" for c, _ in cols)
            + "   (BSDS500 benchmark; VoI in nats)"
        )
        for key, s in standard.items():
            print(f"{key:<8}" + "".join(f"{_fmt(s[m]):>9}" for _, m in cols))
    print(
        f"{report['n_scored']}/{report['n_images']} images scored "
        f"({report['n_cached']} from cache), "
        f"{report['n_failed']} failed; segment time {report['segment_seconds']:.1f} s; "
        f"report: {out / 'report.json'}"
    )
    for f in report["failed"]:
        print(f"  failed {f['id']}: {f['error']}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Execute ``dynaguide eval`` for parsed arguments; returns the exit status."""
    from dynaguide.eval.datasets import DatasetError, open_dataset
    from dynaguide.eval.runner import evaluate
    from dynaguide.eval.settings import EvalSettings

    out = args.out if args.out is not None else _default_out(args)
    guidance = None if str(args.guidance).lower() == "none" else args.guidance
    try:
        dataset = open_dataset(args.kind, args.dataset_dir)
        settings = EvalSettings(
            preset=args.preset,
            guidance=guidance,
            scale=args.scale,
            max_iter=args.max_iter,
            seed=args.seed,
            device=args.device,
            cache_dir=out,
            limit=args.limit,
            progress=not args.no_progress,
            connected_components=args.cc,
            connectivity=args.connectivity,
            resize=args.resize,
            resume=args.resume,
            overwrite=args.overwrite,
            plot=args.plot,
        )
        report = evaluate(dataset, settings)
    except (DatasetError, ValueError, TypeError, KeyError) as exc:
        print(f"dynaguide eval: error: {exc}", file=sys.stderr)
        return 2
    _print_summary(report, out)
    if report.get("plots"):
        print(f"plots: {report['plots']['grid']}, {report['plots']['history']}")
    return 0 if report["n_failed"] == 0 else 1


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m dynaguide.eval``): ``eval`` arguments only."""
    parser = argparse.ArgumentParser(prog="dynaguide")
    sub = parser.add_subparsers(dest="command", required=True)
    register(sub)
    args = parser.parse_args(["eval", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))
