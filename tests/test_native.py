"""dynaguide.label_ops: relabel_compact, connected_components.

Oracles: ``skimage.segmentation.relabel_sequential`` / ``np.unique`` for relabelling,
``scipy.ndimage.label`` (per label value) for connected components.
Each case runs the C++ kernels and the numpy/torch fallback, on numpy and torch inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from skimage.segmentation import relabel_sequential as sk_relabel

import dynaguide
from dynaguide import backend as _backend
from dynaguide import label_ops as native

HAS_NATIVE = _backend.available("native")
BACKENDS = [
    pytest.param("native", marks=pytest.mark.skipif(not HAS_NATIVE, reason="_native not built")),
    "torch",
]
SHAPES = [(1, 1), (1, 37), (41, 1), (2, 3), (97, 129), (1, 2), (3, 1)]
INT_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64]


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    return np.random.default_rng(abs(hash(request.node.name)) % 2**32)


def _to(kind: str, a: np.ndarray) -> np.ndarray | torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)) if kind == "torch" else a


def _np(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.cpu().numpy() if isinstance(x, torch.Tensor) else x


# ------------------------------------------------------------------ relabel_compact
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("shape", [*SHAPES, (5,), (3, 4, 5)])
def test_relabel_matches_skimage(rng, backend, kind, shape):
    k_max = int(rng.integers(1, 50))
    lab = rng.integers(0, k_max, size=shape) * int(rng.integers(1, 7))
    compact, k = native.relabel_compact(_to(kind, lab), backend=backend)
    assert isinstance(compact, torch.Tensor if kind == "torch" else np.ndarray)
    assert isinstance(k, int)
    expected = sk_relabel(lab + 1)[0] - 1  # shift: skimage keeps 0 as background
    np.testing.assert_array_equal(_np(compact), expected)
    assert k == len(np.unique(lab))
    assert _np(compact).dtype == np.int32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_relabel_dtypes_negative_and_sparse(rng, backend, dtype):
    info = np.iinfo(dtype)
    # Extremes of the dtype (sparse values: the sort path) and a dense small range.
    pool = np.array([info.min, info.max, 0, 1, info.max - 1, info.min + 3], dtype=dtype)
    lab = rng.choice(pool, size=(13, 17))
    compact, k = native.relabel_compact(lab, backend=backend)
    uniq, inverse = np.unique(lab, return_inverse=True)
    np.testing.assert_array_equal(compact, inverse.reshape(lab.shape))
    assert k == uniq.size
    dense = (rng.integers(-5 if info.min < 0 else 0, 9, size=(7, 9))).astype(dtype)
    compact, k = native.relabel_compact(dense, backend=backend)
    uniq, inverse = np.unique(dense, return_inverse=True)
    np.testing.assert_array_equal(compact, inverse.reshape(dense.shape))
    assert k == uniq.size


@pytest.mark.parametrize("backend", BACKENDS)
def test_relabel_negative_values_rank_first(backend):
    lab = np.array([[3, -1, -7], [3, 0, -1]])
    compact, k = native.relabel_compact(lab, backend=backend)
    np.testing.assert_array_equal(compact, [[3, 1, 0], [3, 2, 1]])
    assert k == 4


@pytest.mark.skipif(not HAS_NATIVE, reason="_native not built")
def test_relabel_non_contiguous_and_readonly(rng):
    lab = rng.integers(0, 20, size=(30, 40))[::2, ::-3]
    lab.flags.writeable = False
    compact, _ = native.relabel_compact(lab, backend="native")
    np.testing.assert_array_equal(
        compact, np.unique(lab, return_inverse=True)[1].reshape(lab.shape)
    )
    big_endian = rng.integers(0, 9, size=(5, 6)).astype(">i4")
    compact, _ = native.relabel_compact(big_endian, backend="native")
    np.testing.assert_array_equal(
        compact, np.unique(big_endian, return_inverse=True)[1].reshape(5, 6)
    )


# ---------------------------------------------------------------- connected components
def _canonical(ids: np.ndarray) -> np.ndarray:
    """Renumber an (H, W) id map 0..M-1 by the raster order of each id's first pixel."""
    uniq, first, inverse = np.unique(ids.ravel(), return_index=True, return_inverse=True)
    rank = np.empty(uniq.size, dtype=np.int64)
    rank[np.argsort(first)] = np.arange(uniq.size)
    return rank[inverse].reshape(ids.shape)


