"""Reading a saved result back: :func:`load_segmentation`.

Any file of a saved result names the result (``<stem>.json``, ``<stem>.labels.png``,
``<stem>.palette.png``, ``<stem>.overlay.png`` or ``<stem>.segments.json``); the loader
finds its siblings by stem and rebuilds the :class:`~dynaguide.segmentation.Segmentation`:

- the labels from the first of ``labels.png`` (exact), ``palette.png`` (exact when it is
  indexed-colour, i.e. up to 256 labels) or ``segments.json`` (the COCO RLE masks);
- everything else (iterations, history, stop reason, configuration, settings, ...) from
  ``<stem>.json`` when it exists;
- the image, which dynaguide does not save: ``image=`` when given, else the input file
  the JSON names when it still exists with the same size, else the segments' mean colours
  painted into their masks, else mid-gray; ``extra["image_source"]`` says which.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from dynaguide.result_files import FORMATS
from dynaguide.segmentation import Segmentation

__all__ = ["load_segmentation"]

_MAX_JSON_BYTES = 256 * 2**20


def _stem_of(path: Path) -> str:
    name = path.name
    for suffix in (*FORMATS.values(), ".json"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    raise ValueError(
        f"{str(path)!r} is not a file of a saved dynaguide result (expected a name ending in "
        f"{', '.join((*FORMATS.values(), '.json'))})"
    )


def _read_json(path: Path) -> Any:
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise ValueError(f"{str(path)!r} is larger than {_MAX_JSON_BYTES} bytes")
    try:
        return json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{str(path)!r} is not valid JSON: {exc}") from None


def _labels(files: dict[str, Path], start: int) -> tuple[np.ndarray, dict[str, Any] | None]:
    from PIL import Image

    from dynaguide.io import read_label_png

    if files["labels"].is_file():
        return read_label_png(files["labels"]), None
    if files["palette"].is_file():
        with Image.open(files["palette"]) as im:
            if im.mode == "P":
                return np.asarray(im).astype(np.int32) + start, None
    if files["segments"].is_file():
        from dynaguide.rle import rle_decode

        doc = _read_json(files["segments"])
        if not isinstance(doc, dict) or not isinstance(doc.get("segments"), list):
            raise ValueError(f"{str(files['segments'])!r} has no 'segments' list")
        h, w = int(doc["height"]), int(doc["width"])
        labels = np.full((h, w), -1, dtype=np.int32)
        for rec in doc["segments"]:
            labels[rle_decode(rec["segmentation"]).astype(bool)] = int(rec["id"])
        if labels.min() < 0:
            raise ValueError(f"{str(files['segments'])!r}: the masks do not cover the image")
        return labels, doc
    raise FileNotFoundError(
        f"no label map for {str(files['json'])[:-5]!r}: none of {files['labels'].name}, "
        f"an indexed {files['palette'].name} or {files['segments'].name} exists"
    )


def _image(
    labels: np.ndarray, summary: dict[str, Any], segments: dict[str, Any] | None, files: dict
) -> tuple[np.ndarray, str]:
    from dynaguide.io import load_image

    h, w = labels.shape
    run = summary.get("run") if isinstance(summary.get("run"), dict) else {}
    source = (run.get("source") or {}).get("path") if isinstance(run.get("source"), dict) else None
    for candidate in (source, summary.get("name")):
        if isinstance(candidate, str) and os.path.isfile(candidate):
            try:
                rgb = load_image(candidate)
            except Exception:  # an unreadable source: fall back below
                continue
            if rgb.shape[:2] == (h, w):
                return rgb, candidate
    if segments is None and files["segments"].is_file():
        segments = _read_json(files["segments"])
    if isinstance(segments, dict) and all("mean_color" in r for r in segments.get("segments", [])):
        table = np.zeros((int(labels.max()) + 1, 3), dtype=np.float64)
        for rec in segments["segments"]:
            table[int(rec["id"])] = rec["mean_color"]
        return np.clip(np.rint(table[labels]), 0, 255).astype(np.uint8), "segment mean colours"
    return np.full((h, w, 3), 128, dtype=np.uint8), "none saved (mid-gray)"


def load_segmentation(path: str | os.PathLike[str], *, image: Any = None) -> Segmentation:
    """Read a result saved by :meth:`Segmentation.save` or ``dynaguide segment``.

    Parameters
    ----------
    path : str or os.PathLike
        Any file of the result (see the module for the names).
    image : image input, optional
        The image the result belongs to (see :func:`dynaguide.io.load_image`).

    Returns
    -------
    Segmentation
        Labels as saved; ``guide_labels`` is None (they are not saved).

    Raises
    ------
    ValueError
        ``path`` is not named like a result file, a file is malformed, or ``image`` does
        not have the labels' size.
    FileNotFoundError
        No file holding the labels exists.
    """
    from dynaguide.config import RefineConfig

    p = Path(path)
    stem = _stem_of(p)
    files = {key: p.with_name(stem + suffix) for key, suffix in FORMATS.items()}
    files["json"] = p.with_name(stem + ".json")
    summary = _read_json(files["json"]) if files["json"].is_file() else {}
    if not isinstance(summary, dict):
        raise ValueError(f"{str(files['json'])!r} does not hold a JSON object")
    start = int(summary.get("start_label", 0))
    labels, segments = _labels(files, start)
    if image is not None:
        from dynaguide.io import load_image

        rgb, origin = load_image(image, name="image"), "given"
        if rgb.shape[:2] != labels.shape:
            raise ValueError(
                f"image of shape {rgb.shape[:2]} does not match the saved labels' {labels.shape}"
            )
    else:
        rgb, origin = _image(labels, summary, segments, files)
    config: Any = summary.get("config")
    if isinstance(config, dict):
        with contextlib.suppress(TypeError, ValueError):  # another version's: kept as a dict
            config = RefineConfig.from_dict(config)
    n_labels = int(summary.get("n_labels", int(labels.max()) + 1 - start))
    return Segmentation(
        labels=labels,
        n_labels=n_labels,
        n_iter=int(summary.get("n_iter", 0)),
        history=summary.get("history") or {"loss": [], "n_labels": []},
        guide_labels=None,
        image=rgb,
        config=config,
        seconds=float(summary.get("seconds", 0.0)),
        stop_reason=str(summary.get("stop_reason", "loaded")),
        name=summary.get("name") if isinstance(summary.get("name"), str) else stem,
        device=str(summary.get("device", "cpu")),
        extra={**(summary.get("extra") or {}), "image_source": origin, "loaded_from": str(p)},
        start_label=start,
    )
