"""The one per-image pipeline around the refinement: prepare, then finish.

Data flows one way: load -> fit size -> guide -> (refine) -> full-size labels ->
post-process -> :class:`~dynaguide.segmentation.Segmentation`. :func:`prepare` does
everything before the refinement and :func:`finish` everything after it;
:func:`dynaguide.segment` and the batched :func:`dynaguide.segment_batch` both call them,
so one image gets the same treatment on every path.

Sizes: the image is refined at :func:`refinement_size` (``scale``, then the ``max_pixels``
cap, then the ``work_pixels`` working-size target, then whatever the free memory of the
device allows); the labels are carried back to the full size by nearest-neighbour label
resizing or, with ``upsample="bilinear"``, by resizing the network's response map and
taking the argmax at full resolution (in row bands, so a 12 MP photo needs no more
than a few hundred MB).
"""

from __future__ import annotations

import math
import numbers
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dynaguide.config import RefineConfig
from dynaguide.errors import RefinementDivergedError
from dynaguide.guidance import compute_guide_labels
from dynaguide.io import load_image, reduce_for_resize
from dynaguide.label_ops import relabel_compact
from dynaguide.postprocess import postprocess
from dynaguide.refine import RefineResult, image_tensor
from dynaguide.segmentation import Segmentation
from dynaguide.settings import DEFAULT

#: Output pixels per band of the bilinear upsampling (bounds its memory).
_BAND_PIXELS = 1 << 20


@dataclass
class Prepared:
    """One input, loaded, sized and guided, waiting for its refinement."""

    rgb: np.ndarray  # (H, W, 3) uint8, full size
    work: np.ndarray  # (h, w, 3) uint8, refinement size
    guide_labels: np.ndarray | None  # (h, w) int32
    guide_name: str | None
    name: str | None  # the caller's name for the input (None: unnamed)
    label: str  # what messages call the input
    is_path: bool = False
    started: float = field(default_factory=time.perf_counter)
    notes: dict[str, Any] = field(default_factory=dict)


