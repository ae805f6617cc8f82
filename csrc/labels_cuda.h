// CUDA label-map kernels; compiled only when the build found a CUDA compiler
// (DYNAGUIDE_WITH_CUDA). Arrays are device views; work is queued on `stream` (a
// cudaStream_t handed over as an integer, e.g. torch.cuda.current_stream().cuda_stream)
// and nothing here synchronises with the host or allocates: temporary buffers come from
// a caller-provided scratch array (allocated with torch, so that its caching allocator
// and memory statistics see it) of the size the *_scratch functions report.
#pragma once

#include <cstddef>
#include <cstdint>

#include "view.h"

namespace dg {

// Number of CUDA devices the runtime sees (0 when there is no driver or device).
int cuda_device_count();

// Scratch bytes connected_components_cuda needs for `total` pixels (queries cub: needs
// the CUDA runtime and a device).
size_t connected_components_cuda_scratch(int64_t total, int device);

// Same contract as connected_components_cpu; in: int32 or int64, out: int32 and
// N * H * W < 2**31.
void connected_components_cuda(const View &in, const View &out, int connectivity, void *scratch,
                               size_t scratch_bytes, uintptr_t stream);

}  // namespace dg
