// nanobind bindings of dynaguide._native. Arrays arrive through DLPack (numpy arrays,
// torch tensors, ...) as nb::ndarray and are checked here before any kernel runs; the
// kernels themselves see framework-free dg::View structs. Outputs are preallocated by
// the Python wrappers (dynaguide/native.py, dynaguide/native_losses.py).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/optional.h>

#include <optional>
#include <string>

#include "bind.h"
#include "common.h"
#include "labels.h"
#include "cpu_kernels.h"
#include "crf.h"
#ifdef DYNAGUIDE_WITH_CUDA
#include "labels_cuda.h"  // cuda_device_count
#endif

namespace nb = nanobind;
using dg::DType;
using dg::View;
using namespace dgb;  // NOLINT: the binding helpers

#ifdef DYNAGUIDE_WITH_CUDA
void bind_cuda(nb::module_ &m);  // module_cuda.cpp
#endif

namespace {

View loss_input(const InArray &a) {
    View x = to_view(a, "response", 4, nb::device::cpu::value);
    expect_float(x, "response");
    if (x.numel() == 0) dg::fail("response is empty");
    if (!dg::loss_layout_ok(x)) dg::fail("response must be contiguous or channels-last");
    return x;
}

// An int64 C-contiguous (N, H, W) map (labels, targets) matching the response x.
template <typename A>
View pixel_map(const A &a, const View &x, const char *name) {
    View v = to_view(a, name, 3, nb::device::cpu::value);
    expect_dtype(v, DType::I64, name);
    expect_contiguous(v, name);
    expect_shape(v, {x.shape[0], x.shape[2], x.shape[3]}, name);
    return v;
}

template <typename A>
View per_image(const A &a, const View &x, DType d, const char *name) {
    View v = to_view(a, name, 1, nb::device::cpu::value);
    expect_dtype(v, d, name);
    expect_contiguous(v, name);
    expect_shape(v, {x.shape[0]}, name);
    return v;
}

// (M, C) activation matrix of the fused ReLU + BatchNorm: float, unit channel stride.
template <typename A>
View norm_matrix(const A &a, const char *name, DType dtype, int64_t M, int64_t C) {
    View v = to_view(a, name, 2, nb::device::cpu::value);
    expect_dtype(v, dtype, name);
    expect_shape(v, {M, C}, name);
    if (C > 1 && v.strides[1] != 1) dg::fail(std::string(name) + " must have unit channel stride");
    return v;
}

template <typename A>
View norm_channels(const A &a, const char *name, DType dtype, int64_t C) {
    View v = to_view(a, name, 1, nb::device::cpu::value);
    expect_dtype(v, dtype, name);
    expect_shape(v, {C}, name);
    return v;
}

double *norm_out(const OutArray &a, const char *name, int64_t C) {
    View v = to_view(a, name, 1, nb::device::cpu::value);
    expect_dtype(v, DType::F64, name);
    expect_contiguous(v, name);
    expect_shape(v, {C}, name);
    return v.ptr<double>();
}

// A C-contiguous CPU array of one dtype (the dense-CRF inputs and outputs).
template <typename A>
View dense_array(const A &a, const char *name, int ndim, DType dtype) {
    View v = to_view(a, name, ndim, nb::device::cpu::value);
    expect_dtype(v, dtype, name);
    expect_contiguous(v, name);
    return v;
}

}  // namespace

