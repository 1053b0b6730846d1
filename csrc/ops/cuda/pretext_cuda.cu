// CUDA kernels of the pretext family.
//   grid_tiles:  a group of 32-256 threads per (image, slot) tile, which resolves the tile's
//                source once (ops/pretext.h) and walks its C x t x t output in order, carrying
//                (channel, row, column) by additions; with normalize one block per tile channel
//                (two block reductions, then the write).
//   backward:    gather form, no atomics: one thread per image pixel sums the gradients of the
//                slots whose tile covers it (a permutation gives at most one), so the result
//                is deterministic and every pixel is written once (zeros outside the tiles).
//                With normalize a first kernel stores each tile channel's statistics.
//   rotate90:    channels-first: a block per 32 x 32 output tile of a plane, staged through
//                shared memory, so that quarter turns read and write rows (coalesced) instead
//                of reading columns; channels-last: one thread per output element in the
//                output's memory order (channels innermost: reads coalesce already).
// A bad index, cell or offset, or k (possible only when the eager Python checks were skipped:
// torch.compile, a direct torch.ops call) is a device-side assert, as the CPU kernel raises; the
// tile or image is still only zeros, never an out-of-bounds read. Each kernel asserts once, at
// its end (an assert inside the loops keeps values live across it).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "ops/cuda/grid.h"
#include "ops/pretext.h"
#include "ops/pretext_checks.h"

namespace labelkit {
namespace {

using pretext::Geometry;
using pretext::TileSource;
using pretext::TileStats;

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loops cover the rest
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
using acc_type = pretext_acc_t<T>;

__device__ __forceinline__ bool resolve(const Geometry& g, const TileArgs& a, int64_t n, int64_t k, TileSource& src) {
  return pretext::resolve_tile(g, a.index, a.table, a.rows, a.K, a.offsets, a.by_cell, n, k, src);
}

int blocks_for(int64_t work, int threads = kThreads) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, kMaxBlocks)));
}

// ---- block reductions (every thread gets the result; ends with a barrier) ---------------------

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct MinOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return b < a ? b : a; }
};
struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return b > a ? b : a; }
};

template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* smem) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v = op(v, __shfl_xor_sync(kFullMask, v, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, nwarps = blockDim.x / 32;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T r = smem[0];
  for (int w = 1; w < nwarps; ++w) r = op(r, smem[w]);
  __syncthreads();
  return r;
}

// Statistics of one t x t tile channel read at `base` (strides sh, sw) by the whole block. A
// tile of extreme magnitude (scale != 1, the same for the whole block) is summed again scaled.
template <typename in_t, typename acc_t>
__device__ TileStats<acc_t> plane_stats(const in_t* base, int64_t sh, int64_t sw, int64_t t, acc_t* smem) {
  const int64_t n = t * t;
  acc_t sum = 0;
  acc_t lo = static_cast<acc_t>(base[0]);
  acc_t hi = lo;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc_t v = static_cast<acc_t>(base[(i / t) * sh + (i % t) * sw]);
    sum += v;
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
  }
  sum = block_reduce(sum, SumOp{}, smem);
  lo = block_reduce(lo, MinOp{}, smem);
  hi = block_reduce(hi, MaxOp{}, smem);
  // lo == hi fails on a NaN first pixel; the NaN sum catches one elsewhere.
  const bool constant = lo == hi && sum == sum;
  const acc_t scale = pretext::tile_scale<acc_t>(::fmax(::fabs(lo), ::fabs(hi)));
  if (scale != acc_t(1)) {
    sum = 0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      sum += static_cast<acc_t>(base[(i / t) * sh + (i % t) * sw]) * scale;
    }
    sum = block_reduce(sum, SumOp{}, smem);
  }
  const acc_t mean = sum / static_cast<acc_t>(n);
  acc_t sq = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const acc_t d = static_cast<acc_t>(base[(i / t) * sh + (i % t) * sw]) * scale - mean;
    sq += d * d;
  }
  sq = block_reduce(sq, SumOp{}, smem);
  return pretext::tile_stats<acc_t>(mean, sq / static_cast<acc_t>(n), constant, scale);
}

// ---- forward --------------------------------------------------------------------------------------

// Loads each thread keeps in flight per step: one 4-byte load per thread leaves an SM far
// short of the bytes HBM needs in flight to stream at full speed.
constexpr int kCopyUnroll = 4;

