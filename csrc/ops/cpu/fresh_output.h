// Allocation of large CPU outputs that a kernel writes once, in full, right after allocating.
//
// glibc returns blocks over 32 MiB to the OS on free, so every large output is faulted in again
// on every call, 4 KiB at a time: for a 250 MB gradient the faults cost more than writing it
// (65,536 x 1,000 float32: copy into a fresh tensor 64 ms, 16 ms with huge pages). Before the
// first touch we ask the kernel for transparent huge pages on the 2 MiB-aligned interior of the
// block (the same hint as torch's THP_MEM_ALLOC_ENABLE=1, applied to our outputs only). Where THP
// is off or unsupported the hint is a no-op; LABELKIT_HUGE_PAGES=0 turns it off.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace labelkit::cpu {

constexpr uintptr_t kHugePage = uintptr_t{2} << 20;

inline bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("LABELKIT_HUGE_PAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return enabled;
}

// Best effort: a failed madvise leaves the tensor as it was, so its result is ignored.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const uintptr_t bytes = static_cast<uintptr_t>(t.nbytes());
  if (!huge_pages_enabled() || bytes < 2 * kHugePage) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + bytes) & ~(kHugePage - 1);
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// at::empty for an output the caller fills completely before anything else reads it.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  advise_huge_pages(t);
  return t;
}

// at::empty_like (same strides as `like`) for an output filled completely before it is read.
inline at::Tensor empty_output_like(const at::Tensor& like) {
  at::Tensor t = at::empty_like(like);
  advise_huge_pages(t);
  return t;
}

inline at::Tensor zeros_output_like(const at::Tensor& like) { return empty_output_like(like).zero_(); }

}  // namespace labelkit::cpu
