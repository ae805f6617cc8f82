"""Triton loss kernels (dynaguide.kernels) against the float64 PyTorch references.

Without a GPU the kernels run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` must be
set before ``dynaguide.kernels`` is imported (this module sets it when CUDA is absent;
a conftest.py that imports the kernels earlier must set it too).

Inputs are fresh random tensors on every run; each failure message carries the seed.
"Relative" errors are in the max norm: ``max|got - want| <= rtol * max|want|`` (an
element-wise ratio is meaningless where softmax - one-hot cancels).
"""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

import dynaguide.kernels as K
import torch.nn.functional as F
from dynaguide.kernels import continuity as _continuity_mod

from dynaguide import losses

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and type(_continuity_mod._continuity_kernel).__name__ != "InterpretedFunction":
    pytest.skip(
        "no CUDA, and dynaguide.kernels was imported before TRITON_INTERPRET=1 was set "
        "(set it at the top of conftest.py)",
        allow_module_level=True,
    )

RTOL32 = 1e-5


# ------------------------------------------------------------------------- helpers
def _gen() -> tuple[torch.Generator, int]:
    """A generator with a fixed seed per test (from the test's id: stable across runs,
    different between tests and parameters)."""
    test_id = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    seed = zlib.crc32(test_id.encode()) & 0x7FFFFFFF
    return torch.Generator().manual_seed(seed), seed


def make(shape, layout="nchw", dtype=torch.float32, scale=2.0, gen=None) -> torch.Tensor:
    """Random response of ``shape`` ((C,H,W) or (N,C,H,W)) in a given memory layout.

    ``nhwc``: channels-last strides (for (C,H,W), a slice of a channels-last batch);
    ``strided``: a crop of a larger tensor, so rows are not contiguous (non-flat pixels).
    """
    batched = len(shape) == 4
    full = shape if batched else (1, *shape)
    if layout == "strided":
        n, c, h, w = full
        x = torch.randn((n, c, h + 2, w + 3), generator=gen) * scale
        x = x[:, :, 1 : h + 1, 2 : w + 2]
    else:
        x = torch.randn(full, generator=gen) * scale
        if layout == "nhwc":
            x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype) if dtype != torch.float32 else x
    x = x if batched else x[0]
    return x.to(DEVICE).detach().requires_grad_()


def max_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = want.abs().max().item()
    return (got - want).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_close(got, want, rtol, what, seed):
    err = max_rel(got, want)
    assert err <= rtol, f"{what}: max relative error {err:.3g} > {rtol:g} (seed {seed})"


def ref_grad(fn, x: torch.Tensor, grad_output=None):
    """(value, d value / dx) of ``fn`` on a float64 copy of ``x``."""
    xd = x.detach().double().requires_grad_()
    out = fn(xd)
    val = out[0] if isinstance(out, tuple) else out
    if not val.requires_grad:  # e.g. continuity of a 1x1 image: a constant 0
        return out, torch.zeros_like(xd)
    go = torch.ones_like(val) if grad_output is None else grad_output.to(val.dtype)
    (g,) = torch.autograd.grad(val, xd, go)
    return out, g


def kernel_grad(fn, x: torch.Tensor, grad_output=None):
    out = fn(x)
    val = out[0] if isinstance(out, tuple) else out
    go = torch.ones_like(val) if grad_output is None else grad_output.to(val.dtype)
    (g,) = torch.autograd.grad(val, x, go)
    return out, g


def check_op(fast, ref, x, seed, rtol=RTOL32, grad_output=None, what=""):
    out, g = kernel_grad(fast, x, grad_output)
    rout, rg = ref_grad(ref, x, grad_output)
    val = out[0] if isinstance(out, tuple) else out
    rval = rout[0] if isinstance(rout, tuple) else rout
    assert val.shape == rval.shape, f"{what}: loss shape {val.shape} != {rval.shape}"
    assert val.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert_close(val, rval, rtol, f"{what} loss", seed)
    assert g.shape == x.shape and g.dtype == x.dtype, f"{what}: gradient {g.shape} {g.dtype}"
    assert_close(g, rg, rtol, f"{what} gradient", seed)
    return out, rout, g


