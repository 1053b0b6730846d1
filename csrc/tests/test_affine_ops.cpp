// C++ tests of the affine grid-sample op against libtorch, through the dispatcher, plus the
// shared math header on its own: the gather the CUDA backward runs must visit exactly the
// (output pixel, input pixel, weight) triples the forward's taps produce, in float as on the GPU.
// Dependency-free: prints one line per test, exits non-zero on any failure.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "ops/affine.h"
#include "tests/harness.h"

namespace {

using lk_test::run;

namespace af = labelkit::affine;

at::Tensor warp_op(const at::Tensor& x, const at::Tensor& theta, int64_t ho, int64_t wo, int64_t mode, int64_t pad, bool align) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("labelkit::affine_grid_sample", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, c10::SymInt, c10::SymInt, int64_t, int64_t, bool)>();
  return op.call(x, theta, c10::SymInt(ho), c10::SymInt(wo), mode, pad, align);
}

std::tuple<at::Tensor, at::Tensor> warp_backward_op(const at::Tensor& g, const at::Tensor& x, const at::Tensor& theta, int64_t mode, int64_t pad, bool align) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("labelkit::_affine_grid_sample_backward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool, std::array<bool, 2>)>();
  return op.call(g, x, theta, mode, pad, align, {true, true});
}

// A batch of θ: rotations, shears, flips, zooms in and out, shifts.
at::Tensor random_theta(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  at::Tensor t = at::empty({n, 2, 3}, at::kDouble);
  auto a = t.accessor<double, 3>();
  for (int64_t i = 0; i < n; ++i) {
    const double ang = u(rng) * M_PI, sx = std::exp(u(rng) * 1.5), sy = std::exp(u(rng) * 1.5), sh = u(rng);
    const double c = std::cos(ang), s = std::sin(ang);
    a[i][0][0] = c * sx;
    a[i][0][1] = (c * sh - s) * sy;
    a[i][1][0] = s * sx;
    a[i][1][1] = (s * sh + c) * sy;
    a[i][0][2] = 2 * u(rng);
    a[i][1][2] = 2 * u(rng);
  }
  return t;
}

void test_forward_matches_libtorch() {
  at::manual_seed(0);
  const at::Tensor x = at::rand({5, 3, 9, 7}, at::kDouble);
  const at::Tensor theta = random_theta(5, 1);
  for (int64_t mode : {0, 1}) {
    for (int64_t pad : {0, 1, 2}) {
      for (bool align : {false, true}) {
        const at::Tensor grid = at::affine_grid_generator(theta, {5, 3, 6, 11}, align);
        const at::Tensor ref = at::grid_sampler(x, grid, mode, pad, align);
        EXPECT(at::allclose(warp_op(x, theta, 6, 11, mode, pad, align), ref, 1e-10, 1e-10));
      }
    }
  }
}

void test_backward_matches_libtorch() {
  at::manual_seed(1);
  const at::Tensor x = at::rand({4, 2, 8, 6}, at::kDouble);
  const at::Tensor theta = random_theta(4, 2);
  const at::Tensor g = at::randn({4, 2, 7, 5}, at::kDouble);
  for (int64_t pad : {0, 1, 2}) {
    for (bool align : {false, true}) {
      const at::Tensor grid = at::affine_grid_generator(theta, {4, 2, 7, 5}, align);
      const auto [gx_ref, ggrid] = at::grid_sampler_2d_backward(g, x, grid, 0, pad, align, {true, true});
      // affine_grid: grid[n, p, :] = θ_n · (xn_p, yn_p, 1), so dθ_n = ggrid_n^T · base3.
      const at::Tensor eye = at::tensor({1.0, 0.0, 0.0, 0.0, 1.0, 0.0}, at::kDouble).view({1, 2, 3}).expand({4, 2, 3});
      const at::Tensor base = at::affine_grid_generator(eye, {4, 2, 7, 5}, align).view({4, 35, 2});
      const at::Tensor base3 = at::cat({base, at::ones({4, 35, 1}, at::kDouble)}, 2);
      const at::Tensor gt_ref = at::bmm(ggrid.view({4, 35, 2}).transpose(1, 2), base3);
      const auto [gx, gt] = warp_backward_op(g, x, theta, 0, pad, align);
      EXPECT(at::allclose(gx, gx_ref, 1e-10, 1e-10));
      EXPECT(at::allclose(gt, gt_ref, 1e-9, 1e-9));
    }
  }
}

// Every (output pixel, input pixel) -> weight pair with a non-zero weight, from the forward's
// taps (the scatter view). Zero-weight taps (a coordinate exactly on a pixel, or clamped by border
// padding) contribute nothing either way; the gather need not visit them.
template <typename T>
std::map<std::pair<int64_t, int64_t>, T> scatter_pairs(const af::PixelMap<T>& m, int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t mode, int64_t pad, bool align) {
  std::map<std::pair<int64_t, int64_t>, T> out;
  for (int64_t oy = 0; oy < Ho; ++oy) {
    for (int64_t ox = 0; ox < Wo; ++ox) {
      const af::Taps<T> t = af::output_taps(m, ox, oy, H, W, W, 1, mode, pad, align);
      for (int k = 0; k < 4; ++k) {
        if (t.in[k] && t.w[k] != T(0)) out[{oy * Wo + ox, t.off[k]}] += t.w[k];
      }
    }
  }
  return out;
}

