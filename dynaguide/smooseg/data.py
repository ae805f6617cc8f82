"""SmooSeg data: five-crop training samples from a folder of images, a resumable sampler,
and the evaluation transform.

Training follows the STEGO / SmooSeg data preparation: each image gives five crops (the
four corners and the centre) whose sides are ``crop_ratio`` (0.5) of the image's, each
resized so its short side is ``resolution`` (224) and centre-cropped to a square. Crops are
made on the fly rather than written to disk; the result is the same. An image that cannot
be read is not fatal: its sample comes back as an error message, the batch is built from
the others and the training loop reports it.

Evaluation resizes the short side to ``resolution`` (320) and centre-crops a square, the
mask with nearest-neighbour resampling.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from dynaguide.errors import first_line

__all__ = [
    "FiveCropDataset",
    "ResumableSampler",
    "collate_crops",
    "five_crop_boxes",
    "resize_center_crop",
    "to_tensor",
]


def five_crop_boxes(height: int, width: int, ratio: float) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right) of the four corner crops and the centre crop, each
    ``round(ratio * side)`` pixels per side (at least 1)."""
    ch, cw = max(1, round(height * ratio)), max(1, round(width * ratio))
    top, left = (height - ch) // 2, (width - cw) // 2
    corners = [(0, 0), (0, width - cw), (height - ch, 0), (height - ch, width - cw)]
    return [(t, s, t + ch, s + cw) for t, s in [*corners, (top, left)]]


def resize_center_crop(image: np.ndarray, resolution: int, *, nearest: bool = False) -> np.ndarray:
    """Resize so the short side is ``resolution`` (PIL bilinear, or nearest for label maps)
    and take the central ``resolution`` x ``resolution`` square."""
    h, w = image.shape[:2]
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    resample = Image.NEAREST if nearest else Image.BILINEAR
    if image.dtype == np.uint8 or image.ndim == 3:
        resized = np.asarray(Image.fromarray(image).resize((nw, nh), resample=resample))
    else:  # 16-bit / int masks: resize the index map through an int32 image
        resized = np.asarray(
            Image.fromarray(image.astype(np.int32)).resize((nw, nh), resample=Image.NEAREST)
        ).astype(image.dtype)
    top, left = (nh - resolution) // 2, (nw - resolution) // 2
    return np.ascontiguousarray(resized[top : top + resolution, left : left + resolution])


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 RGB in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0


class FiveCropDataset(Dataset):
    """Training samples: ``crops_per_image`` crops of every image in a folder.

    Parameters
    ----------
    paths : sequence of path, or a folder
        The images (a folder is listed with :func:`dynaguide.io.list_images`).
    resolution : int
        Side of the square samples (224).
    crop_ratio : float
        Side of the crops relative to the image (0.5).
    five_crop : bool
        Five crops per image (True) or the whole image once.

    Items are ``{"image": (3, r, r) float tensor}`` or, for an unreadable image,
    ``{"error": "<path>: <reason>"}``.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike] | str | os.PathLike,
        *,
        resolution: int = 224,
        crop_ratio: float = 0.5,
        five_crop: bool = True,
    ) -> None:
        from dynaguide.io import list_images

        if isinstance(paths, (str, os.PathLike)):
            self.paths = list_images(paths)
        else:
            self.paths = [Path(p) for p in paths]
            if not self.paths:
                raise ValueError("FiveCropDataset: no images given")
        if (
            isinstance(resolution, bool)
            or not isinstance(resolution, int)
            or not 8 <= resolution <= 4096
        ):
            raise ValueError(f"resolution must be an int in [8, 4096], got {resolution!r}")
        if not (isinstance(crop_ratio, (int, float)) and 0.05 <= crop_ratio <= 1.0):
            raise ValueError(f"crop_ratio must be a number in [0.05, 1], got {crop_ratio!r}")
        self.resolution, self.crop_ratio = resolution, float(crop_ratio)
        self.crops = 5 if five_crop else 1

    def __len__(self) -> int:
        """Number of samples (images times crops)."""
        return len(self.paths) * self.crops

    def __getitem__(self, index: int) -> dict[str, Any]:
        """One crop, or the reason its image could not be read."""
        from dynaguide.io import load_image

        i, c = divmod(int(index), self.crops)
        path = self.paths[i]
        try:
            image = load_image(path)
        except Exception as exc:  # a corrupt or unreadable file: reported, not fatal
            return {"error": f"{path}: {first_line(exc)}"}
        if self.crops > 1:
            t, s, b, r = five_crop_boxes(image.shape[0], image.shape[1], self.crop_ratio)[c]
            image = image[t:b, s:r]
        return {"image": to_tensor(resize_center_crop(image, self.resolution))}


def collate_crops(items: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"images": (n, 3, r, r) or None, "skipped": [error messages]}``."""
    good = [it["image"] for it in items if "image" in it]
    return {
        "images": torch.stack(good) if good else None,
        "skipped": [it["error"] for it in items if "error" in it],
    }


class ResumableSampler(Sampler[int]):
    """An endless stream of sample indices, one seeded permutation per epoch, that can start
    anywhere: ``start`` samples of this rank's stream are skipped without loading them.

    With ``world_size`` ranks each epoch's permutation is cut to a multiple of
    ``world_size`` and rank ``r`` takes every ``world_size``-th index from ``r``.
    """

    def __init__(
        self, n: int, *, seed: int, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if n < world_size:
            raise ValueError(f"{n} samples cannot be shared by {world_size} processes")
        self.n, self.seed, self.start = n, int(seed), int(start)
        self.rank, self.world_size = rank, world_size
        self.per_epoch = n // world_size

    def epoch_indices(self, epoch: int) -> list[int]:
        """This rank's indices in ``epoch``."""
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n, generator=gen)[: self.per_epoch * self.world_size]
        return perm[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        """Indices from sample ``start`` on, forever."""
        epoch, offset = divmod(self.start, self.per_epoch)
        while True:
            yield from self.epoch_indices(epoch)[offset:]
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # an endless sampler still reports one epoch
        """Samples per epoch on this rank."""
        return self.per_epoch
