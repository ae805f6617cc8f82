"""The whole DynaGuide / DynaSeg / DFC objective and its gradient in two passes (Triton).

(Over 400 lines: one file per op, as for the other kernels -- the two ``@triton.jit``
passes, their launcher, the autograd Function and the public entry point with its checks
are one unit, and the gradient derivation below explains all of them.)

    total = similarity_weight * CE(r, argmax r) + w(K_eff) * continuity(r)
            + guidance_weight * CE_ignore(r, target)

with ``K`` the number of distinct argmax labels of the *current* response,
``K_eff = max(K, k_min)`` and ``w`` one of ``mu`` ("constant"), ``K_eff / beta``
("fsf", "dynaguide") or ``scf_mu / K_eff`` ("scf"). ``w`` is computed on the device from
the label histogram; nothing synchronises with the host.

Two passes, because ``w`` needs the whole image's argmax before any gradient of the
continuity term can be written:

* pass 1 (reads the response once): per pixel the channel max ``m``,
  ``t = sum_{c != label} exp(x_c - m)`` (so ``s = 1 + t``, see ``_common._stats_loop``),
  the argmax label, ``x[target]``; the continuity loss of the pairs anchored at the pixel
  (their neighbours come from L1/L2). Writes labels (int64), ``m`` and ``t`` (two floats per
  pixel, only when a gradient follows), the label histogram and valid-pixel count (int32
  atomics) and per-program loss partials (similarity ``log1p(t)``, guidance
  ``(m - x_target) + log1p(t)``).
* pass 2 (only when a gradient is needed; reads the response once more, labels, m, t and
  target, writes the gradient once): computes K from the histogram, ``w(K_eff)``, then per
  element, with ``p = exp(x - m) / (1 + t)`` (and ``p - 1 = -t / (1 + t)`` at the label):

      dtotal/dx_c = sim_w * (p_c - [c == label]) / (H W)
                  + guide_w * valid * (p_c - [c == target]) / max(V, 1)
                  + w * dcont/dx_c                     (see continuity.py)

  all times ``1/N`` for ``reduction="mean"``. The labels and K are constants of the
  objective (argmax has no gradient), and so is ``w``.
* a one-program finalisation turns the partials into per-image losses, K and the
  reduced loss.

HBM traffic with a gradient: 2 reads of the response + 1 write of the gradient
(+ 16 bytes per pixel for labels, m and t, + the target). Without one (``torch.no_grad``
or a response that does not require grad): 1 read.

In a training loop (one image; ``response = model(x).squeeze(0)`` is a channels-last view)::

    loss, labels, k = dynaguide_loss(
        response, target,                 # target: (H, W) int64, -1 = unguided, or None
        weight=cfg.weight_mode, mu=cfg.mu, beta=cfg.beta, scf_mu=cfg.scf_mu,
        k_min=k_floor,                    # 0-dim int64 device tensor (silhouette floor) or None
        similarity_weight=cfg.similarity_weight, guidance_weight=cfg.guidance_weight,
        penalty=cfg.penalty, neighbors=cfg.neighbors, delta=cfg.delta, ignore_index=-1,
    )
    loss.backward()                       # rescales the stored gradient only if grad_output != 1

CUDA graphs: the call never synchronises with the host and allocates only buffers whose
sizes follow from the response's shape, so an iteration (forward, this loss, backward,
optimiser step) can be captured after one eager warm-up iteration (which also compiles the
kernels). Keep every tensor argument (target, k_min) a static buffer updated in place, and
the float/int options fixed (they become kernel arguments baked into the graph). One
backward per forward (the stored gradient is scaled in place).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from dynaguide.objective import ObjectiveResult
from dynaguide.objective import objective_reference as dynaguide_loss_reference  # noqa: F401

from ._common import (
    WEIGHT_MODES,
    Layout,
    _add_histogram,
    _coffs,
    _continuity_grad_tile,
    _count_labels,
    _dyn_weight,
    _goffs,
    _inv,
    _join,
    _log1p,
    _pixels,
    _program,
    _stats_loop,
    check_continuity_options,
    check_int,
    check_number,
    check_reduction,
    check_response,
    check_target,
    check_target_values,
    direction_counts,
    geometry,
    grad_strides,
    jit_any_size,
    launch,
    new_grad,
    split_float,
    target_flat,
)
from ._finalize import GradStore, finalize

#: Result of :func:`dynaguide_loss` (unpacks as ``loss, labels, n_labels``).
DynaGuideLoss = ObjectiveResult


@jit_any_size
def _pass1_kernel(
    r_ptr,
    t_ptr,
    labels_ptr,
    max_ptr,
    rest_ptr,
    cnt_ptr,
    sim_part_ptr,
    cont_part_ptr,
    guide_part_ptr,
    C,
    H,
    W,
    HW,
    n_pblocks,
    cnt_stride,
    ignore_index,
    s_n,
    s_c,
    s_h,
    s_w,
    t_n,
    t_h,
    t_w,
    cnt_v,
    cnt_h,
    cnt_d,
    delta_hi,
    delta_lo,
    HAS_CONT: tl.constexpr,
    HAS_GUIDE: tl.constexpr,
    IS_HUBER: tl.constexpr,
    EIGHT: tl.constexpr,
    STORE_STATS: tl.constexpr,
    FLAT: tl.constexpr,
    T_FLAT: tl.constexpr,
    UNIT: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    NUM_BINS: tl.constexpr,
):
    """Grid (N * pixel blocks,): labels, m, t, histogram, valid count, loss partials."""
    pid_p, n = _program(n_pblocks)
    p, pmask, i, j, pix = _pixels(pid_p, HW, W, s_h, s_w, BLOCK_P, FLAT, UNIT)
    tc = tl.zeros([BLOCK_P], tl.int32)
    valid = pmask
    if HAS_GUIDE:
        toff = p.to(tl.int64) if T_FLAT else i.to(tl.int64) * t_h + j.to(tl.int64) * t_w
        t = tl.load(t_ptr + n * t_n + toff, mask=pmask, other=0).to(tl.int64)
        valid = pmask & (t != ignore_index)
        tc = tl.maximum(t, 0).to(tl.int32)  # < C
    base = r_ptr + n * s_n
    m, t, idx, xt, cont = _stats_loop(
        base, pix, pmask, i < H - 1, j < W - 1, tc, C, s_c, s_h, s_w,
        _inv(cnt_v, ACC), _inv(cnt_h, ACC), _inv(cnt_d, ACC), _join(delta_hi, delta_lo, ACC),
        HAS_GUIDE, HAS_CONT, IS_HUBER, EIGHT, ACC, BLOCK_P, BLOCK_C, UNIT,
    )  # fmt: skip
    logs = _log1p(t)
    tl.store(labels_ptr + n * HW + p, idx.to(tl.int64), mask=pmask)
    if STORE_STATS:
        tl.store(max_ptr + n * HW + p, m, mask=pmask)
        tl.store(rest_ptr + n * HW + p, t, mask=pmask)
    row = cnt_ptr + n * cnt_stride
    _add_histogram(row, idx, pmask, C, NUM_BINS)
    part = n * n_pblocks + pid_p
    tl.store(sim_part_ptr + part, tl.sum(tl.where(pmask, logs, 0.0), axis=0))
    if HAS_CONT:
        tl.store(cont_part_ptr + part, tl.sum(cont, axis=0))
    if HAS_GUIDE:
        tl.store(guide_part_ptr + part, tl.sum(tl.where(valid, (m - xt) + logs, 0.0), axis=0))
        tl.atomic_add(row + C, tl.sum(valid.to(tl.int32), axis=0), sem="relaxed")


@jit_any_size
def _pass2_kernel(
    r_ptr,
    t_ptr,
    labels_ptr,
    max_ptr,
    rest_ptr,
    cnt_ptr,
    kmin_ptr,
    g_ptr,
    C,
    H,
    W,
    HW,
    n_pblocks,
    cnt_stride,
    ignore_index,
    kmin_stride,
    kmin_scalar,
    s_n,
    s_c,
    s_h,
    s_w,
    t_n,
    t_h,
    t_w,
    g_n,
    g_c,
    g_p,
    cnt_v,
    cnt_h,
    cnt_d,
    delta_hi,
    delta_lo,
    simw_hi,
    simw_lo,
    guidew_hi,
    guidew_lo,
    wp_hi,
    wp_lo,
    red_hi,
    red_lo,
    HAS_CONT: tl.constexpr,
    HAS_GUIDE: tl.constexpr,
    HAS_KMIN: tl.constexpr,
    WEIGHT_MODE: tl.constexpr,
    IS_HUBER: tl.constexpr,
    EIGHT: tl.constexpr,
    FLAT: tl.constexpr,
    T_FLAT: tl.constexpr,
    UNIT: tl.constexpr,
    G_CL: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_BINS: tl.constexpr,
):
    """Grid (N * pixel blocks,): d(total)/d(response), with w(K_eff) read from device memory."""
    pid_p, n = _program(n_pblocks)
    p, pmask, i, j, pix = _pixels(pid_p, HW, W, s_h, s_w, BLOCK_P, FLAT, UNIT)
    red = _join(red_hi, red_lo, ACC)
    row = cnt_ptr + n * cnt_stride
    lab = tl.load(labels_ptr + n * HW + p, mask=pmask, other=0).to(tl.int32)
    mx = tl.load(max_ptr + n * HW + p, mask=pmask, other=0.0)
    rest = tl.load(rest_ptr + n * HW + p, mask=pmask, other=0.0)
    inv_s = 1.0 / (1.0 + rest)
    pm1 = (-rest * inv_s)[:, None]  # p - 1 at the label, without cancellation
    sim_scale = _join(simw_hi, simw_lo, ACC) * red / tl.cast(HW, ACC)
    tc = tl.zeros([BLOCK_P], tl.int32)
    gw = tl.zeros([BLOCK_P], ACC)
    if HAS_GUIDE:
        toff = p.to(tl.int64) if T_FLAT else i.to(tl.int64) * t_h + j.to(tl.int64) * t_w
        t = tl.load(t_ptr + n * t_n + toff, mask=pmask, other=0).to(tl.int64)
        tc = tl.maximum(t, 0).to(tl.int32)  # < C
        nv = tl.load(row + C).to(ACC)
        scale = _join(guidew_hi, guidew_lo, ACC) * red / tl.maximum(nv, 1.0)
        gw = tl.where(pmask & (t != ignore_index), scale, 0.0)
        at_lab = (tc == lab)[:, None]
    wc = tl.zeros([], ACC)
    if HAS_CONT:
        k = _count_labels(row, C, BLOCK_BINS)
        kmin = tl.zeros([], tl.int32) + kmin_scalar
        if HAS_KMIN:
            kmin = tl.maximum(kmin, tl.load(kmin_ptr + n * kmin_stride).to(tl.int32))
        wc = _dyn_weight(k, kmin, _join(wp_hi, wp_lo, ACC), WEIGHT_MODE, ACC) * red
    inv_v = _inv(cnt_v, ACC)
    inv_h = _inv(cnt_h, ACC)
    inv_d = _inv(cnt_d, ACC)
    delta = _join(delta_hi, delta_lo, ACC)
    has_up = i > 0
    has_dn = i < H - 1
    has_lt = j > 0
    has_rt = j < W - 1
    base = r_ptr + n * s_n
    gbase = g_ptr + n * g_n
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        m2 = pmask[:, None] & (c < C)[None, :]
        ptrs = base + pix[:, None] + _coffs(c, s_c, UNIT)[None, :]
        x = tl.load(ptrs, mask=m2, other=0.0).to(ACC)
        prob = tl.exp(x - mx[:, None]) * inv_s[:, None]
        g = tl.where(c[None, :] == lab[:, None], pm1, prob) * sim_scale
        if HAS_GUIDE:
            hit = c[None, :] == tc[:, None]
            g += tl.where(hit, tl.where(at_lab, pm1, prob - 1.0), prob) * gw[:, None]
        if HAS_CONT:
            g += wc * _continuity_grad_tile(
                x, ptrs, m2, has_up, has_dn, has_lt, has_rt, s_h, s_w, inv_v, inv_h, inv_d, delta,
                IS_HUBER, EIGHT, ACC,
            )  # fmt: skip
        gptrs = gbase + _goffs(p, c, g_c, g_p, G_CL)
        tl.store(gptrs, g.to(g_ptr.dtype.element_ty), mask=m2)


def _weight_mode(weight: str) -> int:
    if weight not in WEIGHT_MODES:
        raise ValueError(f"weight must be one of {sorted(WEIGHT_MODES)}, got {weight!r}")
    return WEIGHT_MODES[weight]


def _check_k_min(k_min: Any, lay: Layout) -> tuple[torch.Tensor | None, int]:
    """k_min as (tensor or None, scalar floor)."""
    if k_min is None:
        return None, 0
    if isinstance(k_min, torch.Tensor):
        if k_min.is_floating_point() or k_min.is_complex() or k_min.dtype == torch.bool:
            raise TypeError(f"k_min must be an integer tensor, got {k_min.dtype}")
        if k_min.dim() > 1 or (k_min.dim() == 1 and k_min.shape[0] != lay.n):
            raise ValueError(
                f"k_min must be 0-dim or have shape ({lay.n},), got {tuple(k_min.shape)}"
            )
        if k_min.device != lay.r.device:
            raise ValueError(f"k_min is on {k_min.device} but response is on {lay.r.device}")
        return k_min, 0
    v = check_int("k_min", k_min)
    if v < 0:
        raise ValueError(f"k_min must be >= 0, got {v}")
    return None, v


def fused_forward(
    lay: Layout,
    t: torch.Tensor | None,
    *,
    weight_mode: int,
    weight_param: float,
    k_min: torch.Tensor | None,
    k_min_scalar: int,
    similarity_weight: float,
    guidance_weight: float,
    penalty: str,
    neighbors: int,
    delta: float,
    ignore_index: int,
    reduction: int,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run pass 1, finalisation and (if ``need_grad``) pass 2; return (loss, labels, K, grad)."""
    dev = lay.r.device
    has_cont = not (weight_mode == 0 and weight_param == 0.0)
    has_guide = t is not None
    geo1 = geometry(lay, stencil=has_cont)
    n_pb = geo1.n_pblocks(lay.hw)
    labels = torch.empty((lay.n, lay.h, lay.w), dtype=torch.int64, device=dev)
    # Per-pixel softmax statistics for pass 2: max m and t = sum of the other exp(x - m).
    # Separate allocations (not views of one buffer): every pointer argument then has the
    # allocator's alignment, which Triton specialises on, whatever the image size.
    stats = [torch.empty((lay.n, lay.h, lay.w), dtype=lay.loss_dtype, device=dev) for _ in "mt"]
    counts = torch.zeros((lay.n, lay.c + 1), dtype=torch.int32, device=dev)  # histogram | valid
    parts = [torch.empty((lay.n, n_pb), dtype=lay.loss_dtype, device=dev) for _ in "scg"]
    tt = t if t is not None else labels
    t_n, t_h, t_w = tt.stride()
    t_flat = target_flat(tt, lay)
    counts_dir = direction_counts(lay)
    launch(
        _pass1_kernel,
        (n_pb * lay.n,),
        lay.r,
        tt,
        labels,
        stats[0],
        stats[1],
        counts,
        parts[0],
        parts[1],
        parts[2],
        lay.c,
        lay.h,
        lay.w,
        lay.hw,
        n_pb,
        counts.stride(0),
        ignore_index,
        *lay.strides,
        t_n,
        t_h,
        t_w,
        *counts_dir,
        *split_float(delta),
        HAS_CONT=has_cont,
        HAS_GUIDE=has_guide,
        IS_HUBER=penalty == "huber",
        EIGHT=neighbors == 8,
        STORE_STATS=need_grad,
        FLAT=lay.flat,
        T_FLAT=t_flat,
        UNIT=lay.unit,
        ACC=lay.acc,
        BLOCK_P=geo1.block_p,
        BLOCK_C=geo1.block_c,
        NUM_BINS=triton.next_power_of_2(lay.c),
        num_warps=geo1.num_warps,
    )
    loss, k = finalize(
        lay,
        reduction,
        n_pb,
        sim_part=parts[0],
        cont_part=parts[1] if has_cont else None,
        guide_part=parts[2] if has_guide else None,
        counts=counts,
        nvalid=counts[:, lay.c],
        count_k=True,
        k_min=k_min,
        k_min_scalar=k_min_scalar,
        weight_mode=weight_mode,
        weight_param=weight_param,
        sim_weight=similarity_weight,
        guide_weight=guidance_weight,
    )
    assert k is not None
    if not need_grad:
        return loss, labels, k, None
    grad = new_grad(lay)
    geo2 = geometry(lay, stencil=has_cont)
    n_pb2 = geo2.n_pblocks(lay.hw)
    launch(
        _pass2_kernel,
        (n_pb2 * lay.n,),
        lay.r,
        tt,
        labels,
        stats[0],
        stats[1],
        counts,
        k_min if k_min is not None else counts,
        grad,
        lay.c,
        lay.h,
        lay.w,
        lay.hw,
        n_pb2,
        counts.stride(0),
        ignore_index,
        0 if k_min is None or k_min.dim() == 0 else k_min.stride(0),
        k_min_scalar,
        *lay.strides,
        t_n,
        t_h,
        t_w,
        *grad_strides(grad),
        *counts_dir,
        *split_float(delta),
        *split_float(similarity_weight),
        *split_float(guidance_weight),
        *split_float(weight_param),
        *split_float(1.0 / lay.n if reduction == 1 else 1.0),
        HAS_CONT=has_cont,
        HAS_GUIDE=has_guide,
        HAS_KMIN=k_min is not None,
        WEIGHT_MODE=weight_mode,
        IS_HUBER=penalty == "huber",
        EIGHT=neighbors == 8,
        FLAT=lay.flat,
        T_FLAT=t_flat,
        UNIT=lay.unit,
        G_CL=lay.channels_last,
        ACC=lay.acc,
        BLOCK_P=geo2.block_p,
        BLOCK_C=geo2.block_c,
        BLOCK_BINS=min(1024, triton.next_power_of_2(lay.c)),
        num_warps=geo2.num_warps,
    )
    return loss, labels, k, grad


