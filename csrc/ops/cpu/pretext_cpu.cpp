// CPU kernels of the pretext family. grid_tiles is a gather: each (image, slot) task copies one
// t x t tile per channel with row copies (NCHW) or pixel copies (channels-last); with normalize
// the tile channel goes through a small buffer for its statistics. The backward scatters each
// tile's gradient back into its image; tasks are whole images, so no two threads write the same
// pixel and the result is deterministic. Index, cell and offset values are checked per tile: a
// bad one raises, never reads out of bounds.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "ops/pretext.h"
#include "ops/pretext_checks.h"
#include "ops/cpu/clones.h"
#include "ops/cpu/fresh_output.h"
#include "ops/cpu/narrow.h"
#include "ops/cpu/row_moments.h"
#include "ops/cpu/transpose.h"

namespace labelkit {
namespace {

using pretext::Geometry;
using pretext::TileSource;
using pretext::TileStats;

constexpr int64_t kGrainPixels = 1 << 14;  // pixels per parallel task, amortises scheduling

template <typename T>
using acc_type = pretext_acc_t<T>;

TileSource resolve_or_throw(const Geometry& g, const TileArgs& a, int64_t n, int64_t k, const char* op) {
  TileSource src{};
  TORCH_CHECK(
      pretext::resolve_tile(g, a.index, a.table, a.rows, a.K, a.offsets, a.by_cell, n, k, src), op,
      ": image ", n, ", slot ", k, ": index out of [0, ", a.rows, "), cell out of [0, ", g.cells,
      ") or offsets out of the cell (index=", a.index[n], ")");
  return src;
}

int64_t task_grain(int64_t pixels_per_task) {
  return std::max<int64_t>(1, kGrainPixels / std::max<int64_t>(1, pixels_per_task));
}

// ---- forward ----------------------------------------------------------------------------------

// Copies the C channels of one t x t tile (at `base`, strides `s`) to dst [C, t, t].
template <typename T>
void copy_tile(const T* base, const Strides4& s, int64_t C, int64_t t, T* dst) {
  const int64_t plane = t * t;
  if (s.w == 1) {  // rows are contiguous
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t y = 0; y < t; ++y) std::copy_n(base + c * s.c + y * s.h, t, dst + c * plane + y * t);
    }
  } else if (s.c == 1) {  // channels-last: pixels are contiguous
    for (int64_t y = 0; y < t; ++y) {
      for (int64_t x = 0; x < t; ++x) {
        const T* px = base + y * s.h + x * s.w;
        T* out = dst + y * t + x;
        for (int64_t c = 0; c < C; ++c) out[c * plane] = px[c];
      }
    }
  } else {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t y = 0; y < t; ++y)
        for (int64_t x = 0; x < t; ++x) dst[c * plane + y * t + x] = base[c * s.c + y * s.h + x * s.w];
  }
}

// sum_{i < n} term(i) in double on lane arrays (cpu::kLanes partial results, then a fixed
// pairwise tree): the loop vectorises and gives the same bits on every run.
template <typename Term>
LK_CLONE_BODY double lane_sum(int64_t n, Term term) {
  double acc[cpu::kLanes] = {};
  const int64_t whole = n - n % cpu::kLanes;
  for (int64_t i = 0; i < whole; i += cpu::kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < cpu::kLanes; ++l) acc[l] += term(i + l);
  }
  for (int64_t i = whole; i < n; ++i) acc[i - whole] += term(i);
  return cpu::tree_sum(acc);
}

