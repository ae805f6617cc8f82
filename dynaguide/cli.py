"""The ``dynaguide`` command line.

Subcommands defined here:

``dynaguide segment IN OUT``
    Segment one image file or every image in a folder; writes ``<stem>.labels.png``
    (16-bit), ``<stem>.overlay.png`` and ``<stem>.json`` per image into ``OUT``.
``dynaguide demo``
    Segment scikit-image's bundled sample images (no download) and write the results.
``dynaguide env``
    Say which backends and devices are available.

Other subcommands come from modules that expose ``register(subparsers) -> None`` (each
adds its subparser and sets ``func=<callable(args) -> int>``): ``dynaguide.eval.cli``,
``dynaguide.export.cli`` and ``dynaguide.bench``. A module that is not installed is
left out; any other import error in it is raised.

Exit codes: 0 success, 1 some images failed, 2 usage error, 130 interrupted. A documented
error (:data:`dynaguide.errors.DOCUMENTED_ERRORS`) escaping a subcommand is printed as one
line naming the input, without a traceback. The data-safety rules of ``segment`` are in
:mod:`dynaguide.output_sets`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynaguide.cli_types import fraction as _scale
from dynaguide.cli_types import pixels as _pixels
from dynaguide.cli_types import positive_int as _positive_int
from dynaguide.cli_types import seconds as _seconds
from dynaguide.config import DEFAULT_PRESET

__all__ = ["DEMO_IMAGES", "DEMO_MAX_ITER", "DEMO_SCALE", "build_parser", "main"]

#: Modules that may add subcommands through ``register(subparsers)``.
OPTIONAL_SUBCOMMANDS: tuple[str, ...] = (
    "dynaguide.eval.cli",
    "dynaguide.export.cli",
    "dynaguide.bench",
    "dynaguide.smooseg.cli",
)

#: scikit-image sample images used by ``dynaguide demo`` and their bundled file names.
#: Only images shipped inside the scikit-image wheel are used (no pooch download).
DEMO_IMAGES: dict[str, str] = {
    "astronaut": "astronaut.png",
    "coffee": "coffee.png",
    "chelsea": "chelsea.png",
    "rocket": "rocket.jpg",
}
#: ``demo`` defaults: the default preset as it is (its own iteration budget, full size); it
#: runs no network, so the four images take a few seconds on 2 CPU cores.
DEMO_MAX_ITER: int | None = None
DEMO_SCALE: float | None = None

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# --------------------------------------------------------------------------- parser


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def _preset_names() -> list[str]:
    from dynaguide.config import presets

    return list(presets())


def build_parser() -> argparse.ArgumentParser:
    """The full ``dynaguide`` argument parser, optional subcommands included."""
    from dynaguide.segmentation import _version

    parser = argparse.ArgumentParser(
        prog="dynaguide",
        description="Unsupervised image segmentation by per-image CNN refinement "
        "(DFC, DynaSeg, DynaGuide).",
    )
    parser.add_argument("--version", action="version", version=f"dynaguide {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    seg = sub.add_parser(
        "segment",
        help="segment an image or a folder of images",
        description="Segment IN (an image file or a folder of images) and write, per image, "
        "<stem>.labels.png (16-bit labels), <stem>.overlay.png and <stem>.json into OUT. "
        "Images that cannot be read or segmented are reported and skipped. OUT may not be "
        "IN or inside it; files dynaguide did not write are never overwritten, and the files "
        "it wrote (OUT/.dynaguide/manifest.jsonl) are never read as inputs. Exit code 0 if "
        "every image succeeded, 1 if some failed (or OUT filled up), 2 on usage errors.",
    )
    seg.add_argument("input", metavar="IN", type=Path, help="image file or folder of images")
    seg.add_argument("output", metavar="OUT", type=Path, help="output folder (created)")
    seg.add_argument(
        "--preset", default=DEFAULT_PRESET, choices=_preset_names(), help="(default %(default)s)"
    )
    seg.add_argument(
        "--guidance",
        default="default",
        help="guide name, 'none', or 'default' (the preset's own); see `dynaguide env`",
    )
    seg.add_argument(
        "--guide-option",
        action="append",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="option for the guide's factory (VALUE parsed as JSON when it is JSON); repeatable",
    )
    seg.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    seg.add_argument("--max-iter", type=_positive_int, default=None, help="iteration budget")
    seg.add_argument(
        "--scale", type=_scale, default=None, help="refine at this fraction of the size"
    )
    seg.add_argument(
        "--max-pixels",
        type=_pixels,
        default=None,
        metavar="N|none",
        help="refine images above N pixels at a reduced size ('none': full size, which may "
        "not fit in memory); default: the preset's",
    )
    seg.add_argument(
        "--work-pixels",
        type=_pixels,
        default=None,
        metavar="N",
        help="train the network at about N pixels and carry the result to full size",
    )
    seg.add_argument(
        "--time-budget",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="stop each image's refinement after this wall-clock time",
    )
    seg.add_argument("--seed", type=int, default=0, help="network initialisation seed")
    seg.add_argument("--recursive", action="store_true", help="also read sub-folders of IN")
    seg.add_argument(
        "--resume",
        action="store_true",
        help="keep the output sets of an earlier run that are complete and were made with the "
        "same settings and version (each is verified); redo the others",
    )
    seg.add_argument("--quiet", action="store_true", help="no progress bar")
    ray = seg.add_argument_group("Ray cluster (pip install 'dynaguide[ray]')")
    ray.add_argument("--ray", action="store_true", help="segment on Ray; IN/OUT may be URIs")
    ray.add_argument("--address", help="cluster address, e.g. auto (default: a local cluster)")
    ray.add_argument("--num-workers", type=_positive_int, help="workers (default: all CPUs/GPUs)")
    ray.add_argument("--gpus-per-worker", type=float, default=0, help="(default %(default)s)")
    ray.add_argument("--output-format", choices=("files", "parquet"), default="files")
    seg.set_defaults(func=_cmd_segment, _parser=seg)

    demo = sub.add_parser(
        "demo",
        help="segment scikit-image's bundled sample images",
        description="Segment scikit-image's bundled sample images ("
        + ", ".join(DEMO_IMAGES)
        + ") with the default preset and guide, without any download. --max-iter and "
        "--scale override the preset's iteration budget and size.",
    )
    demo.add_argument(
        "--out", type=Path, default=Path("dynaguide-demo"), help="(default %(default)s)"
    )
    demo.add_argument(
        "--max-iter", type=_positive_int, default=DEMO_MAX_ITER, help="(default: the preset's)"
    )
    demo.add_argument("--scale", type=_scale, default=DEMO_SCALE, help="(default: full size)")
    demo.add_argument("--device", default="cpu", help="(default %(default)s)")
    demo.set_defaults(func=_cmd_demo, _parser=demo)

    env = sub.add_parser("env", help="show available backends and devices")
    env.set_defaults(func=_cmd_env, _parser=env)

    for module_name in OPTIONAL_SUBCOMMANDS:
        module = _import_optional(module_name)
        if module is not None:
            module.register(sub)
    return parser


def _import_optional(module_name: str) -> Any:
    """Import ``module_name``; None only if it (or its own package) is not installed."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing.startswith("dynaguide.") and (
            module_name == missing or module_name.startswith(missing + ".")
        ):
            return None
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (never calls ``sys.exit``).

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from dynaguide.errors import DOCUMENTED_ERRORS

    try:
        return int(args.func(args))
    except SystemExit as exc:  # a subcommand's parser.error()
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DOCUMENTED_ERRORS as exc:  # one line, no traceback: the message names the input
        text = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"dynaguide {args.command}: error: {text}", file=sys.stderr)
        return EXIT_USAGE


