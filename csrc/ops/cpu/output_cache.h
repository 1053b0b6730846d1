// A bounded cache of the large blocks behind our CPU kernels' outputs.
//
// A fresh block over 32 MiB comes from the OS (glibc maps it and unmaps it on free), so every
// call pays page faults and the kernel's zeroing of every page before our kernel writes it: on
// this project's benchmark VM a 108 MiB tile batch took 9.0 ms, 5.6-6.3 ms when its block was
// reused (bench/README.md). Like torch's CUDA caching allocator, freed blocks of 4 MiB or more
// are kept (a request takes the smallest that fits within 2x it, the most recent on ties) up to
// a byte limit — 1 GiB by default, LABELKIT_CPU_CACHE_MB to change, 0 to turn caching off — and
// every block is advised for transparent huge pages when it is first mapped.
// The profiler sees each output as an allocation of its requested size, as with c10's CPU
// allocator.
#pragma once

#include <c10/core/Allocator.h>

#include <cstdint>

namespace labelkit::cpu {

// Requests below this go to c10's CPU allocator (glibc reuses such blocks itself).
constexpr size_t kMinCachedBytes = size_t{4} << 20;

// Blocks are aligned to, and sized in, transparent huge pages.
constexpr size_t kHugePage = size_t{2} << 20;

struct OutputCacheStats {
  int64_t cached_bytes = 0;   // held for reuse, in no tensor
  int64_t cached_blocks = 0;
  int64_t in_use_bytes = 0;   // capacity of the blocks live tensors hold
  int64_t limit_bytes = 0;
  int64_t hits = 0;           // requests served by a cached block
  int64_t misses = 0;         // requests that mapped a new block
};

// The allocator our CPU kernels' large outputs come from (fresh_output.h).
c10::Allocator* output_allocator();

OutputCacheStats output_cache_stats();

// Sets the limit on cached bytes (blocks over it are released at once); returns the old one.
int64_t set_output_cache_limit(int64_t bytes);

// Releases every cached block to the OS; returns the bytes released.
int64_t empty_output_cache();

}  // namespace labelkit::cpu
