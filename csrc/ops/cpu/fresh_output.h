// Allocation of CPU outputs that a kernel writes once, in full, right after allocating: outputs
// of 4 MiB or more come from the output cache (output_cache.h), which reuses freed blocks
// instead of faulting fresh pages in on every call.
#pragma once

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>

#include <cstddef>

#include "ops/cpu/output_cache.h"

namespace labelkit::cpu {

// Outputs of at least kMinCachedBytes come from the output cache; smaller ones from at::empty
// (through the dispatcher, as any torch op's, so the profiler names them aten::empty).
inline bool cached_output(at::IntArrayRef sizes, c10::ScalarType dtype) {
  return static_cast<size_t>(c10::multiply_integers(sizes)) * c10::elementSize(dtype) >= kMinCachedBytes;
}

// at::empty for an output the caller fills completely before anything else reads it.
inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const c10::ScalarType dtype = options.dtype().toScalarType();
  if (!cached_output(sizes, dtype)) return at::empty(sizes, options);
  return at::detail::empty_generic(sizes, output_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   options.memory_format_opt());
}

// at::empty_like (same strides as `like` where it is dense) for an output filled completely
// before it is read.
inline at::Tensor empty_output_like(const at::Tensor& like) {
  if (!cached_output(like.sizes(), like.scalar_type())) return at::empty_like(like);
  const c10::DispatchKeySet cpu(c10::DispatchKey::CPU);
  if (like.is_non_overlapping_and_dense()) {
    return at::detail::empty_strided_generic(like.sizes(), like.strides(), output_allocator(), cpu,
                                             like.scalar_type());
  }
  return at::detail::empty_generic(like.sizes(), output_allocator(), cpu, like.scalar_type(),
                                   like.suggest_memory_format());
}

inline at::Tensor zeros_output_like(const at::Tensor& like) { return empty_output_like(like).zero_(); }

}  // namespace labelkit::cpu
