// Blocked transposes for the CPU kernels (pretext's quarter turns, affine's pixel-major
// copies), and planes <-> pixel quads for images of up to four channels. Transposes go in kTile x kTile blocks (a block's reads and writes stay within kTile
// cache lines); float32, 16-bit and uint8 blocks are SSE register transposes.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

#include "ops/cpu/clones.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace labelkit {
namespace cpu {

constexpr int64_t kTile = 8;

// A kTile x kTile block: dst[b * ld_dst + a] = src[a * ld_src + b].
template <typename T>
LK_CLONE_BODY void transpose_tile(const T* src, int64_t ld_src, T* dst, int64_t ld_dst) {
  T tile[kTile][kTile];
  for (int64_t a = 0; a < kTile; ++a)
    for (int64_t b = 0; b < kTile; ++b) tile[a][b] = src[a * ld_src + b];
  for (int64_t b = 0; b < kTile; ++b)
    for (int64_t a = 0; a < kTile; ++a) dst[b * ld_dst + a] = tile[a][b];
}

#if defined(__SSE2__)
// float32 (the common case): 4 x 4 register transposes, SSE being part of every x86-64.
template <>
LK_CLONE_BODY void transpose_tile<float>(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  for (int64_t a = 0; a < kTile; a += 4)
    for (int64_t b = 0; b < kTile; b += 4) {
      const float* s = src + a * ld_src + b;
      __m128 r0 = _mm_loadu_ps(s), r1 = _mm_loadu_ps(s + ld_src), r2 = _mm_loadu_ps(s + 2 * ld_src),
             r3 = _mm_loadu_ps(s + 3 * ld_src);
      _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
      float* d = dst + b * ld_dst + a;
      _mm_storeu_ps(d, r0);
      _mm_storeu_ps(d + ld_dst, r1);
      _mm_storeu_ps(d + 2 * ld_dst, r2);
      _mm_storeu_ps(d + 3 * ld_dst, r3);
    }
}

// 16-bit elements (float16, bfloat16): one 8 x 8 transpose in three rounds of unpacks.
LK_CLONE_BODY void transpose_tile_16bit(const uint16_t* src, int64_t ld_src, uint16_t* dst, int64_t ld_dst) {
  __m128i r[8], t[8], u[8];
  for (int a = 0; a < 8; ++a) r[a] = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + a * ld_src));
  for (int a = 0; a < 8; a += 2) {
    t[a] = _mm_unpacklo_epi16(r[a], r[a + 1]);      // columns 0-3 of rows a, a + 1
    t[a + 1] = _mm_unpackhi_epi16(r[a], r[a + 1]);  // columns 4-7
  }
  for (int h = 0; h < 2; ++h)  // h: columns 0-3 or 4-7
    for (int q = 0; q < 2; ++q) {  // q: rows 0-3 or 4-7
      u[4 * h + 2 * q] = _mm_unpacklo_epi32(t[4 * q + h], t[4 * q + 2 + h]);
      u[4 * h + 2 * q + 1] = _mm_unpackhi_epi32(t[4 * q + h], t[4 * q + 2 + h]);
    }
  for (int h = 0; h < 2; ++h)
    for (int p = 0; p < 2; ++p) {  // u[4h + p] (rows 0-3) and u[4h + 2 + p] (rows 4-7): columns 4h + 2p, + 1
      const int col = 4 * h + 2 * p;
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + col * ld_dst), _mm_unpacklo_epi64(u[4 * h + p], u[4 * h + 2 + p]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + (col + 1) * ld_dst),
                       _mm_unpackhi_epi64(u[4 * h + p], u[4 * h + 2 + p]));
    }
}

template <>
LK_CLONE_BODY void transpose_tile<c10::Half>(const c10::Half* src, int64_t ld_src, c10::Half* dst, int64_t ld_dst) {
  transpose_tile_16bit(reinterpret_cast<const uint16_t*>(src), ld_src, reinterpret_cast<uint16_t*>(dst), ld_dst);
}

template <>
LK_CLONE_BODY void transpose_tile<c10::BFloat16>(const c10::BFloat16* src, int64_t ld_src, c10::BFloat16* dst,
                                                 int64_t ld_dst) {
  transpose_tile_16bit(reinterpret_cast<const uint16_t*>(src), ld_src, reinterpret_cast<uint16_t*>(dst), ld_dst);
}

