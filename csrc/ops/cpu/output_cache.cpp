// The CPU output cache (output_cache.h): blocks, the free list, limits, and the utility ops.
#include "ops/cpu/output_cache.h"

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <pthread.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
// A cached block is poisoned, so ASan still reports a use after free while the block waits.
#define LK_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define LK_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define LK_POISON(p, n) ((void)(p), (void)(n))
#define LK_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

namespace labelkit::cpu {
namespace {

constexpr int64_t kDefaultLimitMb = 1024;

struct Block {
  void* ptr;
  size_t capacity;   // a multiple of kHugePage
  size_t requested;  // what the live tensor asked for (the profiler's size)
};

bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("LABELKIT_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

// A new block asks for transparent huge pages before its first touch (the hint torch gives with
// THP_MEM_ALLOC_ENABLE=1, here for our outputs only): a 250 MB gradient faulted in 4 KiB at a
// time cost more than writing it (65,536 x 1,000 float32: a copy into a fresh tensor 64 ms,
// 16 ms with huge pages). A no-op where THP is off; LABELKIT_HUGE_PAGES=0 turns it off. Best
// effort: a failed madvise leaves the block as it was.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (huge_pages_enabled()) (void)madvise(p, bytes, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

size_t round_to_huge_pages(size_t n) {
  return (n + kHugePage - 1) & ~(kHugePage - 1);
}

int64_t limit_from_env() {
  const char* v = std::getenv("LABELKIT_CPU_CACHE_MB");
  if (v == nullptr || *v == '\0') return kDefaultLimitMb << 20;
  char* end = nullptr;
  errno = 0;
  const long long mb = std::strtoll(v, &end, 10);
  TORCH_CHECK(errno == 0 && *end == '\0' && mb >= 0 && mb <= (int64_t{1} << 40),
              "LABELKIT_CPU_CACHE_MB must be a whole number of MiB >= 0, got '", v, "'");
  return static_cast<int64_t>(mb) << 20;
}

void free_blocks(const std::vector<Block*>& blocks) {
  for (Block* b : blocks) {
    LK_UNPOISON(b->ptr, b->capacity);
    std::free(b->ptr);
    delete b;
  }
}

class OutputCache final : public c10::Allocator {
 public:
  OutputCache() : limit_(limit_from_env()) {}

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinCachedBytes) return c10::GetCPUAllocator()->allocate(n);
    Block* b = take(n);
    if (b == nullptr) b = map_new(n);
    c10::reportMemoryUsageToProfiler(b->ptr, static_cast<int64_t>(n), 0, 0, c10::Device(c10::kCPU));
    return {b->ptr, b, &OutputCache::release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  OutputCacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    OutputCacheStats s;
    s.cached_bytes = static_cast<int64_t>(cached_bytes_);
    s.cached_blocks = static_cast<int64_t>(free_.size());
    s.in_use_bytes = static_cast<int64_t>(in_use_bytes_);
    s.limit_bytes = limit_;
    s.hits = hits_;
    s.misses = misses_;
    return s;
  }

  int64_t set_limit(int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "set_cpu_cache_limit: limit_bytes must be >= 0, got ", bytes);
    std::vector<Block*> evicted;
    int64_t old;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      old = limit_;
      limit_ = bytes;
      evict_until_fits(0, evicted);
    }
    free_blocks(evicted);
    return old;
  }

