"""Batched refinement: many independent per-image networks trained as one set of kernels.

Every image still gets its *own* network, optimiser state, labels, K, dynamic weight,
guidance alignment and stopping rules, as :func:`dynaguide.refine.refine` would give it;
only the arithmetic is shared. N networks of the same architecture become one:

* each 3x3 / 1x1 convolution is a grouped convolution with ``groups=N`` over the N images
  stacked along the channel axis (input ``(1, 3N, H, W)``, weight ``(N*out, in, k, k)``);
* each BatchNorm runs over ``N*C`` channels with a batch dimension of 1, so every channel
  is normalised with the statistics of its own image: exactly the per-image statistics
  of a solo network (whose batch is also one image);
* the losses are computed per image (``reduction="none"``) on the ``(N, C, H, W)``
  response and *summed*: the gradient of the sum with respect to image i's parameters is
  image i's solo gradient, since no other image's loss depends on them;
* SGD's momentum and weight decay are elementwise, so the grouped parameters evolve
  exactly as the N solo ones would.

Parameters are stored stacked, one leaf tensor per solo parameter with a leading image
axis (``(N, *shape)``; conv weights in channels-last order when ``channels_last``). The
grouped weights are views of these leaves, so leaving and joining the batch is a slice /
concatenation of the leaves *and* of the SGD momentum buffers (a newcomer gets a zero
buffer, which SGD turns into ``0 * momentum + grad = grad``: its solo first step). Images
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

``method="vmap"`` computes the same forward with :func:`torch.func.vmap` over
:func:`torch.func.functional_call` on the stacked parameters; it exists to compare the two
formulations (``benchmarks/throughput.py``). The grouped form is the default: vmap
needs NCHW (see below) and was no faster than NCHW grouped convolutions on CPU, both about
1.7x slower than channels-last grouped ones. vmap over BatchNorm in training mode is
correct only when the vmapped dimension is not interleaved with the channels: with
channels-last weights the activations under vmap have exactly that layout, and
``batch_norm``'s backward then returns wrong input gradients (forward correct; torch
2.13, reproduced with ``vmap(F.batch_norm)`` alone on an input of strides
``(C, 3C, 1, ...)``). So ``method="vmap"`` runs NCHW only and refuses ``channels_last=True``.

Host synchronisation: on CUDA nothing in an iteration waits for the host (K, the dynamic
weight, the loss and K histories stay on the device); the stopping rules are checked every
``config.check_every`` iterations with one device-to-host transfer for the whole batch.
On CPU they are checked every iteration, as :func:`dynaguide.refine.refine` does.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from dynaguide.config import RefineConfig
from dynaguide.guidance.align import IGNORE_INDEX, GuideAligner
from dynaguide.model import RefineNet, build_model
from dynaguide.objective import fused_objective, guidance_weight_at, objective
from dynaguide.refine import RefineResult, RefineStep, final_labels, fused_kernel
from dynaguide.stopping import Stopper, stop_floor

__all__ = [
    "BatchCallback",
    "BatchedRefiner",
    "ResultHook",
    "auto_batch_size",
    "estimate_refine_bytes",
    "free_memory",
    "refine_batch",
]

#: ``callback(index, iteration, loss, K)``: called at every stopping check of image ``index``.
BatchCallback = Callable[[int, int, float, int], None]
#: ``on_result(index, result)``: called as soon as image ``index`` has finished.
ResultHook = Callable[[int, RefineResult], None]
Method = Literal["grouped", "vmap"]

#: Share of the free memory that ``batch_size="auto"`` plans to fill.
MEMORY_FRACTION = 0.7
#: Bytes kept aside on CUDA for the context, cuDNN workspaces and allocator slack.
CUDA_RESERVE = 512 * 2**20
#: Upper bound of an automatic batch (beyond it a grouped conv gains nothing more).
MAX_AUTO_BATCH = 64


# --------------------------------------------------------------------------- memory
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


# --------------------------------------------------------------------------- layout
class _Layout:
    """How one solo parameter/buffer is stored stacked and viewed as a grouped tensor."""

    def __init__(self, name: str, shape: torch.Size, channels_last: bool):
        self.name = name
        self.shape = tuple(shape)
        self.conv = len(shape) == 4
        self.cl = channels_last and self.conv

    def to_leaf(self, t: torch.Tensor) -> torch.Tensor:
        """Solo tensor -> one row of the stacked leaf (contiguous)."""
        return (t.permute(0, 2, 3, 1) if self.cl else t).contiguous()

    def to_solo(self, row: torch.Tensor) -> torch.Tensor:
        """One row (or all rows, with a leading axis) of the leaf -> solo layout view."""
        if not self.cl:
            return row
        return row.permute(0, 3, 1, 2) if row.dim() == 4 else row.permute(0, 1, 4, 2, 3)

    def grouped(self, leaf: torch.Tensor) -> torch.Tensor:
        """The stacked leaf viewed as the grouped layer's tensor (no copy)."""
        n = leaf.shape[0]
        if not self.conv:
            return leaf.reshape(n * leaf.shape[1])
        if self.cl:
            out, kh, kw, cin = leaf.shape[1:]
            return leaf.reshape(n * out, kh, kw, cin).permute(0, 3, 1, 2)
        return leaf.reshape(n * leaf.shape[1], *leaf.shape[2:])


