"""The result of one segmentation: :class:`Segmentation`.

A plain dataclass holding the compact label map, the image it belongs to, how the
refinement went (iterations, loss and K history, stop reason, time) and the
configuration used. It draws itself (:meth:`Segmentation.overlay`), summarises itself
as JSON-able data (:meth:`Segmentation.to_dict`) and writes its files atomically
(:meth:`Segmentation.save`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dynaguide.io import IMAGE_EXTENSIONS, to_jsonable
from dynaguide.writing import (
    encode_label_png,
    encode_rgb_png,
    json_bytes,
    save_json,
    save_label_png,
    save_rgb_png,
)

__all__ = ["Segmentation", "label_colors"]

_GOLDEN = 0.618033988749895
_SATURATION = np.array([0.85, 0.55], dtype=np.float64)
_VALUE = np.array([0.95, 0.78, 0.62], dtype=np.float64)


def label_colors(n: int) -> np.ndarray:
    """A deterministic palette of ``n`` distinct RGB colours.

    Colour ``k`` has hue ``(k * 0.618...) mod 1`` (golden-ratio steps: neighbouring ids
    get far-apart hues) with saturation and value cycling through small fixed sets.
    The palette depends only on ``n`` (no random state), so label ``k`` has the same
    colour in every overlay.

    Parameters
    ----------
    n : int
        Number of colours (>= 0).

    Returns
    -------
    numpy.ndarray
        (n, 3) ``uint8``.

    Examples
    --------
    >>> label_colors(3).shape
    (3, 3)
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    k = np.arange(int(n), dtype=np.float64)
    h = (k * _GOLDEN) % 1.0
    s = _SATURATION[np.arange(int(n)) % len(_SATURATION)]
    v = _VALUE[np.arange(int(n)) % len(_VALUE)]
    # HSV -> RGB, vectorised (the standard sector formula)
    i = np.floor(h * 6.0).astype(np.int64) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p, q, t = v * (1.0 - s), v * (1.0 - f * s), v * (1.0 - (1.0 - f) * s)
    table = np.stack(
        [
            np.stack([v, t, p], 1),
            np.stack([q, v, p], 1),
            np.stack([p, v, t], 1),
            np.stack([p, q, v], 1),
            np.stack([t, p, v], 1),
            np.stack([v, p, q], 1),
        ],
        0,
    )  # (6, n, 3)
    rgb = table[i, np.arange(int(n))] if n else np.zeros((0, 3))
    return np.clip(np.rint(rgb * 255.0), 0, 255).astype(np.uint8)


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _version() -> str:
    pkg = sys.modules.get("dynaguide")
    found = getattr(pkg, "__version__", None)
    if isinstance(found, str):
        return found
    try:
        return importlib.metadata.version("dynaguide")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0+unknown"


