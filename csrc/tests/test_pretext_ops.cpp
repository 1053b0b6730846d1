// C++ tests of the pretext op family against libtorch, through the dispatcher, plus the shared
// index math of ops/pretext.h on its own. Dependency-free: prints one line per test, exits
// non-zero when any failed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <cstdlib>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "ops/pretext.h"
#include "tests/harness.h"

namespace {

using lk_test::run;

at::Tensor tiles_op(
    const at::Tensor& x, const at::Tensor& index, const at::Tensor& table, int64_t grid, int64_t tile,
    const std::optional<at::Tensor>& offsets, bool by_cell, bool normalize) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("labelkit::grid_tiles", "")
                       .typed<at::Tensor(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, c10::SymInt,
                           const std::optional<at::Tensor>&, bool, bool)>();
  return op.call(x, index, table, grid, c10::SymInt(tile), offsets, by_cell, normalize);
}

at::Tensor rotate_op(const at::Tensor& x, const at::Tensor& k) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("labelkit::rotate90", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  return op.call(x, k);
}

at::Tensor longs(const std::vector<int64_t>& v) {
  return at::tensor(v, at::kLong);
}

void test_rotate_source_matches_rot90() {
  const int64_t S = 5;
  const at::Tensor img = at::arange(S * S, at::kLong).reshape({S, S});
  for (int64_t k = 0; k < 4; ++k) {
    const at::Tensor want = at::rot90(img, k, {0, 1});
    for (int64_t i = 0; i < S; ++i)
      for (int64_t j = 0; j < S; ++j) {
        int64_t si, sj;
        labelkit::pretext::rotate_source(k, S, i, j, si, sj);
        EXPECT(want[i][j].item<int64_t>() == img[si][sj].item<int64_t>());
      }
  }
}

void test_tile_origin_bounds() {
  const auto g = labelkit::pretext::make_geometry(10, 13, 3, 2);  // cells 3x4
  int64_t top = -1, left = -1;
  EXPECT(labelkit::pretext::tile_origin(g, 5, 1, 2, top, left) && top == 4 && left == 10);
  EXPECT(!labelkit::pretext::tile_origin(g, 9, 0, 0, top, left));   // no such cell
  EXPECT(!labelkit::pretext::tile_origin(g, 0, 2, 0, top, left));   // dy > cell_h - t
  EXPECT(!labelkit::pretext::tile_origin(g, 0, 0, -1, top, left));  // dx < 0
}

void test_grid_tiles_matches_slicing() {
  at::manual_seed(0);
  const at::Tensor x = at::rand({2, 3, 12, 11});
  const at::Tensor perms = longs({8, 7, 6, 5, 4, 3, 2, 1, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8}).reshape({2, 9});
  const at::Tensor off = at::randint(0, 2, {2, 9, 2}, at::kLong);
  for (const at::Tensor& img : {x, x.contiguous(at::MemoryFormat::ChannelsLast)}) {
    const at::Tensor t = tiles_op(img, longs({1, 0}), perms, 3, 2, off, true, false);
    for (int64_t n = 0; n < 2; ++n) {
      const int64_t row = n == 0 ? 1 : 0;
      for (int64_t j = 0; j < 9; ++j) {
        const int64_t cell = perms[row][j].item<int64_t>();
        const int64_t top = (cell / 3) * 4 + off[n][cell][0].item<int64_t>();
        const int64_t left = (cell % 3) * 3 + off[n][cell][1].item<int64_t>();
        EXPECT(at::equal(t[n][j], x[n].slice(1, top, top + 2).slice(2, left, left + 2)));
      }
    }
  }
}

void test_normalize_standardises() {
  at::manual_seed(1);
  const at::Tensor x = at::rand({2, 2, 9, 9}) * 100;
  const at::Tensor t = tiles_op(x, longs({0, 0}), at::arange(9, at::kLong).reshape({1, 9}), 3, 3, std::nullopt, true, true);
  const at::Tensor flat = t.flatten(3);
  EXPECT(at::allclose(flat.mean(-1), at::zeros({2, 9, 2}), 1e-5, 1e-5));
  EXPECT(at::allclose(flat.var(-1, /*unbiased=*/false), at::ones({2, 9, 2}), 1e-4, 1e-4));
  const at::Tensor u8 = tiles_op(x.to(at::kByte), longs({0, 0}), at::arange(9, at::kLong).reshape({1, 9}), 3, 3, std::nullopt, true, true);
  EXPECT(u8.scalar_type() == at::kFloat);
}

void test_rotate90_matches_rot90() {
  const at::Tensor x = at::rand({4, 2, 7, 7});
  const at::Tensor out = rotate_op(x, longs({0, 1, 2, 3}));
  for (int64_t n = 0; n < 4; ++n) EXPECT(at::equal(out[n], at::rot90(x[n], n, {1, 2})));
  const at::Tensor cl = rotate_op(x.contiguous(at::MemoryFormat::ChannelsLast), longs({3, 2, 1, 0}));
  EXPECT(cl.is_contiguous(at::MemoryFormat::ChannelsLast));
  for (int64_t n = 0; n < 4; ++n) EXPECT(at::equal(cl[n], at::rot90(x[n], 3 - n, {1, 2})));
}

bool throws_with(const std::function<void()>& f, const std::string& text) {
  try {
    f();
  } catch (const c10::Error& e) {
    return std::string(e.what()).find(text) != std::string::npos;
  }
  return false;
}

void test_bad_values_raise() {
  const at::Tensor x = at::rand({1, 1, 9, 9});
  const at::Tensor perm = at::arange(9, at::kLong).reshape({1, 9});
  EXPECT(throws_with([&] { tiles_op(x, longs({1}), perm, 3, 3, std::nullopt, true, false); }, "index out of"));
  EXPECT(throws_with([&] { tiles_op(x, longs({0}), perm * 2, 3, 3, std::nullopt, true, false); }, "cell out of"));
  EXPECT(throws_with([&] { tiles_op(x, longs({0}), perm, 3, 4, std::nullopt, true, false); }, "larger than a cell"));
  EXPECT(throws_with([&] { tiles_op(x, longs({0}), perm, 10, 1, std::nullopt, true, false); }, "smaller than the grid"));
  EXPECT(throws_with([&] { rotate_op(x, longs({4})); }, "k must hold values in [0, 4)"));
}

}  // namespace

int main() {
  run("rotate_source_matches_rot90", test_rotate_source_matches_rot90);
  run("tile_origin_bounds", test_tile_origin_bounds);
  run("grid_tiles_matches_slicing", test_grid_tiles_matches_slicing);
  run("normalize_standardises", test_normalize_standardises);
  run("rotate90_matches_rot90", test_rotate90_matches_rot90);
  run("bad_values_raise", test_bad_values_raise);
  return lk_test::finish();
}
