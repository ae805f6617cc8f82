"""The public entry points: :func:`segment` and :func:`segment_batch`.

Data flows one way: load -> (downscale) -> guide -> refine -> label -> (upscale).
"""

from __future__ import annotations

from typing import Any

import torch

from dynaguide.config import DEFAULT_PRESET, RefineConfig, get_preset
from dynaguide.errors import RefinementDivergedError, as_int
from dynaguide.pipeline import DEFAULT, deadline_of, finish, prepare
from dynaguide.refine import ProgressCallback, refine
from dynaguide.segmentation import Segmentation


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
        ``"felzenszwalb-merge"`` (default: the best pipeline measured on BSDS500, which
        runs no network), ``"dynaguide-fast"`` (the best refinement pipeline), the paper
        presets ``"dynaguide"``, ``"dfc"``, ``"dynaseg-scf"``, ``"dynaseg-fsf"`` or a
        ``*-reference`` variant; see :func:`dynaguide.presets`.
    guidance : "default", None, str, array, Guide or callable
        ``"default"`` uses the preset's default guide (``felzenszwalb`` for the two first
        presets, ``kmeans`` for ``dynaguide``, none for the others). A label array must
        have the image's (H, W).
    guidance_options : dict, optional
        Options for a named guide's factory.
    device : str or torch.device
    seed : int
        Seeds the network initialisation; CPU results are deterministic per seed.
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
    config = build_config(preset, max_iter=max_iter, **overrides)
    dev = resolve_device(device)
    seed = as_int(seed, "seed", minimum=0, maximum=2**32 - 1)
    if cuda_graph and dev.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got {dev}")
    prepared = prepare(
        image,
        config,
        guidance=guidance,
        guidance_options=guidance_options,
        scale=scale,
        name=name,
        device=dev,
    )
    try:
        result = refine(
            prepared.work,
            config,
            guide_labels=prepared.guide_labels,
            device=dev,
            seed=seed,
            callback=callback,
            amp=amp,
            cuda_graph=cuda_graph,
            deadline=deadline_of(prepared, config),
        )
    except RefinementDivergedError as exc:
        raise RefinementDivergedError(f"{prepared.label}: {exc}") from None
    return finish(prepared, result, config, device=dev, seed=seed)
