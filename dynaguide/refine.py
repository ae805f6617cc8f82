"""The per-image optimisation loop of DFC (Kim, Kanezaki and Tanaka, IEEE TIP 2020),
DynaSeg (IVC 2024) and DynaGuide (IVC 2025).

One iteration: forward the image through a fresh network, take the argmax labels and
their count K, form ``sim + w(K) * continuity (+ guidance)``, back-propagate, SGD step.

K, the dynamic weight and the loss history stay on the device: nothing in the iteration
waits for the host. The objective is :mod:`dynaguide.objective`'s; the stopping rules are
:mod:`dynaguide.stopping`'s (one image is a batch of one), checked every iteration on CPU
(where reading a number costs nothing) and every ``config.check_every`` iterations on CUDA.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from dynaguide import dispatch
from dynaguide.config import RefineConfig
from dynaguide.cpu_runtime import HeapReuse, serial
from dynaguide.cuda_graph import CudaGraphStep
from dynaguide.errors import RefinementDivergedError
from dynaguide.guidance.align import GuideAligner
from dynaguide.model import RefineNet, build_model, mixed_precision
from dynaguide.objective import (  # noqa: F401 - dynamic_weight: the public name here too
    dynamic_weight,
    fused_objective,
    guidance_weight_at,
    objective,
)
from dynaguide.stopping import Stopper, check_interval, stop_floor

ProgressCallback = Callable[[int, float, int], None]


@dataclass
class RefineResult:
    """Raw outcome of :func:`refine` (labels are CNN channel ids, not yet compact)."""

    labels: torch.Tensor  # (H, W) int64 on the refinement device
    n_iter: int
    loss_history: list[float]
    k_history: list[int]
    stop_reason: str
    opt_clusters: int | None
    seconds: float
    model: RefineNet | None  # None when no refinement ran (max_iter=0)


def image_tensor(image: np.ndarray, config: RefineConfig, device: torch.device) -> torch.Tensor:
    """(1, C_in, H, W) float32 network input, channels-last.

    RGB in [0, 1] in ``config.input_order``, then per ``config.input_features`` CIE-LAB
    (L / 100, a / 128, b / 128) and the pixel coordinates (row, column) in [0, 1].
    """
    x = torch.from_numpy(np.ascontiguousarray(image)).to(device)
    if config.input_order == "bgr":
        x = x.flip(-1)
    x = x.permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    parts = [x]
    if "lab" in config.input_features:
        from skimage.color import rgb2lab

        lab = rgb2lab(image).astype(np.float32) / np.array([100.0, 128.0, 128.0], np.float32)
        parts.append(torch.from_numpy(lab).to(device).permute(2, 0, 1).unsqueeze(0))
    if "xy" in config.input_features:
        h, w = image.shape[:2]
        rows = torch.linspace(0.0, 1.0, h, device=device).view(1, 1, h, 1).expand(1, 1, h, w)
        cols = torch.linspace(0.0, 1.0, w, device=device).view(1, 1, 1, w).expand(1, 1, h, w)
        parts += [rows, cols]
    if len(parts) > 1:
        x = torch.cat(parts, dim=1)
    return x.contiguous(memory_format=torch.channels_last)


def guide_boundary_band(guide: torch.Tensor, margin: int) -> torch.Tensor:
    """(H, W) bool: pixels within ``margin`` pixels (Chebyshev) of a change of guide label."""
    ids = torch.unique(guide, return_inverse=True)[1]  # compact: exact in float32
    g = ids.view(1, 1, *guide.shape).float()
    k = 2 * margin + 1
    hi = torch.nn.functional.max_pool2d(g, k, stride=1, padding=margin)
    lo = -torch.nn.functional.max_pool2d(-g, k, stride=1, padding=margin)
    return (hi != lo)[0, 0]


class RefineStep:
    """One network, optimiser and objective: ``step()`` runs one training iteration.

    Parameters
    ----------
    image : ndarray (H, W, 3) uint8 RGB
    config : RefineConfig
    guide_labels : ndarray (H, W) int, optional
    device : torch.device
    seed : int
    backend : str, optional
        Forces the loss backend (``"torch"`` for the plain reference path).
    channels_last : bool
        Run the convolutions in channels-last layout (much faster on CPU).
    """

    def __init__(
        self,
        image: np.ndarray,
        config: RefineConfig,
        *,
        guide_labels: np.ndarray | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        backend: str | None = None,
        channels_last: bool = True,
        amp: bool = False,
    ):
        device = torch.device(device)
        self.config = config
        self.backend = backend
        self.device = device
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.x = image_tensor(image, config, device).contiguous(memory_format=fmt)
        self.model = build_model(config, seed=seed, device=device).to(memory_format=fmt)
        self.model.train()
        self.autocast = mixed_precision(self.model, device, amp)
        self.opt = torch.optim.SGD(
            self.model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        self.opt_clusters = _silhouette_phase(image, config, self.model, self.x, seed)
        self.k_floor = torch.tensor(self.opt_clusters or 0, device=device)
        self.aligner = None
        if guide_labels is not None and config.guidance_weight > 0:
            g = torch.from_numpy(np.asarray(guide_labels, dtype=np.int64)).to(device)
            if config.guide_margin > 0:
                g = torch.where(guide_boundary_band(g, config.guide_margin), -1, g)
            self.aligner = GuideAligner(g, config.n_channels, config.alignment)
        self.iteration = 0
        self.fused = fused_kernel(device, backend)
        self.prev_labels: torch.Tensor | None = None
        if device.type == "cpu":  # freed activation blocks stay for the next iteration
            weakref.finalize(self, HeapReuse().close)

    def step(
        self, *, refresh_alignment: bool = True, zero_grad: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One iteration; returns (loss, labels (H, W), K) as device tensors.

        The labels and K are those of this iteration's forward pass (before its SGD
        step), as in the authors' loop.
        """
        cfg, be = self.config, self.backend
        gw = guidance_weight_at(cfg, self.iteration)
        self.iteration += 1
        # small operations (alignment, optimiser step) on one thread on CPU: cpu_runtime.serial
        small = serial if self.device.type == "cpu" else contextlib.nullcontext
        if zero_grad:
            self.opt.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            response = self.model(self.x).squeeze(0)  # a view whose backward is a view
        if self.fused is not None and (self.aligner is None or self.prev_labels is not None):
            # One fused kernel pair for the whole objective; the guide alignment is refreshed
            # from the previous iteration's labels (the current ones come out of the kernel).
            target = None
            if self.aligner is not None and gw > 0:
                with small():
                    target = self.aligner.target(self.prev_labels, refresh=refresh_alignment)
            loss, labels, k = fused_objective(
                self.fused, response, target, cfg, self.k_floor, guidance_weight=gw
            )
        else:
            aligner = self.aligner

            def target_of(lab: torch.Tensor) -> torch.Tensor:
                assert aligner is not None
                with small():
                    return aligner.target(lab, refresh=refresh_alignment)

            loss, labels, k = objective(
                response, cfg, self.k_floor, None if aligner is None else target_of, backend=be,
                guidance_weight=gw,
            )  # fmt: skip
        loss.backward()
        with small():
            self.opt.step()
        self.prev_labels = labels
        return loss.detach(), labels, k

    @torch.no_grad()
    def peek_labels(self) -> torch.Tensor:
        """Argmax labels (H, W) of the current network, without training side effects.

        The same labels as the next training forward (train-mode BatchNorm with batch
        statistics); the running statistics that forward updates are restored.
        """
        buffers = [b.clone() for b in self.model.buffers()]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            labels = self.model(self.x).squeeze(0).argmax(dim=0)
        for b, saved in zip(self.model.buffers(), buffers, strict=True):
            b.copy_(saved)
        return labels


