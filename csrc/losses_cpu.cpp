// Fused CPU refinement losses: one read of the response per loss, OpenMP over rows,
// unit-stride inner loops (over channels for channels-last inputs, over pixels for
// planar ones) that the compiler vectorises.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "isa.h"
#include "loss_kernels.h"

namespace dg {
namespace DG_ISA {
namespace {

constexpr int64_t kBlock = 256;  // elements per block of a blocked reduction

// ------------------------------------------------------------------------ continuity
template <typename T, bool L1>
inline T penalty(T d, T delta) {
    const T a = std::fabs(d);
    if (L1) return a;
    const T m = a < delta ? a : delta;  // a < delta: 0.5 a^2, else delta (a - delta / 2)
    return m * (a - T(0.5) * m);
}

// sum_k penalty(a[k] - b[k]) for k in [0, n), blocked: penalties of a block go to a
// stack buffer (a vectorised map) and are summed in lanes, then in double.
template <typename T, bool L1>
inline double penalty_sum(const T *a, const T *b, int64_t n, T delta) {
    T buf[kBlock];
    double total = 0;
    for (int64_t k0 = 0; k0 < n; k0 += kBlock) {
        const int64_t m = n - k0 < kBlock ? n - k0 : kBlock;
        const T *ab = a + k0, *bb = b + k0;
        for (int64_t k = 0; k < m; ++k) buf[k] = penalty<T, L1>(ab[k] - bb[k], delta);
        total += lane_sum(buf, m);
    }
    return total;
}

template <typename T, bool L1>
inline T dpenalty(T d, T delta) {
    if (L1) return static_cast<T>((d > T(0)) - (d < T(0)));
    return d < -delta ? -delta : (d > delta ? delta : d);
}

struct Weights {
    double v = 0, h = 0, d = 0, a = 0;
};

Weights direction_weights(const Geo &g, int neighbors) {
    Weights w;
    const double C = static_cast<double>(g.C);
    if (g.H > 1) w.v = 1.0 / (C * (g.H - 1) * g.W);
    if (g.W > 1) w.h = 1.0 / (C * g.H * (g.W - 1));
    if (neighbors == 8 && g.H > 1 && g.W > 1) w.d = w.a = 1.0 / (C * (g.H - 1) * (g.W - 1));
    return w;
}

template <typename T, bool L1, bool EIGHT>
void continuity_forward_impl(const View &x, double delta_d, double *loss) {
    const Geo g = geometry(x);
    const Weights w = direction_weights(g, EIGHT ? 8 : 4);
    const T delta = static_cast<T>(delta_d);
    const int64_t L = g.L, RS = g.RS, items = g.P * g.H;
    const int nt = threads_for(items * RS);
    for (int64_t n = 0; n < g.N; ++n) {
        const T *base = x.ptr<T>() + n * g.sn;
        double sv = 0, sh = 0, sd = 0, sa = 0;
#pragma omp parallel for num_threads(nt) reduction(+ : sv, sh, sd, sa) schedule(static)
        for (int64_t q = 0; q < items; ++q) {
            const int64_t p = q / g.H, i = q % g.H;
            const T *cur = base + p * g.ps + i * RS;
            sh += penalty_sum<T, L1>(cur + L, cur, RS - L, delta);  // (i, j) - (i, j-1)
            if (i == 0) continue;
            const T *prev = cur - RS;
            sv += penalty_sum<T, L1>(cur, prev, RS, delta);  // (i, j) - (i-1, j)
            if (!EIGHT) continue;
            sd += penalty_sum<T, L1>(cur + L, prev, RS - L, delta);  // (i, j) - (i-1, j-1)
            sa += penalty_sum<T, L1>(cur, prev + L, RS - L, delta);  // (i, j) - (i-1, j+1)
        }
        loss[n] = w.v * sv + w.h * sh + w.d * sd + w.a * sa;
    }
}

// Gradient of one row segment [k0, k1) gathered from the element's own pairs:
// the element is the later ("+") member of the pairs with the row above and its left
// neighbour, the earlier ("-") member of those with the row below and its right one.
template <typename T, bool L1, bool EIGHT, bool ACC, bool UP, bool DN, bool LEFT, bool RIGHT>
inline void continuity_grad_range(const T *cur, const T *prev, const T *next, T *out, int64_t k0,
                                  int64_t k1, int64_t L, T delta, T wv, T wh, T wd, T wa) {
    for (int64_t k = k0; k < k1; ++k) {
        const T c = cur[k];
        T gv = 0, gh = 0, gd = 0, ga = 0;
        if (UP) gv += dpenalty<T, L1>(c - prev[k], delta);
        if (DN) gv -= dpenalty<T, L1>(next[k] - c, delta);
        if (LEFT) gh += dpenalty<T, L1>(c - cur[k - L], delta);
        if (RIGHT) gh -= dpenalty<T, L1>(cur[k + L] - c, delta);
        if (EIGHT) {
            if (UP && LEFT) gd += dpenalty<T, L1>(c - prev[k - L], delta);   // (i-1, j-1)
            if (DN && RIGHT) gd -= dpenalty<T, L1>(next[k + L] - c, delta);  // (i+1, j+1)
            if (UP && RIGHT) ga += dpenalty<T, L1>(c - prev[k + L], delta);  // (i-1, j+1)
            if (DN && LEFT) ga -= dpenalty<T, L1>(next[k - L] - c, delta);   // (i+1, j-1)
        }
        const T d = wv * gv + wh * gh + wd * gd + wa * ga;
        out[k] = ACC ? out[k] + d : d;
    }
}

template <typename T, bool L1, bool EIGHT, bool ACC, bool UP, bool DN>
void continuity_grad_row(const T *cur, const T *prev, const T *next, T *out, int64_t W, int64_t L,
                         T delta, T wv, T wh, T wd, T wa) {
    if (W == 1) {
        continuity_grad_range<T, L1, EIGHT, ACC, UP, DN, false, false>(cur, prev, next, out, 0, L, L,
                                                                  delta, wv, wh, wd, wa);
        return;
    }
    continuity_grad_range<T, L1, EIGHT, ACC, UP, DN, false, true>(cur, prev, next, out, 0, L, L, delta,
                                                             wv, wh, wd, wa);
    continuity_grad_range<T, L1, EIGHT, ACC, UP, DN, true, true>(cur, prev, next, out, L, (W - 1) * L,
                                                            L, delta, wv, wh, wd, wa);
    continuity_grad_range<T, L1, EIGHT, ACC, UP, DN, true, false>(cur, prev, next, out, (W - 1) * L,
                                                             W * L, L, delta, wv, wh, wd, wa);
}

template <typename T, bool L1, bool EIGHT, bool ACC>
void continuity_backward_impl(const View &x, double delta_d, const double *scale,
                              const View &grad) {
    const Geo g = geometry(x);
    const Weights w = direction_weights(g, EIGHT ? 8 : 4);
    const T delta = static_cast<T>(delta_d);
    const int64_t L = g.L, RS = g.RS, items = g.P * g.H, H = g.H;
    const int nt = threads_for(items * RS);
    for (int64_t n = 0; n < g.N; ++n) {
        const T *base = x.ptr<T>() + n * g.sn;
        T *gbase = grad.ptr<T>() + n * g.sn;
        const double s = scale[n];
        const T wv = static_cast<T>(s * w.v), wh = static_cast<T>(s * w.h);
        const T wd = static_cast<T>(s * w.d), wa = static_cast<T>(s * w.a);
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t q = 0; q < items; ++q) {
            const int64_t p = q / H, i = q % H;
            const T *cur = base + p * g.ps + i * RS;
            T *out = gbase + p * g.ps + i * RS;
            const T *prev = cur - RS, *next = cur + RS;
            const bool up = i > 0, dn = i + 1 < H;
            if (up && dn)
                continuity_grad_row<T, L1, EIGHT, ACC, true, true>(cur, prev, next, out, g.W, L, delta, wv, wh, wd, wa);
            else if (up)
                continuity_grad_row<T, L1, EIGHT, ACC, true, false>(cur, prev, next, out, g.W, L, delta, wv, wh, wd, wa);
            else if (dn)
                continuity_grad_row<T, L1, EIGHT, ACC, false, true>(cur, prev, next, out, g.W, L, delta, wv, wh, wd, wa);
            else
                continuity_grad_row<T, L1, EIGHT, ACC, false, false>(cur, prev, next, out, g.W, L, delta, wv, wh, wd, wa);
        }
    }
}

// -------------------------------------------------------------- softmax cross-entropy
// One kernel for similarity (label = the pixel's argmax, weight 1 / (H W)) and guidance
// (label = target, weight 1 / #valid, ignored pixels get zero gradient).
template <typename T, bool GUIDE>
void softmax_ce_impl(const View &x, int64_t *labels_out, const int64_t *target, int64_t ignore,
                     const View *grad, double *loss, int64_t *kout) {
    const Geo g = geometry(x);
    const int64_t C = g.C, H = g.H, W = g.W, HW = H * W;
    const int nt = threads_for(HW * C);
    std::vector<int64_t> hist(GUIDE ? 0 : static_cast<size_t>(nt) * C);
    for (int64_t n = 0; n < g.N; ++n) {
        const T *base = x.ptr<T>() + n * g.sn;
        T *gbase = grad ? grad->ptr<T>() + n * g.sn : nullptr;
        const int64_t *tgt = GUIDE ? target + n * HW : nullptr;
        int64_t *lab = GUIDE ? nullptr : labels_out + n * HW;
        double denom = static_cast<double>(HW);
        if (GUIDE) {
            int64_t valid = 0, bad = -1;
            for (int64_t p = 0; p < HW; ++p) {
                const int64_t t = tgt[p];
                if (t == ignore) continue;
                ++valid;
                if (t >= C) bad = t;
            }
            if (bad >= 0)
                fail("target holds class " + std::to_string(bad) + " but the response has only " +
                     std::to_string(C) + " channels");
            denom = valid > 0 ? static_cast<double>(valid) : 1.0;
        }
        const T inv_denom = static_cast<T>(1.0 / denom);
        if (!GUIDE) std::fill(hist.begin(), hist.end(), 0);
        double total = 0;
#pragma omp parallel num_threads(nt) reduction(+ : total)
        {
            int64_t *h = GUIDE ? nullptr : hist.data() + static_cast<int64_t>(thread_id()) * C;
            // Same-width index type so that the compare-select argmax loop vectorises.
            using Idx = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
            std::vector<T> mx, sm, scratch;
            std::vector<Idx> lb;
            if (g.channels_last) {
                scratch.resize(C);
            } else {
                mx.resize(W);
                sm.resize(W);
                lb.resize(W);
            }
#pragma omp for schedule(static)
            for (int64_t i = 0; i < H; ++i) {
                double row_total = 0;
                if (g.channels_last) {
                    for (int64_t j = 0; j < W; ++j) {
                        const int64_t pix = i * W + j;
                        const T *px = base + pix * C;
                        T m = px[0];
#pragma omp simd reduction(max : m)
                        for (int64_t c = 1; c < C; ++c) m = px[c] > m ? px[c] : m;
                        int64_t label;
                        bool valid = true;
                        if (GUIDE) {
                            valid = tgt[pix] != ignore;
                            label = tgt[pix] < 0 ? 0 : tgt[pix];
                        } else {
                            label = 0;
                            while (label + 1 < C && !(px[label] == m)) ++label;
                            lab[pix] = label;
                            ++h[label];
                        }
                        // exp(x - max) into the gradient row (or scratch), then its sum.
                        T *e = (gbase && valid) ? gbase + pix * C : scratch.data();
                        for (int64_t c = 0; c < C; ++c) e[c] = fast_exp(px[c] - m);
                        const T s = static_cast<T>(lane_sum(e, C));
                        if (gbase && valid) {
                            const T f = inv_denom / s;
                            for (int64_t c = 0; c < C; ++c) e[c] *= f;
                            e[label] -= inv_denom;
                        } else if (gbase) {
                            std::fill(gbase + pix * C, gbase + pix * C + C, T(0));
                        }
                        if (valid)
                            row_total += static_cast<double>(m - px[label]) + std::log(static_cast<double>(s));
                    }
                } else {
                    const T *row = base + i * W;
                    T *grow = gbase ? gbase + i * W : nullptr;
                    T *m = mx.data(), *s = sm.data();
                    Idx *l = lb.data();
                    for (int64_t j = 0; j < W; ++j) {
                        m[j] = row[j];
                        l[j] = 0;
                        s[j] = 0;
                    }
                    for (int64_t c = 1; c < C; ++c) {
                        const T *rc = row + c * HW;
                        for (int64_t j = 0; j < W; ++j) {
                            const bool gt = rc[j] > m[j];
                            m[j] = gt ? rc[j] : m[j];
                            l[j] = gt ? static_cast<Idx>(c) : l[j];
                        }
                    }
                    for (int64_t c = 0; c < C; ++c) {
                        const T *rc = row + c * HW;
                        if (grow) {
                            T *gc = grow + c * HW;
                            for (int64_t j = 0; j < W; ++j) {
                                const T e = fast_exp(rc[j] - m[j]);
                                gc[j] = e;
                                s[j] += e;
                            }
                        } else {
                            for (int64_t j = 0; j < W; ++j) s[j] += fast_exp(rc[j] - m[j]);
                        }
                    }
                    for (int64_t j = 0; j < W; ++j) {
                        const int64_t pix = i * W + j;
                        bool valid = true;
                        if (GUIDE) {
                            valid = tgt[pix] != ignore;
                            l[j] = static_cast<Idx>(tgt[pix] < 0 ? 0 : tgt[pix]);
                        } else {
                            lab[pix] = l[j];
                            ++h[l[j]];
                        }
                        if (valid)
                            row_total += static_cast<double>(m[j] - row[l[j] * HW + j]) +
                                         std::log(static_cast<double>(s[j]));
                        s[j] = valid ? inv_denom / s[j] : T(0);  // reuse as the softmax factor
                    }
                    if (grow) {
                        for (int64_t c = 0; c < C; ++c) {
                            T *gc = grow + c * HW;
                            for (int64_t j = 0; j < W; ++j) gc[j] *= s[j];
                        }
                        for (int64_t j = 0; j < W; ++j) {
                            const bool valid = !GUIDE || tgt[i * W + j] != ignore;
                            if (valid) grow[l[j] * HW + j] -= inv_denom;
                        }
                    }
                }
                total += row_total;
            }
        }
        loss[n] = total / denom;
        if (!GUIDE) {
            int64_t K = 0;
            for (int64_t c = 0; c < C; ++c) {
                int64_t cnt = 0;
                for (int t = 0; t < nt; ++t) cnt += hist[static_cast<size_t>(t) * C + c];
                K += cnt > 0;
            }
            kout[n] = K;
        }
    }
}

}  // namespace

void check_grad(const View &x, const View *grad) {
    if (!grad) return;
    for (int d = 0; d < 4; ++d)
        if (grad->shape[d] != x.shape[d] || (x.shape[d] > 1 && grad->strides[d] != x.strides[d]))
            fail("gradient buffer must have the response's shape and strides");
    if (grad->dtype != x.dtype) fail("gradient buffer must have the response's dtype");
}

bool loss_layout_ok(const View &x) {
    try {
        geometry(x);
        return true;
    } catch (const std::invalid_argument &) {
        return false;
    }
}

void continuity_forward_cpu(const View &x, bool l1, int neighbors, double delta, double *loss) {
    dispatch_float(x.dtype, [&](auto t) {
        using T = decltype(t);
        if (l1 && neighbors == 8) continuity_forward_impl<T, true, true>(x, delta, loss);
        else if (l1) continuity_forward_impl<T, true, false>(x, delta, loss);
        else if (neighbors == 8) continuity_forward_impl<T, false, true>(x, delta, loss);
        else continuity_forward_impl<T, false, false>(x, delta, loss);
    });
}

template <typename T, bool ACC>
void continuity_backward_dispatch(const View &x, bool l1, int neighbors, double delta,
                                  const double *scale, const View &grad) {
    if (l1 && neighbors == 8) continuity_backward_impl<T, true, true, ACC>(x, delta, scale, grad);
    else if (l1) continuity_backward_impl<T, true, false, ACC>(x, delta, scale, grad);
    else if (neighbors == 8) continuity_backward_impl<T, false, true, ACC>(x, delta, scale, grad);
    else continuity_backward_impl<T, false, false, ACC>(x, delta, scale, grad);
}

void continuity_backward_cpu(const View &x, bool l1, int neighbors, double delta,
                             const double *scale, const View &grad, bool accumulate) {
    check_grad(x, &grad);
    dispatch_float(x.dtype, [&](auto t) {
        using T = decltype(t);
        if (accumulate) continuity_backward_dispatch<T, true>(x, l1, neighbors, delta, scale, grad);
        else continuity_backward_dispatch<T, false>(x, l1, neighbors, delta, scale, grad);
    });
}

void similarity_forward_cpu(const View &x, const View &labels, const View *grad, double *loss,
                            int64_t *k) {
    check_grad(x, grad);
    dispatch_float(x.dtype, [&](auto t) {
        using T = decltype(t);
        softmax_ce_impl<T, false>(x, labels.ptr<int64_t>(), nullptr, 0, grad, loss, k);
    });
}

void guidance_forward_cpu(const View &x, const View &target, int64_t ignore_index,
                          const View *grad, double *loss) {
    check_grad(x, grad);
    dispatch_float(x.dtype, [&](auto t) {
        using T = decltype(t);
        softmax_ce_impl<T, true>(x, nullptr, target.ptr<int64_t>(), ignore_index, grad, loss,
                                 nullptr);
    });
}

}  // namespace DG_ISA
}  // namespace dg
