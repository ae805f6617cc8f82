"""Parquet records of segmentations (``output_format="parquet"``).

One row per image: its id and source, shape, K, one COCO RLE per segment (compressed
counts, :mod:`dynaguide.rle`), how the refinement went and its timings. Read the dataset
back with ``pyarrow.dataset.dataset("OUT/segments")`` or ``ray.data.read_parquet``, and a
label map with :func:`labels_from_record`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dynaguide.rle import labels_to_rles, rle_decode

__all__ = ["labels_from_record", "segment_record", "segments_schema", "segments_table"]


def segments_schema() -> Any:
    """The :class:`pyarrow.Schema` of the records."""
    import pyarrow as pa

    segment = pa.struct([("label", pa.int32()), ("area", pa.int64()), ("counts", pa.string())])
    return pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("height", pa.int32()),
            ("width", pa.int32()),
            ("n_labels", pa.int32()),
            ("segments", pa.list_(segment)),
            ("n_iter", pa.int32()),
            ("stop_reason", pa.string()),
            ("preset", pa.string()),
            ("guide", pa.string()),
            ("seed", pa.int64()),
            ("device", pa.string()),
            ("load_s", pa.float64()),
            ("refine_s", pa.float64()),
            ("worker", pa.string()),
            ("dynaguide_version", pa.string()),
        ]
    )


def segment_record(seg: Any, image_id: str, load_s: float, worker: str) -> dict[str, Any]:
    """The Parquet row of one :class:`dynaguide.Segmentation`."""
    from dynaguide.segmentation import _version

    h, w = seg.shape
    first = int(getattr(seg, "start_label", 0))  # labels run first .. first + K - 1
    segments = [
        {"label": r["label"] + first, "area": r["area"], "counts": r["counts"]}
        for r in labels_to_rles(seg.labels - first, seg.n_labels)
    ]
    config_name = getattr(seg.config, "name", None)
    return {
        "id": image_id,
        "source": seg.name,
        "height": h,
        "width": w,
        "n_labels": seg.n_labels,
        "segments": segments,
        "n_iter": seg.n_iter,
        "stop_reason": seg.stop_reason,
        "preset": config_name if isinstance(config_name, str) else None,
        "guide": seg.extra.get("guide"),
        "seed": seg.extra.get("seed"),
        "device": seg.device,
        "load_s": float(load_s),
        "refine_s": float(seg.seconds),
        "worker": worker,
        "dynaguide_version": _version(),
    }


def segments_table(records: list[dict[str, Any]]) -> Any:
    """A :class:`pyarrow.Table` of :func:`segment_record` rows (:func:`segments_schema`)."""
    import pyarrow as pa

    return pa.Table.from_pylist(records, schema=segments_schema())


def labels_from_record(record: dict[str, Any]) -> np.ndarray:
    """The (H, W) ``int32`` label map of a Parquet record (its segments' RLEs decoded).

    Raises
    ------
    ValueError
        When the segments overlap or leave pixels uncovered.
    """
    h, w = int(record["height"]), int(record["width"])
    labels = np.full((h, w), -1, dtype=np.int32)
    for s in record["segments"]:
        mask = rle_decode({"size": [h, w], "counts": s["counts"]}).astype(bool)
        if (labels[mask] != -1).any():
            raise ValueError(f"{record.get('id')}: segment {s['label']} overlaps another one")
        labels[mask] = int(s["label"])
    if (labels < 0).any():
        raise ValueError(f"{record.get('id')}: the segments leave pixels uncovered")
    return labels
