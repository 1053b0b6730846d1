// CPU kernels of the pool-scoring family.
//
// cosine_topk / cosine_reduce(max|min): the queries are cut into tiles processed in parallel;
//   each task walks the key tiles in order, computes one cache-sized score tile with a
//   single-threaded BLAS GEMM (at::mm_out inside at::parallel_for) and folds it at once into
//   the running per-row top-k (or max/min) while it is still in cache. Nothing larger than a
//   tile of scores exists. mean/sum need no tiles: sum_j cos(q, k_j) = <q_hat, sum_j k_hat_j>.
// kcenter_greedy: the labeled set is seeded in one blocked pass (row tiles transposed once, every
//   labeled center swept over each tile in cache); then one fused pass per pick (distance to the
//   new center, running minimum, argmax) over fixed blocks, skipping samples the triangle
//   inequality proves unaffected.
// badge_select: the same running minimum on BADGE's implicit gradient embeddings, then an
//   inverse-CDF draw from fixed-block float64 prefix sums (deterministic for any thread count).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "ops/entropy.h"
#include "ops/scoring.h"
#include "ops/scoring_checks.h"
#include "ops/scoring_host.h"
#include "ops/cpu/clones.h"
#include "ops/cpu/row_moments.h"

namespace labelkit {
namespace {

using entropy::neg_inf;
using scoring::acc_type;
using scoring::Method;
using scoring::normalized_rows;

constexpr int64_t kQueryTile = 256;   // score tile rows: 256 x 1024 float32 = 1 MiB, inside L2
constexpr int64_t kKeyTile = 1024;
constexpr int64_t kBlock = 8192;      // samples per block of the greedy passes

int64_t num_blocks(int64_t n, int64_t block) {
  return (n + block - 1) / block;
}

// ---- uncertainty --------------------------------------------------------------------------------

// Converts rows of scalar_t to acc_t (no copy when they already match).
template <typename scalar_t, typename acc_t>
class RowReader {
 public:
  explicit RowReader(int64_t C) {
    if constexpr (!std::is_same_v<scalar_t, acc_t>) buf_.resize(C);
  }
  const acc_t* read(const scalar_t* src, int64_t C) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return src;
    } else {
      for (int64_t j = 0; j < C; ++j) buf_[j] = static_cast<acc_t>(src[j]);
      return buf_.data();
    }
  }

 private:
  std::vector<acc_t> buf_;
};

// The two largest entries (first index of each on ties) and a NaN flag.
template <typename T>
struct Top2 {
  T v1 = neg_inf<T>();
  T v2 = neg_inf<T>();
  int64_t a = -1;
  int64_t b = -1;
  bool has_nan = false;
};

template <typename T>
LK_CLONE_BODY Top2<T> row_top2(const T* x, int64_t C) {
  Top2<T> r;
  for (int64_t j = 0; j < C; ++j) {
    const T v = x[j];
    if (v != v) {
      r.has_nan = true;
    } else if (v > r.v1 || r.a < 0) {
      r.v2 = r.v1;
      r.b = r.a;
      r.v1 = v;
      r.a = j;
    } else if (v > r.v2 || r.b < 0) {
      r.v2 = v;
      r.b = j;
    }
  }
  return r;
}


// -sum p log p with 0 log 0 = 0.
template <typename T>
LK_CLONE_BODY T prob_entropy(const T* p, int64_t C) {
  T h = T(0);
  for (int64_t j = 0; j < C; ++j) {
    if (p[j] > T(0)) h -= p[j] * entropy::fast_log(p[j]);
  }
  return h;
}

template <typename T>
LK_CLONE_BODY T uncertainty_row(Method method, const T* x, int64_t C, bool from_logits) {
  const Top2<T> top = row_top2(x, C);
  if (from_logits) {
    T s, t;
    cpu::row_moments<T, false>(x, C, top.v1, nullptr, s, t);
    return scoring::uncertainty_from_logit_stats(method, top.v1, top.v2, s, t, top.has_nan);
  }
  if (top.has_nan) return std::numeric_limits<T>::quiet_NaN();
  switch (method) {
    case Method::kEntropy:
      return prob_entropy(x, C);
    case Method::kMargin:
      return T(1) - (top.v1 - (top.b < 0 ? T(0) : top.v2));
    default:
      return T(1) - top.v1;
  }
}

// count consecutive [C] rows into out: one ISA-dispatched call per block of rows, the row code
// inlined into each clone (the row moments vectorise there; a call would run the baseline copy).
#define LK_UNCERTAINTY_ROWS(T)                                                                         \
  LK_CPU_CLONES void uncertainty_rows(Method method, const T* x, int64_t C, int64_t count, bool from_logits, \
                                      T* out) {                                                        \
    for (int64_t n = 0; n < count; ++n) out[n] = uncertainty_row(method, x + n * C, C, from_logits);    \
  }
LK_UNCERTAINTY_ROWS(float)
LK_UNCERTAINTY_ROWS(double)
#undef LK_UNCERTAINTY_ROWS

