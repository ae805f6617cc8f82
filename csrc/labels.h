// Label-map kernels: relabel_sequential and connected components. CPU versions here, CUDA versions in labels_cuda.h.
#pragma once

#include <cstdint>

#include "view.h"

namespace dg {

// in: any integer dtype, C-contiguous; out: int32 or int64, same number of elements.
// out = rank of each value among the distinct values of `in` (0..K-1, increasing
// value order; negative values rank like any other). Returns K.
int64_t relabel_sequential_cpu(const View &in, const View &out);

// in: (N, H, W) any integer dtype, C-contiguous; out: (N, H, W) int32 or int64.
// Pixels of equal value that touch (4- or 8-connectivity) form a component; each
// image's components are numbered 0..M-1 in raster order of their first pixel.
void connected_components_cpu(const View &in, const View &out, int connectivity);

}  // namespace dg
