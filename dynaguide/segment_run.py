"""The image loop of ``dynaguide segment``: :class:`SegmentRun`.

Each planned image (:mod:`dynaguide.output_sets`) is locked against concurrent runs,
verified (``--resume``), checked for files dynaguide did not write, segmented and written
as one output set. Failures follow the per-image policy of :mod:`dynaguide.errors`.
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
    """

    def __init__(self, fingerprint: str, settings: dict, kwargs: dict, locks: dict) -> None:
        from dynaguide.segmentation import _version

        self.fingerprint, self.settings, self.kwargs = fingerprint, settings, kwargs
        self.locks, self.version = locks, _version()
        self.done, self.skipped, self.busy = 0, 0, 0
        self.failed: list[str] = []

    def one(self, item: Any, resume: bool) -> str:
        """Process one planned image; returns "done", "skipped" or "busy"."""
        from dynaguide.errors import OutputSafetyError
        from dynaguide.io import load_image
        from dynaguide.output_sets import foreign_outputs, verify_output_set, write_output_set

        lock = self.locks[item.folder]
        if not lock.acquire(item.stem):
            return "busy"
        try:
            if (
                resume
                and verify_output_set(item, fingerprint=self.fingerprint, version=self.version)
                is None
            ):
                return "skipped"
            foreign = foreign_outputs(item)
            if foreign:  # refused before the refinement, not after it
                raise OutputSafetyError(
                    f"{item.source}: refusing to overwrite {str(foreign[0])!r}, which dynaguide "
                    "did not write; move it away or choose another OUT"
                )
            seg = self._segment(load_image(item.source), str(item.source))
            write_output_set(
                seg, item, fingerprint=self.fingerprint, settings=self.settings,
                version=self.version,
            )  # fmt: skip
            self.last = f"{item.source.name} K={seg.n_labels} iter={seg.n_iter}"
            return "done"
        finally:
            lock.release(item.stem)

    def _segment(self, image: Any, name: str) -> Any:
        """Segment one loaded image (:func:`dynaguide.segment` with the run's keywords)."""
        import dynaguide

        return dynaguide.segment(image, name=name, **self.kwargs)

    def all(self, plan: list, *, resume: bool, quiet: bool, out: Path) -> int:
        """Run every image; prints the summary and returns the exit code."""
        from tqdm import tqdm

        from dynaguide.errors import image_failure

        bar = tqdm(plan, file=sys.stderr, disable=quiet, unit="img", dynamic_ncols=True)
        try:
            for item in bar:
                try:
                    outcome = self.one(item, resume)
                except Exception as exc:  # the per-image policy: dynaguide.errors
                    line = image_failure(exc, str(item.source)).message
                    self.failed.append(line)
                    tqdm.write(f"error: {line}", file=sys.stderr)
                    continue
                if outcome == "done":
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