// Rows [begin, end) of x [N, C]; float16/bfloat16 rows widened in blocks (cpu::rows_per_convert).
template <typename scalar_t, typename acc_t>
void uncertainty_block(Method method, const scalar_t* x, int64_t C, int64_t begin, int64_t end, bool from_logits,
                       acc_t* out) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    uncertainty_rows(method, x + begin * C, C, end - begin, from_logits, out + begin);
  } else {
    const int64_t rows = cpu::rows_per_convert(C);
    std::vector<acc_t> buf(rows * C);
    for (int64_t b = begin; b < end; b += rows) {
      const int64_t n = std::min(rows, end - b);
      uncertainty_rows(method, cpu::acc_rows(x + b * C, n * C, buf.data()), C, n, from_logits, out + b);
    }
  }
}

// Softmax (or a copy of the probabilities) of one MC sample's row into p; returns false when
// the row holds NaN/+inf or no mass. log_p (optional) gets log p from the logits directly.
template <typename T>
LK_CLONE_BODY bool sample_probs(const T* x, int64_t C, bool from_logits, T* p, T* log_p) {
  if (!from_logits) {
    for (int64_t j = 0; j < C; ++j) {
      if (x[j] != x[j]) return false;
      p[j] = x[j];
      if (log_p != nullptr) log_p[j] = entropy::fast_log(x[j]);
    }
    return true;
  }
  const Top2<T> top = row_top2(x, C);
  T s, t;
  cpu::row_moments<T, false>(x, C, top.v1, nullptr, s, t);
  if (top.has_nan || !(s > T(0)) || s != s) return false;
  const T log_s = entropy::fast_log(s);
  for (int64_t j = 0; j < C; ++j) {
    const T lp = (x[j] - top.v1) - log_s;
    p[j] = x[j] == neg_inf<T>() ? T(0) : entropy::fast_exp(lp);
    if (log_p != nullptr) log_p[j] = lp;
  }
  return true;
}

// -sum p log p from log p already at hand (no log per element), 0 log 0 = 0.
template <typename T>
LK_CLONE_BODY T entropy_from_logs(const T* p, const T* log_p, int64_t C) {
  T h = T(0);
#pragma omp simd reduction(+ : h)
  for (int64_t j = 0; j < C; ++j) h += p[j] > T(0) ? p[j] * log_p[j] : T(0);
  return -h;
}

// Per-class running statistics of the S sampled distributions of one sample (Welford).
template <typename T>
struct McStats {
  std::vector<T> mean, m2, p, log_p;
  std::vector<int64_t> votes;
  T mean_entropy = T(0);
  explicit McStats(int64_t C) : mean(C), m2(C), p(C), log_p(C), votes(C) {}
};

// Folds the S samples of sample n; false when one of them is NaN.
template <typename scalar_t, typename T>
LK_CLONE_BODY bool mc_accumulate(const scalar_t* base, int64_t S, int64_t N, int64_t C, int64_t n, bool from_logits,
                                 RowReader<scalar_t, T>& reader, McStats<T>& st) {
  std::fill(st.mean.begin(), st.mean.end(), T(0));
  std::fill(st.m2.begin(), st.m2.end(), T(0));
  std::fill(st.votes.begin(), st.votes.end(), 0);
  st.mean_entropy = T(0);
  for (int64_t s = 0; s < S; ++s) {
    const T* x = reader.read(base + (s * N + n) * C, C);
    if (!sample_probs<T>(x, C, from_logits, st.p.data(), st.log_p.data())) return false;
    ++st.votes[row_top2(x, C).a];  // argmax of the scores themselves, as torch.argmax
    st.mean_entropy += (entropy_from_logs(st.p.data(), st.log_p.data(), C) - st.mean_entropy) / T(s + 1);
    for (int64_t j = 0; j < C; ++j) {
      const T delta = st.p[j] - st.mean[j];
      st.mean[j] += delta / T(s + 1);
      st.m2[j] += delta * (st.p[j] - st.mean[j]);
    }
  }
  return true;
}

template <typename T>
LK_CLONE_BODY T mc_uncertainty(Method method, const McStats<T>& st, int64_t S, int64_t C) {
  switch (method) {
    case Method::kBald:
      return prob_entropy(st.mean.data(), C) - st.mean_entropy;
    case Method::kMeanStd: {
      T acc = T(0);
      for (int64_t j = 0; j < C; ++j) acc += ::sqrt(st.m2[j] / T(S));
      return acc / T(C);
    }
    default: {  // sampled variation ratio
      int64_t best = 0;
      for (int64_t j = 0; j < C; ++j) best = st.votes[j] > best ? st.votes[j] : best;
      return T(1) - T(best) / T(S);
    }
  }
}