@dataclass
class _Slot:
    """One image in the batch and its host-side bookkeeping."""

    index: int
    x: torch.Tensor  # (1, 3, H, W)
    aligner: GuideAligner | None
    k_floor: int  # opt_nC (0 without the silhouette phase): K_eff = max(K, k_floor)
    stop_floor: int  # stop once K <= stop_floor (0 disables)
    opt_clusters: int | None
    init: dict[str, torch.Tensor]  # solo state dict at join time (dropped after the join)
    bn_batches: int  # num_batches_tracked of every BatchNorm
    t0: float
    it: int = 0  # iterations done
    last_target: torch.Tensor | None = field(default=None, repr=False)


class BatchedRefiner:
    """N per-image refinements of one size, trained as one grouped network.

    Most users want :func:`refine_batch`; this class is the engine: ``add`` images,
    ``step`` them all once, ``check`` the stopping rules and ``finish`` the ones done.

    Parameters
    ----------
    config : RefineConfig
    device : torch.device
    size : (H, W)
        Size shared by every image of this refiner.
    backend : str, optional
        Forces the loss backend (``"torch"`` = plain reference).
    channels_last : bool, optional
        Channels-last convolutions (as :func:`dynaguide.refine.refine`); default True for
        ``"grouped"``, False for ``"vmap"`` (which cannot use them).
    method : {"grouped", "vmap"}
        Grouped convolutions (default) or ``torch.func.vmap`` over ``functional_call``.
    amp : bool
        bf16 autocast for the network (as :class:`dynaguide.refine.RefineStep`).
    check_every : int, optional
        Iterations between stopping checks (default: 1 on CPU, ``config.check_every``
        on CUDA, as :func:`dynaguide.refine.refine`).
    """

    def __init__(
        self,
        config: RefineConfig,
        device: torch.device,
        size: tuple[int, int],
        *,
        backend: str | None = None,
        channels_last: bool | None = None,
        method: Method = "grouped",
        amp: bool = False,
        check_every: int | None = None,
    ):
        channels_last = _check_method(method, channels_last)
        self.amp = amp
        self.config = config
        self.device = device
        self.size = size
        self.backend = backend
        self.method = method
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        if check_every is None:
            check_every = 1 if device.type == "cpu" else config.check_every
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")
        self.every = check_every
        self.template = build_model(config, device=device)
        self.template.train()
        self.param_layout = {
            n: _Layout(n, p.shape, channels_last) for n, p in self.template.named_parameters()
        }
        self.buffer_names = [
            n for n, _ in self.template.named_buffers() if not n.endswith("num_batches_tracked")
        ]
        self.slots: list[_Slot] = []
        self.params: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        self.opt: torch.optim.SGD | None = None
        # per-slot device state, (N, ...) each; filled by rebuild()
        h, w = size
        self.x = torch.zeros(1, 0, h, w, device=device)
        self.k_floor = torch.zeros(0, dtype=torch.long, device=device)
        self.hist_loss = torch.zeros(0, config.max_iter, device=device)
        self.hist_k = torch.zeros(0, config.max_iter, dtype=torch.long, device=device)
        self.targets = torch.zeros(0, h, w, dtype=torch.long, device=device)
        self.prev_labels = torch.zeros(0, h, w, dtype=torch.long, device=device)
        self.its = torch.zeros(0, dtype=torch.long, device=device)
        self.stopper = Stopper(config, device, size, check_every)
        # The fused kernel takes one guidance weight for the batch; an annealed weight
        # differs per image (each slot is at its own iteration): use the three losses.
        self.fused = None if config.guidance_anneal > 0 else fused_kernel(device, backend)
        self._vmapped: Callable[..., torch.Tensor] | None = None

    # ------------------------------------------------------------------ membership
    def __len__(self) -> int:
        return len(self.slots)

    def new_slot(
        self, index: int, image: np.ndarray, guide_labels: np.ndarray | None, seed: int
    ) -> _Slot:
        """Build image ``index``'s network exactly as :class:`RefineStep` does (same seed,
        same silhouette phase, same guide aligner) and return it as a slot for :meth:`rebuild`."""
        cfg = self.config
        solo = RefineStep(
            image, cfg, guide_labels=guide_labels, device=self.device, seed=seed,
            backend=self.backend, channels_last=self.fmt == torch.channels_last,
        )  # fmt: skip
        floor = stop_floor(cfg, solo.opt_clusters)
        nbt = int(solo.model.out_norm.num_batches_tracked)
        state = {k: v.detach() for k, v in solo.model.state_dict().items()}
        return _Slot(
            index=index, x=solo.x, aligner=solo.aligner, k_floor=solo.opt_clusters or 0,
            stop_floor=floor, opt_clusters=solo.opt_clusters, init=state, bn_batches=nbt,
            t0=time.perf_counter(),
        )  # fmt: skip

    def rebuild(self, keep: Sequence[int], new: Sequence[_Slot]) -> None:
        """Keep the slots at positions ``keep`` (parameters, momentum, buffers, histories
        sliced) and append the ``new`` ones (fresh parameters, zero momentum)."""
        cfg, dev = self.config, self.device
        keep_idx = torch.tensor(list(keep), dtype=torch.long, device=dev)
        old_momentum: dict[str, torch.Tensor | None] = {}
        if self.opt is not None:
            for name, leaf in self.params.items():
                old_momentum[name] = self.opt.state.get(leaf, {}).get("momentum_buffer")

        def merged(old: torch.Tensor | None, rows: list[torch.Tensor]) -> torch.Tensor:
            parts = []
            if len(keep):
                if old is None:
                    raise RuntimeError("internal error: kept slots without state")
                parts.append(old.detach().index_select(0, keep_idx))
            if rows:
                parts.append(torch.stack(rows))
            return torch.cat(parts) if len(parts) > 1 else parts[0].clone()

        params: dict[str, torch.Tensor] = {}
        momentum: dict[str, torch.Tensor] = {}
        for name, lay in self.param_layout.items():
            rows = [lay.to_leaf(s.init[name].to(dev)) for s in new]
            leaf = merged(self.params.get(name), rows).requires_grad_(True)
            params[name] = leaf
            if cfg.momentum > 0:
                prev = old_momentum.get(name)
                momentum[name] = merged(prev, [torch.zeros_like(r) for r in rows])
        buffers = {
            name: merged(self.buffers.get(name), [s.init[name].to(dev) for s in new])
            for name in self.buffer_names
        }
        for s in new:
            s.init = {}
        self.slots = [self.slots[p] for p in keep] + list(new)
        self.params, self.buffers = params, buffers
        self.opt = torch.optim.SGD(
            list(params.values()), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        for name, leaf in params.items():
            if name in momentum:
                self.opt.state[leaf]["momentum_buffer"] = momentum[name]

        n = len(self.slots)
        h, w = self.size
        self.x = torch.cat([s.x for s in self.slots], dim=1).contiguous(memory_format=self.fmt)
        self.k_floor = torch.tensor([s.k_floor for s in self.slots], dtype=torch.long, device=dev)
        fresh = len(new)
        self.hist_loss = merged(self.hist_loss, [torch.zeros(cfg.max_iter, device=dev)] * fresh)
        self.hist_k = merged(
            self.hist_k, [torch.zeros(cfg.max_iter, dtype=torch.long, device=dev)] * fresh
        )
        self.stopper.rebuild(
            keep,
            [s.stop_floor for s in new],
            [None if cfg.time_budget is None else s.t0 + cfg.time_budget for s in new],
        )
        self.targets = merged(
            self.targets,
            [torch.full((h, w), IGNORE_INDEX, dtype=torch.long, device=dev)] * fresh,
        )
        self.prev_labels = merged(
            self.prev_labels, [torch.zeros(h, w, dtype=torch.long, device=dev)] * fresh
        )
        for s in new:
            s.last_target = None
        self.its = torch.tensor([s.it for s in self.slots], dtype=torch.long, device=dev)
        assert self.hist_loss.shape[0] == n

    # ------------------------------------------------------------------ forward
    def forward(self) -> torch.Tensor:
        """Response maps of all slots, (N, C, H, W), with the current parameters."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            if self.method == "vmap":
                return self._forward_vmap()
            return self._forward_grouped()

    def _conv(self, prefix: str, x: torch.Tensor, module: nn.Conv2d) -> torch.Tensor:
        w = self.param_layout[prefix + ".weight"].grouped(self.params[prefix + ".weight"])
        b = self.params[prefix + ".bias"].reshape(-1)
        return F.conv2d(x, w, b, stride=1, padding=module.padding, groups=len(self.slots))

    def _norm(self, prefix: str, x: torch.Tensor, module: nn.BatchNorm2d) -> torch.Tensor:
        return F.batch_norm(
            x,
            self.buffers[prefix + ".running_mean"].view(-1),
            self.buffers[prefix + ".running_var"].view(-1),
            self.params[prefix + ".weight"].reshape(-1),
            self.params[prefix + ".bias"].reshape(-1),
            training=True,
            momentum=module.momentum if module.momentum is not None else 0.0,
            eps=module.eps,
        )

    def _forward_grouped(self) -> torch.Tensor:
        m: RefineNet = self.template
        x = self.x
        first = self._conv("convs.0", x, m.convs[0])
        h = self._norm("norms.0", torch.relu(first), m.norms[0])
        for i in range(1, len(m.convs)):
            h = self._norm(
                f"norms.{i}", torch.relu(self._conv(f"convs.{i}", h, m.convs[i])), m.norms[i]
            )
        if m.skip_mode == "shared":
            h = h + first
        elif m.skip is not None:
            h = h + self._conv("skip", x, m.skip)
        out = self._norm("out_norm", self._conv("classifier", h, m.classifier), m.out_norm)
        # squeeze, not [0]: select's backward would build a zero tensor and copy into it
        response = out.unflatten(1, (len(self.slots), self.config.n_channels)).squeeze(0)
        # In channels-last the images are interleaved within each pixel (strides C, 1,
        # W*N*C, N*C). One copy gives every image the solo response's own layout: the loss
        # kernels then see what they see alone (the native ones would copy anyway), and
        # autograd accumulates the loss gradients in the same order, bit for bit.
        return response.contiguous(memory_format=self.fmt)

    def _forward_vmap(self) -> torch.Tensor:
        from torch.func import functional_call, vmap

        if self._vmapped is None:
            template = self.template

            def one(
                params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor
            ) -> torch.Tensor:
                return functional_call(template, (params, buffers), (x,))

            self._vmapped = vmap(one, in_dims=(0, 0, 0))
        params = {n: self.param_layout[n].to_solo(p) for n, p in self.params.items()}
        n = len(self.slots)
        x = self.x.view(1, n, -1, *self.size).transpose(0, 1)  # (N, 1, C_in, H, W)
        return self._vmapped(params, self.buffers, x)[:, 0]

    # ------------------------------------------------------------------ one iteration
    def step(self, refresh: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One training iteration of every slot; returns per-image (loss (N,), labels
        (N, H, W), K (N,)) as device tensors, and records loss and K in the histories.

        The objective is computed as :meth:`dynaguide.refine.RefineStep.step` computes it
        for each image: with the fused Triton objective where the loss backend is Triton
        (guide targets aligned to the previous iteration's labels; a guided image's first
        iteration, which has none, takes the unfused path), else with the three losses of
        :mod:`dynaguide.losses`.
        """
        assert self.opt is not None
        self.opt.zero_grad(set_to_none=True)
        response = self.forward()
        n = len(self.slots)
        everyone = list(range(n))
        ready = everyone
        if self.fused is not None:
            ready = [p for p, s in enumerate(self.slots) if s.aligner is None or s.it > 0]
        if self.fused is None or not ready:
            loss, labels, k = self._unfused(response, everyone, refresh)
        elif len(ready) == n:
            loss, labels, k = self._fused(response, everyone, refresh)
        else:  # guided newcomers this iteration: split the batch as the solo loops would
            first = [p for p in everyone if p not in ready]
            idx_r = torch.tensor(ready, dtype=torch.long, device=self.device)
            idx_f = torch.tensor(first, dtype=torch.long, device=self.device)
            lr, lab_r, k_r = self._fused(response.index_select(0, idx_r), ready, refresh)
            lf, lab_f, k_f = self._unfused(response.index_select(0, idx_f), first, refresh)
            loss = lr.new_zeros(n).index_copy(0, idx_r, lr).index_copy(0, idx_f, lf.to(lr.dtype))
            labels = lab_r.new_empty(n, *lab_r.shape[1:])
            labels.index_copy_(0, idx_r, lab_r).index_copy_(0, idx_f, lab_f)
            k = k_r.new_empty(n).index_copy_(0, idx_r, k_r).index_copy_(0, idx_f, k_f)
        loss.sum().backward()
        self.opt.step()
        self.prev_labels = labels
        loss = loss.detach()
        col = self.its.unsqueeze(1)
        self.hist_loss.scatter_(1, col, loss.unsqueeze(1))
        self.hist_k.scatter_(1, col, k.unsqueeze(1))
        self.its += 1
        for s in self.slots:
            s.it += 1
            s.bn_batches += 1
        return loss, labels, k

    def _rows(self, t: torch.Tensor, positions: Sequence[int]) -> torch.Tensor:
        """Rows ``positions`` of a per-slot tensor (the tensor itself for all slots)."""
        if len(positions) == len(self.slots):
            return t
        return t.index_select(0, torch.tensor(list(positions), dtype=torch.long, device=t.device))

    def _unfused(
        self, response: torch.Tensor, positions: Sequence[int], refresh: Sequence[bool]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image objective of the slots ``positions`` (rows of ``response``), three losses."""
        target_of = None
        if any(self.slots[p].aligner is not None for p in positions):

            def target_of(labels: torch.Tensor) -> torch.Tensor:
                self._update_targets(positions, labels, refresh)
                return self._rows(self.targets, positions)

        k_floor = self._rows(self.k_floor, positions)
        gw = None
        if self.config.guidance_anneal > 0:
            weights = [guidance_weight_at(self.config, self.slots[p].it) for p in positions]
            gw = torch.tensor(weights, dtype=torch.float32, device=response.device)
        return objective(
            response, self.config, k_floor, target_of, backend=self.backend, reduction="none",
            guidance_weight=gw,
        )  # fmt: skip

    def _fused(
        self, response: torch.Tensor, positions: Sequence[int], refresh: Sequence[bool]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-image objective of the slots ``positions`` through the fused Triton kernel."""
        assert self.fused is not None
        target = None
        if any(self.slots[p].aligner is not None for p in positions):
            self._update_targets(positions, self._rows(self.prev_labels, positions), refresh)
            target = self._rows(self.targets, positions)
        k_floor = self._rows(self.k_floor, positions)
        return fused_objective(self.fused, response, target, self.config, k_floor, reduction="none")

    def _update_targets(
        self, positions: Sequence[int], labels: torch.Tensor, refresh: Sequence[bool]
    ) -> None:
        """Align the guide of each slot in ``positions`` to its row of ``labels``
        (``labels[j]`` belongs to ``positions[j]``) into the per-slot target buffer."""
        for j, p in enumerate(positions):
            s = self.slots[p]
            if s.aligner is None:
                continue
            t = s.aligner.target(labels[j], refresh=refresh[p])
            # The aligner may update its target buffer in place (for CUDA graphs), so a
            # refresh always copies; without one it returns its previous target unchanged.
            if refresh[p] or t is not s.last_target:
                self.targets[p].copy_(t)
                s.last_target = t

    # ------------------------------------------------------------------ stopping
    def due(self) -> list[bool]:
        """Which slots reach one of their own stopping checks with the next iteration."""
        mx, every = self.config.max_iter, self.every
        return [(s.it + 1) % every == 0 or s.it + 1 == mx for s in self.slots]

    def check(
        self, due: Sequence[bool], labels: torch.Tensor, callback: BatchCallback | None = None
    ) -> dict[int, str]:
        """Stopping rules of the slots flagged in ``due`` (after their iteration), by
        :class:`dynaguide.stopping.Stopper` (the rules of a solo refinement) with a single
        device-to-host transfer. Returns ``{position: stop reason}``."""
        its = [s.it - 1 for s in self.slots]  # 0-based iteration just done
        res = self.stopper.check(due, its, self.hist_loss, self.hist_k, labels)
        out: dict[int, str] = {}
        for p, s in enumerate(self.slots):
            if not due[p]:
                continue
            if callback is not None:
                callback(s.index, its[p], res.loss[p], res.k[p])
            reason = res.reasons[p]
            if reason is not None:
                out[p] = reason
        return out

    def extract_model(self, p: int) -> RefineNet:
        """The solo network of the slot at position ``p`` (a copy of its parameters)."""
        model = build_model(self.config, device=self.device)
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(self.param_layout[name].to_solo(self.params[name][p]))
            for name, buf in model.named_buffers():
                if name in self.buffers:
                    buf.copy_(self.buffers[name][p])
                else:  # num_batches_tracked
                    buf.fill_(self.slots[p].bn_batches)
        return model.to(memory_format=self.fmt).train()

    def finish(self, p: int, reason: str, last: torch.Tensor) -> RefineResult:
        """The :class:`RefineResult` of the slot at position ``p``."""
        s = self.slots[p]
        n = s.it
        model = self.extract_model(p)
        labels = final_labels(model, s.x, last[p].clone(), self.config)
        return RefineResult(
            labels=labels,
            n_iter=n,
            loss_history=self.hist_loss[p, :n].tolist(),
            k_history=self.hist_k[p, :n].tolist(),
            stop_reason=reason,
            opt_clusters=s.opt_clusters,
            seconds=time.perf_counter() - s.t0,
            model=model,
        )


# --------------------------------------------------------------------------- driver
def _check_method(method: str, channels_last: bool | None) -> bool:
    """Validate ``method`` and resolve ``channels_last`` (None: True for grouped, False for vmap)."""
    if method not in ("grouped", "vmap"):
        raise ValueError(f"method must be 'grouped' or 'vmap', got {method!r}")
    if channels_last is None:
        return method == "grouped"
    if method == "vmap" and channels_last:
        raise ValueError(
            "method='vmap' needs channels_last=False: under torch.func.vmap, batch_norm's "
            "backward returns wrong input gradients when the vmapped dimension is interleaved "
            "with the channels, which is what channels-last grouped activations are (torch "
            f"{torch.__version__}; see the dynaguide.batched module docstring)"
        )
    return bool(channels_last)


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
    channels_last = _check_method(method, channels_last)
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
