// cuemu runtime: blocks one at a time, each thread a fiber (see cuemu.h).
#include "cuemu.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUEMU_ASAN 1
#else
#define CUEMU_ASAN 0
#endif

// The racecheck build (-DLABELKIT_RACECHECK=ON, scripts/racecheck.sh): the translated kernels are
// compiled with ThreadSanitizer, this runtime is not (its bookkeeping stays invisible to TSan), and
// it tells TSan only what orders the threads of a block on a GPU. Every thread slot is a TSan
// fiber, switched to and from without implying any order, so the emulator's sequential schedule
// hides nothing; __syncthreads orders every thread's accesses before it before every thread's
// after it; __syncwarp does the same for the lanes it names (shuffles and matches exchange
// registers, not memory, in CUDA's memory model). Like compute-sanitizer's racecheck, it checks
// the threads of a block against each other: a block (and the host's work before it, the dynamic
// shared memory fill included) is ordered after the whole previous block, because blocks reuse
// the same static __shared__ arrays here.
#if defined(CUEMU_TSAN)
#include <sanitizer/tsan_interface.h>
#define CUEMU_RACECHECK 1
#else
#define CUEMU_RACECHECK 0
#endif

#if !defined(__x86_64__)
#error "cuemu switches fibers with x86-64 assembly (ucontext's swapcontext makes a syscall per switch and upsets ASan)"
#endif

// cuemu_switch(save, to): saves the callee-saved registers, MXCSR and the x87 control word on the
// current stack, stores the stack pointer in *save, and resumes the stack `to` (System V x86-64).
extern "C" void cuemu_switch(void** save, void* to);
asm(R"(
  .text
  .globl cuemu_switch
  .type cuemu_switch, @function
cuemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cuemu_switch, .-cuemu_switch
)");

