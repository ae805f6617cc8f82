// CUDA label-map kernels (see labels_cuda.h).
//
// argmax + relabel: a block owns 2048 consecutive pixels of one image; each thread takes
// the channel argmax of 8 of them, and the label counts go to a per-block histogram in
// shared memory with warp-aggregated atomics (the lanes of a warp that found the same
// label add once, __match_any_sync); the block then adds its non-empty bins to the
// image's histogram in global memory. Late in a refinement few labels remain, and one
// global atomic per pixel would serialise on them. One block per image turns the
// histogram into the compact map (rank among present channels), counts and K; a last
// pass maps the labels.
//
// connected components: union-find over global pixel indices with lock-free unions that
// always link the larger root below the smaller one (Playne & Hawick, 2018), so each root
// is the first pixel of its component in raster order, and path halving in every find (a
// pixel is re-pointed at its grandparent, an ancestor with a smaller index: the links
// keep pointing to smaller indices, and a concurrent union that re-links a root is
// retried by its thread, so no union is lost); on a uniform map the chains would
// otherwise grow as long as a row. An exclusive scan of the root flags numbers the
// components in raster order.
#include <cuda_runtime.h>

#include <cub/device/device_scan.cuh>
#include <stdexcept>
#include <string>

#include "labels_cuda.h"

