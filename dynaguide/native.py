"""Label-map utilities backed by the native extension ``dynaguide._native``.

Three operations, each accepting numpy arrays or torch tensors and returning the same
kind (torch results stay on the input's device):

* :func:`argmax_relabel` -- channel argmax of a response map, its compact relabelling
  and the per-label pixel counts, in one pass over the response.
* :func:`relabel_sequential` -- renumber an integer label map to ``0..K-1``.
* :func:`connected_components` -- split a label map into 4- or 8-connected regions of
  equal value.

Dispatch (see :mod:`dynaguide.backend`): the C++ kernels run CPU inputs when the
extension is built; CUDA tensors go to its CUDA kernels when it was compiled with CUDA
and its runtime sees a device (``relabel_sequential`` has no CUDA kernel and always
uses ``torch.unique`` there). Otherwise a numpy/torch implementation with the same
results runs. ``backend="native"`` (or ``DYNAGUIDE_BACKEND=native``) forces the
extension and raises :class:`~dynaguide.backend.BackendUnavailableError` when it cannot
run; ``backend="torch"`` forces the fallback. ``DYNAGUIDE_BACKEND=triton`` does not
apply to these ops (they have no Triton kernels): they then choose as if nothing was
forced, while an explicit ``backend="triton"`` raises.
"""

from __future__ import annotations

import importlib
import numbers
from types import ModuleType
from typing import Any, TypeVar

import numpy as np
import torch

from dynaguide import backend as _backend
from dynaguide import dispatch

__all__ = ["argmax_relabel", "connected_components", "native_module", "relabel_sequential"]

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)
_INT32_LIMIT = 2**31


# --------------------------------------------------------------------------- dispatch
def native_module() -> ModuleType | None:
    """The compiled ``dynaguide._native`` module, or None when it is not built."""
    if not _backend.available("native"):
        return None
    return importlib.import_module("dynaguide._native")


def _choose(op: str, device_type: str, backend: str | None) -> str:
    """``"native"`` or ``"torch"`` (the numpy/torch fallback) for one call (see
    :mod:`dynaguide.dispatch`)."""
    return dispatch.resolve(op, torch.device(device_type), backend).backend


def _cuda_scratch(nbytes: int, like: torch.Tensor) -> torch.Tensor:
    """Scratch memory for a CUDA kernel of the extension, from torch's caching allocator
    (visible in ``torch.cuda.memory_stats``; freed to the cache for reuse on this stream)."""
    return torch.empty(max(int(nbytes), 1), dtype=torch.uint8, device=like.device)


# ------------------------------------------------------------------------- validation
def _kind(x: Any, name: str) -> str:
    if isinstance(x, torch.Tensor):
        return "torch"
    if isinstance(x, np.ndarray):
        return "numpy"
    raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def _numpy_for_native(a: np.ndarray) -> np.ndarray:
    """``a`` itself when DLPack can describe it, else a contiguous native-endian copy."""
    if (
        not a.dtype.isnative
        or any(s < 0 or s % a.itemsize for s in a.strides)
        or not a.flags.aligned
    ):
        return np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("="))
    return a


def _check_int_labels(labels: Any, name: str, ndims: tuple[int, ...]) -> str:
    kind = _kind(labels, name)
    if labels.ndim not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims) if len(ndims) < 4 else "at least 1-D"
        raise ValueError(f"{name} must be {want}, got shape {tuple(labels.shape)}")
    if kind == "torch":
        ok = not labels.is_floating_point() and not labels.is_complex()
        ok = ok and labels.dtype != torch.bool
    else:
        ok = labels.dtype.kind in "iu"
    if not ok:
        raise TypeError(f"{name} must have an integer dtype, got {labels.dtype}")
    if labels.size == 0 if kind == "numpy" else labels.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(labels.shape)}")
    return kind