// Statistics of one tile channel held in buf[0, n) (sums in double: t*t terms), every reduction
// on lane arrays (one sequential double chain per sum cost 5-20x the copy). A tile of extreme
// magnitude (scale != 1) is summed again scaled; the deviations are taken in acc_t.
template <typename acc_t>
LK_CLONE_BODY TileStats<acc_t> plane_stats(const acc_t* buf, int64_t n) {
  using cpu::kLanes;
  double sums[kLanes] = {};
  acc_t lo[kLanes];
  acc_t hi[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) lo[l] = hi[l] = buf[0];
  const int64_t whole = n - n % kLanes;
  for (int64_t i = 0; i < whole; i += kLanes) {
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) {
      sums[l] += buf[i + l];
      lo[l] = buf[i + l] < lo[l] ? buf[i + l] : lo[l];
      hi[l] = buf[i + l] > hi[l] ? buf[i + l] : hi[l];
    }
  }
  for (int64_t i = whole; i < n; ++i) {
    sums[i - whole] += buf[i];
    lo[0] = buf[i] < lo[0] ? buf[i] : lo[0];
    hi[0] = buf[i] > hi[0] ? buf[i] : hi[0];
  }
  for (int64_t l = 1; l < kLanes; ++l) {
    lo[0] = lo[l] < lo[0] ? lo[l] : lo[0];
    hi[0] = hi[l] > hi[0] ? hi[l] : hi[0];
  }
  double sum = cpu::tree_sum(sums);
  // A NaN anywhere makes the tile non-constant: the compares drop it, the sum keeps it.
  const bool constant = lo[0] == hi[0] && sum == sum;
  const acc_t scale = pretext::tile_scale<acc_t>(std::max(std::abs(lo[0]), std::abs(hi[0])));
  if (scale != acc_t(1)) sum = lane_sum(n, [buf, scale](int64_t i) { return static_cast<double>(buf[i] * scale); });
  const acc_t mean = static_cast<acc_t>(sum / n);
  const double sq = lane_sum(n, [buf, scale, mean](int64_t i) {
    const double d = buf[i] * scale - mean;
    return d * d;
  });
  return pretext::tile_stats<acc_t>(mean, static_cast<acc_t>(sq / n), constant, scale);
}

// Reads one tile channel into buf (unscaled) and returns its statistics.
template <typename in_t, typename acc_t>
LK_CLONE_BODY TileStats<acc_t> gather_plane(const in_t* base, int64_t sh, int64_t sw, int64_t t, acc_t* buf) {
  for (int64_t y = 0; y < t; ++y) {
    for (int64_t x = 0; x < t; ++x) buf[y * t + x] = static_cast<acc_t>(base[y * sh + x * sw]);
  }
  return plane_stats(buf, t * t);
}

// One standardised tile channel: o = (x * scale - mean) * inv_std, 0 for a constant tile.
template <typename in_t, typename acc_t, typename out_t>
LK_CLONE_BODY void normalize_plane_impl(const in_t* base, int64_t sh, int64_t sw, int64_t t, acc_t* buf, out_t* o) {
  const TileStats<acc_t> st = gather_plane<in_t, acc_t>(base, sh, sw, t, buf);
  for (int64_t i = 0; i < t * t; ++i) o[i] = cpu::narrow<out_t>(pretext::normalized(buf[i], st));
}

// ISA clones for the common inputs (float images, uint8 images to float tiles); the other types
// run the baseline build of the same code.
LK_CPU_CLONES void normalize_plane(const float* base, int64_t sh, int64_t sw, int64_t t, float* buf, float* o) {
  normalize_plane_impl(base, sh, sw, t, buf, o);
}

LK_CPU_CLONES void normalize_plane(const uint8_t* base, int64_t sh, int64_t sw, int64_t t, float* buf, float* o) {
  normalize_plane_impl(base, sh, sw, t, buf, o);
}

template <typename in_t, typename acc_t, typename out_t>
void normalize_plane(const in_t* base, int64_t sh, int64_t sw, int64_t t, acc_t* buf, out_t* o) {
  normalize_plane_impl(base, sh, sw, t, buf, o);
}