// Samples [begin, end) of MC scores [S, N, C], per input type with the row code inlined into
// each ISA clone (as uncertainty_rows).
template <typename scalar_t, typename T>
LK_CLONE_BODY void mc_rows_impl(Method method, const scalar_t* x, int64_t S, int64_t N, int64_t C, int64_t begin,
                                int64_t end, bool from_logits, T* out) {
  RowReader<scalar_t, T> reader(C);
  McStats<T> st(C);
  for (int64_t n = begin; n < end; ++n) {
    out[n] = mc_accumulate(x, S, N, C, n, from_logits, reader, st) ? mc_uncertainty(method, st, S, C)
                                                                    : std::numeric_limits<T>::quiet_NaN();
  }
}

#define LK_MC_ROWS(scalar_t, T)                                                                               \
  LK_CPU_CLONES void mc_rows(Method method, const scalar_t* x, int64_t S, int64_t N, int64_t C, int64_t begin, \
                             int64_t end, bool from_logits, T* out) {                                        \
    mc_rows_impl<scalar_t, T>(method, x, S, N, C, begin, end, from_logits, out);                              \
  }
LK_MC_ROWS(float, float)
LK_MC_ROWS(double, double)
LK_MC_ROWS(c10::Half, float)
LK_MC_ROWS(c10::BFloat16, float)
#undef LK_MC_ROWS

at::Tensor uncertainty_cpu(const at::Tensor& scores, c10::string_view method_sv, bool from_logits) {
  const std::string method_s(method_sv);
  check_uncertainty_args(scores, method_s);
  const Method method = parse_uncertainty_method(method_s, scores.dim());
  const at::Tensor x = scores.contiguous();
  const bool mc = x.dim() == 3;
  const int64_t S = mc ? x.size(0) : 1;
  const int64_t N = x.size(-2);
  const int64_t C = x.size(-1);
  at::Tensor out = at::empty({N}, x.options().dtype(acc_type(x.scalar_type())));
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uncertainty_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t* op = out.mutable_data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, (1 << 14) / (C * S));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      if (!mc) return uncertainty_block<scalar_t, acc_t>(method, xp, C, begin, end, from_logits, op);
      mc_rows(method, xp, S, N, C, begin, end, from_logits, op);
    });
  });
  return out;
}

// Gradient of one [N, C] row.
template <typename T>
LK_CLONE_BODY void uncertainty_row_grad(Method method, const T* x, int64_t C, bool from_logits, T g, T* gx) {
  const Top2<T> top = row_top2(x, C);
  if (!from_logits) {
    for (int64_t j = 0; j < C; ++j) {
      if (method == Method::kEntropy) {
        gx[j] = -g * (entropy::fast_log(x[j]) + T(1));
      } else {
        const T d = -T(j == top.a) + (method == Method::kMargin ? T(j == top.b) : T(0));
        gx[j] = g * d;
      }
    }
    return;
  }
  T s, t;
  cpu::row_moments<T, false>(x, C, top.v1, nullptr, s, t);
  const T log_s = entropy::fast_log(s);
  if (method == Method::kEntropy) {
    const T H = entropy::entropy_from(s, t);
    for (int64_t j = 0; j < C; ++j) gx[j] = entropy::gate_grad(x[j], top.v1, log_s, H, g, T(0));
    return;
  }
  const T p_a = T(1) / s;
  const T p_b = top.b < 0 || top.v2 == neg_inf<T>() ? T(0) : entropy::fast_exp(top.v2 - top.v1) / s;
  for (int64_t j = 0; j < C; ++j) {
    const T p_j = x[j] == neg_inf<T>() ? T(0) : entropy::fast_exp((x[j] - top.v1) - log_s);
    gx[j] = g * scoring::uncertainty_logit_grad(method, j, top.a, top.b, p_j, p_a, p_b);
  }
}

// d u / d p_sj for BALD ((log p_sj - log pbar_j) / S) and mean_std ((p_sj - pbar_j) / (S C sigma_j)),
// pushed through the softmax for logits: d/dz_k = p_k (G_k - sum_j p_j G_j).
template <typename T>
LK_CLONE_BODY void mc_sample_grad(Method method, const McStats<T>& st, int64_t S, int64_t C, bool from_logits, T g,
                                  std::vector<T>& G, T* gx) {
  for (int64_t j = 0; j < C; ++j) {
    if (method == Method::kBald) {
      G[j] = g * (st.log_p[j] - entropy::fast_log(st.mean[j])) / T(S);
    } else {
      const T sigma = ::sqrt(st.m2[j] / T(S));
      G[j] = sigma > T(0) ? g * (st.p[j] - st.mean[j]) / (T(S) * T(C) * sigma) : T(0);
    }
  }
  if (!from_logits) {
    for (int64_t j = 0; j < C; ++j) gx[j] = G[j];
    return;
  }
  T dot = T(0);
  for (int64_t j = 0; j < C; ++j) dot += st.p[j] > T(0) ? st.p[j] * G[j] : T(0);
  for (int64_t j = 0; j < C; ++j) gx[j] = st.p[j] > T(0) ? st.p[j] * (G[j] - dot) : T(0);
}