# ------------------------------------------------------------------ relabel_sequential
def relabel_sequential(labels: ArrayT, *, backend: str | None = None) -> tuple[ArrayT, int]:
    """Renumber an integer label map to ``0..K-1`` in increasing order of the values.

    The value ``v`` becomes its rank among the distinct values of ``labels``:
    the smallest present value maps to 0, the largest to ``K - 1``. This is
    ``skimage.segmentation.relabel_sequential`` with offset 0 and without its special
    background 0, and equals ``np.unique(labels, return_inverse=True)``. Negative
    values are allowed and rank like any other (so ``-1`` sorts before ``0``).

    Parameters
    ----------
    labels : numpy.ndarray or torch.Tensor
        Integer label map of any shape with at least one dimension and one element
        (any signed or unsigned integer dtype).
    backend : {"native", "torch"}, optional
        Force the C++ kernel or the numpy/torch fallback for this call.

    Returns
    -------
    compact : same kind as ``labels``
        Same shape; int32, or int64 when ``labels`` has ``2**31`` elements or more.
        Torch results stay on the input's device (CUDA inputs use ``torch.unique``,
        which synchronises with the host).
    K : int
        Number of distinct values.

    Raises
    ------
    TypeError
        When ``labels`` is not a numpy array / torch tensor or not of an integer dtype.
    ValueError
        When ``labels`` is 0-dimensional or empty.

    Examples
    --------
    >>> import numpy as np
    >>> compact, k = relabel_sequential(np.array([[7, 7, 3], [-2, 3, 100]]))
    >>> compact
    array([[2, 2, 1],
           [0, 1, 3]], dtype=int32)
    >>> k
    4
    """
    kind = _check_int_labels(labels, "labels", tuple(range(1, 64)))
    n = labels.size if kind == "numpy" else labels.numel()
    big = n >= _INT32_LIMIT
    device_type = labels.device.type if kind == "torch" else "cpu"
    choice = _choose("relabel_sequential", device_type, backend)
    if kind == "numpy":
        out_dtype = np.int64 if big else np.int32
        if choice == "native":
            src = np.ascontiguousarray(_numpy_for_native(labels)).reshape(-1)
            out = np.empty(n, dtype=out_dtype)
            k = native_module().relabel_sequential(src, out)
            return out.reshape(labels.shape), int(k)
        uniq, inverse = np.unique(labels, return_inverse=True)
        return inverse.reshape(labels.shape).astype(out_dtype, copy=False), int(uniq.size)
    out_dtype_t = torch.int64 if big else torch.int32
    src_t = labels.detach()
    if choice == "native":
        src_t = src_t.contiguous().reshape(-1)
        out_t = torch.empty(n, dtype=out_dtype_t)
        k = native_module().relabel_sequential(src_t, out_t)
        return out_t.reshape(labels.shape), int(k)
    uniq_t, inverse_t = torch.unique(src_t, sorted=True, return_inverse=True)
    return inverse_t.reshape(labels.shape).to(out_dtype_t), int(uniq_t.numel())


# ----------------------------------------------------------------- connected components
def connected_components(
    labels: ArrayT, connectivity: int = 8, *, backend: str | None = None
) -> ArrayT:
    """Connected components of a label map: touching pixels of equal value.

    Two pixels belong to the same component when a path of pixels with the same value
    joins them, stepping to one of the 4 edge neighbours (``connectivity=4``) or the 8
    edge and corner neighbours (``connectivity=8``). Every value forms components, 0
    and negative values included (there is no background). Components are numbered
    ``0..M-1`` in raster order of their first pixel.

    Parameters
    ----------
    labels : numpy.ndarray or torch.Tensor
        Integer (or bool) label map of shape ``(H, W)``, or ``(N, H, W)`` for N
        independent images (each numbered from 0).
    connectivity : {8, 4}
    backend : {"native", "torch"}, optional
        Force the C++ kernels or the fallback (``skimage.measure.label`` on the host)
        for this call.

    Returns
    -------
    same kind as ``labels``
        Component index per pixel, same shape, int32 (int64 for images of ``2**31``
        pixels or more). CUDA tensors use the extension's CUDA kernel when it was
        built with CUDA, else they take a round trip through host memory.

    Raises
    ------
    TypeError
        When ``labels`` is not a numpy array / torch tensor of an integer or bool dtype.
    ValueError
        On a shape other than (H, W) / (N, H, W), an empty map, or a connectivity other
        than 4 or 8.

    Examples
    --------
    >>> import numpy as np
    >>> lab = np.array([[1, 0, 1],
    ...                 [0, 1, 1]])
    >>> connected_components(lab, connectivity=8)
    array([[0, 1, 0],
           [1, 0, 0]], dtype=int32)
    >>> connected_components(lab, connectivity=4)
    array([[0, 1, 2],
           [3, 2, 2]], dtype=int32)
    """
    if (
        isinstance(connectivity, (bool, np.bool_))
        or not isinstance(connectivity, numbers.Integral)
        or connectivity not in (4, 8)
    ):
        raise ValueError(f"connectivity must be 4 or 8 (an int), got {connectivity!r}")
    connectivity = int(connectivity)  # numpy integers too; never a float
    if isinstance(labels, (np.ndarray, torch.Tensor)) and labels.dtype in (np.bool_, torch.bool):
        labels = labels.view(np.uint8) if isinstance(labels, np.ndarray) else labels.to(torch.uint8)
    kind = _check_int_labels(labels, "labels", (2, 3))
    batched = labels.ndim == 3
    h, w = labels.shape[-2:]
    big = h * w >= _INT32_LIMIT
    device_type = labels.device.type if kind == "torch" else "cpu"
    choice = _choose("connected_components", device_type, backend)

    if kind == "torch":
        src = labels.detach()
        src3 = src if batched else src.unsqueeze(0)
        if choice == "native" and device_type == "cuda":
            if src3.numel() >= _INT32_LIMIT:
                raise ValueError("the CUDA connected_components handles fewer than 2**31 pixels")
            src3 = src3.to(torch.int64 if src3.element_size() > 4 else torch.int32).contiguous()
            out = torch.empty(src3.shape, dtype=torch.int32, device=src3.device)
            mod = native_module()
            dev = (
                src3.device.index if src3.device.index is not None else torch.cuda.current_device()
            )
            scratch = _cuda_scratch(mod.connected_components_cuda_scratch(src3.numel(), dev), src3)
            stream = torch.cuda.current_stream(src3.device).cuda_stream
            mod.connected_components_cuda(src3, out, connectivity, scratch, stream)
        else:
            host = src3.cpu().numpy()
            out = torch.from_numpy(_cc_numpy(host, connectivity, big, choice)).to(src.device)
        return out if batched else out[0]

    src_np = labels if batched else labels[None]
    out_np = _cc_numpy(src_np, connectivity, big, choice)
    return out_np if batched else out_np[0]