# --------------------------------------------------------------------------- segment


def _check_device(parser: argparse.ArgumentParser, device: str) -> None:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        parser.error(f"invalid --device {device!r}; use cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        parser.error(
            f"--device {device!r}: CUDA is not available in this torch ({torch.__version__})"
        )
    if dev.type not in ("cpu", "cuda"):
        parser.error(f"--device {device!r} is not supported; use cpu, cuda or cuda:N")


def _resolve_guidance(parser: argparse.ArgumentParser, text: str) -> str | None:
    key = text.strip().lower()
    if key == "default":
        return "default"
    if key == "none":
        return None
    from dynaguide.guidance import available_guides

    guides = available_guides()
    if key not in guides:
        parser.error(
            f"unknown --guidance {text!r}; choose 'default', 'none' or one of: {', '.join(guides)}"
        )
    return key


def _check_paths(parser: argparse.ArgumentParser, source: Path, out: Path) -> None:
    if out.exists() and not out.is_dir():
        parser.error(f"OUT {str(out)!r} exists and is not a folder")
    if not os.path.lexists(source):
        parser.error(f"IN {str(source)!r} does not exist")
    try:
        source.stat()
    except OSError as exc:  # a broken link, a link loop, no permission
        parser.error(f"IN {str(source)!r} cannot be opened: {exc.strerror or exc}")


def _segment_kwargs(args: argparse.Namespace, guidance: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "preset": args.preset,
        "guidance": guidance,
        "device": args.device,
        "seed": args.seed,
        "max_iter": args.max_iter,
        "scale": args.scale,
    }
    if args.guide_option:
        kwargs["guidance_options"] = dict(args.guide_option)
    for field in ("max_pixels", "work_pixels", "time_budget"):
        value = getattr(args, field, None)
        if value is not None:
            kwargs[field] = None if value == "none" else value
    return kwargs


