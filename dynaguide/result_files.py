"""The files one :class:`~dynaguide.segmentation.Segmentation` can be saved as.

Formats (any subset; the JSON summary is always written, and written last, so its
presence marks a complete result):

``labels``
    ``<stem>.labels.png``: the label map as a 16-bit grayscale PNG (exact, up to 65536
    labels).
``palette``
    ``<stem>.palette.png``: the label map in the label colours, an indexed-colour PNG whose
    indices are the labels minus ``start_label`` (exact up to 256 labels; RGB beyond, see
    :func:`dynaguide.palette.encode_palette_png`).
``overlay``
    ``<stem>.overlay.png``: the image tinted by segment, with boundaries.
``segments``
    ``<stem>.segments.json``: one record per segment with its COCO RLE mask
    (:mod:`dynaguide.segments`).

:data:`DEFAULT_FORMATS` (``labels`` and ``overlay``) is what dynaguide wrote before the
choice existed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_FORMATS", "FORMATS", "check_formats", "format_bytes", "output_paths"]

#: Every format and its file suffix, in writing order.
FORMATS: dict[str, str] = {
    "labels": ".labels.png",
    "palette": ".palette.png",
    "overlay": ".overlay.png",
    "segments": ".segments.json",
}
DEFAULT_FORMATS: tuple[str, ...] = ("labels", "overlay")


def check_formats(formats: Iterable[str] | str | None, *, name: str = "formats") -> tuple[str, ...]:
    """``formats`` (names, or one comma-separated string) as a tuple in writing order.

    None gives :data:`DEFAULT_FORMATS`; ``"json"`` is accepted and ignored (it is always
    written).

    Raises
    ------
    ValueError
        An unknown name (the message lists the known ones).
    TypeError
        Not a string or an iterable of strings.
    """
    if formats is None:
        return DEFAULT_FORMATS
    if isinstance(formats, str):
        formats = [f for f in formats.split(",") if f.strip()]
    items = list(formats) if isinstance(formats, Iterable) else [formats]
    if not all(isinstance(f, str) for f in items):
        raise TypeError(f"{name} must be format names (str), got {formats!r}")
    asked = [f.strip().lower() for f in items]
    unknown = sorted(set(asked) - set(FORMATS) - {"json"})
    if unknown:
        raise ValueError(
            f"unknown {name} {unknown}; choose among {', '.join(FORMATS)} (json is always written)"
        )
    return tuple(f for f in FORMATS if f in asked)


def output_paths(
    out_dir: str | os.PathLike[str], stem: str, formats: Iterable[str] | None = None
) -> dict[str, Path]:
    """``{format: path}`` of the files for ``stem`` in ``out_dir``, the JSON last."""
    folder = Path(out_dir)
    paths = {f: folder / f"{stem}{FORMATS[f]}" for f in check_formats(formats)}
    paths["json"] = folder / f"{stem}.json"
    return paths


def format_bytes(seg: Any, fmt: str, *, alpha: float = 0.5) -> bytes:
    """The bytes of ``seg`` in one format (not the JSON summary)."""
    from dynaguide.palette import encode_palette_png
    from dynaguide.segments import segment_records
    from dynaguide.writing import encode_label_png, encode_rgb_png, json_bytes

    who = seg.name or "segmentation"
    if fmt == "labels":
        return encode_label_png(seg.labels, where=f"labels of {who}")
    if fmt == "palette":
        return encode_palette_png(
            seg.labels - seg.start_label, seg.n_labels, where=f"palette of {who}"
        )
    if fmt == "overlay":
        return encode_rgb_png(seg.overlay(alpha), where=f"overlay of {who}")
    if fmt == "segments":
        h, w = seg.shape
        doc = {
            "name": seg.name,
            "height": h,
            "width": w,
            "start_label": seg.start_label,
            "segments": segment_records(seg.labels, seg.image),
        }
        return json_bytes(doc, where=f"segments of {who}")
    raise ValueError(f"unknown format {fmt!r}; choose among {', '.join(FORMATS)}")
