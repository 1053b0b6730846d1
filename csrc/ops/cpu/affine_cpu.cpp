// CPU kernels of the affine grid-sample op (math in ops/affine.h). Work is split over
// (sample, row) pairs with at::parallel_for. Forward: the taps of an output row are computed
// once into small buffers, then the gathers run over them (vectorised, ISA clones): for three
// channels or more over a pixel-major copy of the sample (a tap is one vector of channels),
// else one channel at a time. Backward, deterministic either way (no thread ever writes where
// another one does, and every sum has a fixed order): with at least as many samples as threads,
// one pass per sample scatters the input gradient and sums θ's (pixel-major from two channels);
// otherwise θ-gradient partial sums per output row (reduced per sample in row order) and the
// input gradient as a gather per input pixel (ops/affine.h gather_taps, the CUDA kernel's
// algorithm).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "ops/affine.h"
#include "ops/affine_checks.h"
#include "ops/cpu/clones.h"
#include "ops/cpu/fresh_output.h"
#include "ops/cpu/narrow.h"
#include "ops/cpu/transpose.h"

namespace labelkit {
namespace {

namespace af = affine;

// Coordinates and weights: float for float/half/bfloat16 (as on the GPU), double for double.
template <typename scalar_t>
using coord_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

constexpr int64_t kGrainWork = 1 << 14;  // output elements per parallel task

int64_t grain_rows(int64_t per_row) {
  return std::max<int64_t>(1, kGrainWork / std::max<int64_t>(1, per_row));
}

struct Geometry {
  int64_t N, C, H, W, Ho, Wo;
  int64_t mode, padding;
  bool align;
};

// One PixelMap per sample (double coefficients) from θ read as double.
template <typename T>
std::vector<af::PixelMap<T>> sample_maps(const at::Tensor& theta, const Geometry& g) {
  const at::Tensor th = theta.to(at::kDouble).contiguous();
  const double* p = th.const_data_ptr<double>();
  std::vector<af::PixelMap<T>> maps(g.N);
  for (int64_t n = 0; n < g.N; ++n) {
    maps[n] = af::pixel_map<T>(p + 6 * n, g.H, g.W, g.Ho, g.Wo, g.align);
  }
  return maps;
}

// ---- forward ---------------------------------------------------------------------------------

// Taps of one output row, structure of arrays: tap k of pixel ox has offset off[k][ox] (-1 when
// outside the image) and weight w[k][ox]. 32-bit offsets keep the gathers vector-wide; the
// caller checks that a sample's plane fits.
// With slopes (θ's gradient), also the fractional parts fx, fy and the padding's derivatives du,
// dv of each pixel: sl[0..3][ox].
template <typename T>
struct RowTaps {
  std::vector<int32_t> off_v[4];
  std::vector<T> w_v[4];
  std::vector<T> sl_v[4];
  int32_t* off[4];
  T* w[4];
  T* sl[4];
  RowTaps(int64_t Wo, bool slopes) {
    for (int k = 0; k < 4; ++k) {
      off_v[k].resize(Wo);
      w_v[k].resize(Wo);
      sl_v[k].resize(slopes ? Wo : 0);
      off[k] = off_v[k].data();
      w[k] = w_v[k].data();
      sl[k] = slopes ? sl_v[k].data() : nullptr;
    }
  }
};

template <typename T, int64_t kMode, int64_t kPad, bool kSlopes>
LK_CLONE_BODY void row_taps_impl(const af::PixelMap<T>& m, int64_t oy, int64_t Wo, int64_t H, int64_t W, bool align,
                                 int32_t sH, int32_t sW, int32_t* const* off, T* const* w, T* const* sl) {
  // As af::map_u / map_v: the coordinate is formed in double and rounded once.
  const double ax = m.ax;
  const double ay = m.ay;
  const double ru = m.bx * double(oy) + m.cx;
  const double rv = m.by * double(oy) + m.cy;
  int32_t* o0 = off[0];
  int32_t* o1 = off[1];
  int32_t* o2 = off[2];
  int32_t* o3 = off[3];
  T* w0 = w[0];
  T* w1 = w[1];
  T* w2 = w[2];
  T* w3 = w[3];
  T* s_fx = kSlopes ? sl[0] : nullptr;
  T* s_fy = kSlopes ? sl[1] : nullptr;
  T* s_du = kSlopes ? sl[2] : nullptr;
  T* s_dv = kSlopes ? sl[3] : nullptr;
  const int32_t W32 = static_cast<int32_t>(W);
  const int32_t H32 = static_cast<int32_t>(H);
#pragma omp simd
  for (int32_t ox = 0; ox < static_cast<int32_t>(Wo); ++ox) {
    T du, dv;
    T px = af::pad_coord(T(ax * double(ox) + ru), W, kPad, align, du);
    T py = af::pad_coord(T(ay * double(ox) + rv), H, kPad, align, dv);
    px = af::guard_coord(px, W);
    py = af::guard_coord(py, H);
    if constexpr (kMode == af::kNearest) {
      const int32_t x = static_cast<int32_t>(af::t_rint(px));
      const int32_t y = static_cast<int32_t>(af::t_rint(py));
      const bool in = x >= 0 && x < W && y >= 0 && y < H;
      o0[ox] = in ? y * sH + x * sW : -1;
      w0[ox] = T(1);
    } else {
      const T fx0 = af::t_floor(px);
      const T fy0 = af::t_floor(py);
      const int32_t x = static_cast<int32_t>(fx0);
      const int32_t y = static_cast<int32_t>(fy0);
      const T fx = px - fx0;
      const T fy = py - fy0;
      const int32_t inx0 = (x >= 0) & (x < W32);
      const int32_t inx1 = (x + 1 >= 0) & (x + 1 < W32);
      const int32_t iny0 = (y >= 0) & (y < H32);
      const int32_t iny1 = (y + 1 >= 0) & (y + 1 < H32);
      const int32_t base = y * sH + x * sW;
      o0[ox] = (inx0 & iny0) ? base : -1;
      o1[ox] = (inx1 & iny0) ? base + sW : -1;
      o2[ox] = (inx0 & iny1) ? base + sH : -1;
      o3[ox] = (inx1 & iny1) ? base + sH + sW : -1;
      w0[ox] = (T(1) - fx) * (T(1) - fy);
      w1[ox] = fx * (T(1) - fy);
      w2[ox] = (T(1) - fx) * fy;
      w3[ox] = fx * fy;
      if constexpr (kSlopes) {
        s_fx[ox] = fx;
        s_fy[ox] = fy;
        s_du[ox] = du;
        s_dv[ox] = dv;
      }
    }
  }
}

// One tap's contribution: an unconditional (in-bounds) load and a select, so that the loop
// vectorises and an inf/NaN pixel never leaks through an out-of-bounds tap.
template <typename T, typename scalar_t>
LK_CLONE_BODY T tap(const scalar_t* xc, int32_t o, T w) {
  const T v = static_cast<T>(xc[o < 0 ? 0 : o]);
  return o < 0 ? T(0) : w * v;
}

template <typename in_t, typename out_t, typename T, int kTaps>
LK_CLONE_BODY void row_gather_impl(const in_t* xc, const int32_t* const* off, const T* const* w, int64_t Wo, out_t* out) {
  const int32_t* o0 = off[0];
  const int32_t* o1 = off[1];
  const int32_t* o2 = off[2];
  const int32_t* o3 = off[3];
  const T* w0 = w[0];
  const T* w1 = w[1];
  const T* w2 = w[2];
  const T* w3 = w[3];
#pragma omp simd
  for (int64_t ox = 0; ox < Wo; ++ox) {
    T acc = tap(xc, o0[ox], w0[ox]);
    if constexpr (kTaps == 4) {
      acc += tap(xc, o1[ox], w1[ox]);
      acc += tap(xc, o2[ox], w2[ox]);
      acc += tap(xc, o3[ox], w3[ox]);
    }
    out[ox] = cpu::narrow<out_t>(acc);
  }
}

// ISA-cloned instances: taps per (mode, padding, slopes), gathers per dtype. Reflection's fmod
// does not vectorise; it runs the same code scalar. Slopes are for bilinear only.
#define LK_ROW_TAPS(T, MODE, PAD, SLOPES, NAME)                                                                \
  LK_CPU_CLONES void NAME(const af::PixelMap<T>& m, int64_t oy, int64_t Wo, int64_t H, int64_t W, bool align,  \
                          int32_t sH, int32_t sW, int32_t* const* off, T* const* w, T* const* sl) {          \
    row_taps_impl<T, MODE, PAD, SLOPES>(m, oy, Wo, H, W, align, sH, sW, off, w, sl);                       \
  }
LK_ROW_TAPS(float, af::kBilinear, af::kZeros, false, row_taps_bz)
LK_ROW_TAPS(float, af::kBilinear, af::kBorder, false, row_taps_bb)
LK_ROW_TAPS(float, af::kBilinear, af::kReflection, false, row_taps_br)
LK_ROW_TAPS(float, af::kNearest, af::kZeros, false, row_taps_nz)
LK_ROW_TAPS(float, af::kNearest, af::kBorder, false, row_taps_nb)
LK_ROW_TAPS(float, af::kNearest, af::kReflection, false, row_taps_nr)
LK_ROW_TAPS(float, af::kBilinear, af::kZeros, true, row_taps_bz_slopes)
LK_ROW_TAPS(float, af::kBilinear, af::kBorder, true, row_taps_bb_slopes)
LK_ROW_TAPS(float, af::kBilinear, af::kReflection, true, row_taps_br_slopes)
#undef LK_ROW_TAPS

// Taps of output row oy (offsets for strides sH, sW); slopes too when rt.sl is set (bilinear).
void row_taps(const af::PixelMap<float>& m, int64_t oy, const Geometry& g, int32_t sH, int32_t sW,
              RowTaps<float>& rt) {
  using Fn = void (*)(const af::PixelMap<float>&, int64_t, int64_t, int64_t, int64_t, bool, int32_t, int32_t,
                      int32_t* const*, float* const*, float* const*);
  static constexpr Fn kTable[3][3] = {{row_taps_bz, row_taps_bb, row_taps_br},
                                      {row_taps_nz, row_taps_nb, row_taps_nr},
                                      {row_taps_bz_slopes, row_taps_bb_slopes, row_taps_br_slopes}};
  const int64_t kind = rt.sl[0] != nullptr ? 2 : g.mode;
  kTable[kind][g.padding](m, oy, g.Wo, g.H, g.W, g.align, sH, sW, rt.off, rt.w, rt.sl);
}

template <int64_t kPad>
void row_taps_double(const af::PixelMap<double>& m, int64_t oy, const Geometry& g, int32_t sH, int32_t sW,
                     RowTaps<double>& rt) {
  if (rt.sl[0] != nullptr)
    return row_taps_impl<double, af::kBilinear, kPad, true>(m, oy, g.Wo, g.H, g.W, g.align, sH, sW, rt.off, rt.w, rt.sl);
  if (g.mode == af::kNearest)
    return row_taps_impl<double, af::kNearest, kPad, false>(m, oy, g.Wo, g.H, g.W, g.align, sH, sW, rt.off, rt.w, rt.sl);
  row_taps_impl<double, af::kBilinear, kPad, false>(m, oy, g.Wo, g.H, g.W, g.align, sH, sW, rt.off, rt.w, rt.sl);
}

void row_taps(const af::PixelMap<double>& m, int64_t oy, const Geometry& g, int32_t sH, int32_t sW,
              RowTaps<double>& rt) {
  switch (g.padding) {
    case af::kZeros:
      return row_taps_double<af::kZeros>(m, oy, g, sH, sW, rt);
    case af::kBorder:
      return row_taps_double<af::kBorder>(m, oy, g, sH, sW, rt);
    default:
      return row_taps_double<af::kReflection>(m, oy, g, sH, sW, rt);
  }
}

// Gathers per (input, output) type; float16/bfloat16 images are read either directly or from a
// float copy of the sample (see SampleCopy).
#define LK_ROW_GATHER(IN, OUT, TAPS, NAME)                                                                      \
  LK_CPU_CLONES void NAME(const IN* xc, const int32_t* const* off, const float* const* w, int64_t Wo, OUT* out) { \
    row_gather_impl<IN, OUT, float, TAPS>(xc, off, w, Wo, out);                                                 \
  }
#define LK_ROW_GATHERS(IN, OUT)             \
  LK_ROW_GATHER(IN, OUT, 4, row_gather4) \
  LK_ROW_GATHER(IN, OUT, 1, row_gather1)
LK_ROW_GATHERS(float, float)
LK_ROW_GATHERS(c10::Half, c10::Half)
LK_ROW_GATHERS(c10::BFloat16, c10::BFloat16)
LK_ROW_GATHERS(float, c10::Half)
LK_ROW_GATHERS(float, c10::BFloat16)
#undef LK_ROW_GATHERS
#undef LK_ROW_GATHER

void row_gather4(const double* xc, const int32_t* const* off, const double* const* w, int64_t Wo, double* out) {
  row_gather_impl<double, double, double, 4>(xc, off, w, Wo, out);
}
void row_gather1(const double* xc, const int32_t* const* off, const double* const* w, int64_t Wo, double* out) {
  row_gather_impl<double, double, double, 1>(xc, off, w, Wo, out);
}

// A sample's reachable offsets must fit the 32-bit tap offsets.
bool fits_int32(const at::Tensor& x) {
  const int64_t span = (x.size(1) - 1) * x.stride(1) + (x.size(2) - 1) * x.stride(2) + (x.size(3) - 1) * x.stride(3) +
                       x.stride(2) + x.stride(3);
  return span < (int64_t(1) << 31) - 1;
}

// A float copy of one sample, at the sample's own strides so that the tap offsets stay valid,
// made by one sequential pass: float16/bfloat16 have no vector gather (32-bit elements do), and
// even a float32 image gathers faster from a cache-resident copy than from memory, where a
// rotated row misses on every input row it crosses (float32 64x3x224x224 forward 18 -> 10.5 ms).
// Worth it when the output pixels read from the copy are at least as many as the sample's pixels
// (as is PixelMajorCopy).
template <typename scalar_t>
class SampleCopy {
 public:
  static constexpr bool kCopy = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::Half> ||
                                std::is_same_v<scalar_t, c10::BFloat16>;
  using value_t = std::conditional_t<kCopy, float, scalar_t>;  // never made for double