// uint8: rows as 8-byte halves, then unpacks of 8, 16 and 32 bits; each result holds two columns.
template <>
LK_CLONE_BODY void transpose_tile<uint8_t>(const uint8_t* src, int64_t ld_src, uint8_t* dst, int64_t ld_dst) {
  __m128i r[8], t[4];
  for (int a = 0; a < 8; ++a) r[a] = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + a * ld_src));
  for (int a = 0; a < 8; a += 2) t[a / 2] = _mm_unpacklo_epi8(r[a], r[a + 1]);  // rows a, a + 1 interleaved
  const __m128i lo01 = _mm_unpacklo_epi16(t[0], t[1]), hi01 = _mm_unpackhi_epi16(t[0], t[1]);  // rows 0-3
  const __m128i lo23 = _mm_unpacklo_epi16(t[2], t[3]), hi23 = _mm_unpackhi_epi16(t[2], t[3]);  // rows 4-7
  const __m128i c[4] = {_mm_unpacklo_epi32(lo01, lo23), _mm_unpackhi_epi32(lo01, lo23),
                        _mm_unpacklo_epi32(hi01, hi23), _mm_unpackhi_epi32(hi01, hi23)};
  for (int p = 0; p < 4; ++p) {  // c[p] = columns 2p and 2p + 1, eight bytes each
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + 2 * p * ld_dst), c[p]);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + (2 * p + 1) * ld_dst), _mm_unpackhi_epi64(c[p], c[p]));
  }
}
#endif

// dst[r * ld_dst + c] = src[c * ld_src + r] for r in [r0, r1), every c in [0, S); strides signed.
template <typename T>
void transpose_rows(const T* src, int64_t ld_src, T* dst, int64_t ld_dst, int64_t S, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + kTile <= r1; r += kTile) {
    int64_t c = 0;
    for (; c + kTile <= S; c += kTile) transpose_tile(src + c * ld_src + r, ld_src, dst + r * ld_dst + c, ld_dst);
    for (; c < S; ++c)
      for (int64_t b = 0; b < kTile; ++b) dst[(r + b) * ld_dst + c] = src[c * ld_src + r + b];
  }
  for (; r < r1; ++r)
    for (int64_t c = 0; c < S; ++c) dst[r * ld_dst + c] = src[c * ld_src + r];
}

// Up to four planar rows (C <= 4, row stride ld_src) of n pixels to pixel quads:
// dst[i * 4 + j] = src[j * ld_src + i], lanes j >= C zero.
inline void planes_to_quads(const float* src, int64_t ld_src, int64_t C, int64_t n, float* dst) {
  int64_t i = 0;
#if defined(__SSE2__)
  for (; i + 4 <= n; i += 4) {
    __m128 r[4];
    for (int64_t j = 0; j < 4; ++j) r[j] = j < C ? _mm_loadu_ps(src + j * ld_src + i) : _mm_setzero_ps();
    _MM_TRANSPOSE4_PS(r[0], r[1], r[2], r[3]);
    for (int64_t k = 0; k < 4; ++k) _mm_storeu_ps(dst + (i + k) * 4, r[k]);
  }
#endif
  for (; i < n; ++i)
    for (int64_t j = 0; j < 4; ++j) dst[i * 4 + j] = j < C ? src[j * ld_src + i] : 0.0f;
}

// The inverse, lanes j < C only: dst[j * ld_dst + i] = src[i * 4 + j].
inline void quads_to_planes(const float* src, int64_t C, int64_t n, float* dst, int64_t ld_dst) {
  int64_t i = 0;
#if defined(__SSE2__)
  for (; i + 4 <= n; i += 4) {
    __m128 r[4];
    for (int64_t k = 0; k < 4; ++k) r[k] = _mm_loadu_ps(src + (i + k) * 4);
    _MM_TRANSPOSE4_PS(r[0], r[1], r[2], r[3]);
    for (int64_t j = 0; j < C; ++j) _mm_storeu_ps(dst + j * ld_dst + i, r[j]);
  }
#endif
  for (; i < n; ++i)
    for (int64_t j = 0; j < C; ++j) dst[j * ld_dst + i] = src[i * 4 + j];
}

}  // namespace cpu
}  // namespace labelkit

