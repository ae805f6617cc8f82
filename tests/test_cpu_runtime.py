"""Heap reuse during CPU refinement (dynaguide.cpu_runtime): reference counting and opt-out."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from dynaguide import cpu_runtime

pytestmark = pytest.mark.skipif(cpu_runtime._glibc() is None, reason="needs glibc")


def test_holders_are_counted_and_paused_blocks_restore(monkeypatch):
    monkeypatch.delenv("DYNAGUIDE_CPU_HEAP_REUSE", raising=False)
    gc.collect()
    if cpu_runtime.active():
        pytest.skip("a refinement step of another test is still alive in this process")
    a = cpu_runtime.HeapReuse()
    with cpu_runtime.HeapReuse():
        assert cpu_runtime.active()
        with cpu_runtime.paused():
            assert cpu_runtime.active()  # the holders stay; only glibc's settings are default
    assert cpu_runtime.active()
    a.close()
    a.close()  # idempotent
    assert not cpu_runtime.active()
    with cpu_runtime.paused():  # nothing held: a no-op
        assert not cpu_runtime.active()


def test_opt_out_by_environment(monkeypatch):
    monkeypatch.setenv("DYNAGUIDE_CPU_HEAP_REUSE", "0")
    with cpu_runtime.HeapReuse():
        assert not cpu_runtime.active()


def test_refine_step_holds_reuse_while_alive(monkeypatch):
    from dynaguide.config import get_preset
    from dynaguide.refine import RefineStep

    monkeypatch.delenv("DYNAGUIDE_CPU_HEAP_REUSE", raising=False)
    img = np.random.default_rng(0).integers(0, 256, size=(8, 9, 3), dtype=np.uint8)
    gc.collect()
    before = cpu_runtime._holders  # other tests' steps may still be alive
    step = RefineStep(img, get_preset("dfc"), seed=0)
    assert cpu_runtime.active() and cpu_runtime._holders == before + 1
    step.step()
    del step
    gc.collect()
    assert cpu_runtime._holders == before


def test_serial_runs_the_block_on_one_thread():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with cpu_runtime.serial():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(n)
