"""dynaguide.native: argmax_relabel, relabel_sequential, connected_components.

Oracles: ``skimage.segmentation.relabel_sequential`` / ``np.unique`` for relabelling,
``scipy.ndimage.label`` (per label value) for connected components, torch for argmax.
Each case runs the C++ kernels and the numpy/torch fallback, on numpy and torch inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from skimage.segmentation import relabel_sequential as sk_relabel

from dynaguide import backend as _backend
from dynaguide import native

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


# ------------------------------------------------------------------ relabel_sequential
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("shape", [*SHAPES, (5,), (3, 4, 5)])
def test_relabel_matches_skimage(rng, backend, kind, shape):
    k_max = int(rng.integers(1, 50))
    lab = rng.integers(0, k_max, size=shape) * int(rng.integers(1, 7))
    compact, k = native.relabel_sequential(_to(kind, lab), backend=backend)
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
    compact, k = native.relabel_sequential(lab, backend=backend)
    uniq, inverse = np.unique(lab, return_inverse=True)
    np.testing.assert_array_equal(compact, inverse.reshape(lab.shape))
    assert k == uniq.size
    dense = (rng.integers(-5 if info.min < 0 else 0, 9, size=(7, 9))).astype(dtype)
    compact, k = native.relabel_sequential(dense, backend=backend)
    uniq, inverse = np.unique(dense, return_inverse=True)
    np.testing.assert_array_equal(compact, inverse.reshape(dense.shape))
    assert k == uniq.size


@pytest.mark.parametrize("backend", BACKENDS)
def test_relabel_negative_values_rank_first(backend):
    lab = np.array([[3, -1, -7], [3, 0, -1]])
    compact, k = native.relabel_sequential(lab, backend=backend)
    np.testing.assert_array_equal(compact, [[3, 1, 0], [3, 2, 1]])
    assert k == 4


@pytest.mark.skipif(not HAS_NATIVE, reason="_native not built")
def test_relabel_non_contiguous_and_readonly(rng):
    lab = rng.integers(0, 20, size=(30, 40))[::2, ::-3]
    lab.flags.writeable = False
    compact, _ = native.relabel_sequential(lab, backend="native")
    np.testing.assert_array_equal(
        compact, np.unique(lab, return_inverse=True)[1].reshape(lab.shape)
    )
    big_endian = rng.integers(0, 9, size=(5, 6)).astype(">i4")
    compact, _ = native.relabel_sequential(big_endian, backend="native")
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


# --------------------------------------------------------------------- argmax_relabel
def _argmax_oracle(r: np.ndarray):
    """(N, C, H, W) -> labels, compact, counts, K per torch.argmax and np.unique."""
    labels = torch.from_numpy(np.ascontiguousarray(r)).argmax(dim=1).numpy()
    n, c = r.shape[:2]
    compact = np.empty_like(labels)
    counts = np.zeros((n, c), dtype=np.int64)
    ks = np.empty(n, dtype=np.int64)
    for i in range(n):
        uniq, inverse, cnt = np.unique(labels[i], return_inverse=True, return_counts=True)
        compact[i] = inverse.reshape(labels[i].shape)
        counts[i, : uniq.size] = cnt
        ks[i] = uniq.size
    return labels, compact, counts, ks


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((7, 1, 1), "contiguous"),
        ((1, 5, 6), "contiguous"),
        ((7, 1, 37), "channels_last"),
        ((100, 41, 1), "contiguous"),
        ((13, 97, 129), "channels_last"),
        ((13, 97, 129), "transposed"),
        ((2, 9, 5, 6), "contiguous"),
        ((3, 9, 17, 2), "channels_last"),
    ],
)
def test_argmax_relabel(rng, backend, kind, dtype, shape, layout):
    # Small integers: many exact ties, which the first maximum must win.
    r = rng.integers(0, 4, size=shape).astype(dtype)
    if layout == "channels_last":
        r4 = r if r.ndim == 4 else r[None]
        r4 = np.ascontiguousarray(r4.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        r = r4 if r.ndim == 4 else r4[0]
    elif layout == "transposed":
        r = np.ascontiguousarray(r.swapaxes(-1, -2)).swapaxes(-1, -2)
    x = torch.from_numpy(r) if kind == "torch" else r
    labels, compact, counts, k = native.argmax_relabel(x, backend=backend)
    r4 = r if r.ndim == 4 else r[None]
    e_labels, e_compact, e_counts, e_k = _argmax_oracle(r4)
    if r.ndim == 3:
        e_labels, e_compact, e_counts, e_k = e_labels[0], e_compact[0], e_counts[0], e_k[0]
    for got, want in [(labels, e_labels), (compact, e_compact), (counts, e_counts)]:
        assert isinstance(got, torch.Tensor if kind == "torch" else np.ndarray)
        assert _np(got).dtype == np.int64
        np.testing.assert_array_equal(_np(got), want)
    np.testing.assert_array_equal(_np(k) if kind == "torch" else k, e_k)
    if kind == "numpy" and r.ndim == 3:
        assert isinstance(k, int)


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_relabel_half_and_grad_inputs(rng, backend):
    r = torch.from_numpy(rng.normal(size=(6, 7, 8)).astype(np.float32))
    ref = native.argmax_relabel(r, backend="torch")
    got = native.argmax_relabel(r.to(torch.bfloat16).float().requires_grad_(True), backend=backend)
    ref_bf = native.argmax_relabel(r.to(torch.bfloat16).float(), backend="torch")
    for a, b in zip(got, ref_bf, strict=True):
        assert torch.equal(a, b)
    assert ref[0].shape == (7, 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_argmax_relabel_inf_and_nan_positions(backend, layout):
    def prep(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)[None]
        if layout == "channels_last":
            t = t.to(memory_format=torch.channels_last)
        return t[0]

    r = np.zeros((5, 3, 4), np.float32)
    r[3, 1, 2] = np.inf
    r[:, 0, 0] = -np.inf
    labels, _, _, k = native.argmax_relabel(prep(r), backend=backend)
    assert labels[1, 2] == 3 and labels[0, 0] == 0 and int(k) == 2
    for c in (0, 4):  # NaN in the first channel (becomes the running max) or the last
        bad = r.copy()
        bad[c, 2, 3] = np.nan
        with pytest.raises(ValueError, match="response contains NaN"):
            native.argmax_relabel(prep(bad), backend=backend)


# ----------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs(backend):
    with pytest.raises(TypeError, match="labels must be a numpy array or a torch tensor"):
        native.relabel_sequential([[1, 2]], backend=backend)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        native.relabel_sequential(np.zeros((2, 2)), backend=backend)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        native.relabel_sequential(torch.zeros(2, 2, dtype=torch.bool), backend=backend)
    with pytest.raises(ValueError, match="labels must be"):
        native.relabel_sequential(np.array(3), backend=backend)
    with pytest.raises(ValueError, match="labels is empty"):
        native.relabel_sequential(np.zeros((0, 4), dtype=np.int32), backend=backend)
    with pytest.raises(ValueError, match="connectivity must be 4 or 8"):
        native.connected_components(np.zeros((2, 2), np.int32), 6, backend=backend)
    with pytest.raises(ValueError, match="labels must be 2-D or 3-D"):
        native.connected_components(np.zeros(5, np.int32), backend=backend)
    with pytest.raises(ValueError, match="labels is empty"):
        native.connected_components(np.zeros((3, 0), np.int32), backend=backend)
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        native.connected_components(torch.zeros(3, 3), backend=backend)
    with pytest.raises(TypeError, match="response must have a floating dtype"):
        native.argmax_relabel(np.zeros((2, 3, 3), np.int64), backend=backend)
    with pytest.raises(ValueError, match=r"response must have shape \(C, H, W\)"):
        native.argmax_relabel(torch.zeros(3, 3), backend=backend)
    with pytest.raises(ValueError, match="response is empty"):
        native.argmax_relabel(np.zeros((0, 3, 3), np.float32), backend=backend)
    nan = np.zeros((3, 4, 5), np.float32)
    nan[1, 2, 3] = np.nan
    with pytest.raises(ValueError, match="response contains NaN"):
        native.argmax_relabel(nan, backend=backend)
    with pytest.raises(ValueError, match="response contains NaN"):
        native.argmax_relabel(torch.from_numpy(nan)[None], backend=backend)
    with pytest.raises(TypeError, match="response must be a numpy array or a torch tensor"):
        native.argmax_relabel([1.0], backend=backend)


def test_backend_selection(monkeypatch):
    lab = np.array([[2, 5], [5, 9]])
    with pytest.raises(_backend.BackendUnavailableError, match="no Triton implementation"):
        native.relabel_sequential(lab, backend="triton")
    with pytest.raises(_backend.BackendUnavailableError, match="not one of"):
        native.relabel_sequential(lab, backend="cython")
    # DYNAGUIDE_BACKEND=triton does not apply to these ops: they still run.
    monkeypatch.setenv("DYNAGUIDE_BACKEND", "triton")
    assert native.relabel_sequential(lab)[1] == 3
    # Without the extension, forcing native raises; otherwise the fallback runs.
    monkeypatch.setattr(_backend, "available", lambda name: name == "torch")
    monkeypatch.setenv("DYNAGUIDE_BACKEND", "native")
    with pytest.raises(_backend.BackendUnavailableError, match="forced"):
        native.relabel_sequential(lab)
    with pytest.raises(_backend.BackendUnavailableError, match="forced"):
        native.connected_components(lab)
    with pytest.raises(_backend.BackendUnavailableError, match="forced"):
        native.argmax_relabel(np.zeros((2, 2, 2), np.float32))
    monkeypatch.delenv("DYNAGUIDE_BACKEND")
    assert native.native_module() is None
    np.testing.assert_array_equal(native.relabel_sequential(lab)[0], [[0, 1], [1, 2]])
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
    r = np.zeros((1, 3, 4, 5), np.float32)
    with pytest.raises(ValueError, match="counts has the wrong shape"):
        mod.argmax_relabel(
            r,
            np.empty((1, 4, 5), np.int64),
            np.empty((1, 4, 5), np.int64),
            np.empty((1, 4), np.int64),
            np.empty(1, np.int64),
        )


@pytest.mark.gpu
@pytest.mark.parametrize("connectivity", [4, 8])
def test_cuda_matches_cpu(rng, connectivity):
    """The CUDA kernels themselves (backend forced: a missing CUDA build fails, it does not
    fall back), on label maps with long runs (path compression) and few labels (the
    argmax count's shared-memory histogram)."""
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
    r = torch.from_numpy(rng.integers(0, 4, size=(2, 9, 33, 17)).astype(np.float32))
    r[1, 2] += 10.0  # image 1: one label everywhere
    for x in (r, r.to(memory_format=torch.channels_last)):
        got = native.argmax_relabel(x.cuda(), backend="native")
        want = native.argmax_relabel(x, backend="torch")
        for a, b in zip(got, want, strict=True):
            assert a.is_cuda and torch.equal(a.cpu(), b)


def _cuda_build():
    mod = native.native_module()
    return mod if mod is not None and mod.has_cuda() else None


@pytest.mark.skipif(_cuda_build() is None, reason="extension built without CUDA")
def test_cuda_scratch_size_is_the_aligned_histogram_and_map():
    mod = _cuda_build()

    def aligned(b):
        return (b + 255) // 256 * 256

    for n, c in ((1, 100), (3, 7), (70_000, 2)):
        assert mod.argmax_relabel_cuda_scratch(n, c) == aligned(4 * n * c) + aligned(8 * n * c)


@pytest.mark.gpu
def test_cuda_scratch_comes_from_torch_and_is_checked():
    mod = _cuda_build()
    assert mod is not None, "the CUDA test subset needs the extension built with CUDA"
    x = torch.randn(2, 5, 8, 9, device="cuda")
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    native.argmax_relabel(x, backend="native")
    native.connected_components(x.argmax(1), 8, backend="native")
    after = torch.cuda.memory_stats()["allocation.all.allocated"]
    assert after - before >= 2 + 2  # outputs and one scratch buffer per call, all torch's
    outs = [torch.empty((2, 8, 9), dtype=torch.int64, device="cuda") for _ in range(2)]
    counts = torch.empty((2, 5), dtype=torch.int64, device="cuda")
    k = torch.empty(2, dtype=torch.int64, device="cuda")
    small = torch.empty(16, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(ValueError, match="scratch has 16 bytes"):
        mod.argmax_relabel_cuda(x, *outs, counts, k, small, stream)
