"""Evaluation figures drawn with PIL only (no matplotlib dependency).

- :func:`comparison_grid`: one row per image: image | annotation | guide | result.
- :func:`history_plot`: loss and number of labels K over the iterations, one line per
  image, with axes, tick labels and a legend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["colorize", "comparison_grid", "history_plot", "nice_ticks"]

_LINE_COLORS = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _palette(n: int) -> np.ndarray:
    from dynaguide.segmentation import label_colors

    return label_colors(n)


def colorize(labels: np.ndarray | None, shape: tuple[int, int] | None = None) -> np.ndarray:
    """RGB uint8 (H, W, 3) rendering of a label map (negative labels: black).

    Parameters
    ----------
    labels : ndarray (H, W) of int, or None
        None gives a grey placeholder of ``shape``.
    shape : (H, W), optional
        Needed only when ``labels`` is None.
    """
    if labels is None:
        if shape is None:
            raise ValueError("colorize(None) needs a shape")
        return np.full((*shape, 3), 200, np.uint8)
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {lab.shape}")
    valid = lab >= 0
    values, inverse = np.unique(np.where(valid, lab, -1), return_inverse=True)
    colors = _palette(len(values))
    out = colors[inverse.reshape(lab.shape)]
    out[~valid] = 0
    return out


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: Any) -> tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def comparison_grid(
    rows: Sequence[dict[str, Any]],
    path: str | os.PathLike[str],
    *,
    tile_width: int = 240,
) -> Path:
    """Write a PNG grid: one row per image, columns image | annotation | guide | result.

    Parameters
    ----------
    rows : sequence of dict
        Each with ``image`` (H, W, 3 uint8), ``annotation`` (H, W labels), ``guide``
        (H, W labels or None), ``result`` (H, W labels) and ``title`` (str, shown above
        the row, e.g. id and scores; one text line per ``"\\n"``-separated part).
    path : path
        Destination PNG (written atomically).
    tile_width : int
        Width of each tile in pixels (heights keep the aspect ratio).

    Returns
    -------
    Path
    """
    if not rows:
        raise ValueError("comparison_grid needs at least one row")
    font, small = _font(16), _font(13)
    headers = ["image", "annotation", "guide", "result"]
    pad, header_h, line_h = 8, 26, 18
    tiles_per_row = []
    for r in rows:
        img = np.asarray(r["image"])
        h, w = img.shape[:2]
        th = max(1, round(tile_width * h / w))
        tiles = [
            img,
            colorize(r["annotation"]),
            colorize(r.get("guide"), (h, w)),
            colorize(r["result"]),
        ]
        pil = [Image.fromarray(t).resize((tile_width, th), Image.NEAREST) for t in tiles]
        if r.get("guide") is None:
            d = ImageDraw.Draw(pil[2])
            d.text(
                (tile_width // 2, th // 2), "no guide", fill=(60, 60, 60), font=font, anchor="mm"
            )
        tiles_per_row.append((r.get("title", ""), pil, th))
    width = pad + 4 * (tile_width + pad)

    def title_h(title: str) -> int:
        return 4 + line_h * len(title.split("\n"))

    height = header_h + sum(title_h(t) + th + pad for t, _, th in tiles_per_row)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, name in enumerate(headers):
        x = pad + c * (tile_width + pad) + tile_width // 2
        draw.text((x, header_h // 2), name, fill=(0, 0, 0), font=font, anchor="mm")
    y = header_h
    for title, pil, th in tiles_per_row:
        for k, line in enumerate(title.split("\n")):
            yc = y + 2 + line_h * k + line_h // 2
            draw.text((pad, yc), line, fill=(0, 0, 0), font=small, anchor="lm")
        y += title_h(title)
        for c, tile in enumerate(pil):
            canvas.paste(tile, (pad + c * (tile_width + pad), y))
        y += th + pad
    return _save_png(canvas, path)


def _save_png(image: Image.Image, path: str | os.PathLike[str]) -> Path:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    from dynaguide.io import write_atomic

    return Path(write_atomic(path, buf.getvalue()))


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering [lo, hi] (steps 1, 2, 2.5 or 5 x 10^k)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step + 1e-9) * step
    end = math.ceil(hi / step - 1e-9) * step
    count = max(1, round((end - start) / step))
    return [round(start + i * step, 10) for i in range(count + 1)]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Tick exponents for a log10 axis: whole decades, or 1-2-5 steps within one decade."""
    first, last = math.floor(lo + 1e-9), math.ceil(hi - 1e-9)
    if last - first >= 2:
        step = max(1, math.ceil((last - first) / 6))
        return [float(e) for e in range(first, last + 1, step)]
    values = [m * 10.0**e for e in range(first - 1, last + 1) for m in (1, 2, 5)]
    inside = [math.log10(v) for v in values if lo - 1e-9 <= math.log10(v) <= hi + 1e-9]
    below = [math.log10(v) for v in values if math.log10(v) < lo - 1e-9]
    above = [math.log10(v) for v in values if math.log10(v) > hi + 1e-9]
    return ([below[-1]] if below else []) + inside + ([above[0]] if above else [])


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.2g}"
    return f"{v:g}"


