// Shared helpers of the nanobind bindings (module.cpp, module_cuda.cpp): DLPack arrays to
// dg::View with the checks every binding needs, each failure a ValueError naming the array.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <initializer_list>
#include <string>
#include <utility>

#include "common.h"
#include "view.h"

namespace dgb {

namespace nb = nanobind;
using dg::DType;
using dg::View;

using InArray = nb::ndarray<nb::ro>;
using OutArray = nb::ndarray<>;

inline DType to_dtype(nb::dlpack::dtype d) {
    using nb::dlpack::dtype_code;
    if (d.lanes != 1) return DType::Other;
    if (d.code == static_cast<uint8_t>(dtype_code::Float)) {
        if (d.bits == 32) return DType::F32;
        if (d.bits == 64) return DType::F64;
    } else if (d.code == static_cast<uint8_t>(dtype_code::Int)) {
        switch (d.bits) {
            case 8: return DType::I8;
            case 16: return DType::I16;
            case 32: return DType::I32;
            case 64: return DType::I64;
        }
    } else if (d.code == static_cast<uint8_t>(dtype_code::UInt)) {
        switch (d.bits) {
            case 8: return DType::U8;
            case 16: return DType::U16;
            case 32: return DType::U32;
            case 64: return DType::U64;
        }
    }
    return DType::Other;
}

template <typename A>
inline View to_view(const A &a, const char *name, int ndim, int device_type) {
    if (static_cast<int>(a.ndim()) != ndim)
        dg::fail(std::string(name) + " must have " + std::to_string(ndim) + " dimensions, got " +
                 std::to_string(a.ndim()));
    if (a.device_type() != device_type)
        dg::fail(std::string(name) + (device_type == nb::device::cpu::value ? " must be a CPU array"
                                                                            : " must be a CUDA array"));
    View v;
    v.data = const_cast<void *>(static_cast<const void *>(a.data()));
    v.dtype = to_dtype(a.dtype());
    v.ndim = ndim;
    v.device_type = a.device_type();
    v.device_id = a.device_id();
    for (int i = 0; i < ndim; ++i) {
        v.shape[i] = static_cast<int64_t>(a.shape(i));
        v.strides[i] = a.stride(i);
    }
    return v;
}

inline void expect_dtype(const View &v, DType d, const char *name) {
    if (v.dtype != d)
        dg::fail(std::string(name) + " must be " + dg::dtype_name(d) + ", got " + dg::dtype_name(v.dtype));
}

inline void expect_contiguous(const View &v, const char *name) {
    if (!v.c_contiguous()) dg::fail(std::string(name) + " must be C-contiguous");
}

inline void expect_shape(const View &v, std::initializer_list<int64_t> shape, const char *name) {
    int i = 0;
    for (int64_t s : shape) {
        if (v.shape[i] != s) dg::fail(std::string(name) + " has the wrong shape");
        ++i;
    }
}

inline void expect_float(const View &v, const char *name) {
    if (v.dtype != DType::F32 && v.dtype != DType::F64)
        dg::fail(std::string(name) + " must be float32 or float64, got " + dg::dtype_name(v.dtype));
}

inline void expect_int(const View &v, const char *name) {
    if (v.dtype == DType::F32 || v.dtype == DType::F64 || v.dtype == DType::Other)
        dg::fail(std::string(name) + " must have an integer dtype, got " + dg::dtype_name(v.dtype));
}

inline void expect_index_out(const View &v, const char *name) {
    if (v.dtype != DType::I32 && v.dtype != DType::I64)
        dg::fail(std::string(name) + " must be int32 or int64, got " + dg::dtype_name(v.dtype));
}

inline void check_cc(const View &in, const View &out, int connectivity) {
    if (connectivity != 4 && connectivity != 8)
        dg::fail("connectivity must be 4 or 8, got " + std::to_string(connectivity));
    expect_int(in, "labels");
    expect_contiguous(in, "labels");
    expect_index_out(out, "out");
    expect_contiguous(out, "out");
    expect_shape(out, {in.shape[0], in.shape[1], in.shape[2]}, "out");
    if (out.dtype == DType::I32 && in.shape[1] * in.shape[2] > INT32_MAX)
        dg::fail("out must be int64 for images of 2**31 pixels or more");
}

}  // namespace dgb
