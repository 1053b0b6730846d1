// Every labelkit op schema, in one place. Kernels register per device in ops/cpu and ops/cuda;
// fake (meta) kernels and autograd are registered from Python (labelkit_ext/ops/).
#include <torch/library.h>

TORCH_LIBRARY(labelkit, m) {
  // Shannon entropy (natural log) of softmax over the last dim: [..., C] -> [...], and the
  // row's log-sum-exp as a (max, log sum exp(z - max)) pair [..., 2] (saved for the one-pass
  // backward; not differentiable).
  // float32 out for float16/bfloat16/float32 in, float64 for float64.
  m.def("softmax_entropy(Tensor logits) -> (Tensor entropy, Tensor lse)", {at::Tag::pt2_compliant_tag});
  m.def(
      "_softmax_entropy_backward(Tensor grad, Tensor logits, Tensor entropy, Tensor lse) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // One pass over logits [N, C]: entropy [N], uncertain [N] (entropy >= threshold),
  // prediction [N] (argmax), and with clusters [C] (ids 0..num_clusters-1) the softmax mass
  // per cluster [N, S] and its argmax [N]; without clusters those are [N, 0] and [0]; lse [N, 2].
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
  // Per-sample affine warp: grid_sample(input, affine_grid(theta, [N, C, out_h, out_w])) without
  // the grid. input [N, C, H, W] (any float dtype, computed in float32), theta [N, 2, 3];
  // mode 0 bilinear / 1 nearest, padding_mode 0 zeros / 1 border / 2 reflection.
  m.def(
      "affine_grid_sample(Tensor input, Tensor theta, SymInt out_h, SymInt out_w, int mode, "
      "int padding_mode, bool align_corners) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Gradients w.r.t. input (a gather, no atomics) and theta (per-sample reduction); an output
  // whose output_mask entry is false is returned as an empty [0] tensor.
  m.def(
      "_affine_grid_sample_backward(Tensor grad, Tensor input, Tensor theta, int mode, "
      "int padding_mode, bool align_corners, bool[2] output_mask) -> (Tensor grad_input, Tensor grad_theta)",
      {at::Tag::pt2_compliant_tag});
  // Pretext tasks (ops/pretext.h). Tiles [N, K, C, t, t]: slot k of image n is the t x t tile
  // of cell table[index[n], k] of a grid x grid cut, at offsets [N, grid*grid or K, 2] (dy, dx;
  // per cell when offsets_by_cell, else per slot) inside the cell, centred when None; with
  // normalize each tile channel is standardised (uint8 images then give float32).
  m.def(
      "grid_tiles(Tensor images, Tensor index, Tensor table, int grid, SymInt tile, "
      "Tensor? offsets, bool offsets_by_cell, bool normalize) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "_grid_tiles_backward(Tensor grad, Tensor images, Tensor index, Tensor table, int grid, "
      "SymInt tile, Tensor? offsets, bool offsets_by_cell, bool normalize) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  // Square images [N, C, S, S] rotated by k[n] quarter turns counter-clockwise (as torch.rot90).
  m.def("rotate90(Tensor images, Tensor k) -> Tensor", {at::Tag::pt2_compliant_tag});
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

  // The CPU output cache (ops/cpu/output_cache.h): process state, not tensor ops.
  // [cached bytes, cached blocks, bytes in use, limit, hits, misses]
  m.def("cpu_cache_stats() -> int[]");
  // Sets the limit on cached bytes; returns the previous one.
  m.def("set_cpu_cache_limit(int limit_bytes) -> int");
  // Frees every cached block; returns the bytes freed.
  m.def("empty_cpu_cache() -> int");
}
