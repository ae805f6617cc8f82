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

// grad[n] = scale[n] * d(loss_n)/d(x[n]) (added to grad[n] with `accumulate`).
void continuity_backward_cpu(const View &x, bool l1, int neighbors, double delta,
                             const double *scale, const View &grad, bool accumulate = false);

// Throws unless grad (if not null) has x's shape, strides and dtype.
void check_grad(const View &x, const View *grad);

// The similarity and guidance cross-entropies' gradient in one pass, for channels-last x
// whose argmax labels (int64 (N, H, W)) are known: per pixel, with p = softmax(x),
//   grad = a[n] * (p - onehot(label)) + b[n] / max(V_n, 1) * valid * (p - onehot(target))
// (V_n: pixels of image n whose target is not ignore_index; target may be null: b unused),
// and guide_loss[n] = mean over the valid pixels of -log p[target]. Throws on a target >= C.
void ce_pair_forward_cpu(const View &x, const View &labels, const View *target,
                         int64_t ignore_index, const double *a, const double *b, const View &grad,
                         double *guide_loss);

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
