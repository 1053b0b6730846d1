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
}
