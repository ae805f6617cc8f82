"""The settings of one evaluation run (:func:`dynaguide.eval.evaluate`), validated once."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dynaguide.config import DEFAULT_PRESET

__all__ = ["EvalSettings"]


@dataclass(frozen=True)
class EvalSettings:
    """How :func:`dynaguide.eval.evaluate` segments, scores and writes a dataset.

    Segmentation (passed to :func:`dynaguide.segment`)
        ``preset``, ``guidance`` (``"default"``: the preset's), ``scale``, ``max_iter``,
        ``seed``, ``device``.
    Scoring
        ``connected_components``: also score each prediction relabelled into connected
        components (``"cc8"`` / ``"cc4"`` next to ``"raw"``) with ``connectivity`` (4 or 8);
        ``resize``: nearest-resize predictions to the annotation size when they differ.
    Output
        ``cache_dir``: ``predictions/<id>.npz`` (cache), ``protocol.json``, ``report.json``
        and, with ``plot``, ``plots/*.png`` for the first ``n_plot`` scored images (None:
        nothing is written); ``resume`` reuses cached predictions made with the same
        settings (refused if they differ); ``overwrite`` recomputes them.
    Run
        ``limit``: only the first ``limit`` images (sorted ids); ``progress``: a tqdm bar on
        stderr; ``segment_fn`` replaces :func:`dynaguide.segment` (same keywords; tests).

    Raises
    ------
    ValueError
        Bad connectivity or limit, or ``plot`` without a ``cache_dir``.
    """

    preset: Any = DEFAULT_PRESET
    guidance: Any = "default"
    scale: float | None = None
    max_iter: int | None = None
    seed: int = 0
    device: str = "cpu"
    cache_dir: str | os.PathLike[str] | None = None
    limit: int | None = None
    progress: bool = True
    connected_components: bool = True
    connectivity: int = 8
    resize: bool = False
    resume: bool = True
    overwrite: bool = False
    plot: bool = False
    n_plot: int = 4
    segment_fn: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.connectivity not in (4, 8):
            raise ValueError(f"connectivity must be 4 or 8, got {self.connectivity!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"limit must be a positive int, got {self.limit!r}")
        if self.plot and self.cache_dir is None:
            raise ValueError("plot=True needs a cache_dir to write the figures to")

    def segment_kwargs(self) -> dict[str, Any]:
        """The keywords of :func:`dynaguide.segment` for every image."""
        return {
            "preset": self.preset,
            "guidance": self.guidance,
            "scale": self.scale,
            "max_iter": self.max_iter,
            "seed": self.seed,
            "device": self.device,
        }