// A thread's walk through a C x t x t tile in steps of `group` elements: its row and column in
// the tile and the source offset, advanced by additions and two carries (no division, no
// multiply per element). index_t is int32_t when every offset inside a tile fits (fewer
// registers: more threads, so more loads, in flight per SM).
template <typename index_t>
struct TileWalk {
  index_t yy, xx, off;
};

template <typename index_t>
struct TileStep {
  index_t t, dy, dx;       // the step's rows and columns (dy, dx < t)
  index_t off;             // the step's source offset (its channels, rows and columns)
  index_t wrap_x, wrap_y;  // offset corrections when a column or row wraps
};

template <typename index_t>
__device__ __forceinline__ void advance(TileWalk<index_t>& w, const TileStep<index_t>& st) {
  w.xx += st.dx;
  w.off += st.off;
  if (w.xx >= st.t) {
    w.xx -= st.t;
    ++w.yy;
    w.off += st.wrap_x;
  }
  w.yy += st.dy;
  if (w.yy >= st.t) {
    w.yy -= st.t;
    w.off += st.wrap_y;
  }
}

// Groups of `group` threads (a power of two dividing the block), one (image, slot) tile each.
// Resolving the source once per tile, not per element, takes the several 64-bit divisions of
// ops/pretext.h out of the copy: per element only additions and the load/store remain.
template <typename T, typename index_t>
__global__ void __launch_bounds__(kThreads) tiles_copy_kernel(
    const T* __restrict__ x, Strides4 s, Geometry g, TileArgs a, int64_t C, int64_t tiles, int group, T* __restrict__ y) {
  const index_t t = static_cast<index_t>(g.tile), area = t * t, vol = static_cast<index_t>(C) * area;
  const index_t sc = static_cast<index_t>(s.c), sh = static_cast<index_t>(s.h), sw = static_cast<index_t>(s.w);
  const index_t G = group, lane = threadIdx.x % group;
  const index_t dx = G % t, dy = G / t % t, dc = G / area;
  const TileStep<index_t> step{t, dy, dx, dc * sc + dy * sh + dx * sw, sh - t * sw, sc - t * sh};
  const TileWalk<index_t> start{lane / t % t, lane % t, lane / area * sc + lane / t % t * sh + lane % t * sw};
  const int per_block = blockDim.x / group;
  bool ok = true;
  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * per_block + threadIdx.x / group; tile < tiles;
       tile += static_cast<int64_t>(gridDim.x) * per_block) {
    const int64_t n = tile / a.K, k = tile % a.K;
    T* out = y + tile * static_cast<int64_t>(vol);
    TileSource src;
    if (!resolve(g, a, n, k, src)) {
      for (index_t i = lane; i < vol; i += G) out[i] = static_cast<T>(0);
      ok = false;
      continue;
    }
    const T* in = x + n * s.n + src.top * s.h + src.left * s.w;
    TileWalk<index_t> w = start;
    for (index_t i = lane; i < vol; i += kCopyUnroll * G) {
      T v[kCopyUnroll];
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        if (i + u * G < vol) v[u] = in[w.off];
        advance(w, step);
      }
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        if (i + u * G < vol) out[i + u * G] = v[u];
      }
    }
  }
  CUDA_KERNEL_ASSERT(ok && "grid_tiles: index out of range, cell out of range or offsets out of the cell");
}

// Whether int32 holds every offset a copy thread forms inside a tile: the image's whole extent
// (one image's, with margin for the walk's steps past the tile's end) and the tile's volume.
bool tile_offsets_fit_int32(const at::Tensor& images, int64_t vol, int group) {
  int64_t extent = 1;
  for (int d = 1; d < images.dim(); ++d) extent += (images.size(d) - 1) * std::abs(images.stride(d));
  const int64_t step = kCopyUnroll * group * (std::abs(images.stride(1)) + std::abs(images.stride(2)) + std::abs(images.stride(3)));
  return extent + step < (int64_t{1} << 30) && vol + kCopyUnroll * group < (int64_t{1} << 30);
}

// Threads per tile: enough for about kCopyUnroll * 4 elements each, 32 to kThreads.
int copy_group(int64_t vol) {
  int group = 32;
  while (group < kThreads && static_cast<int64_t>(group) * kCopyUnroll * 4 < vol) group *= 2;
  return group;
}

