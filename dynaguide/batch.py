"""Many images at once: :func:`segment_batch`.

With ``batch_size=1`` the images are segmented one after another by
:func:`dynaguide.segment`. With a larger (or ``"auto"``) batch size the refinements run
batched (:func:`dynaguide.batched.refine_batch`): the networks of up to ``batch_size``
images of the same refinement size train together as one grouped network, each image
keeping its own labels, weight, guidance alignment and stopping rules, so every result is
the one :func:`dynaguide.segment` gives, up to float32 round-off.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dynaguide.api import (
    DEFAULT,
    DEFAULT_PRESET,
    _resize_image,
    _resize_labels,
    build_config,
    refinement_size,
    resolve_device,
    segment,
)
from dynaguide.config import RefineConfig
from dynaguide.guidance import compute_guide_labels
from dynaguide.io import load_image
from dynaguide.refine import RefineResult
from dynaguide.segmentation import Segmentation

ProgressHook = Callable[[int, "Segmentation | None"], None]
_INPUT_ERRORS = (ValueError, TypeError, OSError, MemoryError)


def _describe(i: int, item: Any) -> str:
    what = item if isinstance(item, (str, os.PathLike)) else type(item).__name__
    return f"input {i} ({what})"


def _default_batch_size(device: torch.device) -> int | str:
    """``"auto"`` on CUDA; 1 on CPU, where the cores are already busy with one image."""
    return "auto" if device.type == "cuda" else 1


def segment_batch(
    images: Iterable[Any],
    *,
    on_error: str = "raise",
    progress: ProgressHook | None = None,
    device: str | torch.device | None = "cpu",
    batch_size: int | str | None = None,
    **kwargs: Any,
) -> list[Segmentation | None]:
    """Segment many images with the same settings as :func:`dynaguide.segment`.

    Parameters
    ----------
    images : iterable of image inputs
        Paths, PIL images, arrays or tensors (see :func:`dynaguide.io.load_image`).
    on_error : {"raise", "skip"}
        ``"skip"``: an input that fails (unreadable, invalid, too large for the device) is
        reported with a warning naming it, its slot in the result is ``None``, and the rest
        go on.
    progress : callable(index, result), optional
        Called once per input as it is done (``result`` is None for a skipped input).
        Batched runs finish images out of order.
    device : str or torch.device
    batch_size : int, "auto" or None
        Images refined at once. ``1``: one after another. ``"auto"``: as many images of one
        refinement size as the free device memory holds
        (:func:`dynaguide.batched.auto_batch_size`). None (default): ``"auto"`` on CUDA and
        1 on CPU (on a few CPU cores one image already keeps them busy).
    **kwargs
        Passed to :func:`dynaguide.segment` (``preset``, ``guidance``, ``seed``,
        ``max_iter``, ``scale``, config overrides, ...). Every image uses the same seed,
        as with sequential calls. ``callback`` and ``cuda_graph`` work only with
        ``batch_size=1``.

    Returns
    -------
    list of Segmentation or None
        In input order.

    Raises
    ------
    ValueError, TypeError
        Bad settings (``on_error``, ``batch_size``, the preset or its overrides, the
        device), whatever ``on_error`` says; bad inputs with ``on_error="raise"``.
    MemoryError
        With ``on_error="raise"``, when one image alone does not fit the device.

    Examples
    --------
    >>> import numpy as np, dynaguide
    >>> imgs = [np.full((16, 16, 3), v, np.uint8) for v in (0, 255)]
    >>> segs = dynaguide.segment_batch(imgs, guidance=None, max_iter=2, batch_size=2)
    >>> [s.labels.shape for s in segs]
    [(16, 16), (16, 16)]
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    dev = resolve_device(device)
    if batch_size is None:
        batch_size = _default_batch_size(dev)
    if batch_size != "auto" and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be None, 'auto' or an int >= 1, got {batch_size!r}")
    # settings errors are not input errors: raise them before any image is touched
    build_config(
        kwargs.get("preset", DEFAULT_PRESET),
        max_iter=kwargs.get("max_iter"),
        **{k: v for k, v in kwargs.items() if k not in _SEGMENT_ARGS},
    )
    items: Sequence[Any] = list(images)
    if batch_size == 1:
        return _sequential(items, on_error, progress, dev, kwargs)
    for name in ("callback", "cuda_graph"):
        if kwargs.get(name):
            raise ValueError(
                f"{name}= works only with batch_size=1 (got batch_size={batch_size!r})"
            )
    return _batched(items, on_error, progress, dev, batch_size, kwargs)


#: segment() keywords that are not RefineConfig overrides.
_SEGMENT_ARGS = frozenset(
    {"preset", "guidance", "guidance_options", "seed", "max_iter", "scale", "callback", "name",
     "amp", "cuda_graph"}
)  # fmt: skip


def _skip(i: int, item: Any, exc: BaseException, on_error: str) -> None:
    if on_error == "raise":
        raise exc
    warnings.warn(f"skipped {_describe(i, item)}: {exc}", stacklevel=4)


