"""The public entry points: :func:`segment` and :func:`segment_batch`.

Data flows one way: load -> (downscale) -> guide -> refine -> label -> (upscale).
"""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import numpy as np
import torch

from dynaguide.batched import estimate_refine_bytes, free_memory
from dynaguide.config import RefineConfig, get_preset
from dynaguide.errors import RefinementDivergedError, as_int
from dynaguide.guidance import compute_guide_labels
from dynaguide.io import load_image, reduce_for_resize
from dynaguide.native import relabel_sequential
from dynaguide.refine import ProgressCallback, refine
from dynaguide.segmentation import Segmentation

DEFAULT_PRESET = "dynaguide"
DEFAULT = "default"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Validate a device request ("cpu", "cuda", "cuda:1", a torch.device, None -> cpu)."""
    try:
        dev = torch.device(device if device is not None else "cpu")
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"invalid device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} requested but CUDA is not available (torch {torch.__version__})"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; use 'cpu' or 'cuda[:N]'")
    return dev


def build_config(
    preset: str | RefineConfig = DEFAULT_PRESET, *, max_iter: int | None = None, **overrides: Any
) -> RefineConfig:
    """The preset (or config) with ``max_iter`` and other field overrides applied."""
    config = get_preset(preset)
    if max_iter is not None:
        overrides["max_iter"] = max_iter
    return config.replace(**overrides) if overrides else config


def refinement_size(
    height: int, width: int, *, scale: float | None, max_pixels: int | None
) -> tuple[int, int]:
    """Size the image is refined at: ``scale`` applied, then capped at ``max_pixels``."""
    if scale is not None:
        if isinstance(scale, bool) or not (isinstance(scale, numbers.Real) and 0 < scale <= 1):
            raise ValueError(f"scale must be a number in (0, 1], got {scale!r}")
        height, width = max(2, round(height * scale)), max(2, round(width * scale))
    if max_pixels is not None and height * width > max_pixels:
        f = math.sqrt(max_pixels / (height * width))
        height, width = max(2, math.floor(height * f)), max(2, math.floor(width * f))
    return height, width


def _resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if image.shape[:2] == size:
        return image
    from skimage.transform import resize

    image = reduce_for_resize(image, size)  # bounded memory for very large images
    out = resize(image, size, order=1, anti_aliasing=True, preserve_range=True)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-exact resize by index (torch's source rows and columns): any ids stay exact."""
    if labels.shape == size:
        return labels
    nearest = torch.nn.functional.interpolate

    def source(n: int, m: int) -> np.ndarray:
        grid = torch.arange(n, dtype=torch.float32)[None, None, None, :]  # exact: n < 2**24
        return nearest(grid, size=(1, m), mode="nearest-exact")[0, 0, 0].long().numpy()

    return labels[np.ix_(source(labels.shape[0], size[0]), source(labels.shape[1], size[1]))]


def _check_memory(
    size: tuple[int, int], config: RefineConfig, device: torch.device, name: str
) -> None:
    """Raise MemoryError with advice when one refinement clearly cannot fit."""
    h, w = size
    free = free_memory(device)
    need = estimate_refine_bytes(h, w, config)
    if need > 0.9 * free:
        raise MemoryError(
            f"{name}: refining at {w}x{h} needs about {need / 2**30:.1f} GiB but only "
            f"{free / 2**30:.1f} GiB is free on {device}; pass scale= or a smaller max_pixels"
        )


def guide_labels_for(
    guidance: Any,
    config: RefineConfig,
    work: np.ndarray,
    full: tuple[int, int],
    *,
    options: dict[str, Any] | None,
    label: str,
) -> tuple[np.ndarray | None, str | None]:
    """Guide labels at the refinement size of ``work`` for an image of size ``full``.

    ``"default"`` means the preset's guide; a label array or tensor must have the image's
    (H, W) (a trailing axis of 1 is dropped) and is resized by nearest neighbour; anything
    else goes to :func:`dynaguide.guidance.compute_guide_labels`.
    """
    if isinstance(guidance, str) and guidance == DEFAULT:
        guidance = config.default_guidance
    if isinstance(guidance, (np.ndarray, torch.Tensor)):
        if isinstance(guidance, torch.Tensor):
            if guidance.device.type == "meta":
                raise TypeError(f"guidance labels for {label}: a meta tensor holds no data")
            guidance = guidance.detach().cpu().numpy()
        g = guidance[..., 0] if guidance.ndim == 3 and guidance.shape[-1] == 1 else guidance
        if g.shape[:2] != full:
            raise ValueError(
                f"guidance labels for {label} have shape {g.shape}, expected the image's {full}"
            )
        guidance = _resize_labels(np.asarray(g), work.shape[:2]) if g.ndim == 2 else g
    return compute_guide_labels(guidance, work, options=options, name=label)