template <typename in_t, typename out_t>
__global__ void __launch_bounds__(kThreads) tiles_normalize_kernel(
    const in_t* __restrict__ x, Strides4 s, Geometry g, TileArgs a, int64_t C, int64_t planes, out_t* __restrict__ y) {
  using acc_t = acc_type<in_t>;
  __shared__ acc_t smem[32];
  const int64_t t = g.tile, area = t * t;
  bool ok = true;
  for (int64_t p = blockIdx.x; p < planes; p += gridDim.x) {
    const int64_t c = p % C, nk = p / C, n = nk / a.K, k = nk % a.K;
    out_t* o = y + p * area;
    TileSource src;
    if (!resolve(g, a, n, k, src)) {  // uniform across the block: no barrier is skipped unevenly
      for (int64_t i = threadIdx.x; i < area; i += blockDim.x) o[i] = static_cast<out_t>(0.0f);
      ok = false;
      continue;
    }
    const in_t* base = x + n * s.n + c * s.c + src.top * s.h + src.left * s.w;
    const TileStats<acc_t> st = plane_stats<in_t, acc_t>(base, s.h, s.w, t, smem);
    for (int64_t i = threadIdx.x; i < area; i += blockDim.x) {
      const acc_t v = static_cast<acc_t>(base[(i / t) * s.h + (i % t) * s.w]);
      o[i] = static_cast<out_t>(pretext::normalized(v, st));
    }
  }
  CUDA_KERNEL_ASSERT(ok && "grid_tiles: index out of range, cell out of range or offsets out of the cell");
}

