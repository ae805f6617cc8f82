"""The evaluation's prediction cache: one ``.npz`` per image and the protocol it was made with.

Predictions are cached per image (``<out>/predictions/<id>.npz``, written atomically) so
an interrupted run resumes where it stopped; the settings a cache was made with are kept
in ``<out>/protocol.json`` and a resume with other settings is refused.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from dynaguide.io import to_jsonable
from dynaguide.writing import write_atomic

__all__ = ["CACHE_FORMAT", "check_protocol", "load_cached", "save_cached"]

#: Version of the cache layout; a cache of another version is refused.
CACHE_FORMAT = 1


def save_cached(path: Path, seg: Any, meta: dict[str, Any]) -> None:
    labels = np.asarray(seg.labels)
    arrays: dict[str, np.ndarray] = {
        "labels": labels.astype(np.uint16)
        if labels.min() >= 0 and labels.max() < 65536
        else labels,
        "loss": np.asarray(seg.history.get("loss", []), dtype=np.float64),
        "n_labels": np.asarray(seg.history.get("n_labels", []), dtype=np.int64),
        "meta": np.array(json.dumps(to_jsonable(meta))),
    }
    if seg.guide_labels is not None:
        arrays["guide_labels"] = np.asarray(seg.guide_labels, dtype=np.int32)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_atomic(path, buf.getvalue())


def load_cached(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read one cached prediction: ``labels``, ``guide_labels`` (or None), ``history``
    (``loss``, ``n_labels`` lists) and ``meta`` (n_labels, n_iter, seconds,
    stop_reason, ...).

    Raises
    ------
    ValueError
        If the file is corrupt or not a dynaguide prediction cache.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {
                "labels": z["labels"].astype(np.int32),
                "guide_labels": z["guide_labels"] if "guide_labels" in z.files else None,
                "history": {"loss": z["loss"].tolist(), "n_labels": z["n_labels"].tolist()},
                "meta": json.loads(str(z["meta"])),
            }
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{path}: corrupt prediction cache ({exc})") from None
    if out["meta"].get("cache_format") != CACHE_FORMAT:
        raise ValueError(
            f"{path}: cache format {out['meta'].get('cache_format')} != {CACHE_FORMAT}"
        )
    return out


def check_protocol(
    cache_dir: Path, fingerprint: dict[str, Any], *, resume: bool, overwrite: bool
) -> None:
    pred_dir = cache_dir / "predictions"
    n_cached = len(list(pred_dir.glob("*.npz"))) if pred_dir.is_dir() else 0
    proto_path = cache_dir / "protocol.json"
    if n_cached and not (resume or overwrite):
        raise ValueError(
            f"{cache_dir} already holds {n_cached} cached prediction(s); resume them "
            "(--resume / resume=True), overwrite them (--overwrite) or choose another output folder"
        )
    if n_cached and resume and not overwrite and proto_path.exists():
        try:
            old = json.loads(proto_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"{proto_path}: unreadable ({exc}); remove it or use --overwrite"
            ) from None
        diff = {k: (old.get(k), v) for k, v in fingerprint.items() if old.get(k) != v}
        if diff:
            listed = ", ".join(f"{k}: cached {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"{cache_dir} holds predictions made with other settings ({listed}); "
                "use another output folder or --overwrite"
            )
    write_atomic(proto_path, (json.dumps(fingerprint, indent=2) + "\n").encode())