class DynaGuideLossFunction(torch.autograd.Function):
    """autograd Function of :func:`dynaguide_loss` (gradient from pass 2, rescaled in backward)."""

    @staticmethod
    def forward(
        ctx: Any,
        response: torch.Tensor,
        target: torch.Tensor | None,
        k_min: torch.Tensor | None,
        opts: dict[str, Any],
    ) -> Any:
        lay = check_response(response)
        t = (
            check_target(target, lay)
            if target is not None and opts["guidance_weight"] != 0
            else None
        )
        loss, labels, k, grad = fused_forward(
            lay, t, k_min=k_min, need_grad=ctx.needs_input_grad[0], **opts
        )
        GradStore.save(ctx, lay, grad)
        if not lay.batched:
            labels, k = labels[0], k[0]
        ctx.mark_non_differentiable(labels, k)
        return loss, labels, k

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor, _g_labels: Any, _g_k: Any) -> Any:
        return GradStore.backward(ctx, grad_output), None, None, None


def _options(
    lay: Layout,
    *,
    weight: str,
    mu: float,
    beta: float,
    scf_mu: float,
    similarity_weight: float,
    guidance_weight: float,
    penalty: str,
    neighbors: int,
    delta: float,
    ignore_index: int,
    reduction: str,
) -> dict[str, Any]:
    mode = _weight_mode(weight)
    check_continuity_options(penalty, neighbors, delta)
    param = (
        check_number("mu", mu, positive=False)
        if mode == 0
        else check_number("beta", beta, positive=True)
        if mode == 1
        else check_number("scf_mu", scf_mu, positive=True)
    )
    return {
        "weight_mode": mode,
        "weight_param": param,
        "similarity_weight": check_number("similarity_weight", similarity_weight, positive=False),
        "guidance_weight": check_number("guidance_weight", guidance_weight, positive=False),
        "penalty": penalty,
        "neighbors": neighbors,
        "delta": float(delta),
        "ignore_index": check_int("ignore_index", ignore_index),
        "reduction": check_reduction(reduction),
    }


