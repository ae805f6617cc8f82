// Label-map kernels: argmax + compact relabel + counts, relabel_sequential and
// connected components. CPU versions here, CUDA versions in labels_cuda.h.
#pragma once

#include <cstdint>

#include "view.h"

namespace dg {

// x: (N, C, H, W) float32/float64, any strides. labels, compact: (N, H, W) int64
// C-contiguous; counts: (N, C) int64; k: (N,) int64. compact[n] ranks the argmax of
// image n among the channels present in it (0..K-1 in increasing channel order);
// counts[n, j] is the pixel count of compact label j (0 for j >= K). Returns true
// when x holds a NaN (the outputs are then unspecified).
bool argmax_relabel_cpu(const View &x, const View &labels, const View &compact,
                        const View &counts, const View &k);

// in: any integer dtype, C-contiguous; out: int32 or int64, same number of elements.
// out = rank of each value among the distinct values of `in` (0..K-1, increasing
// value order; negative values rank like any other). Returns K.
int64_t relabel_sequential_cpu(const View &in, const View &out);

// in: (N, H, W) any integer dtype, C-contiguous; out: (N, H, W) int32 or int64.
// Pixels of equal value that touch (4- or 8-connectivity) form a component; each
// image's components are numbered 0..M-1 in raster order of their first pixel.
void connected_components_cpu(const View &in, const View &out, int connectivity);

}  // namespace dg