// Gradients of samples [begin, end) (one [C] row each, or S MC rows), per input type with the row
// code inlined into each ISA clone (as uncertainty_rows).
template <typename scalar_t, typename T>
LK_CLONE_BODY void grad_rows_impl(Method method, const scalar_t* x, int64_t S, int64_t N, int64_t C, int64_t begin,
                                  int64_t end, bool mc, bool from_logits, const T* g, T* gx) {
  RowReader<scalar_t, T> reader(C);
  if (!mc) {
    for (int64_t n = begin; n < end; ++n) uncertainty_row_grad(method, reader.read(x + n * C, C), C, from_logits, g[n], gx + n * C);
    return;
  }
  McStats<T> st(C);
  std::vector<T> G(C);
  for (int64_t n = begin; n < end; ++n) {
    if (!mc_accumulate(x, S, N, C, n, from_logits, reader, st)) {
      for (int64_t s = 0; s < S; ++s) {
        for (int64_t j = 0; j < C; ++j) gx[(s * N + n) * C + j] = std::numeric_limits<T>::quiet_NaN();
      }
      continue;
    }
    for (int64_t s = 0; s < S; ++s) {
      const T* row = reader.read(x + (s * N + n) * C, C);
      sample_probs(row, C, from_logits, st.p.data(), st.log_p.data());
      mc_sample_grad(method, st, S, C, from_logits, g[n], G, gx + (s * N + n) * C);
    }
  }
}

#define LK_GRAD_ROWS(scalar_t, T)                                                                           \
  LK_CPU_CLONES void grad_rows(Method method, const scalar_t* x, int64_t S, int64_t N, int64_t C, int64_t begin, \
                               int64_t end, bool mc, bool from_logits, const T* g, T* gx) {                 \
    grad_rows_impl<scalar_t, T>(method, x, S, N, C, begin, end, mc, from_logits, g, gx);                     \
  }
LK_GRAD_ROWS(float, float)
LK_GRAD_ROWS(double, double)
LK_GRAD_ROWS(c10::Half, float)
LK_GRAD_ROWS(c10::BFloat16, float)
#undef LK_GRAD_ROWS

at::Tensor uncertainty_backward_cpu(const at::Tensor& grad, const at::Tensor& scores, c10::string_view method_sv,
                                    bool from_logits) {
  const std::string method_s(method_sv);
  check_uncertainty_args(scores, method_s);
  check_uncertainty_grad(grad, scores);
  const Method method = parse_uncertainty_method(method_s, scores.dim());
  const at::Tensor x = scores.contiguous();
  const bool mc = x.dim() == 3;
  const int64_t S = mc ? x.size(0) : 1;
  const int64_t N = x.size(-2);
  const int64_t C = x.size(-1);
  const at::Tensor g = grad.to(acc_type(x.scalar_type())).contiguous();
  at::Tensor gx_acc = at::zeros(x.sizes(), x.options().dtype(acc_type(x.scalar_type())));
  if (N == 0 || (mc && method == Method::kVariationRatio)) return gx_acc.to(x.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uncertainty_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* gp = g.const_data_ptr<acc_t>();
    acc_t* gxp = gx_acc.mutable_data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, (1 << 14) / (C * S));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      grad_rows(method, xp, S, N, C, begin, end, mc, from_logits, gp, gxp);
    });
  });
  return gx_acc.to(x.scalar_type());
}

// ---- cosine top-k and reductions -----------------------------------------------------------------

struct Tiles {
  int64_t n;
  int64_t m;
};

Tiles pick_tiles(int64_t tile_size) {
  return tile_size > 0 ? Tiles{tile_size, tile_size} : Tiles{kQueryTile, kKeyTile};
}

// Folds one [rows, cols] score tile (keys m0..m0+cols) into the running top-k of each row.
template <bool kLargest, typename T>
void merge_tile_topk(const T* scores, int64_t rows, int64_t cols, int64_t m0, int64_t k, T* vals,
                     int64_t* idx, int64_t* filled) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = scores + r * cols;
    T* v = vals + r * k;
    int64_t* id = idx + r * k;
    int64_t& f = filled[r];
    int64_t j = 0;
    for (; j < cols && f < k; ++j) scoring::topk_insert<kLargest>(v, id, k, f, s[j], m0 + j);
    T thr = v[k - 1];
    // Keys arrive in increasing index order, so a value equal to the threshold ranks after it.
    for (; j < cols; ++j) {
      const T x = s[j];
      if (kLargest ? x > thr : x < thr) {
        scoring::topk_insert<kLargest>(v, id, k, f, x, m0 + j);
        thr = v[k - 1];
      }
    }
  }
}

template <typename T>
void merge_tile_extreme(const T* scores, int64_t rows, int64_t cols, bool largest, T* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* s = scores + r * cols;
    T best = out[r];
    if (largest) {
      for (int64_t j = 0; j < cols; ++j) best = s[j] > best ? s[j] : best;
    } else {
      for (int64_t j = 0; j < cols; ++j) best = s[j] < best ? s[j] : best;
    }
    out[r] = best;
  }
}