def _scipy_components(lab: np.ndarray, connectivity: int) -> np.ndarray:
    """Oracle: scipy.ndimage.label of each value's mask, combined and made canonical."""
    structure = ndi.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    ids = np.zeros(lab.shape, dtype=np.int64)
    offset = 0
    for v in np.unique(lab):
        comp, m = ndi.label(lab == v, structure=structure)
        ids[comp > 0] = comp[comp > 0] + offset
        offset += m
    return _canonical(ids)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("shape", [*SHAPES, (1031, 517)])  # the last one: 2+ row strips
def test_cc_matches_scipy(rng, backend, connectivity, shape):
    n_values = int(rng.integers(1, 5))
    lab = rng.integers(-1, n_values - 1, size=shape, endpoint=True)
    out = native.connected_components(lab, connectivity, backend=backend)
    expected = _scipy_components(lab, connectivity)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_cc_structured_shapes(connectivity):
    # Combs and diagonals: components that wind across the row strips of the parallel pass.
    h, w = 1031, 517
    yy, xx = np.mgrid[:h, :w]
    comb = ((xx % 4 == 0) | (yy == h - 1) | ((yy == 0) & (xx % 8 == 0))).astype(np.int16)
    diag = ((xx + yy) % 3 == 0).astype(np.uint8)  # only 8-connected along diagonals
    for lab in (comb, diag, np.zeros((h, w), np.int64)):
        for backend in ["native", "torch"] if HAS_NATIVE else ["torch"]:
            out = native.connected_components(lab, connectivity, backend=backend)
            np.testing.assert_array_equal(out, _scipy_components(lab, connectivity))


@pytest.mark.parametrize("backend", BACKENDS)
def test_cc_batch_torch_and_bool(rng, backend):
    lab = rng.integers(0, 3, size=(3, 23, 31))
    out = native.connected_components(torch.from_numpy(lab), 8, backend=backend)
    assert isinstance(out, torch.Tensor) and out.shape == lab.shape and out.dtype == torch.int32
    for n in range(3):  # each image numbered from 0
        np.testing.assert_array_equal(out[n].numpy(), _scipy_components(lab[n], 8))
    mask = rng.random((17, 19)) < 0.5
    np.testing.assert_array_equal(
        native.connected_components(mask, 4, backend=backend), _scipy_components(mask, 4)
    )


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_cc_dtypes(rng, dtype):
    lab = rng.integers(0, 3, size=(19, 23)).astype(dtype)
    for backend in ["native", "torch"] if HAS_NATIVE else ["torch"]:
        out = native.connected_components(lab, 8, backend=backend)
        np.testing.assert_array_equal(out, _scipy_components(lab, 8))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    with pytest.raises(TypeError, match="labels must be a numpy array or a torch tensor"):
        native.relabel_compact([[1, 2]], backend=backend)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        native.relabel_compact(np.zeros((2, 2)), backend=backend)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        native.relabel_compact(torch.zeros(2, 2, dtype=torch.bool), backend=backend)
    with pytest.raises(ValueError, match="labels must be"):
        native.relabel_compact(np.array(3), backend=backend)
    with pytest.raises(ValueError, match="labels is empty"):
        native.relabel_compact(np.zeros((0, 4), dtype=np.int32), backend=backend)
    with pytest.raises(ValueError, match="connectivity must be 4 or 8"):
        native.connected_components(np.zeros((2, 2), np.int32), 6, backend=backend)
    with pytest.raises(ValueError, match="labels must be 2-D or 3-D"):
        native.connected_components(np.zeros(5, np.int32), backend=backend)
    with pytest.raises(ValueError, match="labels is empty"):
        native.connected_components(np.zeros((3, 0), np.int32), backend=backend)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        native.connected_components(torch.zeros(3, 3), backend=backend)


