// Permutohedral-lattice Gaussian filtering and dense-CRF mean-field inference (see crf.h).
//
// Lattice (Adams, Baek & Davis 2010, section 3): a point f in R^d is scaled so that the
// lattice's [1 2 1] blurs approximate a Gaussian of standard deviation 1, lifted onto the
// hyperplane x . 1 = 0 of R^(d+1), and located in its simplex of the permutohedral lattice
// A*_d: the nearest remainder-0 lattice point and the ranking of the coordinates of the
// difference give the d+1 vertices and the barycentric weights. Filtering is splat
// (scatter each value to its vertices with those weights), blur (along each of the d+1
// lattice directions, 1/2, 1, 1/2 with the two neighbours) and slice (gather back with
// the same weights). Lattice points live in an open-addressing hash table keyed by their
// first d coordinates (the last is minus their sum).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common.h"
#include "crf.h"

namespace dg {
namespace {

constexpr int kMaxDim = 16;

// Open-addressing table from d-int keys to dense indices 0..size-1. Each slot keeps the
// key's 32-bit hash next to its index, so that a probe compares keys only on a hash match.
class KeyTable {
   public:
    KeyTable(int d, int64_t expected) : d_(d) {
        int64_t cap = 1024;
        while (cap < 2 * expected) cap <<= 1;
        slots_.assign(static_cast<size_t>(cap), Slot{0, -1});
        mask_ = cap - 1;
        keys_.reserve(static_cast<size_t>(expected * d));
    }
    int64_t size() const { return static_cast<int64_t>(keys_.size()) / d_; }
    const int32_t *key(int64_t i) const { return keys_.data() + i * d_; }

    // Index of `k`; inserted when absent and `insert`, else -1.
    int64_t find(const int32_t *k, bool insert) {
        uint32_t h = 2166136261u;
        for (int i = 0; i < d_; ++i) h = (h ^ static_cast<uint32_t>(k[i])) * 16777619u;
        h ^= h >> 15;
        int64_t s = static_cast<int64_t>(h) & mask_;
        while (true) {
            const Slot &slot = slots_[static_cast<size_t>(s)];
            if (slot.index < 0) {
                if (!insert) return -1;
                if (2 * (size() + 1) > mask_ + 1) {
                    grow();
                    return find(k, true);
                }
                const int64_t idx = size();
                keys_.insert(keys_.end(), k, k + d_);
                slots_[static_cast<size_t>(s)] = Slot{h, static_cast<int32_t>(idx)};
                return idx;
            }
            if (slot.hash == h && std::memcmp(key(slot.index), k, sizeof(int32_t) * d_) == 0)
                return slot.index;
            s = (s + 1) & mask_;
        }
    }

