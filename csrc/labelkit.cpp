// Every labelkit op schema, in one place. Kernels register per device in ops/cpu and ops/cuda;
// fake (meta) kernels and autograd are registered from Python (labelkit_ext/ops/).
#include <torch/library.h>

TORCH_LIBRARY(labelkit, m) {
  // Shannon entropy (natural log) of softmax over the last dim: [..., C] -> [...].
  // float32 out for float16/bfloat16/float32 in, float64 for float64.
  m.def("softmax_entropy(Tensor logits) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def(
      "_softmax_entropy_backward(Tensor grad, Tensor logits, Tensor entropy) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // One pass over logits [N, C]: entropy [N], uncertain [N] (entropy >= threshold),
  // prediction [N] (argmax), and with clusters [C] (ids 0..num_clusters-1) the softmax mass
  // per cluster [N, S] and its argmax [N]; without clusters those are [N, 0] and [0].
  m.def(
      "entropy_gate(Tensor logits, float threshold, Tensor? clusters, SymInt num_clusters) -> "
      "(Tensor entropy, Tensor uncertain, Tensor prediction, Tensor cluster_probs, Tensor cluster)",
      {at::Tag::pt2_compliant_tag});
  // ---- pool scoring (ops/scoring.h) ----
  // Per-sample uncertainty of [N, C] scores, or [S, N, C] Monte-Carlo samples; method is one of
  // entropy | margin | least_confidence | variation_ratio | bald | mean_std, larger = query
  // first. float32 out (float64 for float64 in).
  m.def("uncertainty(Tensor scores, str method, bool from_logits) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def(
      "_uncertainty_backward(Tensor grad, Tensor scores, str method, bool from_logits) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Streaming top-k cosine similarity of queries [N, D] over keys [M, D]: values [N, k],
  // indices [N, k], ties keep the lower key index. tile_size 0: the kernel's choice.
  m.def(
      "cosine_topk(Tensor queries, Tensor keys, SymInt k, bool largest, float eps, SymInt tile_size) -> "
      "(Tensor values, Tensor indices)",
      {at::Tag::pt2_compliant_tag});
  // max | min | mean | sum over the keys of each query's cosine similarity: [N].
  m.def(
      "cosine_reduce(Tensor queries, Tensor keys, str reduce, float eps, SymInt tile_size) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Core-set k-center greedy: budget indices, starting from labeled (int64 indices) or, without
  // them, from the point nearest the mean. cosine: distances between eps-normalised rows.
  m.def(
      "kcenter_greedy(Tensor embeddings, SymInt budget, Tensor? labeled, bool cosine, float eps) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // BADGE k-means++ seeding on the implicit gradient embeddings (p - onehot) (x) h; uniforms
  // [budget] float64 on the CPU are the draws (uniforms[0] is unused: the first pick is argmax |g|).
  m.def(
      "badge_select(Tensor probs, Tensor embeddings, Tensor uniforms, SymInt budget) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}
