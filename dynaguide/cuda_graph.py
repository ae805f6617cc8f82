"""Replaying a whole refinement iteration as a CUDA graph (:class:`CudaGraphStep`).

One iteration (forward, fused objective, backward, SGD step) is a few dozen kernel
launches; on a GPU they take less time than launching them. A CUDA graph records them once
and replays them with one launch. What that needs, and how this module provides it:

* Eager warm-up iterations (at least one: they compile the Triton kernels, let cuDNN and
  cuBLAS pick algorithms and allocate workspaces, and create the optimiser's momentum
  buffers). They are real iterations of the run, on one side stream created once and
  reused, and on the fused objective from the first one: for a guided image the first
  guide target is aligned to the labels of a gradient-free forward pass (the same labels
  the first training forward computes; the BatchNorm running statistics are restored), so
  no warm-up takes the unfused objective and its host synchronisations.
* A capture on that side stream, optionally into a memory pool shared with other graphs
  (``pool=torch.cuda.graph_pool_handle()``, for images refined one after another).
* Replays. The guide target is a static buffer that :class:`GuideAligner` updates in place
  between replays (the overlap alignment reads the live label set on the host only when
  ``refresh_alignment`` asks; the reference mode rebuilds its mapping every iteration on
  the host and cannot be captured).
* Returned tensors are copies: nothing the caller keeps points into graph memory, and
  when the step is closed (or garbage-collected) the graph, its static tensors and the
  parameter gradients allocated in its pool are dropped, so the pool can be freed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from dynaguide.refine import RefineStep

Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class CudaGraphs:
    """The CUDA operations :class:`CudaGraphStep` uses (tests substitute a CPU stand-in)."""

    def check(self, device: torch.device) -> None:
        """Raise ValueError unless graphs can be captured on ``device``."""
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, got {device}")

    def new_stream(self, device: torch.device) -> Any:
        """A side stream on ``device`` (created once per step)."""
        return torch.cuda.Stream(device=device)

    def run_on(self, stream: Any, device: torch.device, fn: Callable[[], Outputs]) -> Outputs:
        """Run ``fn`` on ``stream``, ordered after and before the current stream's work."""
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            out = fn()
        current.wait_stream(stream)
        return out

    def capture(
        self, stream: Any, pool: Any, fn: Callable[[], Outputs]
    ) -> tuple[Callable[[], None], Outputs]:
        """Capture ``fn`` on ``stream`` (into ``pool``); return (replay, static outputs)."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            out = fn()
        return graph.replay, out


def _drop_grads(params: Sequence[torch.nn.Parameter], captured: list[bool]) -> None:
    """Release the parameter gradients a capture allocated in the graph's pool."""
    if captured[0]:
        for p in params:
            p.grad = None


class CudaGraphStep:
    """Runs :class:`~dynaguide.refine.RefineStep` iterations, replaying them as a CUDA graph.

    Parameters
    ----------
    state : RefineStep
        On a CUDA device, with the fused Triton objective (the plain torch losses count the
        labels on the host) and not the ``"reference"`` guide alignment.
    warmup : int
        Eager iterations before the capture (>= 1).
    pool : optional
        Graph memory pool, e.g. ``torch.cuda.graph_pool_handle()`` shared by the steps of
        images refined one after another (never by steps replayed concurrently).
    graphs : CudaGraphs, optional
        The CUDA operations (a stand-in for tests).
    """

    def __init__(
        self,
        state: RefineStep,
        *,
        warmup: int = 3,
        pool: Any = None,
        graphs: CudaGraphs | None = None,
    ):
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(
                f"warmup must be an int >= 1 (the capture needs one eager iteration first), "
                f"got {warmup!r}"
            )
        self.graphs = graphs if graphs is not None else CudaGraphs()
        self.graphs.check(state.device)
        if state.aligner is not None and state.aligner.mode == "reference":
            raise ValueError("the 'reference' guide alignment cannot be captured in a CUDA graph")
        if state.fused is None:
            raise ValueError(
                "CUDA graphs need the fused Triton objective (loss backend 'triton'): the "
                "other backends synchronise with the host"
            )
        self.state = state
        self.warmup = warmup
        self.pool = pool
        self.calls = 0
        self._stream: Any = None
        self._replay: Callable[[], None] | None = None
        self.static: Outputs | None = None
        self._captured = [False]
        weakref.finalize(self, _drop_grads, list(state.model.parameters()), self._captured)
        if state.aligner is not None and state.prev_labels is None:
            state.prev_labels = state.peek_labels()  # fused from the first warm-up on

    @property
    def captured(self) -> bool:
        """Whether the graph has been captured (later calls replay it)."""
        return self._replay is not None

    def __call__(self, *, refresh_alignment: bool = True) -> Outputs:
        """Run one iteration; returns (loss, labels, K), copies the caller may keep."""
        state = self.state
        self.calls += 1
        if self._stream is None:
            self._stream = self.graphs.new_stream(state.device)
        if self._replay is None and self.calls <= self.warmup:
            return self.graphs.run_on(
                self._stream,
                state.device,
                lambda: state.step(refresh_alignment=refresh_alignment),
            )
        if self._replay is None:
            if refresh_alignment and state.aligner is not None and state.prev_labels is not None:
                state.aligner.target(state.prev_labels, refresh=True)  # eager, before capture
            state.opt.zero_grad(set_to_none=True)
            self._replay, self.static = self.graphs.capture(
                self._stream,
                self.pool,
                lambda: state.step(refresh_alignment=False, zero_grad=False),
            )
            self._captured[0] = True
        elif refresh_alignment and state.aligner is not None and self.static is not None:
            state.aligner.target(self.static[1], refresh=True)  # in-place buffer update
        self._replay()
        assert self.static is not None
        loss, labels, k = self.static
        return loss.clone(), labels.clone(), k.clone()

    def close(self) -> None:
        """Drop the graph, its static tensors and the gradients allocated in its pool."""
        _drop_grads(list(self.state.model.parameters()), self._captured)
        self._replay = None
        self.static = None
        if self._captured[0] and self.state.prev_labels is not None:
            self.state.prev_labels = self.state.prev_labels.clone()  # out of graph memory
        self._captured[0] = False