namespace cuemu {
namespace {

constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;
constexpr int64_t kMaxGridYZ = 65535;
constexpr int64_t kMaxBlockThreads = 1024;
constexpr int64_t kMaxBlockZ = 64;
constexpr size_t kMaxDynamicShared = 48 * 1024;  // without cudaFuncSetAttribute opt-in
constexpr size_t kStackBytes = 256 * 1024;      // per thread; sanitizer builds need the room
constexpr size_t kStackTopBytes = 16 * 1024;    // holds the frames a finished thread leaves

enum class Wait { kRunnable, kBlockBarrier, kWarp, kDone };

struct Fiber {
  void* sp = nullptr;    // saved stack pointer while switched out
  char* stack = nullptr;  // kStackBytes from the pool
  uint3 tid;
  Wait wait = Wait::kRunnable;
  // Pending warp collective, and its result once released.
  Collective kind = Collective::kSyncWarp;
  unsigned mask = 0;
  uint64_t value = 0;
  int lane_mask = 0;
  int width = 32;
  uint64_t result = 0;
#if CUEMU_ASAN
  void* fake_stack = nullptr;
#endif
#if CUEMU_RACECHECK
  void* tsan = nullptr;     // this slot's TSan fiber (kept from launch to launch)
  uint64_t barriers = 0;    // __syncthreads passed in this block
  uint64_t warp_syncs = 0;  // __syncwarp passed in this block
  uint64_t peers[32] = {};  // at a released __syncwarp: each named lane's warp_syncs
#endif
};

// State of the launch in progress (one at a time: the kernels' static __shared__ arrays are
// shared by every launch of a kernel).
struct Grid {
  const char* kernel = "";
  uint3 grid{}, block{}, block_idx{};
  std::vector<Fiber> fibers;
  void* scheduler_sp = nullptr;
  Fiber* current = nullptr;
  std::unique_ptr<unsigned char[]> smem;
  size_t smem_bytes = 0;
  std::string trap;   // set by a failed CUDA_KERNEL_ASSERT
  std::string error;  // what a thread did that the GPU would not allow
  bool finished = false;
  void (*body)(void*) = nullptr;
  void* closure = nullptr;
#if CUEMU_ASAN
  const void* scheduler_stack = nullptr;
  size_t scheduler_stack_size = 0;
#endif
#if CUEMU_RACECHECK
  void* host_tsan = nullptr;  // the launching thread's TSan context
  // This block's synchronisation objects (addresses TSan keys them by; fresh for every block):
  // [0, 2) the barrier's, by parity of the barrier count; then two per thread for its __syncwarp.
  std::unique_ptr<char[]> sync;
  char block_start = 0;  // the host's work before a block -> its threads
  char block_end = 0;    // a block's threads -> the host's work after it (and so the next block)
#endif
};

std::mutex g_launch_mutex;
Grid* g_grid = nullptr;

[[noreturn]] void fail(const std::string& what) {
  TORCH_CHECK(false, "cuemu: kernel ", g_grid ? g_grid->kernel : "?", ": ", what);
}

int lane_of(const Fiber& f, const Grid& g) {
  const int64_t linear = f.tid.x + int64_t(g.block.x) * (f.tid.y + int64_t(g.block.y) * f.tid.z);
  return static_cast<int>(linear % 32);
}

std::string where(const Grid& g, const Fiber& f) {
  std::ostringstream s;
  s << "block (" << g.block_idx.x << ", " << g.block_idx.y << ", " << g.block_idx.z << ") thread (" << f.tid.x
    << ", " << f.tid.y << ", " << f.tid.z << ")";
  return s.str();
}

// ---- switching between the scheduler and a fiber (with ASan told about the stacks) ------------

void unpoison(char* p, size_t n) {
#if CUEMU_ASAN
  ASAN_UNPOISON_MEMORY_REGION(p, n);
#else
  (void)p;
  (void)n;
#endif
}

// ---- racecheck: what orders threads, told to TSan (no-ops in the other builds) -----------------

#if CUEMU_RACECHECK
constexpr unsigned kNoSync = __tsan_switch_to_fiber_no_sync;

void* barrier_sync(Grid& g, uint64_t count) { return g.sync.get() + (count & 1); }
void* lane_sync(Grid& g, int64_t thread, uint64_t count) { return g.sync.get() + 2 + 2 * thread + (count & 1); }

int64_t linear_index(const Grid& g, const Fiber& f) { return &f - g.fibers.data(); }

// A thread's accesses so far, published at a barrier it arrives at / read from every thread
// after the barrier releases.
void arrive_at_barrier(Grid& g, Fiber& f) { __tsan_release(barrier_sync(g, f.barriers)); }

void leave_barrier(Grid& g, Fiber& f) {
  __tsan_acquire(barrier_sync(g, f.barriers));
  ++f.barriers;
}

// The same for __syncwarp, the one warp collective that orders memory (CUDA's memory model:
// shuffles and matches exchange registers only): each lane publishes under its own count, and
// reads the lanes the collective named under theirs (release_warps records them in `peers`).
void arrive_at_warp_sync(Grid& g, Fiber& f) {
  if (f.kind == Collective::kSyncWarp) __tsan_release(lane_sync(g, linear_index(g, f), f.warp_syncs));
}

void leave_warp_sync(Grid& g, Fiber& f) {
  if (f.kind != Collective::kSyncWarp) return;
  const int64_t w0 = linear_index(g, f) / 32 * 32;
  for (int64_t o = 0; o < 32; ++o) {
    if (f.mask >> o & 1u) __tsan_acquire(lane_sync(g, w0 + o, f.peers[o]));
  }
  ++f.warp_syncs;
}
#else
void arrive_at_barrier(Grid&, Fiber&) {}
void leave_barrier(Grid&, Fiber&) {}
void arrive_at_warp_sync(Grid&, Fiber&) {}
void leave_warp_sync(Grid&, Fiber&) {}
#endif

void enter(Grid& g, Fiber& f) {
  g.current = &f;
#if CUEMU_RACECHECK
  __tsan_switch_to_fiber(f.tsan, kNoSync);
#endif
#if CUEMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
  cuemu_switch(&g.scheduler_sp, f.sp);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  cuemu_switch(&g.scheduler_sp, f.sp);
#endif
  g.current = nullptr;
}

void arrived_in_fiber(Grid& g, Fiber& f) {
#if CUEMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &g.scheduler_stack, &g.scheduler_stack_size);
#else
  (void)g;
  (void)f;
#endif
}

// From the running fiber back to the scheduler; returns when the scheduler resumes it.
void leave(Grid& g, Fiber& f, bool for_good) {
#if CUEMU_RACECHECK
  if (for_good) __tsan_release(&g.block_end);  // the host's work after the block sees this thread's
  __tsan_switch_to_fiber(g.host_tsan, kNoSync);
#endif
#if CUEMU_ASAN
  __sanitizer_start_switch_fiber(for_good ? nullptr : &f.fake_stack, g.scheduler_stack, g.scheduler_stack_size);
#else
  (void)for_good;
#endif
  cuemu_switch(&f.sp, g.scheduler_sp);
  arrived_in_fiber(g, f);
}

[[noreturn]] void fiber_main() {
  Grid& g = *g_grid;
  Fiber& f = *g.current;
  arrived_in_fiber(g, f);
#if CUEMU_RACECHECK
  __tsan_acquire(&g.block_start);  // the host's work before the block
#endif
  try {
    g.body(g.closure);
  } catch (const std::exception& e) {
    g.error = where(g, f) + ": threw " + e.what();
  }
  f.wait = Wait::kDone;
  leave(g, f, /*for_good=*/true);
  std::abort();  // never resumed
}

// A fresh fiber's stack: what cuemu_switch pops (the caller's MXCSR and x87 control word, six
// zero registers), then fiber_main as the return address; it starts with rsp = 8 (mod 16), as
// after a call.
void* initial_stack(char* stack) {
  // A finished thread never returns from fiber_main: its frame's ASan redzones stay behind.
  unpoison(stack + kStackBytes - kStackTopBytes, kStackTopBytes);
  uint32_t mxcsr = 0;
  uint16_t fpucw = 0;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  const auto top = reinterpret_cast<uintptr_t>(stack + kStackBytes) & ~uintptr_t(15);
  auto* words = reinterpret_cast<uint64_t*>(top) - 11;
  words[0] = mxcsr | (uint64_t(fpucw) << 32);
  for (int r = 1; r <= 6; ++r) words[r] = 0;
  words[7] = reinterpret_cast<uint64_t>(&fiber_main);
  words[8] = words[9] = words[10] = 0;  // fiber_main never returns
  return words;
}

Fiber& running();

// A failure found while a thread runs: the thread stops and the launch raises (an exception must
// not unwind through the fiber's stack into the scheduler's).
[[noreturn]] void fail_in_thread(const std::string& what) {
  Grid& g = *g_grid;
  Fiber& f = running();
  g.error = where(g, f) + ": " + what;
  f.wait = Wait::kDone;
  leave(g, f, /*for_good=*/true);
  std::abort();  // never resumed
}

Fiber& running() {
  TORCH_CHECK(g_grid != nullptr && g_grid->current != nullptr, "cuemu: a device function ran outside a kernel");
  return *g_grid->current;
}

// ---- releasing barriers ------------------------------------------------------------------------

// Releases every warp collective whose named lanes have all arrived; true if any was.
bool release_warps(Grid& g) {
  const int64_t n = static_cast<int64_t>(g.fibers.size());
  bool released = false;
  for (int64_t w0 = 0; w0 < n; w0 += 32) {
    const int64_t lanes = std::min<int64_t>(32, n - w0);
    for (int64_t l = 0; l < lanes; ++l) {
      Fiber& f = g.fibers[w0 + l];
      if (f.wait != Wait::kWarp) continue;
      bool ready = true;
      for (int64_t o = 0; o < 32; ++o) {
        if (!(f.mask >> o & 1u)) continue;
        if (o >= lanes) fail(where(g, f) + ": warp collective mask names lane " + std::to_string(o) + " of a partial warp");
        const Fiber& p = g.fibers[w0 + o];
        if (p.wait == Wait::kDone)
          fail(where(g, f) + ": warp collective mask names lane " + std::to_string(o) + ", which has exited");
        if (p.wait != Wait::kWarp) {
          ready = false;
          break;
        }
        if (p.mask != f.mask || p.kind != f.kind)
          fail(where(g, f) + ": lanes of one warp collective disagree on its kind or mask");
      }
      if (!ready) continue;
      for (int64_t o = 0; o < 32; ++o) {
        if (!(f.mask >> o & 1u)) continue;
        Fiber& p = g.fibers[w0 + o];
        if (p.kind == Collective::kShflXor) {
          const int src = static_cast<int>(o) ^ p.lane_mask;
          if (src / p.width != static_cast<int>(o) / p.width) {
            p.result = p.value;  // outside the lane's segment: its own value
          } else if (!(f.mask >> src & 1u)) {
            fail(where(g, p) + ": __shfl_xor_sync reads lane " + std::to_string(src) + ", outside its mask");
          } else {
            p.result = g.fibers[w0 + src].value;
          }
        } else if (p.kind == Collective::kMatchAny) {
          unsigned same = 0;
          for (int64_t q = 0; q < 32; ++q) {
            if ((f.mask >> q & 1u) && g.fibers[w0 + q].value == p.value) same |= 1u << q;
          }
          p.result = same;
        }
      }
#if CUEMU_RACECHECK
      for (int64_t o = 0; o < 32; ++o) {
        if (!(f.mask >> o & 1u)) continue;
        for (int64_t q = 0; q < 32; ++q) {
          if (f.mask >> q & 1u) g.fibers[w0 + o].peers[q] = g.fibers[w0 + q].warp_syncs;
        }
      }
#endif
      for (int64_t o = 0; o < 32; ++o) {
        if (f.mask >> o & 1u) g.fibers[w0 + o].wait = Wait::kRunnable;
      }
      released = true;
    }
  }
  return released;
}

std::string deadlock_report(const Grid& g) {
  std::ostringstream s;
  s << "deadlock in block (" << g.block_idx.x << ", " << g.block_idx.y << ", " << g.block_idx.z << "):";
  int shown = 0;
  for (const Fiber& f : g.fibers) {
    if (shown == 8) break;
    const char* state = f.wait == Wait::kDone ? "exited" : f.wait == Wait::kBlockBarrier ? "at __syncthreads" : "at a warp collective";
    s << " thread " << f.tid.x << "," << f.tid.y << "," << f.tid.z << " " << state << ";";
    ++shown;
  }
  s << " (a barrier some threads skip, or a collective whose mask names a lane that never comes)";
  return s.str();
}

// CUEMU_ORDER: forward (default), reverse, or random (a new shuffle of a launch's blocks and of
// every pass over a block's threads, from CUEMU_SEED, default 0; reproducible run to run).
enum class Order { kForward, kReverse, kRandom };

Order parse_order(const std::string& name, const char* what) {
  if (name == "forward") return Order::kForward;
  if (name == "reverse") return Order::kReverse;
  if (name == "random") return Order::kRandom;
  TORCH_CHECK(false, "cuemu: ", what, " must be forward, reverse or random, got '", name, "'");
}

// CUEMU_ORDER at start-up; cuemu::set_thread_order changes it (under the launch mutex).
Order& thread_order() {
  static Order order = [] {
    const char* v = std::getenv("CUEMU_ORDER");
    return parse_order(v != nullptr ? v : "forward", "CUEMU_ORDER");
  }();
  return order;
}

std::mt19937_64& order_rng() {
  static std::mt19937_64 rng([] {
    const char* v = std::getenv("CUEMU_SEED");
    return v != nullptr ? std::strtoull(v, nullptr, 10) : 0ull;
  }());
  return rng;
}

// The order of this pass over a block's n threads (or of a grid's n blocks).
void pass_order(std::vector<int64_t>& order, int64_t n) {
  order.resize(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t(0));
  const Order o = thread_order();
  if (o == Order::kReverse) std::reverse(order.begin(), order.end());
  if (o == Order::kRandom) std::shuffle(order.begin(), order.end(), order_rng());
}

// racecheck: the block's barrier and __syncwarp objects are new, and no thread has passed any.
void start_block_racecheck(Grid& g) {
#if CUEMU_RACECHECK
  g.sync.reset();  // freed first: TSan drops the previous block's objects with the memory
  g.sync.reset(new char[2 + 2 * g.fibers.size()]);
  for (Fiber& f : g.fibers) {
    f.barriers = f.warp_syncs = 0;
  }
#else
  (void)g;
#endif
}

// Runs one block to completion (or to a trap).
void run_block(Grid& g) {
  start_block_racecheck(g);
  if (g.smem_bytes > 0) std::memset(g.smem.get(), 0xFF, g.smem_bytes);
#if CUEMU_RACECHECK
  __tsan_release(&g.block_start);  // the fill and everything before it come before the threads
#endif
  size_t i = 0;
  for (unsigned z = 0; z < g.block.z; ++z) {
    for (unsigned y = 0; y < g.block.y; ++y) {
      for (unsigned x = 0; x < g.block.x; ++x, ++i) {
        Fiber& f = g.fibers[i];
        f.tid = uint3{x, y, z};
        f.wait = Wait::kRunnable;
        f.sp = initial_stack(f.stack);
      }
    }
  }
  const int64_t n = static_cast<int64_t>(g.fibers.size());
  std::vector<int64_t> order;
  for (;;) {
    pass_order(order, n);
    for (const int64_t k : order) {
      Fiber& f = g.fibers[k];
      if (f.wait != Wait::kRunnable) continue;
      enter(g, f);
      if (!g.trap.empty() || !g.error.empty()) return;
    }
    if (release_warps(g)) continue;
    int64_t done = 0, at_barrier = 0;
    for (const Fiber& f : g.fibers) {
      done += f.wait == Wait::kDone;
      at_barrier += f.wait == Wait::kBlockBarrier;
    }
    if (done == n) return;
    if (at_barrier > 0 && done > 0) {
      fail("block (" + std::to_string(g.block_idx.x) + ", " + std::to_string(g.block_idx.y) +
           "): some threads exited while others wait at __syncthreads");
    }
    if (at_barrier != n) fail(deadlock_report(g));
    for (Fiber& f : g.fibers) f.wait = Wait::kRunnable;
  }
}

void check_shape(const Extent& grid, const Extent& block, size_t smem) {
  auto bad = [](const char* what, const Extent& e) {
    return std::string(what) + " (" + std::to_string(e.x) + ", " + std::to_string(e.y) + ", " + std::to_string(e.z) + ")";
  };
  if (grid.x < 1 || grid.x > kMaxGridX || grid.y < 1 || grid.y > kMaxGridYZ || grid.z < 1 || grid.z > kMaxGridYZ)
    fail("invalid configuration argument: grid " + bad("", grid));
  if (block.x < 1 || block.y < 1 || block.z < 1 || block.z > kMaxBlockZ || block.x * block.y * block.z > kMaxBlockThreads)
    fail("invalid configuration argument: block " + bad("", block));
  if (smem > kMaxDynamicShared)
    fail("too much dynamic shared memory: " + std::to_string(smem) + " bytes (48 KiB without opting in)");
}

}  // namespace

const uint3& thread_index() { return running().tid; }
const uint3& block_index() { return g_grid->block_idx; }
const uint3& block_dim() { return g_grid->block; }
const uint3& grid_dim() { return g_grid->grid; }

unsigned char* dynamic_shared() {
  running();
  return g_grid->smem.get();
}

void run_grid(const char* kernel, const Extent& grid, const Extent& block, size_t smem, void (*body)(void*),
              void* closure) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  Grid g;
  g.kernel = kernel;
  g_grid = &g;
  // A launch that ends early abandons its threads mid-call: clear their stacks' redzones for
  // the next launch, which reuses them.
  struct Reset {
    Grid& g;
    ~Reset() {
      if (!g.finished) {
        for (Fiber& f : g.fibers) unpoison(f.stack, kStackBytes);
      }
      g_grid = nullptr;
    }
  } reset{g};
  check_shape(grid, block, smem);
  g.grid = uint3{unsigned(grid.x), unsigned(grid.y), unsigned(grid.z)};
  g.block = uint3{unsigned(block.x), unsigned(block.y), unsigned(block.z)};
  g.body = body;
  g.closure = closure;
  g.smem_bytes = smem;
  // Exactly the launch's bytes: a read past them hits ASan's redzone.
  g.smem.reset(new unsigned char[smem]);
  g.fibers.resize(static_cast<size_t>(block.x * block.y * block.z));
  static std::vector<std::unique_ptr<char[]>> stacks;  // kept between launches (under the mutex)
  while (stacks.size() < g.fibers.size()) stacks.emplace_back(new char[kStackBytes]);
  for (size_t i = 0; i < g.fibers.size(); ++i) g.fibers[i].stack = stacks[i].get();
#if CUEMU_RACECHECK
  static std::vector<void*> tsan_fibers;  // one per thread slot, kept between launches
  while (tsan_fibers.size() < g.fibers.size()) tsan_fibers.push_back(__tsan_create_fiber(0));
  for (size_t i = 0; i < g.fibers.size(); ++i) g.fibers[i].tsan = tsan_fibers[i];
  g.host_tsan = __tsan_get_current_fiber();
  struct Joined {  // the host's work after the launch sees every thread's
    Grid& g;
    ~Joined() { __tsan_acquire(&g.block_end); }
  } joined{g};
#endif
  // Blocks run one after another, in the order policy's order too: a kernel whose result
  // depends on which block runs first (a race between blocks) fails the order check.
  const int64_t gx = g.grid.x, gxy = gx * g.grid.y;
  std::vector<int64_t> blocks;
  pass_order(blocks, gxy * g.grid.z);
  for (const int64_t b : blocks) {
    g.block_idx = uint3{unsigned(b % gx), unsigned(b % gxy / gx), unsigned(b / gxy)};
    run_block(g);
#if CUEMU_RACECHECK
    __tsan_acquire(&g.block_end);  // the threads' work (a trap's message too) before the host's
#endif
    if (!g.error.empty()) fail(g.error);
    TORCH_CHECK(g.trap.empty(), "CUDA error: device-side assert triggered (cuemu, kernel ", kernel, "): ", g.trap);
  }
  g.finished = true;
}

