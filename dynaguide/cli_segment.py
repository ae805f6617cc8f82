"""``dynaguide segment``: its options and the command (``dynaguide.cli`` owns the parser).

Settings are layered, later ones winning: the preset (``--preset``, else the config
file's ``preset``, else the default), the fields of ``--config FILE``, each
``--set KEY=VALUE``, then the dedicated options (``--max-iter``, ``--max-pixels``,
``--work-pixels``, ``--time-budget``, ``--connectivity``) when given. Every one is checked
before the first image, and the resulting settings go into each image's JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from dynaguide.cli_types import fraction, pixels, positive_int, seconds
from dynaguide.result_files import FORMATS

__all__ = ["add_segment_parser", "check_device", "resolve_guidance_name", "segment_kwargs"]

EXIT_USAGE = 2
#: Options that set one RefineConfig field each (applied after --config and --set).
_FIELD_OPTIONS = ("max_pixels", "work_pixels", "time_budget", "connectivity")


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def _assignment(text: str) -> tuple[str, Any]:
    from dynaguide.config_text import parse_assignment

    try:
        return parse_assignment(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _batch_size(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else positive_int(text)


def _formats(text: str) -> tuple[str, ...]:
    from dynaguide.result_files import check_formats

    try:
        return check_formats(text, name="--format")
    except (TypeError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_segment_parser(
    sub: Any, default_preset: str, presets: list[str]
) -> argparse.ArgumentParser:
    """Add the ``segment`` subparser to ``sub`` and return it."""
    seg = sub.add_parser(
        "segment",
        help="segment an image or a folder of images",
        description="Segment IN (an image file, a folder of images, or '-' for a list of "
        "paths on stdin) and write, per image, the chosen --format files and <stem>.json "
        "into OUT. Images that cannot be read or segmented are reported and skipped. OUT "
        "may not be IN or inside it; files dynaguide did not write are never overwritten, "
        "and the files it wrote (OUT/.dynaguide/manifest.jsonl) are never read as inputs. "
        "Settings: the preset, then --config FILE, then each --set, then the dedicated "
        "options. Exit code 0 if every image succeeded, 1 if some failed (or OUT filled "
        "up), 2 on usage errors.",
    )
    seg.add_argument(
        "input", metavar="IN", type=Path, nargs="?", help="image file, folder of images, or '-'"
    )
    seg.add_argument("output", metavar="OUT", type=Path, help="output folder (created)")
    seg.add_argument(
        "--paths-from",
        metavar="FILE",
        help="read the input paths from FILE, one per line ('-': stdin), instead of IN",
    )
    seg.add_argument("--preset", default=None, choices=presets, help=f"(default {default_preset})")
    seg.add_argument(
        "--config", type=Path, metavar="FILE", help="settings from a TOML or JSON file"
    )
    seg.add_argument(
        "--set",
        dest="settings",
        action="append",
        type=_assignment,
        default=[],
        metavar="KEY=VALUE",
        help="set any RefineConfig field, e.g. --set n_channels=32 --set upsample=bilinear; "
        "repeatable",
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
    seg.add_argument(
        "--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default %(default)s)"
    )
    seg.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    seg.add_argument(
        "--batch-size",
        type=_batch_size,
        default=1,
        metavar="N|auto",
        help="images refined together on the device ('auto': as many as fit); default 1",
    )
    seg.add_argument("--amp", action="store_true", help="bf16 autocast for the convolutions")
    seg.add_argument("--max-iter", type=positive_int, default=None, help="iteration budget")
    seg.add_argument(
        "--scale", type=fraction, default=None, help="refine at this fraction of the size"
    )
    seg.add_argument(
        "--max-pixels",
        type=pixels,
        default=None,
        metavar="N|none",
        help="refine images above N pixels at a reduced size ('none': full size, which may "
        "not fit in memory); default: the preset's",
    )
    seg.add_argument(
        "--work-pixels",
        type=pixels,
        default=None,
        metavar="N",
        help="train the network at about N pixels and carry the result to full size",
    )
    seg.add_argument(
        "--time-budget",
        type=seconds,
        default=None,
        metavar="SECONDS",
        help="stop each image's refinement after this wall-clock time",
    )
    seg.add_argument(
        "--connectivity",
        type=int,
        choices=(0, 4, 8),
        default=None,
        help="split labels into 4- or 8-connected regions (0: colour clusters); default: the preset's",
    )
    seg.add_argument(
        "--start-label", type=int, choices=(0, 1), default=0, help="first label value (default 0)"
    )
    seg.add_argument(
        "--format",
        dest="formats",
        type=_formats,
        default=None,
        metavar="LIST",
        help="comma-separated outputs among " + ", ".join(FORMATS) + " (default labels,overlay; "
        "<stem>.json is always written)",
    )
    seg.add_argument("--no-overlay", action="store_true", help="do not write <stem>.overlay.png")
    seg.add_argument("--seed", type=int, default=0, help="network and guide seed")
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
    ray.add_argument("--num-workers", type=positive_int, help="workers (default: all CPUs/GPUs)")
    ray.add_argument("--gpus-per-worker", type=float, default=0, help="(default %(default)s)")
    ray.add_argument("--output-format", choices=("files", "parquet"), default="files")
    seg.set_defaults(func=cmd_segment, _parser=seg, _default_preset=default_preset)
    return seg


# --------------------------------------------------------------------------- checks


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """``parser.error`` unless ``device`` is usable here (see :mod:`dynaguide.devices`)."""
    from dynaguide.devices import resolve_device

    try:
        resolve_device(device)
    except ValueError as exc:
        parser.error(f"--device: {exc}")


def resolve_guidance_name(parser: argparse.ArgumentParser, text: str) -> str | None:
    """``--guidance`` as ``"default"``, None or a registered guide name."""
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


def _listed_paths(parser: argparse.ArgumentParser, spec: str) -> list[Path]:
    """The paths listed one per line in file ``spec`` (``-``: stdin); blank lines and
    lines starting with ``#`` are skipped."""
    try:
        text = sys.stdin.read() if spec == "-" else Path(spec).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        parser.error(f"--paths-from {spec!r} cannot be read: {exc}")
    paths = [Path(line.strip()) for line in text.splitlines() if line.strip()]
    paths = [p for p in paths if not str(p).startswith("#")]
    if not paths:
        parser.error(f"--paths-from {spec!r} lists no paths")
    for p in paths:
        if not p.is_file():
            parser.error(f"--paths-from {spec!r}: {str(p)!r} is not a file")
    return paths