def refinement_size(
    height: int,
    width: int,
    *,
    scale: float | None,
    max_pixels: int | None,
    work_pixels: int | None = None,
) -> tuple[int, int]:
    """Size the image is refined at: ``scale`` applied, then capped at ``max_pixels``
    and at ``work_pixels`` (area-preserving factors, at least 2x2)."""
    if scale is not None:
        if isinstance(scale, bool) or not (isinstance(scale, numbers.Real) and 0 < scale <= 1):
            raise ValueError(f"scale must be a number in (0, 1], got {scale!r}")
        height, width = max(2, round(height * scale)), max(2, round(width * scale))
    for cap in (max_pixels, work_pixels):
        if cap is not None and height * width > cap:
            f = math.sqrt(cap / (height * width))
            height, width = max(2, math.floor(height * f)), max(2, math.floor(width * f))
    return height, width


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Anti-aliased bilinear resize of an (H, W, 3) uint8 image to ``size`` (h, w)."""
    if image.shape[:2] == size:
        return image
    from skimage.transform import resize

    image = reduce_for_resize(image, size)  # bounded memory for very large images
    out = resize(image, size, order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer label map (exact for any int32 ids)."""
    if labels.shape == size:
        return labels
    h, w = labels.shape
    rows = np.minimum(((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64), w - 1)
    return labels[rows[:, None], cols[None, :]]


def fit_to_memory(
    size: tuple[int, int], config: RefineConfig, device: torch.device, label: str
) -> tuple[int, int]:
    """``size``, or the largest size of the same aspect whose refinement fits in 60% of
    the free memory of ``device`` (with a warning naming the input).

    With ``config.max_pixels=None`` the caller asked for the full size: a refinement that
    does not fit raises :class:`MemoryError` with advice instead.
    """
    from dynaguide.batch_memory import estimate_refine_bytes, free_memory

    h, w = size
    if config.max_iter == 0:  # no network: only the guide and the post-processing run
        return size
    free = free_memory(device)
    need = estimate_refine_bytes(h, w, config)
    if need <= 0.6 * free:
        return size
    if config.max_pixels is None:
        raise MemoryError(
            f"{label}: refining at {w}x{h} needs about {need / 2**30:.1f} GiB but only "
            f"{free / 2**30:.1f} GiB is free on {device}; pass scale=, max_pixels= "
            "(--max-pixels) or work_pixels= to refine at a smaller size"
        )
    f = math.sqrt(0.6 * free / need)
    fitted = max(2, math.floor(h * f)), max(2, math.floor(w * f))
    small = estimate_refine_bytes(*fitted, config)
    if small > 0.9 * free:
        raise MemoryError(
            f"{label}: refining needs about {small / 2**30:.2f} GiB even at "
            f"{fitted[1]}x{fitted[0]}, but only {free / 2**30:.2f} GiB is free on {device}"
        )
    warnings.warn(
        f"{label}: refining at {fitted[1]}x{fitted[0]} instead of {w}x{h} to fit the "
        f"{free / 2**30:.1f} GiB free on {device} (set work_pixels or max_pixels to choose)",
        stacklevel=3,
    )
    return fitted


def prepare(
    image: Any,
    config: RefineConfig,
    *,
    guidance: Any = DEFAULT,
    guidance_options: dict[str, Any] | None = None,
    scale: float | None = None,
    name: str | None = None,
    label: str | None = None,
    device: torch.device,
) -> Prepared:
    """Load ``image``, choose its refinement size and compute its guide labels."""
    started = time.perf_counter()
    if label is None:
        label = name or (str(image) if isinstance(image, (str, os.PathLike)) else "image")
    rgb = load_image(image, name=name)
    full = rgb.shape[:2]
    size = refinement_size(
        *full, scale=scale, max_pixels=config.max_pixels, work_pixels=config.work_pixels
    )
    size = fit_to_memory(size, config, device, label)
    work = resize_image(rgb, size)
    if isinstance(guidance, str) and guidance == DEFAULT:
        guidance = config.default_guidance
        if guidance_options is None and config.default_guidance_options:
            guidance_options = dict(config.default_guidance_options)
    if isinstance(guidance, (np.ndarray, torch.Tensor)):
        if isinstance(guidance, torch.Tensor) and guidance.device.type == "meta":
            raise TypeError(f"guidance labels for {label}: a meta tensor holds no data")
        g = guidance.detach().cpu().numpy() if isinstance(guidance, torch.Tensor) else guidance
        g = np.asarray(g)
        if g.ndim == 3 and g.shape[-1] == 1:
            g = g[..., 0]
        if g.shape[:2] != full:
            raise ValueError(
                f"guidance labels for {label} have shape {g.shape}, expected the image's {full}"
            )
        guidance = resize_labels(g, size) if g.ndim == 2 else g
    guide_labels, guide_name = compute_guide_labels(
        guidance, work, options=guidance_options, name=label
    )
    is_path = isinstance(image, (str, os.PathLike))
    return Prepared(rgb, work, guide_labels, guide_name, name, label, is_path, started)


def deadline_of(prepared: Prepared, config: RefineConfig) -> float | None:
    """The ``time.perf_counter()`` value at which ``config.time_budget`` runs out."""
    if config.time_budget is None:
        return None
    return prepared.started + config.time_budget


@torch.no_grad()
def full_size_labels(result: RefineResult, prepared: Prepared, config: RefineConfig) -> np.ndarray:
    """(H, W) labels of the refinement at the input's full size.

    ``upsample="nearest"``: the refinement's labels resized. ``"bilinear"``: the trained
    network's response on the working image (BatchNorm as in training), resized
    bilinearly band by band and arg-maxed at full resolution.
    """
    full = prepared.rgb.shape[:2]
    work = prepared.work.shape[:2]
    model = result.model
    if config.upsample == "nearest" or full == work or model is None:
        return resize_labels(result.labels.cpu().numpy(), full)
    device = next(model.parameters()).device
    model.train(config.final_pass != "eval")
    response = model(image_tensor(prepared.work, config, device)).float()
    model.train()
    out = np.empty(full, dtype=np.int64)
    H, W = full
    band = max(1, _BAND_PIXELS // W)
    cols = (torch.arange(W, device=device, dtype=torch.float32) + 0.5) * (2.0 / W) - 1.0
    for r0 in range(0, H, band):
        r1 = min(H, r0 + band)
        rows = (torch.arange(r0, r1, device=device, dtype=torch.float32) + 0.5) * (2.0 / H) - 1.0
        grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij")[::-1], dim=-1)[None]
        scores = torch.nn.functional.grid_sample(
            response, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        out[r0:r1] = scores[0].argmax(dim=0).cpu().numpy()
    return out


def finish(
    prepared: Prepared,
    result: RefineResult,
    config: RefineConfig,
    *,
    device: torch.device | str,
    seed: int,
    batched: bool = False,
) -> Segmentation:
    """Full-size, post-processed labels of ``result`` as a :class:`Segmentation`.

    Raises
    ------
    RefinementDivergedError
        When the loss history holds NaN or infinity.
    """
    if not np.all(np.isfinite(result.loss_history)):
        raise RefinementDivergedError(
            f"{prepared.label}: refinement diverged: the loss is NaN or infinite "
            f"(lr={config.lr:g}); lower lr or check the weights of the losses"
        )
    labels = full_size_labels(result, prepared, config)
    labels = postprocess(
        labels,
        prepared.rgb,
        connectivity=config.connectivity,
        min_area=config.min_area,
        merge=config.merge,
        threshold=config.merge_threshold,
        crf_iterations=config.crf_iterations,
    )
    compact, k = relabel_compact(labels.astype(np.int64))
    full = prepared.rgb.shape[:2]
    guide = prepared.guide_labels
    extra: dict[str, Any] = {
        "guide": prepared.guide_name,
        "refine_size": list(prepared.work.shape[:2]),
        "opt_clusters": result.opt_clusters,
        "seed": seed,
        **prepared.notes,
    }
    if batched:
        extra["batched"] = True
    return Segmentation(
        labels=compact.astype(np.int32),
        n_labels=int(k),
        n_iter=result.n_iter,
        history={"loss": result.loss_history, "n_labels": result.k_history},
        guide_labels=None if guide is None else resize_labels(guide, full),
        image=prepared.rgb,
        config=config,
        seconds=result.seconds,
        stop_reason=result.stop_reason,
        name=prepared.name
        if prepared.name is not None
        else (prepared.label if prepared.is_path else None),
        device=str(device),
        extra=extra,
    )
