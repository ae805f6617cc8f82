// Shared pieces of the CPU loss kernels (losses_cpu.cpp, objective_cpu.cpp): the response
// geometry in "rows of W pixels with L lanes" form, a vectorisable exp and lane sums.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"
#include "isa.h"
#include "view.h"

namespace dg {
namespace DG_ISA {

// Geometry of one image in the unified "rows of W pixels with L lanes" form:
// channels-last: 1 plane, L = C lanes (the channels); planar: C planes, L = 1.
struct Geo {
    int64_t N, C, H, W;
    int64_t sn;      // image stride
    int64_t L;       // lanes per pixel (contiguous)
    int64_t P;       // planes
    int64_t ps;      // plane stride
    int64_t RS;      // row stride = W * L
    bool channels_last;
};

inline Geo geometry(const View &x) {
    Geo g;
    g.N = x.shape[0];
    g.C = x.shape[1];
    g.H = x.shape[2];
    g.W = x.shape[3];
    g.sn = x.strides[0];
    const int64_t sc = x.strides[1], sh = x.strides[2], sw = x.strides[3];
    const bool cl = (g.C == 1 || sc == 1) && (g.W == 1 || sw == g.C) && (g.H == 1 || sh == g.W * g.C);
    const bool planar = (g.W == 1 || sw == 1) && (g.H == 1 || sh == g.W) && (g.C == 1 || sc == g.H * g.W);
    if (!cl && !planar) fail("response layout must be contiguous or channels-last");
    g.channels_last = cl;
    g.L = cl ? g.C : 1;
    g.P = cl ? 1 : g.C;
    g.ps = cl ? 0 : g.H * g.W;
    g.RS = g.W * g.L;
    return g;
}

// ----------------------------------------------------------------------------- exp
// Cephes-style exp: range reduction by ln 2 (rounding with the 1.5 * 2**23 shifter, so
// no float<->int conversions) and a degree-6 polynomial; about 1e-7 relative error in
// float32, branch-free so that the loops calling it vectorise.
inline float fast_exp(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float shifter = 12582912.0f;  // 1.5 * 2**23: t's low mantissa bits hold round(x / ln 2)
    const float t = x * 1.44269504088896341f + shifter;
    int32_t tb;
    std::memcpy(&tb, &t, sizeof(tb));
    const float n = t - shifter;
    x = x - n * 0.693359375f;
    x = x - n * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * x + 1.3981999507e-3f;
    y = y * x + 8.3334519073e-3f;
    y = y * x + 4.1665795894e-2f;
    y = y * x + 1.6666665459e-1f;
    y = y * x + 5.0000001201e-1f;
    y = y * x * x + x + 1.0f;
    const int32_t bits = (tb - 0x4B400000 + 127) << 23;  // 2**n
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    return y * scale;
}
inline double fast_exp(double x) { return std::exp(x); }

// Sum of n values with 8 independent partial sums (vectorises without -ffast-math; the
// partial sums are short, so float32 stays within a few ulp of the exact sum).
template <typename T>
inline double lane_sum(const T *v, int64_t n) {
    T a[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + 8 <= n; k += 8)
        for (int l = 0; l < 8; ++l) a[l] += v[k + l];
    double s = ((double(a[0]) + a[4]) + (double(a[1]) + a[5])) + ((double(a[2]) + a[6]) + (double(a[3]) + a[7]));
    for (; k < n; ++k) s += v[k];
    return s;
}

}  // namespace DG_ISA
}  // namespace dg