NB_MODULE(_native, m) {
    m.doc() = "dynaguide native kernels (C++/OpenMP, optional CUDA); see dynaguide.native";

    m.def("max_threads", &dg::max_threads, "OpenMP threads a parallel region uses (1 without OpenMP).");
    m.def("has_openmp", []() {
#ifdef _OPENMP
        return true;
#else
        return false;
#endif
    }, "Whether the extension was built with OpenMP.");
    m.def("cpu_isa", &dg::cpu_isa,
          "Instruction set of the CPU loss/normalisation kernels in use: 'avx2' or 'base'.");
    m.def("has_cuda", []() {
#ifdef DYNAGUIDE_WITH_CUDA
        return true;
#else
        return false;
#endif
    }, "Whether the CUDA kernels were compiled in (a device may still be absent).");
    m.def("cuda_device_count", []() {
#ifdef DYNAGUIDE_WITH_CUDA
        return dg::cuda_device_count();
#else
        return 0;
#endif
    }, "CUDA devices visible to the extension's runtime (0 without CUDA support).");

    m.def(
        "relabel_sequential",
        [](InArray in, OutArray out) {
            View iv = to_view(in, "labels", static_cast<int>(in.ndim()), nb::device::cpu::value);
            View ov = to_view(out, "out", static_cast<int>(out.ndim()), nb::device::cpu::value);
            if (iv.ndim > 4) dg::fail("labels must have at most 4 dimensions");
            expect_int(iv, "labels");
            expect_contiguous(iv, "labels");
            expect_index_out(ov, "out");
            expect_contiguous(ov, "out");
            if (ov.numel() != iv.numel()) dg::fail("out must have as many elements as labels");
            if (ov.dtype == DType::I32 && iv.numel() > INT32_MAX)
                dg::fail("out must be int64 for 2**31 elements or more");
            nb::gil_scoped_release release;
            return dg::relabel_sequential_cpu(iv, ov);
        },
        nb::arg("labels"), nb::arg("out"),
        "Rank of each value among the distinct values of an integer array (0..K-1), written to "
        "out (int32/int64, C-contiguous, at most 4-D); returns K.");

    m.def(
        "connected_components",
        [](InArray in, OutArray out, int connectivity) {
            const int cpu = nb::device::cpu::value;
            View iv = to_view(in, "labels", 3, cpu), ov = to_view(out, "out", 3, cpu);
            check_cc(iv, ov, connectivity);
            nb::gil_scoped_release release;
            dg::connected_components_cpu(iv, ov, connectivity);
        },
        nb::arg("labels"), nb::arg("out"), nb::arg("connectivity"),
        "Connected components of equal-valued pixels of (N, H, W) label maps, numbered per image in "
        "raster order of their first pixel, into out (int32/int64).");

#ifdef DYNAGUIDE_WITH_CUDA
    bind_cuda(m);
#endif

    // ------------------------------------------------------------------------ losses
    m.def(
        "continuity_forward",
        [](InArray x, bool l1, int neighbors, double delta, OutArray loss) {
            View xv = loss_input(x);
            View lv = per_image(loss, xv, DType::F64, "loss");
            if (neighbors != 4 && neighbors != 8) dg::fail("neighbors must be 4 or 8");
            nb::gil_scoped_release release;
            dg::continuity_forward_cpu(xv, l1, neighbors, delta, lv.ptr<double>());
        },
        nb::arg("response"), nb::arg("l1"), nb::arg("neighbors"), nb::arg("delta"), nb::arg("loss"),
        "Per-image continuity loss of a (N, C, H, W) response into loss (float64, (N,)).");

    m.def(
        "continuity_backward",
        [](InArray x, bool l1, int neighbors, double delta, InArray scale, OutArray grad, bool accumulate) {
            View xv = loss_input(x);
            View sv = to_view(scale, "scale", 1, nb::device::cpu::value);
            expect_dtype(sv, DType::F64, "scale");
            expect_contiguous(sv, "scale");
            expect_shape(sv, {xv.shape[0]}, "scale");
            View gv = to_view(grad, "grad", 4, nb::device::cpu::value);
            if (neighbors != 4 && neighbors != 8) dg::fail("neighbors must be 4 or 8");
            nb::gil_scoped_release release;
            dg::continuity_backward_cpu(xv, l1, neighbors, delta, sv.ptr<double>(), gv, accumulate);
        },
        nb::arg("response"), nb::arg("l1"), nb::arg("neighbors"), nb::arg("delta"), nb::arg("scale"),
        nb::arg("grad"), nb::arg("accumulate") = false,
        "grad[n] = scale[n] * d(continuity_n)/d(response[n]) (grad[n] += ... with accumulate).");

    m.def(
        "ce_pair_forward",
        [](InArray x, InArray labels, std::optional<InArray> target, int64_t ignore_index, InArray a,
           InArray b, OutArray grad, OutArray guide_loss) {
            const int cpu = nb::device::cpu::value;
            View xv = loss_input(x);
            View lv = pixel_map(labels, xv, "labels");
            View tv;
            if (target) {
                tv = pixel_map(*target, xv, "target");
            }
            View av = per_image(a, xv, DType::F64, "a"), bv = per_image(b, xv, DType::F64, "b");
            View gv = to_view(grad, "grad", 4, cpu);
            View loss_v = per_image(guide_loss, xv, DType::F64, "guide_loss");
            nb::gil_scoped_release release;
            dg::ce_pair_forward_cpu(xv, lv, target ? &tv : nullptr, ignore_index, av.ptr<double>(),
                                    bv.ptr<double>(), gv, loss_v.ptr<double>());
        },
        nb::arg("response"), nb::arg("labels"), nb::arg("target").none(), nb::arg("ignore_index"),
        nb::arg("a"), nb::arg("b"), nb::arg("grad"), nb::arg("guide_loss"),
        "Similarity + guidance cross-entropy gradient a*(p - onehot(label)) + "
        "b/V*valid*(p - onehot(target)) of a channels-last response, and the guidance loss.");

    m.def(
        "similarity_forward",
        [](InArray x, OutArray labels, std::optional<OutArray> grad, OutArray loss, OutArray k) {
            const int cpu = nb::device::cpu::value;
            View xv = loss_input(x);
            View lv = pixel_map(labels, xv, "labels");
            View gv;
            if (grad) gv = to_view(*grad, "grad", 4, cpu);
            View loss_v = per_image(loss, xv, DType::F64, "loss");
            View kv = per_image(k, xv, DType::I64, "k");
            nb::gil_scoped_release release;
            dg::similarity_forward_cpu(xv, lv, grad ? &gv : nullptr, loss_v.ptr<double>(), kv.ptr<int64_t>());
        },
        nb::arg("response"), nb::arg("labels"), nb::arg("grad").none(), nb::arg("loss"), nb::arg("k"),
        "Per-image similarity loss, argmax labels, K and (optionally) the gradient.");

    m.def(
        "guidance_forward",
        [](InArray x, InArray target, int64_t ignore_index, std::optional<OutArray> grad, OutArray loss) {
            const int cpu = nb::device::cpu::value;
            View xv = loss_input(x);
            View tv = pixel_map(target, xv, "target");
            View gv;
            if (grad) gv = to_view(*grad, "grad", 4, cpu);
            View loss_v = per_image(loss, xv, DType::F64, "loss");
            nb::gil_scoped_release release;
            dg::guidance_forward_cpu(xv, tv, ignore_index, grad ? &gv : nullptr, loss_v.ptr<double>());
        },
        nb::arg("response"), nb::arg("target"), nb::arg("ignore_index"), nb::arg("grad").none(),
        nb::arg("loss"), "Per-image guidance cross-entropy and (optionally) its gradient.");

    // -------------------------------------------------------------------- dense CRF
    m.def(
        "permutohedral_filter",
        [](InArray features, InArray values, OutArray out) {
            View fv = dense_array(features, "features", 2, DType::F32),
                 vv = dense_array(values, "values", 2, DType::F32),
                 ov = dense_array(out, "out", 2, DType::F32);
            const int64_t n = fv.shape[0], d = fv.shape[1], vd = vv.shape[1];
            if (n < 1) dg::fail("features is empty");
            if (d < 1 || d > 16) dg::fail("features must have 1 to 16 columns");
            if (vd < 1) dg::fail("values must have at least one column");
            expect_shape(vv, {n, vd}, "values");
            expect_shape(ov, {n, vd}, "out");
            nb::gil_scoped_release release;
            return dg::permutohedral_filter_cpu(fv.ptr<float>(), n, static_cast<int>(d), d,
                                                vv.ptr<float>(), static_cast<int>(vd), ov.ptr<float>());
        },
        nb::arg("features"), nb::arg("values"), nb::arg("out"),
        "out (N, V) = permutohedral-lattice Gaussian filter of values (N, V) at features (N, d), "
        "all float32 C-contiguous (sum_j exp(-|f_i - f_j|^2 / 2) v_j up to a gain); returns the "
        "number of lattice points.");

    m.def(
        "dense_crf",
        [](InArray image, InArray energy, OutArray q, int iterations, float gaussian_sxy,
           float gaussian_weight, float bilateral_sxy, float bilateral_srgb, float bilateral_weight) {
            View iv = dense_array(image, "image", 3, DType::U8),
                 ev = dense_array(energy, "unary", 3, DType::F32),
                 qv = dense_array(q, "out", 3, DType::F32);
            const int64_t h = iv.shape[0], w = iv.shape[1], k = ev.shape[0];
            if (iv.shape[2] != 3) dg::fail("image must have shape (H, W, 3)");
            if (h < 1 || w < 1 || k < 1) dg::fail("image and unary must be non-empty");
            expect_shape(ev, {k, h, w}, "unary");
            expect_shape(qv, {k, h, w}, "out");
            if (iterations < 0) dg::fail("iterations must be >= 0");
            dg::CrfParams p{iterations, gaussian_sxy, gaussian_weight, bilateral_sxy, bilateral_srgb,
                            bilateral_weight};
            nb::gil_scoped_release release;
            dg::dense_crf_cpu(iv.ptr<uint8_t>(), h, w, ev.ptr<float>(), static_cast<int>(k), p,
                              qv.ptr<float>());
        },
        nb::arg("image"), nb::arg("unary"), nb::arg("out"), nb::arg("iterations"),
        nb::arg("gaussian_sxy"), nb::arg("gaussian_weight"), nb::arg("bilateral_sxy"),
        nb::arg("bilateral_srgb"), nb::arg("bilateral_weight"),
        "Dense-CRF mean field: image (H, W, 3) uint8, unary energies (K, H, W) float32, "
        "marginals into out (K, H, W) float32 (see dynaguide.crf).");

    // ------------------------------------------------------------- ReLU + BatchNorm
    m.def(
        "relu_bn_forward",
        [](InArray z, bool relu, InArray gamma, InArray beta, double eps, std::optional<InArray> residual,
           OutArray y, OutArray mean, OutArray var, OutArray invstd) {
            View zv = to_view(z, "z", 2, nb::device::cpu::value);
            expect_float(zv, "z");
            const int64_t M = zv.shape[0], C = zv.shape[1];
            if (M < 1 || C < 1) dg::fail("z is empty");
            zv = norm_matrix(z, "z", zv.dtype, M, C);
            View yv = norm_matrix(y, "y", zv.dtype, M, C);
            View gv = norm_channels(gamma, "gamma", zv.dtype, C);
            View bv = norm_channels(beta, "beta", zv.dtype, C);
            View rv;
            if (residual) rv = norm_matrix(*residual, "residual", zv.dtype, M, C);
            double *mp = norm_out(mean, "mean", C), *vp = norm_out(var, "var", C),
                   *ip = norm_out(invstd, "invstd", C);
            nb::gil_scoped_release release;
            dg::relu_bn_forward_cpu(zv, relu, gv, bv, eps, residual ? &rv : nullptr, yv, mp, vp, ip);
        },
        nb::arg("z"), nb::arg("relu"), nb::arg("gamma"), nb::arg("beta"), nb::arg("eps"),
        nb::arg("residual").none(), nb::arg("y"), nb::arg("mean"), nb::arg("var"), nb::arg("invstd"),
        "y = BatchNorm(relu(z)) (+ residual) with batch statistics over the rows of a (M, C) matrix; "
        "writes the float64 batch mean, biased variance and 1/sqrt(var + eps).");

    m.def(
        "relu_bn_backward",
        [](InArray z, InArray gy, bool relu, InArray gamma, InArray mean, InArray invstd, OutArray dz,
           OutArray dgamma, OutArray dbeta) {
            View zv = to_view(z, "z", 2, nb::device::cpu::value);
            expect_float(zv, "z");
            const int64_t M = zv.shape[0], C = zv.shape[1];
            if (M < 1 || C < 1) dg::fail("z is empty");
            zv = norm_matrix(z, "z", zv.dtype, M, C);
            View gyv = norm_matrix(gy, "gy", zv.dtype, M, C);
            View dzv = norm_matrix(dz, "dz", zv.dtype, M, C);
            View gv = norm_channels(gamma, "gamma", zv.dtype, C);
            View mv = norm_channels(mean, "mean", DType::F64, C);
            View iv = norm_channels(invstd, "invstd", DType::F64, C);
            expect_contiguous(mv, "mean");
            expect_contiguous(iv, "invstd");
            double *dg_ = norm_out(dgamma, "dgamma", C), *db = norm_out(dbeta, "dbeta", C);
            nb::gil_scoped_release release;
            dg::relu_bn_backward_cpu(zv, gyv, relu, gv, mv.ptr<double>(), iv.ptr<double>(), dzv, dg_, db);
        },
        nb::arg("z"), nb::arg("gy"), nb::arg("relu"), nb::arg("gamma"), nb::arg("mean"), nb::arg("invstd"),
        nb::arg("dz"), nb::arg("dgamma"), nb::arg("dbeta"),
        "Gradient of relu_bn_forward: dz (M, C) and the float64 gamma and beta gradients.");
}