// The same pairs found the other way round: each input pixel gathers (the CUDA backward's view).
template <typename T>
std::map<std::pair<int64_t, int64_t>, T> gather_pairs(const af::PixelMap<T>& m, int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t mode, int64_t pad, bool align, int64_t& visits) {
  std::map<std::pair<int64_t, int64_t>, T> out;
  for (int64_t y = 0; y < H; ++y) {
    for (int64_t x = 0; x < W; ++x) {
      af::gather_taps(m, x, y, H, W, Ho, Wo, mode, pad, align, [&](int64_t ox, int64_t oy, T w) {
        ++visits;
        if (w != T(0)) out[{oy * Wo + ox, y * W + x}] += w;
      });
    }
  }
  return out;
}

template <typename T>
void check_gather_equals_scatter(uint32_t seeds) {
  const int64_t sizes[][4] = {{7, 13, 9, 5}, {1, 1, 3, 4}, {5, 1, 6, 6}, {16, 16, 16, 16}, {3, 8, 1, 9}};
  for (uint32_t seed = 0; seed < seeds; ++seed) {
    const at::Tensor th = random_theta(1, 100 + seed);
    const double* p = th.const_data_ptr<double>();
    for (const auto& s : sizes) {
      for (int64_t mode : {0, 1}) {
        for (int64_t pad : {0, 1, 2}) {
          for (bool align : {false, true}) {
            const af::PixelMap<T> m = af::pixel_map<T>(p, s[0], s[1], s[2], s[3], align);
            EXPECT(m.valid);
            int64_t visits = 0;
            const auto a = scatter_pairs(m, s[0], s[1], s[2], s[3], mode, pad, align);
            const auto b = gather_pairs(m, s[0], s[1], s[2], s[3], mode, pad, align, visits);
            EXPECT(a == b);  // same pairs, bit-identical weights: nothing missed, nothing twice
            EXPECT(visits >= int64_t(a.size()));
          }
        }
      }
    }
  }
}

void test_gather_equals_scatter_float() {
  check_gather_equals_scatter<float>(40);
}

void test_gather_equals_scatter_double() {
  check_gather_equals_scatter<double>(10);
}

void test_non_finite_theta_is_invalid_and_safe() {
  const double nan_theta[6] = {NAN, 0, 0, 0, 1, 0};
  const double inf_theta[6] = {1, 0, INFINITY, 0, 1, 0};
  const double huge_theta[6] = {1e300, 0, 0, 0, 1, 0};
  EXPECT(!af::pixel_map<float>(nan_theta, 5, 5, 5, 5, false).valid);
  EXPECT(!af::pixel_map<float>(inf_theta, 5, 5, 5, 5, false).valid);
  EXPECT(!af::pixel_map<float>(huge_theta, 5, 5, 5, 5, false).valid);
  // Coordinates that are NaN or far outside become -2: every tap is out of bounds.
  for (float u : {NAN, INFINITY, -INFINITY, 1e30f, -1e30f, 7.5f}) {
    const af::Taps<float> t = af::make_taps(u, 2.0f, 5, 5, 5, 1, af::kBilinear);
    for (int k = 0; k < 4; ++k) EXPECT(!t.in[k] && t.w[k] == 0.0f && t.off[k] == 0);
  }
  // Through the op: a NaN θ gives zeros, the other sample is untouched.
  at::Tensor theta = random_theta(2, 3).to(at::kFloat);
  theta[1][0][0] = NAN;
  const at::Tensor x = at::rand({2, 1, 4, 4});
  const at::Tensor out = warp_op(x, theta, 4, 4, 0, 1, false);
  EXPECT(out[1].eq(0).all().item<bool>());
  EXPECT(at::isfinite(out).all().item<bool>());
}

void test_rejects_bad_arguments() {
  bool threw = false;
  try {
    warp_op(at::rand({2, 3, 4, 4}), at::rand({3, 2, 3}), 4, 4, 0, 0, false);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("theta has 3 matrices") != std::string::npos;
  }
  EXPECT(threw);
}

}  // namespace

int main() {
  run("forward_matches_libtorch", test_forward_matches_libtorch);
  run("backward_matches_libtorch", test_backward_matches_libtorch);
  run("gather_equals_scatter_float", test_gather_equals_scatter_float);
  run("gather_equals_scatter_double", test_gather_equals_scatter_double);
  run("non_finite_theta_is_invalid_and_safe", test_non_finite_theta_is_invalid_and_safe);
  run("rejects_bad_arguments", test_rejects_bad_arguments);
  return lk_test::finish();
}