   private:
    struct Slot {
        uint32_t hash;
        int32_t index;  // -1: empty
    };
    void grow() {
        std::vector<int32_t> keys;
        keys.swap(keys_);
        const int64_t n = static_cast<int64_t>(keys.size()) / d_;
        slots_.assign(slots_.size() * 2, Slot{0, -1});
        mask_ = static_cast<int64_t>(slots_.size()) - 1;
        keys_.reserve(keys.size() * 2);
        for (int64_t i = 0; i < n; ++i) find(keys.data() + i * d_, true);
    }
    int d_;
    int64_t mask_ = 0;
    std::vector<Slot> slots_;
    std::vector<int32_t> keys_;
};

class Lattice {
   public:
    // features: (n, d) rows at stride fstride.
    Lattice(const float *f, int64_t n, int d, int64_t fstride) : n_(n), d_(d) {
        if (d < 1 || d > kMaxDim) fail("permutohedral lattice: feature dimension must be 1..16");
        const int d1 = d + 1;
        vertex_.resize(static_cast<size_t>(n * d1));
        weight_.resize(static_cast<size_t>(n * d1));
        if (n * d1 >= (int64_t(1) << 31)) fail("permutohedral lattice: too many points");
        KeyTable table(d, n);  // grows when needed; images have about n lattice points
        double scale[kMaxDim];
        const double inv_std = std::sqrt(2.0 / 3.0) * d1;
        for (int i = 0; i < d; ++i) scale[i] = inv_std / std::sqrt((i + 1.0) * (i + 2.0));
        double el[kMaxDim + 1], bary[kMaxDim + 2];
        int64_t rem0[kMaxDim + 1];
        int rank[kMaxDim + 1];
        int32_t key[kMaxDim];
        for (int64_t p = 0; p < n; ++p) {
            const float *x = f + p * fstride;
            // lift onto x . 1 = 0: el = E * (scaled x), E's columns orthogonal
            double sm = 0;
            for (int i = d; i >= 1; --i) {
                double cf = x[i - 1] * scale[i - 1];
                el[i] = sm - i * cf;
                sm += cf;
            }
            el[0] = sm;
            // nearest remainder-0 point (coordinates multiples of d+1), then fix its sum
            int64_t sum = 0;
            for (int i = 0; i <= d; ++i) {
                double v = el[i] / d1;
                double up = std::ceil(v) * d1, down = std::floor(v) * d1;
                rem0[i] = static_cast<int64_t>(up - el[i] < el[i] - down ? up : down);
                sum += rem0[i] / d1;
            }
            for (int i = 0; i <= d; ++i) rank[i] = 0;
            for (int i = 0; i < d; ++i)
                for (int j = i + 1; j <= d; ++j) {
                    if (el[i] - rem0[i] < el[j] - rem0[j]) ++rank[i];
                    else ++rank[j];
                }
            for (int i = 0; i <= d; ++i) {
                if (sum > 0 && rank[i] >= d1 - sum) {
                    rem0[i] -= d1;
                    rank[i] += static_cast<int>(sum) - d1;
                } else if (sum < 0 && rank[i] < -sum) {
                    rem0[i] += d1;
                    rank[i] += d1 + static_cast<int>(sum);
                } else {
                    rank[i] += static_cast<int>(sum);
                }
            }
            // barycentric coordinates in the simplex
            for (int i = 0; i <= d + 1; ++i) bary[i] = 0;
            for (int i = 0; i <= d; ++i) {
                double v = (el[i] - rem0[i]) / d1;
                bary[d - rank[i]] += v;
                bary[d + 1 - rank[i]] -= v;
            }
            bary[0] += 1.0 + bary[d + 1];
            // the d+1 vertices: remainder-r points
            for (int r = 0; r <= d; ++r) {
                for (int i = 0; i < d; ++i)
                    key[i] = static_cast<int32_t>(rem0[i] + (rank[i] <= d - r ? r : r - d1));
                vertex_[static_cast<size_t>(p * d1 + r)] = table.find(key, true);
                weight_[static_cast<size_t>(p * d1 + r)] = static_cast<float>(bary[r]);
            }
        }
        m_ = table.size();
        // neighbours along each direction j: key - 1 + (d+1) e_j and key + 1 - (d+1) e_j
        neighbour_.resize(static_cast<size_t>(m_ * d1 * 2));
        int32_t k1[kMaxDim], k2[kMaxDim];
        for (int64_t v = 0; v < m_; ++v) {
            const int32_t *kv = table.key(v);
            for (int j = 0; j <= d; ++j) {
                for (int i = 0; i < d; ++i) {
                    k1[i] = kv[i] - 1;
                    k2[i] = kv[i] + 1;
                }
                if (j < d) {
                    k1[j] += d1;
                    k2[j] -= d1;
                }
                neighbour_[static_cast<size_t>((j * m_ + v) * 2)] = table.find(k1, false);
                neighbour_[static_cast<size_t>((j * m_ + v) * 2 + 1)] = table.find(k2, false);
            }
        }
    }

    int64_t size() const { return m_; }

    // out (n, vd) = slice(blur(splat(in))).
    void filter(const float *in, int vd, float *out) const {
        const int d1 = d_ + 1;
        std::vector<float> a(static_cast<size_t>(m_ * vd), 0.0f), b(a.size());
        for (int64_t p = 0; p < n_; ++p)
            for (int r = 0; r < d1; ++r) {
                float wgt = weight_[static_cast<size_t>(p * d1 + r)];
                float *dst = a.data() + vertex_[static_cast<size_t>(p * d1 + r)] * vd;
                const float *src = in + p * vd;
                for (int c = 0; c < vd; ++c) dst[c] += wgt * src[c];
            }
        for (int j = 0; j < d1; ++j) {
            const int64_t *nb = neighbour_.data() + static_cast<size_t>(j * m_ * 2);
#pragma omp parallel for schedule(static) num_threads(threads_for(m_ * vd))
            for (int64_t v = 0; v < m_; ++v) {
                const float *self = a.data() + v * vd;
                const int64_t i1 = nb[2 * v], i2 = nb[2 * v + 1];
                float *dst = b.data() + v * vd;
                for (int c = 0; c < vd; ++c) {
                    float s = self[c];
                    if (i1 >= 0) s += 0.5f * a[static_cast<size_t>(i1 * vd + c)];
                    if (i2 >= 0) s += 0.5f * a[static_cast<size_t>(i2 * vd + c)];
                    dst[c] = s;
                }
            }
            a.swap(b);
        }
#pragma omp parallel for schedule(static) num_threads(threads_for(n_ * vd * d1))
        for (int64_t p = 0; p < n_; ++p) {
            float *dst = out + p * vd;
            for (int c = 0; c < vd; ++c) dst[c] = 0.0f;
            for (int r = 0; r < d1; ++r) {
                float wgt = weight_[static_cast<size_t>(p * d1 + r)];
                const float *src = a.data() + vertex_[static_cast<size_t>(p * d1 + r)] * vd;
                for (int c = 0; c < vd; ++c) dst[c] += wgt * src[c];
            }
        }
    }