def _sequential(
    items: Sequence[Any],
    on_error: str,
    progress: ProgressHook | None,
    dev: torch.device,
    kwargs: dict[str, Any],
) -> list[Segmentation | None]:
    out: list[Segmentation | None] = []
    for i, item in enumerate(items):
        try:
            seg: Segmentation | None = segment(item, device=dev, **kwargs)
        except _INPUT_ERRORS as exc:
            _skip(i, item, exc, on_error)
            seg = None
        out.append(seg)
        if progress is not None:
            progress(i, seg)
    return out


@dataclass
class _Prepared:
    """One input, loaded, resized and guided, waiting for its refinement."""

    index: int
    rgb: np.ndarray
    work: np.ndarray
    guide_labels: np.ndarray | None
    guide_name: str | None
    name: str | None
    label: str
    is_path: bool


def _prepare(i: int, item: Any, config: RefineConfig, kwargs: dict[str, Any]) -> _Prepared:
    """Everything :func:`dynaguide.segment` does before refining (same rules, same errors)."""
    name = kwargs.get("name")
    label = name or (str(item) if isinstance(item, (str, os.PathLike)) else f"input {i}")
    rgb = load_image(item, name=name)
    full = rgb.shape[:2]
    size = refinement_size(*full, scale=kwargs.get("scale"), max_pixels=config.max_pixels)
    work = _resize_image(rgb, size)
    guidance = kwargs.get("guidance", DEFAULT)
    if isinstance(guidance, str) and guidance == DEFAULT:
        guidance = config.default_guidance
    if isinstance(guidance, (np.ndarray, torch.Tensor)):
        g = guidance.detach().cpu().numpy() if isinstance(guidance, torch.Tensor) else guidance
        if g.shape[:2] != full:
            raise ValueError(
                f"guidance labels for {label} have shape {g.shape}, expected the image's {full}"
            )
        guidance = _resize_labels(np.asarray(g), size) if g.ndim == 2 else g
    guide_labels, guide_name = compute_guide_labels(
        guidance, work, options=kwargs.get("guidance_options"), name=label
    )
    is_path = isinstance(item, (str, os.PathLike))
    return _Prepared(i, rgb, work, guide_labels, guide_name, name, label, is_path)


def _finish(
    p: _Prepared, result: RefineResult, config: RefineConfig, dev: torch.device, seed: int
) -> Segmentation:
    """The :class:`Segmentation` :func:`dynaguide.segment` would build from ``result``."""
    from dynaguide.native import relabel_sequential

    full = p.rgb.shape[:2]
    compact, k = relabel_sequential(result.labels.cpu().numpy())
    compact = _resize_labels(compact.astype(np.int32), full)
    guide_full = None if p.guide_labels is None else _resize_labels(p.guide_labels, full)
    return Segmentation(
        labels=compact,
        n_labels=int(k),
        n_iter=result.n_iter,
        history={"loss": result.loss_history, "n_labels": result.k_history},
        guide_labels=guide_full,
        image=p.rgb,
        config=config,
        seconds=result.seconds,
        stop_reason=result.stop_reason,
        name=p.name if p.name is not None else (p.label if p.is_path else None),
        device=str(dev),
        extra={
            "guide": p.guide_name,
            "refine_size": list(p.work.shape[:2]),
            "opt_clusters": result.opt_clusters,
            "seed": seed,
            "batched": True,
        },
    )


def _batched(
    items: Sequence[Any],
    on_error: str,
    progress: ProgressHook | None,
    dev: torch.device,
    batch_size: int | str,
    kwargs: dict[str, Any],
) -> list[Segmentation | None]:
    from dynaguide.batched import refine_batch

    seed = kwargs.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    overrides = {k: v for k, v in kwargs.items() if k not in _SEGMENT_ARGS}
    config = build_config(
        kwargs.get("preset", DEFAULT_PRESET), max_iter=kwargs.get("max_iter"), **overrides
    )
    out: list[Segmentation | None] = [None] * len(items)
    buckets: dict[tuple[int, int], list[_Prepared]] = {}
    for i, item in enumerate(items):
        try:
            p = _prepare(i, item, config, kwargs)
        except _INPUT_ERRORS as exc:
            _skip(i, item, exc, on_error)
            if progress is not None:
                progress(i, None)
            continue
        buckets.setdefault(p.work.shape[:2], []).append(p)

    for group in buckets.values():

        def done(j: int, result: RefineResult, group: list[_Prepared] = group) -> None:
            p = group[j]
            seg = _finish(p, result, config, dev, seed)
            out[p.index] = seg
            if progress is not None:
                progress(p.index, seg)

        try:
            refine_batch(
                [p.work for p in group], config, guide_labels=[p.guide_labels for p in group],
                device=dev, seed=seed, batch_size=batch_size, amp=bool(kwargs.get("amp", False)),
                on_result=done,
            )  # fmt: skip
        except MemoryError as exc:  # one image of this size does not fit: all of them
            for p in group:
                if out[p.index] is None:
                    _skip(p.index, items[p.index], MemoryError(f"{p.label}: {exc}"), on_error)
                    if progress is not None:
                        progress(p.index, None)
    return out
