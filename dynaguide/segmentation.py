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
from dynaguide.palette import label_colors
from dynaguide.result_files import format_bytes
from dynaguide.result_files import output_paths as _output_paths
from dynaguide.writing import json_bytes, write_atomic

__all__ = ["Segmentation", "label_colors"]


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
        (H, W) ``int32`` label map, values in ``start_label .. start_label + n_labels - 1``
        (other integer dtypes are converted to ``int32``).
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
        Further JSON-able details (guide name, refinement size, seed, the settings
        record of :func:`dynaguide.settings.settings_record`, ...).
    start_label : int
        The first label value (0 or 1, as ``start_label`` of
        ``skimage.segmentation.relabel_sequential``). ``skimage.measure.regionprops``
        treats label 0 as background and skips it, so pass labels made with
        ``start_label=1`` to give every segment a region.
    labels_tensor : torch.Tensor or None
        With ``return_tensors=True``: the labels as an (H, W) ``int64`` tensor on the
        refinement device (not saved, not in :meth:`to_dict`).

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
    start_label: int = 0
    labels_tensor: Any = field(default=None, repr=False, compare=False)

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
        if not _is_int(self.start_label) or self.start_label not in (0, 1):
            raise ValueError(f"{who}: start_label must be 0 or 1, got {self.start_label!r}")
        self.start_label = first = int(self.start_label)
        if labels.size == 0:
            raise ValueError(f"{who}: labels of shape {labels.shape} are empty")
        lo, hi = int(labels.min()), int(labels.max())
        if lo < first or hi >= first + self.n_labels:
            raise ValueError(
                f"{who}: labels must lie in [start_label, start_label + n_labels - 1] = "
                f"[{first}, {first + self.n_labels - 1}], found range [{lo}, {hi}]"
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
        tint = label_colors(self.n_labels)[self.labels - self.start_label]
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
        :func:`dataclasses.asdict`), ``extra``, ``start_label``, ``dynaguide_version``.
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
                "start_label": self.start_label,
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
        self,
        out_dir: str | os.PathLike[str],
        stem: str | None = None,
        *,
        alpha: float = 0.5,
        formats: Any = None,
    ) -> dict[str, Path]:
        """Write the chosen formats and the JSON summary, each atomically, the JSON last
        (its presence marks a complete result).

        Parameters
        ----------
        out_dir : str or os.PathLike
            Output folder (created if missing).
        stem : str, optional
            File name stem (no folder separators); default :meth:`default_stem`.
        alpha : float
            Overlay tint weight.
        formats : iterable of str or a comma-separated str, optional
            Any of ``labels`` (``<stem>.labels.png``, 16-bit; read it back with
            :func:`dynaguide.io.read_label_png`), ``palette`` (``<stem>.palette.png``),
            ``overlay`` (``<stem>.overlay.png``) and ``segments``
            (``<stem>.segments.json``, COCO RLE records); default ``labels`` and
            ``overlay`` (see :mod:`dynaguide.result_files`). ``<stem>.json``
            (:meth:`to_dict`) is always written; :func:`dynaguide.load_segmentation`
            reads the result back.

        Returns
        -------
        dict
            ``{format: Path, ..., "json": Path}``.
        """
        stem = self.default_stem() if stem is None else stem
        check_stem(stem)
        folder = Path(out_dir)
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"{folder}: output path exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        paths = self.output_paths(folder, stem, formats)
        for key, data in self.output_bytes(alpha, formats=formats).items():
            write_atomic(paths[key], data)
        return paths

    def output_bytes(
        self,
        alpha: float = 0.5,
        *,
        extra_json: dict[str, Any] | None = None,
        formats: Any = None,
    ) -> dict[str, bytes]:
        """The contents :meth:`save` writes, in writing order (the JSON last).

        Returns
        -------
        dict
            ``{format: bytes, ..., "json": UTF-8 JSON bytes}``; ``extra_json`` is merged
            into the top level of :meth:`to_dict`, which also lists the formats written.
        """
        paths = _output_paths(".", "x", formats)
        out = {key: format_bytes(self, key, alpha=alpha) for key in paths if key != "json"}
        summary = {**self.to_dict(), "formats": list(out), **(extra_json or {})}
        out["json"] = json_bytes(summary, where=f"summary of {self.name or 'segmentation'}")
        return out

    @staticmethod
    def output_paths(
        out_dir: str | os.PathLike[str], stem: str, formats: Any = None
    ) -> dict[str, Path]:
        """The paths :meth:`save` writes for ``stem`` in ``out_dir`` (nothing is touched)."""
        return _output_paths(out_dir, stem, formats)


def check_stem(stem: Any) -> str:
    """``stem`` if it is a usable output file stem (a non-empty name without separators)."""
    if (
        not isinstance(stem, str)
        or not stem
        or stem in (".", "..")
        or "/" in stem
        or "\\" in stem
        or "\0" in stem
        or len((stem + ".segments.json").encode("utf-8", "surrogateescape")) > 255
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