# --------------------------------------------------------------------------- settings


def _overrides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """RefineConfig fields from --config, --set and the dedicated options, in that order."""
    from dynaguide.config_text import load_config_file

    fields: dict[str, Any] = {}
    file_preset = None
    if args.config is not None:
        try:
            file_preset, fields = load_config_file(args.config)
        except (OSError, ValueError) as exc:
            parser.error(f"--config: {exc}")
    fields.update(dict(args.settings))
    for name in _FIELD_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = None if value == "none" else value
    if args.preset is None:
        args.preset = file_preset or parser.get_default("_default_preset")
    return fields


def segment_kwargs(args: argparse.Namespace, guidance: Any) -> dict[str, Any]:
    """Keywords of :func:`dynaguide.segment` for the parsed ``segment`` options."""
    parser = args._parser
    overrides = _overrides(parser, args)
    kwargs: dict[str, Any] = {
        "preset": args.preset,
        "guidance": guidance,
        "device": args.device,
        "seed": args.seed,
        "max_iter": args.max_iter,
        "scale": args.scale,
        **overrides,
    }
    if args.guide_option:
        kwargs["guidance_options"] = dict(args.guide_option)
    if args.amp:
        kwargs["amp"] = True
    if args.start_label:
        kwargs["start_label"] = args.start_label
    return kwargs


def _formats_of(args: argparse.Namespace) -> tuple[str, ...]:
    from dynaguide.result_files import DEFAULT_FORMATS

    chosen = args.formats if args.formats is not None else DEFAULT_FORMATS
    chosen = tuple(f for f in chosen if not (args.no_overlay and f == "overlay"))
    if not chosen:
        args._parser.error("--format/--no-overlay leave no output but the JSON; choose one")
    return chosen


def _run_settings(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides an image's results (its fingerprint goes into each JSON)."""
    from dynaguide.api import build_config
    from dynaguide.segment_many import _SEGMENT_ARGS

    overrides = {k: v for k, v in kwargs.items() if k not in _SEGMENT_ARGS and k != "device"}
    config = build_config(kwargs["preset"], max_iter=kwargs["max_iter"], **overrides)
    return {"segment": dict(kwargs), "config": config.to_dict()}


def _build_guide_once(kwargs: dict[str, Any]) -> None:
    """Replace the guide name in ``kwargs`` by the built guide, for every image of the run."""
    from dynaguide.api import build_config
    from dynaguide.segment_many import _SEGMENT_ARGS
    from dynaguide.settings import as_seed, resolve_guidance

    overrides = {k: v for k, v in kwargs.items() if k not in _SEGMENT_ARGS and k != "device"}
    config = build_config(kwargs["preset"], max_iter=kwargs["max_iter"], **overrides)
    kwargs["guidance"] = resolve_guidance(
        kwargs["guidance"], kwargs.pop("guidance_options", None), config, as_seed(kwargs["seed"])
    )


def cmd_segment(args: argparse.Namespace) -> int:
    """Run ``dynaguide segment`` from parsed arguments; returns the exit code."""
    from dynaguide.output_sets import plan_outputs, prepare_output_folders, settings_fingerprint
    from dynaguide.segment_run import SegmentRun

    parser = args._parser
    if args.ray:
        from dynaguide.distributed.cli import run_segment

        return run_segment(args)
    check_device(parser, args.device)
    guidance = resolve_guidance_name(parser, args.guidance)
    if args.paths_from is not None or str(args.input) == "-":
        if args.input is not None and str(args.input) != "-":
            parser.error("give either IN or --paths-from, not both")
        source: Path | list[Path] = _listed_paths(parser, args.paths_from or "-")
        if args.output.exists() and not args.output.is_dir():
            parser.error(f"OUT {str(args.output)!r} exists and is not a folder")
    elif args.input is None:
        parser.error("IN is required (an image, a folder, or '-' with paths on stdin)")
    else:
        source = args.input
        _check_paths(parser, source, args.output)
    kwargs = segment_kwargs(args, guidance)
    formats = _formats_of(args)
    try:
        settings = _run_settings(kwargs)
        _build_guide_once(kwargs)  # a learned guide: one export and session for the run
        plan = plan_outputs(source, args.output, recursive=args.recursive, formats=formats)
        locks = prepare_output_folders(plan)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        parser.error(str(exc).strip("'\""))
    if args.threads is not None:
        kwargs["num_threads"] = args.threads
    run = SegmentRun(
        settings_fingerprint(settings), settings, kwargs, locks, batch_size=args.batch_size
    )
    try:
        return run.all(plan, resume=args.resume, quiet=args.quiet, out=args.output)
    finally:
        for lock in locks.values():
            lock.close()
