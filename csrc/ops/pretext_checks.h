// Argument checks shared by the CPU and CUDA kernels of the pretext family. The messages use the
// words of the Python wrappers (labelkit_ext/ops/pretext.py), which check first; data-dependent
// checks (index values, offsets inside their cells) happen per tile in the kernels.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace labelkit {

inline bool is_image_dtype(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble || t == at::kByte;
}

inline void check_images(const at::Tensor& images, const char* op) {
  TORCH_CHECK(
      is_image_dtype(images.scalar_type()), op,
      ": images must be float16, bfloat16, float32, float64 or uint8, got ", images.scalar_type());
  TORCH_CHECK(images.dim() == 4, op, ": images must be 4-D [N, C, H, W], got shape ", images.sizes());
}

inline void check_index_tensor(const at::Tensor& t, const at::Tensor& images, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(
      t.dim() == 1 && t.size(0) == images.size(0), op, ": ", name, " must have shape [N] = [",
      images.size(0), "], got ", t.sizes());
  TORCH_CHECK(
      t.device() == images.device(), op, ": ", name, " must be on the images' device (",
      images.device(), "), got ", t.device());
}

// Checks of grid_tiles / _grid_tiles_backward that need no tensor data.
inline void check_grid_tiles_args(
    const at::Tensor& images,
    const at::Tensor& index,
    const at::Tensor& table,
    int64_t grid,
    int64_t tile,
    const c10::optional<at::Tensor>& offsets,
    bool offsets_by_cell,
    const char* op) {
  check_images(images, op);
  TORCH_CHECK(grid >= 2, op, ": grid must be an int >= 2, got ", grid);
  const int64_t H = images.size(2), W = images.size(3);
  TORCH_CHECK(
      H >= grid && W >= grid, op, ": images of size ", H, "x", W, " are smaller than the grid (",
      grid, "x", grid, " cells need at least ", grid, " pixels per side)");
  const int64_t largest = std::min(H / grid, W / grid);
  TORCH_CHECK(tile >= 1, op, ": tile must be >= 1, got ", tile);
  TORCH_CHECK(
      tile <= largest, op, ": tile=", tile, " is larger than a cell (", H / grid, "x", W / grid,
      " pixels); at most ", largest);
  check_index_tensor(index, images, op, "index");
  TORCH_CHECK(table.scalar_type() == at::kLong, op, ": table must be int64, got ", table.scalar_type());
  TORCH_CHECK(
      table.dim() == 2 && table.size(0) >= 1 && table.size(1) >= 1, op,
      ": table must have shape [P >= 1, K >= 1], got ", table.sizes());
  TORCH_CHECK(
      table.device() == images.device(), op, ": table must be on the images' device (",
      images.device(), "), got ", table.device());
  if (!offsets.has_value()) return;
  const at::Tensor& o = *offsets;
  const int64_t slots = offsets_by_cell ? grid * grid : table.size(1);
  TORCH_CHECK(o.scalar_type() == at::kLong, op, ": offsets must be int64, got ", o.scalar_type());
  TORCH_CHECK(
      o.dim() == 3 && o.size(0) == images.size(0) && o.size(1) == slots && o.size(2) == 2, op,
      ": offsets must have shape [N, ", slots, ", 2] = [", images.size(0), ", ", slots, ", 2], got ",
      o.sizes());
  TORCH_CHECK(
      o.device() == images.device(), op, ": offsets must be on the images' device (",
      images.device(), "), got ", o.device());
}

inline void check_grid_tiles_backward_args(
    const at::Tensor& grad,
    const at::Tensor& images,
    const at::Tensor& table,
    int64_t tile) {
  constexpr const char* op = "_grid_tiles_backward";
  TORCH_CHECK(
      at::isFloatingType(images.scalar_type()), op, ": gradients need floating-point images, got ",
      images.scalar_type());
  const int64_t N = images.size(0), C = images.size(1), K = table.size(1);
  const std::vector<int64_t> want = {N, K, C, tile, tile};
  TORCH_CHECK(
      grad.sizes() == at::IntArrayRef(want) && grad.scalar_type() == images.scalar_type(), op,
      ": grad must be ", at::IntArrayRef(want), " of the images' dtype ", images.scalar_type(), ", got ",
      grad.sizes(), " ", grad.scalar_type());
  TORCH_CHECK(
      grad.device() == images.device(), op, ": grad must be on the images' device (", images.device(),
      "), got ", grad.device());
}

inline void check_rotate90_args(const at::Tensor& images, const at::Tensor& k) {
  check_images(images, "rotate90");
  TORCH_CHECK(
      images.size(2) == images.size(3), "rotate90: images must be square, got ", images.size(2), "x",
      images.size(3));
  check_index_tensor(k, images, "rotate90", "k");
}

// Output dtype of a tile op: the input's, except normalised uint8 tiles are float32.
inline at::ScalarType tile_dtype(at::ScalarType in, bool normalize) {
  return normalize && in == at::kByte ? at::kFloat : in;
}

// ---- host-side argument preparation, shared by the CPU and CUDA kernels ----------------------

// float64 images are computed in double, every other dtype in float.
template <typename T>
using pretext_acc_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Strides of a 4-D tensor (passed by value to CUDA kernels).
struct Strides4 {
  int64_t n, c, h, w;
};

inline Strides4 strides_of(const at::Tensor& t) {
  return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Raw pointers to the (contiguous int64) index arguments of grid_tiles.
struct TileArgs {
  const int64_t* index;
  const int64_t* table;
  int64_t rows;
  int64_t K;
  const int64_t* offsets;  // null: centred tiles
  bool by_cell;
};

// The index arguments made contiguous (kept alive here) and their TileArgs.
struct TileInputs {
  at::Tensor index;
  at::Tensor table;
  at::Tensor offsets;  // undefined when none
  TileArgs args;
};

inline TileInputs tile_inputs(
    const at::Tensor& index, const at::Tensor& table, const c10::optional<at::Tensor>& offsets, bool by_cell) {
  TileInputs in;
  in.index = index.contiguous();
  in.table = table.contiguous();
  if (offsets.has_value()) in.offsets = offsets->contiguous();
  in.args = TileArgs{
      in.index.data_ptr<int64_t>(), in.table.data_ptr<int64_t>(), in.table.size(0), in.table.size(1),
      in.offsets.defined() ? in.offsets.data_ptr<int64_t>() : nullptr, by_cell};
  return in;
}

}  // namespace labelkit
