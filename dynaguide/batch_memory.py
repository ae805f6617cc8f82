"""How many images fit: the per-image memory estimate of a training iteration and the
automatic batch size of :func:`dynaguide.batched_refine.refine_batch` (``batch_size="auto"``)."""

from __future__ import annotations

import os

import torch

from dynaguide.config import RefineConfig

__all__ = [
    "CUDA_RESERVE",
    "MAX_AUTO_BATCH",
    "MEMORY_FRACTION",
    "auto_batch_size",
    "estimate_refine_bytes",
    "free_memory",
]

#: Share of the free memory that ``batch_size="auto"`` plans to fill.
MEMORY_FRACTION = 0.7
#: Bytes kept aside on CUDA for the context, cuDNN workspaces and allocator slack.
CUDA_RESERVE = 512 * 2**20
#: Upper bound of an automatic batch (beyond it a grouped conv gains nothing more).
MAX_AUTO_BATCH = 64


def estimate_refine_bytes(height: int, width: int, config: RefineConfig) -> int:
    """Bytes one image needs during a training iteration (activations, float32).

    Derivation, in floats per pixel with ``C = n_channels``, ``L = n_conv``, ``D`` the
    number of continuity directions (2 for 4 neighbours, 4 for 8) and the plain PyTorch
    losses (the fused fast paths keep less):

    * input: 3;
    * each conv block keeps its ReLU output (the BatchNorm's saved input) and its
      BatchNorm output (the next conv's saved input): ``2 L C``; the raw conv output is
      transient, except the first one with ``skip="shared"`` (kept for the sum): ``+C``;
    * skip branch (``separate`` or ``shared``): the sum fed to the classifier, ``+C``;
    * classifier output (saved by the output BatchNorm) and the response: ``2C``;
    * similarity: the log-softmax saved by the cross-entropy, ``C``, and the int64
      labels, 2;
    * continuity: one difference tensor per direction, ``D C``; Huber also saves the
      zero target it is compared with: ``2 D C``;
    * guidance: its log-softmax ``C`` and the int64 target, weights and aligned target, 5;
    * backward working set: the response gradient, one intermediate gradient and its
      input gradient alive at once, ``3C``.

    So ``4 * H * W * (10 + C * (2L + skip + 2 + 1 + D * (2 if huber else 1) + 1 + 3))``
    bytes; 2010 floats (8 KB) per pixel for the ``dynaguide`` preset (C=100, L=2,
    separate skip, Huber, 8 neighbours), about 1.2 GB for a 321x481 BSDS500 image.
    Measured on CPU, the growth of the peak resident set during the first training
    iteration of a 321x481 image stays within this estimate (``benchmarks/throughput.py
    --memory`` prints both). Parameters and optimiser state (~0.4 MB per image) are
    negligible.

    Parameters
    ----------
    height, width : int
        Refinement size.
    config : RefineConfig

    Returns
    -------
    int
        Estimated bytes for one image; N batched images need N times as much.
    """
    c, n_conv = config.n_channels, config.n_conv
    skip = {"none": 0, "separate": 1, "shared": 2}[config.skip]
    directions = 4 if config.neighbors == 8 else 2
    cont = directions * (2 if config.penalty == "huber" else 1)
    guide = 1 if config.guidance_weight > 0 else 0
    floats = 10 + c * (2 * n_conv + skip + 2 + 1 + cont + guide + 3)
    return int(4 * floats * height * width)


def free_memory(device: torch.device) -> int:
    """Free memory in bytes on ``device``: ``torch.cuda.mem_get_info`` on CUDA, available
    RAM (``MemAvailable`` from ``/proc/meminfo``, else ``os.sysconf``) on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 2**62  # unknown: do not limit


def auto_batch_size(
    size: tuple[int, int],
    config: RefineConfig,
    device: torch.device,
    *,
    n_images: int | None = None,
    free: int | None = None,
) -> int:
    """Largest batch of ``size`` images that fits the free memory of ``device``.

    ``floor(MEMORY_FRACTION * (free - reserve) / estimate_refine_bytes(H, W, config))``,
    with ``reserve = CUDA_RESERVE`` on CUDA (0 on CPU), capped at ``MAX_AUTO_BATCH`` and
    at ``n_images``.

    Parameters
    ----------
    size : (H, W)
        Refinement size of the images of one bucket.
    config : RefineConfig
    device : torch.device
    n_images : int, optional
        Number of images waiting; the batch is never larger.
    free : int, optional
        Free bytes (default: :func:`free_memory` of ``device``).

    Raises
    ------
    MemoryError
        When even one image does not fit.
    """
    h, w = size
    need = estimate_refine_bytes(h, w, config)
    avail = free_memory(device) if free is None else int(free)
    reserve = CUDA_RESERVE if device.type == "cuda" else 0
    n = int(MEMORY_FRACTION * max(0, avail - reserve) // max(need, 1))
    if n < 1:
        raise MemoryError(
            f"refining one {w}x{h} image needs about {need / 2**30:.2f} GiB, but only "
            f"{avail / 2**30:.2f} GiB is free on {device} (the plan uses "
            f"{MEMORY_FRACTION:.0%} of it); pass scale= or a smaller max_pixels"
        )
    n = min(n, MAX_AUTO_BATCH)
    if n_images is not None:
        n = min(n, max(1, n_images))
    return n