namespace dg {
namespace {

void check(cudaError_t err, const char *what) {
    if (err != cudaSuccess)
        throw std::runtime_error(std::string("dynaguide._native CUDA error in ") + what + ": " +
                                 cudaGetErrorString(err));
}

constexpr int kThreads = 256;
constexpr int kPixelsPerThread = 8;
constexpr int64_t kPixelsPerBlock = int64_t(kThreads) * kPixelsPerThread;
constexpr int64_t kSharedBins = 12288;  // 48 KB of uint32 bins: larger C counts in global memory
constexpr size_t kAlign = 256;

inline unsigned blocks_for(int64_t n) {
    return static_cast<unsigned>((n + kThreads - 1) / kThreads);
}

inline size_t aligned(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Carves aligned pieces out of the caller's scratch buffer.
class Scratch {
  public:
    Scratch(void *base, size_t bytes) : base_(static_cast<char *>(base)), left_(bytes) {}
    template <typename T>
    T *take(size_t count) {
        const size_t bytes = aligned(sizeof(T) * count);
        if (bytes > left_) throw std::invalid_argument("scratch buffer too small");
        T *p = reinterpret_cast<T *>(base_);
        base_ += bytes;
        left_ -= bytes;
        return p;
    }

  private:
    char *base_;
    size_t left_;
};

// ------------------------------------------------------------------ argmax + relabel
// Adds 1 to bin `b` for every active lane, one atomic per distinct label in the warp.
__device__ __forceinline__ void count_label(unsigned *bins, int b, bool active) {
#if __CUDA_ARCH__ >= 700
    const unsigned lanes = __ballot_sync(0xffffffffu, active);
    if (active) {
        const unsigned peers = __match_any_sync(lanes, b);
        if ((threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(bins + b, __popc(peers));
    }
#else
    if (active) atomicAdd(bins + b, 1u);
#endif
}

template <typename T, bool SHARED>
__global__ void argmax_kernel(const T *__restrict__ x, int64_t C, int64_t H, int64_t W, int64_t sn,
                              int64_t sc, int64_t sh, int64_t sw, int64_t blocks_per_image,
                              int64_t *__restrict__ labels, unsigned *__restrict__ hist) {
    extern __shared__ unsigned block_bins[];
    const int64_t HW = H * W;
    const int64_t n = blockIdx.x / blocks_per_image;
    const int64_t p0 = (blockIdx.x - n * blocks_per_image) * kPixelsPerBlock;
    unsigned *image_bins = hist + n * C;
    if (SHARED) {
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x) block_bins[c] = 0;
        __syncthreads();
    }
    for (int k = 0; k < kPixelsPerThread; ++k) {
        const int64_t r = p0 + int64_t(k) * blockDim.x + threadIdx.x;
        const bool in = r < HW;
        int best_c = 0;
        if (in) {
            const int64_t i = r / W, j = r - (r / W) * W;
            const T *px = x + n * sn + i * sh + j * sw;
            T best = px[0];
            for (int64_t c = 1; c < C; ++c) {
                const T v = px[c * sc];
                if (v > best) {  // strict: the first maximum wins, as torch.argmax
                    best = v;
                    best_c = static_cast<int>(c);
                }
            }
            labels[n * HW + r] = best_c;
        }
        count_label(SHARED ? block_bins : image_bins, best_c, in);
    }
    if (SHARED) {
        __syncthreads();
        for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
            const unsigned v = block_bins[c];
            if (v) atomicAdd(image_bins + c, v);
        }
    }
}

__global__ void compact_map_kernel(int64_t C, const unsigned *__restrict__ hist,
                                   int64_t *__restrict__ map, int64_t *__restrict__ counts,
                                   int64_t *__restrict__ k) {
    const int64_t n = blockIdx.x;
    if (threadIdx.x != 0) return;  // C is small (the response's channels): one thread per image
    const unsigned *h = hist + n * C;
    int64_t *m = map + n * C, *cnt = counts + n * C;
    int64_t K = 0;
    for (int64_t c = 0; c < C; ++c) {
        if (h[c] > 0) {
            m[c] = K;
            cnt[K] = static_cast<int64_t>(h[c]);
            ++K;
        } else {
            m[c] = -1;
        }
    }
    for (int64_t c = K; c < C; ++c) cnt[c] = 0;
    k[n] = K;
}

__global__ void apply_map_kernel(int64_t total, int64_t HW, int64_t C,
                                 const int64_t *__restrict__ labels, const int64_t *__restrict__ map,
                                 int64_t *__restrict__ compact) {
    const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (p >= total) return;
    compact[p] = map[(p / HW) * C + labels[p]];
}

// --------------------------------------------------------------- connected components
// Root of p, halving the path on the way (see the file comment).
__device__ __forceinline__ int find_root(int *parent, int p) {
    while (true) {
        const int q = __ldcg(parent + p);
        if (q == p) return p;
        const int g = __ldcg(parent + q);
        if (g == q) return q;
        parent[p] = g;
        p = g;
    }
}

__device__ void unite(int *parent, int a, int b) {
    bool done;
    do {
        a = find_root(parent, a);
        b = find_root(parent, b);
        if (a < b) {
            const int old = atomicMin(parent + b, a);
            done = old == b;
            b = old;
        } else if (b < a) {
            const int old = atomicMin(parent + a, b);
            done = old == a;
            a = old;
        } else {
            done = true;
        }
    } while (!done);
}

__global__ void cc_init_kernel(int total, int *parent) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p < total) parent[p] = p;
}

template <typename T, bool EIGHT>
__global__ void cc_union_kernel(const T *__restrict__ lab, int total, int H, int W, int *parent) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= total) return;
    const int r = p % (H * W), i = r / W, j = r % W;
    const T v = lab[p];
    if (j > 0 && lab[p - 1] == v) unite(parent, p, p - 1);
    if (i > 0) {
        const int u = p - W;
        if (lab[u] == v) unite(parent, p, u);
        if (EIGHT) {
            if (j > 0 && lab[u - 1] == v) unite(parent, p, u - 1);
            if (j + 1 < W && lab[u + 1] == v) unite(parent, p, u + 1);
        }
    }
}

__global__ void cc_flatten_kernel(int total, int *parent, int *flags) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= total) return;
    const int root = find_root(parent, p);
    parent[p] = root;  // a valid ancestor either way: concurrent finds stay correct
    flags[p] = root == p ? 1 : 0;
}

__global__ void cc_number_kernel(int total, int HW, const int *__restrict__ ids, int *out) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= total) return;
    out[p] = ids[out[p]] - ids[(p / HW) * HW];
}

class StreamScope {  // select the tensor's device for this (statically linked) runtime
  public:
    explicit StreamScope(int device) {
        check(cudaGetDevice(&prev_), "cudaGetDevice");
        if (prev_ != device) check(cudaSetDevice(device), "cudaSetDevice");
        device_ = device;
    }
    ~StreamScope() {
        if (prev_ != device_) cudaSetDevice(prev_);
    }

  private:
    int prev_ = 0, device_ = 0;
};

size_t scan_bytes(int total, cudaStream_t stream) {
    size_t bytes = 0;
    check(cub::DeviceScan::ExclusiveSum(nullptr, bytes, static_cast<int *>(nullptr),
                                        static_cast<int *>(nullptr), total, stream),
          "cub scan size");
    return bytes;
}

}  // namespace

