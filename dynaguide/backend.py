"""Call-time selection of the implementation behind each fast op.

Every fast op has a plain PyTorch reference. At call time the dispatcher picks
Triton for CUDA tensors when Triton is importable, the native C++ extension for CPU
tensors when it was built, else the reference. ``DYNAGUIDE_BACKEND=torch|triton|native``
forces one; forcing one that is unavailable (or that cannot take the tensor's device)
raises, and a silent fallback only happens when nothing was forced.

Nothing heavy is imported here: Triton and the native extension load lazily, the
first time a call needs them.
"""

from __future__ import annotations

import functools
import importlib
import os
from typing import Literal

import torch

Backend = Literal["torch", "triton", "native"]
BACKENDS: tuple[Backend, ...] = ("torch", "triton", "native")
_ENV = "DYNAGUIDE_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was forced (argument or ``DYNAGUIDE_BACKEND``) but cannot run here."""


@functools.cache
def _probe(name: str) -> tuple[bool, str]:
    """Return (available, reason) for one optional backend, importing it once."""
    if name == "torch":
        return True, f"torch {torch.__version__}"
    if name == "native":
        try:
            mod = importlib.import_module("dynaguide._native")
        except ImportError as exc:  # extension not built in this install
            return False, f"dynaguide._native not importable: {exc}"
        cuda = bool(getattr(mod, "has_cuda", lambda: False)())
        isa = getattr(mod, "cpu_isa", lambda: "base")()
        return True, f"dynaguide._native (OpenMP threads={mod.max_threads()}, {isa}, cuda={cuda})"
    if name == "triton":
        try:
            triton = importlib.import_module("triton")
        except ImportError as exc:
            return False, f"triton not importable: {exc}"
        try:
            importlib.import_module("dynaguide.kernels")
        except ImportError as exc:
            return False, f"dynaguide.kernels not importable: {exc}"
        interp = os.environ.get("TRITON_INTERPRET") == "1"
        return True, f"triton {triton.__version__}" + (" (interpreter)" if interp else "")
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")


def available(name: str) -> bool:
    """Whether backend ``name`` can be loaded in this environment."""
    return _probe(name)[0]


def forced() -> Backend | None:
    """The backend forced through ``DYNAGUIDE_BACKEND``, or None."""
    value = os.environ.get(_ENV, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise BackendUnavailableError(f"{_ENV}={value!r} is not one of {BACKENDS}")
    return value  # type: ignore[return-value]


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "triton":
        return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    if name == "native":
        return device.type == "cpu"
    return False


def select(
    device: torch.device, *, supported: tuple[Backend, ...], backend: str | None = None
) -> Backend:
    """Pick the backend for an op on ``device``.

    Parameters
    ----------
    device : torch.device
        Where the op's input tensors live.
    supported : tuple of str
        Backends that implement this op (``"torch"`` always should).
    backend : str, optional
        Explicit choice for this call; overrides ``DYNAGUIDE_BACKEND``.

    Raises
    ------
    BackendUnavailableError
        When a forced backend is missing, does not implement the op, or cannot run
        on ``device``.
    """
    choice = backend.lower() if backend else forced()
    if choice is not None:
        if choice not in BACKENDS:
            raise BackendUnavailableError(f"backend {choice!r} is not one of {BACKENDS}")
        if choice not in supported:
            raise BackendUnavailableError(
                f"backend {choice!r} does not implement this op (has {supported})"
            )
        ok, why = _probe(choice)
        if not ok:
            raise BackendUnavailableError(
                f"backend {choice!r} was forced but is unavailable: {why}"
            )
        if not _runs_on(choice, device):
            raise BackendUnavailableError(
                f"backend {choice!r} was forced but cannot run on {device}"
            )
        return choice  # type: ignore[return-value]
    if device.type == "cuda" and "triton" in supported and available("triton"):
        return "triton"
    if device.type == "cpu" and "native" in supported and available("native"):
        return "native"
    return "torch"


def env_report() -> dict[str, str]:
    """Say which backends are available here and why, plus the device situation."""
    report: dict[str, str] = {}
    for name in BACKENDS:
        ok, why = _probe(name)
        report[name] = ("available: " if ok else "unavailable: ") + why
    report["forced"] = os.environ.get(_ENV, "") or "(none)"
    report["cuda"] = (
        f"{torch.cuda.device_count()} device(s): {torch.cuda.get_device_name(0)}"
        if torch.cuda.is_available()
        else "no CUDA device"
    )
    report["torch_threads"] = str(torch.get_num_threads())
    return report
