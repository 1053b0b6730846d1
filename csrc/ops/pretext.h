// Index arithmetic and per-tile math of the pretext-task op family, shared by the CPU and CUDA
// kernels so that CPU tests check what the GPU computes.
//
// Geometry: an H x W image is cut into grid x grid cells of cell_h = H / grid by
// cell_w = W / grid pixels (row-major, from the top-left corner; the H % grid bottom rows and
// W % grid right columns are never read). Cell c has its top-left pixel at
// ((c / grid) * cell_h, (c % grid) * cell_w); a t x t tile with offsets (dy, dx) starts dy rows
// and dx columns further in. A tile is valid when 0 <= c < grid^2, 0 <= dy <= cell_h - t and
// 0 <= dx <= cell_w - t, which keeps every read inside the image.
//
// Rotation by k quarter turns counter-clockwise (torch.rot90 on the last two dims) of an S x S
// image: output pixel (i, j) reads input pixel
//   k = 0: (i, j)   k = 1: (j, S-1-i)   k = 2: (S-1-i, S-1-j)   k = 3: (S-1-j, i).
#pragma once

#include <cmath>
#include <cstdint>

#ifndef LK_HD
#if defined(__CUDACC__)
#define LK_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define LK_HD inline __attribute__((always_inline))
#else
#define LK_HD inline
#endif
#endif

namespace labelkit {
namespace pretext {

struct Geometry {
  int64_t grid;
  int64_t cell_h;
  int64_t cell_w;
  int64_t tile;
  int64_t cells;  // grid * grid
};

LK_HD Geometry make_geometry(int64_t H, int64_t W, int64_t grid, int64_t tile) {
  return Geometry{grid, H / grid, W / grid, tile, grid * grid};
}

// Offsets of a tile centred in its cell (used when no offsets are given).
LK_HD int64_t centre_offset(int64_t cell_extent, int64_t tile) {
  return (cell_extent - tile) / 2;
}

// Top-left image pixel of the tile of cell `cell` at offsets (dy, dx); false (and nothing
// written) when the tile would leave its cell or the cell does not exist.
LK_HD bool tile_origin(const Geometry& g, int64_t cell, int64_t dy, int64_t dx, int64_t& top, int64_t& left) {
  if (cell < 0 || cell >= g.cells) return false;
  if (dy < 0 || dy > g.cell_h - g.tile || dx < 0 || dx > g.cell_w - g.tile) return false;
  top = (cell / g.grid) * g.cell_h + dy;
  left = (cell % g.grid) * g.cell_w + dx;
  return true;
}

// Where slot k of image n reads from. index [N], table [P, K], offsets [N, S, 2] (S = cells
// when by_cell, else K; null for centred tiles), all contiguous int64. Returns false for an
// index, cell or offset out of range (the kernels then raise or write a zero tile).
struct TileSource {
  int64_t cell;
  int64_t top;
  int64_t left;
};

LK_HD bool resolve_tile(
    const Geometry& g,
    const int64_t* index,
    const int64_t* table,
    int64_t num_rows,
    int64_t K,
    const int64_t* offsets,
    bool by_cell,
    int64_t n,
    int64_t k,
    TileSource& src) {
  const int64_t row = index[n];
  if (row < 0 || row >= num_rows) return false;
  const int64_t cell = table[row * K + k];
  if (cell < 0 || cell >= g.cells) return false;
  int64_t dy = centre_offset(g.cell_h, g.tile);
  int64_t dx = centre_offset(g.cell_w, g.tile);
  if (offsets != nullptr) {
    const int64_t slot = by_cell ? cell : k;
    const int64_t slots = by_cell ? g.cells : K;
    dy = offsets[(n * slots + slot) * 2];
    dx = offsets[(n * slots + slot) * 2 + 1];
  }
  src.cell = cell;
  return tile_origin(g, cell, dy, dx, src.top, src.left);
}

// Source pixel of output pixel (i, j) of an S x S image rotated by k quarter turns.
LK_HD void rotate_source(int64_t k, int64_t S, int64_t i, int64_t j, int64_t& si, int64_t& sj) {
  const int64_t last = S - 1;
  switch (k & 3) {
    case 0:
      si = i;
      sj = j;
      break;
    case 1:
      si = j;
      sj = last - i;
      break;
    case 2:
      si = last - i;
      sj = last - j;
      break;
    default:
      si = last - j;
      sj = i;
      break;
  }
}

// ---- tile standardisation: y = (x * scale - mean) * inv_std ---------------------------------
//
// Each channel of each tile is standardised separately (population std). A constant tile (all
// pixels equal: min == max) maps to 0 with gradient 0; deciding by min == max rather than by
// var == 0 keeps float rounding of the mean from blowing a flat tile up to noise. NaN
// propagates (min == max fails on NaN).
//
// The statistics are taken of x * scale, scale a power of two that brings the tile's largest
// |x| near 1 when it lies outside [2^-32, 2^32]: squared deviations of pixels beyond
// sqrt(max) of the statistics' type (~1e19 in float) would overflow, and those of tiny ones
// underflow. Multiplying by a power of two is exact, so y is the same as unscaled arithmetic
// would give wherever that does not overflow; moderate tiles keep scale 1 (no extra pass).

template <typename T>
struct TileStats {
  T mean;  // of x * scale
  T inv_std;  // 1 / std of x * scale
  bool constant;
  T scale;
};

// The power of two the statistics of a tile with largest |pixel| `amax` are taken at: 1 for a
// moderate, zero or non-finite amax; else 2^-e with amax = m * 2^e (0.5 <= m < 1), e clamped
// so that the factor stays a normal number of T (a float subnormal tile then scales to >= 2^-23).
template <typename T>
LK_HD T tile_scale(T amax) {
  const double a = static_cast<double>(amax);
  const bool moderate = a >= 0x1p-32 && a <= 0x1p32;
  const bool finite_positive = a > 0 && a - a == 0;
  if (moderate || !finite_positive) return T(1);
  int e = 0;
  ::frexp(a, &e);
  const int limit = sizeof(T) == sizeof(float) ? 126 : 1022;
  const int shift = -e < -limit ? -limit : (-e > limit ? limit : -e);
  return static_cast<T>(::ldexp(1.0, shift));
}

// From the tile's mean and population variance at `scale`, and whether min == max. A zero
// variance (a flat tile that float rounding did not catch as constant) divides by 1; a NaN one
// (NaN or inf pixels) gives NaN.
template <typename T>
LK_HD TileStats<T> tile_stats(T mean, T var, bool constant, T scale) {
  const T inv_std = var == T(0) ? T(1) : T(1) / static_cast<T>(::sqrt(var));
  return TileStats<T>{mean, inv_std, constant, scale};
}

template <typename T>
LK_HD T normalized(T x, const TileStats<T>& st) {
  return st.constant ? T(0) : (x * st.scale - st.mean) * st.inv_std;
}

// Backward of y = (x * scale - mean) * inv_std over one tile, given mean(g) and mean(g * y):
// dx = inv_std * (g - mean(g) - y * mean(g * y)) * scale; 0 for a constant tile.
template <typename T>
LK_HD T normalized_grad(T g, T y, const TileStats<T>& st, T mean_g, T mean_gy) {
  return st.constant ? T(0) : st.inv_std * (g - mean_g - y * mean_gy) * st.scale;
}

}  // namespace pretext
}  // namespace labelkit
