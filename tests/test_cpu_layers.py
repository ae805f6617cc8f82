"""The CPU fast paths of the network: fused ReLU + BatchNorm and the input convolutions.

Both are compared with the plain PyTorch modules on fresh random inputs in float32 (within
1e-5 of a float64 run) and float64, gradients included, and fall back to the modules
wherever they do not apply.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dynaguide.input_conv import InputPatches, input_conv
from dynaguide.norm import fused_available, relu_batch_norm

pytestmark = pytest.mark.skipif(not fused_available(), reason="native extension not built")
CL = torch.channels_last


def _bn(c: int, dtype: torch.dtype, seed: int, momentum: float | None = 0.1) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c, momentum=momentum).to(dtype)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


def _run(fn, z: torch.Tensor, gy: torch.Tensor, bn: nn.BatchNorm2d):
    z = z.detach().clone().requires_grad_()
    bn.zero_grad(set_to_none=True)
    y = fn(z, bn)
    y.backward(gy)
    return y.detach(), z.grad, bn.weight.grad, bn.bias.grad


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("shape", [(1, 7, 9, 11), (2, 5, 4, 6), (1, 1, 3, 3)])
def test_relu_batch_norm_matches_the_modules(relu, shape):
    c = shape[1]
    gen = torch.Generator().manual_seed(sum(shape) + relu)
    z64 = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.3).contiguous(
        memory_format=CL
    )
    gy64 = torch.randn(shape, generator=gen, dtype=torch.float64).contiguous(memory_format=CL)

    def module(z, bn):
        return bn(torch.relu(z) if relu else z)

    def fused(z, bn):
        return relu_batch_norm(z, bn, relu=relu)

    ref_bn = _bn(c, torch.float64, 1)
    ref = _run(module, z64, gy64, ref_bn)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        bn = _bn(c, dtype, 1)
        out = _run(fused, z64.to(dtype), gy64.to(dtype), bn)
        assert out[0].is_contiguous(memory_format=CL)
        for got, want in zip(out, ref, strict=True):
            scale = max(1.0, want.abs().max().item())
            assert (got.double() - want).abs().max().item() <= tol * scale
        torch.testing.assert_close(
            bn.running_mean.double(), ref_bn.running_mean, rtol=tol, atol=tol
        )
        torch.testing.assert_close(bn.running_var.double(), ref_bn.running_var, rtol=tol, atol=tol)
        assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 1
        ref_bn = _bn(c, torch.float64, 1)
        ref = _run(module, z64, gy64, ref_bn)


@pytest.mark.parametrize("fast", [True, False])
def test_residual_is_added_in_the_normalisation_pass(fast):
    """relu_batch_norm(z, bn, residual=s) = bn(relu(z)) + s, gradients to z and s included
    (``fast=False``: a planar residual takes the module path)."""
    gen = torch.Generator().manual_seed(11)
    z = torch.randn(1, 6, 7, 9, generator=gen, dtype=torch.float64).contiguous(memory_format=CL)
    s = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    s = s.contiguous(memory_format=CL) if fast else s.contiguous()
    gy = torch.randn(z.shape, generator=gen, dtype=torch.float64).contiguous(memory_format=CL)
    outs = []
    for use_fused in (True, False):
        zz, ss = z.clone().requires_grad_(), s.clone().requires_grad_()
        bn = _bn(6, torch.float64, 5)
        y = relu_batch_norm(zz, bn, residual=ss) if use_fused else bn(torch.relu(zz)) + ss
        y.backward(gy)
        outs.append((y.detach(), zz.grad, ss.grad, bn.weight.grad, bn.running_var))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_cumulative_average_when_momentum_is_none():
    z = torch.randn(1, 4, 5, 6).contiguous(memory_format=CL)
    a, b = _bn(4, torch.float64, 2, momentum=None), _bn(4, torch.float64, 2, momentum=None)
    for k in range(3):
        zk = (z * (k + 1)).double()
        relu_batch_norm(zk, a)
        b(torch.relu(zk))
    torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-12, atol=1e-12)


_THREADS_SCRIPT = """
import hashlib, torch
from dynaguide.norm import relu_batch_norm
g = torch.Generator().manual_seed(5)
z = torch.randn(1, 12, 256, 200, generator=g).contiguous(memory_format=torch.channels_last)
z.requires_grad_()
bn = torch.nn.BatchNorm2d(12)
y = relu_batch_norm(z, bn)
y.backward(torch.randn(z.shape, generator=g).contiguous(memory_format=torch.channels_last))
h = hashlib.sha256()
for t in (y, z.grad, bn.weight.grad, bn.bias.grad, bn.running_var):
    h.update(t.detach().contiguous().numpy().tobytes())
