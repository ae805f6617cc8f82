"""Batched refinement: many independent per-image networks trained as one set of kernels.

Every image still gets its *own* network, optimiser state, labels, K, dynamic weight,
guidance alignment and stopping rules, as :func:`dynaguide.refine.refine` would give it;
only the arithmetic is shared: the N networks become one grouped network
(:mod:`dynaguide.grouped_net`: grouped convolutions, per-image BatchNorm channels,
elementwise SGD), and the losses are computed per image and summed, so each image's
parameters get exactly its solo gradient. Images
that stop leave the batch at the next stopping check, and images waiting in the queue
take their places, so the device stays full.

Images of different sizes are bucketed by ``(H, W)`` and each bucket is refined on its
own, instead of padding to a common size: padded pixels would enter every BatchNorm's
mean and variance (and the losses' pixel means, the argmax label counts K and the
continuity pairs at the border), so a padded image would not be refined as it is alone.
Masking all of that would need a custom BatchNorm and masked losses everywhere, for a
small gain: images of a data set mostly share a few sizes (BSDS500: 321x481 and 481x321).

Equality with :func:`dynaguide.refine.refine` is exact in exact arithmetic. In float32
the forward pass and the loss gradients are bit-identical to the solo ones on CPU
(channels-last), but the grouped BatchNorm and convolution backward passes reduce over the
pixels in a different order than the solo kernels, so parameter gradients can differ by
round-off (~1e-7 relative); the argmax can amplify that over many iterations. Measured: on
the tests' small images every label and K is identical; on 6 BSDS500 images at 64x96 for
10 iterations all K histories were identical and 1 pixel of 36,864 differed (loss
histories within 4e-5 relative).

``method="vmap"`` (:func:`torch.func.vmap` over the stacked parameters) exists to
compare the two formulations; it runs NCHW only (see :mod:`dynaguide.grouped_net`).

Host synchronisation: on CUDA nothing in an iteration waits for the host (K, the dynamic
weight, the loss and K histories stay on the device); the stopping rules are checked every
``config.check_every`` iterations with one device-to-host transfer for the whole batch.
On CPU they are checked every iteration, as :func:`dynaguide.refine.refine` does.

Where the pieces live: the grouped network (stacked parameters, grouped / vmapped forward)
in :mod:`dynaguide.grouped_net`, the per-slot engine :class:`BatchedRefiner` in
:mod:`dynaguide.grouped_refiner`, the memory plan of ``batch_size="auto"`` in
:mod:`dynaguide.batch_memory`, the stopping rules in :mod:`dynaguide.stopping`; this module
holds the driver :func:`refine_batch`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from dynaguide.batch_memory import (  # noqa: F401 - public names of refine_batch's module
    CUDA_RESERVE,
    MAX_AUTO_BATCH,
    MEMORY_FRACTION,
    auto_batch_size,
    estimate_refine_bytes,
    free_memory,
)
from dynaguide.config import RefineConfig
from dynaguide.grouped_net import Method, check_method
from dynaguide.grouped_refiner import BatchCallback, BatchedRefiner
from dynaguide.refine import RefineResult

#: ``on_result(index, result)``: called as soon as image ``index`` has finished.
ResultHook = Callable[[int, RefineResult], None]

__all__ = [
    "BatchCallback",
    "BatchedRefiner",
    "ResultHook",
    "auto_batch_size",
    "estimate_refine_bytes",
    "free_memory",
    "refine_batch",
]


def _check_inputs(
    images: Sequence[np.ndarray],
    guide_labels: Sequence[np.ndarray | None] | None,
    seed: int | Sequence[int],
    batch_size: int | str,
) -> tuple[list[np.ndarray | None], list[int]]:
    if isinstance(images, np.ndarray) and images.ndim == 3:
        raise TypeError("images must be a sequence of (H, W, 3) arrays, got a single array")
    if not isinstance(images, (Sequence, np.ndarray)) or isinstance(images, (str, bytes)):
        raise TypeError(
            f"images must be a sequence of (H, W, 3) arrays, got {type(images).__name__}"
        )
    for i, img in enumerate(images):
        if (
            not isinstance(img, np.ndarray)
            or img.ndim != 3
            or img.shape[2] != 3
            or img.dtype != np.uint8
        ):
            what = (
                f"{img.dtype} array of shape {img.shape}"
                if isinstance(img, np.ndarray)
                else type(img).__name__
            )
            raise ValueError(f"images[{i}] must be an (H, W, 3) uint8 RGB array, got {what}")
        if img.shape[0] < 2 or img.shape[1] < 2:
            raise ValueError(f"images[{i}] must be at least 2x2, got {img.shape[:2]}")
    n = len(images)
    guides: list[np.ndarray | None] = [None] * n if guide_labels is None else list(guide_labels)
    if len(guides) != n:
        raise ValueError(f"guide_labels has {len(guides)} entries for {n} images")
    for i, (g, img) in enumerate(zip(guides, images, strict=True)):
        if g is not None and np.shape(g) != img.shape[:2]:
            raise ValueError(f"guide_labels[{i}] has shape {np.shape(g)}, expected {img.shape[:2]}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer, Sequence)):
        raise TypeError(f"seed must be an int or a sequence of ints, got {seed!r}")
    try:
        seeds = [int(seed)] * n if isinstance(seed, (int, np.integer)) else [int(s) for s in seed]
    except (TypeError, ValueError, OverflowError):
        raise TypeError(f"seed must be an int or a sequence of ints, got {seed!r}") from None
    if any(not 0 <= s < 2**32 for s in seeds):
        raise ValueError(f"seed must be an int in [0, 2**32) (or a sequence of them), got {seed!r}")
    if len(seeds) != n:
        raise ValueError(f"seed has {len(seeds)} entries for {n} images")
    if batch_size != "auto" and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be 'auto' or an int >= 1, got {batch_size!r}")
    return guides, seeds


def refine_batch(
    images: Sequence[np.ndarray],
    config: RefineConfig,
    *,
    guide_labels: Sequence[np.ndarray | None] | None = None,
    device: str | torch.device = "cpu",
    seed: int | Sequence[int] = 0,
    batch_size: int | str = "auto",
    backend: str | None = None,
    channels_last: bool | None = None,
    method: Method = "grouped",
    amp: bool = False,
    check_every: int | None = None,
    callback: BatchCallback | None = None,
    on_result: ResultHook | None = None,
) -> list[RefineResult]:
    """Refine many images at once; each result is :func:`dynaguide.refine.refine`'s.

    Up to float32 round-off (see the module docstring: bit-identical on small inputs).

    Images are bucketed by (H, W); within a bucket up to ``batch_size`` networks train
    as one grouped network, finished images leave at their stopping check and waiting
    ones join, so the batch stays full until the bucket's queue is empty.

    Parameters
    ----------
    images : sequence of ndarray (H, W, 3) uint8 RGB
        Already at refinement size (see :func:`dynaguide.api.refinement_size`).
    config : RefineConfig
        Shared by every image (one architecture per grouped network).
    guide_labels : sequence of (ndarray (H, W) or None), optional
        Per-image pseudo-labels (negative = unguided); each image gets its own aligner.
    device : str or torch.device
    seed : int or sequence of int
        Per-image seed (an int: the same seed for every image, as sequential
        :func:`dynaguide.segment_batch` does).
    batch_size : int or "auto"
        Images trained at once per bucket; ``"auto"`` fits the free device memory
        (:func:`auto_batch_size`).
    backend : str, optional
        Force a loss backend (``"torch"`` = plain reference).
    channels_last : bool, optional
        Channels-last convolutions, as in :func:`dynaguide.refine.refine` (default: True
        for ``"grouped"``, False for ``"vmap"``, which cannot use them).
    method : {"grouped", "vmap"}
        Grouped convolutions (default) or ``torch.func.vmap``.
    amp : bool
        bf16 autocast for the convolutions, as in :func:`dynaguide.refine.refine`.
    check_every : int, optional
        Iterations between stopping checks: default 1 on CPU and ``config.check_every``
        on CUDA, as :func:`dynaguide.refine.refine` does (results equal its results only
        with the same interval). Images join the batch only at check boundaries.
    callback : callable(index, iteration, loss, K), optional
        Called at every stopping check of every image (calls of different images
        interleave).
    on_result : callable(index, RefineResult), optional
        Called as soon as an image has finished (not in index order).

    Returns
    -------
    list of RefineResult
        In the order of ``images``. ``seconds`` is the wall time from the image joining
        the batch to its end, so it includes the work shared with the other images.

    Raises
    ------
    ValueError, TypeError
        Bad images, guide labels, seeds or batch size.
    MemoryError
        When one image alone does not fit the free device memory (an explicit
        ``batch_size`` larger than what fits is taken as given).
    """
    dev = torch.device(device)
    if not isinstance(config, RefineConfig):
        raise TypeError(f"config must be a RefineConfig, got {type(config).__name__}")
    guides, seeds = _check_inputs(images, guide_labels, seed, batch_size)
    channels_last = check_method(method, channels_last)
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        buckets.setdefault((int(img.shape[0]), int(img.shape[1])), []).append(i)
    results: list[RefineResult | None] = [None] * len(images)
    for size, indices in buckets.items():
        fits = auto_batch_size(size, config, dev, n_images=len(indices))  # MemoryError if 0
        bs = fits if batch_size == "auto" else min(int(batch_size), len(indices))
        engine = BatchedRefiner(
            config, dev, size, backend=backend, channels_last=channels_last, method=method,
            amp=amp, check_every=check_every,
        )  # fmt: skip
        for i, res in _run_bucket(engine, images, guides, seeds, indices, bs, callback):
            results[i] = res
            if on_result is not None:
                on_result(i, res)
    assert all(r is not None for r in results)
    return results  # type: ignore[return-value]


def _run_bucket(
    engine: BatchedRefiner,
    images: Sequence[np.ndarray],
    guides: Sequence[np.ndarray | None],
    seeds: Sequence[int],
    indices: Sequence[int],
    batch_size: int,
    callback: BatchCallback | None,
) -> Iterator[tuple[int, RefineResult]]:
    """Yield (index, RefineResult) for every image of one bucket as it finishes."""
    queue = deque(indices)
    every = engine.every
    keep: list[int] = []  # positions of the slots that go on
    while True:
        # Join only where every remaining slot is at a check boundary: then all slots keep
        # one check schedule and checks stay `every` iterations apart (on CPU: always).
        new = []
        if queue and len(keep) < batch_size and all(engine.slots[p].it % every == 0 for p in keep):
            for _ in range(min(batch_size - len(keep), len(queue))):
                i = queue.popleft()
                new.append(engine.new_slot(i, images[i], guides[i], seeds[i]))
        if not keep and not new:
            return
        if new or len(keep) != len(engine):  # one rebuild per change of membership
            engine.rebuild(keep, new)
        due = engine.due()
        refresh = [d or s.it == 0 for d, s in zip(due, engine.slots, strict=True)]
        _, labels, _ = engine.step(refresh)
        done = engine.check(due, labels, callback) if any(due) else {}
        for p in sorted(done):
            yield engine.slots[p].index, engine.finish(p, done[p], labels)
        keep = [p for p in range(len(engine)) if p not in done]