// Runs fold(tile_scores, row0, rows, m0, cols) over every (query tile, key tile) pair, query
// tiles in parallel, key tiles in order. Each score tile is one single-threaded GEMM.
template <typename T, typename Fold>
void for_each_score_tile(const at::Tensor& q_hat, const at::Tensor& k_hat, Tiles tiles, const Fold& fold) {
  const int64_t N = q_hat.size(0);
  const int64_t M = k_hat.size(0);
  at::parallel_for(0, num_blocks(N, tiles.n), 1, [&](int64_t tb, int64_t te) {
    // Through the ATen allocator (not std::vector) so that memory profilers see the tile.
    // A tile_size beyond the matrix means one tile: never a buffer larger than N x M.
    const at::Tensor tile = at::empty({std::min(tiles.n, N) * std::min(tiles.m, M)}, q_hat.options());
    T* buf = tile.mutable_data_ptr<T>();
    for (int64_t t = tb; t < te; ++t) {
      const int64_t n0 = t * tiles.n;
      const int64_t rows = std::min(tiles.n, N - n0);
      const at::Tensor q = q_hat.narrow(0, n0, rows);
      for (int64_t m0 = 0; m0 < M; m0 += tiles.m) {
        const int64_t cols = std::min(tiles.m, M - m0);
        at::Tensor s = at::from_blob(buf, {rows, cols}, q_hat.options());
        at::mm_out(s, q, k_hat.narrow(0, m0, cols).t());
        fold(static_cast<const T*>(buf), n0, rows, m0, cols);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> cosine_topk_cpu(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                                                   bool largest, double eps, int64_t tile_size) {
  check_topk_args(queries, keys, k, eps, tile_size);
  const int64_t N = queries.size(0);
  const auto acc = acc_type(queries.scalar_type());
  at::Tensor values = at::empty({N, k}, queries.options().dtype(acc));
  at::Tensor indices = at::empty({N, k}, queries.options().dtype(at::kLong));
  if (N == 0) return {values, indices};
  const at::Tensor q_hat = normalized_rows(queries, eps);
  const at::Tensor k_hat = normalized_rows(keys, eps);
  const at::Tensor filled_t = at::zeros({N}, queries.options().dtype(at::kLong));
  int64_t* filled = filled_t.mutable_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(q_hat.scalar_type(), "cosine_topk_cpu", [&] {
    scalar_t* vp = values.mutable_data_ptr<scalar_t>();
    int64_t* ip = indices.mutable_data_ptr<int64_t>();
    for_each_score_tile<scalar_t>(q_hat, k_hat, pick_tiles(tile_size),
                                  [&](const scalar_t* s, int64_t n0, int64_t rows, int64_t m0, int64_t cols) {
      if (largest) {
        merge_tile_topk<true>(s, rows, cols, m0, k, vp + n0 * k, ip + n0 * k, filled + n0);
      } else {
        merge_tile_topk<false>(s, rows, cols, m0, k, vp + n0 * k, ip + n0 * k, filled + n0);
      }
    });
  });
  return {values, indices};
}

at::Tensor cosine_reduce_cpu(const at::Tensor& queries, const at::Tensor& keys, c10::string_view reduce_sv,
                             double eps, int64_t tile_size) {
  check_reduce_args(queries, keys, eps, tile_size);
  const Reduce reduce = parse_reduce(std::string(reduce_sv));
  const int64_t N = queries.size(0);
  const auto acc = acc_type(queries.scalar_type());
  if (N == 0) return at::empty({0}, queries.options().dtype(acc));
  const at::Tensor q_hat = normalized_rows(queries, eps);
  const at::Tensor k_hat = normalized_rows(keys, eps);
  if (reduce == Reduce::kMean || reduce == Reduce::kSum) {
    // sum_j <q_hat, k_hat_j> = <q_hat, sum_j k_hat_j>: O((N + M) D), no tiles at all.
    const at::Tensor out = at::mv(q_hat, k_hat.sum(0));
    return reduce == Reduce::kMean ? out / static_cast<double>(keys.size(0)) : out;
  }
  const bool largest = reduce == Reduce::kMax;
  at::Tensor out = at::full({N}, largest ? -INFINITY : INFINITY, queries.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(q_hat.scalar_type(), "cosine_reduce_cpu", [&] {
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_each_score_tile<scalar_t>(q_hat, k_hat, pick_tiles(tile_size),
                                  [&](const scalar_t* s, int64_t n0, int64_t rows, int64_t, int64_t cols) {
      merge_tile_extreme(s, rows, cols, largest, op + n0);
    });
  });
  return out;
}

// ---- k-center greedy ------------------------------------------------------------------------------

template <typename T>
inline T sq_dist_impl(const T* a, const T* b, int64_t D) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < D; ++d) {
    const T diff = a[d] - b[d];
    acc += diff * diff;
  }
  return acc;
}

// Best (largest value, then lowest index) untaken sample of a block.
template <typename T>
struct Best {
  T value;
  int64_t index;
};

template <typename T>
Best<T> no_best() {
  return Best<T>{-std::numeric_limits<T>::infinity(), -1};
}

template <typename T>
void keep_better(Best<T>& best, T v, int64_t i) {
  if (best.index < 0 || scoring::ranks_before<true>(v, i, best.value, best.index)) best = Best<T>{v, i};
}

// One block of the k-center update against center c (the p-th center): the fused running-min
// pass. gap[a] = |c - center_a|^2.
template <typename T>
inline Best<T> kcenter_block_impl(const T* x, int64_t D, int64_t begin, int64_t end, const T* c, int64_t p,
                                  const T* gap, T* min_d, int64_t* assign, const uint8_t* taken) {
  Best<T> best = no_best<T>();
  for (int64_t i = begin; i < end; ++i) {
    const int64_t a = assign[i];
    if (a < 0 || !scoring::kcenter_can_skip(gap[a], min_d[i])) {
      const T d = sq_dist_impl(x + i * D, c, D);
      if (d < min_d[i]) {
        min_d[i] = d;
        assign[i] = p;
      }
    }
    if (!taken[i]) keep_better(best, min_d[i], i);
  }
  return best;
}

LK_CPU_CLONES Best<float> kcenter_block(const float* x, int64_t D, int64_t begin, int64_t end, const float* c,
                                        int64_t p, const float* gap, float* min_d, int64_t* assign,
                                        const uint8_t* taken) {
  return kcenter_block_impl(x, D, begin, end, c, p, gap, min_d, assign, taken);
}

Best<double> kcenter_block(const double* x, int64_t D, int64_t begin, int64_t end, const double* c, int64_t p,
                           const double* gap, double* min_d, int64_t* assign, const uint8_t* taken) {
  return kcenter_block_impl(x, D, begin, end, c, p, gap, min_d, assign, taken);
}

// ---- k-center seeding with the labeled set ----
// One pass per labeled center would stream the pool L times (memory-bound; in high dimension the
// triangle inequality rarely prunes). Instead each tile of kSeedRows rows is transposed once to
// [lane group][D][kSeedLanes] and every center sweeps over it while it sits in L1: kSeedCenters x
// kSeedLanes distances accumulate lane-parallel (compute-bound), each from the coordinates'
// differences as in every other pass. Centers fold in order with a strict <, so min_d and assign
// are those of one pass per center.
constexpr int64_t kSeedLanes = 16;    // rows per accumulator vector group
constexpr int64_t kSeedCenters = 6;   // centers per register tile (fits AVX2's and AVX-512's registers)
constexpr int64_t kSeedRows = 4 * kSeedLanes;

// xt[g][d][r] = x[row0 + g * kSeedLanes + r][d], zero past the last row.
template <typename T>
LK_CLONE_BODY void transpose_seed_tile(const T* x, int64_t D, int64_t row0, int64_t rows, T* xt) {
  for (int64_t g = 0; g < kSeedRows / kSeedLanes; ++g) {
    T* dst = xt + g * D * kSeedLanes;
    for (int64_t r = 0; r < kSeedLanes; ++r) {
      const int64_t row = g * kSeedLanes + r;
      const T* src = x + (row0 + row) * D;
      for (int64_t d = 0; d < D; ++d) dst[d * kSeedLanes + r] = row < rows ? src[d] : T(0);
    }
  }
}

// Squared distances of one lane group (kSeedLanes transposed rows) to kSeedCenters centers.
template <typename T>
LK_CLONE_BODY void seed_distances(const T* xt, int64_t D, const T* const* c, T (&acc)[kSeedCenters][kSeedLanes]) {
  for (auto& a : acc) {
    for (T& v : a) v = T(0);
  }
  for (int64_t d = 0; d < D; ++d) {
    const T* col = xt + d * kSeedLanes;
    for (int64_t k = 0; k < kSeedCenters; ++k) {
      const T cd = c[k][d];
#pragma omp simd
      for (int64_t r = 0; r < kSeedLanes; ++r) {
        const T diff = col[r] - cd;
        acc[k][r] += diff * diff;
      }
    }
  }
}

// Folds all L centers (rows centers[0..L) of x) into min_d/assign of rows [row0, row0 + rows).
template <typename T>
LK_CLONE_BODY void kcenter_seed_tile_impl(const T* x, int64_t D, int64_t row0, int64_t rows, const int64_t* centers,
                                          int64_t L, T* xt, T* min_d, int64_t* assign) {
  transpose_seed_tile(x, D, row0, rows, xt);
  T acc[kSeedCenters][kSeedLanes];
  for (int64_t p0 = 0; p0 < L; p0 += kSeedCenters) {
    const int64_t count = std::min(kSeedCenters, L - p0);
    const T* c[kSeedCenters];
    for (int64_t k = 0; k < kSeedCenters; ++k) c[k] = x + centers[p0 + std::min(k, count - 1)] * D;
    for (int64_t g = 0; g * kSeedLanes < rows; ++g) {
      seed_distances(xt + g * D * kSeedLanes, D, c, acc);
      const int64_t lanes = std::min(kSeedLanes, rows - g * kSeedLanes);
      for (int64_t k = 0; k < count; ++k) {
        for (int64_t r = 0; r < lanes; ++r) {
          const int64_t i = row0 + g * kSeedLanes + r;
          if (acc[k][r] < min_d[i]) {
            min_d[i] = acc[k][r];
            assign[i] = p0 + k;
          }
        }
      }
    }
  }
}

LK_CPU_CLONES void kcenter_seed_tile(const float* x, int64_t D, int64_t row0, int64_t rows, const int64_t* centers,
                                     int64_t L, float* xt, float* min_d, int64_t* assign) {
  kcenter_seed_tile_impl(x, D, row0, rows, centers, L, xt, min_d, assign);
}

void kcenter_seed_tile(const double* x, int64_t D, int64_t row0, int64_t rows, const int64_t* centers, int64_t L,
                       double* xt, double* min_d, int64_t* assign) {
  kcenter_seed_tile_impl(x, D, row0, rows, centers, L, xt, min_d, assign);
}

template <typename T>
class KCenterState {
 public:
  KCenterState(const T* x, int64_t N, int64_t D)
      : x_(x), N_(N), D_(D), min_d_(N, std::numeric_limits<T>::infinity()), assign_(N, -1), taken_(N, 0),
        partial_(num_blocks(N, kBlock)) {}

  // Makes the L labeled samples centers (before any other) and returns the farthest untaken
  // sample afterwards (-1 if none).
  int64_t seed(const int64_t* labeled, int64_t L) {
    centers_.assign(labeled, labeled + L);
    for (int64_t j = 0; j < L; ++j) taken_[labeled[j]] = 1;
    at::parallel_for(0, num_blocks(N_, kSeedRows), 1, [&](int64_t t0, int64_t t1) {
      std::vector<T> xt(kSeedRows * D_);
      for (int64_t t = t0; t < t1; ++t) {
        kcenter_seed_tile(x_, D_, t * kSeedRows, std::min(kSeedRows, N_ - t * kSeedRows), labeled, L, xt.data(),
                          min_d_.data(), assign_.data());
      }
    });
    at::parallel_for(0, static_cast<int64_t>(partial_.size()), 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        Best<T> best = no_best<T>();
        for (int64_t i = b * kBlock; i < std::min(N_, (b + 1) * kBlock); ++i) {
          if (!taken_[i]) keep_better(best, min_d_[i], i);
        }
        partial_[b] = best;
      }
    });
    return farthest();
  }

  // Makes sample c a center and returns the farthest untaken sample afterwards (-1 if none).
  int64_t add_center(int64_t c) {
    const int64_t p = static_cast<int64_t>(centers_.size());
    const T* xc = x_ + c * D_;
    std::vector<T> gap(p);
    for (int64_t a = 0; a < p; ++a) gap[a] = sq_dist_impl(x_ + centers_[a] * D_, xc, D_);
    centers_.push_back(c);
    taken_[c] = 1;
    at::parallel_for(0, static_cast<int64_t>(partial_.size()), 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        partial_[b] = kcenter_block(x_, D_, b * kBlock, std::min(N_, (b + 1) * kBlock), xc, p, gap.data(),
                                    min_d_.data(), assign_.data(), taken_.data());
      }
    });
    return farthest();
  }

 private:
  // The best of the blocks' partial results.
  int64_t farthest() const {
    Best<T> best = no_best<T>();
    for (const Best<T>& b : partial_) {
      if (b.index >= 0) keep_better(best, b.value, b.index);
    }
    return best.index;
  }

  const T* x_;
  int64_t N_, D_;
  std::vector<T> min_d_;
  std::vector<int64_t> assign_;
  std::vector<uint8_t> taken_;
  std::vector<Best<T>> partial_;
  std::vector<int64_t> centers_;
};