def test_backend_selection(monkeypatch):
    lab = np.array([[2, 5], [5, 9]])
    with pytest.raises(_backend.BackendUnavailableError, match="no Triton implementation"):
        native.relabel_compact(lab, backend="triton")
    with pytest.raises(_backend.BackendUnavailableError, match="not one of"):
        native.relabel_compact(lab, backend="cython")
    # DYNAGUIDE_BACKEND=triton does not apply to these ops: they still run.
    monkeypatch.setenv("DYNAGUIDE_BACKEND", "triton")
    assert native.relabel_compact(lab)[1] == 3
    # Without the extension, forcing native raises; otherwise the fallback runs.
    monkeypatch.setattr(_backend, "available", lambda name: name == "torch")
    monkeypatch.setenv("DYNAGUIDE_BACKEND", "native")
    with pytest.raises(_backend.BackendUnavailableError, match="forced"):
        native.relabel_compact(lab)
    with pytest.raises(_backend.BackendUnavailableError, match="forced"):
        native.connected_components(lab)
    monkeypatch.delenv("DYNAGUIDE_BACKEND")
    assert native.native_module() is None
    np.testing.assert_array_equal(native.relabel_compact(lab)[0], [[0, 1], [1, 2]])
    np.testing.assert_array_equal(native.connected_components(lab, 4), [[0, 1], [2, 3]])
    np.testing.assert_array_equal(native.connected_components(lab, 8), [[0, 1], [1, 2]])


@pytest.mark.skipif(not HAS_NATIVE, reason="_native not built")
def test_native_module_checks_arrays():
    mod = native.native_module()
    assert mod.max_threads() >= 1
    assert isinstance(mod.has_cuda(), bool)
    lab = np.zeros((1, 4, 5), np.int32)
    with pytest.raises(ValueError, match="out has the wrong shape"):
        mod.connected_components(lab, np.empty((1, 5, 4), np.int32), 8)
    with pytest.raises(ValueError, match="out must be int32 or int64"):
        mod.connected_components(lab, np.empty((1, 4, 5), np.float32), 8)
    with pytest.raises(ValueError, match="labels must be C-contiguous"):
        mod.relabel_sequential(np.zeros((4, 6), np.int32)[:, ::2], np.empty(12, np.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("connectivity", [4, 8])
def test_cuda_matches_cpu(rng, connectivity):
    """The CUDA kernels themselves (backend forced: a missing CUDA build fails, it does not
    fall back), on label maps with long runs (path compression)."""
    lab = rng.integers(0, 3, size=(2, 97, 129))
    lab[0, :, 40:90] = 1  # wide uniform region: long union-find chains
    out = native.connected_components(torch.from_numpy(lab).cuda(), connectivity, backend="native")
    assert out.is_cuda
    want_cc = native.connected_components(lab, connectivity, backend="native")
    np.testing.assert_array_equal(out.cpu().numpy(), want_cc)
    uniform = np.zeros((1, 300, 700), np.int64)
    got_u = native.connected_components(
        torch.from_numpy(uniform).cuda(), connectivity, backend="native"
    )
    assert int(got_u.max()) == 0


def _cuda_build():
    mod = native.native_module()
    return mod if mod is not None and mod.has_cuda() else None


@pytest.mark.gpu
def test_cuda_scratch_comes_from_torch_and_is_checked():
    mod = _cuda_build()
    assert mod is not None, "the CUDA test subset needs the extension built with CUDA"
    labels = torch.randn(2, 5, 8, 9, device="cuda").argmax(1)
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    native.connected_components(labels, 8, backend="native")
    after = torch.cuda.memory_stats()["allocation.all.allocated"]
    assert after - before >= 2  # the output and one scratch buffer, both torch's
    out = torch.empty((2, 8, 9), dtype=torch.int32, device="cuda")
    small = torch.empty(16, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="scratch has 16 bytes"):
        mod.connected_components_cuda(labels, out, 8, small, stream)


def test_relabel_sequential_is_a_deprecated_alias(rng):
    lab = rng.integers(-3, 9, size=(5, 6))
    with pytest.warns(DeprecationWarning, match="relabel_compact"):
        old = dynaguide.relabel_sequential(lab)
    new = dynaguide.relabel_compact(lab)
    np.testing.assert_array_equal(old[0], new[0])
    assert old[1] == new[1]