   private:
    int64_t n_;
    int d_;
    int64_t m_ = 0;
    std::vector<int64_t> vertex_;     // (n, d+1) lattice point of each simplex vertex
    std::vector<float> weight_;       // (n, d+1) barycentric weights
    std::vector<int64_t> neighbour_;  // (d+1, m, 2) blur neighbours, -1 when absent
};

// A normalised kernel: message(Q) = D^-1/2 L D^-1/2 Q with D = L 1.
struct NormalisedKernel {
    Lattice lattice;
    std::vector<float> norm;  // D^-1/2 per point

    NormalisedKernel(const float *f, int64_t n, int d) : lattice(f, n, d, d), norm(n) {
        std::vector<float> ones(static_cast<size_t>(n), 1.0f);
        lattice.filter(ones.data(), 1, norm.data());
        for (auto &v : norm) v = 1.0f / std::sqrt(v + 1e-20f);
    }
    void apply(const float *q, int k, std::vector<float> &tmp, float *out) const {
        const int64_t n = static_cast<int64_t>(norm.size());
        for (int64_t p = 0; p < n; ++p)
            for (int c = 0; c < k; ++c) tmp[p * k + c] = q[p * k + c] * norm[p];
        lattice.filter(tmp.data(), k, out);
        for (int64_t p = 0; p < n; ++p)
            for (int c = 0; c < k; ++c) out[p * k + c] *= norm[p];
    }
};

void softmax_rows(const float *e, int64_t n, int k, float *q) {
    for (int64_t p = 0; p < n; ++p) {
        const float *x = e + p * k;
        float *y = q + p * k;
        float m = x[0];
        for (int c = 1; c < k; ++c) m = std::max(m, x[c]);
        float s = 0;
        for (int c = 0; c < k; ++c) s += (y[c] = std::exp(x[c] - m));
        for (int c = 0; c < k; ++c) y[c] /= s;
    }
}

}  // namespace

int64_t permutohedral_filter_cpu(const float *features, int64_t n, int d, int64_t fstride,
                                 const float *values, int vd, float *out) {
    Lattice lat(features, n, d, fstride);
    lat.filter(values, vd, out);
    return lat.size();
}

void dense_crf_cpu(const uint8_t *image, int64_t h, int64_t w, const float *energy, int k,
                   const CrfParams &p, float *q) {
    const int64_t n = h * w;
    std::vector<float> fg(static_cast<size_t>(n * 2)), fb(static_cast<size_t>(n * 5));
    for (int64_t y = 0; y < h; ++y)
        for (int64_t x = 0; x < w; ++x) {
            const int64_t i = y * w + x;
            const uint8_t *rgb = image + i * 3;
            fg[i * 2] = x / p.gaussian_sxy;
            fg[i * 2 + 1] = y / p.gaussian_sxy;
            fb[i * 5] = x / p.bilateral_sxy;
            fb[i * 5 + 1] = y / p.bilateral_sxy;
            for (int c = 0; c < 3; ++c) fb[i * 5 + 2 + c] = rgb[c] / p.bilateral_srgb;
        }
    NormalisedKernel gauss(fg.data(), n, 2), bilat(fb.data(), n, 5);
    std::vector<float> u(static_cast<size_t>(n * k)), cur(u.size()), tmp(u.size()),
        mg(u.size()), mb(u.size());
    for (int c = 0; c < k; ++c)
        for (int64_t i = 0; i < n; ++i) u[i * k + c] = -energy[c * n + i];
    softmax_rows(u.data(), n, k, cur.data());
    for (int it = 0; it < p.iterations; ++it) {
        gauss.apply(cur.data(), k, tmp, mg.data());
        bilat.apply(cur.data(), k, tmp, mb.data());
        for (size_t i = 0; i < u.size(); ++i)
            tmp[i] = u[i] + p.gaussian_weight * mg[i] + p.bilateral_weight * mb[i];
        softmax_rows(tmp.data(), n, k, cur.data());
    }
    for (int c = 0; c < k; ++c)
        for (int64_t i = 0; i < n; ++i) q[c * n + i] = cur[i * k + c];
}

}  // namespace dg
