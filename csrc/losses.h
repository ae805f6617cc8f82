// Fused CPU refinement losses (see dynaguide/losses.py for the semantics).
//
// x is a (N, C, H, W) float32/float64 view whose per-image layout is dense in one of
// two ways: channels-last (sc == 1, sw == C, sh == W*C) or planar
// (sw == 1, sh == W, sc == H*W); the Python side copies anything else. Gradient views
// have exactly x's strides. Per-image losses are written as float64.
#pragma once

#include <cstdint>

#include "view.h"

namespace dg {

// True when x's per-image layout is one of the two handled ones.
bool loss_layout_ok(const View &x);

// Per-image continuity loss (sum over directions of the mean penalty).
void continuity_forward_cpu(const View &x, bool l1, int neighbors, double delta, double *loss);

// grad[n] = scale[n] * d(loss_n)/d(x[n]).
void continuity_backward_cpu(const View &x, bool l1, int neighbors, double delta,
                             const double *scale, const View &grad);

// Per-image mean cross-entropy of every pixel against its own argmax; writes the int64
// (N, H, W) argmax labels, the number K of distinct labels per image and, when grad is
// not null, d(loss_n)/d(x[n]).
void similarity_forward_cpu(const View &x, const View &labels, const View *grad, double *loss,
                            int64_t *k);

// Per-image cross-entropy against target (int64 (N, H, W)) averaged over the pixels whose
// target is not ignore_index (negative targets other than ignore_index count as class 0,
// as in the reference); grad as above. Throws std::invalid_argument on a target >= C.
void guidance_forward_cpu(const View &x, const View &target, int64_t ignore_index,
                          const View *grad, double *loss);

}  // namespace dg
