// CPU label-map kernels (see labels.h for the contracts).
#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "labels.h"

namespace dg {
namespace {

// ---------------------------------------------------------------- relabel_sequential
template <typename T, typename O>
int64_t relabel_impl(const T *in, O *out, int64_t n) {
    if (n == 0) return 0;
    T mn = in[0], mx = in[0];
    const int nt = threads_for(n, int64_t(1) << 20);
#pragma omp parallel for num_threads(nt) reduction(min : mn) reduction(max : mx) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        mn = in[i] < mn ? in[i] : mn;
        mx = in[i] > mx ? in[i] : mx;
    }
    // Two's complement difference: exact for every integer type, including int64 extremes.
    const uint64_t umn = static_cast<uint64_t>(mn);
    const uint64_t span = static_cast<uint64_t>(mx) - umn;
    if (span < static_cast<uint64_t>(2 * n + 65536)) {  // dense lookup table
        std::vector<uint8_t> present(span + 1, 0);
        for (int64_t i = 0; i < n; ++i) present[static_cast<uint64_t>(in[i]) - umn] = 1;
        std::vector<O> table(span + 1);
        O next = 0;
        for (uint64_t v = 0; v <= span; ++v) {
            table[v] = next;
            next += present[v];
        }
        const O *tb = table.data();
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t i = 0; i < n; ++i) out[i] = tb[static_cast<uint64_t>(in[i]) - umn];
        return static_cast<int64_t>(next);
    }
    std::vector<T> uniq(in, in + n);  // sparse values: sort + binary search
    std::sort(uniq.begin(), uniq.end());
    uniq.erase(std::unique(uniq.begin(), uniq.end()), uniq.end());
    const T *ub = uniq.data();
    const T *ue = ub + uniq.size();
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<O>(std::lower_bound(ub, ue, in[i]) - ub);
    return static_cast<int64_t>(uniq.size());
}

// --------------------------------------------------------------- connected components
// Union-find over raster indices where a set's root is always its smallest index: a
// union links the larger root under the smaller one. Roots therefore are the first
// pixel (in raster order) of each component, which makes the final numbering one
// sequential pass.
template <typename I>
inline I find_root(I *parent, I p) {
    while (parent[p] != p) {
        const I q = parent[parent[p]];  // path halving
        parent[p] = q;
        p = q;
    }
    return p;
}

template <typename I>
inline void unite(I *parent, I a, I b) {
    a = find_root(parent, a);
    b = find_root(parent, b);
    if (a < b)
        parent[b] = a;
    else if (b < a)
        parent[a] = b;
}

// Unite pixel (i, j) with its already-visited neighbours of equal value. `top` is the
// first row whose pixels may be touched (the strip's first row, or 0 when merging).
template <typename T, typename I, bool EIGHT>
inline void link_pixel(const T *lab, I *parent, int64_t i, int64_t j, int64_t W, int64_t top,
                       bool with_left) {
    const I p = static_cast<I>(i * W + j);
    const T v = lab[p];
    if (with_left && j > 0 && lab[p - 1] == v) unite<I>(parent, p, p - 1);
    if (i > top) {
        const I u = static_cast<I>(p - W);
        if (lab[u] == v) unite<I>(parent, p, u);
        if (EIGHT) {
            if (j > 0 && lab[u - 1] == v) unite<I>(parent, p, u - 1);
            if (j + 1 < W && lab[u + 1] == v) unite<I>(parent, p, u + 1);
        }
    }
}