uint64_t warp_collective(Collective kind, unsigned mask, uint64_t value, int lane_mask, int width) {
  Grid& g = *g_grid;
  Fiber& f = running();
  const int lane = lane_of(f, g);
  if (!(mask >> lane & 1u)) fail_in_thread("calls a warp collective whose mask leaves out its own lane");
  if (width < 1 || width > 32 || (width & (width - 1)) != 0) fail_in_thread("shuffle width must be a power of 2 up to 32");
  f.kind = kind;
  f.mask = mask;
  f.value = value;
  f.lane_mask = lane_mask;
  f.width = width;
  f.wait = Wait::kWarp;
  arrive_at_warp_sync(g, f);
  leave(g, f, /*for_good=*/false);
  leave_warp_sync(g, f);
  return f.result;
}

void block_barrier() {
  Grid& g = *g_grid;
  Fiber& f = running();
  f.wait = Wait::kBlockBarrier;
  arrive_at_barrier(g, f);
  leave(g, f, /*for_good=*/false);
  leave_barrier(g, f);
}

void kernel_assert_failed(const char* condition, const char* file, int line) {
  Grid& g = *g_grid;
  Fiber& f = running();
  g.trap = where(g, f) + ": Assertion `" + condition + "` failed (" + file + ":" + std::to_string(line) + ")";
  f.wait = Wait::kDone;
  leave(g, f, /*for_good=*/true);
  std::abort();  // never resumed
}

std::string set_thread_order(const std::string& order) {
  std::lock_guard<std::mutex> lock(g_launch_mutex);
  const Order previous = thread_order();
  thread_order() = parse_order(order, "order");
  return previous == Order::kForward ? "forward" : previous == Order::kReverse ? "reverse" : "random";
}

}  // namespace cuemu

// Test hook for the order check of scripts/fakecuda (FAKECUDA_ORDER_CHECK): returns the previous
// order, so a caller can restore it.
TORCH_LIBRARY(cuemu, m) {
  m.def("set_thread_order(str order) -> str", &cuemu::set_thread_order);
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  TORCH_CHECK(attr == cudaDevAttrMultiProcessorCount, "cuemu: only the SM count is emulated");
  static const int sms = [] {
    const char* v = std::getenv("CUEMU_SMS");
    return v != nullptr ? std::max(1, std::atoi(v)) : 2;
  }();
  *value = sms;
  return cudaSuccess;
}
