// Fused ReLU + BatchNorm forward and backward on CPU (see norm.h): OpenMP over fixed
// blocks of rows, unit-stride inner loops over the channels that the compiler vectorises.
#include <cmath>
#include <vector>

#include "common.h"
#include "isa.h"

namespace dg {
namespace DG_ISA {
namespace {

constexpr int64_t kRows = 256;  // rows per reduction block (fixed: results independent of threads)

template <typename T>
inline T act(T v, bool relu) {
    return relu ? (v < T(0) ? T(0) : v) : v;  // NaN passes through, as torch.relu
}

// Row r of a (M, C) view.
template <typename T>
inline T *row(const View &v, int64_t r) {
    return v.ptr<T>() + r * v.strides[0];
}

// partial[b * 2C + c] = sum over block b of f1(row, c), partial[b * 2C + C + c] = of f2.
// Then sums the block partials in block order into s1, s2.
template <typename Block>
void blocked_channel_sums(int64_t M, int64_t C, Block &&block, double *s1, double *s2) {
    const int64_t nb = (M + kRows - 1) / kRows;
    std::vector<double> part(static_cast<size_t>(nb * 2 * C));
    const int nt = threads_for(M * C);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t b = 0; b < nb; ++b) {
        double *p1 = part.data() + b * 2 * C;
        double *p2 = p1 + C;
        for (int64_t c = 0; c < C; ++c) p1[c] = p2[c] = 0.0;
        const int64_t r1 = (b + 1) * kRows < M ? (b + 1) * kRows : M;
        block(b * kRows, r1, p1, p2);
    }
    for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = 0.0;
    for (int64_t b = 0; b < nb; ++b) {
        const double *p1 = part.data() + b * 2 * C;
        const double *p2 = p1 + C;
        for (int64_t c = 0; c < C; ++c) {
            s1[c] += p1[c];
            s2[c] += p2[c];
        }
    }
}

template <typename T>
void forward(const View &z, bool relu, const View &gamma, const View &beta, double eps,
             const View *residual, const View &y, double *mean, double *var, double *invstd) {
    const int64_t M = z.shape[0], C = z.shape[1];
    std::vector<double> s(C), ss(C);
    blocked_channel_sums(
        M, C,
        [&](int64_t r0, int64_t r1, double *p1, double *p2) {
            for (int64_t r = r0; r < r1; ++r) {
                const T *zr = row<T>(z, r);
                for (int64_t c = 0; c < C; ++c) {
                    const double a = act(zr[c], relu);
                    p1[c] += a;
                    p2[c] += a * a;
                }
            }
        },
        s.data(), ss.data());
    const T *g = gamma.ptr<T>();
    const T *bt = beta.ptr<T>();
    std::vector<T> scale(C), shift(C);
    for (int64_t c = 0; c < C; ++c) {
        const double m = s[c] / double(M);
        const double v = ss[c] / double(M) - m * m;
        mean[c] = m;
        var[c] = v > 0.0 ? v : 0.0;
        invstd[c] = 1.0 / std::sqrt(var[c] + eps);
        scale[c] = static_cast<T>(double(g[gamma.strides[0] * c]) * invstd[c]);
        shift[c] = static_cast<T>(double(bt[beta.strides[0] * c]) - m * double(g[gamma.strides[0] * c]) * invstd[c]);
    }
    const T *sc = scale.data(), *sh = shift.data();
    const int nt = threads_for(M * C);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = 0; r < M; ++r) {
        const T *zr = row<T>(z, r);
        T *yr = row<T>(y, r);
        if (residual != nullptr) {
            const T *sr = row<T>(*residual, r);
            for (int64_t c = 0; c < C; ++c) yr[c] = act(zr[c], relu) * sc[c] + sh[c] + sr[c];
        } else {
            for (int64_t c = 0; c < C; ++c) yr[c] = act(zr[c], relu) * sc[c] + sh[c];
        }
    }
}

template <typename T>
void backward(const View &z, const View &gy, bool relu, const View &gamma, const double *mean,
              const double *invstd, const View &dz, double *dgamma, double *dbeta) {
    const int64_t M = z.shape[0], C = z.shape[1];
    std::vector<double> sg(C), sga(C);
    blocked_channel_sums(
        M, C,
        [&](int64_t r0, int64_t r1, double *p1, double *p2) {
            for (int64_t r = r0; r < r1; ++r) {
                const T *zr = row<T>(z, r);
                const T *gr = row<T>(gy, r);
                for (int64_t c = 0; c < C; ++c) {
                    const double gv = gr[c];
                    p1[c] += gv;
                    p2[c] += gv * double(act(zr[c], relu));
                }
            }
        },
        sg.data(), sga.data());
    // d a = gamma * invstd * (gy - mean(gy) - xhat * mean(gy * xhat)), xhat = (a - mean) * invstd
    const T *g = gamma.ptr<T>();
    std::vector<T> k1(C), k2(C), k3(C), mu(C);
    for (int64_t c = 0; c < C; ++c) {
        const double gm = double(g[gamma.strides[0] * c]);
        const double sum_gx = invstd[c] * (sga[c] - mean[c] * sg[c]);  // sum(gy * xhat)
        dbeta[c] = sg[c];
        dgamma[c] = sum_gx;
        k1[c] = static_cast<T>(gm * invstd[c]);
        k2[c] = static_cast<T>(-gm * invstd[c] * invstd[c] * sum_gx / double(M));
        k3[c] = static_cast<T>(-gm * invstd[c] * sg[c] / double(M));
        mu[c] = static_cast<T>(mean[c]);
    }
    const T *a1 = k1.data(), *a2 = k2.data(), *a3 = k3.data(), *m = mu.data();
    const int nt = threads_for(M * C);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = 0; r < M; ++r) {
        const T *zr = row<T>(z, r);
        const T *gr = row<T>(gy, r);
        T *dr = row<T>(dz, r);
        for (int64_t c = 0; c < C; ++c) {
            const T zv = zr[c];
            const T a = act(zv, relu);
            const T d = a1[c] * gr[c] + a2[c] * (a - m[c]) + a3[c];
            dr[c] = relu ? (zv > T(0) ? d : T(0)) : d;
        }
    }
}

}  // namespace

void relu_bn_forward_cpu(const View &z, bool relu, const View &gamma, const View &beta, double eps,
                         const View *residual, const View &y, double *mean, double *var,
                         double *invstd) {
    dispatch_float(z.dtype, [&](auto t) {
        forward<decltype(t)>(z, relu, gamma, beta, eps, residual, y, mean, var, invstd);
    });
}

void relu_bn_backward_cpu(const View &z, const View &gy, bool relu, const View &gamma,
                          const double *mean, const double *invstd, const View &dz, double *dgamma,
                          double *dbeta) {
    dispatch_float(z.dtype, [&](auto t) {
        backward<decltype(t)>(z, gy, relu, gamma, mean, invstd, dz, dgamma, dbeta);
    });
}

}  // namespace DG_ISA
}  // namespace dg
