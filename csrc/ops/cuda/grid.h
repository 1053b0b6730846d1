// Grid sizes for grid-stride kernels: enough blocks to fill the device (32 per SM), no more,
// so a large input loops instead of launching millions of blocks. Under the CUDA emulator
// (csrc/tests/cuemu, CUEMU_SMS=2 by default) grids are small and the loops wrap in tests.
//
// Host code only. Include it after the CUDA runtime and c10/cuda headers: the emulator replaces
// those includes in .cu files alone, so this header names none itself.
#pragma once

#include <algorithm>
#include <cstdint>

namespace labelkit {

// Streaming multiprocessors of the current device, cached per device. (ATen/cuda/CUDAContext.h
// would give this too, but drags in cuBLAS/cuSPARSE headers a bare toolkit may lack.)
inline int sm_count() {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};
  const int dev = c10::cuda::current_device();
  if (dev >= kMaxDevices) return 1;
  if (cache[dev] == 0) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    cache[dev] = sms;
  }
  return cache[dev];
}

// Blocks for `work_items` at `items_per_block` each, at most 32 per SM (at least one).
inline int64_t grid_for(int64_t work_items, int64_t items_per_block) {
  const int64_t needed = (work_items + items_per_block - 1) / items_per_block;
  return std::max<int64_t>(1, std::min<int64_t>(needed, static_cast<int64_t>(sm_count()) * 32));
}

}  // namespace labelkit
