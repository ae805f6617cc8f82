"""COCO run-length encoding (RLE) of binary masks and label maps, in plain numpy.

The format is the one of the COCO annotations and ``pycocotools.mask`` (Lin et al.,
"Microsoft COCO: Common Objects in Context", ECCV 2014):

- the (H, W) mask is read in **column-major** order (down the first column, then the
  next one);
- ``counts`` are the lengths of alternating runs, starting with a run of **zeros** (which
  is 0 long when the first pixel is set); the runs sum to H * W;
- *uncompressed* RLE keeps ``counts`` as a list of ints; *compressed* RLE packs them into an
  ASCII string: each count after the second is stored as the difference from the count two
  places before it, and every value is written as little-endian groups of 5 bits, one
  character per group (``48 + bits``, with ``0x20`` set while more groups follow and the
  sign taken from bit ``0x10`` of the last group).

A result is ``{"size": [H, W], "counts": str | list[int]}``, which ``pycocotools.mask.decode``
reads (with the string encoded to bytes) and which the COCO JSON files hold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "counts_to_string",
    "labels_to_rles",
    "rle_area",
    "rle_counts",
    "rle_decode",
    "rle_encode",
    "string_to_counts",
]

_OFFSET = 48  # '0'
_MORE = 0x20
_SIGN = 0x10
_BITS = 0x1F


def rle_counts(mask: np.ndarray) -> np.ndarray:
    """Uncompressed COCO run lengths of a 2-D mask (nonzero = set), column-major order."""
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    flat = m.ravel(order="F").astype(bool)
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).astype(np.int64)
    if flat[0]:
        counts = np.concatenate([[0], counts])
    return counts


def counts_to_string(counts: Sequence[int] | np.ndarray) -> str:
    """Pack run lengths into the COCO compressed RLE string.

    Examples
    --------
    >>> counts_to_string([3, 2, 1])
    '321'
    """
    values = [int(c) for c in counts]
    if any(c < 0 for c in values):
        raise ValueError("RLE counts must be >= 0")
    out = bytearray()
    for i, c in enumerate(values):
        x = c - values[i - 2] if i > 2 else c
        while True:
            group = x & _BITS
            x >>= 5  # arithmetic shift: negative differences end at -1
            more = x != -1 if group & _SIGN else x != 0
            out.append(_OFFSET + (group | (_MORE if more else 0)))
            if not more:
                break
    return out.decode("ascii")


def string_to_counts(text: str | bytes) -> np.ndarray:
    """Unpack a COCO compressed RLE string into run lengths (the inverse of
    :func:`counts_to_string`).

    Raises
    ------
    ValueError
        A character outside ``'0'..'o'``, a string that ends inside a value, or a
        negative run length.
    """
    data = text.encode("ascii") if isinstance(text, str) else bytes(text)
    counts: list[int] = []
    p, n = 0, len(data)
    while p < n:
        x, shift = 0, 0
        while True:
            if p >= n:
                raise ValueError("RLE string ends in the middle of a value")
            group = data[p] - _OFFSET
            if not 0 <= group <= 0x3F:
                raise ValueError(f"invalid character {chr(data[p])!r} in an RLE string")
            x |= (group & _BITS) << shift
            p += 1
            shift += 5
            if not group & _MORE:
                if group & _SIGN:
                    x -= 1 << shift  # sign-extend the last group
                break
        if len(counts) > 2:
            x += counts[-2]
        if x < 0:
            raise ValueError(f"RLE string decodes to a negative run length ({x})")
        counts.append(x)
    return np.asarray(counts, dtype=np.int64)


def rle_encode(mask: np.ndarray, *, compressed: bool = True) -> dict[str, Any]:
    """COCO RLE of a binary (H, W) mask (any nonzero value counts as set).

    Parameters
    ----------
    mask : array (H, W)
    compressed : bool
        ``True``: ``counts`` is the compressed string; ``False``: a list of ints.

    Returns
    -------
    dict
        ``{"size": [H, W], "counts": str | list[int]}``.

    Examples
    --------
    >>> rle_encode(np.array([[0, 1], [1, 1]]), compressed=False)
    {'size': [2, 2], 'counts': [1, 3]}
    """
    counts = rle_counts(mask)
    h, w = np.asarray(mask).shape
    return {
        "size": [int(h), int(w)],
        "counts": counts_to_string(counts) if compressed else [int(c) for c in counts],
    }


def _rle_parts(rle: dict[str, Any]) -> tuple[int, int, np.ndarray]:
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise TypeError("rle must be a dict with 'size' [H, W] and 'counts'")
    size = rle["size"]
    if len(size) != 2 or any(int(s) < 0 for s in size):
        raise ValueError(f"rle 'size' must be [H, W] with H, W >= 0, got {size!r}")
    h, w = int(size[0]), int(size[1])
    raw = rle["counts"]
    counts = (
        string_to_counts(raw)
        if isinstance(raw, (str, bytes, bytearray))
        else np.asarray(raw, dtype=np.int64).reshape(-1)
    )
    if counts.size and counts.min() < 0:
        raise ValueError("rle counts must be >= 0")
    if int(counts.sum()) != h * w:
        raise ValueError(f"rle counts sum to {int(counts.sum())}, expected H * W = {h * w}")
    return h, w, counts


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """The (H, W) ``uint8`` mask (0/1) of a COCO RLE, compressed or not.

    Raises
    ------
    TypeError, ValueError
        A malformed RLE, or counts that do not sum to H * W.
    """
    h, w, counts = _rle_parts(rle)
    values = np.arange(counts.size, dtype=np.int64) % 2
    flat = np.repeat(values.astype(np.uint8), counts)
    return flat.reshape((h, w), order="F")


def rle_area(rle: dict[str, Any]) -> int:
    """Number of set pixels of a COCO RLE (the sum of its odd-indexed runs)."""
    _, _, counts = _rle_parts(rle)
    return int(counts[1::2].sum())


def labels_to_rles(labels: np.ndarray, n_labels: int | None = None) -> list[dict[str, Any]]:
    """One compressed COCO RLE per label ``0 .. K-1`` of an integer (H, W) label map.

    Parameters
    ----------
    labels : array (H, W) of ints in ``0 .. K-1``
    n_labels : int, optional
        K (default ``labels.max() + 1``); labels that do not occur get an empty mask.

    Returns
    -------
    list of dict
        ``{"label": k, "area": pixels, "size": [H, W], "counts": str}`` for each k.
    """
    lab = np.asarray(labels)
    if lab.ndim != 2 or not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer array, got {lab.dtype} {lab.shape}")
    k = int(lab.max()) + 1 if n_labels is None and lab.size else int(n_labels or 0)
    if lab.size and (lab.min() < 0 or lab.max() >= k):
        raise ValueError(f"labels must lie in [0, {k - 1}], found [{lab.min()}, {lab.max()}]")
    out = []
    for label in range(k):
        mask = lab == label
        rle = rle_encode(mask)
        out.append({"label": label, "area": int(mask.sum()), **rle})
    return out
