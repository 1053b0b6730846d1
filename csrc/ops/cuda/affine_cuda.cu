// CUDA kernels of the affine grid-sample op (math in ops/affine.h, shared with the CPU kernels).
//
//   maps     one thread per sample: θ -> PixelMap (double coefficients; each pixel's source
//            coordinate is formed in double and rounded once to the compute type).
//   forward  one thread per output pixel and chunk of channels, looping over the chunk: no grid
//            in memory. Chunks only when the pixels alone leave the device under-filled.
//   θ grad   each block reduces its tile of output pixels of one sample to six partial sums
//            (fixed-shape tree in shared memory); a second kernel adds the partials of each
//            sample in block order. Deterministic, and no atomics.
//   input    one thread per input pixel and chunk of kChannelChunk channels (in registers)
//            gathers from the output pixels whose taps touch it (affine::gather_taps, through
//            the inverse map). Deterministic, no atomics, so it runs under
//            torch.use_deterministic_algorithms.
//
// Not yet run on a GPU (developed on a CPU-only machine): the arithmetic is the CPU kernels'
// (same header), but launch configuration and performance are unverified.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "ops/affine.h"
#include "ops/affine_checks.h"
#include "ops/cuda/grid.h"

namespace labelkit {
namespace {

namespace af = affine;

constexpr int kThreads = 256;
constexpr int kChannelChunk = 8;  // register accumulators per thread in the input gather
constexpr int64_t kMaxBlocks = 65535 * 8;

template <typename scalar_t>
using coord_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

struct Geometry {
  int64_t N, C, H, W, Ho, Wo;
  int64_t mode, padding;
  bool align;
};

struct Strides4 {
  int64_t n, c, h, w;
};

Strides4 strides_of(const at::Tensor& t) {
  return Strides4{t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

int64_t blocks_for(int64_t work) {
  return std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, kMaxBlocks));
}

// ---- maps ------------------------------------------------------------------------------------

template <typename T>
__global__ void __launch_bounds__(kThreads) maps_kernel(const double* __restrict__ theta, Geometry g, af::PixelMap<T>* __restrict__ maps) {
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < g.N; n += int64_t(gridDim.x) * blockDim.x) {
    maps[n] = af::pixel_map<T>(theta + 6 * n, g.H, g.W, g.Ho, g.Wo, g.align);
  }
}

// Device buffer of one PixelMap<T> per sample (bytes in a uint8 tensor, kept alive by the caller).
template <typename T>
at::Tensor make_maps(const at::Tensor& theta, const Geometry& g, cudaStream_t stream) {
  const at::Tensor th = theta.to(at::kDouble).contiguous();
  at::Tensor maps = at::empty({g.N * int64_t(sizeof(af::PixelMap<T>))}, theta.options().dtype(at::kByte));
  maps_kernel<T><<<blocks_for(g.N), kThreads, 0, stream>>>(
      th.const_data_ptr<double>(), g, reinterpret_cast<af::PixelMap<T>*>(maps.mutable_data_ptr<uint8_t>()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return maps;
}

template <typename T>
const af::PixelMap<T>* maps_ptr(const at::Tensor& maps) {
  return reinterpret_cast<const af::PixelMap<T>*>(maps.const_data_ptr<uint8_t>());
}

// ---- forward ---------------------------------------------------------------------------------

// Channels per chunk when `items` work items (pixels, tiles) would under-fill the device, which
// wants `want` of them: the channels split into as many chunks as it takes to reach `want`, each
// of at least kChannelChunk channels; all C (one chunk) when `items` reach `want` already.
int64_t channel_chunk(int64_t C, int64_t items, int64_t want) {
  if (items >= want || C <= kChannelChunk) return C;
  const int64_t split = std::min<int64_t>((C + kChannelChunk - 1) / kChannelChunk, (want + items - 1) / items);
  return (C + split - 1) / split;
}

// Forward: a small image of many channels still gives every SM its threads (16 x 64 x 56 x 56:
// 50,176 pixels for ~270,000 resident threads on an H100). Each chunk recomputes the pixel's
// taps: a few dozen instructions against its channels' loads.
int64_t forward_channel_chunk(int64_t pixels, int64_t C) {
  return channel_chunk(C, pixels, static_cast<int64_t>(sm_count()) * 2048);
}

// Work items (n, chunk, oy, ox), ox fastest: a warp writes a row of one channel.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) forward_kernel(
    const scalar_t* __restrict__ x, Strides4 xs, const af::PixelMap<coord_t<scalar_t>>* __restrict__ maps, Geometry g,
    int64_t chunk, scalar_t* __restrict__ out, Strides4 os) {
  using T = coord_t<scalar_t>;
  const int64_t chunks = (g.C + chunk - 1) / chunk;
  const int64_t total = g.N * chunks * g.Ho * g.Wo;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ox = i % g.Wo;
    const int64_t oy = (i / g.Wo) % g.Ho;
    const int64_t q = i / (g.Wo * g.Ho);
    const int64_t n = q / chunks, c0 = q % chunks * chunk, c1 = c0 + chunk < g.C ? c0 + chunk : g.C;
    const af::PixelMap<T> m = maps[n];
    scalar_t* o = out + n * os.n + oy * os.h + ox * os.w;
    if (!m.valid) {
      for (int64_t c = c0; c < c1; ++c) o[c * os.c] = scalar_t(0);
      continue;
    }
    const af::Taps<T> t = af::output_taps(m, ox, oy, g.H, g.W, xs.h, xs.w, g.mode, g.padding, g.align);
    const int ntaps = g.mode == af::kNearest ? 1 : 4;
    const scalar_t* xn = x + n * xs.n;
    for (int64_t c = c0; c < c1; ++c) {
      const scalar_t* xc = xn + c * xs.c;
      T acc = T(0);
      // A fixed trip count keeps t in registers (a runtime bound indexes it in local memory).
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (k < ntaps && t.in[k]) acc += t.w[k] * static_cast<T>(xc[t.off[k]]);
      }
      o[c * os.c] = static_cast<scalar_t>(acc);
    }
  }
}

