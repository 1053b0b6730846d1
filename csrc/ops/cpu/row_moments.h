// Softmax moments of one row, shared by the CPU kernels of the entropy and scoring families.
#pragma once

#include <cstdint>

#include "ops/entropy.h"

#if defined(__GNUC__)
#define LK_CPU_INLINE inline __attribute__((always_inline))
#else
#define LK_CPU_INLINE inline
#endif

namespace labelkit::cpu {

// s = sum exp(x - m), t = sum exp(x - m) (x - m) through ops/entropy.h's term (masked classes add
// nothing); with kStore also writes exp(x - m) to e_out. Always inlined, so that it vectorises
// in each caller's ISA clone.
template <typename T, bool kStore>
LK_CPU_INLINE void row_moments(const T* x, int64_t C, T m, T* e_out, T& s_out, T& t_out) {
  T s = T(0);
  T t = T(0);
#pragma omp simd reduction(+ : s, t)
  for (int64_t j = 0; j < C; ++j) {
    T e, ed;
    entropy::term(x[j], m, e, ed);
    s += e;
    t += ed;
    if constexpr (kStore) e_out[j] = e;
  }
  s_out = s;
  t_out = t;
}

}  // namespace labelkit::cpu
