// C++ tests of the CPU kernels' shared helpers (csrc/ops/cpu/*.h) against c10.
#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <limits>

#include "ops/cpu/fresh_output.h"
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

// ---- the CPU output cache (ops/cpu/output_cache.h)

namespace cpu = labelkit::cpu;

constexpr int64_t kMiB = int64_t{1} << 20;

at::Tensor output_of_mib(int64_t mib) {
  return cpu::empty_output({mib * kMiB}, at::TensorOptions().dtype(at::kByte));
}

// Runs `body` with an empty cache and the given limit, restoring the old limit afterwards.
void with_cache_limit(int64_t limit, const std::function<void()>& body) {
  cpu::empty_output_cache();
  const int64_t old = cpu::set_output_cache_limit(limit);
  try {
    body();
  } catch (...) {
    cpu::set_output_cache_limit(old);
    throw;
  }
  cpu::set_output_cache_limit(old);
}

void test_output_cache_reuses_a_freed_block() {
  with_cache_limit(64 * kMiB, [] {
    at::Tensor a = output_of_mib(6);
    void* p = a.data_ptr();
    EXPECT(reinterpret_cast<uintptr_t>(p) % cpu::kHugePage == 0);
    EXPECT(cpu::output_cache_stats().in_use_bytes == 6 * kMiB);
    a.reset();
    cpu::OutputCacheStats s = cpu::output_cache_stats();
    EXPECT(s.cached_blocks == 1 && s.cached_bytes == 6 * kMiB && s.in_use_bytes == 0);
    at::Tensor b = output_of_mib(5);  // rounds up to the same 6 MiB block
    EXPECT(b.data_ptr() == p);
    EXPECT(cpu::output_cache_stats().hits == s.hits + 1);
    EXPECT(cpu::output_cache_stats().cached_blocks == 0);
  });
}

void test_output_cache_leaves_small_outputs_to_c10() {
  with_cache_limit(64 * kMiB, [] {
    const cpu::OutputCacheStats before = cpu::output_cache_stats();
    at::Tensor a = cpu::empty_output({3 * kMiB}, at::TensorOptions().dtype(at::kByte));
    a.reset();
    const cpu::OutputCacheStats after = cpu::output_cache_stats();
    EXPECT(after.misses == before.misses && after.hits == before.hits && after.cached_blocks == 0);
  });
}

void test_output_cache_limit_zero_keeps_nothing() {
  with_cache_limit(0, [] {
    output_of_mib(8).reset();
    EXPECT(cpu::output_cache_stats().cached_bytes == 0);
  });
}

void test_output_cache_evicts_the_oldest_block_first() {
  with_cache_limit(12 * kMiB, [] {
    at::Tensor a = output_of_mib(4), b = output_of_mib(4), c = output_of_mib(4);
    void *pb = b.data_ptr(), *pc = c.data_ptr();
    a.reset();
    b.reset();
    c.reset();
    EXPECT(cpu::output_cache_stats().cached_bytes == 12 * kMiB);
    cpu::set_output_cache_limit(8 * kMiB);  // drops a, the oldest
    EXPECT(cpu::output_cache_stats().cached_blocks == 2);
    at::Tensor x = output_of_mib(4), y = output_of_mib(4);  // most recent first
    EXPECT(x.data_ptr() == pc && y.data_ptr() == pb);
  });
}

void test_output_cache_serves_a_block_at_most_twice_the_request() {
  with_cache_limit(64 * kMiB, [] {
    at::Tensor big = output_of_mib(16);
    void* p = big.data_ptr();
    big.reset();
    const int64_t misses = cpu::output_cache_stats().misses;
    EXPECT(output_of_mib(6).data_ptr() != p);  // 16 > 2 x 6: a new block
    EXPECT(cpu::output_cache_stats().misses == misses + 1);
    EXPECT(output_of_mib(10).data_ptr() == p);
  });
}

void test_output_cache_empties_and_counts_what_it_freed() {
  with_cache_limit(64 * kMiB, [] {
    output_of_mib(4).reset();
    output_of_mib(10).reset();  // 10 > 2 x 4: a second block
    EXPECT(cpu::empty_output_cache() == 14 * kMiB);
    EXPECT(cpu::output_cache_stats().cached_blocks == 0);
  });
}

void test_output_cache_drops_a_block_over_the_limit() {
  with_cache_limit(8 * kMiB, [] {
    output_of_mib(10).reset();
    EXPECT(cpu::output_cache_stats().cached_bytes == 0);
  });
}

void test_empty_output_like_keeps_channels_last_strides() {
  at::Tensor like = at::empty({4, 3, 512, 512}, at::TensorOptions().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor out = cpu::empty_output_like(like);
  EXPECT(out.strides() == like.strides() && out.scalar_type() == like.scalar_type());
  out.fill_(1.0f);  // the whole block is writable
  EXPECT(out.sum().item<double>() == static_cast<double>(out.numel()));
}

}  // namespace

int main() {
  run("bfloat16_matches_c10_on_every_rounding_case", test_bfloat16_matches_c10_on_every_rounding_case);
  run("narrow_is_a_plain_cast_elsewhere", test_narrow_is_a_plain_cast_elsewhere);
  run("output_cache_reuses_a_freed_block", test_output_cache_reuses_a_freed_block);
  run("output_cache_leaves_small_outputs_to_c10", test_output_cache_leaves_small_outputs_to_c10);
  run("output_cache_limit_zero_keeps_nothing", test_output_cache_limit_zero_keeps_nothing);
  run("output_cache_evicts_the_oldest_block_first", test_output_cache_evicts_the_oldest_block_first);
  run("output_cache_serves_a_block_at_most_twice_the_request", test_output_cache_serves_a_block_at_most_twice_the_request);
  run("output_cache_empties_and_counts_what_it_freed", test_output_cache_empties_and_counts_what_it_freed);
  run("output_cache_drops_a_block_over_the_limit", test_output_cache_drops_a_block_over_the_limit);
  run("empty_output_like_keeps_channels_last_strides", test_empty_output_like_keeps_channels_last_strides);
  return lk_test::finish();
}