at::Tensor affine_grid_sample_cuda(
    const at::Tensor& input, const at::Tensor& theta, c10::SymInt out_h, c10::SymInt out_w, int64_t mode,
    int64_t padding_mode, bool align_corners) {
  const int64_t Ho = out_h.expect_int();
  const int64_t Wo = out_w.expect_int();
  check_affine_args(input, theta, Ho, Wo, mode, padding_mode);
  const c10::cuda::CUDAGuard guard(input.device());
  const Geometry g{input.size(0), input.size(1), input.size(2), input.size(3), Ho, Wo, mode, padding_mode, align_corners};
  at::Tensor out = at::empty({g.N, g.C, Ho, Wo}, input.options().memory_format(affine_memory_format(input)));
  if (out.numel() == 0) return out;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "affine_grid_sample_cuda", [&] {
    using T = coord_t<scalar_t>;
    const at::Tensor maps = make_maps<T>(theta, g, stream);
    const int64_t chunk = forward_channel_chunk(g.N * Ho * Wo, g.C);
    forward_kernel<scalar_t><<<blocks_for(g.N * ((g.C + chunk - 1) / chunk) * Ho * Wo), kThreads, 0, stream>>>(
        input.const_data_ptr<scalar_t>(), strides_of(input), maps_ptr<T>(maps), g, chunk,
        out.mutable_data_ptr<scalar_t>(), strides_of(out));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---- backward: θ ----------------------------------------------------------------------------

// Six per-pixel terms: dL/du (xn, yn, 1) and dL/dv (xn, yn, 1), before the sx / sy scales.
template <typename acc_t>
struct Six {
  acc_t v[6];
};

// Block-wide sum of each of the six terms; a fixed tree, so the result does not depend on timing.
template <typename acc_t>
__device__ void block_sum6(Six<acc_t>& s) {
  __shared__ acc_t sm[6][kThreads];
  for (int k = 0; k < 6; ++k) sm[k][threadIdx.x] = s.v[k];
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) {
      for (int k = 0; k < 6; ++k) sm[k][threadIdx.x] += sm[k][threadIdx.x + stride];
    }
    __syncthreads();
  }
  for (int k = 0; k < 6; ++k) s.v[k] = sm[k][0];
  __syncthreads();
}

