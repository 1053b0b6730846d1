// C++ tests of the entropy op family against libtorch, through the dispatcher (as any C++ caller
// would reach the ops), plus the shared math header on its own. Dependency-free: exits non-zero
// on the first failed check and prints one line per test.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "ops/entropy.h"
#include "tests/harness.h"

namespace {

using lk_test::run;

bool close(const at::Tensor& a, const at::Tensor& b, double tol = 2e-5) {
  return at::allclose(a, b.to(a.scalar_type()), tol, tol, /*equal_nan=*/true);
}

std::tuple<at::Tensor, at::Tensor> entropy_and_lse(const at::Tensor& x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("labelkit::softmax_entropy", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  return op.call(x);
}

at::Tensor entropy_op(const at::Tensor& x) {
  return std::get<0>(entropy_and_lse(x));
}

at::Tensor entropy_backward_op(const at::Tensor& g, const at::Tensor& x, const at::Tensor& H, const at::Tensor& lse) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("labelkit::_softmax_entropy_backward", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(g, x, H, lse);
}

using GateResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

GateResult gate_op(const at::Tensor& x, double thr, const std::optional<at::Tensor>& clusters, int64_t S) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("labelkit::entropy_gate", "")
                       .typed<GateResult(const at::Tensor&, double, const std::optional<at::Tensor>&, c10::SymInt)>();
  return op.call(x, thr, clusters, c10::SymInt(S));
}

at::Tensor entropy_libtorch(const at::Tensor& x) {
  const at::Tensor x64 = x.to(at::kDouble);
  return -(at::softmax(x64, -1) * at::log_softmax(x64, -1)).sum(-1);
}

void test_fast_exp_accuracy() {
  double worst = 0;
  for (float x = -87.0f; x <= 0.0f; x += 0.0137f) {
    const double exact = std::exp(static_cast<double>(x));
    worst = std::max(worst, std::abs(labelkit::entropy::fast_exp(x) - exact) / exact);
  }
  EXPECT(worst < 4e-7);  // ~3 ulp of float
  EXPECT(labelkit::entropy::fast_exp(-1000.0f) == 0.0f);
  EXPECT(labelkit::entropy::fast_exp(-INFINITY) == 0.0f);
  EXPECT(std::isnan(labelkit::entropy::fast_exp(NAN)));
}

void test_merge_equals_push() {
  // Splitting a row anywhere and merging the halves gives the single-pass moments.
  const std::vector<float> z = {0.3f, -2.0f, 5.0f, -INFINITY, 1.5f, 4.9f, -7.0f};
  using M = labelkit::entropy::Moments<float>;
  M whole = labelkit::entropy::empty_moments<float>();
  for (float v : z) labelkit::entropy::push(whole, v);
  for (size_t cut = 0; cut <= z.size(); ++cut) {
    M a = labelkit::entropy::empty_moments<float>();
    M b = labelkit::entropy::empty_moments<float>();
    for (size_t j = 0; j < cut; ++j) labelkit::entropy::push(a, z[j]);
    for (size_t j = cut; j < z.size(); ++j) labelkit::entropy::push(b, z[j]);
    const M ab = labelkit::entropy::merge(a, b);
    const M ba = labelkit::entropy::merge(b, a);
    EXPECT(ab.m == whole.m && ab.s == ba.s && ab.t == ba.t);  // commutative, bit for bit
    EXPECT(std::abs(ab.s - whole.s) < 1e-6f && std::abs(ab.t - whole.t) < 1e-5f);
  }
}

void test_softmax_entropy_matches_libtorch() {
  at::manual_seed(0);
  for (int64_t C : {1, 7, 100, 1000, 40000}) {
    const at::Tensor x = at::randn({9, C}) * 3;
    EXPECT(close(entropy_op(x), entropy_libtorch(x)));
    EXPECT(close(entropy_op(x.to(at::kBFloat16)), entropy_libtorch(x.to(at::kBFloat16))));
  }
  const at::Tensor x3 = at::randn({4, 5, 6}).transpose(0, 2);  // non-contiguous, 3-D
  EXPECT(close(entropy_op(x3), entropy_libtorch(x3)));
}

void test_gate_matches_libtorch() {
  at::manual_seed(1);
  const at::Tensor x = at::randn({33, 12}) * 2;
  const at::Tensor clusters = at::tensor(std::vector<int64_t>{0, 1, 2, 0, 1, 2, 3, 3, 0, 1, 2, 3});
  const auto [H, unc, pred, cprob, cl, lse] = gate_op(x, 1.5, clusters, 4);
  EXPECT(close(lse.sum(-1), at::logsumexp(x, -1)));
  EXPECT(close(H, entropy_libtorch(x)));
  EXPECT(at::equal(unc, H >= 1.5));
  EXPECT(at::equal(pred, x.argmax(-1)));
  const at::Tensor mass = at::zeros({33, 4}, at::kDouble).index_add_(1, clusters, at::softmax(x.to(at::kDouble), -1));
  EXPECT(close(cprob, mass));
  EXPECT(at::equal(cl, cprob.argmax(-1)));
}

void test_backward_matches_libtorch_autograd() {
  // One pass from the saved lse and entropy equals autograd through the textbook formula.
  at::manual_seed(2);
  for (int64_t C : {3, 10, 1000}) {
    const at::Tensor x = at::randn({17, C}) * 3;
    const at::Tensor g = at::rand({17});
    const auto [H, lse] = entropy_and_lse(x);
    EXPECT(close(lse.sum(-1), at::logsumexp(x, -1)));
    const at::Tensor x64 = x.to(at::kDouble).set_requires_grad(true);
    (entropy_libtorch(x64) * g.to(at::kDouble)).sum().backward();
    EXPECT(close(entropy_backward_op(g, x, H, lse), x64.grad(), 1e-5));
  }
}

void test_gate_rejects_bad_cluster_ids() {
  const at::Tensor x = at::randn({2, 3});
  bool threw = false;
  try {
    gate_op(x, 1.0, at::tensor(std::vector<int64_t>{0, 7, 1}), 2);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("num_clusters = 2") != std::string::npos;
  }
  EXPECT(threw);
}

}  // namespace

int main() {
  run("fast_exp_accuracy", test_fast_exp_accuracy);
  run("merge_equals_push", test_merge_equals_push);
  run("softmax_entropy_matches_libtorch", test_softmax_entropy_matches_libtorch);
  run("entropy_gate_matches_libtorch", test_gate_matches_libtorch);
  run("entropy_gate_rejects_bad_cluster_ids", test_gate_rejects_bad_cluster_ids);
  run("backward_matches_libtorch_autograd", test_backward_matches_libtorch_autograd);
  return lk_test::finish();
}
