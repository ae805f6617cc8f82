"""Colours for people: the deterministic label palette and the palette PNG.

:func:`label_colors` gives label ``k`` the same colour in every overlay and palette
image. :func:`encode_palette_png` writes a label map as an indexed-colour PNG whose pixel
values are the labels themselves, so the file is both a picture and (for up to 256
labels) an exact copy of the label map.
"""

from __future__ import annotations

import numpy as np

__all__ = ["encode_palette_png", "label_colors"]

#: Labels an indexed-colour PNG can hold (8-bit indices).
PALETTE_SIZE = 256

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


def encode_palette_png(labels: np.ndarray, n_labels: int, *, where: str = "labels") -> bytes:
    """PNG bytes of ``labels`` drawn in :func:`label_colors` (``n_labels`` colours).

    Up to 256 labels the PNG is indexed-colour (mode ``P``): each pixel's index *is* its
    label, so :func:`dynaguide.writing.read_label_png` reads the labels back exactly. With
    more labels an 8-bit index cannot hold them and the PNG is plain RGB (a picture only;
    the 16-bit ``labels.png`` stays the exact record).

    Raises
    ------
    ValueError
        ``labels`` is not a 2-D integer map with values in ``[0, n_labels - 1]``.
    """
    from PIL import Image

    from dynaguide.writing import _png_bytes

    arr = np.asarray(labels)
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer) or arr.size == 0:
        raise ValueError(
            f"{where}: expected a non-empty 2-D integer label map, got {arr.dtype} {arr.shape}"
        )
    if int(arr.min()) < 0 or int(arr.max()) >= n_labels:
        raise ValueError(
            f"{where}: labels must lie in [0, {n_labels - 1}] for a palette PNG, found "
            f"[{int(arr.min())}, {int(arr.max())}]"
        )
    colors = label_colors(n_labels)
    if n_labels > PALETTE_SIZE:
        return _png_bytes(Image.fromarray(np.ascontiguousarray(colors[arr]), mode="RGB"))
    h, w = arr.shape
    image = Image.frombytes("P", (w, h), np.ascontiguousarray(arr.astype(np.uint8)).tobytes())
    image.putpalette(colors.reshape(-1).tolist())
    return _png_bytes(image)