// grid: (tiles * chunks, min(N, 65535)). Block (b, r) is tile b / chunks, channel chunk b % chunks:
// it covers output pixels tile*kThreads + j*tiles*kThreads and channels of that chunk, of samples
// n = r, r + gridDim.y, ..., and writes each one's six sums to partial[n, b, :]. The six terms
// are linear in each channel's contribution, so chunks add up like tiles.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) theta_partial_kernel(
    const scalar_t* __restrict__ grad, Strides4 gs, const scalar_t* __restrict__ x, Strides4 xs,
    const af::PixelMap<coord_t<scalar_t>>* __restrict__ maps, Geometry g, int64_t chunk,
    at::opmath_type<scalar_t>* __restrict__ partial) {
  using T = coord_t<scalar_t>;
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = g.Ho * g.Wo;
  const int64_t chunks = (g.C + chunk - 1) / chunk, tiles = gridDim.x / chunks;
  const int64_t tile = blockIdx.x / chunks, c0 = blockIdx.x % chunks * chunk;
  const int64_t c1 = c0 + chunk < g.C ? c0 + chunk : g.C;
  // n is the same for the whole block, so block_sum6's barriers are reached by every thread.
  for (int64_t n = blockIdx.y; n < g.N; n += gridDim.y) {
    const af::PixelMap<T> m = maps[n];
    Six<acc_t> s;
    for (int k = 0; k < 6; ++k) s.v[k] = acc_t(0);
    if (m.valid) {
      for (int64_t i = tile * kThreads + threadIdx.x; i < plane; i += tiles * kThreads) {
        const int64_t ox = i % g.Wo;
        const int64_t oy = i / g.Wo;
        const af::Point<T> p = af::source_point(m, ox, oy, g.H, g.W, g.padding, g.align);
        const af::Taps<T> t = af::make_taps(p.px, p.py, g.H, g.W, xs.h, xs.w, g.mode);
        T gpx = T(0), gpy = T(0);
        for (int64_t c = c0; c < c1; ++c) {
          const scalar_t* xc = x + n * xs.n + c * xs.c;
          T v[4];
          for (int k = 0; k < 4; ++k) v[k] = t.in[k] ? static_cast<T>(xc[t.off[k]]) : T(0);
          T dpx, dpy;
          af::bilinear_slope(t, v, dpx, dpy);
          const T go = static_cast<T>(grad[n * gs.n + c * gs.c + oy * gs.h + ox * gs.w]);
          gpx += go * dpx;
          gpy += go * dpy;
        }
        const acc_t gu = acc_t(gpx * p.du);
        const acc_t gv = acc_t(gpy * p.dv);
        const acc_t xn = af::base_coord<acc_t>(ox, g.Wo, g.align);
        const acc_t yn = af::base_coord<acc_t>(oy, g.Ho, g.align);
        s.v[0] += gu * xn;
        s.v[1] += gu * yn;
        s.v[2] += gu;
        s.v[3] += gv * xn;
        s.v[4] += gv * yn;
        s.v[5] += gv;
      }
    }
    block_sum6(s);
    if (threadIdx.x == 0) {  // constant indices keep s in registers
#pragma unroll
      for (int k = 0; k < 6; ++k) partial[(n * gridDim.x + blockIdx.x) * 6 + k] = s.v[k];
    }
  }
}

// Blocks of the θ partials per sample: pixel tiles, then channel chunks.
struct ThetaGrid {
  int64_t tiles, chunks, chunk;
  int64_t blocks() const { return tiles * chunks; }
};

// Tiles of ~4 pixels per thread (at most 1,024); when that leaves the device under-filled
// (fewer than 8 blocks of kThreads per SM over all samples), one pixel per thread, then the
// channels split into chunks of at least kChannelChunk (16 x 64 x 56 x 56: 4 tiles -> 13 tiles
// x 8 chunks per sample, 64 -> 1,664 blocks).
ThetaGrid theta_grid(int64_t plane, int64_t N, int64_t C) {
  const int64_t want = static_cast<int64_t>(sm_count()) * 8;
  const int64_t samples = std::min<int64_t>(N, 65535);
  int64_t tiles = std::max<int64_t>(1, std::min<int64_t>((plane + 4 * kThreads - 1) / (4 * kThreads), 1024));
  if (tiles * samples >= want) return ThetaGrid{tiles, 1, C};
  tiles = std::max<int64_t>(1, std::min<int64_t>((plane + kThreads - 1) / kThreads, 1024));
  const int64_t chunk = channel_chunk(C, tiles * samples, want);
  return ThetaGrid{tiles, (C + chunk - 1) / chunk, chunk};
}

// One thread per (sample, entry): the partials in block order, times the un-normalisation scale.
template <typename acc_t, typename theta_t>
__global__ void __launch_bounds__(kThreads) theta_reduce_kernel(const acc_t* __restrict__ partial, int64_t tiles, Geometry g, theta_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < g.N * 6; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / 6;
    const int k = static_cast<int>(i % 6);
    acc_t sum = acc_t(0);
    for (int64_t b = 0; b < tiles; ++b) sum += partial[(n * tiles + b) * 6 + k];
    const acc_t scale = k < 3 ? af::unnorm_scale<acc_t>(g.W, g.align) : af::unnorm_scale<acc_t>(g.H, g.align);
    out[i] = static_cast<theta_t>(sum * scale);
  }
}