int cuda_device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky-free error so later calls are not confused
        return 0;
    }
    return n;
}

size_t argmax_relabel_cuda_scratch(int64_t N, int64_t C) {
    return aligned(sizeof(unsigned) * N * C) + aligned(sizeof(int64_t) * N * C);
}

void argmax_relabel_cuda(const View &x, const View &labels, const View &compact,
                         const View &counts, const View &k, void *scratch, size_t scratch_bytes,
                         uintptr_t stream_handle) {
    StreamScope scope(x.device_id);
    cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
    const int64_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3];
    const int64_t total = N * H * W;
    Scratch mem(scratch, scratch_bytes);
    unsigned *hist = mem.take<unsigned>(N * C);
    int64_t *map = mem.take<int64_t>(N * C);
    check(cudaMemsetAsync(hist, 0, sizeof(*hist) * N * C, stream), "cudaMemsetAsync");
    const int64_t per_image = (H * W + kPixelsPerBlock - 1) / kPixelsPerBlock;
    const unsigned blocks = static_cast<unsigned>(N * per_image);
    const bool shared = C <= kSharedBins;
    const size_t shmem = shared ? sizeof(unsigned) * C : 0;
    auto launch = [&](auto t) {
        using T = decltype(t);
        auto kernel = shared ? argmax_kernel<T, true> : argmax_kernel<T, false>;
        kernel<<<blocks, kThreads, shmem, stream>>>(x.ptr<T>(), C, H, W, x.strides[0], x.strides[1],
                                                     x.strides[2], x.strides[3], per_image,
                                                     labels.ptr<int64_t>(), hist);
    };
    if (x.dtype == DType::F32)
        launch(float{});
    else
        launch(double{});
    check(cudaGetLastError(), "argmax_kernel");
    compact_map_kernel<<<static_cast<unsigned>(N), 32, 0, stream>>>(C, hist, map, counts.ptr<int64_t>(),
                                                                    k.ptr<int64_t>());
    check(cudaGetLastError(), "compact_map_kernel");
    apply_map_kernel<<<blocks_for(total), kThreads, 0, stream>>>(total, H * W, C, labels.ptr<int64_t>(),
                                                                 map, compact.ptr<int64_t>());
    check(cudaGetLastError(), "apply_map_kernel");
}

size_t connected_components_cuda_scratch(int64_t total, int device) {
    StreamScope scope(device);
    const int n = static_cast<int>(total);
    return 2 * aligned(sizeof(int) * total) + aligned(scan_bytes(n, nullptr));
}

void connected_components_cuda(const View &in, const View &out, int connectivity, void *scratch,
                               size_t scratch_bytes, uintptr_t stream_handle) {
    StreamScope scope(in.device_id);
    cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
    const int N = static_cast<int>(in.shape[0]), H = static_cast<int>(in.shape[1]),
              W = static_cast<int>(in.shape[2]);
    const int total = N * H * W;
    int *parent = out.ptr<int32_t>();
    Scratch mem(scratch, scratch_bytes);
    int *flags = mem.take<int>(total);
    int *ids = mem.take<int>(total);
    size_t tmp_bytes = scan_bytes(total, stream);
    void *tmp = mem.take<char>(tmp_bytes);
    cc_init_kernel<<<blocks_for(total), kThreads, 0, stream>>>(total, parent);
    auto launch = [&](auto t) {
        using T = decltype(t);
        if (connectivity == 8)
            cc_union_kernel<T, true><<<blocks_for(total), kThreads, 0, stream>>>(in.ptr<T>(), total, H, W, parent);
        else
            cc_union_kernel<T, false><<<blocks_for(total), kThreads, 0, stream>>>(in.ptr<T>(), total, H, W, parent);
    };
    if (in.dtype == DType::I32)
        launch(int32_t{});
    else
        launch(int64_t{});
    check(cudaGetLastError(), "cc_union_kernel");
    cc_flatten_kernel<<<blocks_for(total), kThreads, 0, stream>>>(total, parent, flags);
    check(cudaGetLastError(), "cc_flatten_kernel");
    check(cub::DeviceScan::ExclusiveSum(tmp, tmp_bytes, flags, ids, total, stream), "cub scan");
    cc_number_kernel<<<blocks_for(total), kThreads, 0, stream>>>(total, H * W, ids, parent);
    check(cudaGetLastError(), "cc_number_kernel");
}

}  // namespace dg