  int64_t empty() {
    std::vector<Block*> evicted;
    int64_t released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      released = static_cast<int64_t>(cached_bytes_);
      evicted.swap(free_);
      cached_bytes_ = 0;
    }
    free_blocks(evicted);
    return released;
  }

  // A fork while another thread holds the lock would leave it locked in the child forever.
  void lock_for_fork() { mutex_.lock(); }
  void unlock_after_fork() { mutex_.unlock(); }

 private:
  // The most recently cached block of the smallest capacity in [need, 2 need], if any.
  Block* take(size_t n) {
    const size_t need = round_to_huge_pages(n);
    std::lock_guard<std::mutex> lock(mutex_);
    size_t best = free_.size();
    for (size_t i = free_.size(); i-- > 0;) {
      const size_t cap = free_[i]->capacity;
      if (cap >= need && cap <= 2 * need && (best == free_.size() || cap < free_[best]->capacity)) best = i;
    }
    if (best == free_.size()) {
      ++misses_;
      return nullptr;
    }
    Block* b = free_[best];
    free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
    cached_bytes_ -= b->capacity;
    in_use_bytes_ += b->capacity;
    ++hits_;
    LK_UNPOISON(b->ptr, b->capacity);
    b->requested = n;
    return b;
  }

  // A new 2 MiB-aligned block; on failure the cache is emptied and the mapping tried once more.
  Block* map_new(size_t n) {
    const size_t capacity = round_to_huge_pages(n);
    void* p = std::aligned_alloc(kHugePage, capacity);
    if (p == nullptr && empty() > 0) p = std::aligned_alloc(kHugePage, capacity);
    TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "labelkit CPU kernels: out of memory allocating an output of ",
                     n, " bytes");
    advise_huge_pages(p, capacity);
    std::lock_guard<std::mutex> lock(mutex_);
    in_use_bytes_ += capacity;
    return new Block{p, capacity, n};
  }

  static void release(void* ctx) { instance().give_back(static_cast<Block*>(ctx)); }

  void give_back(Block* b) {
    c10::reportMemoryUsageToProfiler(b->ptr, -static_cast<int64_t>(b->requested), 0, 0, c10::Device(c10::kCPU));
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_bytes_ -= b->capacity;
      if (static_cast<int64_t>(b->capacity) > limit_) {
        evicted.push_back(b);
      } else {
        evict_until_fits(b->capacity, evicted);
        LK_POISON(b->ptr, b->capacity);
        free_.push_back(b);
        cached_bytes_ += b->capacity;
      }
    }
    free_blocks(evicted);
  }

  // Drops the oldest cached blocks until `incoming` more bytes fit under the limit.
  void evict_until_fits(size_t incoming, std::vector<Block*>& evicted) {
    size_t drop = 0;
    while (drop < free_.size() && static_cast<int64_t>(cached_bytes_ + incoming) > limit_) {
      cached_bytes_ -= free_[drop]->capacity;
      evicted.push_back(free_[drop++]);
    }
    free_.erase(free_.begin(), free_.begin() + static_cast<std::ptrdiff_t>(drop));
  }

 public:
  // Never destroyed: tensors may be freed during interpreter shutdown, after static destructors.
  static OutputCache& instance() {
    static OutputCache* cache = [] {
      auto* c = new OutputCache();
      pthread_atfork([] { instance().lock_for_fork(); }, [] { instance().unlock_after_fork(); },
                     [] { instance().unlock_after_fork(); });
      return c;
    }();
    return *cache;
  }

 private:
  std::mutex mutex_;
  std::vector<Block*> free_;  // oldest first
  size_t cached_bytes_ = 0;
  size_t in_use_bytes_ = 0;
  int64_t limit_;
  int64_t hits_ = 0;
  int64_t misses_ = 0;
};

std::vector<int64_t> stats_op() {
  const OutputCacheStats s = output_cache_stats();
  return {s.cached_bytes, s.cached_blocks, s.in_use_bytes, s.limit_bytes, s.hits, s.misses};
}

}  // namespace

c10::Allocator* output_allocator() {
  return &OutputCache::instance();
}

OutputCacheStats output_cache_stats() {
  return OutputCache::instance().stats();
}

int64_t set_output_cache_limit(int64_t bytes) {
  return OutputCache::instance().set_limit(bytes);
}

int64_t empty_output_cache() {
  return OutputCache::instance().empty();
}

// No tensor arguments, so no backend key: the one kernel serves every call.
TORCH_LIBRARY_IMPL(labelkit, CompositeExplicitAutograd, m) {
  m.impl("cpu_cache_stats", &stats_op);
  m.impl("set_cpu_cache_limit", &set_output_cache_limit);
  m.impl("empty_cpu_cache", &empty_output_cache);
}

}  // namespace labelkit::cpu
