// C++ tests of the pool-scoring ops against libtorch, through the dispatcher (as any C++ caller
// would reach them), plus the shared math header on its own. Dependency-free: prints one line per
// test and exits non-zero if any failed.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <algorithm>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#include "ops/scoring.h"
#include "tests/harness.h"

namespace {

using lk_test::run;

using TopK = std::tuple<at::Tensor, at::Tensor>;

TopK topk_op(const at::Tensor& q, const at::Tensor& k, int64_t kk, bool largest, int64_t tile) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("labelkit::cosine_topk", "")
                       .typed<TopK(const at::Tensor&, const at::Tensor&, c10::SymInt, bool, double, c10::SymInt)>();
  return op.call(q, k, c10::SymInt(kk), largest, 1e-8, c10::SymInt(tile));
}

at::Tensor kcenter_op(const at::Tensor& x, int64_t budget, const std::optional<at::Tensor>& labeled) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("labelkit::kcenter_greedy", "")
                       .typed<at::Tensor(const at::Tensor&, c10::SymInt, const std::optional<at::Tensor>&, bool,
                                         double)>();
  return op.call(x, c10::SymInt(budget), labeled, false, 1e-8);
}

at::Tensor uncertainty_op(const at::Tensor& x, const std::string& method) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("labelkit::uncertainty", "")
                       .typed<at::Tensor(const at::Tensor&, c10::string_view, bool)>();
  return op.call(x, method, true);
}

void test_topk_insert_orders_ties_by_index() {
  float v[3];
  int64_t id[3];
  int64_t filled = 0;
  const float vals[] = {0.5f, 0.9f, 0.5f, 0.9f, 0.1f};
  for (int64_t j = 0; j < 5; ++j) {
    if (filled < 3 || labelkit::scoring::ranks_before<true>(vals[j], j, v[2], id[2])) {
      labelkit::scoring::topk_insert<true>(v, id, 3, filled, vals[j], j);
    }
  }
  EXPECT(filled == 3);
  EXPECT(id[0] == 1 && id[1] == 3 && id[2] == 0);
}

void test_math_helpers() {
  using labelkit::scoring::badge_sq_dist;
  EXPECT(badge_sq_dist(2.0, 2.0, 1.0, 2.0) == 0.0);            // a duplicate: exactly 0
  EXPECT(badge_sq_dist(2.0, 3.0, 0.5, 1.0) == 4.0);
  EXPECT(labelkit::scoring::kcenter_can_skip(10.0, 1.0));      // |c - a|^2 > 4 m
  EXPECT(!labelkit::scoring::kcenter_can_skip(4.0, 1.0));      // the boundary is not skipped
}

void test_topk_matches_full_matrix() {
  at::manual_seed(0);
  const at::Tensor q = at::randn({37, 9});
  at::Tensor k = at::randn({53, 9});
  k[4].zero_();
  const at::Tensor full = at::cosine_similarity(q.unsqueeze(1), k.unsqueeze(0), -1);
  for (bool largest : {true, false}) {
    for (int64_t tile : {0, 5, 64}) {
      auto [v, i] = topk_op(q, k, 6, largest, tile);
      const auto sorted = at::sort(full, /*stable=*/true, 1, /*descending=*/largest);
      const at::Tensor want_v = std::get<0>(sorted).narrow(1, 0, 6);
      EXPECT(at::allclose(v, want_v, 1e-5, 1e-5));
      EXPECT(at::allclose(full.gather(1, i), v, 1e-5, 1e-5));
    }
  }
}

void test_kcenter_matches_loop() {
  at::manual_seed(1);
  const at::Tensor x = at::randn({80, 4}, at::kDouble);
  const at::Tensor got = kcenter_op(x, 10, at::tensor({int64_t(3), int64_t(17)}));
  std::vector<int64_t> centers = {3, 17};
  for (int64_t t = 0; t < 10; ++t) {
    double best = -1;
    int64_t bi = -1;
    for (int64_t i = 0; i < 80; ++i) {
      if (std::find(centers.begin(), centers.end(), i) != centers.end()) continue;
      double m = 1e300;
      for (int64_t c : centers) m = std::min(m, (x[i] - x[c]).square().sum().item<double>());
      if (m > best) {
        best = m;
        bi = i;
      }
    }
    EXPECT(got[t].item<int64_t>() == bi);
    centers.push_back(bi);
  }
}

void test_kcenter_rejects_bad_labeled() {
  const at::Tensor x = at::randn({5, 2});
  bool threw = false;
  try {
    kcenter_op(x, 1, at::tensor({int64_t(7)}));
  } catch (const c10::Error&) {
    threw = true;
  }
  EXPECT(threw);
}

void test_uncertainty_matches_libtorch() {
  at::manual_seed(2);
  const at::Tensor z = at::randn({31, 7}) * 3;
  const at::Tensor p = at::softmax(z, 1);
  const at::Tensor ent = -(p * p.log()).sum(1);
  EXPECT(at::allclose(uncertainty_op(z, "entropy"), ent, 1e-5, 1e-5));
  EXPECT(at::allclose(uncertainty_op(z, "least_confidence"), 1 - std::get<0>(p.max(1)), 1e-5, 1e-5));
  const at::Tensor top2 = std::get<0>(p.topk(2, 1));
  EXPECT(at::allclose(uncertainty_op(z, "margin"), 1 - (top2.select(1, 0) - top2.select(1, 1)), 1e-5, 1e-5));
}

}  // namespace

int main() {
  run("topk_insert_orders_ties_by_index", test_topk_insert_orders_ties_by_index);
  run("math_helpers", test_math_helpers);
  run("cosine_topk_matches_full_matrix", test_topk_matches_full_matrix);
  run("kcenter_matches_loop", test_kcenter_matches_loop);
  run("kcenter_rejects_bad_labeled", test_kcenter_rejects_bad_labeled);
  run("uncertainty_matches_libtorch", test_uncertainty_matches_libtorch);
  return lk_test::finish();
}
