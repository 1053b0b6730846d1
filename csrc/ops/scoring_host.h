// Host-side ATen helpers shared by the CPU and CUDA kernels of the scoring family (tensor-level
// code that runs on either device).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace labelkit {
namespace scoring {

inline at::ScalarType acc_type(at::ScalarType in) {
  return in == at::kDouble ? at::kDouble : at::kFloat;
}

// x / max(|x|, eps) per row, in the accumulation dtype: the same ATen ops as the reference, so
// both normalise to identical bits.
inline at::Tensor normalized_rows(const at::Tensor& x, double eps) {
  const at::Tensor y = x.to(acc_type(x.scalar_type()));
  return (y / at::linalg_vector_norm(y, 2, {-1}, /*keepdim=*/true).clamp_min(eps)).contiguous();
}

// The sample nearest to the mean (k-center's first pick without a labeled set), in blocks of
// rows so that no [N, D] temporary is made.
inline int64_t nearest_to_mean(const at::Tensor& x, int64_t block) {
  const at::Tensor mean = x.mean(0);
  const int64_t N = x.size(0);
  at::Tensor d = at::empty({N}, x.options());
  for (int64_t b = 0; b < N; b += block) {
    const int64_t len = std::min(block, N - b);
    d.narrow(0, b, len).copy_((x.narrow(0, b, len) - mean).square().sum(-1));
  }
  return d.argmin().item<int64_t>();
}

}  // namespace scoring
}  // namespace labelkit
