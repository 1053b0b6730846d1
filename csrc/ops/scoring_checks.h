// Argument checks shared by the CPU and CUDA kernels of the scoring family. The messages match
// the Python wrappers' (labelkit_ext/ops/scoring.py), which check first with the same words;
// these guard direct torch.ops calls so that no input can index out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <string>

#include "ops/scoring.h"

namespace labelkit {

inline void check_float_matrix(const at::Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(
      at::isFloatingType(x.scalar_type()), op, ": ", name,
      " must be a floating-point tensor (float16, bfloat16, float32 or float64), got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be 2-D, got shape ", x.sizes());
}

inline scoring::Method parse_uncertainty_method(const std::string& method, int64_t dim) {
  using scoring::Method;
  Method m;
  if (method == "entropy") {
    m = Method::kEntropy;
  } else if (method == "margin") {
    m = Method::kMargin;
  } else if (method == "least_confidence") {
    m = Method::kLeastConfidence;
  } else if (method == "variation_ratio") {
    m = Method::kVariationRatio;
  } else if (method == "bald") {
    m = Method::kBald;
  } else if (method == "mean_std") {
    m = Method::kMeanStd;
  } else {
    TORCH_CHECK(false, "uncertainty: unknown method '", method, "'");
  }
  const bool mc_only = m == Method::kBald || m == Method::kMeanStd;
  const bool both = m == Method::kVariationRatio;
  TORCH_CHECK(
      (mc_only && dim == 3) || (both && (dim == 2 || dim == 3)) || (!mc_only && !both && dim == 2),
      "uncertainty: scores has the wrong rank (", dim, "-D) for method '", method,
      "': [N, C] for entropy/margin/least_confidence, [S, N, C] for bald/mean_std, either for variation_ratio");
  return m;
}

inline void check_uncertainty_args(const at::Tensor& scores, const std::string& method) {
  TORCH_CHECK(
      at::isFloatingType(scores.scalar_type()),
      "uncertainty: scores must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
      scores.scalar_type());
  parse_uncertainty_method(method, scores.dim());
  TORCH_CHECK(scores.size(-1) > 0, "uncertainty: scores has an empty class dimension (C == 0)");
  TORCH_CHECK(scores.dim() == 2 || scores.size(0) > 0, "uncertainty: scores has no Monte-Carlo samples (S == 0)");
}

// The incoming gradient of the uncertainty backward: one float per sample, on the scores' device
// (a host pointer must never reach a CUDA kernel, nor a short buffer any kernel).
inline void check_uncertainty_grad(const at::Tensor& grad, const at::Tensor& scores) {
  const char* op = "uncertainty_backward";
  TORCH_CHECK(grad.device() == scores.device(), op, ": grad must be on the scores' device (", scores.device(),
              "), got ", grad.device());
  TORCH_CHECK(grad.dim() == 1 && grad.size(0) == scores.size(-2), op, ": grad must have shape [N] = [",
              scores.size(-2), "] (one value per sample), got ", grad.sizes());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), op, ": grad must be floating point, got ",
              grad.scalar_type());
}

inline void check_cosine_args(const at::Tensor& q, const at::Tensor& k, double eps, int64_t tile, const char* op) {
  check_float_matrix(q, "queries", op);
  check_float_matrix(k, "keys", op);
  TORCH_CHECK(
      q.size(1) == k.size(1), op, ": queries and keys must have the same feature size D, got queries ",
      q.sizes(), " and keys ", k.sizes());
  TORCH_CHECK(q.size(1) > 0, op, ": queries and keys have an empty feature dimension (D == 0)");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), op, ": queries and keys must have the same dtype");
  TORCH_CHECK(q.device() == k.device(), op, ": queries and keys must be on the same device");
  TORCH_CHECK(std::isfinite(eps) && eps > 0, op, ": eps must be a finite float > 0, got ", eps);
  TORCH_CHECK(tile >= 0, op, ": tile_size must be >= 1 (or 0 for the kernel's choice), got ", tile);
}