def fused_kernel(device: torch.device, backend: str | None) -> Callable | None:
    """The fused objective kernel (``fused_objective`` in :mod:`dynaguide.dispatch`) when the
    loss backend chosen for ``device`` is Triton, else None (the three losses)."""
    if dispatch.resolve("similarity_loss", device, backend).backend != "triton":
        return None
    return dispatch.resolve("fused_objective", device, "triton").fn


def refine(
    image: np.ndarray,
    config: RefineConfig,
    *,
    guide_labels: np.ndarray | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    callback: ProgressCallback | None = None,
    backend: str | None = None,
    channels_last: bool = True,
    amp: bool = False,
    cuda_graph: bool = False,
    deadline: float | None = None,
) -> RefineResult:
    """Train a fresh network on one image and return its argmax labels.

    Parameters
    ----------
    image : ndarray (H, W, 3) uint8 RGB
        Already validated (see :func:`dynaguide.io.load_image`) and at refinement size.
    config : RefineConfig
    guide_labels : ndarray (H, W) int, optional
        Pseudo-labels (negative = unguided); aligned to the channels per
        ``config.alignment``.
    device : str or torch.device
    seed : int
        Seeds the weight initialisation (and the silhouette sample). CPU runs are
        deterministic for a given seed.
    callback : callable(iteration, loss, K), optional
        Called at every stopping check (every iteration on CPU).
    backend : str, optional
        Force a loss backend (``"torch"`` = plain reference path).
    channels_last : bool
        Channels-last convolutions (default; the reference path uses False).
    amp : bool
        Mixed precision: bf16 autocast for the convolutions on CUDA; on CPUs with native
        bf16 the hidden 3x3 convolutions in bf16 (losses and normalisation in float32).
    cuda_graph : bool
        Capture the iteration in a CUDA graph and replay it (CUDA only).
    deadline : float, optional
        ``time.perf_counter()`` value after which the loop stops at its next check
        (default: ``config.time_budget`` seconds after the start of this call).

    Raises
    ------
    RefinementDivergedError
        The loss became NaN or infinite (checked at each stopping check: every iteration
        on CPU, every ``check_every`` on CUDA).
    """
    dev = torch.device(device)
    t0 = time.perf_counter()
    if config.max_iter == 0:
        return _guide_only(guide_labels, dev, t0)
    if cuda_graph and config.guidance_anneal > 0:
        raise ValueError(
            "guidance_anneal changes the guidance weight every iteration and cannot be "
            "captured in a CUDA graph: use cuda_graph=False or guidance_anneal=0"
        )
    state = RefineStep(
        image,
        config,
        guide_labels=guide_labels,
        device=dev,
        seed=seed,
        backend=backend,
        channels_last=channels_last,
        amp=amp,
    )
    run_step = CudaGraphStep(state) if cuda_graph else state.step
    budget = config.time_budget
    if deadline is None and budget is not None:
        deadline = t0 + budget
    every = check_interval(config, dev)
    stopper = Stopper(config, dev, image.shape[:2], every)
    stopper.rebuild([], [stop_floor(config, state.opt_clusters)], [deadline], [budget])
    loss_hist = torch.zeros(1, config.max_iter, device=dev)
    k_hist = torch.zeros(1, config.max_iter, dtype=torch.int64, device=dev)
    stop_reason = f"max_iter ({config.max_iter})"
    labels = None
    n_iter = config.max_iter
    for it in range(config.max_iter):
        at_check = (it + 1) % every == 0 or it + 1 == config.max_iter
        loss, labels, k = run_step(refresh_alignment=at_check or it == 0)
        loss_hist[0, it] = loss
        k_hist[0, it] = k
        if at_check:
            res = stopper.check([True], [it], loss_hist, k_hist, labels.unsqueeze(0))
            if not res.finite[0]:
                raise RefinementDivergedError(
                    f"refinement diverged: the loss is NaN or infinite by iteration {it + 1} "
                    f"(lr={config.lr:g}); lower lr or check the weights of the losses"
                )
            if callback is not None:
                callback(it, res.loss[0], res.k[0])
            if res.reasons[0] is not None:
                stop_reason, n_iter = res.reasons[0], it + 1
                break

    assert labels is not None
    labels = final_labels(state.model, state.x, labels, config)
    return RefineResult(
        labels=labels,
        n_iter=n_iter,
        loss_history=loss_hist[0, :n_iter].tolist(),
        k_history=k_hist[0, :n_iter].tolist(),
        stop_reason=stop_reason,
        opt_clusters=state.opt_clusters,
        seconds=time.perf_counter() - t0,
        model=state.model,
    )


