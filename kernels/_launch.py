"""Launching the loss kernels: on the tensors' device, or compile-only for a GPU without one.

* :func:`launch` runs a kernel under the CUDA device of its tensor arguments (Triton
  launches on the *current* device: a tensor on ``cuda:1`` with ``cuda:0`` current would
  get device-1 pointers dereferenced on device 0). Switching is skipped when the device is
  already current (one cheap query).
* :func:`compile_only` replaces launches by Triton's real specialisation and code
  generation for a CUDA target, so that a machine without a GPU can check that every
  kernel compiles, count its registers and count its specialisations.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch


def interpreting() -> bool:
    """Whether Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


# ------------------------------------------------------------------ compile-only mode
class _CompileOnlyDriver:
    """Minimal stand-in for Triton's active driver: reports a fixed GPU target.

    Lets :func:`compile_only` run Triton's real specialisation and code generation for a
    GPU on a machine that has none (nothing is launched).
    """

    def __init__(self, target: Any):
        self._target = target

    @classmethod
    def is_active(cls) -> bool:
        return False

    def get_current_target(self) -> Any:
        return self._target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def map_python_to_cpp_type(self, ty: str) -> str:  # pragma: no cover - not used
        raise NotImplementedError

    def get_benchmarker(self) -> Any:  # pragma: no cover - not used
        raise NotImplementedError


_compile_only: list[tuple[str, Any]] | None = None


@contextlib.contextmanager
def compile_only(arch: int = 90) -> Iterator[list[tuple[str, Any]]]:
    """Compile kernels for CUDA ``sm_<arch>`` instead of launching them.

    Inside the context, every kernel launch of this package is replaced by Triton's
    ``warmup`` (full specialisation on the real arguments, then code generation down to
    a cubin) against a fake driver, and the compiled kernels are collected in the yielded
    list as ``(kernel name, CompiledKernel)``. Outputs of the public functions are
    garbage in this mode. Needs ``TRITON_INTERPRET`` unset before this package is
    imported (the interpreter replaces kernels at definition time).

    Parameters
    ----------
    arch : int
        CUDA compute capability times ten (90 = H100).
    """
    global _compile_only
    if interpreting():
        raise RuntimeError(
            "compile_only() needs TRITON_INTERPRET unset when dynaguide.kernels is imported"
        )
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    previous = driver._active
    compiled: list[tuple[str, Any]] = []
    driver.set_active(_CompileOnlyDriver(GPUTarget("cuda", arch, 32)))  # type: ignore[arg-type]
    _compile_only = compiled
    try:
        yield compiled
    finally:
        _compile_only = None
        driver._active = previous


def compiling() -> bool:
    """Whether launches are being replaced by compilation (inside :func:`compile_only`)."""
    return _compile_only is not None


def tensor_device(args: tuple[Any, ...]) -> torch.device | None:
    """Device of the first tensor among a kernel's arguments (None when there is none)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def device_guard(device: torch.device | None) -> contextlib.AbstractContextManager:
    """Context that makes ``device`` the current CUDA device for a launch.

    A no-op for non-CUDA devices and when ``device`` is already current.
    """
    if device is None or device.type != "cuda" or device.index is None:
        return contextlib.nullcontext()
    if device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """Launch ``kernel`` on ``grid`` under its tensors' device (or only compile it inside
    :func:`compile_only`)."""
    if _compile_only is not None:
        compiled = kernel.warmup(*args, grid=grid, **meta)
        _compile_only.append((kernel.fn.__name__, compiled))
        return
    with device_guard(tensor_device(args)):
        kernel[grid](*args, **meta)
