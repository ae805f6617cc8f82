// Fused ReLU + BatchNorm (training mode, batch statistics) on CPU, for channels-last
// activations viewed as an (M, C) matrix: M = N*H*W rows (pixels), C contiguous channels.
//
//   a = relu ? max(z, 0) : z,  y = (a - mean_c) / sqrt(var_c + eps) * gamma_c + beta_c
//
// with the biased batch variance, as torch.nn.BatchNorm2d in train mode. Two passes over
// z forward (statistics, then output) and two backward (the two channel sums, then dz).
// Reductions run over fixed blocks of rows whose partial sums (float64) are added in
// block order, so results do not depend on the number of threads, nor on how many other
// channels the matrix holds (a grouped batch of images gives each image's channels
// exactly the values it gets alone).
#pragma once

#include <cstdint>

#include "view.h"

namespace dg {

// z, y: (M, C) float32/float64 views with unit channel stride; gamma, beta: (C,) of z's
// dtype; mean, var, invstd: (C,) float64 outputs (var biased). With `residual` (an (M, C)
// view like z, or null) y = BatchNorm(a) + residual, written in the same pass.
void relu_bn_forward_cpu(const View &z, bool relu, const View &gamma, const View &beta, double eps,
                         const View *residual, const View &y, double *mean, double *var,
                         double *invstd);

// gy, dz: (M, C) views like z; dgamma, dbeta: (C,) float64 outputs.
void relu_bn_backward_cpu(const View &z, const View &gy, bool relu, const View &gamma,
                          const double *mean, const double *invstd, const View &dz, double *dgamma,
                          double *dbeta);

}  // namespace dg