inline void check_topk_args(const at::Tensor& q, const at::Tensor& k, int64_t kk, double eps, int64_t tile) {
  check_cosine_args(q, k, eps, tile, "cosine_topk");
  TORCH_CHECK(kk >= 1, "cosine_topk: k must be >= 1, got ", kk);
  TORCH_CHECK(kk <= k.size(0), "cosine_topk: k=", kk, " is larger than the number of keys M=", k.size(0));
}

enum class Reduce : int { kMax = 0, kMin, kMean, kSum };

inline Reduce parse_reduce(const std::string& reduce) {
  if (reduce == "max") return Reduce::kMax;
  if (reduce == "min") return Reduce::kMin;
  if (reduce == "mean") return Reduce::kMean;
  TORCH_CHECK(reduce == "sum", "cosine_reduce: reduce must be one of max, min, mean, sum, got '", reduce, "'");
  return Reduce::kSum;
}

inline void check_reduce_args(const at::Tensor& q, const at::Tensor& k, double eps, int64_t tile) {
  check_cosine_args(q, k, eps, tile, "cosine_reduce");
  TORCH_CHECK(k.size(0) > 0, "cosine_reduce: keys is empty (M == 0): nothing to reduce over");
}

// Labeled indices must be in range and distinct (checked on the CPU copy the kernels use), and
// the budget must fit in the rest of the pool.
inline void check_kcenter_args(
    const at::Tensor& emb, int64_t budget, const at::Tensor& labeled_cpu, double eps) {
  check_float_matrix(emb, "embeddings", "kcenter_greedy");
  const int64_t N = emb.size(0);
  TORCH_CHECK(std::isfinite(eps) && eps > 0, "kcenter_greedy: eps must be a finite float > 0, got ", eps);
  TORCH_CHECK(labeled_cpu.scalar_type() == at::kLong && labeled_cpu.dim() == 1,
              "kcenter_greedy: labeled must be a 1-D int64 index tensor");
  std::vector<char> seen(N, 0);
  const int64_t* l = labeled_cpu.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < labeled_cpu.numel(); ++j) {
    TORCH_CHECK(l[j] >= 0 && l[j] < N, "kcenter_greedy: labeled indices must lie in [0, N = ", N, "), got ", l[j]);
    TORCH_CHECK(!seen[l[j]], "kcenter_greedy: labeled indices must not repeat (", l[j], ")");
    seen[l[j]] = 1;
  }
  const int64_t pool = N - labeled_cpu.numel();
  TORCH_CHECK(budget >= 0, "kcenter_greedy: budget must be >= 0, got ", budget);
  TORCH_CHECK(budget <= pool, "kcenter_greedy: budget=", budget, " is larger than the unlabeled pool (", pool, " samples)");
  TORCH_CHECK(budget == 0 || emb.size(1) > 0, "kcenter_greedy: embeddings has an empty feature dimension (D == 0)");
}

inline void check_badge_args(const at::Tensor& probs, const at::Tensor& emb, const at::Tensor& uniforms, int64_t budget) {
  check_float_matrix(probs, "probs", "badge_select");
  check_float_matrix(emb, "embeddings", "badge_select");
  TORCH_CHECK(probs.size(0) == emb.size(0),
              "badge_select: probs and embeddings must have the same number of samples N, got ",
              probs.sizes(), " and ", emb.sizes());
  TORCH_CHECK(probs.device() == emb.device(), "badge_select: probs and embeddings must be on the same device");
  TORCH_CHECK(budget >= 0, "badge_select: budget must be >= 0, got ", budget);
  TORCH_CHECK(budget <= probs.size(0), "badge_select: budget=", budget,
              " is larger than the unlabeled pool (", probs.size(0), " samples)");
  TORCH_CHECK(budget == 0 || (probs.size(1) > 0 && emb.size(1) > 0),
              "badge_select: probs (C) and embeddings (D) must have non-empty feature dimensions");
  TORCH_CHECK(uniforms.scalar_type() == at::kDouble && uniforms.dim() == 1 && uniforms.size(0) == budget &&
                  uniforms.device().is_cpu(),
              "badge_select: uniforms must be a float64 CPU tensor of shape [budget] = [", budget, "]");
}

}  // namespace labelkit
