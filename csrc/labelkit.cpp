// Every labelkit op schema, in one place. Kernels register per device in ops/cpu and ops/cuda;
// fake (meta) kernels and autograd are registered from Python (labelkit_ext/ops/).
#include <torch/library.h>

TORCH_LIBRARY(labelkit, m) {
  // Shannon entropy (natural log) of softmax over the last dim: [..., C] -> [...], and the
  // row's log-sum-exp (saved for the one-pass backward; not differentiable).
  // float32 out for float16/bfloat16/float32 in, float64 for float64.
  m.def("softmax_entropy(Tensor logits) -> (Tensor entropy, Tensor lse)", {at::Tag::pt2_compliant_tag});
  m.def(
      "_softmax_entropy_backward(Tensor grad, Tensor logits, Tensor entropy, Tensor lse) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // One pass over logits [N, C]: entropy [N], uncertain [N] (entropy >= threshold),
  // prediction [N] (argmax), and with clusters [C] (ids 0..num_clusters-1) the softmax mass
  // per cluster [N, S] and its argmax [N]; without clusters those are [N, 0] and [0]; lse [N].
  m.def(
      "entropy_gate(Tensor logits, float threshold, Tensor? clusters, SymInt num_clusters) -> "
      "(Tensor entropy, Tensor uncertain, Tensor prediction, Tensor cluster_probs, Tensor cluster, "
      "Tensor lse)",
      {at::Tag::pt2_compliant_tag});
  // Gradient w.r.t. logits of <grad_entropy, entropy> + <grad_cluster_probs, cluster_probs>,
  // in one read of each row (either grad may be absent).
  m.def(
      "_entropy_gate_backward(Tensor? grad_entropy, Tensor? grad_cluster_probs, Tensor logits, "
      "Tensor entropy, Tensor lse, Tensor? clusters, Tensor cluster_probs) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}
