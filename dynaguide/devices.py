"""Where a segmentation runs: device choice, torch threads and ONNX Runtime providers.

``device="auto"`` (the default of :func:`dynaguide.segment`, :func:`dynaguide.segment_batch`
and the CLI) picks the first CUDA device when torch sees one and the CPU otherwise. Apple's
Metal backend is used only when asked for by name (``device="mps"``), since it needs a
torch built with it; asking for it elsewhere is a clear error, like asking for CUDA
without a GPU.

:func:`torch_threads` sets torch's intra-op thread count for one call and restores the
previous count afterwards, so a library call never changes the threads of the program
that called it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from dynaguide.errors import as_int

__all__ = ["AUTO", "onnx_providers", "resolve_device", "torch_threads"]

#: The device request that picks CUDA when present, else the CPU.
AUTO = "auto"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Validate a device request and return the device it names.

    Parameters
    ----------
    device : "auto", "cpu", "cuda", "cuda:N", "mps", a torch.device, or None
        ``"auto"`` and None: ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``.

    Raises
    ------
    ValueError
        An unparsable device, CUDA or MPS requested where torch cannot use it, a CUDA
        index past the devices present, or another device type.
    """
    if device is None or (isinstance(device, str) and device.strip().lower() == AUTO):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
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
    elif dev.type == "mps":
        if not _mps_available():
            raise ValueError(
                f"device {device!r} requested but this torch ({torch.__version__}) has no usable "
                "MPS backend (it needs macOS on Apple silicon and a torch built with MPS)"
            )
    elif dev.type != "cpu":
        raise ValueError(
            f"device {device!r} is not supported; use 'auto', 'cpu', 'cuda[:N]' or 'mps'"
        )
    return dev


@contextlib.contextmanager
def torch_threads(num_threads: Any, *, name: str = "num_threads") -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(num_threads)``; restore the count after.

    Parameters
    ----------
    num_threads : int >= 1 or None
        None leaves the thread count alone.
    name : str
        What error messages call the value.

    Raises
    ------
    ValueError, TypeError
        ``num_threads`` is not None or an int >= 1.
    """
    if num_threads is None:
        yield
        return
    n = as_int(num_threads, name, minimum=1, maximum=4096)
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def onnx_providers() -> list[str] | str:
    """ONNX Runtime's available execution providers, or a sentence saying why there are none."""
    try:
        import onnxruntime
    except ImportError as exc:
        return f"onnxruntime not installed ({exc.name or exc}); pip install 'dynaguide[cpu]'"
    return list(onnxruntime.get_available_providers())