print(h.hexdigest())
"""


def test_relu_batch_norm_is_independent_of_the_thread_count():
    """Fixed reduction blocks: the same bits with 1 and 2 OpenMP threads."""
    import os
    import subprocess
    import sys
    import tempfile

    digests = set()
    for n in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": n}
        out = subprocess.run(
            [sys.executable, "-c", _THREADS_SCRIPT], env=env, cwd=tempfile.gettempdir(),
            capture_output=True, text=True, check=True, timeout=300,
        )  # fmt: skip
        digests.add(out.stdout.strip())
    assert len(digests) == 1, digests


def test_relu_batch_norm_is_independent_of_other_channels():
    """Each image of a grouped (1, N*C, H, W) batch gets exactly what it gets alone."""
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(1, 12, 40, 37, generator=gen).contiguous(memory_format=CL)
    gy = torch.randn(z.shape, generator=gen).contiguous(memory_format=CL)
    wide_bn = _bn(12, torch.float32, 3)
    small_bn = nn.BatchNorm2d(4)
    with torch.no_grad():  # the affine parameters of channels 4..7 of the wide one
        small_bn.weight.copy_(wide_bn.weight[4:8])
        small_bn.bias.copy_(wide_bn.bias[4:8])
    wide = _run(relu_batch_norm, z, gy, wide_bn)
    part = _run(
        relu_batch_norm,
        z[:, 4:8].contiguous(memory_format=CL),
        gy[:, 4:8].contiguous(memory_format=CL),
        small_bn,
    )
    assert torch.equal(wide[0][:, 4:8], part[0])
    assert torch.equal(wide[1][:, 4:8], part[1])
    assert torch.equal(wide[2][4:8], part[2]) and torch.equal(wide[3][4:8], part[3])


def test_relu_batch_norm_falls_back_to_the_modules():
    z = torch.randn(1, 3, 4, 5)
    zc = z.contiguous(memory_format=CL)
    for case in (z, zc[:, :, :, ::2]):  # planar NCHW (the reference); pixels off one stride
        out = relu_batch_norm(case, _bn(3, torch.float32, 4))
        assert torch.equal(out, _bn(3, torch.float32, 4)(torch.relu(case)))
    bn = _bn(3, torch.float32, 4).eval()
    assert torch.equal(relu_batch_norm(zc, bn), bn(torch.relu(zc)))
    bn = _bn(3, torch.float32, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert relu_batch_norm(zc.bfloat16(), bn).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        relu_batch_norm(
            torch.randn(1, 3, 1, 1).contiguous(memory_format=CL), _bn(3, torch.float32, 0)
        )


@pytest.mark.parametrize("skip_grad", [False, True])
def test_input_conv_matches_conv2d(skip_grad):
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(2, 3, 13, 10, generator=gen).contiguous(memory_format=CL)
    gy = torch.randn(2, 8, 13, 10, generator=gen, dtype=torch.float64).contiguous(memory_format=CL)
    conv64 = nn.Conv2d(3, 8, 3, padding=1).double()
    conv64(x.double()).backward(gy)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        conv = nn.Conv2d(3, 8, 3, padding=1).to(dtype)
        conv.load_state_dict(conv64.state_dict())
        if skip_grad:
            conv.bias.requires_grad_(False)
        patches = InputPatches()
        out = input_conv(x.to(dtype), conv, patches)
        torch.testing.assert_close(out.double(), conv64(x.double()), rtol=tol, atol=tol)
        out.backward(gy.to(dtype))
        for p, q in ((conv.weight, conv64.weight), (conv.bias, conv64.bias)):
            if p.requires_grad:
                scale = q.grad.abs().max().item()
                assert (p.grad.double() - q.grad).abs().max().item() <= tol * scale


def test_input_patches_follow_the_image():
    """The cached patch matrix is rebuilt for another image or after an in-place change."""
    conv = nn.Conv2d(3, 4, 3, padding=1)
    patches = InputPatches()

    def wgrad(x):
        conv.zero_grad(set_to_none=True)
        input_conv(x, conv, patches).sum().backward()
        return conv.weight.grad.clone()

    def ref(x):
        conv.zero_grad(set_to_none=True)
        conv(x).sum().backward()
        return conv.weight.grad.clone()

    x = torch.rand(1, 3, 6, 7).contiguous(memory_format=CL)
    torch.testing.assert_close(wgrad(x), ref(x))
    x.mul_(-2.0)  # same object, new version
    torch.testing.assert_close(wgrad(x), ref(x))
    y = torch.rand(1, 3, 6, 7).contiguous(memory_format=CL)
    torch.testing.assert_close(wgrad(y), ref(y))
    # planar input or one that needs a gradient: the plain convolution
    for z in (torch.rand(1, 3, 6, 7), x.clone().requires_grad_()):
        assert "InputConv" not in type(input_conv(z, conv, patches).grad_fn).__name__


def test_refine_net_fast_path_matches_the_reference_layout():
    """The default (channels-last, fused) network and the NCHW module path train alike."""
    from dynaguide.config import get_preset
    from dynaguide.model import build_model

    cfg = get_preset("dynaguide").replace(n_channels=16)
    x = torch.from_numpy(np.random.default_rng(0).random((1, 3, 17, 19), dtype=np.float32))
    nets = [build_model(cfg, seed=2), build_model(cfg, seed=2).to(memory_format=CL)]
    xs = [x, x.contiguous(memory_format=CL)]
    outs = []
    for net, xi in zip(nets, xs, strict=True):
        out = net(xi)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        outs.append((out.detach(), {n: p.grad for n, p in net.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    for name, g in outs[0][1].items():
        scale = max(1.0, g.abs().max().item())
        assert (outs[1][1][name] - g).abs().max().item() <= 1e-4 * scale, name
    for a, b in zip(nets[0].buffers(), nets[1].buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