at::Tensor grid_tiles_cuda(
    const at::Tensor& images,
    const at::Tensor& index,
    const at::Tensor& table,
    int64_t grid,
    int64_t tile,
    const c10::optional<at::Tensor>& offsets,
    bool offsets_by_cell,
    bool normalize) {
  check_grid_tiles_args(images, index, table, grid, tile, offsets, offsets_by_cell, "grid_tiles");
  const c10::cuda::CUDAGuard guard(images.device());
  const int64_t N = images.size(0), C = images.size(1), K = table.size(1);
  at::Tensor out = at::empty({N, K, C, tile, tile}, images.options().dtype(tile_dtype(images.scalar_type(), normalize)));
  if (out.numel() == 0) return out;
  const TileInputs in = tile_inputs(index, table, offsets, offsets_by_cell);
  const TileArgs& a = in.args;
  const Geometry g = pretext::make_geometry(images.size(2), images.size(3), grid, tile);
  const Strides4 s = strides_of(images);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, images.scalar_type(), "grid_tiles_cuda", [&] {
    if (normalize) {
      using out_t = std::conditional_t<std::is_same_v<scalar_t, uint8_t>, float, scalar_t>;
      const int64_t planes = N * K * C;
      tiles_normalize_kernel<scalar_t, out_t><<<blocks_for(planes, 1), kThreads, 0, stream>>>(
          images.const_data_ptr<scalar_t>(), s, g, a, C, planes, out.data_ptr<out_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int group = copy_group(C * tile * tile);
      const int64_t blocks = grid_for(N * K, kThreads / group);
      const scalar_t* xp = images.const_data_ptr<scalar_t>();
      if (tile_offsets_fit_int32(images, C * tile * tile, group)) {
        tiles_copy_kernel<scalar_t, int32_t><<<blocks, kThreads, 0, stream>>>(xp, s, g, a, C, N * K, group, out.data_ptr<scalar_t>());
      } else {
        tiles_copy_kernel<scalar_t, int64_t><<<blocks, kThreads, 0, stream>>>(xp, s, g, a, C, N * K, group, out.data_ptr<scalar_t>());
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

// ---- backward ---------------------------------------------------------------------------------

// Per tile channel: mean, inv_std, constant (as 0/1), mean(g), mean(g * y), scale.
constexpr int kStatFields = 6;

template <typename T>
__global__ void __launch_bounds__(kThreads) tiles_backward_stats_kernel(
    const T* __restrict__ x, Strides4 s, const T* __restrict__ grad, Geometry g, TileArgs a, int64_t C, int64_t planes,
    acc_type<T>* __restrict__ stats) {
  using acc_t = acc_type<T>;
  __shared__ acc_t smem[32];
  const int64_t t = g.tile, area = t * t;
  bool ok = true;
  for (int64_t p = blockIdx.x; p < planes; p += gridDim.x) {
    const int64_t c = p % C, nk = p / C, n = nk / a.K, k = nk % a.K;
    TileSource src;
    if (!resolve(g, a, n, k, src)) {  // the pixel kernel skips invalid tiles too
      ok = false;
      continue;
    }
    const T* base = x + n * s.n + c * s.c + src.top * s.h + src.left * s.w;
    const T* gt = grad + p * area;
    const TileStats<acc_t> st = plane_stats<T, acc_t>(base, s.h, s.w, t, smem);
    acc_t sg = 0, sgy = 0;
    for (int64_t i = threadIdx.x; i < area; i += blockDim.x) {
      const acc_t gv = static_cast<acc_t>(gt[i]);
      const acc_t yv = pretext::normalized(static_cast<acc_t>(base[(i / t) * s.h + (i % t) * s.w]), st);
      sg += gv;
      sgy += gv * yv;
    }
    sg = block_reduce(sg, SumOp{}, smem);
    sgy = block_reduce(sgy, SumOp{}, smem);
    if (threadIdx.x == 0) {
      acc_t* out = stats + p * kStatFields;
      out[0] = st.mean;
      out[1] = st.inv_std;
      out[2] = st.constant ? acc_t(1) : acc_t(0);
      out[3] = sg / static_cast<acc_t>(area);
      out[4] = sgy / static_cast<acc_t>(area);
      out[5] = st.scale;
    }
  }
  CUDA_KERNEL_ASSERT(ok && "_grid_tiles_backward: index out of range, cell out of range or offsets out of the cell");
}

template <typename T, bool kNormalize>
__global__ void __launch_bounds__(kThreads) tiles_backward_pixel_kernel(
    const T* __restrict__ x, Strides4 s, const T* __restrict__ grad, const acc_type<T>* __restrict__ stats, Geometry g,
    TileArgs a, int64_t C, int64_t H, int64_t W, int64_t total, T* __restrict__ gx, Strides4 sg) {
  using acc_t = acc_type<T>;
  const int64_t t = g.tile, area = t * t;
  bool ok = true;  // every tile of image n is resolved by the threads of its pixels in the grid
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t w = e % W, h = (e / W) % H, c = (e / (W * H)) % C, n = e / (W * H * C);
    const int64_t row = h / g.cell_h, col = w / g.cell_w;
    acc_t acc = 0;
    if (row < g.grid && col < g.grid) {
      const int64_t cell = row * g.grid + col;
      for (int64_t k = 0; k < a.K; ++k) {
        TileSource src;
        if (!resolve(g, a, n, k, src)) {
          ok = false;
          continue;
        }
        if (src.cell != cell) continue;
        const int64_t dy = h - src.top, dx = w - src.left;
        if (dy < 0 || dy >= t || dx < 0 || dx >= t) continue;
        const int64_t p = (n * a.K + k) * C + c;
        const acc_t gv = static_cast<acc_t>(grad[p * area + dy * t + dx]);
        if constexpr (kNormalize) {
          const acc_t* sp = stats + p * kStatFields;
          const TileStats<acc_t> st{sp[0], sp[1], sp[2] != acc_t(0), sp[5]};
          const acc_t yv = pretext::normalized(static_cast<acc_t>(x[n * s.n + c * s.c + h * s.h + w * s.w]), st);
          acc += pretext::normalized_grad(gv, yv, st, sp[3], sp[4]);
        } else {
          acc += gv;
        }
      }
    }
    gx[n * sg.n + c * sg.c + h * sg.h + w * sg.w] = static_cast<T>(acc);
  }
  CUDA_KERNEL_ASSERT(ok && "_grid_tiles_backward: index out of range, cell out of range or offsets out of the cell");
}

at::Tensor grid_tiles_backward_cuda(
    const at::Tensor& grad,
    const at::Tensor& images,
    const at::Tensor& index,
    const at::Tensor& table,
    int64_t grid,
    int64_t tile,
    const c10::optional<at::Tensor>& offsets,
    bool offsets_by_cell,
    bool normalize) {
  check_grid_tiles_args(images, index, table, grid, tile, offsets, offsets_by_cell, "_grid_tiles_backward");
  check_grid_tiles_backward_args(grad, images, table, tile);
  const c10::cuda::CUDAGuard guard(images.device());
  at::Tensor gx = at::empty_like(images);
  if (gx.numel() == 0) return gx;
  if (grad.numel() == 0) return gx.zero_();
  const int64_t N = images.size(0), C = images.size(1), H = images.size(2), W = images.size(3), K = table.size(1);
  const at::Tensor g = grad.contiguous();
  const TileInputs in = tile_inputs(index, table, offsets, offsets_by_cell);
  const TileArgs& a = in.args;
  const Geometry geo = pretext::make_geometry(H, W, grid, tile);
  const Strides4 s = strides_of(images), sg = strides_of(gx);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t total = gx.numel(), planes = N * K * C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, images.scalar_type(), "grid_tiles_backward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* xp = images.const_data_ptr<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    if (normalize) {
      at::Tensor stats = at::empty({planes, kStatFields}, images.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      tiles_backward_stats_kernel<scalar_t><<<blocks_for(planes, 1), kThreads, 0, stream>>>(
          xp, s, gp, geo, a, C, planes, stats.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      tiles_backward_pixel_kernel<scalar_t, true><<<blocks_for(total), kThreads, 0, stream>>>(
          xp, s, gp, stats.const_data_ptr<acc_t>(), geo, a, C, H, W, total, gx.data_ptr<scalar_t>(), sg);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      tiles_backward_pixel_kernel<scalar_t, false><<<blocks_for(total), kThreads, 0, stream>>>(
          xp, s, gp, nullptr, geo, a, C, H, W, total, gx.data_ptr<scalar_t>(), sg);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return gx;
}

// ---- rotate90 ----------------------------------------------------------------------------------

// Channels-last: output elements in the output's memory order (channels innermost), so writes
// coalesce and a quarter turn's reads of neighbouring threads share a pixel's channels.
template <typename T, typename index_t>
__global__ void __launch_bounds__(kThreads) rotate90_kernel(
    const T* __restrict__ x, Strides4 s, const int64_t* __restrict__ k, int64_t C, int64_t S, index_t total,
    T* __restrict__ y, Strides4 so) {
  const index_t Si = static_cast<index_t>(S), Ci = static_cast<index_t>(C);
  bool ok = true;
  for (index_t e = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total;
       e += static_cast<index_t>(blockDim.x) * gridDim.x) {
    const index_t c = e % Ci, j = (e / Ci) % Si, i = (e / (Ci * Si)) % Si, n = e / (Ci * Si * Si);
    const int64_t kn = k[n];
    T v = static_cast<T>(0);
    if (kn >= 0 && kn < 4) {
      int64_t si, sj;
      pretext::rotate_source(kn, S, i, j, si, sj);
      v = x[n * s.n + c * s.c + si * s.h + sj * s.w];
    } else {
      ok = false;
    }
    y[n * so.n + c * so.c + static_cast<int64_t>(i) * so.h + static_cast<int64_t>(j) * so.w] = v;
  }
  CUDA_KERNEL_ASSERT(ok && "rotate90: k must hold values in [0, 4) (quarter turns)");
}

constexpr int kRotTile = 32;  // a block's output tile is kRotTile x kRotTile pixels of one plane

// Channels-first rotation: each block iteration stages the kRotTile x kRotTile source square of
// one output tile in shared memory with row reads, then writes the output tile by rows. A quarter
// turn maps a square onto a square, so the tile's source is the square whose corner is the
// smaller of its corners' sources (partly outside the image for a tile at the bottom or right
// edge: those pixels are not loaded and no output inside the image reads them). The per-element
// kernel read a column per quarter turn: one 4-byte word per 32-byte sector it fetched.
template <typename T>
__global__ void __launch_bounds__(kThreads) rotate90_tiled_kernel(
    const T* __restrict__ x, Strides4 s, const int64_t* __restrict__ k, int64_t C, int64_t S, int64_t per_side,
    int64_t tiles, T* __restrict__ y, Strides4 so) {
  // Raw bytes: c10::Half / BFloat16 have constructors, which __shared__ variables may not run.
  // (double: aligned for every T, 8 bytes at most).
  __shared__ double raw[(kRotTile * (kRotTile + 1) * sizeof(T) + sizeof(double) - 1) / sizeof(double)];
  T(&buf)[kRotTile][kRotTile + 1] = *reinterpret_cast<T(*)[kRotTile][kRotTile + 1]>(raw);  // +1: no bank conflicts on columns
  const int tx = threadIdx.x % kRotTile, ty = threadIdx.x / kRotTile, rows = blockDim.x / kRotTile;
  bool ok = true;
  for (int64_t b = blockIdx.x; b < tiles; b += gridDim.x) {
    const int64_t plane = b / (per_side * per_side), r = b % (per_side * per_side);
    const int64_t n = plane / C, c = plane % C;
    const int64_t i0 = r / per_side * kRotTile, j0 = r % per_side * kRotTile;
    const int64_t kn = k[n];
    const bool valid = kn >= 0 && kn < 4;  // uniform across the block: the barriers stay even
    ok = ok && valid;
    int64_t si0 = 0, sj0 = 0, si1 = 0, sj1 = 0;
    if (valid) {
      pretext::rotate_source(kn, S, i0, j0, si0, sj0);
      pretext::rotate_source(kn, S, i0 + kRotTile - 1, j0 + kRotTile - 1, si1, sj1);
    }
    const int64_t r0 = si0 < si1 ? si0 : si1, c0 = sj0 < sj1 ? sj0 : sj1;
    const T* in = x + n * s.n + c * s.c;
    __syncthreads();  // the previous tile's reads of buf are done
    for (int yy = ty; yy < kRotTile; yy += rows) {
      const int64_t si = r0 + yy, sj = c0 + tx;
      if (valid && si >= 0 && si < S && sj >= 0 && sj < S) buf[yy][tx] = in[si * s.h + sj * s.w];
    }
    __syncthreads();
    T* out = y + n * so.n + c * so.c;
    for (int yy = ty; yy < kRotTile; yy += rows) {
      const int64_t i = i0 + yy, j = j0 + tx;
      if (i >= S || j >= S) continue;
      T v = static_cast<T>(0);
      if (valid) {
        int64_t si, sj;
        pretext::rotate_source(kn, S, i, j, si, sj);
        v = buf[si - r0][sj - c0];
      }
      out[i * so.h + j * so.w] = v;
    }
  }
  CUDA_KERNEL_ASSERT(ok && "rotate90: k must hold values in [0, 4) (quarter turns)");
}

template <typename T>
void launch_rotate_tiled(const at::Tensor& images, const at::Tensor& k, at::Tensor& out, cudaStream_t stream) {
  const int64_t N = images.size(0), C = images.size(1), S = images.size(2);
  const int64_t per_side = (S + kRotTile - 1) / kRotTile, tiles = N * C * per_side * per_side;
  rotate90_tiled_kernel<T><<<grid_for(tiles, 1), kThreads, 0, stream>>>(
      images.const_data_ptr<T>(), strides_of(images), k.const_data_ptr<int64_t>(), C, S, per_side, tiles,
      out.data_ptr<T>(), strides_of(out));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_rotate_channels_last(const at::Tensor& images, const at::Tensor& k, at::Tensor& out, cudaStream_t stream) {
  const int64_t C = images.size(1), S = images.size(2), total = out.numel();
  const Strides4 s = strides_of(images), so = strides_of(out);
  if (total <= std::numeric_limits<int32_t>::max() / 2) {
    rotate90_kernel<T, int32_t><<<blocks_for(total), kThreads, 0, stream>>>(
        images.const_data_ptr<T>(), s, k.const_data_ptr<int64_t>(), C, S, static_cast<int32_t>(total),
        out.data_ptr<T>(), so);
  } else {
    rotate90_kernel<T, int64_t><<<blocks_for(total), kThreads, 0, stream>>>(
        images.const_data_ptr<T>(), s, k.const_data_ptr<int64_t>(), C, S, total, out.data_ptr<T>(), so);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor rotate90_cuda(const at::Tensor& images, const at::Tensor& k) {
  check_rotate90_args(images, k);
  const c10::cuda::CUDAGuard guard(images.device());
  at::Tensor out = at::empty_like(images);
  if (out.numel() == 0) return out;
  const at::Tensor kc = k.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool channels_last = out.stride(1) == 1 && out.size(1) > 1;
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, images.scalar_type(), "rotate90_cuda", [&] {
    if (channels_last) {
      launch_rotate_channels_last<scalar_t>(images, kc, out, stream);
    } else {
      launch_rotate_tiled<scalar_t>(images, kc, out, stream);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(labelkit, CUDA, m) {
  m.impl("grid_tiles", &grid_tiles_cuda);
  m.impl("_grid_tiles_backward", &grid_tiles_backward_cuda);
  m.impl("rotate90", &rotate90_cuda);
}

}  // namespace labelkit
