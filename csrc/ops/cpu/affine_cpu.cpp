// CPU kernels of the affine grid-sample op (math in ops/affine.h). Work is split over
// (sample, row) pairs with at::parallel_for. Forward: the taps of an output row are computed
// once into small buffers, then every channel runs a tight weighted-gather loop over them
// (channels-last input: the channel loop is innermost and contiguous instead). Backward:
// θ-gradient partial sums per output row, reduced per sample in row order; input gradient as a
// gather per input pixel (ops/affine.h gather_taps). Both are deterministic: no thread ever
// writes where another one does.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "ops/affine.h"
#include "ops/affine_checks.h"

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

// One PixelMap per sample, computed in double from θ and rounded to T.
template <typename T>
std::vector<af::PixelMap<T>> sample_maps(const at::Tensor& theta, const Geometry& g) {
  const at::Tensor th = theta.to(at::kDouble).contiguous();
  const double* p = th.const_data_ptr<double>();
  std::vector<af::PixelMap<T>> maps(g.N);
  for (int64_t n = 0; n < g.N; ++n) {
    maps[n] = af::cast_map<T>(af::pixel_map<double>(p + 6 * n, g.H, g.W, g.Ho, g.Wo, g.align));
  }
  return maps;
}

// ---- forward ---------------------------------------------------------------------------------

// Per-row tap buffers: tap k of output pixel ox at [k * Wo + ox]. Out-of-bounds taps have
// offset 0 and are masked out (never multiplied, so an inf/NaN at offset 0 cannot leak in).
template <typename T>
struct RowTaps {
  std::vector<int64_t> off;
  std::vector<T> w;
  std::vector<uint8_t> in;
  explicit RowTaps(int64_t Wo) : off(4 * Wo), w(4 * Wo), in(4 * Wo) {}
};

