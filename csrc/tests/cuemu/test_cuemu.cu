// Tests of the emulator itself (ctest `cuemu`, built with -DLABELKIT_CUDA_EMULATION=ON): what the
// GPU computes it computes, and what the GPU would refuse or leave undefined it reports. Written as
// CUDA and translated like csrc/ops/cuda (translate.py).
#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "tests/harness.h"

namespace {

using lk_test::run;

constexpr unsigned kFull = 0xffffffffu;

// Expects body() to throw c10::Error whose message contains `words`.
template <typename F>
void expect_error(F body, const std::string& words) {
  try {
    body();
  } catch (const c10::Error& e) {
    if (std::string(e.what()).find(words) == std::string::npos) {
      std::fprintf(stderr, "  error without \"%s\": %s\n", words.c_str(), e.what());
      EXPECT(false);
    }
    return;
  }
  std::fprintf(stderr, "  no error; expected \"%s\"\n", words.c_str());
  EXPECT(false);
}

// ---- what it computes ----------------------------------------------------------------------------

// Grid-stride sum of 0..n-1 per block through a shared-memory tree.
__global__ void block_sums(int64_t n, int64_t* out) {
  __shared__ int64_t sm[256];
  int64_t acc = 0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) acc += i;
  sm[threadIdx.x] = acc;
  __syncthreads();
  for (unsigned s = blockDim.x / 2; s > 0; s /= 2) {
    if (threadIdx.x < s) sm[threadIdx.x] += sm[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = sm[0];
}

void test_block_reduction_with_grid_stride() {
  std::vector<int64_t> out(3, -1);
  ::cuemu::make_launch(block_sums, "block_sums", 3, 256)(int64_t(10000), out.data());
  EXPECT(out[0] + out[1] + out[2] == int64_t(10000) * 9999 / 2);
}

__global__ void butterflies(int* full, int* by8, unsigned* matches) {
  const int lane = threadIdx.x % 32;
  int a = lane, b = lane;
  for (int off = 16; off > 0; off /= 2) a += __shfl_xor_sync(kFull, a, off);
  for (int off = 4; off > 0; off /= 2) b += __shfl_xor_sync(kFull, b, off, 8);
  full[threadIdx.x] = a;
  by8[threadIdx.x] = b;
  matches[threadIdx.x] = __match_any_sync(kFull, lane % 3);
}

void test_shuffles_and_match_any() {
  std::vector<int> full(64), by8(64);
  std::vector<unsigned> matches(64);
  ::cuemu::make_launch(butterflies, "butterflies", 1, 64)(full.data(), by8.data(), matches.data());
  for (int t = 0; t < 64; ++t) {
    const int lane = t % 32, seg = lane / 8 * 8;
    EXPECT(full[t] == 496);
    EXPECT(by8[t] == 8 * seg + 28);
    unsigned want = 0;
    for (int l = 0; l < 32; ++l) want |= (l % 3 == lane % 3 ? 1u : 0u) << l;
    EXPECT(matches[t] == want);
  }
}

// Lane i publishes i and reads lane i+1's slot; without the __syncwarp the read races.
__global__ void neighbour_read(bool with_syncwarp, int* out) {
  extern __shared__ int slots[];
  slots[threadIdx.x] = threadIdx.x;
  if (with_syncwarp) __syncwarp();
  out[threadIdx.x] = slots[(threadIdx.x + 1) % 32];
}

void test_a_missing_syncwarp_reads_unwritten_shared_memory() {
  std::vector<int> out(32);
  ::cuemu::make_launch(neighbour_read, "neighbour_read", 1, 32, 32 * sizeof(int))(true, out.data());
  for (int t = 0; t < 32; ++t) EXPECT(out[t] == (t + 1) % 32);
  ::cuemu::make_launch(neighbour_read, "neighbour_read", 1, 32, 32 * sizeof(int))(false, out.data());
  int wrong = 0;
  for (int t = 0; t < 32; ++t) wrong += out[t] != (t + 1) % 32;
  EXPECT(wrong > 0);  // the slot's 0xFF fill, not the neighbour's value
}

// What FAKECUDA_ORDER_CHECK relies on: a race gives other bits when the threads run in reverse;
// the synchronised kernel gives the same bits in every order.
void test_a_race_depends_on_the_thread_order() {
  auto run_in = [](const char* order, bool with_syncwarp) {
    const std::string previous = ::cuemu::set_thread_order(order);
    std::vector<int> out(32);
    ::cuemu::make_launch(neighbour_read, "neighbour_read", 1, 32, 32 * sizeof(int))(with_syncwarp, out.data());
    ::cuemu::set_thread_order(previous);
    return out;
  };
  EXPECT(run_in("forward", false) != run_in("reverse", false));
  EXPECT(run_in("forward", true) == run_in("reverse", true));
  EXPECT(run_in("random", true) == run_in("reverse", true));
}

// Block b adds one to what block b - 1 wrote: a race between blocks (a GPU runs them in any
// order), which the emulator's block order shows.
__global__ void chain(int* out) {
  if (threadIdx.x == 0) out[blockIdx.x + 1] = out[blockIdx.x] + 1;
}

// Every block of a 3-D grid counts itself once.
__global__ void count_blocks(int* out) {
  if (threadIdx.x == 0) out[(blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x] += 1;
}

void test_blocks_run_in_the_thread_order_policy() {
  auto run_in = [](const char* order, auto launch) {
    const std::string previous = ::cuemu::set_thread_order(order);
    std::vector<int> out(12, 0);
    launch(out.data());
    ::cuemu::set_thread_order(previous);
    return out;
  };
  auto chained = [](int* out) { ::cuemu::make_launch(chain, "chain", 4, 32)(out); };
  EXPECT((run_in("forward", chained) == std::vector<int>{0, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0}));
  EXPECT((run_in("reverse", chained) == std::vector<int>{0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0}));
  auto counted = [](int* out) { ::cuemu::make_launch(count_blocks, "count_blocks", dim3(3, 2, 2), 32)(out); };
  for (const char* order : {"forward", "reverse", "random"}) EXPECT(run_in(order, counted) == std::vector<int>(12, 1));
}

__global__ void bump_param(int v, int* out) {
  v += threadIdx.x;  // each thread owns its copy of the parameters
  out[threadIdx.x] = v;
}

void test_parameters_are_per_thread() {
  std::vector<int> out(4);
  ::cuemu::make_launch(bump_param, "bump_param", 1, 4)(10, out.data());
  for (int t = 0; t < 4; ++t) EXPECT(out[t] == 10 + t);
}

// ---- what it reports -----------------------------------------------------------------------------

__global__ void exit_before_barrier(int* out) {
  if (threadIdx.x >= 16) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shuffle_with_exited_lane(int* out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(kFull, int(threadIdx.x), 1);
}

__global__ void barrier_against_shuffle(int* out) {
  if (threadIdx.x < 16) {
    out[threadIdx.x] = __shfl_xor_sync(kFull, 1, 1);
  } else {
    __syncthreads();
  }
}

__global__ void asserting(int64_t bad_at) {
  CUDA_KERNEL_ASSERT(int64_t(threadIdx.x) != bad_at && "cuemu test: bad index");
}

__global__ void nothing() {}

void test_misuse_is_reported() {
  std::vector<int> out(64);
  expect_error([&] { ::cuemu::make_launch(exit_before_barrier, "exit_before_barrier", 1, 32)(out.data()); },
               "exited while others wait at __syncthreads");
  expect_error([&] { ::cuemu::make_launch(shuffle_with_exited_lane, "shuffle_with_exited_lane", 1, 32)(out.data()); },
               "which has exited");
  expect_error([&] { ::cuemu::make_launch(barrier_against_shuffle, "barrier_against_shuffle", 1, 32)(out.data()); },
               "deadlock");
  expect_error([&] { ::cuemu::make_launch(asserting, "asserting", 2, 64)(int64_t(7)); },
               "device-side assert triggered");
  ::cuemu::make_launch(asserting, "asserting", 2, 64)(int64_t(-1));  // and nothing when it holds
}

void test_launch_limits() {
  expect_error([] { ::cuemu::make_launch(nothing, "nothing", 0, 32)(); }, "invalid configuration argument: grid");
  expect_error([] { ::cuemu::make_launch(nothing, "nothing", int64_t(1) << 32, 32)(); }, "invalid configuration argument: grid");
  expect_error([] { ::cuemu::make_launch(nothing, "nothing", dim3(1, 65536), 32)(); }, "invalid configuration argument: grid");
  expect_error([] { ::cuemu::make_launch(nothing, "nothing", 1, 1025)(); }, "invalid configuration argument: block");
  expect_error([] { ::cuemu::make_launch(nothing, "nothing", 1, 32, 48 * 1024 + 1)(); }, "dynamic shared memory");
  ::cuemu::make_launch(nothing, "nothing", dim3(2, 3), dim3(32, 2), 48 * 1024)();
}

// The rewritten launch syntax itself (what translate.py produces from `<<<...>>>`).
void test_translated_launch_syntax() {
  std::vector<int> out(4);
  bump_param<<<1, 4, 0, c10::cuda::getCurrentCUDAStream()>>>(3, out.data());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  EXPECT(out[3] == 6);
}

}  // namespace

int main() {
  run("block_reduction_with_grid_stride", test_block_reduction_with_grid_stride);
  run("shuffles_and_match_any", test_shuffles_and_match_any);
  run("a_missing_syncwarp_reads_unwritten_shared_memory", test_a_missing_syncwarp_reads_unwritten_shared_memory);
  run("a_race_depends_on_the_thread_order", test_a_race_depends_on_the_thread_order);
  run("blocks_run_in_the_thread_order_policy", test_blocks_run_in_the_thread_order_policy);
  run("parameters_are_per_thread", test_parameters_are_per_thread);
  run("misuse_is_reported", test_misuse_is_reported);
  run("launch_limits", test_launch_limits);
  run("translated_launch_syntax", test_translated_launch_syntax);
  return lk_test::finish();
}
