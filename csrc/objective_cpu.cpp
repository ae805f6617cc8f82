// The refinement objective's two cross-entropies (similarity to the argmax labels, guidance
// to the aligned guide) and their summed gradient in one pass over a channels-last
// response (see losses.h, ce_pair_forward_cpu). OpenMP over rows, the channel loops
// unit-stride; the softmax is computed once per pixel for both terms.
#include <cmath>
#include <string>

#include "common.h"
#include "isa.h"
#include "loss_kernels.h"

namespace dg {
namespace DG_ISA {
namespace {

template <typename T>
void ce_pair_impl(const View &x, const int64_t *labels, const int64_t *target, int64_t ignore,
                  const double *a, const double *b, const View &grad, double *guide_loss) {
    const Geo g = geometry(x);
    if (!g.channels_last && g.C > 1) fail("ce_pair_forward needs a channels-last response");
    const int64_t C = g.C, HW = g.H * g.W;
    const int nt = threads_for(HW * C);
    for (int64_t n = 0; n < g.N; ++n) {
        const T *base = x.ptr<T>() + n * g.sn;
        T *gbase = grad.ptr<T>() + n * g.sn;
        const int64_t *lab = labels + n * HW;
        const int64_t *tgt = target ? target + n * HW : nullptr;
        int64_t valid_n = 0;
        if (tgt) {
            int64_t bad = -1;
            for (int64_t p = 0; p < HW; ++p) {
                if (tgt[p] == ignore) continue;
                ++valid_n;
                if (tgt[p] >= C) bad = tgt[p];
            }
            if (bad >= 0)
                fail("target holds class " + std::to_string(bad) + " but the response has only " +
                     std::to_string(C) + " channels");
        }
        const T an = static_cast<T>(a[n]);
        const T bn = tgt ? static_cast<T>(b[n] / (valid_n > 0 ? double(valid_n) : 1.0)) : T(0);
        double total = 0;
#pragma omp parallel for num_threads(nt) reduction(+ : total) schedule(static)
        for (int64_t pix = 0; pix < HW; ++pix) {
            const T *px = base + pix * C;
            T *e = gbase + pix * C;
            const int64_t l = lab[pix];
            const T m = px[l];  // the argmax: the largest value
            for (int64_t c = 0; c < C; ++c) e[c] = fast_exp(px[c] - m);
            const T s = static_cast<T>(lane_sum(e, C));
            const bool valid = tgt && tgt[pix] != ignore;
            const int64_t t = valid ? (tgt[pix] < 0 ? 0 : tgt[pix]) : 0;
            const T bv = valid ? bn : T(0);
            const T f = (an + bv) / s;
            for (int64_t c = 0; c < C; ++c) e[c] *= f;
            e[l] -= an;
            if (valid) {
                e[t] -= bv;
                total += static_cast<double>(m - px[t]) + std::log(static_cast<double>(s));
            }
        }
        guide_loss[n] = tgt ? total / (valid_n > 0 ? double(valid_n) : 1.0) : 0.0;
    }
}

}  // namespace

void ce_pair_forward_cpu(const View &x, const View &labels, const View *target,
                         int64_t ignore_index, const double *a, const double *b, const View &grad,
                         double *guide_loss) {
    check_grad(x, &grad);
    dispatch_float(x.dtype, [&](auto t) {
        using T = decltype(t);
        ce_pair_impl<T>(x, labels.ptr<int64_t>(), target ? target->ptr<int64_t>() : nullptr,
                        ignore_index, a, b, grad, guide_loss);
    });
}

}  // namespace DG_ISA
}  // namespace dg