// ---- backward: input -------------------------------------------------------------------------

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) input_gather_kernel(
    const scalar_t* __restrict__ grad, Strides4 gs, const af::PixelMap<coord_t<scalar_t>>* __restrict__ maps, Geometry g,
    scalar_t* __restrict__ gi, Strides4 is) {
  using T = coord_t<scalar_t>;
  const int64_t chunks = (g.C + kChannelChunk - 1) / kChannelChunk;
  const int64_t total = g.N * chunks * g.H * g.W;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t x = i % g.W;
    const int64_t y = (i / g.W) % g.H;
    const int64_t q = i / (g.W * g.H);
    const int64_t n = q / chunks, c0 = q % chunks * kChannelChunk;
    const af::PixelMap<T> m = maps[n];
    const scalar_t* gn = grad + n * gs.n;
    scalar_t* dst = gi + n * is.n + y * is.h + x * is.w;
    const int64_t cn = g.C - c0 < kChannelChunk ? g.C - c0 : kChannelChunk;
    T acc[kChannelChunk];
#pragma unroll
    for (int j = 0; j < kChannelChunk; ++j) acc[j] = T(0);
    if (m.valid) {
      af::gather_taps(m, x, y, g.H, g.W, g.Ho, g.Wo, g.mode, g.padding, g.align, [&](int64_t ox, int64_t oy, T w) {
        const scalar_t* go = gn + c0 * gs.c + oy * gs.h + ox * gs.w;
#pragma unroll
        for (int j = 0; j < kChannelChunk; ++j) {
          if (j < cn) acc[j] += w * static_cast<T>(go[j * gs.c]);
        }
      });
    }
#pragma unroll
    for (int j = 0; j < kChannelChunk; ++j) {
      if (j < cn) dst[(c0 + j) * is.c] = static_cast<scalar_t>(acc[j]);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> affine_grid_sample_backward_cuda(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& theta, int64_t mode, int64_t padding_mode,
    bool align_corners, std::array<bool, 2> output_mask) {
  constexpr const char* op = "affine_grid_sample_backward";
  TORCH_CHECK(grad.dim() == 4, op, ": grad must be 4-D, got shape ", grad.sizes());
  const int64_t Ho = grad.size(2);
  const int64_t Wo = grad.size(3);
  check_affine_args(input, theta, Ho, Wo, mode, padding_mode);
  check_affine_grad(grad, input, op);
  const c10::cuda::CUDAGuard guard(input.device());
  const Geometry g{input.size(0), input.size(1), input.size(2), input.size(3), Ho, Wo, mode, padding_mode, align_corners};
  const at::Tensor go = grad.to(input.scalar_type());
  at::Tensor gi = output_mask[0] ? at::empty(input.sizes(), input.options().memory_format(affine_memory_format(input)))
                                 : at::empty({0}, input.options());
  at::Tensor gt = output_mask[1] ? at::zeros({g.N, 2, 3}, theta.options()) : at::empty({0}, theta.options());
  if (g.N == 0 || g.C == 0) {
    if (output_mask[0]) gi.zero_();
    return {gi, gt};
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "affine_grid_sample_backward_cuda", [&] {
    using T = coord_t<scalar_t>;
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor maps = make_maps<T>(theta, g, stream);
    if (output_mask[1] && mode == af::kBilinear) {
      const ThetaGrid tg = theta_grid(Ho * Wo, g.N, g.C);
      at::Tensor partial = at::empty({g.N, tg.blocks(), 6}, input.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      const dim3 grid(static_cast<unsigned>(tg.blocks()), static_cast<unsigned>(std::min<int64_t>(g.N, 65535)));
      theta_partial_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
          go.const_data_ptr<scalar_t>(), strides_of(go), input.const_data_ptr<scalar_t>(), strides_of(input),
          maps_ptr<T>(maps), g, tg.chunk, partial.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor gt_acc = at::empty({g.N, 2, 3}, partial.options());
      theta_reduce_kernel<acc_t, acc_t><<<blocks_for(g.N * 6), kThreads, 0, stream>>>(
          partial.const_data_ptr<acc_t>(), tg.blocks(), g, gt_acc.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      gt = gt_acc.to(theta.scalar_type());
    }
    if (output_mask[0]) {
      const int64_t chunks = (g.C + kChannelChunk - 1) / kChannelChunk;
      input_gather_kernel<scalar_t><<<blocks_for(g.N * chunks * g.H * g.W), kThreads, 0, stream>>>(
          go.const_data_ptr<scalar_t>(), strides_of(go), maps_ptr<T>(maps), g, gi.mutable_data_ptr<scalar_t>(),
          strides_of(gi));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {gi, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(labelkit, CUDA, m) {
  m.impl("affine_grid_sample", &affine_grid_sample_cuda);
  m.impl("_affine_grid_sample_backward", &affine_grid_sample_backward_cuda);
}

}  // namespace labelkit
