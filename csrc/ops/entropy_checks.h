// Host code shared by the CPU and CUDA kernels of the entropy family: argument checks (their
// messages match the Python wrappers', labelkit_ext/ops/entropy.py, which check first with the
// same words), output dtypes and shapes, and the backward's inputs.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

namespace labelkit {

inline void check_logits(const at::Tensor& logits, const char* op, int64_t min_dim) {
  TORCH_CHECK(
      at::isFloatingType(logits.scalar_type()),
      op, ": logits must be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
      logits.scalar_type());
  TORCH_CHECK(
      logits.dim() >= min_dim, op, ": logits must have at least ", min_dim,
      " dimension(s), got shape ", logits.sizes());
  TORCH_CHECK(
      logits.size(-1) > 0, op, ": logits has an empty class dimension (C == 0), got shape ",
      logits.sizes());
}

inline void check_gate_args(
    const at::Tensor& logits,
    double threshold,
    const c10::optional<at::Tensor>& clusters,
    int64_t num_clusters) {
  check_logits(logits, "entropy_gate", 2);
  TORCH_CHECK(logits.dim() == 2, "entropy_gate: logits must be 2-D [N, C], got shape ", logits.sizes());
  TORCH_CHECK(std::isfinite(threshold), "entropy_gate: threshold must be finite, got ", threshold);
  if (!clusters.has_value()) {
    TORCH_CHECK(num_clusters == 0, "entropy_gate: num_clusters given without clusters");
    return;
  }
  const at::Tensor& c = *clusters;
  TORCH_CHECK(
      c.scalar_type() == at::kLong, "entropy_gate: clusters must be int64, got ", c.scalar_type());
  TORCH_CHECK(
      c.dim() == 1 && c.size(0) == logits.size(1),
      "entropy_gate: clusters must have shape [C] = [", logits.size(1), "], got ", c.sizes());
  TORCH_CHECK(
      c.device() == logits.device(), "entropy_gate: clusters must be on the logits' device (",
      logits.device(), "), got ", c.device());
  TORCH_CHECK(num_clusters >= 1, "entropy_gate: num_clusters must be >= 1, got ", num_clusters);
}

// A per-row tensor of a backward op (incoming grad, saved entropy or lse): on the logits'
// device with one value per row, so a kernel can never read past it or get a host pointer.
inline void check_row_values(const at::Tensor& t, const char* name, const at::Tensor& logits, const char* op) {
  TORCH_CHECK(
      t.device() == logits.device(), op, ": ", name, " must be on the logits' device (",
      logits.device(), "), got ", t.device());
  const auto rows = logits.sizes().slice(0, logits.dim() - 1);
  TORCH_CHECK(
      t.sizes() == rows, op, ": ", name, " must have shape ", rows, " (one value per row), got ",
      t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ",
              t.scalar_type());
}

// The saved log-sum-exp pairs (max, log sum exp(z - max)): [rows..., 2] on the logits' device.
inline void check_lse(const at::Tensor& lse, const at::Tensor& logits, const char* op) {
  TORCH_CHECK(lse.device() == logits.device(), op, ": lse must be on the logits' device (",
              logits.device(), "), got ", lse.device());
  std::vector<int64_t> shape(logits.sizes().begin(), logits.sizes().end() - 1);
  shape.push_back(2);
  TORCH_CHECK(lse.sizes() == at::IntArrayRef(shape), op, ": lse must have shape ", at::IntArrayRef(shape),
              " (a (max, log-sum) pair per row), got ", lse.sizes());
  TORCH_CHECK(at::isFloatingType(lse.scalar_type()), op, ": lse must be floating point, got ",
              lse.scalar_type());
}

// The cluster arguments of the entropy_gate backward: ids [C] and the forward's probs [N, S].
inline void check_gate_backward_clusters(
    const at::Tensor& logits, const c10::optional<at::Tensor>& clusters,
    const at::Tensor& cluster_probs, const c10::optional<at::Tensor>& grad_cluster_probs) {
  const char* op = "entropy_gate_backward";
  // Unused ones too: the dispatcher picks the kernel from every tensor argument, so a CUDA
  // cluster_probs beside CPU logits would hand the CUDA kernel host pointers.
  for (const at::Tensor* t : {clusters.has_value() ? &*clusters : nullptr, &cluster_probs,
                              grad_cluster_probs.has_value() ? &*grad_cluster_probs : nullptr}) {
    TORCH_CHECK(t == nullptr || t->device() == logits.device(), op,
                ": every tensor must be on the logits' device (", logits.device(), "), got ", t->device());
  }
  if (!grad_cluster_probs.has_value()) return;
  TORCH_CHECK(clusters.has_value(), op, ": grad_cluster_probs given without clusters");
  const at::Tensor& c = *clusters;
  TORCH_CHECK(c.scalar_type() == at::kLong && c.dim() == 1 && c.size(0) == logits.size(1), op,
              ": clusters must be int64 of shape [C] = [", logits.size(1), "], got ", c.scalar_type(),
              " ", c.sizes());
  TORCH_CHECK(cluster_probs.dim() == 2 && cluster_probs.size(0) == logits.size(0), op,
              ": cluster_probs must be [N, S] with N = ", logits.size(0), ", got ", cluster_probs.sizes());
  TORCH_CHECK(grad_cluster_probs->sizes() == cluster_probs.sizes(), op,
              ": grad_cluster_probs must have the shape of cluster_probs ", cluster_probs.sizes(), ", got ",
              grad_cluster_probs->sizes());
}

// Every argument of the two backward ops, as both backends check them.
inline void check_softmax_entropy_backward_args(
    const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& entropy, const at::Tensor& lse) {
  const char* op = "softmax_entropy_backward";
  check_logits(logits, op, 1);
  check_row_values(grad, "grad", logits, op);
  check_row_values(entropy, "entropy", logits, op);
  check_lse(lse, logits, op);
}

inline void check_entropy_gate_backward_args(
    const c10::optional<at::Tensor>& grad_entropy, const c10::optional<at::Tensor>& grad_cluster_probs,
    const at::Tensor& logits, const at::Tensor& entropy, const at::Tensor& lse,
    const c10::optional<at::Tensor>& clusters, const at::Tensor& cluster_probs) {
  const char* op = "entropy_gate_backward";
  check_logits(logits, op, 2);
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, C], got shape ", logits.sizes());
  if (grad_entropy.has_value()) check_row_values(*grad_entropy, "grad_entropy", logits, op);
  check_row_values(entropy, "entropy", logits, op);
  check_lse(lse, logits, op);
  check_gate_backward_clusters(logits, clusters, cluster_probs, grad_cluster_probs);
}