template <typename in_t, typename out_t, bool kNormalize>
void tiles_forward(
    const at::Tensor& images, const TileArgs& a, const Geometry& g, at::Tensor& out, const char* op) {
  using acc_t = acc_type<in_t>;
  const int64_t N = images.size(0), C = images.size(1), K = a.K, t = g.tile, plane = t * t;
  const Strides4 s = strides_of(images);
  const in_t* x = images.const_data_ptr<in_t>();
  out_t* y = out.data_ptr<out_t>();
  at::parallel_for(0, N * K, task_grain(C * plane), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(kNormalize ? plane : 0);
    for (int64_t nk = begin; nk < end; ++nk) {
      const int64_t n = nk / K, k = nk % K;
      const TileSource src = resolve_or_throw(g, a, n, k, op);
      const in_t* base = x + n * s.n + src.top * s.h + src.left * s.w;
      out_t* dst = y + nk * C * plane;
      if constexpr (!kNormalize) {
        copy_tile<in_t>(base, s, C, t, dst);
      } else {
        for (int64_t c = 0; c < C; ++c) normalize_plane(base + c * s.c, s.h, s.w, t, buf.data(), dst + c * plane);
      }
    }
  });
}

at::Tensor grid_tiles_cpu(
    const at::Tensor& images,
    const at::Tensor& index,
    const at::Tensor& table,
    int64_t grid,
    int64_t tile,
    const c10::optional<at::Tensor>& offsets,
    bool offsets_by_cell,
    bool normalize) {
  constexpr const char* op = "grid_tiles";
  check_grid_tiles_args(images, index, table, grid, tile, offsets, offsets_by_cell, op);
  const int64_t N = images.size(0), C = images.size(1), K = table.size(1);
  at::Tensor out = cpu::empty_output({N, K, C, tile, tile}, images.options().dtype(tile_dtype(images.scalar_type(), normalize)));
  if (out.numel() == 0) return out;
  const TileInputs in = tile_inputs(index, table, offsets, offsets_by_cell);
  const Geometry g = pretext::make_geometry(images.size(2), images.size(3), grid, tile);
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, images.scalar_type(), "grid_tiles_cpu", [&] {
    if (normalize) {
      using out_t = std::conditional_t<std::is_same_v<scalar_t, uint8_t>, float, scalar_t>;
      tiles_forward<scalar_t, out_t, true>(images, in.args, g, out, op);
    } else {
      tiles_forward<scalar_t, scalar_t, false>(images, in.args, g, out, op);
    }
  });
  return out;
}

// ---- backward: scatter-add of each tile's gradient into its image ------------------------------

template <typename scalar_t>
void tiles_backward(
    const at::Tensor& grad, const at::Tensor& images, const TileArgs& a, const Geometry& g, bool normalize,
    at::Tensor& gx) {
  using acc_t = acc_type<scalar_t>;
  const int64_t N = images.size(0), C = images.size(1), K = a.K, t = g.tile, plane = t * t;
  const Strides4 s = strides_of(images);
  const Strides4 sg = strides_of(gx);
  const scalar_t* x = images.const_data_ptr<scalar_t>();
  const scalar_t* gy = grad.const_data_ptr<scalar_t>();
  scalar_t* out = gx.data_ptr<scalar_t>();
  // One task per image: all tiles of image n write only image n's gradient.
  at::parallel_for(0, N, task_grain(K * C * plane), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf(normalize ? plane : 0);
    for (int64_t n = begin; n < end; ++n) {
      for (int64_t k = 0; k < K; ++k) {
        const TileSource src = resolve_or_throw(g, a, n, k, "_grid_tiles_backward");
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* gt = gy + ((n * K + k) * C + c) * plane;
          scalar_t* dst = out + n * sg.n + c * sg.c + src.top * sg.h + src.left * sg.w;
          if (!normalize) {
            for (int64_t y = 0; y < t; ++y)
              for (int64_t xx = 0; xx < t; ++xx) {
                scalar_t& d = dst[y * sg.h + xx * sg.w];
                d = static_cast<scalar_t>(static_cast<acc_t>(d) + static_cast<acc_t>(gt[y * t + xx]));
              }
            continue;
          }
          const scalar_t* base = x + n * s.n + c * s.c + src.top * s.h + src.left * s.w;
          const TileStats<acc_t> st = gather_plane<scalar_t, acc_t>(base, s.h, s.w, t, buf.data());
          for (int64_t i = 0; i < plane; ++i) buf[i] = pretext::normalized(buf[i], st);  // buf now holds y
          const acc_t* y = buf.data();
          const double sum_g = lane_sum(plane, [gt](int64_t i) { return double(static_cast<acc_t>(gt[i])); });
          const double sum_gy =
              lane_sum(plane, [gt, y](int64_t i) { return double(static_cast<acc_t>(gt[i]) * y[i]); });
          const acc_t mean_g = static_cast<acc_t>(sum_g / plane);
          const acc_t mean_gy = static_cast<acc_t>(sum_gy / plane);
          for (int64_t y = 0; y < t; ++y)
            for (int64_t xx = 0; xx < t; ++xx) {
              const int64_t i = y * t + xx;
              const acc_t d = pretext::normalized_grad(static_cast<acc_t>(gt[i]), buf[i], st, mean_g, mean_gy);
              scalar_t& o = dst[y * sg.h + xx * sg.w];
              o = static_cast<scalar_t>(static_cast<acc_t>(o) + d);
            }
        }
      }
    }
  });
}

