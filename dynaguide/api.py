"""The public entry points: :func:`segment` and :func:`segment_batch`.

Data flows one way: load -> (downscale) -> guide -> refine -> label -> (upscale).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from dynaguide.config import DEFAULT_PRESET, RefineConfig, get_preset
from dynaguide.devices import resolve_device, torch_threads
from dynaguide.errors import RefinementDivergedError
from dynaguide.pipeline import DEFAULT, deadline_of, finish, prepare
from dynaguide.refine import ProgressCallback, refine
from dynaguide.segmentation import Segmentation
from dynaguide.settings import ResolvedGuide, as_seed, resolve_guidance, settings_record

__all__ = ["build_config", "resolve_device", "segment"]


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
    device: str | torch.device | None = "auto",
    seed: Any = 0,
    max_iter: int | None = None,
    scale: float | None = None,
    callback: ProgressCallback | None = None,
    name: str | None = None,
    amp: bool = False,
    cuda_graph: bool = False,
    num_threads: int | None = None,
    start_label: int = 0,
    return_tensors: bool = False,
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
        Options for a named guide's factory. A named guide is built once per call (and
        once per :func:`dynaguide.segment_batch` call); pass a built guide object
        (:func:`dynaguide.get_guide`) to reuse it across calls.
    device : "auto", "cpu", "cuda[:N]", "mps" or torch.device
        ``"auto"`` (default): CUDA when torch sees a GPU, else the CPU
        (:func:`dynaguide.devices.resolve_device`).
    seed : int, numpy integer or numpy.random.Generator
        Seeds the network initialisation and the guide's own randomness (the ``kmeans``
        guide's sample and restarts, unless ``guidance_options`` set ``seed``); CPU
        results are deterministic per seed. A generator is advanced by one draw.
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
    num_threads : int, optional
        torch intra-op threads for this call; the previous count is restored after it.
    start_label : {0, 1}
        First label value, as in ``skimage.segmentation.relabel_sequential``. With the
        default 0, ``skimage.measure.regionprops`` treats segment 0 as background and
        leaves it out; ``start_label=1`` gives every segment a region.
    return_tensors : bool
        Also return the labels as an (H, W) ``int64`` torch tensor on the refinement
        device, in ``Segmentation.labels_tensor`` (for pipelines that keep data on the GPU).
    **overrides
        Any :class:`RefineConfig` field, e.g. ``min_labels=5`` or ``connectivity=4``
        (4- or 8-connected regions instead of colour clusters; 0 keeps the clusters).

    Returns
    -------
    Segmentation
        ``labels`` (H, W) int32, compact ``start_label .. start_label + K - 1``, at the
        input's full size; ``extra["settings"]`` records everything that decided them.

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
    seed = as_seed(seed)
    start_label = check_start_label(start_label)
    if cuda_graph and dev.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got {dev}")
    with torch_threads(num_threads):
        guide = resolve_guidance(guidance, guidance_options, config, seed)
        prepared = prepare(
            image, config, guidance=guide.guidance, scale=scale, name=name, device=dev
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
        seg = finish(prepared, result, config, device=dev, seed=seed)
    record = settings_record(
        preset, config, guide, seed, device=str(dev), scale=scale, amp=bool(amp),
        cuda_graph=bool(cuda_graph), start_label=start_label,
    )  # fmt: skip
    return finalize(seg, guide, record, start_label=start_label, return_tensors=return_tensors)


def check_start_label(start_label: Any) -> int:
    """``start_label`` if it is 0 or 1 (a ValueError naming it otherwise)."""
    if isinstance(start_label, bool) or start_label not in (0, 1):
        raise ValueError(f"start_label must be 0 or 1, got {start_label!r}")
    return int(start_label)


def finalize(
    seg: Segmentation,
    guide: ResolvedGuide,
    record: dict[str, Any],
    *,
    start_label: int = 0,
    return_tensors: bool = False,
) -> Segmentation:
    """Apply the output options of :func:`segment` to a finished result: the guide's
    recorded name, the settings record, ``start_label`` and ``labels_tensor``."""
    if guide.name is not None:
        seg.extra["guide"] = guide.name
    seg.extra["settings"] = dict(record)
    if start_label:
        seg.labels = seg.labels + np.int32(start_label)
        seg.start_label = start_label
    if return_tensors:
        device = torch.device(seg.device)
        seg.labels_tensor = torch.from_numpy(seg.labels.astype(np.int64)).to(device)
    return seg
