// Shared helpers of the dynaguide native extension (CPU side).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace dg {

inline int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

inline int thread_id() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// Threads worth using for `work` elements (at least `per_thread` each). A parallel
// region costs microseconds on an idle machine but up to a scheduler time slice per
// barrier on a loaded one (a descheduled worker holds everybody up), so only work of
// a millisecond or more per thread is split.
inline int threads_for(int64_t work, int64_t per_thread = int64_t(1) << 18) {
    int64_t t = work / per_thread;
    int m = max_threads();
    if (t < 1) return 1;
    return t < m ? static_cast<int>(t) : m;
}

[[noreturn]] inline void fail(const std::string &msg) { throw std::invalid_argument(msg); }

}  // namespace dg
