"""The image loop of ``dynaguide segment``: :class:`SegmentRun`.

Each planned image (:mod:`dynaguide.output_sets`) is locked against concurrent runs,
verified (``--resume``), checked for files dynaguide did not write, segmented and written
as one output set. Failures follow the per-image policy of :mod:`dynaguide.errors`. With
``batch_size`` > 1 (``--batch-size``) the images are taken ``batch_size`` at a time and
refined together by :func:`dynaguide.segment_batch` (one grouped network per refinement
size on the device).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "SegmentRun"]

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


class SegmentRun:
    """One ``dynaguide segment`` run over a plan, under the per-image error policy.

    Parameters
    ----------
    fingerprint : str
        :func:`~dynaguide.output_sets.settings_fingerprint` of ``settings``.
    settings : dict
        What decides the results (recorded in each JSON).
    kwargs : dict
        Keywords for :func:`dynaguide.segment`.
    locks : dict
        :class:`~dynaguide.manifest.OutputLocks` per output folder.
    batch_size : int or "auto"
        Images per :func:`dynaguide.segment_batch` call (1: one :func:`dynaguide.segment`
        call per image).
    """

    def __init__(
        self, fingerprint: str, settings: dict, kwargs: dict, locks: dict, *, batch_size: Any = 1
    ) -> None:
        from dynaguide.segmentation import _version

        self.fingerprint, self.settings, self.kwargs = fingerprint, settings, kwargs
        self.locks, self.version = locks, _version()
        self.batch_size = batch_size
        self.done, self.skipped, self.busy = 0, 0, 0
        self.failed: list[str] = []

    def _start(self, item: Any, resume: bool) -> str | None:
        """Checks before ``item`` is segmented: "skipped" (resume) or None to go on;
        raises when a target file was not written by dynaguide."""
        from dynaguide.errors import OutputSafetyError
        from dynaguide.output_sets import foreign_outputs, verify_output_set

        if (
            resume
            and verify_output_set(item, fingerprint=self.fingerprint, version=self.version) is None
        ):
            return "skipped"
        foreign = foreign_outputs(item)
        if foreign:  # refused before the refinement, not after it
            raise OutputSafetyError(
                f"{item.source}: refusing to overwrite {str(foreign[0])!r}, which dynaguide "
                "did not write; move it away or choose another OUT"
            )
        return None

    def _write(self, seg: Any, item: Any) -> str:
        from dynaguide.output_sets import write_output_set

        write_output_set(
            seg, item, fingerprint=self.fingerprint, settings=self.settings, version=self.version
        )
        self.last = f"{item.source.name} K={seg.n_labels} iter={seg.n_iter}"
        return "done"

    def one(self, item: Any, resume: bool) -> str:
        """Process one planned image; returns "done", "skipped" or "busy"."""
        from dynaguide.io import load_image

        lock = self.locks[item.folder]
        if not lock.acquire(item.stem):
            return "busy"
        try:
            early = self._start(item, resume)
            if early is not None:
                return early
            seg = self._segment(load_image(item.source), str(item.source))
            return self._write(seg, item)
        finally:
            lock.release(item.stem)

    def _segment(self, image: Any, name: str) -> Any:
        """Segment one loaded image (:func:`dynaguide.segment` with the run's keywords;
        ``dynaguide smooseg predict`` overrides it)."""
        import dynaguide

        return dynaguide.segment(image, name=name, **self.kwargs)

    def many(self, items: list, resume: bool) -> list[str | BaseException]:
        """Process ``items`` with one :func:`dynaguide.segment_batch` call; per item its
        outcome ("done", "skipped", "busy") or the exception that failed it."""
        from dynaguide.io import load_image
        from dynaguide.segment_many import segment_batch

        outcomes: list[str | BaseException] = ["busy"] * len(items)
        held, ready = [], []
        try:
            for i, item in enumerate(items):
                if not self.locks[item.folder].acquire(item.stem):
                    continue
                held.append(item)
                try:
                    early = self._start(item, resume)
                    if early is None:
                        ready.append((i, item, load_image(item.source, name=str(item.source))))
                    else:
                        outcomes[i] = early
                except Exception as exc:  # the per-image policy, as in one()
                    outcomes[i] = exc
            errors: dict[int, BaseException] = {}
            kwargs = {k: v for k, v in self.kwargs.items() if k != "name"}
            segs = segment_batch(
                [rgb for _, _, rgb in ready], on_error=errors.__setitem__,
                batch_size=self.batch_size, **kwargs,
            )  # fmt: skip
            for j, ((i, item, _), seg) in enumerate(zip(ready, segs, strict=True)):
                if seg is None:
                    outcomes[i] = errors.get(j, RuntimeError(f"{item.source}: not segmented"))
                    continue
                seg.name = str(item.source)
                try:
                    outcomes[i] = self._write(seg, item)
                except Exception as exc:
                    outcomes[i] = exc
        finally:
            for item in held:
                self.locks[item.folder].release(item.stem)
        return outcomes

    def all(self, plan: list, *, resume: bool, quiet: bool, out: Path) -> int:
        """Run every image; prints the summary and returns the exit code."""
        from tqdm import tqdm

        from dynaguide.errors import image_failure

        bar = tqdm(total=len(plan), file=sys.stderr, disable=quiet, unit="img", dynamic_ncols=True)
        step = 1 if self.batch_size == 1 else (16 if self.batch_size == "auto" else self.batch_size)
        try:
            for start in range(0, len(plan), step):
                chunk = plan[start : start + step]
                if step == 1:
                    try:
                        outcomes: list[str | BaseException] = [self.one(chunk[0], resume)]
                    except Exception as exc:  # the per-image policy: dynaguide.errors
                        outcomes = [exc]
                else:
                    outcomes = self.many(chunk, resume)
                for item, outcome in zip(chunk, outcomes, strict=True):
                    bar.update(1)
                    if isinstance(outcome, BaseException):
                        line = image_failure(outcome, str(item.source)).message
                        self.failed.append(line)
                        tqdm.write(f"error: {line}", file=sys.stderr)
                    elif outcome == "done":
                        self.done += 1
                        bar.set_postfix_str(self.last, refresh=False)
                    else:
                        self.skipped += outcome == "skipped"
                        self.busy += outcome == "busy"
        except KeyboardInterrupt:
            bar.close()
            print(f"interrupted: {self.summary()}; rerun with --resume to continue")
            return EXIT_INTERRUPTED
        except OSError as exc:  # the output disk is full or read-only: stop
            bar.close()
            print(f"stopped: {exc}; {self.summary()}", file=sys.stderr)
            return EXIT_FAILED
        bar.close()
        print(self.summary() + f"; outputs in {out}")
        if self.failed:
            print("failed:", file=sys.stderr)
            for line in self.failed:
                print(f"  {line}", file=sys.stderr)
        return EXIT_FAILED if self.failed else EXIT_OK

    def summary(self) -> str:
        """``N segmented, M skipped (resume), K failed`` (and images left to other runs)."""
        text = f"{self.done} segmented, {self.skipped} skipped (resume), {len(self.failed)} failed"
        return text + (f", {self.busy} left to another run" if self.busy else "")