// Index of the row nearest the mean, with the reference's own ATen ops per row (identical bits,
// first index on ties), a block of rows at a time so that no N x D temporary is made.
at::Tensor kcenter_greedy_cpu(const at::Tensor& embeddings, int64_t budget, const c10::optional<at::Tensor>& labeled,
                              bool cosine, double eps) {
  const at::Tensor lab = labeled.has_value() ? labeled->to(at::kCPU).contiguous()
                                             : at::empty({0}, embeddings.options().dtype(at::kLong));
  check_kcenter_args(embeddings, budget, lab, eps);
  at::Tensor picks = at::empty({budget}, embeddings.options().dtype(at::kLong));
  if (budget == 0) return picks;
  const at::Tensor x = cosine ? normalized_rows(embeddings, eps)
                              : embeddings.to(acc_type(embeddings.scalar_type())).contiguous();
  const int64_t N = x.size(0);
  const int64_t D = x.size(1);
  int64_t* out = picks.mutable_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kcenter_greedy_cpu", [&] {
    KCenterState<scalar_t> state(x.const_data_ptr<scalar_t>(), N, D);
    int64_t next = -1;
    int64_t t = 0;
    if (lab.numel() > 0) {
      next = state.seed(lab.const_data_ptr<int64_t>(), lab.numel());
    } else {
      next = scoring::nearest_to_mean(x, kBlock);
    }
    for (; t < budget; ++t) {
      out[t] = next;
      if (t + 1 < budget) next = state.add_center(next);  // the last pick needs no update
    }
  });
  return picks;
}