  explicit SampleCopy(const at::Tensor& x)
      : C_(x.size(1)), H_(x.size(2)), W_(x.size(3)), sC_(x.stride(1)), sH_(x.stride(2)), sW_(x.stride(3)),
        buf_(kCopy ? (C_ - 1) * sC_ + (H_ - 1) * sH_ + (W_ - 1) * sW_ + 1 : 0) {}

  // The copy of the sample at xs (made once per sample in a row).
  const value_t* of(const scalar_t* xs) {
    if (xs != src_) {
      for (int64_t c = 0; c < C_; ++c)
        for (int64_t y = 0; y < H_; ++y) {
          const int64_t o = c * sC_ + y * sH_;
          for (int64_t x = 0; x < W_; ++x) buf_[o + x * sW_] = static_cast<value_t>(xs[o + x * sW_]);
        }
      src_ = xs;
    }
    return buf_.data();
  }

 private:
  int64_t C_, H_, W_, sC_, sH_, sW_;
  std::vector<value_t> buf_;
  const scalar_t* src_ = nullptr;
};

// ---- pixel-major ------------------------------------------------------------------------------
// A pixel's channels lie contiguous in an [H*W, P] copy of the sample (P = the pixel stride, C
// rounded up to 4; padding lanes hold zeros): a tap is then a vector load instead of a gather,
// and the backward's scatter a vector add into an [H*W, P] accumulator, free of collisions
// inside the vector. One extra pixel of zeros at the end (the null pixel) stands for every
// out-of-image tap, so no tap needs a select. P = 4 (C <= 4: RGB, grayscale) has its own
// fixed-width row kernels.
int64_t pixel_stride(int64_t C) {
  return (C + 3) / 4 * 4;
}

bool pixel_major(const Geometry& g) {
  return (g.H * g.W + 1) * pixel_stride(g.C) < (int64_t(1) << 31) - 1;
}

// Pixel-major from this many channels: below, the per-channel row gathers and scatter win (a
// grayscale image would fill one lane of four).
constexpr int64_t kPixelMajorForward = 3;

constexpr int64_t kPixelMajorBackward = 2;
constexpr int64_t kStagePixels = 512;  // float16/bfloat16 widened or narrowed this many at a time

// dst[i * P + j] = src[j * s_c + i], j < cols: planar rows (row stride ld) to pixel-major.
template <typename T>
void rows_to_pixels(const T* src, int64_t ld, int64_t cols, int64_t n, T* dst, int64_t P) {
  if constexpr (std::is_same_v<T, float>) {
    if (P == 4) return cpu::planes_to_quads(src, ld, cols, n, dst);
  }
  cpu::transpose_rows(src, ld, dst, P, cols, 0, n);
}

// The inverse: dst[j * ld + i] = src[i * P + j], j < rows.
template <typename T>
void pixels_to_rows(const T* src, int64_t P, int64_t rows, int64_t n, T* dst, int64_t ld) {
  if constexpr (std::is_same_v<T, float>) {
    if (P == 4) return cpu::quads_to_planes(src, rows, n, dst, ld);
  }
  cpu::transpose_rows(src, P, dst, ld, n, 0, rows);
}

// dst[i * P + j] = src[j * s_c + i * s_i] for j < C: n pixels of any layout as pixel-major rows.
// Planar pixels (s_i = 1) go through blocked transposes, kTile channels at a time so that only
// kTile source rows stream at once (all C at once defeat the prefetcher); float16/bfloat16 are
// widened first into stage.
template <typename scalar_t, typename T>
void to_pixel_major(const scalar_t* src, int64_t n, int64_t C, int64_t s_i, int64_t s_c, T* dst, int64_t P,
                    std::vector<T>& stage) {
  if (s_i == 1 && s_c != 1) {
    for (int64_t j = 0; j < C; j += cpu::kTile) {
      const int64_t cols = std::min(cpu::kTile, C - j);
      if constexpr (std::is_same_v<scalar_t, T>) {
        rows_to_pixels(src + j * s_c, s_c, cols, n, dst + j, P);
      } else {
        stage.resize(kStagePixels * cols);
        for (int64_t i0 = 0; i0 < n; i0 += kStagePixels) {
          const int64_t m = std::min(kStagePixels, n - i0);
          for (int64_t k = 0; k < cols; ++k)
            for (int64_t i = 0; i < m; ++i) stage[k * m + i] = static_cast<T>(src[(j + k) * s_c + i0 + i]);
          rows_to_pixels(stage.data(), m, cols, m, dst + i0 * P + j, P);
        }
      }
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < C; ++j) dst[i * P + j] = static_cast<T>(src[i * s_i + j * s_c]);
}

// The inverse: dst[j * s_c + i * s_i] = src[i * P + j], narrowed to the output type.
template <typename T, typename scalar_t>
void from_pixel_major(const T* src, int64_t P, int64_t n, int64_t C, int64_t s_i, int64_t s_c, scalar_t* dst,
                      std::vector<T>& stage) {
  if (s_i == 1 && s_c != 1) {
    for (int64_t j = 0; j < C; j += cpu::kTile) {
      const int64_t rows = std::min(cpu::kTile, C - j);
      if constexpr (std::is_same_v<scalar_t, T>) {
        pixels_to_rows(src + j, P, rows, n, dst + j * s_c, s_c);
      } else {
        stage.resize(kStagePixels * rows);
        for (int64_t i0 = 0; i0 < n; i0 += kStagePixels) {
          const int64_t m = std::min(kStagePixels, n - i0);
          pixels_to_rows(src + i0 * P + j, P, rows, m, stage.data(), m);
          for (int64_t k = 0; k < rows; ++k)
            for (int64_t i = 0; i < m; ++i) dst[(j + k) * s_c + i0 + i] = cpu::narrow<scalar_t>(stage[k * m + i]);
        }
      }
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < C; ++j) dst[i * s_i + j * s_c] = cpu::narrow<scalar_t>(src[i * P + j]);
}

// A whole [C, H, W] sample (strides sC, sH, sW) to or from pixel-major [H * W, P]: one run of
// H * W pixels when its rows are back to back (either dense layout), else row by row.
template <typename scalar_t, typename T>
void plane_to_pixel_major(const scalar_t* src, int64_t C, int64_t H, int64_t W, int64_t sC, int64_t sH, int64_t sW,
                          T* dst, int64_t P, std::vector<T>& stage) {
  if (sH == W * sW) return to_pixel_major(src, H * W, C, sW, sC, dst, P, stage);
  for (int64_t y = 0; y < H; ++y) to_pixel_major(src + y * sH, W, C, sW, sC, dst + y * W * P, P, stage);
}

template <typename T, typename scalar_t>
void plane_from_pixel_major(const T* src, int64_t P, int64_t C, int64_t H, int64_t W, int64_t sC, int64_t sH,
                            int64_t sW, scalar_t* dst, std::vector<T>& stage) {
  if (sH == W * sW) return from_pixel_major(src, P, H * W, C, sW, sC, dst, stage);
  for (int64_t y = 0; y < H; ++y) from_pixel_major(src + y * W * P, P, W, C, sW, sC, dst + y * sH, stage);
}

// The [H*W + 1, P] copy of one sample (last pixel: the null pixel), made once per sample.
template <typename scalar_t>
class PixelMajorCopy {
 public:
  using T = coord_t<scalar_t>;
  PixelMajorCopy(const at::Tensor& x, bool needed)
      : C_(x.size(1)), H_(x.size(2)), W_(x.size(3)), sC_(x.stride(1)), sH_(x.stride(2)), sW_(x.stride(3)),
        P_(pixel_stride(C_)), buf_(needed ? (H_ * W_ + 1) * P_ : 0, T(0)) {}

  const T* of(const scalar_t* xs) {
    if (xs != src_) {
      plane_to_pixel_major(xs, C_, H_, W_, sC_, sH_, sW_, buf_.data(), P_, stage_);
      src_ = xs;
    }
    return buf_.data();
  }

 private:
  int64_t C_, H_, W_, sC_, sH_, sW_, P_;
  std::vector<T> buf_, stage_;
  const scalar_t* src_ = nullptr;
};

// Taps of one row over pixel-major planes: out-of-image taps (offset -1) read the null pixel.
template <typename T>
LK_CLONE_BODY const T* pixel_at(const T* plane, int32_t o, int32_t null) {
  return plane + (o < 0 ? null : o);
}

// out[ox * P + c] for one output row: each pixel's taps are P-long vector loads. kP: P fixed at
// compile time, or 0 (runtime P).
template <typename T, int kTaps, int kP>
LK_CLONE_BODY void pixel_row_gather_impl(const T* xb, int32_t null, const int32_t* const* off, const T* const* w, int64_t Wo,
                                         int64_t P_rt, T* out) {
  const int64_t P = kP > 0 ? kP : P_rt;
  for (int64_t ox = 0; ox < Wo; ++ox) {
    T* dst = out + ox * P;
    const T* p0 = pixel_at(xb, off[0][ox], null);
    const T w0 = w[0][ox];
    if constexpr (kTaps == 1) {
#pragma omp simd
      for (int64_t c = 0; c < P; ++c) dst[c] = w0 * p0[c];
    } else {
      const T* p1 = pixel_at(xb, off[1][ox], null);
      const T* p2 = pixel_at(xb, off[2][ox], null);
      const T* p3 = pixel_at(xb, off[3][ox], null);
      const T w1 = w[1][ox], w2 = w[2][ox], w3 = w[3][ox];
#pragma omp simd
      for (int64_t c = 0; c < P; ++c) {
        T acc = w0 * p0[c];
        acc += w1 * p1[c];
        acc += w2 * p2[c];
        acc += w3 * p3[c];
        dst[c] = acc;
      }
    }
  }
}

// Backward of one output row, gradient go[ox * P + c]: θ's slopes summed over the channels into
// gpx/gpy (when sl is set; bilinear), and the gradient scattered into the taps' pixels of acc.
template <typename T, int kP>
LK_CLONE_BODY void pixel_row_backward_impl(const T* xb, const T* go, int32_t null, const int32_t* const* off,
                                           const T* const* w, const T* const* sl, int64_t Wo, int64_t P_rt, int taps, T* acc,
                                           T* gpx, T* gpy) {
  const int64_t P = kP > 0 ? kP : P_rt;
  for (int64_t ox = 0; ox < Wo; ++ox) {
    const T* g = go + ox * P;
    int32_t o[4];
    for (int k = 0; k < taps; ++k) o[k] = off[k][ox] < 0 ? null : off[k][ox];
    if (sl != nullptr) {
      const T* v0 = xb + o[0];
      const T* v1 = xb + o[1];
      const T* v2 = xb + o[2];
      const T* v3 = xb + o[3];
      const T fx = sl[0][ox], fy = sl[1][ox];
      T sx = 0, sy = 0;
#pragma omp simd reduction(+ : sx, sy)
      for (int64_t c = 0; c < P; ++c) {
        const T dpx = (T(1) - fy) * (v1[c] - v0[c]) + fy * (v3[c] - v2[c]);  // as af::bilinear_slope
        const T dpy = (T(1) - fx) * (v2[c] - v0[c]) + fx * (v3[c] - v1[c]);
        sx += g[c] * dpx;
        sy += g[c] * dpy;
      }
      gpx[ox] = sx;
      gpy[ox] = sy;
    }
    for (int k = 0; k < taps; ++k) {
      T* a = acc + o[k];
      const T wk = w[k][ox];
#pragma omp simd
      for (int64_t c = 0; c < P; ++c) a[c] += wk * g[c];
    }
  }
}

#define LK_PIXEL_ROWS(T)                                                                                           \
  LK_CPU_CLONES void pixel_row_gather(const T* xb, int32_t null, const int32_t* const* off, const T* const* w,    \
                                      int64_t Wo, int64_t P, int taps, T* out) {                                   \
    if (P == 4) {                                                                                                  \
      taps == 1 ? pixel_row_gather_impl<T, 1, 4>(xb, null, off, w, Wo, P, out)                                     \
                : pixel_row_gather_impl<T, 4, 4>(xb, null, off, w, Wo, P, out);                                    \
    } else {                                                                                                       \
      taps == 1 ? pixel_row_gather_impl<T, 1, 0>(xb, null, off, w, Wo, P, out)                                     \
                : pixel_row_gather_impl<T, 4, 0>(xb, null, off, w, Wo, P, out);                                    \
    }                                                                                                              \
  }                                                                                                                \
  LK_CPU_CLONES void pixel_row_backward(const T* xb, const T* go, int32_t null, const int32_t* const* off,         \
                                        const T* const* w, const T* const* sl, int64_t Wo, int64_t P, int taps,    \
                                        T* acc, T* gpx, T* gpy) {                                                  \
    P == 4 ? pixel_row_backward_impl<T, 4>(xb, go, null, off, w, sl, Wo, P, taps, acc, gpx, gpy)                  \
           : pixel_row_backward_impl<T, 0>(xb, go, null, off, w, sl, Wo, P, taps, acc, gpx, gpy);                 \
  }
LK_PIXEL_ROWS(float)
LK_PIXEL_ROWS(double)
#undef LK_PIXEL_ROWS

template <typename scalar_t>
void forward_cpu_impl(const at::Tensor& x_in, const at::Tensor& theta, at::Tensor& out, const Geometry& g) {
  using T = coord_t<scalar_t>;
  const auto maps = sample_maps<T>(theta, g);
  // Row gathers want unit output stride: channels-last output writes through a row buffer.
  const at::Tensor x = fits_int32(x_in) ? x_in : x_in.contiguous();
  TORCH_CHECK(fits_int32(x), "affine_grid_sample: one image of ", x.sizes(), " exceeds 2^31 elements");
  const int64_t sN = x.stride(0), sC = x.stride(1);
  const int32_t sH = static_cast<int32_t>(x.stride(2)), sW = static_cast<int32_t>(x.stride(3));
  const int64_t oN = out.stride(0), oC = out.stride(1), oH = out.stride(2), oW = out.stride(3);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const bool nearest = g.mode == af::kNearest;
  const bool by_pixel = g.C >= kPixelMajorForward && pixel_major(g);
  const int64_t P = pixel_stride(g.C);
  const int32_t null = static_cast<int32_t>(g.H * g.W * P);  // the null pixel of a pixel-major copy
  at::parallel_for(0, g.N * g.Ho, grain_rows(g.Wo * g.C), [&](int64_t begin, int64_t end) {
    RowTaps<T> rt(g.Wo, false);
    SampleCopy<scalar_t> copy(x);
    PixelMajorCopy<scalar_t> pixels(x, by_pixel);
    std::vector<T> pixel_row(by_pixel ? g.Wo * P : 0), stage;
    std::vector<scalar_t> row(oW == 1 ? 0 : g.Wo);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.Ho;
      const int64_t oy = r % g.Ho;
      const af::PixelMap<T>& m = maps[n];
      const int64_t rows_here = std::min(end, (n + 1) * g.Ho) - std::max(begin, n * g.Ho);  // of sample n
      const bool many_rows = rows_here * g.Wo >= g.H * g.W;  // worth a copy of the sample
      const bool from_copy = SampleCopy<scalar_t>::kCopy && many_rows;
      scalar_t* orow = op + n * oN + oy * oH;
      if (!m.valid) {
        for (int64_t c = 0; c < g.C; ++c) {
          for (int64_t ox = 0; ox < g.Wo; ++ox) orow[c * oC + ox * oW] = scalar_t(0);
        }
        continue;
      }
      if (by_pixel && many_rows) {
        row_taps(m, oy, g, static_cast<int32_t>(g.W * P), static_cast<int32_t>(P), rt);
        pixel_row_gather(pixels.of(xp + n * sN), null, rt.off, rt.w, g.Wo, P, nearest ? 1 : 4, pixel_row.data());
        from_pixel_major(pixel_row.data(), P, g.Wo, g.C, oW, oC, orow, stage);
        continue;
      }
      row_taps(m, oy, g, sH, sW, rt);
      const auto* xf = from_copy ? copy.of(xp + n * sN) : nullptr;
      for (int64_t c = 0; c < g.C; ++c) {
        scalar_t* dst = oW == 1 ? orow + c * oC : row.data();
        if (xf != nullptr) {
          nearest ? row_gather1(xf + c * sC, rt.off, rt.w, g.Wo, dst) : row_gather4(xf + c * sC, rt.off, rt.w, g.Wo, dst);
        } else {
          const scalar_t* xc = xp + n * sN + c * sC;
          nearest ? row_gather1(xc, rt.off, rt.w, g.Wo, dst) : row_gather4(xc, rt.off, rt.w, g.Wo, dst);
        }
        if (oW != 1) {
          for (int64_t ox = 0; ox < g.Wo; ++ox) orow[c * oC + ox * oW] = row[ox];
        }
      }
    }
  });
}

Geometry make_geometry(const at::Tensor& input, int64_t Ho, int64_t Wo, int64_t mode, int64_t padding, bool align) {
  return Geometry{input.size(0), input.size(1), input.size(2), input.size(3), Ho, Wo, mode, padding, align};
}

at::Tensor affine_grid_sample_cpu(
    const at::Tensor& input, const at::Tensor& theta, c10::SymInt out_h, c10::SymInt out_w, int64_t mode,
    int64_t padding_mode, bool align_corners) {
  const int64_t Ho = out_h.expect_int();
  const int64_t Wo = out_w.expect_int();
  check_affine_args(input, theta, Ho, Wo, mode, padding_mode);
  const Geometry g = make_geometry(input, Ho, Wo, mode, padding_mode, align_corners);
  at::Tensor out = cpu::empty_output({g.N, g.C, Ho, Wo}, input.options().memory_format(affine_memory_format(input)));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "affine_grid_sample_cpu", [&] {
    forward_cpu_impl<scalar_t>(input, theta, out, g);
  });
  return out;
}

// ---- backward: θ ----------------------------------------------------------------------------

// θ: accumulate one channel's d sample / d (px, py), times the output gradient, into gpx / gpy.
template <typename x_t, typename g_t, typename T>
LK_CLONE_BODY void row_slopes_impl(const x_t* xc, const g_t* go, const int32_t* const* off, T* const* sl, int64_t Wo,
                                   T* gpx, T* gpy) {
  const int32_t* o0 = off[0];
  const int32_t* o1 = off[1];
  const int32_t* o2 = off[2];
  const int32_t* o3 = off[3];
  const T* fx = sl[0];
  const T* fy = sl[1];
#pragma omp simd
  for (int64_t ox = 0; ox < Wo; ++ox) {
    const T v0 = tap(xc, o0[ox], T(1));
    const T v1 = tap(xc, o1[ox], T(1));
    const T v2 = tap(xc, o2[ox], T(1));
    const T v3 = tap(xc, o3[ox], T(1));
    const T dpx = (T(1) - fy[ox]) * (v1 - v0) + fy[ox] * (v3 - v2);  // as af::bilinear_slope
    const T dpy = (T(1) - fx[ox]) * (v2 - v0) + fx[ox] * (v3 - v1);
    const T g = static_cast<T>(go[ox]);
    gpx[ox] += g * dpx;
    gpy[ox] += g * dpy;
  }
}

#define LK_ROW_SLOPES(X, G)                                                                                       \
  LK_CPU_CLONES void row_slopes(const X* xc, const G* go, const int32_t* const* off, float* const* sl, int64_t Wo, \
                                float* gpx, float* gpy) {                                                         \
    row_slopes_impl<X, G, float>(xc, go, off, sl, Wo, gpx, gpy);                                                  \
  }
LK_ROW_SLOPES(float, float)
LK_ROW_SLOPES(c10::Half, c10::Half)
LK_ROW_SLOPES(c10::BFloat16, c10::BFloat16)
LK_ROW_SLOPES(float, c10::Half)
LK_ROW_SLOPES(float, c10::BFloat16)
#undef LK_ROW_SLOPES
void row_slopes(const double* xc, const double* go, const int32_t* const* off, double* const* sl, int64_t Wo,
                double* gpx, double* gpy) {
  row_slopes_impl<double, double, double>(xc, go, off, sl, Wo, gpx, gpy);
}

// Row oy of channel c of sample n of the output gradient, with unit stride (through buf if not).
template <typename scalar_t>
const scalar_t* grad_row(const scalar_t* gp, const at::Tensor& grad, int64_t n, int64_t c, int64_t oy, int64_t Wo,
                         scalar_t* buf) {
  const scalar_t* row = gp + n * grad.stride(0) + c * grad.stride(1) + oy * grad.stride(2);
  const int64_t gW = grad.stride(3);
  if (gW == 1) return row;
  for (int64_t ox = 0; ox < Wo; ++ox) buf[ox] = row[ox * gW];
  return buf;
}

// θ's six partials from output row oy, added to s[6]: Σ dL/du · sx · (xn, yn, 1) and the same for
// v, with dL/du = gpx · du per pixel (gpx: the row's slopes summed over channels).
template <typename T>
void add_theta_row(const T* gpx, const T* gpy, const T* du, const T* dv, int64_t oy, const Geometry& g, double* s) {
  double su_x = 0, su = 0, sv_x = 0, sv = 0;
  for (int64_t ox = 0; ox < g.Wo; ++ox) {
    const double gu = double(gpx[ox] * du[ox]);
    const double gv = double(gpy[ox] * dv[ox]);
    const double xn = af::base_coord<double>(ox, g.Wo, g.align);
    su_x += gu * xn;
    su += gu;
    sv_x += gv * xn;
    sv += gv;
  }
  const double sx = af::unnorm_scale<double>(g.W, g.align);
  const double sy = af::unnorm_scale<double>(g.H, g.align);
  const double yn = af::base_coord<double>(oy, g.Ho, g.align);
  s[0] += sx * su_x;
  s[1] += sx * yn * su;
  s[2] += sx * su;
  s[3] += sy * sv_x;
  s[4] += sy * yn * sv;
  s[5] += sy * sv;
}

// d loss / d θ of each sample (bilinear), rows in parallel: per output row the vectorised taps
// and slopes, summed over channels, then the row's six partials; a sum over rows in order.
template <typename scalar_t>
at::Tensor theta_grad_cpu_impl(const at::Tensor& grad, const at::Tensor& x_in, const at::Tensor& theta,
                               const Geometry& g) {
  using T = coord_t<scalar_t>;
  const auto maps = sample_maps<T>(theta, g);
  const at::Tensor x = fits_int32(x_in) ? x_in : x_in.contiguous();
  TORCH_CHECK(fits_int32(x), "affine_grid_sample_backward: one image of ", x.sizes(), " exceeds 2^31 elements");
  const int64_t sN = x.stride(0), sC = x.stride(1);
  const int32_t sH = static_cast<int32_t>(x.stride(2)), sW = static_cast<int32_t>(x.stride(3));
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  std::vector<double> part(g.N * g.Ho * 6, 0.0);
  at::parallel_for(0, g.N * g.Ho, grain_rows(g.Wo * g.C), [&](int64_t begin, int64_t end) {
    RowTaps<T> rt(g.Wo, true);
    std::vector<T> gpx(g.Wo), gpy(g.Wo);
    std::vector<scalar_t> row_buf(g.Wo);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.Ho;
      const int64_t oy = r % g.Ho;
      const af::PixelMap<T>& m = maps[n];
      if (!m.valid) continue;  // zeros
      row_taps(m, oy, g, sH, sW, rt);
      std::fill(gpx.begin(), gpx.end(), T(0));
      std::fill(gpy.begin(), gpy.end(), T(0));
      for (int64_t c = 0; c < g.C; ++c) {
        const scalar_t* go = grad_row(gp, grad, n, c, oy, g.Wo, row_buf.data());
        row_slopes(xp + n * sN + c * sC, go, rt.off, rt.sl, g.Wo, gpx.data(), gpy.data());
      }
      add_theta_row(gpx.data(), gpy.data(), rt.sl[2], rt.sl[3], oy, g, part.data() + r * 6);
    }
  });
  at::Tensor out = at::zeros({g.N, 2, 3}, theta.options().dtype(at::kDouble));
  double* o = out.mutable_data_ptr<double>();
  for (int64_t n = 0; n < g.N; ++n) {
    for (int64_t oy = 0; oy < g.Ho; ++oy) {
      for (int k = 0; k < 6; ++k) o[n * 6 + k] += part[(n * g.Ho + oy) * 6 + k];
    }
  }
  return out.to(theta.scalar_type());
}

// ---- backward: input -------------------------------------------------------------------------

template <typename scalar_t>
void input_grad_cpu_impl(const at::Tensor& grad, const at::Tensor& theta, at::Tensor& gi, const Geometry& g) {
  using T = coord_t<scalar_t>;
  const auto maps = sample_maps<T>(theta, g);
  const int64_t gN = grad.stride(0), gC = grad.stride(1), gH = grad.stride(2), gW = grad.stride(3);
  const int64_t iN = gi.stride(0), iC = gi.stride(1), iH = gi.stride(2), iW = gi.stride(3);
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  scalar_t* ip = gi.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, g.N * g.H, grain_rows(g.W * g.C * 4), [&](int64_t begin, int64_t end) {
    std::vector<T> acc(g.C);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.H;
      const int64_t y = r % g.H;
      const af::PixelMap<T>& m = maps[n];
      const scalar_t* gs = gp + n * gN;
      for (int64_t x = 0; x < g.W; ++x) {
        std::fill(acc.begin(), acc.end(), T(0));
        if (m.valid) {
          af::gather_taps(m, x, y, g.H, g.W, g.Ho, g.Wo, g.mode, g.padding, g.align, [&](int64_t ox, int64_t oy, T w) {
            const scalar_t* go = gs + oy * gH + ox * gW;
            for (int64_t c = 0; c < g.C; ++c) acc[c] += w * static_cast<T>(go[c * gC]);
          });
        }
        scalar_t* dst = ip + n * iN + y * iH + x * iW;
        for (int64_t c = 0; c < g.C; ++c) dst[c * iC] = static_cast<scalar_t>(acc[c]);
      }
    }
  });
}

