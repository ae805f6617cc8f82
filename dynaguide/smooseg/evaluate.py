"""Scoring a SmooSeg checkpoint on an ``images/`` + ``masks/`` folder: :func:`evaluate`.

The protocol of STEGO / SmooSeg (and PiCIE before them): every image and its mask are
resized so the short side is ``resolution`` (320; the mask with nearest neighbours) and
centre-cropped to a square; the predictions (flip test-time augmentation, codes upsampled
to the crop) are accumulated into ONE confusion matrix over the whole dataset, ONE
Hungarian matching maps clusters to classes, and pixel accuracy and mIoU follow
(:func:`dynaguide.eval.metrics.coco_scores`). Mask values equal to ``ignore_index`` (255)
are not scored.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from dynaguide.smooseg.predict import SmooSegPredictor

__all__ = ["evaluate"]


def evaluate(
    predictor: SmooSegPredictor,
    dataset: str | os.PathLike,
    *,
    resolution: int = 320,
    n_gt_classes: int | None = None,
    ignore_index: int = 255,
    limit: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Dataset-level pixel accuracy and mIoU of ``predictor`` on ``dataset`` (a folder with
    ``images/`` and ``masks/``, paired by file stem).

    Parameters
    ----------
    n_gt_classes : int, optional
        Number of ground-truth classes; default: the largest mask value other than
        ``ignore_index``, plus one.

    Returns
    -------
    dict
        :func:`~dynaguide.eval.metrics.coco_scores`'s result plus ``protocol``, ``images``
        and ``checkpoint``.

    Raises
    ------
    DatasetError
        A missing or empty folder, an unreadable mask (the message names the file).
    ValueError
        Mask values outside ``[0, n_gt_classes)`` other than ``ignore_index``.
    """
    from tqdm import tqdm

    from dynaguide.eval.datasets import FolderDataset, load_mask
    from dynaguide.eval.metrics import coco_scores
    from dynaguide.io import load_image
    from dynaguide.smooseg.data import resize_center_crop, to_tensor

    data = FolderDataset(dataset, on_missing="warn")
    items = list(data)[: limit or None]
    if not items:
        raise ValueError(f"{dataset}: no image with a mask to score")
    preds, gts = [], []
    for item in tqdm(items, disable=not progress, unit="img"):
        image = resize_center_crop(load_image(item.image_path), resolution)
        mask = load_mask(item.annotation_path)
        if mask.shape != load_image_shape(item.image_path):
            raise ValueError(
                f"{item.annotation_path}: mask of shape {mask.shape} does not match its image "
                f"{item.image_path} of shape {load_image_shape(item.image_path)}"
            )
        mask = resize_center_crop(mask, resolution, nearest=True).astype(np.int64)
        lp = predictor.log_probs(to_tensor(image)[None])
        preds.append(predictor.labels(lp[0], image))
        gts.append(mask)
    if n_gt_classes is None:
        top = max(int(g[g != ignore_index].max(initial=-1)) for g in gts)
        n_gt_classes = max(top + 1, 1)
    scores = coco_scores(
        preds,
        gts,
        n_classes=n_gt_classes,
        n_clusters=predictor.n_classes,
        ignore_index=ignore_index,
    )
    scores["protocol"] = {
        "matching": "one Hungarian matching over the dataset",
        "resolution": resolution,
        "crop": "short side resized, centre square",
        "flip_tta": predictor.flip,
        "crf_iterations": predictor.crf_iterations,
        "ignore_index": ignore_index,
        "n_gt_classes": n_gt_classes,
        "n_clusters": predictor.n_classes,
    }
    scores["images"] = [item.id for item in items]
    scores["checkpoint"] = str(predictor.path)
    return scores


def load_image_shape(path: os.PathLike) -> tuple[int, int]:
    """(H, W) of an image file without decoding its pixels."""
    from PIL import Image

    with Image.open(path) as im:
        return im.height, im.width
