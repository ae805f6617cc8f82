// A framework-free view of a strided array, filled from nb::ndarray in module.cpp so
// that the kernels compile without nanobind (and the .cu files without either).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace dg {

enum class DType : int { F32, F64, I8, I16, I32, I64, U8, U16, U32, U64, Other };

inline const char *dtype_name(DType d) {
    switch (d) {
        case DType::F32: return "float32";
        case DType::F64: return "float64";
        case DType::I8: return "int8";
        case DType::I16: return "int16";
        case DType::I32: return "int32";
        case DType::I64: return "int64";
        case DType::U8: return "uint8";
        case DType::U16: return "uint16";
        case DType::U32: return "uint32";
        case DType::U64: return "uint64";
        default: return "unsupported";
    }
}

struct View {
    void *data = nullptr;
    DType dtype = DType::Other;
    int ndim = 0;
    int64_t shape[4] = {1, 1, 1, 1};
    int64_t strides[4] = {0, 0, 0, 0};  // in elements
    int device_type = 1;                 // DLPack: 1 = CPU, 2 = CUDA
    int device_id = 0;

    int64_t numel() const {
        int64_t n = 1;
        for (int i = 0; i < ndim; ++i) n *= shape[i];
        return n;
    }
    bool c_contiguous() const {
        int64_t expect = 1;
        for (int i = ndim - 1; i >= 0; --i) {
            if (shape[i] != 1 && strides[i] != expect) return false;
            expect *= shape[i];
        }
        return true;
    }
    template <typename T>
    T *ptr() const {
        return static_cast<T *>(data);
    }
};

// Calls f(T{}) with the C++ type of an integer dtype.
template <typename F>
void dispatch_int(DType d, F &&f) {
    switch (d) {
        case DType::I8: f(int8_t{}); break;
        case DType::I16: f(int16_t{}); break;
        case DType::I32: f(int32_t{}); break;
        case DType::I64: f(int64_t{}); break;
        case DType::U8: f(uint8_t{}); break;
        case DType::U16: f(uint16_t{}); break;
        case DType::U32: f(uint32_t{}); break;
        case DType::U64: f(uint64_t{}); break;
        default: throw std::invalid_argument(std::string("expected an integer dtype, got ") + dtype_name(d));
    }
}

template <typename F>
void dispatch_float(DType d, F &&f) {
    switch (d) {
        case DType::F32: f(float{}); break;
        case DType::F64: f(double{}); break;
        default: throw std::invalid_argument(std::string("expected float32 or float64, got ") + dtype_name(d));
    }
}

}  // namespace dg