def segment(
    image: Any,
    *,
    preset: str | RefineConfig = DEFAULT_PRESET,
    guidance: Any = DEFAULT,
    guidance_options: dict[str, Any] | None = None,
    device: str | torch.device | None = "cpu",
    seed: int = 0,
    max_iter: int | None = None,
    scale: float | None = None,
    callback: ProgressCallback | None = None,
    name: str | None = None,
    amp: bool = False,
    cuda_graph: bool = False,
    **overrides: Any,
) -> Segmentation:
    """Segment one image without supervision.

    Parameters
    ----------
    image : path, PIL image, ndarray or tensor
        See :func:`dynaguide.io.load_image` for the accepted forms and the policy for
        grayscale, RGBA, 16-bit and float images.
    preset : str or RefineConfig
        ``"dynaguide"`` (default), ``"dfc"``, ``"dynaseg-scf"``, ``"dynaseg-fsf"`` or a
        ``*-reference`` variant; see :func:`dynaguide.presets`.
    guidance : "default", None, str, array, Guide or callable
        ``"default"`` uses the preset's default guide (``kmeans`` for ``dynaguide``,
        none for the others). A label array must have the image's (H, W).
    guidance_options : dict, optional
        Options for a named guide's factory.
    device : str or torch.device
    seed : int
        Seeds the network initialisation, in [0, 2**32) (numpy integers too); CPU results
        are deterministic per seed.
    max_iter : int, optional
        Overrides the preset's iteration budget.
    scale : float in (0, 1], optional
        Refine at a reduced size (labels are resized back to the image).
    callback : callable(iteration, loss, K), optional
    name : str, optional
        Name of the input used in messages and in the result.
    amp : bool
        bf16 autocast for the convolutions (faster on GPUs; changes results slightly).
    cuda_graph : bool
        Capture each iteration in a CUDA graph (CUDA devices only).
    **overrides
        Any :class:`RefineConfig` field, e.g. ``min_labels=5``.

    Returns
    -------
    Segmentation
        ``labels`` (H, W) int32, compact 0..K-1, at the input's full size.

    Examples
    --------
    >>> import numpy as np, dynaguide
    >>> img = np.zeros((32, 32, 3), np.uint8); img[:, 16:] = 255
    >>> seg = dynaguide.segment(img, guidance=None, max_iter=5)
    >>> seg.labels.shape
    (32, 32)
    """
    label = name or (str(image) if isinstance(image, (str, os.PathLike)) else "image")
    config = build_config(preset, max_iter=max_iter, **overrides)
    dev = resolve_device(device)
    seed = as_int(seed, "seed", minimum=0, maximum=2**32 - 1)
    rgb = load_image(image, name=name)
    full = rgb.shape[:2]
    size = refinement_size(*full, scale=scale, max_pixels=config.max_pixels)
    _check_memory(size, config, dev, label)
    work = _resize_image(rgb, size)

    guide_labels, guide_name = guide_labels_for(
        guidance, config, work, full, options=guidance_options, label=label
    )

    if cuda_graph and dev.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got {dev}")
    try:
        result = refine(
            work,
            config,
            guide_labels=guide_labels,
            device=dev,
            seed=seed,
            callback=callback,
            amp=amp,
            cuda_graph=cuda_graph,
        )
    except RefinementDivergedError as exc:
        raise RefinementDivergedError(f"{label}: {exc}") from None
    labels = result.labels.cpu().numpy()
    compact, k = relabel_sequential(labels)
    compact = _resize_labels(compact.astype(np.int32), full)
    guide_full = None if guide_labels is None else _resize_labels(guide_labels, full)
    return Segmentation(
        labels=compact,
        n_labels=int(k),
        n_iter=result.n_iter,
        history={"loss": result.loss_history, "n_labels": result.k_history},
        guide_labels=guide_full,
        image=rgb,
        config=config,
        seconds=result.seconds,
        stop_reason=result.stop_reason,
        name=name if name is not None else (label if label != "image" else None),
        device=str(dev),
        extra={
            "guide": guide_name,
            "refine_size": list(size),
            "opt_clusters": result.opt_clusters,
            "seed": seed,
        },
    )
