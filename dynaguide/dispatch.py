"""The one registry of op implementations and the call-time choice among them.

Every backend registers its ops here explicitly (the table at the bottom of this module):
``register(op, backend, target)`` with ``target`` a callable or a lazy ``"module:attr"``
reference, so that registering Triton's kernels imports nothing. ``resolve(op, device,
requested)`` picks one at call time:

* ``requested`` (a call's ``backend=`` argument), else ``DYNAGUIDE_BACKEND``, forces a
  backend: a forced backend that is missing, or cannot run on the tensor's device, raises
  :class:`~dynaguide.backend.BackendUnavailableError`. An explicit request for a backend
  that does not implement the op raises too; ``DYNAGUIDE_BACKEND`` naming a backend the op
  has no implementation for is ignored for that op (the label ops have no Triton kernels).
* otherwise Triton for CUDA tensors when Triton is importable, the native extension for
  CPU tensors when it is built (and for CUDA tensors where it registered a CUDA kernel that
  can run), else the plain PyTorch reference. A silent fallback only happens when nothing
  was forced.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dynaguide import backend as _backend

__all__ = ["Resolved", "implementations", "register", "resolve"]

#: can_run(device) -> None when the implementation runs on ``device``, else why not.
CanRun = Callable[[torch.device], "str | None"]
_PREFERENCE = {"cuda": ("triton", "native", "torch"), "cpu": ("native", "triton", "torch")}
_TITLE = {"torch": "torch", "triton": "Triton", "native": "native"}


@dataclass(frozen=True)
class _Entry:
    target: str | Callable[..., Any]
    can_run: CanRun | None


@dataclass(frozen=True)
class Resolved:
    """The implementation chosen for one call: backend name and the function."""

    backend: str
    fn: Callable[..., Any]


_REGISTRY: dict[str, dict[str, _Entry]] = {}


def register(
    op: str,
    backend: str,
    target: str | Callable[..., Any],
    *,
    can_run: CanRun | None = None,
) -> None:
    """Register ``target`` (a callable or ``"module:attr"``, imported on first use) as
    backend ``backend``'s implementation of ``op``.

    ``can_run(device)`` (optional) returns None when the implementation takes tensors on
    ``device`` and a reason otherwise; without it the backend's own device rule applies
    (Triton: CUDA, or CPU under ``TRITON_INTERPRET=1``; native: CPU; torch: anywhere).
    """
    if backend not in _backend.BACKENDS:
        raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = _Entry(target, can_run)


def implementations(op: str) -> tuple[str, ...]:
    """Backends that registered ``op``."""
    return tuple(_REGISTRY.get(op, {}))


def _load(entry: _Entry) -> Callable[..., Any]:
    if callable(entry.target):
        return entry.target
    module, _, attr = entry.target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _why_not(name: str, entry: _Entry, device: torch.device) -> str | None:
    """None when backend ``name`` can run this entry on ``device``, else the reason."""
    if not _backend.available(name):
        return _backend._probe(name)[1]
    if entry.can_run is not None:
        return entry.can_run(device)
    if not _backend._runs_on(name, device):
        return f"it cannot run on {device}"
    return None


def _requested(requested: Any) -> str | None:
    if requested is None or requested == "":
        return None
    if not isinstance(requested, str):
        raise TypeError(f"backend must be None or a backend name, got {requested!r}")
    name = requested.lower()
    if name not in _backend.BACKENDS:
        raise _backend.BackendUnavailableError(
            f"backend {requested!r} is not one of {_backend.BACKENDS}"
        )
    return name


def resolve(op: str, device: torch.device | str, requested: str | None = None) -> Resolved:
    """The implementation of ``op`` for tensors on ``device``; see the module docstring.

    Raises
    ------
    BackendUnavailableError
        A forced backend is unknown, missing, lacks the op (explicit request) or cannot
        run on ``device``.
    KeyError
        ``op`` was never registered.
    """
    dev = torch.device(device)
    entries = _REGISTRY[op]
    explicit = _requested(requested)
    choice = explicit
    if choice is None:
        choice = _backend.forced()
        if choice is not None and choice not in entries:
            choice = None  # DYNAGUIDE_BACKEND names a backend this op does not have
    if choice is not None:
        if choice not in entries:
            raise _backend.BackendUnavailableError(
                f"backend {choice!r} was requested, but {op} has no {_TITLE[choice]} "
                f"implementation (it has {', '.join(entries)})"
            )
        why = _why_not(choice, entries[choice], dev)
        if why is not None:
            src = "requested" if explicit else "forced by DYNAGUIDE_BACKEND"
            raise _backend.BackendUnavailableError(
                f"backend {choice!r} was forced ({src}) for {op} but cannot run: {why}"
            )
        return Resolved(choice, _load(entries[choice]))
    for name in _PREFERENCE.get(dev.type, ("torch",)):
        if name == "triton" and dev.type != "cuda":
            continue  # the interpreter runs only when asked for
        entry = entries.get(name)
        if entry is not None and _why_not(name, entry, dev) is None:
            return Resolved(name, _load(entry))
    return Resolved("torch", _load(entries["torch"]))


# ------------------------------------------------------------------ the registrations
def _native_cuda(device: torch.device) -> str | None:
    """A native op with a CUDA kernel: CPU always; CUDA when the extension has CUDA and
    its runtime sees a device."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"no native kernel for device type {device.type!r}"
    mod = importlib.import_module("dynaguide._native")
    if not mod.has_cuda():
        return "dynaguide._native was built without CUDA"
    if int(mod.cuda_device_count()) == 0:
        return "dynaguide._native's CUDA runtime sees no device (driver too old?)"
    return None


def _cpu_only(op: str) -> CanRun:
    def can_run(device: torch.device) -> str | None:
        return None if device.type == "cpu" else f"{op} has no CUDA kernel"

    return can_run


for _op in ("similarity_loss", "continuity_loss", "guidance_loss"):
    register(_op, "torch", f"dynaguide.losses:{_op}_reference")
    register(_op, "native", f"dynaguide.native_losses:{_op}")
    register(_op, "triton", f"dynaguide.kernels:{_op}")
# The whole objective in one fused kernel pair (torch: the composite of the three losses).
register("fused_objective", "torch", "dynaguide.objective:objective_reference")
register("fused_objective", "triton", "dynaguide.kernels:dynaguide_loss")
# The label ops branch on the chosen backend's name; the registered target is the kernel
# that branch calls (numpy/torch for the fallback, the extension's entry point for native).
register("relabel_compact", "torch", "torch:unique")
register(
    "relabel_compact",
    "native",
    "dynaguide._native:relabel_sequential",
    can_run=_cpu_only("relabel_compact"),
)
register("connected_components", "torch", "skimage.measure:label")
register(
    "connected_components", "native", "dynaguide._native:connected_components", can_run=_native_cuda
)