@dataclass
class Segmentation:
    """One image's segmentation and how it was obtained.

    Attributes
    ----------
    labels : numpy.ndarray
        (H, W) ``int32`` label map, values in ``0 .. n_labels - 1`` (other integer
        dtypes are converted to ``int32``).
    n_labels : int
        Number of labels K.
    n_iter : int
        Refinement iterations run.
    history : dict
        Per-iteration records, ``{"loss": [float, ...], "n_labels": [int, ...]}``.
    guide_labels : numpy.ndarray or None
        (H, W) integer guide pseudo-labels used (negative = no guidance), or None.
    image : numpy.ndarray
        (H, W, 3) ``uint8`` RGB image that was segmented.
    config : RefineConfig
        The configuration used (any dataclass or dict is accepted).
    seconds : float
        Wall time of the refinement.
    stop_reason : str
        Why the refinement stopped (e.g. ``"max_iter (1000)"``).
    name : str or None
        Name of the input (a path, or a user-given name).
    device : str
        Device the refinement ran on.
    extra : dict
        Further JSON-able details (guide name, refinement size, seed, ...).

    Raises
    ------
    ValueError, TypeError
        From ``__post_init__`` when the fields are inconsistent (wrong shapes or dtypes,
        labels outside ``0 .. n_labels - 1``, ...).
    """

    labels: np.ndarray
    n_labels: int
    n_iter: int
    history: dict[str, list[Any]]
    guide_labels: np.ndarray | None
    image: np.ndarray
    config: Any
    seconds: float
    stop_reason: str
    name: str | None = None
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Validate every field (messages name the field and the input)."""
        who = f"Segmentation of {self.name}" if self.name is not None else "Segmentation"
        labels = self.labels
        if not isinstance(labels, np.ndarray) or labels.ndim != 2:
            raise ValueError(f"{who}: labels must be a 2-D numpy array, got {_shape_of(labels)}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise TypeError(f"{who}: labels must have an integer dtype, got {labels.dtype}")
        if not _is_int(self.n_labels) or self.n_labels < 1:
            raise ValueError(f"{who}: n_labels must be an int >= 1, got {self.n_labels!r}")
        self.n_labels = int(self.n_labels)
        if labels.size == 0:
            raise ValueError(f"{who}: labels of shape {labels.shape} are empty")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= self.n_labels:
            raise ValueError(
                f"{who}: labels must lie in [0, n_labels - 1] = [0, {self.n_labels - 1}], "
                f"found range [{lo}, {hi}]"
            )
        if labels.dtype != np.int32:
            self.labels = labels.astype(np.int32)

        image = self.image
        if (
            not isinstance(image, np.ndarray)
            or image.ndim != 3
            or image.shape[2] != 3
            or image.dtype != np.uint8
        ):
            raise ValueError(
                f"{who}: image must be an (H, W, 3) uint8 array, got {_shape_of(image)}"
            )
        if image.shape[:2] != labels.shape:
            raise ValueError(
                f"{who}: labels shape {labels.shape} does not match the image's (H, W) "
                f"{image.shape[:2]}"
            )
        guide = self.guide_labels
        if guide is not None:
            if not isinstance(guide, np.ndarray) or guide.shape != labels.shape:
                raise ValueError(
                    f"{who}: guide_labels must be None or an array of shape {labels.shape}, "
                    f"got {_shape_of(guide)}"
                )
            if not np.issubdtype(guide.dtype, np.integer):
                raise TypeError(
                    f"{who}: guide_labels must have an integer dtype, got {guide.dtype}"
                )
        if not _is_int(self.n_iter) or self.n_iter < 0:
            raise ValueError(f"{who}: n_iter must be an int >= 0, got {self.n_iter!r}")
        self.n_iter = int(self.n_iter)
        if not isinstance(self.history, dict):
            raise TypeError(f"{who}: history must be a dict, got {type(self.history).__name__}")
        if not isinstance(self.seconds, (int, float, np.floating)) or not self.seconds >= 0:
            raise ValueError(f"{who}: seconds must be a number >= 0, got {self.seconds!r}")
        self.seconds = float(self.seconds)
        if not isinstance(self.stop_reason, str):
            raise TypeError(f"{who}: stop_reason must be a str, got {self.stop_reason!r}")
        if self.name is not None and not isinstance(self.name, str):
            raise TypeError(f"{who}: name must be a str or None, got {type(self.name).__name__}")
        self.device = str(self.device)
        if not isinstance(self.extra, dict):
            raise TypeError(f"{who}: extra must be a dict, got {type(self.extra).__name__}")

    # ------------------------------------------------------------------ views

    @property
    def shape(self) -> tuple[int, int]:
        """(H, W) of the image and the label map."""
        return (int(self.labels.shape[0]), int(self.labels.shape[1]))

    def overlay(
        self,
        alpha: float = 0.5,
        boundaries: bool = True,
        *,
        boundary_color: tuple[int, int, int] = (255, 255, 0),
    ) -> np.ndarray:
        """The image with each segment tinted by its colour, for people to look at.

        Parameters
        ----------
        alpha : float in [0, 1]
            Weight of the segment colour (0: the image only, 1: the colours only).
        boundaries : bool
            Draw segment boundaries (``skimage.segmentation.find_boundaries``, inner
            mode, label 0 included) in ``boundary_color``.
        boundary_color : (r, g, b)
            Colour of the boundaries, each in 0..255.

        Returns
        -------
        numpy.ndarray
            (H, W, 3) ``uint8``. Label ``k`` is always drawn in ``label_colors(K)[k]``.
        """
        if not isinstance(alpha, (int, float, np.floating)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
        color = np.asarray(boundary_color)
        if color.shape != (3,) or not np.issubdtype(color.dtype, np.integer):
            raise ValueError(f"boundary_color must be three ints in 0..255, got {boundary_color!r}")
        if color.min() < 0 or color.max() > 255:
            raise ValueError(f"boundary_color must be three ints in 0..255, got {boundary_color!r}")
        tint = label_colors(self.n_labels)[self.labels]
        a = float(alpha)
        out = self.image.astype(np.float32) * (1.0 - a) + tint.astype(np.float32) * a
        out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
        if boundaries:
            from skimage.segmentation import find_boundaries

            out[find_boundaries(self.labels, mode="inner", background=-1)] = color.astype(np.uint8)
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (no pixel data).

        Keys: ``name``, ``image_shape``, ``n_labels``, ``n_iter``, ``seconds``,
        ``stop_reason``, ``device``, ``guided`` (whether guide labels were used),
        ``history``, ``config`` (the config's ``to_dict()`` /
        :func:`dataclasses.asdict`), ``extra``, ``dynaguide_version``.
        """
        config = self.config
        if hasattr(config, "to_dict") and callable(config.to_dict):
            config_d = config.to_dict()
        elif dataclasses.is_dataclass(config) and not isinstance(config, type):
            config_d = dataclasses.asdict(config)
        elif isinstance(config, dict) or config is None:
            config_d = config
        else:
            config_d = repr(config)
        return to_jsonable(
            {
                "name": self.name,
                "image_shape": list(self.image.shape),
                "n_labels": self.n_labels,
                "n_iter": self.n_iter,
                "seconds": self.seconds,
                "stop_reason": self.stop_reason,
                "device": self.device,
                "guided": self.guide_labels is not None,
                "history": self.history,
                "config": config_d,
                "extra": self.extra,
                "dynaguide_version": _version(),
            },
            where="Segmentation.to_dict()",
        )

    # ------------------------------------------------------------------ files

    def default_stem(self) -> str:
        """File stem used by :meth:`save` when none is given: the input's file name
        without its image extension, else ``"segmentation"``."""
        if not self.name:
            return "segmentation"
        base = os.path.basename(self.name.rstrip("/\\")) or "segmentation"
        root, ext = os.path.splitext(base)
        return root if ext.lower() in IMAGE_EXTENSIONS and root else base

    def save(
        self, out_dir: str | os.PathLike[str], stem: str | None = None, *, alpha: float = 0.5
    ) -> dict[str, Path]:
        """Write the label map, the overlay and the JSON summary, each atomically.

        Files, in this order (the JSON last, so its presence marks a complete result):

        - ``<stem>.labels.png``: 16-bit grayscale PNG of :attr:`labels`
          (read it back with :func:`dynaguide.io.read_label_png`);
        - ``<stem>.overlay.png``: :meth:`overlay` with ``alpha``;
        - ``<stem>.json``: :meth:`to_dict`.

        Parameters
        ----------
        out_dir : str or os.PathLike
            Output folder (created if missing).
        stem : str, optional
            File name stem (no folder separators); default :meth:`default_stem`.
        alpha : float
            Overlay tint weight.

        Returns
        -------
        dict
            ``{"labels": Path, "overlay": Path, "json": Path}``.
        """
        stem = self.default_stem() if stem is None else stem
        check_stem(stem)
        folder = Path(out_dir)
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{folder}: output path exists and is not a folder")
        paths = self.output_paths(folder, stem)
        save_label_png(paths["labels"], self.labels)
        save_rgb_png(paths["overlay"], self.overlay(alpha))
        save_json(paths["json"], self.to_dict())
        return paths

    def output_bytes(
        self, alpha: float = 0.5, *, extra_json: dict[str, Any] | None = None
    ) -> dict[str, bytes]:
        """The contents :meth:`save` writes, in writing order (the JSON last).

        Returns
        -------
        dict
            ``{"labels": PNG bytes, "overlay": PNG bytes, "json": UTF-8 JSON bytes}``;
            ``extra_json`` is merged into the top level of :meth:`to_dict`.
        """
        who = self.name or "segmentation"
        labels = encode_label_png(self.labels, where=f"labels of {who}")
        overlay = encode_rgb_png(self.overlay(alpha), where=f"overlay of {who}")
        summary = {**self.to_dict(), **(extra_json or {})}
        return {
            "labels": labels,
            "overlay": overlay,
            "json": json_bytes(summary, where=f"summary of {who}"),
        }

    @staticmethod
    def output_paths(out_dir: str | os.PathLike[str], stem: str) -> dict[str, Path]:
        """The paths :meth:`save` writes for ``stem`` in ``out_dir`` (nothing is touched)."""
        folder = Path(out_dir)
        return {
            "labels": folder / f"{stem}.labels.png",
            "overlay": folder / f"{stem}.overlay.png",
            "json": folder / f"{stem}.json",
        }


def check_stem(stem: Any) -> str:
    """``stem`` if it is a usable output file stem (a non-empty name without separators)."""
    if (
        not isinstance(stem, str)
        or not stem
        or stem in (".", "..")
        or "/" in stem
        or "\\" in stem
        or "\0" in stem
        or len((stem + ".overlay.png").encode("utf-8", "surrogateescape")) > 255
    ):
        raise ValueError(
            f"stem must be a non-empty file name without separators whose outputs fit in 255 "
            f"bytes, got {stem!r}"
        )
    return stem


def _shape_of(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"array of shape {value.shape} and dtype {value.dtype}"
    return f"a {type(value).__name__}"