at::Tensor grid_tiles_backward_cpu(
    const at::Tensor& grad,
    const at::Tensor& images,
    const at::Tensor& index,
    const at::Tensor& table,
    int64_t grid,
    int64_t tile,
    const c10::optional<at::Tensor>& offsets,
    bool offsets_by_cell,
    bool normalize) {
  constexpr const char* op = "_grid_tiles_backward";
  check_grid_tiles_args(images, index, table, grid, tile, offsets, offsets_by_cell, op);
  check_grid_tiles_backward_args(grad, images, table, tile);
  at::Tensor gx = cpu::zeros_output_like(images);
  if (grad.numel() == 0) return gx;
  const at::Tensor g = grad.contiguous();
  const TileInputs in = tile_inputs(index, table, offsets, offsets_by_cell);
  const Geometry geo = pretext::make_geometry(images.size(2), images.size(3), grid, tile);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "grid_tiles_backward_cpu", [&] {
    tiles_backward<scalar_t>(g, images, in.args, geo, normalize, gx);
  });
  return gx;
}

// ---- rotate90 ----------------------------------------------------------------------------------

constexpr int64_t kRowBlock = 16;  // output rows of one plane per rotate90 task

// Any strides: along an output row the source moves by a fixed step, along a source row for
// k = 0, 2, down a source column for k = 1, 3 (walked j outermost, so the rows' reads of one step
// share a source cache line).
template <typename T>
void rotate_strided_rows(const T* src, const Strides4& s, T* dst, const Strides4& so, int64_t S, int64_t kn,
                         int64_t i0, int64_t i1) {
  int64_t start[kRowBlock];
  const int64_t rows = i1 - i0;
  int64_t step = 0;
  for (int64_t b = 0; b < rows; ++b) {
    int64_t si0, sj0, si1, sj1;
    pretext::rotate_source(kn, S, i0 + b, 0, si0, sj0);
    pretext::rotate_source(kn, S, i0 + b, S > 1 ? 1 : 0, si1, sj1);
    start[b] = si0 * s.h + sj0 * s.w;
    step = S > 1 ? (si1 - si0) * s.h + (sj1 - sj0) * s.w : 0;
  }
  dst += i0 * so.h;
  if (kn % 2 == 0) {
    for (int64_t b = 0; b < rows; ++b)
      for (int64_t j = 0; j < S; ++j) dst[b * so.h + j * so.w] = src[start[b] + j * step];
  } else {
    for (int64_t j = 0; j < S; ++j)
      for (int64_t b = 0; b < rows; ++b) dst[b * so.h + j * so.w] = src[start[b] + j * step];
  }
}