def _run_settings(args: argparse.Namespace, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides an image's results (its fingerprint goes into each JSON)."""
    from dynaguide.api import build_config

    config = build_config(args.preset, max_iter=args.max_iter)
    return {"segment": kwargs, "config": config.to_dict()}


def _cmd_segment(args: argparse.Namespace) -> int:
    from dynaguide.output_sets import plan_outputs, prepare_output_folders, settings_fingerprint
    from dynaguide.segment_run import SegmentRun

    parser = args._parser
    if args.ray:
        from dynaguide.distributed.cli import run_segment

        return run_segment(args)
    _check_device(parser, args.device)
    guidance = _resolve_guidance(parser, args.guidance)
    _check_paths(parser, args.input, args.output)
    kwargs = _segment_kwargs(args, guidance)
    try:
        plan = plan_outputs(args.input, args.output, recursive=args.recursive)
        settings = _run_settings(args, kwargs)
        locks = prepare_output_folders(plan)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        parser.error(str(exc).strip("'\""))
    run = SegmentRun(settings_fingerprint(settings), settings, kwargs, locks)
    try:
        return run.all(plan, resume=args.resume, quiet=args.quiet, out=args.output)
    finally:
        for lock in locks.values():
            lock.close()


# --------------------------------------------------------------------------- demo


def bundled_demo_images() -> dict[str, Path]:
    """The :data:`DEMO_IMAGES` whose files ship with the installed scikit-image."""
    import skimage.data

    data_dir = Path(getattr(skimage.data, "data_dir", os.path.dirname(skimage.data.__file__)))
    return {name: data_dir / f for name, f in DEMO_IMAGES.items() if (data_dir / f).is_file()}


def _cmd_demo(args: argparse.Namespace) -> int:
    import dynaguide
    from dynaguide.errors import image_failure
    from dynaguide.io import load_image
    from dynaguide.output_sets import (
        PlannedImage,
        prepare_output_folders,
        settings_fingerprint,
        write_output_set,
    )
    from dynaguide.segmentation import _version

    _check_device(args._parser, args.device)
    images = bundled_demo_images()
    if not images:
        print(
            "error: none of the demo images (" + ", ".join(DEMO_IMAGES) + ") ship with this "
            "scikit-image installation",
            file=sys.stderr,
        )
        return EXIT_FAILED
    out: Path = args.out
    plan = [PlannedImage(path, out, name) for name, path in images.items()]
    try:
        locks = prepare_output_folders(plan)
    except OSError as exc:
        args._parser.error(str(exc))
    for lock in locks.values():
        lock.close()
    kwargs = {"device": args.device, "max_iter": args.max_iter, "scale": args.scale}
    settings = {"demo": kwargs}
    failures = 0
    start = time.perf_counter()
    print(f"dynaguide demo: {len(images)} images, max_iter={args.max_iter}, scale={args.scale}")
    for item in plan:
        name = item.stem
        t0 = time.perf_counter()
        try:
            rgb = load_image(item.source, name=name)
            seg = dynaguide.segment(rgb, name=name, **kwargs)
            write_output_set(
                seg, item, fingerprint=settings_fingerprint(settings), settings=settings,
                version=_version(),
            )  # fmt: skip
        except Exception as exc:  # the per-image policy: dynaguide.errors
            failures += 1
            print(f"error: {image_failure(exc, name).message}", file=sys.stderr)
            continue
        h, w = rgb.shape[:2]
        print(
            f"  {name:<10} {w:>4}x{h:<4} K={seg.n_labels:<3} iterations={seg.n_iter:<4} "
            f"{time.perf_counter() - t0:6.2f} s"
        )
    total = time.perf_counter() - start
    print(f"outputs in {out.resolve()} ({total:.1f} s in all)")
    return EXIT_FAILED if failures else EXIT_OK


# --------------------------------------------------------------------------- env


def _cmd_env(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from dynaguide.backend import env_report
    from dynaguide.segmentation import _version

    rows = {
        "dynaguide": _version(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "torch": torch.__version__,
    }
    rows.update(
        {
            f"backend {k}" if k in ("torch", "triton", "native") else k: v
            for k, v in env_report().items()
        }
    )
    try:
        from dynaguide.guidance import available_guides

        rows["guides"] = ", ".join(available_guides())
    except ImportError as exc:  # pragma: no cover - reported, not hidden
        rows["guides"] = f"unavailable: {exc}"
    width = max(len(k) for k in rows)
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