// θ's gradient [N, 2, 3] in θ's dtype from the per-sample sums.
at::Tensor theta_grad_tensor(const std::vector<double>& sums, const Geometry& g, const at::Tensor& theta) {
  return at::tensor(sums, at::TensorOptions().dtype(at::kDouble)).view({g.N, 2, 3}).to(theta.scalar_type());
}

// ---- backward: both, one sample per task ----------------------------------------------------

// Input: scatter one channel's output gradient into its taps (scalar: taps of neighbouring
// pixels collide). One tap at a time along the row: tap 1 of pixel ox is usually tap 0 of
// pixel ox + 1, and adding both back to back would stall each add on the previous store.
template <typename scalar_t, typename T>
void row_scatter(const scalar_t* go, const int32_t* const* off, T* const* w, int64_t Wo, int taps, T* acc) {
  for (int k = 0; k < taps; ++k) {
    const int32_t* ok = off[k];
    const T* wk = w[k];
    for (int64_t ox = 0; ox < Wo; ++ox) {
      if (ok[ox] >= 0) acc[ok[ox]] += wk[ox] * static_cast<T>(go[ox]);
    }
  }
}

// Both gradients in one pass over the output, one sample per task: each task owns its sample's
// input gradient, so the scatter is race-free and its order fixed (deterministic). Used when
// there are at least as many samples as threads, for one channel (else pixel-major, below);
// float16/bfloat16 accumulate in a float32 copy. Per output row the taps (and θ's slopes) are
// formed vectorised, as the forward's, then each channel's gradient row is scattered into the
// taps. Planes past 32-bit offsets take the gather path instead (see fits_int32).
template <typename scalar_t>
void scatter_backward_cpu_impl(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& theta, at::Tensor& gi, at::Tensor& gt,
    const Geometry& g, bool need_theta) {
  using T = coord_t<scalar_t>;
  const auto maps = sample_maps<T>(theta, g);
  const int64_t sN = x.stride(0), sC = x.stride(1);
  const int32_t sH = static_cast<int32_t>(x.stride(2)), sW = static_cast<int32_t>(x.stride(3));
  // The accumulator has the input gradient's strides (gi is dense: the same extent per sample).
  const int64_t aC = gi.stride(1);
  const int32_t aH = static_cast<int32_t>(gi.stride(2)), aW = static_cast<int32_t>(gi.stride(3));
  const bool same_layout = aH == sH && aW == sW;  // one set of taps then serves reads and scatter
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  constexpr bool kDirect = std::is_same_v<scalar_t, T>;
  const int64_t plane = g.C * g.H * g.W;
  const int taps = g.mode == af::kNearest ? 1 : 4;
  std::vector<double> th_grad(g.N * 6, 0.0);
  at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
    RowTaps<T> rt(g.Wo, need_theta);
    RowTaps<T> at_taps(same_layout ? 0 : g.Wo, false);
    RowTaps<T>& st = same_layout ? rt : at_taps;  // the scatter's taps
    std::vector<T> buf(kDirect ? 0 : plane);
    std::vector<scalar_t> grow_buf(g.Wo);
    std::vector<T> gpx(need_theta ? g.Wo : 0), gpy(need_theta ? g.Wo : 0);
    SampleCopy<scalar_t> copy(x);
    const bool from_copy = need_theta && SampleCopy<scalar_t>::kCopy && g.Ho * g.Wo >= g.H * g.W;
    for (int64_t n = begin; n < end; ++n) {
      const af::PixelMap<T>& m = maps[n];
      const auto* xf = from_copy && m.valid ? copy.of(xp + n * sN) : nullptr;
      T* acc = kDirect ? reinterpret_cast<T*>(gi.mutable_data_ptr<scalar_t>() + n * gi.stride(0)) : buf.data();
      std::fill(acc, acc + plane, T(0));
      double s[6] = {0, 0, 0, 0, 0, 0};
      for (int64_t oy = 0; m.valid && oy < g.Ho; ++oy) {
        row_taps(m, oy, g, sH, sW, rt);
        if (!same_layout) row_taps(m, oy, g, aH, aW, st);
        std::fill(gpx.begin(), gpx.end(), T(0));
        std::fill(gpy.begin(), gpy.end(), T(0));
        for (int64_t c = 0; c < g.C; ++c) {
          const scalar_t* go = grad_row(gp, grad, n, c, oy, g.Wo, grow_buf.data());
          if (xf != nullptr) {
            row_slopes(xf + c * sC, go, rt.off, rt.sl, g.Wo, gpx.data(), gpy.data());
          } else if (need_theta) {
            row_slopes(xp + n * sN + c * sC, go, rt.off, rt.sl, g.Wo, gpx.data(), gpy.data());
          }
          row_scatter(go, st.off, st.w, g.Wo, taps, acc + c * aC);
        }
        if (need_theta) add_theta_row(gpx.data(), gpy.data(), rt.sl[2], rt.sl[3], oy, g, s);
      }
      for (int k = 0; k < 6; ++k) th_grad[n * 6 + k] = s[k];
      if constexpr (!kDirect) {
        scalar_t* dst = gi.mutable_data_ptr<scalar_t>() + n * gi.stride(0);
        for (int64_t i = 0; i < plane; ++i) dst[i] = cpu::narrow<scalar_t>(buf[i]);
      }
    }
  });
  if (need_theta) gt = theta_grad_tensor(th_grad, g, theta);
}

