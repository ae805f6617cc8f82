"""Which backends exist here: availability probes, ``DYNAGUIDE_BACKEND`` and the report.

The choice among an op's implementations is :mod:`dynaguide.dispatch`'s (one registry);
this module only says whether a backend can be loaded (``available``), which one the
environment forces (``forced``) and on which devices a backend runs.

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
