"""Label-map utilities backed by the native extension ``dynaguide._native``.

Two operations, each accepting numpy arrays or torch tensors and returning the same
kind (torch results stay on the input's device):

* :func:`relabel_compact` -- renumber an integer label map to ``0..K-1`` (returns the map
  and K; :func:`relabel_sequential` is its deprecated former name).
* :func:`connected_components` -- split a label map into 4- or 8-connected regions of
  equal value.

Dispatch (see :mod:`dynaguide.dispatch`): the C++ kernels run CPU inputs when the
extension is built; CUDA tensors go to its CUDA kernels when it was compiled with CUDA
and its runtime sees a device (``relabel_compact`` has no CUDA kernel and always
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
import warnings
from types import ModuleType
from typing import Any, TypeVar

import numpy as np
import torch

from dynaguide import backend as _backend
from dynaguide import dispatch

__all__ = ["connected_components", "native_module", "relabel_compact", "relabel_sequential"]

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


# ------------------------------------------------------------------ relabel_compact
def relabel_compact(labels: ArrayT, *, backend: str | None = None) -> tuple[ArrayT, int]:
    """Renumber an integer label map to ``0..K-1`` in increasing order of the values.

    The value ``v`` becomes its rank among the distinct values of ``labels``:
    the smallest present value maps to 0, the largest to ``K - 1``. This is
    the relabelled map of ``skimage.segmentation.relabel_sequential`` with offset 0 and
    without its special background 0 (that function also returns the forward and inverse
    maps; this one returns the map and K), and equals ``np.unique(labels,
    return_inverse=True)``. Negative
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
    >>> compact, k = relabel_compact(np.array([[7, 7, 3], [-2, 3, 100]]))
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
    choice = _choose("relabel_compact", device_type, backend)
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


def relabel_sequential(labels: ArrayT, *, backend: str | None = None) -> tuple[ArrayT, int]:
    """Deprecated name of :func:`relabel_compact` (same arguments and result).

    The name is scikit-image's, whose function returns ``(relabeled, forward_map,
    inverse_map)``; this one returns ``(compact, K)``. Warns ``DeprecationWarning``.
    """
    warnings.warn(
        "dynaguide.relabel_sequential is deprecated: use dynaguide.relabel_compact (same "
        "result, (compact, K)); skimage.segmentation.relabel_sequential, whose name it "
        "borrowed, returns (relabeled, forward_map, inverse_map)",
        DeprecationWarning,
        stacklevel=2,
    )
    return relabel_compact(labels, backend=backend)


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
