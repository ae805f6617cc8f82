"""Per-segment records: id, area, bounding box, centroid, mean colour and COCO RLE mask.

The records are laid out like COCO annotations (Lin et al., "Microsoft COCO: Common
Objects in Context", ECCV 2014), so a pipeline can turn them into an annotation file or
decode the masks with ``pycocotools.mask.decode`` directly:

- ``id``: the segment's value in the label map (``start_label .. start_label + K - 1``);
- ``area``: pixels;
- ``bbox``: ``[x, y, width, height]`` in pixels, ``x`` the first column and ``y`` the first
  row (what ``pycocotools.mask.toBbox`` gives for the same mask);
- ``centroid``: ``[x, y]``, the mean column and row of the segment's pixels (pixel
  centres at integer coordinates; scikit-image's ``regionprops`` gives ``(row, col)``);
- ``mean_color``: ``[r, g, b]``, the mean RGB of the image over the segment;
- ``segmentation``: the mask as compressed COCO RLE ``{"size": [H, W], "counts": str}``
  (see :mod:`dynaguide.rle`).

All statistics come from one pass over the label map (``numpy.bincount``), and the RLE
masks from one pass over its runs in column-major order, so the cost does not grow with
the number of segments times the image size.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dynaguide.rle import counts_to_string

__all__ = ["label_rles", "segment_records"]


def _check(labels: np.ndarray, image: np.ndarray | None) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 2 or not np.issubdtype(lab.dtype, np.integer) or lab.size == 0:
        raise ValueError(
            f"labels must be a non-empty 2-D integer array, got {lab.dtype} {lab.shape}"
        )
    if int(lab.min()) < 0:
        raise ValueError(f"labels must be >= 0, found {int(lab.min())}")
    if image is not None:
        img = np.asarray(image)
        if img.ndim != 3 or img.shape[2] != 3 or img.shape[:2] != lab.shape:
            raise ValueError(
                f"image must be (H, W, 3) with the labels' (H, W) {lab.shape}, got {img.shape}"
            )
    return lab


def label_rles(labels: np.ndarray, ids: np.ndarray) -> dict[int, dict[str, Any]]:
    """Compressed COCO RLE of the mask ``labels == id`` for each of ``ids``.

    Parameters
    ----------
    labels : (H, W) integer array, values >= 0
    ids : 1-D integer array
        Ids to encode; an id that does not occur gets an all-zero mask.

    Returns
    -------
    dict
        ``{id: {"size": [H, W], "counts": str}}``.
    """
    lab = _check(labels, None)
    h, w = lab.shape
    flat = lab.ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate([[0], change]).astype(np.int64)
    lengths = np.diff(np.concatenate([starts, [flat.size]]))
    values = flat[starts]
    order = np.argsort(values, kind="stable")  # runs of each label, in scan order
    values, starts, lengths = values[order], starts[order], lengths[order]
    first = np.searchsorted(values, ids, side="left")
    last = np.searchsorted(values, ids, side="right")
    out: dict[int, dict[str, Any]] = {}
    for label, lo, hi in zip(ids.tolist(), first.tolist(), last.tolist(), strict=True):
        s, n = starts[lo:hi], lengths[lo:hi]
        ends = s + n
        gaps = s - np.concatenate([[0], ends[:-1]])  # zeros before each run
        counts = np.empty(2 * len(s) + 1, dtype=np.int64)
        counts[0:-1:2], counts[1::2] = gaps, n
        counts[-1] = flat.size - (int(ends[-1]) if len(s) else 0)
        if counts[-1] == 0 and len(counts) > 1:
            counts = counts[:-1]
        out[int(label)] = {"size": [int(h), int(w)], "counts": counts_to_string(counts)}
    return out


def segment_records(
    labels: np.ndarray, image: np.ndarray | None = None, *, rle: bool = True
) -> list[dict[str, Any]]:
    """One record per label value present in ``labels``, in increasing id order.

    Parameters
    ----------
    labels : (H, W) integer array, values >= 0
    image : (H, W, 3) array, optional
        For ``mean_color`` (left out without an image).
    rle : bool
        Include the ``segmentation`` mask (compressed COCO RLE).

    Returns
    -------
    list of dict
        ``{"id", "area", "bbox", "centroid", "mean_color", "segmentation"}`` (see the module).

    Examples
    --------
    >>> lab = np.array([[0, 0, 1], [0, 1, 1]])
    >>> [(r["id"], r["area"], r["bbox"]) for r in segment_records(lab, rle=False)]
    [(0, 3, [0, 0, 2, 2]), (1, 3, [1, 0, 2, 2])]
    """
    lab = _check(labels, image)
    h, w = lab.shape
    flat = lab.ravel().astype(np.int64)
    n = int(flat.max()) + 1
    area = np.bincount(flat, minlength=n)
    ids = np.flatnonzero(area)
    rows = np.repeat(np.arange(h, dtype=np.int64), w)
    cols = np.tile(np.arange(w, dtype=np.int64), h)
    big = np.iinfo(np.int64).max
    stats = {}
    for key, coord in (("row", rows), ("col", cols)):
        lo = np.full(n, big, np.int64)
        hi = np.full(n, -1, np.int64)
        np.minimum.at(lo, flat, coord)
        np.maximum.at(hi, flat, coord)
        total = np.bincount(flat, weights=coord.astype(np.float64), minlength=n)
        stats[key] = (lo, hi, total)
    colour = None
    if image is not None:
        rgb = np.asarray(image).reshape(-1, 3).astype(np.float64)
        colour = np.stack([np.bincount(flat, weights=rgb[:, c], minlength=n) for c in range(3)], 1)
    masks = label_rles(lab, ids) if rle else {}
    out = []
    r_lo, r_hi, r_sum = stats["row"]
    c_lo, c_hi, c_sum = stats["col"]
    for k in ids.tolist():
        a = int(area[k])
        rec: dict[str, Any] = {
            "id": int(k),
            "area": a,
            "bbox": [
                int(c_lo[k]),
                int(r_lo[k]),
                int(c_hi[k] - c_lo[k] + 1),
                int(r_hi[k] - r_lo[k] + 1),
            ],
            "centroid": [float(c_sum[k] / a), float(r_sum[k] / a)],
        }
        if colour is not None:
            rec["mean_color"] = [float(v) for v in colour[k] / a]
        if rle:
            rec["segmentation"] = masks[k]
        out.append(rec)
    return out
