"""Many images at once: :func:`segment_batch`.

With ``batch_size=1`` the images are segmented one after another by
:func:`dynaguide.segment`. With a larger (or ``"auto"``) batch size the refinements run
batched (:func:`dynaguide.batched_refine.refine_batch`): the networks of up to ``batch_size``
images of the same refinement size train together as one grouped network, each image
keeping its own labels, weight, guidance alignment and stopping rules, so every result is
the one :func:`dynaguide.segment` gives, up to float32 round-off.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dynaguide.api import DEFAULT_PRESET, build_config, check_start_label, finalize, segment
from dynaguide.devices import resolve_device, torch_threads
from dynaguide.errors import as_int, image_failure
from dynaguide.pipeline import DEFAULT, Prepared, finish, prepare
from dynaguide.refine import RefineResult
from dynaguide.segmentation import Segmentation
from dynaguide.settings import as_seed, resolve_guidance, settings_record

ProgressHook = Callable[[int, "Segmentation | None"], None]
#: ``images`` values that are one image (or a folder), not a collection of images.
_NOT_A_COLLECTION = (str, bytes, os.PathLike, np.ndarray, torch.Tensor, Mapping)


def _describe(i: int, item: Any) -> str:
    what = item if isinstance(item, (str, os.PathLike)) else type(item).__name__
    return f"input {i} ({what})"


def _default_batch_size(device: torch.device) -> int | str:
    """``"auto"`` on CUDA; 1 on CPU, where the cores are already busy with one image."""
    return "auto" if device.type == "cuda" else 1


def segment_batch(
    images: Iterable[Any],
    *,
    on_error: str | Callable[[int, BaseException], None] = "raise",
    progress: ProgressHook | None = None,
    device: str | torch.device | None = "auto",
    batch_size: int | str | None = None,
    num_threads: int | None = None,
    **kwargs: Any,
) -> list[Segmentation | None]:
    """Segment many images with the same settings as :func:`dynaguide.segment`.

    Parameters
    ----------
    images : iterable of image inputs
        A list (or any iterable) of paths, PIL images, arrays or tensors (see
        :func:`dynaguide.io.load_image`). A single path, array, tensor or PIL image is
        refused with a ``TypeError`` (pass ``[x]``; for a stack of images ``list(stack)``):
        iterating it would read characters or rows as images.
    on_error : {"raise", "skip"}
        ``"skip"``: the per-image policy of :mod:`dynaguide.errors`: any exception raised
        while one input is processed (unreadable, invalid, too large for the device, a
        failing guide, a diverged refinement, ...) is reported with a warning naming the
        input, its slot in the result is ``None``, and the rest go on; finished images are
        never lost. ``"raise"``: the first failure propagates. A callable
        ``(index, exception)``: as ``"skip"``, but the exception is handed to it instead of
        a warning (failures that stop a run, like a full output disk, still propagate).
    progress : callable(index, result), optional
        Called once per input as it is done (``result`` is None for a skipped input).
        Batched runs finish images out of order.
    device : "auto", "cpu", "cuda[:N]", "mps" or torch.device
        ``"auto"`` (default): CUDA when present, else the CPU.
    batch_size : int, "auto" or None
        Images refined at once. ``1``: one after another. ``"auto"``: as many images of one
        refinement size as the free device memory holds
        (:func:`dynaguide.batched_refine.auto_batch_size`). None (default): ``"auto"`` on CUDA and
        1 on CPU (on a few CPU cores one image already keeps them busy).
    num_threads : int, optional
        torch intra-op threads for the whole call; the previous count is restored after.
    **kwargs
        Passed to :func:`dynaguide.segment` (``preset``, ``guidance``, ``seed``,
        ``max_iter``, ``scale``, ``start_label``, ``return_tensors``, config overrides,
        ...). Every image uses the same seed, as with sequential calls (a
        ``numpy.random.Generator`` is drawn from once). A named guide is built once for
        all the images. ``callback`` and ``cuda_graph`` work only with ``batch_size=1``.

    Returns
    -------
    list of Segmentation or None
        In input order.

    Raises
    ------
    ValueError, TypeError
        Bad settings (``images`` not a collection, ``on_error``, ``batch_size``, the preset
        or its overrides, the device, the seed), whatever ``on_error`` says, before any
        image is touched; bad inputs with ``on_error="raise"``.
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
    if not callable(on_error) and on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise', 'skip' or a callable, got {on_error!r}")
    from PIL import Image

    if isinstance(images, (*_NOT_A_COLLECTION, Image.Image)) or not isinstance(images, Iterable):
        raise TypeError(
            f"images must be a list (or iterable) of images, got a single "
            f"{type(images).__name__}; pass [image] for one image, list(stack) for a stack"
        )
    dev = resolve_device(device)
    if batch_size is None:
        batch_size = _default_batch_size(dev)
    if batch_size != "auto":
        try:
            batch_size = as_int(batch_size, "batch_size", minimum=1)
        except (TypeError, ValueError):
            raise ValueError(
                f"batch_size must be None, 'auto' or an int >= 1, got {batch_size!r}"
            ) from None
    kwargs["seed"] = as_seed(kwargs.get("seed", 0))
    check_start_label(kwargs.get("start_label", 0))
    # settings errors are not input errors: raise them before any image is touched
    config = build_config(
        kwargs.get("preset", DEFAULT_PRESET),
        max_iter=kwargs.get("max_iter"),
        **{k: v for k, v in kwargs.items() if k not in _SEGMENT_ARGS},
    )
    items: Sequence[Any] = list(images)
    with torch_threads(num_threads):
        # built once for every image (an ONNX export and session for a learned guide)
        kwargs["guidance"] = resolve_guidance(
            kwargs.get("guidance", DEFAULT), kwargs.pop("guidance_options", None), config,
            kwargs["seed"],
        )  # fmt: skip
        if batch_size == 1 or config.max_iter == 0:  # no refinement: nothing to batch
            return _sequential(items, on_error, progress, dev, kwargs)
        for name in ("callback", "cuda_graph"):
            if kwargs.get(name):
                raise ValueError(
                    f"{name}= works only with batch_size=1 (got batch_size={batch_size!r})"
                )
        return _batched(items, on_error, progress, dev, batch_size, kwargs, config)


