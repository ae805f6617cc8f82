"""``dynaguide segment IN OUT --ray``: the command line of :func:`segment_dataset`.

``dynaguide.cli`` owns the parser; with ``--ray`` it hands the parsed arguments here.
Every run resumes from OUT's manifest (``--resume`` is implied), ``--device`` gives way to
``--gpus-per-worker``, and IN / OUT may be URIs (``s3://bucket/images``).
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

__all__ = ["run_segment"]

_COLLAPSED_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/([^/].*)$")


def path_argument(value: Any) -> str:
    """The text of an IN/OUT argument, with a URI that :class:`pathlib.Path` collapsed
    (``s3:/bucket/key``) restored to ``s3://bucket/key`` (``file:/x`` becomes ``/x``)."""
    text = str(value)
    m = _COLLAPSED_URI.match(text)
    if m is None:
        return text
    scheme, rest = m.groups()
    return f"/{rest}" if scheme == "file" else f"{scheme}://{rest}"


def run_segment(args: argparse.Namespace) -> int:
    """Run ``dynaguide segment --ray`` from parsed arguments; returns the exit code."""
    from dynaguide import cli
    from dynaguide.distributed.runner import segment_dataset

    parser: argparse.ArgumentParser = args._parser
    if args.device not in ("cpu", "auto"):
        parser.error("--device does not apply with --ray; use --gpus-per-worker")
    for flag, given in (
        ("--threads", args.threads is not None),
        ("--format/--no-overlay", args.formats is not None or args.no_overlay),
        ("--paths-from", args.paths_from is not None),
    ):
        if given:
            parser.error(f"{flag} does not apply with --ray")
    if args.gpus_per_worker < 0:
        parser.error(f"--gpus-per-worker must be >= 0, got {args.gpus_per_worker}")
    guidance = cli._resolve_guidance(parser, args.guidance)
    kwargs = cli._segment_kwargs(args, guidance)
    kwargs.pop("device")
    if args.batch_size != 1:
        kwargs["refine_batch_size"] = args.batch_size
    counts = {"done": 0, "skipped": 0, "error": 0}

    def progress(record: dict[str, Any]) -> None:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
        if record["status"] == "error":
            print(f"error: {record['id']}: {record['reason']}", file=sys.stderr)
        elif not args.quiet and record["status"] == "done" and counts["done"] % 100 == 0:
            print(f"{counts['done']} segmented", file=sys.stderr)

    try:
        run = segment_dataset(
            path_argument(args.input),
            path_argument(args.output),
            num_workers=args.num_workers,
            gpus_per_worker=args.gpus_per_worker,
            ray_address=args.address,
            output_format=args.output_format,
            recursive=args.recursive,
            progress=progress,
            **kwargs,
        )
    except KeyboardInterrupt:
        print(
            f"interrupted: {counts['done']} segmented; run the same command again to resume",
            file=sys.stderr,
        )
        return cli.EXIT_INTERRUPTED
    except ImportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return cli.EXIT_USAGE
    except (OSError, ValueError, TypeError) as exc:
        parser.error(str(exc))
    print(
        f"{run.segmented} segmented, {run.skipped} skipped (already done), {run.failed} failed "
        f"in {run.seconds:.1f} s; outputs in {run.output}"
        + (f"; errors in {run.errors_file}" if run.failed else "")
    )
    return cli.EXIT_FAILED if run.failed else cli.EXIT_OK
