"""DiffSeg-style attention merging over any self-attention provider (Tian et al.,
"Diffuse, Attend, and Segment", CVPR 2024, arXiv 2308.12469).

The algorithm (Tian et al., CVPR 2024), with every size a parameter:

1. **Aggregate** self-attention maps given at one or more resolutions into one
   tensor ``A`` of shape (Gh, Gw, Gh, Gw): average over heads, bilinearly upsample each
   query's key map to (Gh, Gw) and renormalise it to sum to 1, tile the query axes
   (nearest), and sum with weights proportional to the resolution (``sqrt(tokens)``).
2. **Merge**. Iteration 0 compares the anchor maps of a grid of query positions
   with all Gh*Gw maps by symmetric KL, ``D(a, b) = KL(a||b)/2 + KL(b||a)/2``, and each
   anchor's proposal is the mean of the maps with ``D < tau_0``. Iterations 1..N-1 walk
   the proposals in order, skip those already matched, and merge everything under
   ``tau_i`` (including proposals matched earlier, as the reference code does).
3. Optional **k-means refinement** initialised at the proposals.
4. **NMS**: upsample the proposals bilinearly to the output size and take the argmax.

The pairwise KL is computed with matrix products, never a Python loop over maps:
``D = (S_p[:, None] + S_q[None, :] - P @ log(Q).T - (Q @ log(P).T).T) / 2`` with
``S = sum p log p``; the query axis is processed in chunks so the temporaries stay under
``chunk_elements`` numbers. Zero probabilities are clamped to the dtype's smallest normal
number inside ``log`` (the reference adds no epsilon and can produce ``inf``).

Attention providers: :class:`ViTAttention` reads a local Hugging Face ViT / DINO /
DINOv2 (with or without registers) checkpoint folder or its ONNX export (see
:func:`export_vit_attention`) and returns the patch-token self-attention (CLS and register
tokens dropped, rows renormalised over the patch keys, chosen layers averaged over heads
and layers). Any callable ``image -> list of maps`` works as a provider.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from dynaguide.errors import ModelFileError, first_line
from dynaguide.guidance.base import available_guides, register_guide
from dynaguide.guidance.ort import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_INPUT_SIDE,
    METADATA_PREFIX,
    ExportReport,
    ImagePreprocessor,
    OrtSession,
    check_onnx_file,
    check_rgb_image,
    export_onnx,
    load_pretrained,
    read_checkpoint_config,
    read_metadata,
    require_transformers,
    resolve_torch_device,
    temporary_onnx_path,
    verify_image_model,
)

__all__ = [
    "VIT_MODEL_TYPES",
    "AttentionProvider",
    "DiffSegGuide",
    "PatchAttention",
    "ViTAttention",
    "aggregate_attention",
    "anchor_grid",
    "diffseg_segment",
    "export_vit_attention",
    "kmeans_refine",
    "merge_attention",
    "nms_labels",
    "pairwise_symmetric_kl",
]

logger = logging.getLogger("dynaguide.guidance")

#: Supported ``model_type`` values and their number of prefix (CLS + register) tokens source.
VIT_MODEL_TYPES = ("vit", "dinov2", "dinov2_with_registers")
_KIND = "vit-attention"
_LAYOUTS = ("reference", "even")
DEFAULT_CHUNK = 1 << 24


# --------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------


def _grid_shape(grid_shape: Any, name: str = "grid_shape") -> tuple[int, int]:
    if isinstance(grid_shape, (int, np.integer)):
        grid_shape = (int(grid_shape), int(grid_shape))
    try:
        gh, gw = (int(v) for v in grid_shape)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or (rows, cols), got {grid_shape!r}") from None
    if gh < 1 or gw < 1:
        raise ValueError(f"{name} must be positive, got {(gh, gw)}")
    return gh, gw


def _as_tensor(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {x.dtype}")
    return x


def _taus(tau: float | Sequence[float], n_iter: int) -> list[float]:
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or not 1 <= n_iter <= 1000:
        raise ValueError(f"n_iter must be an int in [1, 1000], got {n_iter!r}")
    taus = [float(tau)] * n_iter if isinstance(tau, (int, float)) else [float(t) for t in tau]
    if len(taus) != n_iter:
        raise ValueError(
            f"tau must be a number or a sequence of n_iter={n_iter} numbers, got {tau!r}"
        )
    if not all(math.isfinite(t) and t > 0 for t in taus):
        raise ValueError(f"tau values must be finite and > 0, got {taus}")
    return taus


def _chunk_rows(n_rows: int, row_elements: int, chunk_elements: int) -> int:
    if (
        isinstance(chunk_elements, bool)
        or not isinstance(chunk_elements, int)
        or chunk_elements < 1
    ):
        raise ValueError(f"chunk_elements must be a positive int, got {chunk_elements!r}")
    return max(1, min(n_rows, chunk_elements // max(1, row_elements)))


# --------------------------------------------------------------------------------------
# The algorithm
# --------------------------------------------------------------------------------------


def anchor_grid(
    grid_shape: int | tuple[int, int],
    num_points: int | tuple[int, int] = 16,
    *,
    layout: str = "reference",
) -> np.ndarray:
    """Anchor query positions on a (rows, cols) grid (DiffSeg's anchor grid).

    Parameters
    ----------
    grid_shape : int or (int, int)
        Attention grid size (Gh, Gw).
    num_points : int or (int, int)
        Anchors per axis (clamped to the grid size).
    layout : {"reference", "even"}
        ``"reference"``: DiffSeg's formula per axis, step ``(G-1)//(M-1)``, centred
        (rows 1, 5, ..., 61 for G=64, M=16). It bunches the anchors in the middle when
        ``G < 2M``; ``"even"`` puts one anchor at the centre of each of M equal cells
        (``floor((i + 1/2) G / M)``), which covers small ViT grids.

    Returns
    -------
    ndarray (M_rows * M_cols, 2) int64
        (row, col) pairs, rows outer (``meshgrid(indexing="ij")`` order).
    """
    gh, gw = _grid_shape(grid_shape)
    mh, mw = _grid_shape(num_points, "num_points")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {_LAYOUTS}, got {layout!r}")

    def axis(g: int, m: int) -> np.ndarray:
        m = min(m, g)
        if m == 1:
            return np.array([(g - 1) // 2], np.int64)
        if layout == "reference":
            step = (g - 1) // (m - 1)
            offset = (g - 1 - step * (m - 1)) // 2
            return offset + step * np.arange(m, dtype=np.int64)
        return np.floor((np.arange(m) + 0.5) * g / m).astype(np.int64)

    rows, cols = np.meshgrid(axis(gh, mh), axis(gw, mw), indexing="ij")
    return np.stack([rows.ravel(), cols.ravel()], axis=1)


def aggregate_attention(
    maps: Sequence[Any],
    *,
    weights: Sequence[float] | None = None,
    out_shape: tuple[int, int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Aggregate self-attention maps of one or more resolutions (DiffSeg's attention aggregation).

    Parameters
    ----------
    maps : sequence of tensors
        Each of shape (rh, rw, rh, rw) (query row, query col, key row, key col) or
        (heads, rh, rw, rh, rw); every query's key map is a distribution (non-negative).
    weights : sequence of float, optional
        One weight per map; default proportional to ``sqrt(rh * rw)`` (64:32:16:8 for
        DiffSeg's four resolutions). Normalised to sum to 1.
    out_shape : (int, int), optional
        Output grid (Gh, Gw); default the largest input grid.
    dtype : torch.dtype
        Computation dtype.

    Returns
    -------
    Tensor (Gh, Gw, Gh, Gw)
        For every query, a distribution over the (Gh, Gw) keys.

    Raises
    ------
    ValueError, TypeError
        For empty input, wrong shapes, negative or non-finite values, or bad weights.
    """
    if isinstance(maps, (torch.Tensor, np.ndarray)):
        maps = [maps]
    if len(maps) == 0:
        raise ValueError("maps must hold at least one attention tensor")
    tensors = []
    for i, m in enumerate(maps):
        t = _as_tensor(m, f"maps[{i}]")
        if t.ndim == 5:
            t = t.to(dtype).mean(0)
        if t.ndim != 4 or t.shape[:2] != t.shape[2:]:
            raise ValueError(
                f"maps[{i}] must have shape (rh, rw, rh, rw) or (heads, rh, rw, rh, rw), "
                f"got {tuple(m.shape)}"
            )
        # one reduction each: a sum is finite only if every entry is (NaN and inf propagate)
        if t.numel() == 0 or not bool(torch.isfinite(t.sum())) or bool(t.min() < 0):
            raise ValueError(f"maps[{i}] must be non-empty, finite and non-negative")
        tensors.append(t.to(dtype))
    grids = [tuple(t.shape[:2]) for t in tensors]
    if out_shape is None:
        out_shape = max(grids, key=lambda g: g[0] * g[1])
    gh, gw = _grid_shape(out_shape, "out_shape")
    if weights is None:
        w = np.array([math.sqrt(r * c) for r, c in grids], np.float64)
    else:
        w = np.asarray(list(weights), np.float64)
        if (
            w.shape != (len(tensors),)
            or not np.all(np.isfinite(w))
            or np.any(w < 0)
            or w.sum() <= 0
        ):
            raise ValueError(
                f"weights must be {len(tensors)} non-negative numbers with a positive sum, "
                f"got {weights!r}"
            )
    w = w / w.sum()
    device = tensors[0].device
    out = torch.zeros(gh, gw, gh * gw, dtype=dtype, device=device)
    for t, (rh, rw), wr in zip(tensors, grids, w, strict=True):
        keys = t.to(device).reshape(rh * rw, 1, rh, rw)
        if (rh, rw) != (gh, gw):
            keys = F.interpolate(keys, size=(gh, gw), mode="bilinear", align_corners=False)
        keys = keys.reshape(rh, rw, gh * gw)
        keys = keys / keys.sum(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        qi = torch.div(torch.arange(gh, device=device) * rh, gh, rounding_mode="floor")
        qj = torch.div(torch.arange(gw, device=device) * rw, gw, rounding_mode="floor")
        out += float(wr) * keys[qi][:, qj]
    return out.reshape(gh, gw, gh, gw)


def pairwise_symmetric_kl(
    p: torch.Tensor, q: torch.Tensor, *, chunk_elements: int = DEFAULT_CHUNK
) -> torch.Tensor:
    """Symmetric KL between every row of ``p`` and every row of ``q``.

    ``D[i, j] = sum_k (p_ik - q_jk) (log p_ik - log q_jk) / 2``, computed as
    ``(S_p[i] + S_q[j] - p_i . log q_j - q_j . log p_i) / 2`` with ``S = sum p log p``:
    two matrix products per chunk of ``q`` rows.

    Parameters
    ----------
    p : Tensor (n, d)
    q : Tensor (m, d)
        Rows are distributions (zeros allowed; ``log`` clamps at the smallest normal).
    chunk_elements : int
        Bound on the temporaries (rows of ``q`` per chunk times ``d``).

    Returns
    -------
    Tensor (n, m)
    """
    if p.ndim != 2 or q.ndim != 2 or p.shape[1] != q.shape[1]:
        raise ValueError(
            f"p and q must be (n, d) and (m, d), got {tuple(p.shape)} and {tuple(q.shape)}"
        )
    tiny = torch.finfo(p.dtype).tiny
    log_p = p.clamp_min(tiny).log()
    s_p = (p * log_p).sum(1)
    out = torch.empty(p.shape[0], q.shape[0], dtype=p.dtype, device=p.device)
    step = _chunk_rows(q.shape[0], q.shape[1], chunk_elements)
    for start in range(0, q.shape[0], step):
        qc = q[start : start + step]
        log_q = qc.clamp_min(tiny).log()
        s_q = (qc * log_q).sum(1)
        cross = p @ log_q.T + (qc @ log_p.T).T
        out[:, start : start + step] = 0.5 * (s_p[:, None] + s_q[None, :] - cross)
    return out


def merge_attention(
    attention: torch.Tensor,
    *,
    num_points: int | tuple[int, int] = 16,
    tau: float | Sequence[float] = 1.1,
    n_iter: int = 3,
    layout: str = "reference",
    anchors: np.ndarray | None = None,
    chunk_elements: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """Iterative attention merging (DiffSeg's anchor grid).

    Parameters
    ----------
    attention : Tensor (Gh, Gw, Gh, Gw)
        Aggregated attention (:func:`aggregate_attention`).
    num_points : int or (int, int)
        Anchors per axis (ignored when ``anchors`` is given).
    tau : float or sequence of float
        KL threshold, constant or one per iteration (DiffSeg: 1.1 on COCO, 0.9 on
        Cityscapes, tuned for Stable Diffusion attention: re-tune for other models).
    n_iter : int
        Merging iterations including the anchor iteration (DiffSeg: 3).
    layout : {"reference", "even"}
        Anchor layout, see :func:`anchor_grid`.
    anchors : ndarray (M, 2), optional
        Explicit (row, col) anchors, in the order they are used.
    chunk_elements : int
        Memory bound for the pairwise KL and the member sums.

    Returns
    -------
    Tensor (K, Gh, Gw)
        The merged proposals, in the order they were created.
    """
    a = _as_tensor(attention, "attention")
    if a.ndim != 4 or a.shape[:2] != a.shape[2:]:
        raise ValueError(f"attention must have shape (Gh, Gw, Gh, Gw), got {tuple(a.shape)}")
    gh, gw = a.shape[:2]
    taus = _taus(tau, n_iter)
    flat = a.reshape(gh * gw, gh * gw)
    if anchors is None:
        anchors = anchor_grid((gh, gw), num_points, layout=layout)
    anchors = np.asarray(anchors)
    if anchors.ndim != 2 or anchors.shape[1] != 2 or anchors.shape[0] < 1:
        raise ValueError(f"anchors must have shape (M, 2), got {anchors.shape}")
    if np.any(anchors < 0) or np.any(anchors[:, 0] >= gh) or np.any(anchors[:, 1] >= gw):
        raise ValueError(f"anchors must lie inside the {gh}x{gw} grid")
    idx = torch.as_tensor(anchors[:, 0] * gw + anchors[:, 1], device=flat.device)
    anchor_maps = flat[idx]

    # Iteration 0: every anchor against all Gh*Gw query maps, in chunks of queries.
    members_sum = torch.zeros_like(anchor_maps)
    counts = torch.zeros(anchor_maps.shape[0], dtype=flat.dtype, device=flat.device)
    step = _chunk_rows(flat.shape[0], flat.shape[1] * 2, chunk_elements)
    for start in range(0, flat.shape[0], step):
        block = flat[start : start + step]
        member = (
            pairwise_symmetric_kl(anchor_maps, block, chunk_elements=chunk_elements) < taus[0]
        ).to(flat.dtype)
        members_sum += member @ block
        counts += member.sum(1)
    # The anchor is its own member (D = 0) unless rounding says otherwise: include it explicitly.
    empty = counts == 0
    members_sum[empty] = anchor_maps[empty]
    counts[empty] = 1
    proposals = members_sum / counts[:, None]

    # Iterations 1..N-1: greedy walk over the proposals, in order.
    for t in taus[1:]:
        d = pairwise_symmetric_kl(proposals, proposals, chunk_elements=chunk_elements)
        d.fill_diagonal_(0)
        close = (d < t).cpu().numpy()
        matched = np.zeros(close.shape[0], bool)
        groups = []
        for i in range(close.shape[0]):
            if matched[i]:
                continue
            matched |= close[i]
            groups.append(close[i])
        g = torch.as_tensor(np.stack(groups), dtype=proposals.dtype, device=proposals.device)
        proposals = (g @ proposals) / g.sum(1, keepdim=True)
    return proposals.reshape(-1, gh, gw)


def kmeans_refine(
    attention: torch.Tensor, proposals: torch.Tensor, *, max_iter: int = 300
) -> torch.Tensor:
    """K-means over all query maps, initialised at the proposals (DiffSeg's ``refine``).

    Parameters
    ----------
    attention : Tensor (Gh, Gw, Gh, Gw)
    proposals : Tensor (K, Gh, Gw)
    max_iter : int
        Lloyd iterations (scikit-learn's default 300).

    Returns
    -------
    Tensor (K', Gh, Gw)
        Means of the non-empty clusters (K' <= K), in cluster order.
    """
    from sklearn.cluster import KMeans

    gh, gw = attention.shape[:2]
    x = attention.reshape(gh * gw, gh * gw).detach().cpu().double().numpy()
    init = proposals.reshape(proposals.shape[0], -1).detach().cpu().double().numpy()
    if init.shape[0] == 1:
        return proposals
    km = KMeans(n_clusters=init.shape[0], init=init, n_init=1, max_iter=max_iter).fit(x)
    labels = km.labels_
    means = [x[labels == k].mean(0) for k in np.unique(labels)]
    out = torch.as_tensor(np.stack(means), dtype=proposals.dtype, device=proposals.device)
    return out.reshape(-1, gh, gw)


def nms_labels(
    proposals: torch.Tensor, out_size: tuple[int, int], *, chunk_elements: int = DEFAULT_CHUNK
) -> np.ndarray:
    """Upsample the proposals bilinearly to ``out_size`` and take the per-pixel argmax.

    The argmax runs over chunks of proposals, so at most ``chunk_elements`` upsampled
    values exist at once.

    Returns
    -------
    ndarray (H, W) int32
        Index of the winning proposal (ties go to the lower index).
    """
    if proposals.ndim != 3 or proposals.shape[0] < 1:
        raise ValueError(
            f"proposals must have shape (K, Gh, Gw) with K >= 1, got {tuple(proposals.shape)}"
        )
    h, w = _grid_shape(out_size, "out_size")
    step = _chunk_rows(proposals.shape[0], h * w, chunk_elements)
    best = torch.full((h, w), -math.inf, dtype=proposals.dtype, device=proposals.device)
    label = torch.zeros((h, w), dtype=torch.int32, device=proposals.device)
    for start in range(0, proposals.shape[0], step):
        up = F.interpolate(
            proposals[None, start : start + step], size=(h, w), mode="bilinear", align_corners=False
        )[0]
        val, arg = up.max(0)
        better = val > best
        best = torch.where(better, val, best)
        label = torch.where(better, arg.to(torch.int32) + start, label)
    return label.cpu().numpy()


def diffseg_segment(
    maps: Any,
    out_size: tuple[int, int],
    *,
    num_points: int | tuple[int, int] = 16,
    tau: float | Sequence[float] = 1.1,
    n_iter: int = 3,
    refine: bool = False,
    layout: str = "reference",
    weights: Sequence[float] | None = None,
    anchors: np.ndarray | None = None,
    chunk_elements: int = DEFAULT_CHUNK,
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """The whole DiffSeg pipeline on attention maps: aggregate, merge, refine, NMS.

    Parameters
    ----------
    maps : tensor or sequence of tensors
        See :func:`aggregate_attention`.
    out_size : (int, int)
        (H, W) of the label map (the image size).
    num_points, tau, n_iter, layout, anchors, chunk_elements
        See :func:`merge_attention`.
    refine : bool
        K-means refinement (:func:`kmeans_refine`).
    weights : sequence of float, optional
        Resolution weights (:func:`aggregate_attention`).
    dtype : torch.dtype
        Computation dtype (float32 or float64).

    Returns
    -------
    ndarray (H, W) int32
        Segment ids 0..K-1 (ids whose proposal never wins do not appear).

    Examples
    --------
    >>> import torch
    >>> a = torch.full((4, 4, 4, 4), 1 / 16.0)
    >>> diffseg_segment(a, (8, 8), num_points=2).max()
    0
    """
    agg = aggregate_attention(maps, weights=weights, dtype=dtype)
    proposals = merge_attention(
        agg,
        num_points=num_points,
        tau=tau,
        n_iter=n_iter,
        layout=layout,
        anchors=anchors,
        chunk_elements=chunk_elements,
    )
    if refine:
        proposals = kmeans_refine(agg, proposals)
    return nms_labels(proposals, out_size, chunk_elements=chunk_elements)


# --------------------------------------------------------------------------------------
# Attention providers
# --------------------------------------------------------------------------------------


@runtime_checkable
class AttentionProvider(Protocol):
    """Anything that turns an image into self-attention maps for :func:`aggregate_attention`."""

    def __call__(self, image: np.ndarray) -> list[torch.Tensor]:
        """Maps (rh, rw, rh, rw) or (heads, rh, rw, rh, rw) of an (H, W, 3) uint8 image."""
        ...


class PatchAttention(torch.nn.Module):
    """Patch-token self-attention of a Hugging Face ViT, averaged over heads and layers.

    ``pixel_values (1, 3, H, W) -> attention (1, N, N)`` with ``N = (H // p) * (W // p)``:
    for each chosen layer the (1 + registers + N)-token attention is cut to the N patch
    tokens (CLS and register rows and columns dropped), each query row is renormalised over
    the patch keys, and the result is averaged over heads and then over the layers. Layers
    after the deepest chosen one are removed from the model.

    Parameters
    ----------
    model : transformers ViTModel / Dinov2Model / Dinov2WithRegistersModel
        Loaded with the eager attention implementation.
    layers : sequence of int
        Layer indices (negative counts from the end).
    """

    def __init__(self, model: torch.nn.Module, layers: Sequence[int]):
        super().__init__()
        cfg = model.config
        n_layers = int(cfg.num_hidden_layers)
        if len(layers) == 0:
            raise ValueError("layers must name at least one layer")
        resolved = []
        for layer in layers:
            if not isinstance(layer, (int, np.integer)) or not -n_layers <= layer < n_layers:
                raise ValueError(f"layer {layer!r} out of range for a {n_layers}-layer model")
            resolved.append(int(layer) % n_layers)
        self.layers = sorted(set(resolved))
        self.prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.patch_size = int(
            cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
        )
        self.interpolate = cfg.model_type == "vit"
        _truncate_layers(model, max(self.layers) + 1, n_layers)
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) normalised image -> (1, N, N) patch attention."""
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        out = self.model(pixel_values=pixel_values, output_attentions=True, **kwargs)
        acc = None
        for layer in self.layers:
            a = out.attentions[layer][:, :, self.prefix :, self.prefix :]
            a = (a / a.sum(-1, keepdim=True)).mean(1)
            acc = a if acc is None else acc + a
        return acc / len(self.layers)


def _truncate_layers(model: torch.nn.Module, keep: int, n_layers: int) -> None:
    for owner_name, attr in (
        ("", "layers"),
        ("", "layer"),
        ("encoder", "layer"),
        ("encoder", "layers"),
    ):
        owner = getattr(model, owner_name) if owner_name else model
        blocks = getattr(owner, attr, None) if owner is not None else None
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) == n_layers:
            if keep < n_layers:
                setattr(owner, attr, blocks[:keep])
                model.config.num_hidden_layers = keep
            return


def load_vit(checkpoint: str | os.PathLike) -> torch.nn.Module:
    """Load a ViT / DINO / DINOv2 backbone from a local folder with eager attention, in eval mode.

    Raises
    ------
    FileNotFoundError
        If the folder, its ``config.json`` or its weights are missing.
    ValueError
        If the checkpoint's ``model_type`` is not one of :data:`VIT_MODEL_TYPES`.
    """
    cfg = read_checkpoint_config(checkpoint, what="vit checkpoint", model_types=VIT_MODEL_TYPES)
    transformers = require_transformers()
    extra = {"add_pooling_layer": False} if cfg["model_type"] == "vit" else {}
    model = load_pretrained(
        lambda: transformers.AutoModel.from_pretrained(
            str(checkpoint), local_files_only=True, attn_implementation="eager", **extra
        ),
        f"vit checkpoint {str(checkpoint)!r}",
    )
    return model.eval()


def _config_int(folder: Path, key: str, default: int | None) -> int:
    """An integer field of ``folder/config.json`` (a clear error when missing or not an int)."""
    cfg = read_checkpoint_config(folder, what="vit checkpoint", model_types=VIT_MODEL_TYPES)
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise ModelFileError(f"{folder / 'config.json'}: {key} must be an int in [1, 4096]")
    return value


def vit_preprocessor(folder: str | os.PathLike, model_type: str) -> ImagePreprocessor:
    """Mean/std/rescale/resample of the checkpoint's processor (its size is not used).

    Defaults when the folder has no ``preprocessor_config.json``: mean = std = 0.5 for
    ``vit`` (``ViTImageProcessor``), ImageNet statistics for DINOv2.
    """
    if model_type == "vit":
        base = ImagePreprocessor(size=None, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    else:
        base = ImagePreprocessor(size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, resample=3)
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return base
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"cannot read {str(path)!r}: {exc}") from None
    if isinstance(cfg, dict):
        cfg.pop("size", None)
    return base.updated(cfg, source=str(path))


def _fingerprint(folder: Path, extra: str) -> str:
    h = hashlib.sha1(extra.encode())
    for p in sorted(folder.iterdir()):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()


def export_vit_attention(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    layers: Sequence[int] = (-1,),
    size: tuple[int, int] | None = None,
    verify: bool = True,
    atol: float = 1e-3,
    opset: int | None = None,
    seed: int = 0,
) -> ExportReport:
    """Export a ViT / DINO / DINOv2 checkpoint's patch attention (:class:`PatchAttention`) to ONNX.

    The graph maps ``pixel_values (1, 3, H, W)`` (H, W multiples of the patch size) to
    ``attention (1, N, N)``. Height and width are dynamic when the exporters manage it
    (DINOv2 with registers interpolates its position embeddings with antialiased bicubic
    resizing, which neither exporter keeps dynamic: that export has a fixed input size,
    recorded in the metadata and used by :class:`ViTAttention`).

    Parameters
    ----------
    checkpoint : path
        Local checkpoint folder.
    out : path
        Output ``.onnx``.
    layers : sequence of int
        Layers averaged (baked into the export).
    size : (int, int), optional
        (height, width) of the export input, rounded to multiples of the patch size;
        default (8p, 12p). It becomes the model's fixed input size when the export cannot
        be dynamic, so pass the size you intend to run at.
    verify : bool
        Compare ONNX Runtime (CPU) with torch on fresh random inputs of other sizes.
    atol : float
        Tolerance on ``max |ort - torch|`` (attention values are <= 1).
    opset : int, optional
        Opset for the dynamo exporter.
    seed : int
        Seed of the random inputs.

    Returns
    -------
    ExportReport
    """
    folder = Path(checkpoint)
    cfg = read_checkpoint_config(folder, what="vit checkpoint", model_types=VIT_MODEL_TYPES)
    module = PatchAttention(load_vit(folder), layers).eval()
    p = module.patch_size
    pre = vit_preprocessor(folder, cfg["model_type"])
    meta = {
        METADATA_PREFIX + "kind": _KIND,
        METADATA_PREFIX + "model_type": cfg["model_type"],
        METADATA_PREFIX + "patch_size": str(p),
        METADATA_PREFIX + "prefix_tokens": str(module.prefix),
        METADATA_PREFIX + "layers": json.dumps(module.layers),
        METADATA_PREFIX + "source_fingerprint": _fingerprint(folder, json.dumps(module.layers)),
        **pre.to_metadata(),
    }
    gen = torch.Generator().manual_seed(seed)
    eh, ew = (8 * p, 12 * p) if size is None else _input_size(1, 1, size, p)
    example = torch.randn(1, 3, eh, ew, generator=gen)
    report = export_onnx(
        module,
        example,
        out,
        input_name="pixel_values",
        output_names=["attention"],
        min_hw=p,
        metadata=meta,
        opset=opset,
    )
    if verify:
        shapes = (
            [(1, 3, 7 * p, 10 * p), (1, 3, 12 * p, 9 * p)]
            if report.dynamic
            else [tuple(example.shape)]
        )
        verify_image_model(report, module, shapes, atol=atol, seed=seed + 1)
    return report


def _input_size(h: int, w: int, size: int | tuple[int, int], patch: int) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        scale = int(size) / max(h, w)
        h, w = h * scale, w * scale
    else:
        h, w = _grid_shape(size, "size")
    return max(patch, round(h / patch) * patch), max(patch, round(w / patch) * patch)


class ViTAttention:
    """Patch self-attention of a ViT / DINO / DINOv2 checkpoint, as an attention provider.

    Parameters
    ----------
    checkpoint : path
        Local Hugging Face checkpoint folder, or an ``.onnx`` file from
        :func:`export_vit_attention` / ``dynaguide export vit-attention``.
    backend : {"onnxruntime", "torch"}
        ``"torch"`` runs the model eagerly (folder only): the reference.
    layers : sequence of int
        Layers to average (folder only; an ONNX export has its layers baked in).
    size : int or (int, int)
        Network input: an int is the long side (aspect kept), a pair is (height, width);
        both are rounded to multiples of the patch size. The whole image is resized (no
        centre crop), so the attention grid covers the whole image.
    device : {"auto", "cpu", "cuda"}
    onnx_path : path, optional
        Where to export a folder to (reused when it was exported from the same files and
        layers); a temporary file by default.
    threads : int, optional
        ONNX Runtime intra-op threads.
    verify : bool
        Verify a fresh export against torch.
    """

    def __init__(
        self,
        checkpoint: str | os.PathLike,
        *,
        backend: str = "onnxruntime",
        layers: Sequence[int] = (-1,),
        size: int | tuple[int, int] = 480,
        device: str = "auto",
        onnx_path: str | os.PathLike | None = None,
        threads: int | None = None,
        verify: bool = True,
    ):
        if backend not in ("onnxruntime", "torch"):
            raise ValueError(f"backend must be 'onnxruntime' or 'torch', got {backend!r}")
        if not isinstance(checkpoint, (str, os.PathLike)):
            raise TypeError(f"checkpoint must be a path, got {type(checkpoint).__name__}")
        if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
            if not 1 <= size <= MAX_INPUT_SIDE:
                raise ValueError(f"size must be in [1, {MAX_INPUT_SIDE}], got {size!r}")
        elif max(_grid_shape(size, "size")) > MAX_INPUT_SIDE:
            raise ValueError(f"size must be at most {MAX_INPUT_SIDE} per side, got {size!r}")
        self.size = size
        self.backend = backend
        self.export_report: ExportReport | None = None
        self.fixed_size: tuple[int, int] | None = None
        self._session: OrtSession | None = None
        self._module: PatchAttention | None = None
        path = Path(checkpoint)
        if path.is_dir():
            cfg = read_checkpoint_config(path, what="vit checkpoint", model_types=VIT_MODEL_TYPES)
            self.preprocessor = vit_preprocessor(path, cfg["model_type"])
            if backend == "torch":
                self._module = PatchAttention(load_vit(path), list(layers)).to(
                    resolve_torch_device(device)
                )
                self.patch_size = self._module.patch_size
                self.layers = self._module.layers
                return
            onnx_file, cleanup = self._export(path, onnx_path, list(layers), verify)
            try:
                self._open(onnx_file, device, threads)
            finally:
                cleanup()
        elif backend == "torch":
            raise ValueError(f"backend='torch' needs a checkpoint folder, got {str(path)!r}")
        else:
            onnx_file = check_onnx_file(path, what="vit attention provider")
            self._open(onnx_file, device, threads)

    def _export(
        self, folder: Path, onnx_path: Any, layers: list[int], verify: bool
    ) -> tuple[Path, Callable[[], None]]:
        if onnx_path is not None:
            target = Path(onnx_path)
            if target.is_file():
                meta = read_metadata(target)
                n = _config_int(folder, "num_hidden_layers", None)
                want = json.dumps(sorted({int(x) % n for x in layers}))
                if meta.get(METADATA_PREFIX + "source_fingerprint") == _fingerprint(folder, want):
                    return target, lambda: None
            cleanup: Callable[[], None] = lambda: None  # noqa: E731 - the file is the caller's
        else:
            target, cleanup = temporary_onnx_path("vit-attention")
        # the export size is only binding when the model cannot be exported with dynamic H, W:
        # a 2:3 landscape input at the requested long side
        p = _config_int(folder, "patch_size", 16)
        size = self.size
        if isinstance(size, (int, np.integer)):
            size = (int(size) * 2 // 3, int(size))
        self.export_report = export_vit_attention(
            folder, target, layers=layers, size=_input_size(1, 1, size, p), verify=verify
        )
        return target, cleanup

    def _open(self, onnx_file: Path, device: str, threads: int | None) -> None:
        meta = read_metadata(onnx_file)
        if meta.get(METADATA_PREFIX + "kind") != _KIND:
            raise ValueError(
                f"vit attention provider: {str(onnx_file)!r} is not a dynaguide "
                "vit-attention export "
                f"(metadata kind {meta.get(METADATA_PREFIX + 'kind')!r})"
            )
        source = str(onnx_file)
        try:
            self.patch_size = int(meta[METADATA_PREFIX + "patch_size"])
            self.layers = json.loads(meta[METADATA_PREFIX + "layers"])
        except (KeyError, ValueError) as exc:
            raise ModelFileError(f"{source}: unreadable metadata ({first_line(exc)})") from None
        if not 1 <= self.patch_size <= 64 or not (
            isinstance(self.layers, list) and all(type(x) is int for x in self.layers)
        ):
            raise ModelFileError(
                f"{source}: metadata patch_size {self.patch_size} must be in [1, 64] and layers "
                f"a list of ints, got {self.layers!r}"
            )
        self.preprocessor = ImagePreprocessor.from_metadata(
            meta, defaults=ImagePreprocessor(size=None), source=source
        )
        self._session = OrtSession(
            onnx_file.read_bytes(), device=device, threads=threads, name=source
        )
        shapes = [self._session.input_shapes[n] for n in self._session.input_names]
        if len(shapes) != 1 or len(shapes[0]) != 4 or not self._session.output_names:
            raise ModelFileError(
                f"{source}: expected one (1, 3, H, W) input and an attention output, got "
                f"inputs {shapes}"
            )
        shape = shapes[0][2:]
        if all(isinstance(d, int) for d in shape):
            if not all(self.patch_size <= d <= MAX_INPUT_SIDE for d in shape):
                raise ModelFileError(
                    f"{source}: fixed input size {list(shape)} outside "
                    f"[{self.patch_size}, {MAX_INPUT_SIDE}]"
                )
            self.fixed_size = (int(shape[0]), int(shape[1]))

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """Network input (h, w) for an image of (height, width)."""
        if self.fixed_size is not None:
            return self.fixed_size
        return _input_size(height, width, self.size, self.patch_size)

    def __call__(self, image: np.ndarray) -> list[torch.Tensor]:
        """``[A]`` with A of shape (gh, gw, gh, gw): the patch attention of the resized image."""
        image = check_rgb_image(image, "vit attention provider")
        h_in, w_in = self.input_size(*image.shape[:2])
        x = self.preprocessor(image, size=(h_in, w_in))
        gh, gw = h_in // self.patch_size, w_in // self.patch_size
        if self._module is not None:
            dev = next(self._module.parameters()).device
            with torch.inference_mode():
                attn = self._module(torch.from_numpy(x).to(dev)).float()
        else:
            assert self._session is not None
            out = self._session.run({self._session.input_names[0]: x})
            attn = torch.from_numpy(out[self._session.output_names[0]])
            if attn.numel() != (gh * gw) ** 2 or not attn.is_floating_point():
                raise ModelFileError(
                    f"{self._session.name}: attention output of shape {list(attn.shape)} and "
                    f"dtype {attn.dtype} does not match a {gh}x{gw} patch grid"
                )
        return [attn.reshape(gh, gw, gh, gw)]


# --------------------------------------------------------------------------------------
# The guide
# --------------------------------------------------------------------------------------


class DiffSegGuide:
    """DiffSeg-style attention merging as guidance.

    Parameters
    ----------
    checkpoint : path, optional
        A ViT / DINO / DINOv2 checkpoint folder or its ONNX export (see :class:`ViTAttention`).
    provider : callable, optional
        Any :class:`AttentionProvider` instead of ``checkpoint``.
    num_points : int or (int, int)
        Anchors per axis.
    tau : float or sequence of float
        KL threshold(s); 1.1 is DiffSeg's COCO value for Stable Diffusion attention and
        is not tuned for ViT attention.
    n_iter : int
        Merging iterations.
    refine : bool
        K-means refinement.
    layout : {"even", "reference"}
        Anchor layout (:func:`anchor_grid`); ``"even"`` suits the small grids of ViTs.
    weights : sequence of float, optional
        Resolution weights for multi-resolution providers.
    merge_device : str, optional
        Torch device for the merging ("cpu", "cuda"); default: the provider's tensors' device.
    dtype : torch.dtype
        Merging dtype.
    chunk_elements : int
        Memory bound of the merging temporaries.
    **provider_options
        Passed to :class:`ViTAttention` (``backend``, ``layers``, ``size``, ``device``,
        ``onnx_path``, ``threads``, ``verify``).
    """

    name = "diffseg"

    def __init__(
        self,
        checkpoint: str | os.PathLike | None = None,
        *,
        provider: Callable[[np.ndarray], Sequence[Any]] | None = None,
        num_points: int | tuple[int, int] = 16,
        tau: float | Sequence[float] = 1.1,
        n_iter: int = 3,
        refine: bool = False,
        layout: str = "even",
        weights: Sequence[float] | None = None,
        merge_device: str | None = None,
        dtype: torch.dtype = torch.float32,
        chunk_elements: int = DEFAULT_CHUNK,
        **provider_options: Any,
    ):
        if (checkpoint is None) == (provider is None):
            raise ValueError(
                "the 'diffseg' guide needs exactly one of checkpoint=<folder or .onnx> "
                "and provider="
            )
        if provider is not None and not callable(provider):
            raise TypeError(f"provider must be callable, got {type(provider).__name__}")
        if provider is not None and provider_options:
            raise TypeError(f"options {sorted(provider_options)} only apply with checkpoint=")
        _taus(tau, n_iter)
        anchor_grid(8, num_points, layout=layout)
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.provider = (
            provider if provider is not None else ViTAttention(checkpoint, **provider_options)
        )
        self.num_points = num_points
        self.tau = tau
        self.n_iter = n_iter
        self.refine = refine
        self.layout = layout
        self.weights = weights
        self.merge_device = None if merge_device is None else torch.device(merge_device)
        self.dtype = dtype
        self.chunk_elements = chunk_elements

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W) int32 segment ids of an (H, W, 3) uint8 RGB image."""
        image = check_rgb_image(image, "diffseg guide")
        maps = list(self.provider(image))
        if self.merge_device is not None:
            maps = [_as_tensor(m, "attention map").to(self.merge_device) for m in maps]
        return diffseg_segment(
            maps,
            image.shape[:2],
            num_points=self.num_points,
            tau=self.tau,
            n_iter=self.n_iter,
            refine=self.refine,
            layout=self.layout,
            weights=self.weights,
            chunk_elements=self.chunk_elements,
            dtype=self.dtype,
        )


def _diffseg_factory(checkpoint: str | os.PathLike | None = None, **options: Any) -> DiffSegGuide:
    """Registry factory: ``get_guide("diffseg", checkpoint=PATH, **options)``."""
    if checkpoint is None and options.get("provider") is None:
        raise ValueError(
            "the 'diffseg' guide needs checkpoint=<local ViT/DINO/DINOv2 folder or .onnx export> "
            "(or provider=<callable>), e.g. guidance_options={'checkpoint': 'dino-vits16/'}"
        )
    return DiffSegGuide(checkpoint, **options)


if "diffseg" not in available_guides():
    register_guide(
        "diffseg",
        _diffseg_factory,
        description="DiffSeg attention merging over ViT/DINO/DINOv2 self-attention "
        "via ONNX Runtime "
        "(options: checkpoint=folder or .onnx, tau, num_points, layers, size, refine)",
    )