# Shapes: odd channel counts (C=7, 100, 129; 300 = two channel blocks under the
# interpreter), H or W of 1, 2, 3, 97, single images (C,H,W) and batches of 1 and 3.
SHAPES = [
    (7, 5, 6),
    (3, 7, 1, 9),
    (1, 7, 9, 1),
    (7, 1, 1),
    (3, 100, 3, 2),
    (129, 2, 3),
    (1, 300, 3, 5),
    (7, 97, 3),
    (2, 3, 97, 97),
]
LAYOUTS = ["nchw", "nhwc", "strided"]


def _case_params():
    """(shape, layout) pairs: every shape in two layouts, rotating through them."""
    out = []
    for k, shape in enumerate(SHAPES):
        for layout in (LAYOUTS[k % 3], LAYOUTS[(k + 1) % 3]):
            out.append(pytest.param(shape, layout, id=f"{'x'.join(map(str, shape))}-{layout}"))
    return out


# ----------------------------------------------------------------------- continuity
@pytest.mark.parametrize("penalty", ["l1", "huber"])
@pytest.mark.parametrize("neighbors", [4, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_continuity_options(penalty, neighbors, layout):
    gen, seed = _gen()
    x = make((3, 7, 5, 6), layout, gen=gen)
    opts = dict(penalty=penalty, neighbors=neighbors, delta=0.7)
    check_op(
        lambda r: K.continuity_loss(r, **opts),
        lambda r: losses.continuity_loss_reference(r, **opts),
        x,
        seed,
        what=f"continuity {opts}",
    )


@pytest.mark.parametrize(("shape", "layout"), _case_params())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_continuity_shapes(shape, layout, reduction):
    gen, seed = _gen()
    x = make(shape, layout, gen=gen)
    penalty = random.Random(seed).choice(["l1", "huber"])
    opts = dict(penalty=penalty, neighbors=8, delta=1.3, reduction=reduction)
    check_op(
        lambda r: K.continuity_loss(r, **opts),
        lambda r: losses.continuity_loss_reference(r, **opts),
        x,
        seed,
        what=f"continuity {shape} {layout} {opts}",
    )


def test_continuity_huber_equals_torch_huber():
    """Huber with delta != 1 is torch's huber_loss (not smooth_l1 with beta)."""
    gen, seed = _gen()
    x = make((4, 6, 5), gen=gen)
    delta = 0.45
    got = K.continuity_loss(x, penalty="huber", neighbors=4, delta=delta)
    r = x.detach().double()
    dv, dh = r[:, 1:, :] - r[:, :-1, :], r[:, :, 1:] - r[:, :, :-1]
    want = sum(F.huber_loss(d, torch.zeros_like(d), delta=delta) for d in (dv, dh))
    assert abs(got.item() - want.item()) <= RTOL32 * want.item(), f"seed {seed}"


def test_continuity_sum_reduction_and_constant_image():
    gen, seed = _gen()
    x = make((3, 5, 4, 6), "nhwc", gen=gen)
    opts = dict(penalty="huber", neighbors=8, delta=1.0, reduction="sum")
    check_op(
        lambda r: K.continuity_loss(r, **opts),
        lambda r: losses.continuity_loss_reference(r, **opts),
        x,
        seed,
        what="continuity sum",
    )
    flat = torch.full((2, 3, 4, 5), 1.5, device=DEVICE, requires_grad=True)
    loss = K.continuity_loss(flat)
    (g,) = torch.autograd.grad(loss, flat)
    assert loss.item() == 0.0 and g.abs().max().item() == 0.0


# ----------------------------------------------------------------------- similarity
def _check_labels(out, rout, seed, what=""):
    _, labels, k = out
    _, rlabels, rk = rout
    assert labels.dtype == torch.int64 and k.dtype == torch.int64
    assert labels.shape == rlabels.shape and k.shape == rk.shape
    assert torch.equal(labels.cpu(), rlabels.cpu()), f"{what} labels differ (seed {seed})"
    assert torch.equal(k.cpu(), rk.cpu()), f"{what} K {k.tolist()} != {rk.tolist()} (seed {seed})"
    assert labels.device.type == k.device.type == DEVICE


@pytest.mark.parametrize(("shape", "layout"), _case_params())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_similarity_matches_reference(shape, layout, reduction):
    if reduction == "sum" and shape[-1] == 97:
        pytest.skip("the large spatial shapes run with mean and none only (interpreter time)")
    gen, seed = _gen()
    x = make(shape, layout, gen=gen)
    out, rout, _ = check_op(
        lambda r: K.similarity_loss(r, reduction=reduction),
        lambda r: losses.similarity_loss_reference(r, reduction=reduction),
        x,
        seed,
        what=f"similarity {shape} {layout} {reduction}",
    )
    _check_labels(out, rout, seed, f"similarity {shape} {layout}")


def test_similarity_ties_take_first_maximum():
    """Exact ties, within a channel block and across two blocks (C=300 under the interpreter)."""
    gen, seed = _gen()
    x = torch.randint(-3, 3, (2, 300, 3, 4), generator=gen).float()
    x[0, :, 0, 0] = 0.0
    x[0, 10, 0, 0] = x[0, 270, 0, 0] = 5.0  # across blocks: 10 wins
    x[0, 260, 0, 1] = x[0, 270, 0, 1] = 7.0  # same (second) block: 260 wins
    x[1, :, 1, 1] = 2.0  # all equal: 0 wins
    x = x.to(DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = K.similarity_loss(x, reduction="none")
    rout = losses.similarity_loss_reference(x.detach().double(), reduction="none")
    _check_labels(out, rout, seed, "ties")
    assert (
        out[1][0, 0, 0].item() == 10
        and out[1][0, 0, 1].item() == 260
        and out[1][1, 1, 1].item() == 0
    )


def test_similarity_histogram_counts_few_labels():
    """Late-training regime: most pixels share a label (many atomics on one bin)."""
    gen, seed = _gen()
    x = torch.randn(3, 9, 17, 13, generator=gen)
    x[:, 4] += 6.0
    x[1, 2, :3] += 20.0
    x = x.to(DEVICE).requires_grad_()
    out, rout, _ = check_op(
        lambda r: K.similarity_loss(r, reduction="none"),
        lambda r: losses.similarity_loss_reference(r, reduction="none"),
        x,
        seed,
        what="few labels",
    )
    _check_labels(out, rout, seed, "few labels")


# ------------------------------------------------------------------------- guidance
def make_target(shape, c, gen, ignore_index=-1, dtype=torch.int64, frac_ignored=0.3):
    """Random targets in [0, c) with a fraction set to ``ignore_index``."""
    t = torch.randint(0, c, shape, generator=gen)
    drop = torch.rand(shape, generator=gen) < frac_ignored
    t[drop] = ignore_index
    return t.to(dtype).to(DEVICE)


@pytest.mark.parametrize(("shape", "layout"), _case_params())
def test_guidance_matches_reference(shape, layout):
    gen, seed = _gen()
    x = make(shape, layout, gen=gen)
    c = shape[-3]
    t = make_target((*shape[:-3], *shape[-2:]), c, gen)
    reduction = random.Random(seed).choice(["mean", "sum", "none"])
    check_op(
        lambda r: K.guidance_loss(r, t, reduction=reduction),
        lambda r: losses.guidance_loss_reference(r, t, reduction=reduction),
        x,
        seed,
        what=f"guidance {shape} {layout} {reduction}",
    )


def test_guidance_ignore_index_dtypes_and_strided_target():
    gen, seed = _gen()
    x = make((3, 11, 6, 7), "nhwc", gen=gen)
    # uint8 target, ignore 255; image 2 entirely ignored -> contributes 0 and no gradient
    t8 = make_target((3, 6, 7), 11, gen, ignore_index=255, dtype=torch.uint8)
    t8[2] = 255
    out, _, g = check_op(
        lambda r: K.guidance_loss(r, t8, ignore_index=255, reduction="none"),
        lambda r: losses.guidance_loss_reference(r, t8, ignore_index=255, reduction="none"),
        x,
        seed,
        what="guidance uint8/255",
    )
    assert out[2].item() == 0.0 and g[2].abs().max().item() == 0.0
    # int32 target as a transposed (non-contiguous) view, a negative ignore_index
    t32 = make_target((3, 7, 6), 11, gen, ignore_index=-5, dtype=torch.int32).transpose(1, 2)
    check_op(
        lambda r: K.guidance_loss(r, t32, ignore_index=-5),
        lambda r: losses.guidance_loss_reference(r, t32, ignore_index=-5),
        x,
        seed,
        what="guidance int32 strided",
    )
    # uint8 target with ignore_index=-1 (not representable): every pixel is valid
    t_all = make_target((3, 6, 7), 11, gen, ignore_index=3, dtype=torch.uint8)
    check_op(
        lambda r: K.guidance_loss(r, t_all, ignore_index=-1),
        lambda r: losses.guidance_loss_reference(r, t_all, ignore_index=-1),
        x,
        seed,
        what="guidance uint8/-1",
    )


# ---------------------------------------------------------------------------- fused
FUSED_CASES = [
    # shape, layout, options, with target, k_min
    ((7, 5, 6), "nchw", dict(weight="fsf"), True, None),
    ((3, 7, 4, 5), "nhwc", dict(weight="scf", scf_mu=50.0), True, "tensor"),
    (
        (3, 100, 3, 2),
        "nhwc",
        dict(weight="dynaguide", beta=15.0, penalty="huber", delta=0.6),
        True,
        4,
    ),
    (
        (2, 9, 5, 3),
        "strided",
        dict(weight="constant", mu=5.0, penalty="l1", neighbors=4),
        False,
        None,
    ),
    (
        (1, 300, 3, 5),
        "nchw",
        dict(weight="scf", neighbors=4, similarity_weight=0.5),
        True,
        "tensor",
    ),
    ((129, 1, 7), "nhwc", dict(weight="fsf", guidance_weight=2.5), True, 3),
    ((7, 97, 3), "nchw", dict(weight="fsf", penalty="l1"), True, None),
    ((3, 5, 2, 1), "nchw", dict(weight="constant", mu=0.0), True, None),
]


@pytest.mark.parametrize(("shape", "layout", "opts", "with_target", "k_min"), FUSED_CASES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_matches_reference(shape, layout, opts, with_target, k_min, reduction):
    gen, seed = _gen()
    x = make(shape, layout, gen=gen)
    c = shape[-3]
    t = make_target((*shape[:-3], *shape[-2:]), c, gen) if with_target else None
    if k_min == "tensor":
        n = shape[0] if len(shape) == 4 else 1
        k_min = torch.randint(0, c + 2, (n,) if len(shape) == 4 else (), generator=gen).to(DEVICE)
    kw = dict(opts, k_min=k_min, reduction=reduction)
    out, rout, _ = check_op(
        lambda r: K.dynaguide_loss(r, t, **kw),
        lambda r: K.dynaguide_loss_reference(r, t, **kw),
        x,
        seed,
        what=f"fused {shape} {layout} {kw}",
    )
    assert isinstance(out, K.DynaGuideLoss)
    _check_labels(out, rout, seed, "fused")


def test_fused_equals_composite_of_public_ops():
    """dynaguide_loss == similarity + w(K) * continuity + guidance from the separate kernels."""
    gen, seed = _gen()
    x = make((2, 12, 6, 5), "nhwc", gen=gen)
    t = make_target((2, 6, 5), 12, gen)
    loss, labels, k = K.dynaguide_loss(x, t, weight="fsf", beta=15.0, reduction="none")
    sim, labels2, k2 = K.similarity_loss(x, reduction="none")
    cont = K.continuity_loss(x, reduction="none")
    guide = K.guidance_loss(x, t, reduction="none")
    want = sim + k2.float() / 15.0 * cont + guide
    assert torch.equal(labels, labels2) and torch.equal(k, k2)
    assert_close(loss, want, RTOL32, "fused vs composite", seed)


def test_fused_without_grad_skips_second_pass():
    gen, seed = _gen()
    x = make((2, 8, 5, 4), "nchw", gen=gen)
    t = make_target((2, 5, 4), 8, gen)
    with_grad = K.dynaguide_loss(x, t, reduction="none")
    with torch.no_grad():
        no_grad = K.dynaguide_loss(x, t, reduction="none")
    assert not no_grad.loss.requires_grad
    assert torch.equal(no_grad.loss, with_grad.loss.detach()), f"seed {seed}"
    assert torch.equal(no_grad.labels, with_grad.labels)


# ------------------------------------------------------------- grad_output and bf16
@pytest.mark.parametrize("op", ["continuity", "similarity", "guidance", "fused"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_non_unit_grad_output(op, reduction):
    gen, seed = _gen()
    x = make((3, 6, 4, 5), "nhwc", gen=gen)
    t = make_target((3, 4, 5), 6, gen)
    fast, ref = {
        "continuity": (K.continuity_loss, losses.continuity_loss_reference),
        "similarity": (K.similarity_loss, losses.similarity_loss_reference),
        "guidance": (
            lambda r, **kw: K.guidance_loss(r, t, **kw),
            lambda r, **kw: losses.guidance_loss_reference(r, t, **kw),
        ),
        "fused": (
            lambda r, **kw: K.dynaguide_loss(r, t, **kw),
            lambda r, **kw: K.dynaguide_loss_reference(r, t, **kw),
        ),
    }[op]
    shape = (3,) if reduction == "none" else ()
    go = (torch.rand(shape, generator=gen) * 4 - 2).to(DEVICE)
    if reduction == "none":
        go[1] = 1.0  # one image at exactly 1 (its program skips the rescale on device)
    check_op(
        lambda r: fast(r, reduction=reduction),
        lambda r: ref(r, reduction=reduction),
        x,
        seed,
        grad_output=go,
        what=f"{op} grad_output {reduction}",
    )


def test_single_image_none_reduction_is_0dim():
    gen, seed = _gen()
    x = make((5, 4, 3), "nhwc", gen=gen)
    go = torch.tensor(-0.7, device=DEVICE)
    out, _, _ = check_op(
        lambda r: K.dynaguide_loss(r, reduction="none"),
        lambda r: K.dynaguide_loss_reference(r, reduction="none"),
        x,
        seed,
        grad_output=go,
        what="0-dim",
    )
    assert out.loss.dim() == 0 and out.labels.shape == (4, 3) and out.n_labels.dim() == 0


def test_backward_twice_raises():
    gen, _ = _gen()
    x = make((2, 4, 3, 3), gen=gen)
    loss = K.continuity_loss(x)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="single backward"):
        loss.backward()


def _bf16_torch(op, xb, t):
    """PyTorch's own computation in bfloat16 (no upcast), for the error budget."""
    if op == "continuity":
        return sum(
            F.huber_loss(d, torch.zeros_like(d), delta=0.8)
            for d in losses.neighbor_differences(xb, 8)
        )
    if op == "similarity":
        return F.cross_entropy(xb, xb.detach().argmax(1))
    return F.cross_entropy(xb, t)


@pytest.mark.parametrize("op", ["continuity", "similarity", "guidance"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_bf16_within_twice_torch_error(op, layout):
    gen, seed = _gen()
    x = make((1, 13, 9, 11), layout, dtype=torch.bfloat16, gen=gen)
    t = make_target((1, 9, 11), 13, gen, frac_ignored=0.0)
    fast = {
        "continuity": lambda r: K.continuity_loss(r, delta=0.8),
        "similarity": lambda r: K.similarity_loss(r)[0],
        "guidance": lambda r: K.guidance_loss(r, t),
    }[op]
    val, g = kernel_grad(fast, x)
    assert g.dtype == torch.bfloat16 and val.dtype == torch.float32
    ref = {
        "continuity": lambda r: losses.continuity_loss_reference(r, delta=0.8),
        "similarity": lambda r: losses.similarity_loss_reference(r)[0],
        "guidance": lambda r: losses.guidance_loss_reference(r, t),
    }[op]
    rval, rg = ref_grad(ref, x)  # float64 on the same bf16 values
    xb = x.detach().cpu().clone().requires_grad_()
    pval = _bf16_torch(op, xb, t.cpu())
    (pg,) = torch.autograd.grad(pval, xb)
    for what, got, pt, want in (("loss", val, pval, rval), ("gradient", g, pg, rg)):
        err = (got.double().cpu() - want.cpu()).abs().max().item()
        pt_err = (pt.double() - want.cpu()).abs().max().item()
        # floor: a bf16 result cannot beat its own rounding (half an ulp, 2**-9 relative, of
        # the largest value); without it a sample where torch happens to round the largest
        # gradients exactly would fail a correct kernel
        floor = 2.0**-9 * want.abs().max().item()
        assert err <= 2 * max(pt_err, floor), (
            f"{op} bf16 {what}: {err:.3g} > 2 x torch {pt_err:.3g} (seed {seed})"
        )


def test_float64_is_accurate():
    gen, seed = _gen()
    x = make((2, 10, 6, 7), "nhwc", dtype=torch.float64, gen=gen)
    t = make_target((2, 6, 7), 10, gen)
    kw = dict(weight="scf", delta=0.3, k_min=2)
    out, rout, _ = check_op(
        lambda r: K.dynaguide_loss(r, t, **kw),
        lambda r: K.dynaguide_loss_reference(r, t, **kw),
        x,
        seed,
        rtol=1e-10,
        what="float64 fused",
    )
    _check_labels(out, rout, seed, "float64")


# ----------------------------------------------------------------- layout, dispatch
def test_gradient_keeps_channels_last_and_dtype():
    gen, _ = _gen()
    x = make((2, 6, 5, 4), "nhwc", gen=gen)
    (g,) = torch.autograd.grad(K.dynaguide_loss(x).loss, x)
    assert g.is_contiguous(memory_format=torch.channels_last)
    y = make((6, 5, 4), "nhwc", gen=gen)  # (C,H,W) slice of a channels-last batch
    (gy,) = torch.autograd.grad(K.continuity_loss(y), y)
    assert gy.shape == y.shape and gy.stride() == y.stride()


@pytest.mark.parametrize("op", ["continuity_loss", "similarity_loss", "guidance_loss"])
def test_dispatcher_reaches_kernels(op, monkeypatch):
    gen, seed = _gen()
    x = make((2, 5, 4, 6), "nhwc", gen=gen)
    t = make_target((2, 4, 6), 5, gen)
    calls = []
    real = getattr(K, op)

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(K, op, spy)
    args = (x, t) if op == "guidance_loss" else (x,)
    got = getattr(losses, op)(*args, backend="triton")
    want = getattr(losses, op)(*[a.detach() for a in args], backend="torch")
    assert len(calls) == 1, "losses did not dispatch to dynaguide.kernels"
    got = got[0] if isinstance(got, tuple) else got
    want = want[0] if isinstance(want, tuple) else want
    assert_close(got, want, RTOL32, f"dispatch {op}", seed)


# -------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise_clear_errors():
    x = make((2, 4, 3, 3))
    t = torch.zeros(2, 3, 3, dtype=torch.int64, device=DEVICE)
    with pytest.raises(TypeError, match="response"):
        K.continuity_loss([1.0])
    with pytest.raises(TypeError, match="response"):
        K.similarity_loss(torch.zeros(2, 3, 3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="response"):
        K.continuity_loss(torch.zeros(3, 3, device=DEVICE))
    with pytest.raises(ValueError, match="empty"):
        K.similarity_loss(torch.zeros(2, 0, 3, 3, device=DEVICE))
    with pytest.raises(ValueError, match="penalty"):
        K.continuity_loss(x, penalty="l2")
    with pytest.raises(ValueError, match="neighbors"):
        K.continuity_loss(x, neighbors=6)
    with pytest.raises(ValueError, match="delta"):
        K.continuity_loss(x, delta=0.0)
    with pytest.raises(ValueError, match="reduction"):
        K.similarity_loss(x, reduction="avg")
    with pytest.raises(ValueError, match="target shape"):
        K.guidance_loss(x, t[:, :2])
    with pytest.raises(TypeError, match="target"):
        K.guidance_loss(x, t.float())
    with pytest.raises(TypeError, match="ignore_index"):
        K.guidance_loss(x, t, ignore_index=1.5)
    with pytest.raises(ValueError, match="weight"):
        K.dynaguide_loss(x, weight="k/15")
    with pytest.raises(ValueError, match="beta"):
        K.dynaguide_loss(x, weight="fsf", beta=0.0)
    with pytest.raises(ValueError, match="scf_mu"):
        K.dynaguide_loss(x, weight="scf", scf_mu=-1.0)
    with pytest.raises(ValueError, match="k_min"):
        K.dynaguide_loss(x, k_min=-1)
    with pytest.raises(ValueError, match="k_min"):
        K.dynaguide_loss(x, k_min=torch.zeros(3, dtype=torch.int64, device=DEVICE))
    with pytest.raises(TypeError, match="k_min"):
        K.dynaguide_loss(x, k_min=torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match="target shape"):
        K.dynaguide_loss(x, t[:1])


def test_cpu_tensor_without_interpreter_is_rejected(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        K.continuity_loss(torch.zeros(2, 3, 3))


def test_float16_fused_close_to_reference():
    """float16 loads, float32 accumulation: loss as float32, gradient within fp16 rounding."""
    gen, seed = _gen()
    x = make((2, 9, 6, 5), "nhwc", dtype=torch.float16, gen=gen)
    t = make_target((2, 6, 5), 9, gen)
    out, g = kernel_grad(lambda r: K.dynaguide_loss(r, t, weight="scf"), x)
    rout, rg = ref_grad(lambda r: K.dynaguide_loss_reference(r, t, weight="scf"), x)
    assert out.loss.dtype == torch.float32 and g.dtype == torch.float16
    assert_close(out.loss, rout.loss, RTOL32, "float16 loss", seed)
    assert_close(g, rg, 2.0**-10, "float16 gradient", seed)
    _check_labels(out, rout, seed, "float16")


@pytest.mark.parametrize("op", ["similarity", "guidance", "fused"])
def test_dominant_channel_keeps_relative_precision(op):
    """One channel far above the rest: losses ~1e-4, p[label] - 1 ~ -1e-4 (no cancellation)."""
    gen, seed = _gen()
    x = torch.randn(3, 7, 4, 5, generator=gen)
    x[:, 2] += 9.0 + 3.0 * torch.rand(3, 4, 5, generator=gen)
    x = x.to(DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_()
    t = torch.full((3, 4, 5), 2, dtype=torch.int64, device=DEVICE)  # the target is the argmax
    t[0, 0, :2] = 5
    fast, ref = {
        "similarity": (K.similarity_loss, losses.similarity_loss_reference),
        "guidance": (
            lambda r, **kw: K.guidance_loss(r, t, **kw),
            lambda r, **kw: losses.guidance_loss_reference(r, t, **kw),
        ),
        "fused": (
            lambda r, **kw: K.dynaguide_loss(r, t, **kw),
            lambda r, **kw: K.dynaguide_loss_reference(r, t, **kw),
        ),
    }[op]
    check_op(
        lambda r: fast(r, reduction="none"),
        lambda r: ref(r, reduction="none"),
        x,
        seed,
        what=f"{op} dominant channel",
    )
    y = make((7, 1, 1), "nhwc", gen=gen)  # a single pixel: the failure this test pins
    with torch.no_grad():
        y[2] += 10.0
    check_op(
        lambda r: K.similarity_loss(r),
        lambda r: losses.similarity_loss_reference(r),
        y,
        seed,
        what="single pixel",
    )