// Rows contiguous in source and output (the NCHW case). Quarter turns are transposes with a
// flipped axis: k = 1 is the source transposed into the output rows bottom-up, k = 3 the source
// read bottom-up, transposed (cpu/transpose.h).
// Output rows [i0, i1) of one S x S plane turned by k quarter turns.
template <typename T>
void rotate_plane_rows(const T* src, int64_t sh, T* dst, int64_t dh, int64_t S, int64_t k, int64_t i0, int64_t i1) {
  const int64_t last = S - 1;
  switch (k) {
    case 0:
      for (int64_t i = i0; i < i1; ++i) std::copy_n(src + i * sh, S, dst + i * dh);
      break;
    case 2:
      for (int64_t i = i0; i < i1; ++i) {
        const T* row = src + (last - i) * sh;
        T* out = dst + i * dh;
        for (int64_t j = 0; j < S; ++j) out[j] = row[last - j];
      }
      break;
    case 1:  // out[i][j] = src[j][last - i]: output row i is row (last - i) of the transpose
      cpu::transpose_rows(src, sh, dst + last * dh, -dh, S, last - i1 + 1, last - i0 + 1);
      break;
    default:  // 3: out[i][j] = src[last - j][i]: the transpose of the source read bottom-up
      cpu::transpose_rows(src + last * sh, -sh, dst, dh, S, i0, i1);
  }
}

template <typename T>
void rotate_images(const at::Tensor& images, const int64_t* k, at::Tensor& out) {
  const int64_t N = images.size(0), C = images.size(1), S = images.size(2);
  const Strides4 s = strides_of(images);
  const Strides4 so = strides_of(out);
  const T* x = images.const_data_ptr<T>();
  T* y = out.data_ptr<T>();
  auto turns = [&](int64_t n) {
    TORCH_CHECK(k[n] >= 0 && k[n] < 4, "rotate90: k must hold values in [0, 4) (quarter turns), got ", k[n]);
    return k[n];
  };
  if (s.c == 1 && so.c == 1) {  // channels-last: copy whole pixels
    at::parallel_for(0, N * S, task_grain(S * C), [&](int64_t begin, int64_t end) {
      for (int64_t ni = begin; ni < end; ++ni) {
        const int64_t n = ni / S, i = ni % S, kn = turns(n);
        for (int64_t j = 0; j < S; ++j) {
          int64_t si, sj;
          pretext::rotate_source(kn, S, i, j, si, sj);
          std::copy_n(x + n * s.n + si * s.h + sj * s.w, C, y + n * so.n + i * so.h + j * so.w);
        }
      }
    });
    return;
  }
  // Tasks are blocks of kRowBlock output rows of one plane.
  const int64_t blocks = (S + kRowBlock - 1) / kRowBlock;
  const bool rows_contiguous = s.w == 1 && so.w == 1;
  at::parallel_for(0, N * C * blocks, task_grain(S * kRowBlock), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t blk = r % blocks, c = (r / blocks) % C, n = r / (blocks * C), kn = turns(n);
      const int64_t i0 = blk * kRowBlock, i1 = std::min(S, i0 + kRowBlock);
      const T* src = x + n * s.n + c * s.c;
      T* dst = y + n * so.n + c * so.c;
      if (rows_contiguous)
        rotate_plane_rows(src, s.h, dst, so.h, S, kn, i0, i1);
      else
        rotate_strided_rows(src, s, dst, so, S, kn, i0, i1);
    }
  });
}

at::Tensor rotate90_cpu(const at::Tensor& images, const at::Tensor& k) {
  check_rotate90_args(images, k);
  at::Tensor out = cpu::empty_output_like(images);
  if (out.numel() == 0) return out;
  const at::Tensor kc = k.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, images.scalar_type(), "rotate90_cpu", [&] {
    rotate_images<scalar_t>(images, kc.const_data_ptr<int64_t>(), out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(labelkit, CPU, m) {
  m.impl("grid_tiles", &grid_tiles_cpu);
  m.impl("_grid_tiles_backward", &grid_tiles_backward_cpu);
  m.impl("rotate90", &rotate90_cpu);
}

}  // namespace labelkit
