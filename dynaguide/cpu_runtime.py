"""CPU runtime settings for the refinement loop: heap reuse and serial small operations.

**Heap reuse (glibc only).** Every iteration allocates and frees a dozen activation-sized
tensors (60 MB each at 481x321 with 100 channels). glibc serves blocks that large with
``mmap`` and returns them with ``munmap``, so each iteration page-faults every one of them
in again and the kernel zeroes the pages: on the virtual machines measured here that cost
40-50 ms per 60 MB tensor, a fifth of an iteration. While a :class:`HeapReuse` is held,
large blocks come from the heap (``M_MMAP_MAX = 0``) and freed memory is kept for the next
iteration (``M_TRIM_THRESHOLD`` at its maximum); when the last holder closes, the defaults
are set back and ``malloc_trim(0)`` returns the memory to the system. Nothing happens
without glibc, or with ``DYNAGUIDE_CPU_HEAP_REUSE=0`` in the environment.

**Serial small operations.** PyTorch splits any element-wise operation of more than 32K
elements over its OpenMP threads. For the optimiser step over 100K parameters or the guide
alignment over one label map that is microseconds of work per thread, but each parallel
region ends in a barrier that waits for every thread: on a loaded machine, where a thread
is often descheduled, one such barrier measured 10-50 ms (the SGD step: 47 ms with 2
threads, 0.4 ms with 1). :func:`serial` runs a block with one thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["HeapReuse", "active", "paused", "serial"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_TRIM = 128 * 1024
_DEFAULT_MMAP_MAX = 65536

_lock = threading.Lock()
_holders = 0
_libc: Any = None


def _glibc() -> Any:
    """The C library when it is glibc (has mallopt and malloc_trim), else None."""
    global _libc
    if _libc is None:
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            lib.gnu_get_libc_version  # noqa: B018 - glibc only
            lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc = lib
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def _wanted() -> bool:
    return os.environ.get("DYNAGUIDE_CPU_HEAP_REUSE", "1").strip().lower() not in (
        "0",
        "false",
        "off",
        "no",
    )


def active() -> bool:
    """Whether freed large blocks are being kept (some :class:`HeapReuse` is open)."""
    return _holders > 0


class HeapReuse:
    """Holds the heap-reuse setting from construction until :meth:`close` (idempotent).

    Reference counted: nested or concurrent holders share one setting.
    """

    def __init__(self) -> None:
        global _holders
        self._open = False
        lib = _glibc()
        if lib is None or not _wanted():
            return
        with _lock:
            if _holders == 0:
                _set(True)
            _holders += 1
        self._open = True

    def close(self) -> None:
        """Release the hold; the last one restores the defaults and trims the heap."""
        global _holders
        if not self._open:
            return
        self._open = False
        with _lock:
            _holders -= 1
            if _holders == 0:
                _set(False)

    def __enter__(self) -> HeapReuse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _set(keep: bool) -> None:
    lib = _glibc()
    if keep:
        lib.mallopt(_M_MMAP_MAX, 0)
        lib.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
    else:
        lib.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        lib.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
        lib.malloc_trim(0)


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """glibc's default behaviour inside the block even while holders are open (for
    benchmarks timing code as it runs without this module)."""
    with _lock:
        was = _holders > 0
        if was:
            _set(False)
    try:
        yield
    finally:
        with _lock:
            if was and _holders > 0:
                _set(True)


@contextlib.contextmanager
def serial() -> Iterator[None]:
    """Run the block with one PyTorch thread (for small operations; see the module docstring)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
