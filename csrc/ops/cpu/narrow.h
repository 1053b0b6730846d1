// float -> storage type conversion for CPU loops that must vectorise.
//
// c10::BFloat16(float) branches on NaN, which keeps GCC from vectorising a conversion loop (it
// was half the time of the bfloat16 entropy backward). narrow<bfloat16> computes the same bits
// (round to nearest even, NaN -> 0x7FC0) with a select instead.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace labelkit::cpu {

inline c10::BFloat16 to_bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}

template <typename out_t, typename in_t>
inline out_t narrow(in_t v) {
  if constexpr (std::is_same_v<out_t, c10::BFloat16> && std::is_same_v<in_t, float>) {
    return to_bfloat16(v);
  } else {
    return static_cast<out_t>(v);
  }
}

}  // namespace labelkit::cpu
