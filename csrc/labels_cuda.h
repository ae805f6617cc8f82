// CUDA label-map kernels; compiled only when the build found a CUDA compiler
// (DYNAGUIDE_WITH_CUDA). Arrays are device views; work is queued on `stream` (a
// cudaStream_t handed over as an integer, e.g. torch.cuda.current_stream().cuda_stream)
// and nothing here synchronises with the host.
#pragma once

#include <cstdint>

#include "view.h"

namespace dg {

// Number of CUDA devices the runtime sees (0 when there is no driver or device).
int cuda_device_count();

// Same contract as argmax_relabel_cpu, minus the NaN report.
void argmax_relabel_cuda(const View &x, const View &labels, const View &compact,
                         const View &counts, const View &k, uintptr_t stream);

// Same contract as connected_components_cpu; in: int32 or int64, out: int32 and
// N * H * W < 2**31.
void connected_components_cuda(const View &in, const View &out, int connectivity,
                               uintptr_t stream);

}  // namespace dg