def _panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    series: Sequence[tuple[str, Sequence[float]]],
    *,
    title: str,
    ylabel: str,
    log_y: bool = False,
) -> None:
    """Draw one line chart into ``box`` = (left, top, right, bottom) of the canvas."""
    font, small = _font(15), _font(12)
    left, top, right, bottom = box
    ml, mr, mt, mb = 64, 12, 26, 40  # margins: tick labels left, title top, x label bottom
    x0, y0, x1, y1 = left + ml, top + mt, right - mr, bottom - mb
    draw.text(((x0 + x1) // 2, top + mt // 2), title, fill=(0, 0, 0), font=font, anchor="mm")
    data = [(n, np.asarray(v, dtype=np.float64)) for n, v in series if len(v)]
    n_max = max((len(v) for _, v in data), default=1)
    vals = np.concatenate([v[np.isfinite(v)] for _, v in data]) if data else np.zeros(1)
    if log_y:
        vals = vals[vals > 0]
    if vals.size == 0:
        vals = np.ones(1)
    f = (lambda a: np.log10(np.maximum(a, 1e-12))) if log_y else (lambda a: a)
    lo, hi = float(f(vals).min()), float(f(vals).max())
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    yt = _log_ticks(lo, hi) if log_y else nice_ticks(lo, hi, 5)
    lo, hi = min(lo, yt[0]), max(hi, yt[-1])
    xt = nice_ticks(0, max(1, n_max - 1), 6)
    xmax = max(xt[-1], 1)

    def sx(i: float) -> float:
        return x0 + (x1 - x0) * i / xmax

    def sy(v: float) -> float:
        return y1 - (y1 - y0) * (v - lo) / (hi - lo)

    for t in yt:  # grid + y tick labels
        y = sy(t)
        draw.line([(x0, y), (x1, y)], fill=(225, 225, 225))
        label = _fmt(10**t) if log_y else _fmt(t)
        draw.text((x0 - 6, y), label, fill=(0, 0, 0), font=small, anchor="rm")
    for t in xt:
        x = sx(t)
        draw.line([(x, y1), (x, y1 + 4)], fill=(0, 0, 0))
        draw.text((x, y1 + 6), _fmt(t), fill=(0, 0, 0), font=small, anchor="ma")
    draw.rectangle([x0, y0, x1, y1], outline=(0, 0, 0))
    draw.text(((x0 + x1) // 2, bottom - 6), "iteration", fill=(0, 0, 0), font=small, anchor="md")
    draw.text((left + 4, y0 - 4), ylabel, fill=(0, 0, 0), font=small, anchor="ld")
    for k, (_, v) in enumerate(data):
        fv = f(v)
        pts = [(sx(i), sy(float(fv[i]))) for i in range(len(v)) if np.isfinite(fv[i])]
        color = _LINE_COLORS[k % len(_LINE_COLORS)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        elif pts:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
    # legend, top-right inside the axes
    if data:
        lw = max(_text_size(draw, n, small)[0] for n, _ in data) + 34
        lx, ly = x1 - lw - 6, y0 + 6
        draw.rectangle(
            [lx, ly, x1 - 6, ly + 16 * len(data) + 6], fill=(255, 255, 255), outline=(150, 150, 150)
        )
        for k, (n, _) in enumerate(data):
            yy = ly + 11 + 16 * k
            draw.line(
                [(lx + 6, yy), (lx + 24, yy)], fill=_LINE_COLORS[k % len(_LINE_COLORS)], width=3
            )
            draw.text((lx + 30, yy), n, fill=(0, 0, 0), font=small, anchor="lm")


def history_plot(
    histories: Sequence[tuple[str, dict[str, Sequence[float]]]],
    path: str | os.PathLike[str],
    *,
    width: int = 900,
    panel_height: int = 320,
) -> Path:
    """Write a PNG with two panels: loss (log scale) and K over the iterations.

    Parameters
    ----------
    histories : sequence of (name, history)
        ``history`` has ``"loss"`` and ``"n_labels"`` lists (``Segmentation.history``);
        at most 10 lines are distinguishable.
    path : path
        Destination PNG (written atomically).

    Returns
    -------
    Path
    """
    if not histories:
        raise ValueError("history_plot needs at least one history")
    canvas = Image.new("RGB", (width, 2 * panel_height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    loss = [(n, list(h.get("loss", []))) for n, h in histories]
    k = [(n, list(h.get("n_labels", []))) for n, h in histories]
    positive = all(all(v > 0 for v in s) for _, s in loss if s)
    _panel(
        draw,
        (0, 0, width, panel_height),
        loss,
        title="training loss",
        ylabel="loss" + (" (log)" if positive else ""),
        log_y=positive,
    )
    _panel(
        draw, (0, panel_height, width, 2 * panel_height), k, title="number of labels K", ylabel="K"
    )
    return _save_png(canvas, path)