template <typename scalar_t>
void forward_cpu_impl(const at::Tensor& x, const at::Tensor& theta, at::Tensor& out, const Geometry& g) {
  using T = coord_t<scalar_t>;
  const auto maps = sample_maps<T>(theta, g);
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const int64_t oN = out.stride(0), oC = out.stride(1), oH = out.stride(2), oW = out.stride(3);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int ntaps = g.mode == af::kNearest ? 1 : 4;
  const bool channels_inner = sC == 1 && g.C > 1;
  at::parallel_for(0, g.N * g.Ho, grain_rows(g.Wo * g.C), [&](int64_t begin, int64_t end) {
    RowTaps<T> rt(g.Wo);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.Ho;
      const int64_t oy = r % g.Ho;
      const af::PixelMap<T>& m = maps[n];
      scalar_t* orow = op + n * oN + oy * oH;
      const scalar_t* xs = xp + n * sN;
      if (!m.valid) {
        for (int64_t c = 0; c < g.C; ++c) {
          for (int64_t ox = 0; ox < g.Wo; ++ox) orow[c * oC + ox * oW] = scalar_t(0);
        }
        continue;
      }
      for (int64_t ox = 0; ox < g.Wo; ++ox) {
        const af::Taps<T> t = af::output_taps(m, ox, oy, g.H, g.W, sH, sW, g.mode, g.padding, g.align);
        for (int k = 0; k < ntaps; ++k) {
          rt.off[k * g.Wo + ox] = t.off[k];
          rt.w[k * g.Wo + ox] = t.w[k];
          rt.in[k * g.Wo + ox] = t.in[k];
        }
      }
      if (channels_inner) {
        for (int64_t ox = 0; ox < g.Wo; ++ox) {
          scalar_t* o = orow + ox * oW;
          for (int64_t c = 0; c < g.C; ++c) {
            T acc = T(0);
            for (int k = 0; k < ntaps; ++k) {
              const int64_t i = k * g.Wo + ox;
              acc += rt.in[i] ? rt.w[i] * static_cast<T>(xs[rt.off[i] + c]) : T(0);
            }
            o[c] = static_cast<scalar_t>(acc);
          }
        }
        continue;
      }
      for (int64_t c = 0; c < g.C; ++c) {
        const scalar_t* xc = xs + c * sC;
        scalar_t* oc = orow + c * oC;
        for (int64_t ox = 0; ox < g.Wo; ++ox) {
          T acc = T(0);
          for (int k = 0; k < ntaps; ++k) {
            const int64_t i = k * g.Wo + ox;
            acc += rt.in[i] ? rt.w[i] * static_cast<T>(xc[rt.off[i]]) : T(0);
          }
          oc[ox * oW] = static_cast<scalar_t>(acc);
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
  at::Tensor out = at::empty({g.N, g.C, Ho, Wo}, input.options().memory_format(affine_memory_format(input)));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "affine_grid_sample_cpu", [&] {
    forward_cpu_impl<scalar_t>(input, theta, out, g);
  });
  return out;
}

// ---- backward: θ ----------------------------------------------------------------------------

// d loss / d θ of each sample: per output row the sums of dL/du (xn, 1) and dL/dv (xn, 1), turned
// into that row's six partials; then a sum over rows in order.
template <typename scalar_t>
at::Tensor theta_grad_cpu_impl(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& theta, const Geometry& g) {
  using T = coord_t<scalar_t>;
  const auto maps = sample_maps<T>(theta, g);
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const int64_t gN = grad.stride(0), gC = grad.stride(1), gH = grad.stride(2), gW = grad.stride(3);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  std::vector<double> part(g.N * g.Ho * 6, 0.0);
  const double sx = af::unnorm_scale<double>(g.W, g.align);
  const double sy = af::unnorm_scale<double>(g.H, g.align);
  at::parallel_for(0, g.N * g.Ho, grain_rows(g.Wo * g.C), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / g.Ho;
      const int64_t oy = r % g.Ho;
      const af::PixelMap<T>& m = maps[n];
      if (!m.valid) continue;  // zeros
      const scalar_t* xs = xp + n * sN;
      const scalar_t* grow = gp + n * gN + oy * gH;
      double su_x = 0, su = 0, sv_x = 0, sv = 0;
      for (int64_t ox = 0; ox < g.Wo; ++ox) {
        const af::Point<T> p = af::source_point(m, ox, oy, g.H, g.W, g.padding, g.align);
        const af::Taps<T> t = af::make_taps(p.px, p.py, g.H, g.W, sH, sW, g.mode);
        T gpx = T(0), gpy = T(0);
        for (int64_t c = 0; c < g.C; ++c) {
          const scalar_t* xc = xs + c * sC;
          T v[4];
          for (int k = 0; k < 4; ++k) v[k] = t.in[k] ? static_cast<T>(xc[t.off[k]]) : T(0);
          T dpx, dpy;
          af::bilinear_slope(t, v, dpx, dpy);
          const T go = static_cast<T>(grow[c * gC + ox * gW]);
          gpx += go * dpx;
          gpy += go * dpy;
        }
        const double gu = double(gpx * p.du);
        const double gv = double(gpy * p.dv);
        const double xn = af::base_coord<double>(ox, g.Wo, g.align);
        su_x += gu * xn;
        su += gu;
        sv_x += gv * xn;
        sv += gv;
      }
      const double yn = af::base_coord<double>(oy, g.Ho, g.align);
      double* pr = part.data() + r * 6;
      pr[0] = sx * su_x;
      pr[1] = sx * yn * su;
      pr[2] = sx * su;
      pr[3] = sy * sv_x;
      pr[4] = sy * yn * sv;
      pr[5] = sy * sv;
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
                      ? at::empty(input.sizes(), input.options().memory_format(affine_memory_format(input)))
                      : at::empty({0}, input.options());
  at::Tensor gt = output_mask[1] ? at::zeros({g.N, 2, 3}, theta.options()) : at::empty({0}, theta.options());
  if (g.N == 0 || g.C == 0) {
    if (output_mask[0]) gi.zero_();
    return {gi, gt};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "affine_grid_sample_backward_cpu", [&] {
    if (output_mask[1] && mode == af::kBilinear) gt = theta_grad_cpu_impl<scalar_t>(go, input, theta, g);
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