// ---- BADGE ----------------------------------------------------------------------------------------

template <typename T>
inline T dot_impl(const T* a, const T* b, int64_t n) {
  T acc = T(0);
#pragma omp simd reduction(+ : acc)
  for (int64_t d = 0; d < n; ++d) acc += a[d] * b[d];
  return acc;
}

template <typename T>
inline void badge_block_impl(const T* q, const T* h, const T* g2, int64_t C, int64_t D, int64_t begin, int64_t end,
                             int64_t c, T* min_d) {
  const T* qc = q + c * C;
  const T* hc = h + c * D;
  for (int64_t i = begin; i < end; ++i) {
    const T d = scoring::badge_sq_dist(g2[i], g2[c], dot_impl(q + i * C, qc, C), dot_impl(h + i * D, hc, D));
    min_d[i] = d < min_d[i] ? d : min_d[i];
  }
}

LK_CPU_CLONES void badge_block(const float* q, const float* h, const float* g2, int64_t C, int64_t D, int64_t begin,
                               int64_t end, int64_t c, float* min_d) {
  badge_block_impl(q, h, g2, C, D, begin, end, c, min_d);
}

void badge_block(const double* q, const double* h, const double* g2, int64_t C, int64_t D, int64_t begin,
                 int64_t end, int64_t c, double* min_d) {
  badge_block_impl(q, h, g2, C, D, begin, end, c, min_d);
}

