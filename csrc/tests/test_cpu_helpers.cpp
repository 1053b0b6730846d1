// C++ tests of the CPU kernels' shared helpers (csrc/ops/cpu/*.h) against c10.
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <limits>

#include "ops/cpu/narrow.h"
#include "tests/harness.h"

namespace {

using lk_test::run;

uint16_t bits_of(c10::BFloat16 b) {
  return b.x;
}

float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

void test_bfloat16_matches_c10_on_every_rounding_case() {
  // Every sign/exponent/upper mantissa, with the low half at the rounding boundaries (ties to
  // even both ways, just below and above a tie, zero, all ones): infinities, NaNs, subnormals.
  const uint32_t lows[] = {0x0000u, 0x0001u, 0x7FFFu, 0x8000u, 0x8001u, 0xFFFFu};
  for (uint32_t hi = 0; hi <= 0xFFFFu; ++hi) {
    for (uint32_t lo : lows) {
      const float f = float_of((hi << 16) | lo);
      EXPECT(bits_of(labelkit::cpu::to_bfloat16(f)) == bits_of(c10::BFloat16(f)));
    }
  }
}

void test_narrow_is_a_plain_cast_elsewhere() {
  EXPECT(labelkit::cpu::narrow<double>(1.5f) == 1.5);
  EXPECT(labelkit::cpu::narrow<float>(0.25) == 0.25f);
  EXPECT(bits_of(labelkit::cpu::narrow<c10::BFloat16>(std::numeric_limits<float>::quiet_NaN())) == 0x7FC0u);
}

}  // namespace

int main() {
  run("bfloat16_matches_c10_on_every_rounding_case", test_bfloat16_matches_c10_on_every_rounding_case);
  run("narrow_is_a_plain_cast_elsewhere", test_narrow_is_a_plain_cast_elsewhere);
  return lk_test::finish();
}