def _guide_only(guide_labels: np.ndarray | None, device: torch.device, t0: float) -> RefineResult:
    """The result of ``max_iter=0``: the guide's labels, no network."""
    if guide_labels is None:
        raise ValueError("max_iter=0 (no refinement) needs a guide: pass guidance=")
    labels = torch.from_numpy(np.asarray(guide_labels, dtype=np.int64)).to(device)
    return RefineResult(
        labels=labels,
        n_iter=0,
        loss_history=[],
        k_history=[],
        stop_reason="no refinement (max_iter=0)",
        opt_clusters=None,
        seconds=time.perf_counter() - t0,
        model=None,
    )


def _silhouette_phase(
    image: np.ndarray, config: RefineConfig, model: RefineNet, x: torch.Tensor, seed: int
) -> int | None:
    if config.silhouette == "off":
        return None
    from dynaguide.silhouette import optimal_clusters, pixel_features

    response = None
    if config.silhouette_features == "response":
        with torch.no_grad():
            response = model(x)[0].float().cpu().numpy()
        # The forward above updated the BN running statistics; that is harmless in train mode.
    feats = pixel_features(image, config.silhouette_features, response)
    return optimal_clusters(
        feats, k_range=config.silhouette_k, samples=config.silhouette_samples, seed=seed
    )


@torch.no_grad()
def final_labels(
    model: RefineNet, x: torch.Tensor, last: torch.Tensor, config: RefineConfig
) -> torch.Tensor:
    """The labels a refinement returns: the last iteration's (``final_pass="last"``) or one
    more forward in train or eval mode."""
    if config.final_pass == "last":
        return last
    model.train(config.final_pass == "train")
    out = model(x)[0].argmax(dim=0)
    model.train()
    return out