// BADGE's inverse-CDF draw (scoring::draw_pick), the block sums in parallel.
template <typename T>
int64_t badge_draw(const std::vector<T>& min_d, const std::vector<uint8_t>& taken, double u) {
  const int64_t N = static_cast<int64_t>(min_d.size());
  std::vector<double> block_sum(num_blocks(N, scoring::kDrawBlock));
  at::parallel_for(0, static_cast<int64_t>(block_sum.size()), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t end = std::min(N, (b + 1) * scoring::kDrawBlock);
      block_sum[b] = scoring::draw_block_sum(min_d.data(), taken.data(), b * scoring::kDrawBlock, end);
    }
  });
  return scoring::draw_pick(min_d.data(), taken.data(), N, block_sum.data(), u);
}

at::Tensor badge_select_cpu(const at::Tensor& probs, const at::Tensor& embeddings, const at::Tensor& uniforms,
                            int64_t budget) {
  check_badge_args(probs, embeddings, uniforms, budget);
  at::Tensor picks = at::empty({budget}, probs.options().dtype(at::kLong));
  if (budget == 0) return picks;
  // q = p - onehot(argmax p), h and |g|^2, with the reference's ATen ops (identical bits).
  const auto acc = acc_type(embeddings.scalar_type());
  at::Tensor q = probs.to(acc).clone();
  const int64_t N = q.size(0);
  const at::Tensor rows = at::arange(N, q.options().dtype(at::kLong));
  const at::Tensor top = q.argmax(1);
  q.index_put_({rows, top}, q.index({rows, top}) - 1.0);
  q = q.contiguous();
  const at::Tensor h = embeddings.to(acc).contiguous();
  const at::Tensor g2 = (q.square().sum(1) * h.square().sum(1)).contiguous();
  const int64_t C = q.size(1);
  const int64_t D = h.size(1);
  const at::Tensor uni = uniforms.contiguous();
  const double* u = uni.const_data_ptr<double>();
  int64_t* out = picks.mutable_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "badge_select_cpu", [&] {
    const scalar_t* qp = q.const_data_ptr<scalar_t>();
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    const scalar_t* gp = g2.const_data_ptr<scalar_t>();
    std::vector<scalar_t> min_d(N, std::numeric_limits<scalar_t>::infinity());
    std::vector<uint8_t> taken(N, 0);
    int64_t c = g2.argmax().item<int64_t>();
    for (int64_t t = 0; t < budget; ++t) {
      if (t > 0) c = badge_draw(min_d, taken, u[t]);
      out[t] = c;
      taken[c] = 1;
      at::parallel_for(0, num_blocks(N, kBlock), 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          badge_block(qp, hp, gp, C, D, b * kBlock, std::min(N, (b + 1) * kBlock), c, min_d.data());
        }
      });
    }
  });
  return picks;
}

}  // namespace

TORCH_LIBRARY_IMPL(labelkit, CPU, m) {
  m.impl("uncertainty", &uncertainty_cpu);
  m.impl("_uncertainty_backward", &uncertainty_backward_cpu);
  m.impl("cosine_topk", &cosine_topk_cpu);
  m.impl("cosine_reduce", &cosine_reduce_cpu);
  m.impl("kcenter_greedy", &kcenter_greedy_cpu);
  m.impl("badge_select", &badge_select_cpu);
}

}  // namespace labelkit
