"""How the Triton kernels are launched: device guard, one-axis grids, float16 gradients.

The device guard and grid shapes are checked on CPU with stand-ins (no GPU needed); the
float16 gradient runs in the interpreter; the multi-device test needs two GPUs.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import dynaguide.kernels as K
from dynaguide.kernels import _launch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class _Recorder:
    """A kernel stand-in: records the current CUDA device (per the patched query) and grid."""

    def __init__(self, current: list[int]):
        self.current = current
        self.calls: list[tuple[tuple[int, ...], int]] = []

    def __getitem__(self, grid):
        def run(*args, **meta):
            self.calls.append((grid, self.current[0]))

        return run


def _fake_cuda(monkeypatch) -> list[int]:
    """Patch torch.cuda.current_device / torch.cuda.device with a fake device stack."""
    current = [0]

    @contextlib.contextmanager
    def fake_device(dev):
        prev = current[0]
        current[0] = torch.device(dev).index
        try:
            yield
        finally:
            current[0] = prev

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", fake_device)
    return current


def test_device_guard_switches_only_when_needed(monkeypatch):
    current = _fake_cuda(monkeypatch)
    assert isinstance(_launch.device_guard(None), contextlib.nullcontext)
    assert isinstance(_launch.device_guard(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(_launch.device_guard(torch.device("cuda", 0)), contextlib.nullcontext)
    with _launch.device_guard(torch.device("cuda", 1)):
        assert current[0] == 1
    assert current[0] == 0


def test_launch_runs_under_the_tensors_device(monkeypatch):
    current = _fake_cuda(monkeypatch)
    kernel = _Recorder(current)
    monkeypatch.setattr(_launch, "tensor_device", lambda args: torch.device("cuda", 1))
    _launch.launch(kernel, (7,), torch.zeros(1), 3, BLOCK=16)
    monkeypatch.setattr(_launch, "tensor_device", lambda args: torch.device("cuda", 0))
    _launch.launch(kernel, (7,), torch.zeros(1))
    assert kernel.calls == [((7,), 1), ((7,), 0)]
    assert current[0] == 0


def test_tensor_device_takes_the_first_tensor():
    assert _launch.tensor_device((3, torch.zeros(1, device="meta"), torch.zeros(1))).type == "meta"
    assert _launch.tensor_device((3, 4.0)) is None


def test_grids_are_one_axis_for_any_batch(monkeypatch):
    """Every launch uses grid axis 0 only (axis 1 is limited to 65535): N is folded into it."""
    import dynaguide.kernels._common as common

    grids: list[tuple[str, tuple[int, ...]]] = []

    def record(kernel, grid, *args, **meta):
        grids.append((kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel), grid))

    for mod in ("fused", "continuity", "similarity", "guidance", "_finalize"):
        monkeypatch.setattr(f"dynaguide.kernels.{mod}.launch", record)
    n = 70_000  # more images than grid axis 1 could hold
    r = torch.zeros(n, 2, 1, 3, requires_grad=True)
    t = torch.zeros(n, 1, 3, dtype=torch.long)
    K.dynaguide_loss(r, t)
    K.continuity_loss(r)
    K.similarity_loss(r)
    K.guidance_loss(r, t)
    names = {name for name, _ in grids}
    assert {"_pass1_kernel", "_pass2_kernel", "_finalize_kernel"} <= names, names
    for name, grid in grids:
        assert len(grid) == 1, (name, grid)
        if name != "_finalize_kernel":
            lay = common.check_response(r)
            geo = common.geometry(
                lay, stencil=name in ("_pass1_kernel", "_pass2_kernel", "_continuity_kernel")
            )
            assert grid[0] == geo.n_pblocks(lay.hw) * n, (name, grid)


def test_float16_gradient_survives_a_loss_scale():
    """At 512x512 the similarity gradient (p - onehot) / (H W) is ~1e-6..1e-9: below float16's
    normal range. Kept in float32 until backward, a GradScaler-style scale of 2**16 brings it
    back exactly as the scaled float32 gradient rounded to float16."""
    gen = torch.Generator().manual_seed(0)
    x32 = torch.randn(1, 2, 512, 512, generator=gen) * 4
    x16 = x32.half().to(DEVICE).requires_grad_()
    loss, _, _ = K.similarity_loss(x16)
    (loss * 65536.0).backward()
    ref = x16.detach().double().requires_grad_()
    from dynaguide import losses

    (losses.similarity_loss_reference(ref)[0] * 65536.0).backward()
    want = ref.grad.half()
    assert x16.grad.dtype == torch.float16
    nz = want != 0
    assert bool(nz.any())
    assert torch.equal(x16.grad != 0, nz)  # no underflow to 0 where the gradient is not 0
    err = ((x16.grad.double() - want.double()).abs() / want.double().abs().clamp_min(1e-30))[nz]
    assert err.max().item() <= 2e-3  # one float16 rounding (plus float32 round-off)
    # without a scale the float16 gradient is what float16 can hold of the float32 one
    x16.grad = None
    loss, _, _ = K.similarity_loss(x16)
    loss.backward()
    torch.testing.assert_close(x16.grad, (ref.grad / 65536.0).half(), rtol=2e-3, atol=6e-8)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_kernels_run_on_the_tensors_device_not_the_current_one():
    torch.cuda.set_device(0)
    r = torch.randn(2, 16, 9, 11, device="cuda:1").contiguous(memory_format=torch.channels_last)
    r.requires_grad_()
    t = torch.randint(-1, 16, (2, 9, 11), device="cuda:1")
    loss, labels, _ = K.dynaguide_loss(r, t, weight="dynaguide")
    loss.backward()
    ref = r.detach().double().requires_grad_()
    want, _, _ = K.dynaguide_loss_reference(ref, t, weight="dynaguide")
    want.backward()
    assert labels.device == r.device and torch.cuda.current_device() == 0
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.grad.double(), ref.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.gpu
def test_kernels_under_an_explicit_device_index():
    """device='cuda:0' spelled out, from a side stream: the guard is a no-op and results match."""
    r = torch.randn(1, 8, 5, 7, device="cuda:0", requires_grad=True)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        loss, _, _ = K.similarity_loss(r)
        loss.backward()
    torch.cuda.current_stream().wait_stream(side)
    ref = r.detach().double().requires_grad_()
    from dynaguide import losses

    want = losses.similarity_loss_reference(ref)[0]
    want.backward()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r.grad.double(), ref.grad, rtol=1e-4, atol=1e-8)
