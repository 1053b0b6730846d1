// Row helpers shared by the CPU kernels of the entropy and scoring families: lane-array row
// reductions, the softmax moments of one row, and half-type rows widened in blocks.
#pragma once

#include <cstdint>
#include <type_traits>

#include "ops/cpu/clones.h"
#include "ops/entropy.h"

namespace labelkit::cpu {

// Row reductions run on lane arrays: the row in chunks of kLanes elements, each lane its own
// partial result, then a fixed pairwise tree. (GCC turns an `omp simd reduction` into lanes
// spilled to the stack and added one by one, a chain that at C = 100 cost as much as the
// row's exps.) A row's last, partial chunk is padded with -inf, which adds nothing to any of
// these reductions.
constexpr int64_t kLanes = 16;

template <typename T>
LK_CLONE_BODY T tree_sum(T* a) {
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    for (int64_t l = 0; l < w; ++l) a[l] += a[l + w];
  }
  return a[0];
}

// The row's elements [j, C) (fewer than kLanes) as one chunk padded with -inf: when the row
// has a whole chunk, its last kLanes elements with those before j masked (one vector load and
// a blend), else element by element.
template <typename T>
LK_CLONE_BODY void tail_chunk(const T* x, int64_t j, int64_t C, T* chunk) {
  if (C >= kLanes) {
    const T* last = x + C - kLanes;
    const int64_t skip = kLanes - (C - j);
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) chunk[l] = l >= skip ? last[l] : entropy::neg_inf<T>();
    return;
  }
  for (int64_t l = 0; l < kLanes; ++l) chunk[l] = j + l < C ? x[j + l] : entropy::neg_inf<T>();
}

// Max (NaN dropped) and whether the row holds a NaN.
template <typename T>
LK_CLONE_BODY void max_chunk(const T* x, T* m, int32_t* nan) {
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) {
    const T v = x[l];
    m[l] = v > m[l] ? v : m[l];
    nan[l] |= static_cast<int32_t>(v != v);
  }
}

template <typename T>
LK_CLONE_BODY T row_max(const T* x, int64_t C, bool& has_nan) {
  T m[kLanes];
  int32_t nan[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) {
    m[l] = entropy::neg_inf<T>();
    nan[l] = 0;
  }
  int64_t j = 0;
  for (; j + kLanes <= C; j += kLanes) max_chunk(x + j, m, nan);
  if (j < C) {
    T chunk[kLanes];
    tail_chunk(x, j, C, chunk);
    max_chunk(chunk, m, nan);
  }
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    for (int64_t l = 0; l < w; ++l) {
      m[l] = m[l + w] > m[l] ? m[l + w] : m[l];
      nan[l] |= nan[l + w];
    }
  }
  has_nan = nan[0] != 0;
  return m[0];
}

// Rows converted from float16/bfloat16 per call: a block of about kConvertBlock logits (two
// float scratch blocks stay in L1), so that the conversions are flat vector loops rather than
// one short loop per row (per-row conversion made C = 100 bfloat16 2.5x slower than float32 in
// the entropy backward, 1.5x in its forward).
constexpr int64_t kConvertBlock = 2048;

inline int64_t rows_per_convert(int64_t C) {
  return C >= kConvertBlock ? 1 : kConvertBlock / C;
}

// len values in the accumulation type: the values themselves, or converted into buf.
template <typename scalar_t, typename acc_t>
LK_CLONE_BODY const acc_t* acc_rows(const scalar_t* x, int64_t len, acc_t* buf) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return x;
  } else {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) buf[k] = static_cast<acc_t>(x[k]);
    return buf;
  }
}

template <typename T, bool kStore>
LK_CLONE_BODY void moments_chunk(const T* x, T m, T* e_out, T* s, T* t) {
#pragma omp simd
  for (int64_t l = 0; l < kLanes; ++l) {
    T e, ed;
    entropy::term(x[l], m, e, ed);
    s[l] += e;
    t[l] += ed;
    if constexpr (kStore) e_out[l] = e;
  }
}

// s = sum exp(x - m), t = sum exp(x - m) (x - m) through ops/entropy.h's term (masked classes add
// nothing); with kStore also writes exp(x - m) to e_out. Always inlined, so that it vectorises
// in each caller's ISA clone.
template <typename T, bool kStore>
LK_CLONE_BODY void row_moments(const T* x, int64_t C, T m, T* e_out, T& s_out, T& t_out) {
  T s[kLanes] = {};
  T t[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= C; j += kLanes) moments_chunk<T, kStore>(x + j, m, kStore ? e_out + j : nullptr, s, t);
  if (j < C) {
    T chunk[kLanes];
    T e[kLanes];
    tail_chunk(x, j, C, chunk);
    moments_chunk<T, kStore>(chunk, m, e, s, t);
    if constexpr (kStore) {
      const int64_t first = C >= kLanes ? kLanes - (C - j) : 0;  // chunk lane of element j
      for (int64_t l = first; l < kLanes && j + l - first < C; ++l) e_out[j + l - first] = e[l];
    }
  }
  s_out = tree_sum(s);
  t_out = tree_sum(t);
}

}  // namespace labelkit::cpu