#: segment() keywords that are not RefineConfig overrides.
_SEGMENT_ARGS = frozenset(
    {"preset", "guidance", "guidance_options", "seed", "max_iter", "scale", "callback", "name",
     "amp", "cuda_graph", "num_threads", "start_label", "return_tensors"}
)  # fmt: skip


def _skip(i: int, item: Any, exc: BaseException, on_error: Any) -> None:
    """The per-image policy (:mod:`dynaguide.errors`): re-raise, or report and go on."""
    if on_error == "raise":
        raise exc
    failure = image_failure(exc, _describe(i, item))  # re-raises what stops a run
    if callable(on_error):
        on_error(i, exc)
    else:
        warnings.warn(f"skipped {failure.message}", stacklevel=4)


def _sequential(
    items: Sequence[Any],
    on_error: Any,
    progress: ProgressHook | None,
    dev: torch.device,
    kwargs: dict[str, Any],
) -> list[Segmentation | None]:
    out: list[Segmentation | None] = []
    for i, item in enumerate(items):
        try:
            seg: Segmentation | None = segment(item, device=dev, **kwargs)
        except Exception as exc:
            _skip(i, item, exc, on_error)
            seg = None
        out.append(seg)
        if progress is not None:
            progress(i, seg)
    return out


def _batched(
    items: Sequence[Any],
    on_error: Any,
    progress: ProgressHook | None,
    dev: torch.device,
    batch_size: int | str,
    kwargs: dict[str, Any],
    config: Any,
) -> list[Segmentation | None]:
    from dynaguide.batched_refine import refine_batch

    seed = kwargs["seed"]
    guide = kwargs["guidance"]
    start_label = kwargs.get("start_label", 0)
    record = settings_record(
        kwargs.get("preset", DEFAULT_PRESET), config, guide, seed, device=str(dev),
        scale=kwargs.get("scale"), amp=bool(kwargs.get("amp", False)), cuda_graph=False,
        start_label=start_label, batch_size=batch_size,
    )  # fmt: skip
    out: list[Segmentation | None] = [None] * len(items)
    buckets: dict[tuple[int, int], list[tuple[int, Prepared]]] = {}
    for i, item in enumerate(items):
        try:
            name = kwargs.get("name")
            p = prepare(
                item,
                config,
                guidance=guide.guidance,
                scale=kwargs.get("scale"),
                name=name,
                label=name or (str(item) if isinstance(item, (str, os.PathLike)) else f"input {i}"),
                device=dev,
            )
        except Exception as exc:
            _skip(i, item, exc, on_error)
            if progress is not None:
                progress(i, None)
            continue
        buckets.setdefault(p.work.shape[:2], []).append((i, p))

    for group in buckets.values():

        def done(j: int, result: RefineResult, group: list[tuple[int, Prepared]] = group) -> None:
            index, p = group[j]
            try:
                seg: Segmentation | None = finalize(
                    finish(p, result, config, device=dev, seed=seed, batched=True),
                    guide, record, start_label=start_label,
                    return_tensors=bool(kwargs.get("return_tensors", False)),
                )  # fmt: skip
            except Exception as failure:
                _skip(index, items[index], failure, on_error)
                seg = None
            out[index] = seg
            if progress is not None:
                progress(index, seg)

        try:
            refine_batch(
                [p.work for _, p in group], config,
                guide_labels=[p.guide_labels for _, p in group],
                device=dev, seed=seed, batch_size=batch_size, amp=bool(kwargs.get("amp", False)),
                on_result=done,
            )  # fmt: skip
        except Exception as exc:  # e.g. one image of this size does not fit: all of them
            for index, p in group:
                if out[index] is None:
                    named = (
                        MemoryError(f"{p.label}: {exc}") if isinstance(exc, MemoryError) else exc
                    )
                    _skip(index, items[index], named, on_error)
                    if progress is not None:
                        progress(index, None)
    return out