def _cc_numpy(lab: np.ndarray, connectivity: int, big: bool, choice: str) -> np.ndarray:
    """(N, H, W) integer array -> (N, H, W) component indices, native or fallback."""
    out_dtype = np.int64 if big else np.int32
    if choice == "native":
        src = np.ascontiguousarray(_numpy_for_native(lab))
        out = np.empty(src.shape, dtype=out_dtype)
        native_module().connected_components(src, out, connectivity)
        return out
    from skimage.measure import label as sk_label  # fallback only

    out = np.empty(lab.shape, dtype=out_dtype)
    for n in range(lab.shape[0]):
        # Shift the values to 1..K so that skimage's background (0) never occurs.
        shifted = np.unique(lab[n], return_inverse=True)[1].reshape(lab.shape[1:]) + 1
        comp = sk_label(shifted, background=0, connectivity=1 if connectivity == 4 else 2)
        # Renumber by first pixel in raster order (skimage's order is not a contract).
        _, first = np.unique(comp.ravel(), return_index=True)
        order = np.empty(first.size, dtype=out_dtype)
        order[np.argsort(first, kind="stable")] = np.arange(first.size, dtype=out_dtype)
        out[n] = order[np.searchsorted(np.unique(comp), comp)]
    return out


# --------------------------------------------------------------------- argmax_relabel
def argmax_relabel(
    response: ArrayT, *, validate: bool = True, backend: str | None = None
) -> tuple[ArrayT, ArrayT, ArrayT, Any]:
    """Channel argmax of a response map, its compact relabelling and label counts.

    One read of the response gives, per image: the argmax channel of every pixel (the
    first maximum wins ties, as in ``torch.argmax``), the compact labels (argmax
    channels renumbered ``0..K-1`` in increasing channel order, i.e.
    :func:`relabel_sequential` of the argmax), the pixel count of each compact label
    and the number K of distinct labels.

    Parameters
    ----------
    response : numpy.ndarray or torch.Tensor
        Float response of shape ``(C, H, W)`` or ``(N, C, H, W)``, any strides
        (float32 or float64; torch float16/bfloat16 are computed in float32).
    validate : bool
        Check for NaN. CPU inputs are checked during the pass itself at no cost; for
        CUDA tensors the check synchronises with the host, so the hot loop may pass
        False (the result for a NaN input is then unspecified).
    backend : {"native", "torch"}, optional
        Force the C++/CUDA kernels or the torch fallback for this call.

    Returns
    -------
    labels : same kind as ``response``
        int64 argmax channel, shape ``(H, W)`` or ``(N, H, W)``.
    compact : same kind
        int64 compact labels, same shape.
    counts : same kind
        int64, shape ``(C,)`` or ``(N, C)``: ``counts[..., j]`` is the number of pixels
        with compact label ``j``; zero for ``j >= K``.
    K : int, numpy.ndarray or torch.Tensor
        Distinct labels: an int (numpy, 3-D input), an int64 array ``(N,)`` (numpy,
        4-D) or an int64 tensor of shape ``()`` / ``(N,)`` on the response's device
        (torch; no host synchronisation).

    Raises
    ------
    TypeError
        When ``response`` is not a numpy array / torch tensor of a floating dtype.
    ValueError
        On a wrong number of dimensions, an empty response or (with ``validate``) NaN.

    Examples
    --------
    >>> import numpy as np
    >>> r = np.zeros((5, 2, 3), dtype=np.float32)
    >>> r[4, 0, :] = 1.0
    >>> r[2, 1, 1:] = 1.0
    >>> labels, compact, counts, k = argmax_relabel(r)
    >>> labels
    array([[4, 4, 4],
           [0, 2, 2]])
    >>> compact
    array([[2, 2, 2],
           [0, 1, 1]])
    >>> counts, k
    (array([1, 2, 3, 0, 0]), 3)
    """
    kind = _kind(response, "response")
    if response.ndim not in (3, 4):
        raise ValueError(
            f"response must have shape (C, H, W) or (N, C, H, W), got {tuple(response.shape)}"
        )
    batched = response.ndim == 4
    if kind == "numpy":
        if response.dtype.kind != "f":
            raise TypeError(f"response must have a floating dtype, got {response.dtype}")
        if response.size == 0:
            raise ValueError(f"response is empty: shape {tuple(response.shape)}")
        x_np = (
            response if response.dtype in (np.float32, np.float64) else response.astype(np.float32)
        )
        x_np = _numpy_for_native(x_np if batched else x_np[None])
        choice = _choose("argmax_relabel", "cpu", backend)
        if choice == "native":
            n, c, h, w = x_np.shape
            labels = np.empty((n, h, w), dtype=np.int64)
            compact = np.empty((n, h, w), dtype=np.int64)
            counts = np.empty((n, c), dtype=np.int64)
            k = np.empty(n, dtype=np.int64)
            if native_module().argmax_relabel(x_np, labels, compact, counts, k) and validate:
                raise ValueError("response contains NaN")
        else:
            res = _argmax_relabel_torch(torch.from_numpy(x_np), validate)
            labels, compact, counts, k = (t.numpy() for t in res)
        if not batched:
            return labels[0], compact[0], counts[0], int(k[0])
        return labels, compact, counts, k

    if not response.is_floating_point():
        raise TypeError(f"response must have a floating dtype, got {response.dtype}")
    if response.numel() == 0:
        raise ValueError(f"response is empty: shape {tuple(response.shape)}")
    x = response.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    x = x if batched else x.unsqueeze(0)
    choice = _choose("argmax_relabel", x.device.type, backend)
    if choice == "native":
        n, c, h, w = x.shape
        labels_t = torch.empty((n, h, w), dtype=torch.int64, device=x.device)
        compact_t = torch.empty_like(labels_t)
        counts_t = torch.empty((n, c), dtype=torch.int64, device=x.device)
        k_t = torch.empty(n, dtype=torch.int64, device=x.device)
        mod = native_module()
        if x.device.type == "cuda":
            if validate and bool(torch.isnan(x).any()):
                raise ValueError("response contains NaN")
            scratch = _cuda_scratch(mod.argmax_relabel_cuda_scratch(n, c), x)
            stream = torch.cuda.current_stream(x.device).cuda_stream
            mod.argmax_relabel_cuda(x, labels_t, compact_t, counts_t, k_t, scratch, stream)
        elif mod.argmax_relabel(x, labels_t, compact_t, counts_t, k_t) and validate:
            raise ValueError("response contains NaN")
    else:
        labels_t, compact_t, counts_t, k_t = _argmax_relabel_torch(x, validate)
    if not batched:
        return labels_t[0], compact_t[0], counts_t[0], k_t[0]
    return labels_t, compact_t, counts_t, k_t


def _argmax_relabel_torch(
    x: torch.Tensor, validate: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch fallback of :func:`argmax_relabel` on a (N, C, H, W) tensor."""
    if validate and bool(torch.isnan(x).any()):
        raise ValueError("response contains NaN")
    n, c = x.shape[:2]
    labels = x.argmax(dim=1)
    flat = labels.reshape(n, -1)
    hist = torch.zeros(n, c, dtype=torch.int64, device=x.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    present = hist > 0
    rank = present.cumsum(dim=1) - 1
    compact = torch.gather(rank, 1, flat).reshape(labels.shape)
    counts = torch.zeros_like(hist).scatter_add_(1, rank.clamp_min(0), hist)
    return labels, compact, counts, present.sum(dim=1)
