"""The ``dynaguide`` command line.

Subcommands defined here:

``dynaguide segment IN OUT``
    Segment one image file, every image in a folder, or a list of paths; writes the
    chosen formats (``<stem>.labels.png``, 16-bit, and ``<stem>.overlay.png`` by default)
    and ``<stem>.json`` per image into ``OUT``. Its options live in
    :mod:`dynaguide.cli_segment`.
``dynaguide demo``
    Segment scikit-image's bundled sample images (no download) and write the results.
``dynaguide env``
    Say which backends and devices are available.

Other subcommands come from modules that expose ``register(subparsers) -> None`` (each
adds its subparser and sets ``func=<callable(args) -> int>``): ``dynaguide.eval.cli``,
``dynaguide.export.cli`` and ``dynaguide.bench_cli``. A module that is not installed is
left out; any other import error in it is raised.

Exit codes: 0 success, 1 some images failed, 2 usage error, 130 interrupted. A documented
error (:data:`dynaguide.errors.DOCUMENTED_ERRORS`) escaping a subcommand is printed as one
line naming the input, without a traceback. The data-safety rules of ``segment`` are in
:mod:`dynaguide.output_sets`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynaguide.cli_segment import (
    add_segment_parser,
    check_device,
    resolve_guidance_name,
    segment_kwargs,
)
from dynaguide.cli_types import fraction as _scale
from dynaguide.cli_types import positive_int as _positive_int
from dynaguide.config import DEFAULT_PRESET

__all__ = ["DEMO_IMAGES", "DEMO_MAX_ITER", "DEMO_SCALE", "build_parser", "main"]

#: Modules that may add subcommands through ``register(subparsers)``.
OPTIONAL_SUBCOMMANDS: tuple[str, ...] = (
    "dynaguide.eval.cli",
    "dynaguide.export.cli",
    "dynaguide.bench_cli",
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


def _preset_names() -> list[str]:
    from dynaguide.config import presets

    return list(presets())


def build_parser() -> argparse.ArgumentParser:
    """The full ``dynaguide`` argument parser, optional subcommands included."""
    from dynaguide.build_info import package_version as _version  # no torch for --help

    parser = argparse.ArgumentParser(
        prog="dynaguide",
        description="Unsupervised image segmentation by per-image CNN refinement "
        "(DFC, DynaSeg, DynaGuide).",
    )
    parser.add_argument("--version", action="version", version=f"dynaguide {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    add_segment_parser(sub, DEFAULT_PRESET, _preset_names())

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
    demo.add_argument(
        "--device", default="auto", help="auto, cpu, cuda[:N] or mps (default %(default)s)"
    )
    demo.set_defaults(func=_cmd_demo, _parser=demo)

    env = sub.add_parser("env", help="show available backends, devices and ONNX Runtime providers")
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


#: Kept for the modules that call them through ``dynaguide.cli``.
_check_device = check_device
_resolve_guidance = resolve_guidance_name
_segment_kwargs = segment_kwargs


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
    from dynaguide.devices import onnx_providers, resolve_device

    rows["device auto"] = str(resolve_device("auto"))
    providers = onnx_providers()
    rows["onnxruntime providers"] = (
        ", ".join(providers) if isinstance(providers, list) else providers
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
