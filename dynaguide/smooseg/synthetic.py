"""A synthetic dataset with known classes, for testing and measuring SmooSeg without data.

Every image is a random Voronoi partition of the plane into cells; each cell takes one of
``n_classes`` classes and is filled with that class's texture: a colour and a pattern
(horizontal stripes, vertical stripes, a checkerboard, diagonal stripes, fine noise, a flat
tone, ... cycling when there are more classes), with per-image brightness jitter and
per-pixel noise. The mask holds the class ids (0 .. n_classes - 1). Same arguments, same
files.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from dynaguide.writing import save_label_png, save_rgb_png

__all__ = ["textured_image", "write_textured_dataset"]

_COLOURS = np.array(
    [
        [150, 110, 90],
        [90, 140, 110],
        [110, 110, 160],
        [170, 160, 80],
        [120, 120, 120],
        [160, 90, 140],
    ],
    dtype=np.float64,
)


def _pattern(kind: int, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A texture in [-1, 1] of the given kind over pixel coordinates."""
    period = 6.0
    kind %= 6
    if kind == 0:
        return np.sign(np.sin(2 * np.pi * yy / period))
    if kind == 1:
        return np.sign(np.sin(2 * np.pi * xx / period))
    if kind == 2:
        return np.sign(np.sin(np.pi * yy / 4) * np.sin(np.pi * xx / 4))
    if kind == 3:
        return np.sign(np.sin(2 * np.pi * (xx + yy) / (period * 1.4)))
    if kind == 4:
        return rng.uniform(-1, 1, yy.shape)
    return np.zeros(yy.shape)


def textured_image(
    height: int, width: int, *, n_classes: int = 3, n_cells: int = 6, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One (H, W, 3) uint8 image and its (H, W) uint8 class mask."""
    if not 2 <= n_classes <= 255:
        raise ValueError(f"n_classes must be in [2, 255], got {n_classes!r}")
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    centres = rng.uniform((0, 0), (height, width), size=(n_cells, 2))
    d = (yy[None] - centres[:, 0, None, None]) ** 2 + (xx[None] - centres[:, 1, None, None]) ** 2
    cell = d.argmin(0)
    classes = rng.integers(0, n_classes, n_cells)
    classes[: min(n_classes, n_cells)] = rng.permutation(n_classes)[: min(n_classes, n_cells)]
    mask = classes[cell].astype(np.uint8)
    image = np.zeros((height, width, 3))
    gain = rng.uniform(0.85, 1.15)
    for k in range(n_classes):
        sel = mask == k
        if not sel.any():
            continue
        colour = _COLOURS[k % len(_COLOURS)] * gain
        texture = _pattern(k, yy, xx, rng)[..., None] * 45.0
        image[sel] = (colour + texture)[sel]
    image += rng.normal(0, 8.0, image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), mask


def write_textured_dataset(
    root: str | os.PathLike,
    *,
    n_images: int = 24,
    size: tuple[int, int] = (96, 128),
    n_classes: int = 3,
    n_cells: int = 6,
    seed: int = 0,
) -> Path:
    """Write ``root/images/NNN.png`` and ``root/masks/NNN.png``; returns ``root``."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        image, mask = textured_image(
            *size, n_classes=n_classes, n_cells=n_cells, seed=seed * 10_007 + i
        )
        save_rgb_png(root / "images" / f"{i:03d}.png", image)
        save_label_png(root / "masks" / f"{i:03d}.png", mask)
    return root


def main(argv: list[str] | None = None) -> int:
    """``python -m dynaguide.smooseg.synthetic ROOT [--n-images N] [--height H] [--width W]
    [--n-classes K] [--seed S]``: write a dataset."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m dynaguide.smooseg.synthetic")
    p.add_argument("root", type=Path)
    p.add_argument("--n-images", type=int, default=24)
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--n-classes", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    write_textured_dataset(
        a.root, n_images=a.n_images, size=(a.height, a.width), n_classes=a.n_classes, seed=a.seed
    )
    print(f"wrote {a.n_images} images and masks under {a.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
