// cuemu: runs our CUDA kernels (csrc/ops/cuda/*.cu) on the CPU, for machines without a GPU.
//
// translate.py rewrites a .cu file into C++ that includes this header instead of the CUDA
// headers: `kernel<<<grid, block, smem, stream>>>(args)` becomes
// `::cuemu::launcher(kernel, grid, block, smem, stream)(args)`, `extern __shared__` arrays become
// the launch's dynamic shared buffer, and the ops register for the CPU dispatch key of the
// `labelkit_cuemu` library (csrc/ is compiled with -Dlabelkit=labelkit_cuemu, so it never clashes
// with the real extension in the same process). The kernels' source is otherwise unchanged.
//
// Execution model (cuemu.cpp): the blocks of a grid run one after another; each thread of a
// block is a fiber that runs until it reaches __syncthreads or a warp collective (__shfl_xor_sync,
// __match_any_sync, __syncwarp), which release only when every thread they name has arrived, as
// on the GPU. Everything the hardware would refuse or leave undefined is a hard error naming the
// kernel: a launch shape outside CUDA's limits, more dynamic shared memory than the 48 KiB a
// kernel gets without opting in, a thread that exits while others wait for it at a barrier, a
// collective whose mask names an exited lane or a lane that never comes, and a failed
// CUDA_KERNEL_ASSERT (raised as "device-side assert triggered"). Dynamic shared memory is filled
// with 0xFF bytes (NaN) before every block, so reads of unwritten slots show. Built with the
// sanitizer flags (`make sanitize`), ASan/UBSan watch every global, shared and local access.
// Threads run in index order, in reverse with CUEMU_ORDER=reverse, or shuffled anew on every pass
// with CUEMU_ORDER=random (seed CUEMU_SEED): a missing barrier or __syncwarp breaks some order.
// A launch's blocks run one after another in the same policy's order, so a block that depends on
// another's writes (a race between blocks) breaks some order too. scripts/fakecuda's
// FAKECUDA_ORDER_CHECK=1 compares every op's outputs across two orders.
// docs/testing.md has the commands.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/Device.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- CUDA keywords -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // one block runs at a time, so a static is that block's shared array
#define __align__(n) alignas(n)

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace cuemu {

// Built-in variables of the running thread.
const uint3& thread_index();
const uint3& block_index();
const uint3& block_dim();
const uint3& grid_dim();

// One launch dimension as written at the call site, before the conversion to unsigned that
// nvcc would apply (a grid of 2^32 blocks must be an error, not a silent wrap).
struct Extent {
  int64_t x, y, z;
  Extent(dim3 d) : x(d.x), y(d.y), z(d.z) {}  // NOLINT: implicit like CUDA's
  template <typename I, typename = std::enable_if_t<std::is_integral_v<I>>>
  Extent(I n) : x(static_cast<int64_t>(n)), y(1), z(1) {}  // NOLINT
};

// Runs body(closure) as every thread of every block of the grid; throws c10::Error for what the
// GPU would refuse or report.
void run_grid(const char* kernel, const Extent& grid, const Extent& block, size_t smem, void (*body)(void*),
              void* closure);

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  const char* name;
  Extent grid, block;
  size_t smem;

  template <typename... A>
  void operator()(A&&... args) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    // The parameters as the kernel receives them: converted once at launch, copied per thread.
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    auto run = [&] { std::apply(kernel, params); };
    run_grid(name, grid, block, smem, [](void* f) { (*static_cast<decltype(run)*>(f))(); }, &run);
  }
};

template <typename... P>
Launch<P...> make_launch(void (*kernel)(P...), const char* name, Extent grid, Extent block, size_t smem = 0,
                         void* /*stream*/ = nullptr) {
  return Launch<P...>{kernel, name, grid, block, smem};
}

// The launch's dynamic shared memory (`extern __shared__`).
unsigned char* dynamic_shared();

// Warp collectives: every lane named in `mask` must arrive; values travel as 8 bytes.
enum class Collective { kShflXor, kMatchAny, kSyncWarp };
uint64_t warp_collective(Collective kind, unsigned mask, uint64_t value, int lane_mask, int width);

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "cuemu: value too wide for a shuffle");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));
  return v;
}

[[noreturn]] void kernel_assert_failed(const char* condition, const char* file, int line);

// Sets the order of threads and blocks (forward | reverse | random) for the next launches;
// returns the previous one. Also the op torch.ops.cuemu.set_thread_order.
std::string set_thread_order(const std::string& order);

}  // namespace cuemu

#define threadIdx (::cuemu::thread_index())
#define blockIdx (::cuemu::block_index())
#define blockDim (::cuemu::block_dim())
#define gridDim (::cuemu::grid_dim())

namespace cuemu {
void block_barrier();
}
inline void __syncthreads() { ::cuemu::block_barrier(); }

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::cuemu::warp_collective(::cuemu::Collective::kSyncWarp, mask, 0, 0, 32);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  return ::cuemu::from_bits<T>(
      ::cuemu::warp_collective(::cuemu::Collective::kShflXor, mask, ::cuemu::to_bits(value), lane_mask, width));
}

template <typename T>
unsigned __match_any_sync(unsigned mask, T value) {
  static_assert(std::is_integral_v<T>, "__match_any_sync takes integer values");
  return static_cast<unsigned>(
      ::cuemu::warp_collective(::cuemu::Collective::kMatchAny, mask, ::cuemu::to_bits(value), 0, 32));
}

inline int __ffs(int x) { return __builtin_ffs(x); }

inline float __int_as_float(int bits) { return ::cuemu::from_bits<float>(static_cast<uint32_t>(bits)); }

#undef CUDA_KERNEL_ASSERT
#define CUDA_KERNEL_ASSERT(cond) \
  do {                           \
    if (!(cond)) ::cuemu::kernel_assert_failed(#cond, __FILE__, __LINE__); \
  } while (0)

// ---- the host API the launchers use -----------------------------------------------------------
using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
// Reports the SM count of CUEMU_SMS (default 2: small grids, so grid-stride loops wrap).
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);

#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "cuemu: ", #expr, " failed")
// Launch errors are raised by the launch itself.
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }  // NOLINT: converts like the real one
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline c10::DeviceIndex current_device() { return 0; }
}  // namespace c10::cuda
