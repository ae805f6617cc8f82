// CUDA label-map kernels (see labels_cuda.h).
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