// Entropy, lse and the gate's float outputs: float32, float64 for float64 logits.
inline at::ScalarType entropy_dtype(at::ScalarType in) {
  return in == at::kDouble ? at::kDouble : at::kFloat;
}

// The saved log-sum-exp of every row as a (max, log sum exp(z - max)) pair: rows + [2].
inline std::vector<int64_t> lse_shape(const at::Tensor& x) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(2);
  return shape;
}

// What a backward kernel reads: contiguous logits, and the saved row statistics and incoming
// gradients in the accumulation type, contiguous (a no-op for the forward's own outputs).
// Absent gradients stay undefined; the cluster tensors are defined only with grad_cluster.
// grad_entropy is read at grad_entropy_stride: 0 for the gradient of .sum() or .mean() (one value
// expanded over the rows), which is then not materialised (at C = 10 that copy alone is a tenth
// of the gradient's bytes).
struct BackwardInputs {
  at::Tensor x, entropy, lse, grad_entropy, grad_cluster, cluster_probs, clusters;
  int64_t grad_entropy_stride = 1;
  bool routed() const { return grad_cluster.defined(); }
};

// One value broadcast to every element (all strides 0), e.g. the gradient of a sum.
inline bool is_expanded_scalar(const at::Tensor& t) {
  if (t.numel() < 2) return false;
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.stride(d) != 0) return false;
  }
  return true;
}

inline BackwardInputs backward_inputs(const at::Tensor& logits, const c10::optional<at::Tensor>& grad_entropy,
                                      const c10::optional<at::Tensor>& grad_cluster, const at::Tensor& entropy,
                                      const at::Tensor& lse, const c10::optional<at::Tensor>& clusters,
                                      const at::Tensor& cluster_probs) {
  BackwardInputs b;
  b.x = logits.contiguous();
  const auto acc = [&](const at::Tensor& t) { return t.to(entropy_dtype(b.x.scalar_type())).contiguous(); };
  b.entropy = acc(entropy);
  b.lse = acc(lse);
  if (grad_entropy.has_value() && is_expanded_scalar(*grad_entropy)) {
    b.grad_entropy = acc(grad_entropy->as_strided({1}, {1}));
    b.grad_entropy_stride = 0;
  } else if (grad_entropy.has_value()) {
    b.grad_entropy = acc(*grad_entropy);
  }
  if (grad_cluster.has_value()) {
    b.grad_cluster = acc(*grad_cluster);
    b.cluster_probs = acc(cluster_probs);
    b.clusters = clusters->contiguous();
  }
  return b;
}

}  // namespace labelkit