def dynaguide_loss(
    response: torch.Tensor,
    target: torch.Tensor | None = None,
    *,
    weight: str = "fsf",
    mu: float = 1.0,
    beta: float = 15.0,
    scf_mu: float = 50.0,
    k_min: int | torch.Tensor | None = None,
    similarity_weight: float = 1.0,
    guidance_weight: float = 1.0,
    penalty: str = "huber",
    neighbors: int = 8,
    delta: float = 1.0,
    ignore_index: int = -1,
    reduction: str = "mean",
    validate: bool = True,
) -> DynaGuideLoss:
    """Fused refinement objective: similarity + w(K) * continuity + guidance, with gradient.

    Reads the response once for the loss, labels and K, and once more to write
    d(total)/d(response) when a gradient is needed; ``backward`` only rescales that stored
    gradient by ``grad_output`` (on device; nothing happens when it is 1). No host
    synchronisation, no data-dependent allocation: a whole training iteration around it
    can be captured in a CUDA graph.

    Parameters
    ----------
    response : Tensor, shape (C, H, W) or (N, C, H, W)
        float32, bfloat16, float16 or float64, any strides (channels-last is read in
        place; the gradient comes back in the same memory format and dtype). float16: the
        gradient (entries of order 1 / (H W)) is kept in float32 until backward applies
        ``grad_output``, so use a loss scale (``torch.amp.GradScaler``) for large images;
        bfloat16 has float32's range and needs none.
    target : integer Tensor, shape (H, W) or (N, H, W), optional
        Guide labels aligned to the channels (``< C``) or ``ignore_index``. None (or
        ``guidance_weight=0``) drops the guidance term.
    weight : {"fsf", "dynaguide", "scf", "constant"}
        Continuity weight w(K_eff): ``K_eff / beta`` ("fsf" and its alias "dynaguide"),
        ``scf_mu / K_eff`` ("scf") or ``mu`` ("constant"), as ``RefineConfig.weight_mode``.
    mu, beta, scf_mu : float
        Parameters of the weight modes (``mu >= 0``, ``beta > 0``, ``scf_mu > 0``).
    k_min : int or integer Tensor (0-dim or (N,)), optional
        Floor on K in the weight only: ``K_eff = max(K, k_min)`` (the silhouette phase).
        A tensor stays on the device.
    similarity_weight, guidance_weight : float
        Weights (>= 0) of the similarity and guidance terms.
    penalty, neighbors, delta
        Continuity options, as :func:`dynaguide.losses.continuity_loss`.
    ignore_index : int
        Target value without guidance.
    reduction : {"mean", "sum", "none"}
        Over the N images (``"none"``: per-image totals).
    validate : bool
        Raise ValueError on a target class ``>= C`` (one host synchronisation on a GPU;
        the refinement loop, whose targets come from the guide aligner, passes False).

    Returns
    -------
    DynaGuideLoss
        ``(loss, labels, n_labels)``: the differentiable total (float32; float64 for
        float64 input), the int64 argmax labels (first maximum on ties) and the int64
        number of distinct labels K (not ``K_eff``), all on the response's device.

    Examples
    --------
    >>> loss, labels, k = dynaguide_loss(response, target, weight="dynaguide")  # doctest: +SKIP
    >>> loss.backward()  # doctest: +SKIP
    """
    lay = check_response(response)
    opts = _options(
        lay,
        weight=weight,
        mu=mu,
        beta=beta,
        scf_mu=scf_mu,
        similarity_weight=similarity_weight,
        guidance_weight=guidance_weight,
        penalty=penalty,
        neighbors=neighbors,
        delta=delta,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    kt, ks = _check_k_min(k_min, lay)
    if target is not None:
        t = check_target(target, lay)
        if validate and opts["guidance_weight"] != 0:
            check_target_values(t, lay.c, opts["ignore_index"])
    loss, labels, k = DynaGuideLossFunction.apply(
        response, target, kt, {**opts, "k_min_scalar": ks}
    )
    return DynaGuideLoss(loss, labels, k)
