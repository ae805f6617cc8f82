// The dg:: CPU kernels: each forwards to the variant compiled for the best instruction
// set this CPU supports. The kernel sources (losses_cpu.cpp, objective_cpu.cpp,
// norm_cpu.cpp) are compiled once for the x86-64 baseline (dg::base) and, on x86 with
// GCC/Clang, once with AVX2 + FMA (dg::avx2): the exp-heavy softmax loops run about twice
// as fast there. DYNAGUIDE_CPU_ISA=base in the environment forces the baseline.
#include <cstdlib>
#include <cstring>

#include "cpu_kernels.h"

namespace dg {
namespace base {
#include "cpu_kernels.inc"
}  // namespace base
#ifdef DG_WITH_AVX2
namespace avx2 {
#include "cpu_kernels.inc"
}  // namespace avx2
#endif

namespace {

bool use_avx2() {
#ifdef DG_WITH_AVX2
    static const bool value = [] {
        const char *forced = std::getenv("DYNAGUIDE_CPU_ISA");
        if (forced != nullptr && std::strcmp(forced, "base") == 0) return false;
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }();
    return value;
#else
    return false;
#endif
}

}  // namespace

#ifdef DG_WITH_AVX2
#define DG_DISPATCH(fn, ...) (use_avx2() ? avx2::fn(__VA_ARGS__) : base::fn(__VA_ARGS__))
#else
#define DG_DISPATCH(fn, ...) base::fn(__VA_ARGS__)
#endif

const char *cpu_isa() { return use_avx2() ? "avx2" : "base"; }

bool loss_layout_ok(const View &x) { return DG_DISPATCH(loss_layout_ok, x); }

void continuity_forward_cpu(const View &x, bool l1, int neighbors, double delta, double *loss) {
    DG_DISPATCH(continuity_forward_cpu, x, l1, neighbors, delta, loss);
}

void continuity_backward_cpu(const View &x, bool l1, int neighbors, double delta,
                             const double *scale, const View &grad, bool accumulate) {
    DG_DISPATCH(continuity_backward_cpu, x, l1, neighbors, delta, scale, grad, accumulate);
}

void check_grad(const View &x, const View *grad) { DG_DISPATCH(check_grad, x, grad); }

void ce_pair_forward_cpu(const View &x, const View &labels, const View *target,
                         int64_t ignore_index, const double *a, const double *b, const View &grad,
                         double *guide_loss) {
    DG_DISPATCH(ce_pair_forward_cpu, x, labels, target, ignore_index, a, b, grad, guide_loss);
}

void similarity_forward_cpu(const View &x, const View &labels, const View *grad, double *loss,
                            int64_t *k) {
    DG_DISPATCH(similarity_forward_cpu, x, labels, grad, loss, k);
}

void guidance_forward_cpu(const View &x, const View &target, int64_t ignore_index,
                          const View *grad, double *loss) {
    DG_DISPATCH(guidance_forward_cpu, x, target, ignore_index, grad, loss);
}

void relu_bn_forward_cpu(const View &z, bool relu, const View &gamma, const View &beta, double eps,
                         const View *residual, const View &y, double *mean, double *var,
                         double *invstd) {
    DG_DISPATCH(relu_bn_forward_cpu, z, relu, gamma, beta, eps, residual, y, mean, var, invstd);
}

void relu_bn_backward_cpu(const View &z, const View &gy, bool relu, const View &gamma,
                          const double *mean, const double *invstd, const View &dz, double *dgamma,
                          double *dbeta) {
    DG_DISPATCH(relu_bn_backward_cpu, z, gy, relu, gamma, mean, invstd, dz, dgamma, dbeta);
}

}  // namespace dg
