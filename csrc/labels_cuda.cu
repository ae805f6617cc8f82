// CUDA label-map kernels (see labels_cuda.h).
//
// argmax + relabel: one thread per pixel computes the channel argmax and adds it to a
// per-image histogram with atomics; one block per image turns the histogram into the
// compact map (rank among present channels), counts and K; a last pass maps labels.
//
// connected components: union-find over global pixel indices with lock-free unions
// that always link the larger root below the smaller one (Playne & Hawick, 2018), so
// each root is the first pixel of its component in raster order; an exclusive scan of
// the root flags numbers the components in that order.
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

inline unsigned blocks_for(int64_t n) {
    return static_cast<unsigned>((n + kThreads - 1) / kThreads);
}

// ------------------------------------------------------------------ argmax + relabel
template <typename T>
__global__ void argmax_kernel(const T *__restrict__ x, int64_t N, int64_t C, int64_t H, int64_t W,
                              int64_t sn, int64_t sc, int64_t sh, int64_t sw,
                              int64_t *__restrict__ labels, unsigned long long *__restrict__ hist) {
    const int64_t HW = H * W;
    const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (p >= N * HW) return;
    const int64_t n = p / HW, r = p % HW, i = r / W, j = r % W;
    const T *px = x + n * sn + i * sh + j * sw;
    T best = px[0];
    int64_t bi = 0;
    for (int64_t c = 1; c < C; ++c) {
        const T v = px[c * sc];
        if (v > best) {
            best = v;
            bi = c;
        }
    }
    labels[p] = bi;
    atomicAdd(hist + n * C + bi, 1ULL);
}

__global__ void compact_map_kernel(int64_t C, const unsigned long long *__restrict__ hist,
                                   int64_t *__restrict__ map, int64_t *__restrict__ counts,
                                   int64_t *__restrict__ k) {
    const int64_t n = blockIdx.x;
    if (threadIdx.x != 0) return;  // C is small (the response's channels): one thread per image
    const unsigned long long *h = hist + n * C;
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
__device__ __forceinline__ int find_root(const int *parent, int p) {
    int q = __ldcg(parent + p);
    while (q != p) {
        p = q;
        q = __ldcg(parent + p);
    }
    return p;
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

}  // namespace

int cuda_device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky-free error so later calls are not confused
        return 0;
    }
    return n;
}

void argmax_relabel_cuda(const View &x, const View &labels, const View &compact,
                         const View &counts, const View &k, uintptr_t stream_handle) {
    StreamScope scope(x.device_id);
    cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
    const int64_t N = x.shape[0], C = x.shape[1], H = x.shape[2], W = x.shape[3];
    const int64_t total = N * H * W;
    unsigned long long *hist = nullptr;
    int64_t *map = nullptr;
    check(cudaMallocAsync(reinterpret_cast<void **>(&hist), sizeof(*hist) * N * C, stream), "cudaMallocAsync");
    check(cudaMallocAsync(reinterpret_cast<void **>(&map), sizeof(*map) * N * C, stream), "cudaMallocAsync");
    check(cudaMemsetAsync(hist, 0, sizeof(*hist) * N * C, stream), "cudaMemsetAsync");
    auto launch = [&](auto t) {
        using T = decltype(t);
        argmax_kernel<T><<<blocks_for(total), kThreads, 0, stream>>>(
            x.ptr<T>(), N, C, H, W, x.strides[0], x.strides[1], x.strides[2], x.strides[3],
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
    check(cudaFreeAsync(hist, stream), "cudaFreeAsync");
    check(cudaFreeAsync(map, stream), "cudaFreeAsync");
}

void connected_components_cuda(const View &in, const View &out, int connectivity,
                               uintptr_t stream_handle) {
    StreamScope scope(in.device_id);
    cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
    const int N = static_cast<int>(in.shape[0]), H = static_cast<int>(in.shape[1]),
              W = static_cast<int>(in.shape[2]);
    const int total = N * H * W;
    int *parent = out.ptr<int32_t>();
    int *flags = nullptr, *ids = nullptr;
    void *tmp = nullptr;
    size_t tmp_bytes = 0;
    check(cub::DeviceScan::ExclusiveSum(nullptr, tmp_bytes, flags, ids, total, stream), "cub scan size");
    check(cudaMallocAsync(reinterpret_cast<void **>(&flags), sizeof(int) * total, stream), "cudaMallocAsync");
    check(cudaMallocAsync(reinterpret_cast<void **>(&ids), sizeof(int) * total, stream), "cudaMallocAsync");
    check(cudaMallocAsync(&tmp, tmp_bytes, stream), "cudaMallocAsync");
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
    check(cudaFreeAsync(tmp, stream), "cudaFreeAsync");
    check(cudaFreeAsync(ids, stream), "cudaFreeAsync");
    check(cudaFreeAsync(flags, stream), "cudaFreeAsync");
}

}  // namespace dg
