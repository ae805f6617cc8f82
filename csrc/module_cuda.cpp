// nanobind bindings of the CUDA kernels (compiled only with DYNAGUIDE_WITH_CUDA). The
// Python wrappers (dynaguide/native.py) allocate every output and the scratch buffer with
// torch on the input's device and pass the current stream.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <climits>
#include <cstdint>

#include "bind.h"
#include "labels_cuda.h"

namespace nb = nanobind;
using dg::DType;
using dg::View;
using namespace dgb;  // NOLINT: the binding helpers

namespace {

// A 1-D uint8 scratch array on `device` with at least `need` bytes.
View scratch_view(const OutArray &a, int device, size_t need) {
    View v = to_view(a, "scratch", 1, nb::device::cuda::value);
    expect_dtype(v, DType::U8, "scratch");
    expect_contiguous(v, "scratch");
    if (v.device_id != device) dg::fail("scratch must be on the input's device");
    if (static_cast<size_t>(v.shape[0]) < need)
        dg::fail("scratch has " + std::to_string(v.shape[0]) + " bytes, needs " + std::to_string(need));
    return v;
}

}  // namespace

void bind_cuda(nb::module_ &m) {
    m.def(
        "connected_components_cuda_scratch",
        [](int64_t total, int device) {
            if (total < 1 || total > INT32_MAX) dg::fail("total must be in [1, 2**31 - 1]");
            return dg::connected_components_cuda_scratch(total, device);
        },
        nb::arg("total"), nb::arg("device"),
        "Bytes of scratch memory connected_components_cuda needs for `total` pixels on a device.");

    m.def(
        "connected_components_cuda",
        [](InArray in, OutArray out, int connectivity, OutArray scratch, uintptr_t stream) {
            const int gpu = nb::device::cuda::value;
            View iv = to_view(in, "labels", 3, gpu), ov = to_view(out, "out", 3, gpu);
            check_cc(iv, ov, connectivity);
            if (iv.dtype != DType::I32 && iv.dtype != DType::I64) dg::fail("labels must be int32 or int64");
            if (ov.dtype != DType::I32) dg::fail("out must be int32");
            if (iv.numel() > INT32_MAX) dg::fail("at most 2**31 - 1 pixels in all");
            if (ov.device_id != iv.device_id) dg::fail("out must be on the labels' device");
            const size_t need = dg::connected_components_cuda_scratch(iv.numel(), iv.device_id);
            View sv = scratch_view(scratch, iv.device_id, need);
            nb::gil_scoped_release release;
            dg::connected_components_cuda(iv, ov, connectivity, sv.data, static_cast<size_t>(sv.shape[0]),
                                          stream);
        },
        nb::arg("labels"), nb::arg("out"), nb::arg("connectivity"), nb::arg("scratch"), nb::arg("stream"),
        "CUDA version of connected_components (int32/int64 labels in, int32 out).");
}
