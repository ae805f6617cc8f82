"""Prediction with a trained SmooSeg head: :class:`SmooSegPredictor` and :func:`predict_folder`.

An image is resized so its short side is ``resolution`` (320), its patch features are
computed (and those of its mirror image: flip test-time augmentation averages the two
codes), the codes are upsampled bilinearly to the image's own size and each pixel takes
``argmax log_softmax(2 s_glob)``. Class ids are the same in every image (0 .. K-1).

:func:`predict_folder` (``dynaguide smooseg predict CKPT IN OUT``) writes the output sets
of ``dynaguide segment``: ``<stem>.labels.png``, ``<stem>.overlay.png``, ``<stem>.json``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dynaguide.segment_run import SegmentRun
from dynaguide.smooseg.model import SmooSegConfig, SmooSegHead
from dynaguide.smooseg.train import load_checkpoint

__all__ = ["SmooSegPredictor", "predict_folder"]


class SmooSegPredictor:
    """A SmooSeg head and its backbone, ready to label images.

    Parameters
    ----------
    checkpoint : path
        ``checkpoint.pt`` written by :func:`dynaguide.smooseg.train.train`.
    backbone : optional
        The backbone (name, path or object); default: the one recorded in the checkpoint.
        It must match the checkpoint's (name, feature size and patch size).
    resolution : int
        Short side of the network input (320).
    flip : bool
        Horizontal-flip test-time augmentation.
    crf_iterations : int
        > 0: refine the class probabilities with that many mean-field iterations of a dense
        CRF (:func:`dynaguide.crf.dense_crf`, the paper's settings: 10 at evaluation);
        0 (default): the plain argmax.
    device : {"cpu", "cuda", "auto"}

    Raises
    ------
    ValueError
        The backbone does not match the checkpoint's; the message names both.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        backbone: Any = None,
        resolution: int = 320,
        flip: bool = True,
        crf_iterations: int = 0,
        device: str = "cpu",
    ) -> None:
        from dynaguide.errors import ModelFileError
        from dynaguide.smooseg.backbones import load_backbone

        if (
            isinstance(resolution, bool)
            or not isinstance(resolution, int)
            or not 8 <= resolution <= 4096
        ):
            raise ValueError(f"resolution must be an int in [8, 4096], got {resolution!r}")
        if (
            isinstance(crf_iterations, bool)
            or not isinstance(crf_iterations, int)
            or not 0 <= crf_iterations <= 1000
        ):
            raise ValueError(f"crf_iterations must be an int in [0, 1000], got {crf_iterations!r}")
        self.crf_iterations = crf_iterations
        self.path = Path(checkpoint)
        ckpt = load_checkpoint(self.path)
        saved = ckpt["backbone"]
        if backbone is None:
            if not saved.get("spec"):
                raise ValueError(
                    f"{self.path} was trained on backbone {saved['name']!r}, which cannot be rebuilt "
                    "from the checkpoint; pass backbone=..."
                )
            backbone = saved["spec"]
        dev = "cuda" if device == "auto" and torch.cuda.is_available() else device
        self.device = torch.device("cpu" if dev == "auto" else dev)
        self.backbone = load_backbone(
            backbone, device="cuda" if self.device.type == "cuda" else "cpu"
        )
        got = (str(self.backbone.name), int(self.backbone.dim), int(self.backbone.patch_size))
        if got != (saved["name"], saved["dim"], saved["patch_size"]):
            raise ValueError(
                f"{self.path} was trained on backbone {saved['name']!r} (dim {saved['dim']}, patch "
                f"{saved['patch_size']}), not on {got[0]!r} (dim {got[1]}, patch {got[2]})"
            )
        try:
            self.config = SmooSegConfig(**ckpt["config"])
            self.head = SmooSegHead(self.config)
            self.head.load_state_dict(ckpt["head"])
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ModelFileError(f"{self.path}: the head cannot be rebuilt ({exc})") from None
        self.head.to(self.device).eval()
        self.resolution, self.flip = resolution, bool(flip)
        self.n_classes = self.config.n_classes
        self.step = int(ckpt["step"])

    def log_probs(self, images: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """``log_softmax(2 s_glob)`` (B, K, h, w) of (B, 3, H, W) RGB in [0, 1] at the codes'
        upsampled ``size`` (default: the input's H, W)."""
        size = tuple(images.shape[-2:]) if size is None else size
        with torch.no_grad():
            feats = self.backbone(images).to(self.device)
            z = self.head.codes(feats, flip=False)
            if self.flip:
                mirrored = self.backbone(images.flip(-1)).to(self.device)
                z = (z + self.head.codes(mirrored, flip=False).flip(-1)) / 2
            z = F.interpolate(z, size=size, mode="bilinear", align_corners=False)
            return self.head.class_log_probs(z)

    def network_input(self, image: np.ndarray) -> torch.Tensor:
        """(1, 3, h, w) tensor of an (H, W, 3) uint8 image with its short side at ``resolution``."""
        from dynaguide.smooseg.data import to_tensor

        h, w = image.shape[:2]
        scale = self.resolution / min(h, w)
        x = to_tensor(image)[None]
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        return F.interpolate(
            x, size=size, mode="bilinear", align_corners=False, antialias=scale < 1
        )

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W) int32 class ids of an (H, W, 3) uint8 RGB image."""
        from dynaguide.guidance.base import check_rgb_image

        image = check_rgb_image(image, "SmooSeg prediction")
        lp = self.log_probs(self.network_input(image), size=image.shape[:2])
        return self.labels(lp[0], image)

    def labels(self, log_probs: torch.Tensor, image: np.ndarray) -> np.ndarray:
        """(H, W) int32 class ids from (K, H, W) log-probabilities of ``image`` (H, W, 3)
        uint8: their argmax, after the dense CRF when ``crf_iterations > 0``."""
        if self.crf_iterations > 0:
            from dynaguide.crf import dense_crf

            probs = log_probs.float().exp().cpu().numpy()
            marginals = dense_crf(image, probs, iterations=self.crf_iterations)
            return marginals.argmax(0).astype(np.int32)
        return log_probs.argmax(0).cpu().numpy().astype(np.int32)


class _PredictRun(SegmentRun):
    """``dynaguide segment``'s loop, with SmooSeg prediction in place of the refinement."""

    def __init__(
        self, predictor: SmooSegPredictor, fingerprint: str, settings: dict, locks: dict
    ) -> None:
        super().__init__(fingerprint, settings, {}, locks)
        self.predictor = predictor

    def _segment(self, image: np.ndarray, name: str) -> Any:
        from dynaguide.segmentation import Segmentation

        t0 = time.perf_counter()
        labels = self.predictor(image)
        p = self.predictor
        return Segmentation(
            labels=labels,
            n_labels=p.n_classes,
            n_iter=0,
            history={},
            guide_labels=None,
            image=image,
            config={"method": "smooseg", **p.config.to_dict()},
            seconds=time.perf_counter() - t0,
            stop_reason="smooseg prediction",
            name=name,
            device=str(p.device),
            extra={
                "checkpoint": str(p.path),
                "step": p.step,
                "backbone": p.backbone.name,
                "resolution": p.resolution,
            },
        )


def predict_folder(
    predictor: SmooSegPredictor,
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    recursive: bool = False,
    resume: bool = False,
    quiet: bool = False,
) -> int:
    """Label every image of ``source`` (a file or a folder) into ``out`` as ``dynaguide segment``
    does; returns the exit code (0 all done, 1 some image failed)."""
    from dynaguide.manifest import file_digest
    from dynaguide.output_sets import plan_outputs, prepare_output_folders, settings_fingerprint

    source, out = Path(source), Path(out)
    plan = plan_outputs(source, out, recursive=recursive)
    settings = {
        "smooseg": {
            "checkpoint_sha256": file_digest(predictor.path)[1],
            "resolution": predictor.resolution,
            "flip": predictor.flip,
            "backbone": predictor.backbone.name,
        }
    }
    locks = prepare_output_folders(plan)
    run = _PredictRun(predictor, settings_fingerprint(settings), settings, locks)
    try:
        return run.all(plan, resume=resume, quiet=quiet, out=out)
    finally:
        for lock in locks.values():
            lock.close()
