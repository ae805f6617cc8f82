// Fully connected CRF (Kraehenbuehl & Koltun, NeurIPS 2011) with Gaussian filtering on a
// permutohedral lattice (Adams, Baek & Davis, Eurographics 2010). CPU only, float32.
#pragma once

#include <cstdint>

namespace dg {

// out (N, vd) = lattice approximation of sum_j exp(-|f_i - f_j|^2 / 2) * v_j (up to a
// constant gain, about the same for every point; normalised filters cancel it).
// features: (N, d) float32 rows at stride `fstride`, 1 <= d <= 16; values, out: (N, vd)
// C-contiguous float32. Returns the number of lattice points.
int64_t permutohedral_filter_cpu(const float *features, int64_t n, int d, int64_t fstride,
                                 const float *values, int vd, float *out);

struct CrfParams {
    int iterations;
    float gaussian_sxy, gaussian_weight;
    float bilateral_sxy, bilateral_srgb, bilateral_weight;
};

// Mean-field inference. image: (H, W, 3) uint8 C-contiguous; energy: (K, H, W) float32
// C-contiguous unary energies (-log p); q: (K, H, W) float32 output marginals. Each kernel
// k(f_i, f_j) is normalised symmetrically, D^-1/2 K D^-1/2 with D = diag(K 1), and the
// Potts update is Q <- softmax(-energy + sum_m w_m D_m^-1/2 K_m D_m^-1/2 Q).
void dense_crf_cpu(const uint8_t *image, int64_t h, int64_t w, const float *energy, int k,
                   const CrfParams &p, float *q);

}  // namespace dg