// Both gradients, one sample per task as above, over pixel-major copies of the sample, of its
// output gradient and of its input gradient (see pixel_major): a tap is a vector of channels.
template <typename scalar_t>
void pixel_major_backward_cpu_impl(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& theta, at::Tensor& gi, at::Tensor& gt,
    const Geometry& g, bool need_theta) {
  using T = coord_t<scalar_t>;
  const auto maps = sample_maps<T>(theta, g);
  const int64_t gN = grad.stride(0), gC = grad.stride(1), gH = grad.stride(2), gW = grad.stride(3);
  const int64_t iN = gi.stride(0), iC = gi.stride(1), iH = gi.stride(2), iW = gi.stride(3);
  const int64_t P = pixel_stride(g.C);
  const int32_t pH = static_cast<int32_t>(g.W * P), pW = static_cast<int32_t>(P);  // pixel-major strides
  const int32_t null = static_cast<int32_t>(g.H * g.W * P);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  scalar_t* ip = gi.mutable_data_ptr<scalar_t>();
  const int taps = g.mode == af::kNearest ? 1 : 4;
  std::vector<double> th_grad(g.N * 6, 0.0);
  at::parallel_for(0, g.N, 1, [&](int64_t begin, int64_t end) {
    RowTaps<T> rt(g.Wo, need_theta);
    PixelMajorCopy<scalar_t> pixels(x, need_theta);
    std::vector<T> acc((g.H * g.W + 1) * P);  // + the null pixel, where out-of-image taps go
    std::vector<T> go(g.Ho * g.Wo * P, T(0)), stage;  // the sample's output gradient (padding lanes 0)
    std::vector<T> gpx(g.Wo), gpy(g.Wo);
    for (int64_t n = begin; n < end; ++n) {
      const af::PixelMap<T>& m = maps[n];
      const T* xb = need_theta && m.valid ? pixels.of(xp + n * x.stride(0)) : nullptr;
      std::fill(acc.begin(), acc.end(), T(0));
      double s[6] = {0, 0, 0, 0, 0, 0};
      if (m.valid) plane_to_pixel_major(gp + n * gN, g.C, g.Ho, g.Wo, gC, gH, gW, go.data(), P, stage);
      for (int64_t oy = 0; m.valid && oy < g.Ho; ++oy) {
        row_taps(m, oy, g, pH, pW, rt);
        pixel_row_backward(xb, go.data() + oy * g.Wo * P, null, rt.off, rt.w, xb != nullptr ? rt.sl : nullptr, g.Wo, P, taps,
                           acc.data(), gpx.data(), gpy.data());
        if (xb != nullptr) add_theta_row(gpx.data(), gpy.data(), rt.sl[2], rt.sl[3], oy, g, s);
      }
      for (int k = 0; k < 6; ++k) th_grad[n * 6 + k] = s[k];
      plane_from_pixel_major(acc.data(), P, g.C, g.H, g.W, iC, iH, iW, ip + n * iN, stage);
    }
  });
  if (need_theta) gt = theta_grad_tensor(th_grad, g, theta);
}