// First pass over one strip [r0, r1): each pixel joins the component of its
// already-visited equal neighbours. Neighbours that are already known to be connected
// to each other are skipped (8-connectivity: up (b) touches up-left (a), up-right (c)
// and left (d), so b alone suffices; d touches a), which leaves at most two unions.
template <typename T, typename I, bool EIGHT>
void cc_strip(const T *lab, I *parent, int64_t r0, int64_t r1, int64_t W) {
    for (int64_t i = r0; i < r1; ++i) {
        const bool up = i > r0;
        for (int64_t j = 0; j < W; ++j) {
            const I p = static_cast<I>(i * W + j);
            const T v = lab[p];
            const bool has_l = j > 0, has_r = j + 1 < W;
            const bool d = has_l && lab[p - 1] == v;
            if (!up) {
                parent[p] = d ? p - 1 : p;
                continue;
            }
            const I u = static_cast<I>(p - W);
            const bool b = lab[u] == v;
            if (EIGHT) {
                if (b) {
                    parent[p] = u;
                    continue;
                }
                const bool c = has_r && lab[u + 1] == v;
                if (d) {
                    parent[p] = p - 1;
                    if (c) unite<I>(parent, p, u + 1);
                } else if (has_l && lab[u - 1] == v) {
                    parent[p] = u - 1;
                    if (c) unite<I>(parent, p, u + 1);
                } else {
                    parent[p] = c ? u + 1 : p;
                }
            } else {
                if (b) {
                    parent[p] = u;
                    if (d) unite<I>(parent, p, p - 1);
                } else {
                    parent[p] = d ? p - 1 : p;
                }
            }
        }
    }
}

template <typename T, typename I, bool EIGHT>
void cc_image(const T *lab, I *out, int64_t H, int64_t W) {
    const int64_t HW = H * W;
    int nstrips = threads_for(HW);
    if (nstrips > H) nstrips = static_cast<int>(H);
    std::vector<int64_t> start(nstrips + 1);
    for (int s = 0; s <= nstrips; ++s) start[s] = H * s / nstrips;
    I *parent = out;  // the output doubles as the parent array
#pragma omp parallel for num_threads(nstrips) schedule(static, 1)
    for (int s = 0; s < nstrips; ++s) cc_strip<T, I, EIGHT>(lab, parent, start[s], start[s + 1], W);
    // Stitch the strips together along their boundary rows (upward links only).
    for (int s = 1; s < nstrips; ++s) {
        const int64_t i = start[s];
        for (int64_t j = 0; j < W; ++j) link_pixel<T, I, EIGHT>(lab, parent, i, j, W, i - 1, false);
    }
    // Number the roots in raster order. parent[p] < p for every non-root, and the slot
    // of an earlier pixel already holds its component number when p is reached.
    I next = 0;
    for (int64_t p = 0; p < HW; ++p) {
        const I q = parent[p];
        out[p] = (q == static_cast<I>(p)) ? next++ : out[q];
    }
}

template <typename T, typename I>
void cc_impl(const View &in, const View &out, int connectivity) {
    const int64_t N = in.shape[0], H = in.shape[1], W = in.shape[2];
    for (int64_t n = 0; n < N; ++n) {
        const T *lab = in.ptr<T>() + n * H * W;
        I *o = out.ptr<I>() + n * H * W;
        if (connectivity == 8)
            cc_image<T, I, true>(lab, o, H, W);
        else
            cc_image<T, I, false>(lab, o, H, W);
    }
}

}  // namespace

int64_t relabel_sequential_cpu(const View &in, const View &out) {
    int64_t K = 0;
    dispatch_int(in.dtype, [&](auto t) {
        using T = decltype(t);
        if (out.dtype == DType::I32)
            K = relabel_impl<T, int32_t>(in.ptr<T>(), out.ptr<int32_t>(), in.numel());
        else
            K = relabel_impl<T, int64_t>(in.ptr<T>(), out.ptr<int64_t>(), in.numel());
    });
    return K;
}

void connected_components_cpu(const View &in, const View &out, int connectivity) {
    dispatch_int(in.dtype, [&](auto t) {
        using T = decltype(t);
        if (out.dtype == DType::I32)
            cc_impl<T, int32_t>(in, out, connectivity);
        else
            cc_impl<T, int64_t>(in, out, connectivity);
    });
}

}  // namespace dg