std::tuple<at::Tensor, at::Tensor> affine_grid_sample_backward_cpu(
    const at::Tensor& grad, const at::Tensor& input, const at::Tensor& theta, int64_t mode, int64_t padding_mode,
    bool align_corners, std::array<bool, 2> output_mask) {
  constexpr const char* op = "affine_grid_sample_backward";
  TORCH_CHECK(grad.dim() == 4, op, ": grad must be 4-D, got shape ", grad.sizes());
  const int64_t Ho = grad.size(2);
  const int64_t Wo = grad.size(3);
  check_affine_args(input, theta, Ho, Wo, mode, padding_mode);
  check_affine_grad(grad, input, op);
  const Geometry g = make_geometry(input, Ho, Wo, mode, padding_mode, align_corners);
  const at::Tensor go = grad.to(input.scalar_type());
  at::Tensor gi = output_mask[0]
                      ? cpu::empty_output(input.sizes(), input.options().memory_format(affine_memory_format(input)))
                      : at::empty({0}, input.options());
  at::Tensor gt = output_mask[1] ? at::zeros({g.N, 2, 3}, theta.options()) : at::empty({0}, theta.options());
  if (g.N == 0 || g.C == 0) {
    if (output_mask[0]) gi.zero_();
    return {gi, gt};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "affine_grid_sample_backward_cpu", [&] {
    const bool need_theta = output_mask[1] && mode == af::kBilinear;
    if (output_mask[0] && g.N >= at::get_num_threads() && pixel_major(g) && g.C >= kPixelMajorBackward) {
      pixel_major_backward_cpu_impl<scalar_t>(go, input, theta, gi, gt, g, need_theta);
      return;
    }
    if (output_mask[0] && g.N >= at::get_num_threads() && fits_int32(input) && fits_int32(gi)) {
      scatter_backward_cpu_impl<scalar_t>(go, input, theta, gi, gt, g, need_theta);
      return;
    }
    if (need_theta) gt = theta_grad_cpu_impl<scalar_t>(go, input, theta, g);
    if (output_mask[0]) input_grad_cpu_impl<scalar_t>(go, theta, gi, g);
  });
  return {gi, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(labelkit, CPU, m) {
  m.impl("affine_grid_sample", &affine_grid_sample_cpu);
  m.impl("_affine_grid_sample_backward", &affine_grid_sample_backward_cpu);
}

}  // namespace labelkit
