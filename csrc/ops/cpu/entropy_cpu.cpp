// CPU kernels of the entropy family. Each forward row runs two passes over data that stays in
// cache: max (+ NaN flag), then exp-moments (s, t) through the shared math in ops/entropy.h; the
// backward reads each row once, from the forward's saved lse and entropy. The row loops are
// `omp simd` loops (vectorised, with a fixed per-binary summation order), inlined into block
// functions compiled for several ISAs (target_clones) with a runtime pick.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "ops/entropy.h"
#include "ops/entropy_checks.h"
#include "ops/cpu/clones.h"
#include "ops/cpu/fresh_output.h"
#include "ops/cpu/narrow.h"
#include "ops/cpu/row_moments.h"

namespace labelkit {
namespace {

using entropy::neg_inf;

constexpr int64_t kGrainElements = 1 << 15;  // elements per parallel task, amortises scheduling

int64_t row_grain(int64_t C) {
  return std::max<int64_t>(1, kGrainElements / C);
}

// ---- row primitives, generic over the accumulation type -------------------------------------

// First index of the maximum; with a NaN in the row, the first NaN (torch.argmax's rule).
template <typename T>
LK_CLONE_BODY int64_t row_argmax(const T* x, int64_t C, T m, bool has_nan) {
  for (int64_t j = 0; j < C; ++j) {
    if (has_nan ? x[j] != x[j] : x[j] == m) return j;
  }
  return 0;  // unreachable: m is one of the values (all -inf rows match at j == 0)
}

// Max, NaN flag and exp-moments of one row: the prologue every forward shares.
template <typename T>
struct RowStats {
  T m;
  bool has_nan;
  T s;
  T t;
  int64_t argmax = -1;  // the prediction when already known; -1: scan the row for it
};

template <typename T>
LK_CLONE_BODY RowStats<T> row_stats(const T* x, int64_t C, T* e_out) {
  RowStats<T> st;
  st.m = cpu::row_max(x, C, st.has_nan);
  if (e_out != nullptr) {
    cpu::row_moments<T, true>(x, C, st.m, e_out, st.s, st.t);
  } else {
    cpu::row_moments<T, false>(x, C, st.m, nullptr, st.s, st.t);
  }
  return st;
}

// ---- blocks of rows: one ISA-dispatched call per parallel task, so short rows (C = 10) pay no
// per-row call; the row loops inline into each clone ------------------------------------------

// Per-block arguments of the gate forward.
template <typename acc_t>
struct GateRows {
  acc_t* entropy;
  acc_t* lse;
  bool* uncertain;      // null: plain softmax_entropy
  int64_t* prediction;  // null: plain softmax_entropy
  acc_t threshold;
  const int64_t* clusters;  // null: no routing
  int64_t S;
  acc_t* cluster_probs;
  int64_t* cluster;
};

// Softmax mass per cluster (e_j / s summed per id; an empty cluster stays exactly 0, whatever
// s is, as in the reference) and the first best bin.
template <typename acc_t>
LK_CLONE_BODY int64_t cluster_bins(const acc_t* e, int64_t C, acc_t s, const int64_t* clusters, int64_t S, acc_t* bins) {
  for (int64_t k = 0; k < S; ++k) bins[k] = acc_t(0);
  const acc_t inv_s = acc_t(1) / s;
  for (int64_t j = 0; j < C; ++j) bins[clusters[j]] += e[j] * inv_s;
  int64_t best = 0;
  for (int64_t k = 1; k < S; ++k) {
    if (entropy::better(bins[k], bins[best])) best = k;
  }
  return best;
}

// Every forward output of row i from its statistics; e holds the row's exp(z - max) when routed.
template <typename acc_t>
LK_CLONE_BODY void write_row(const GateRows<acc_t>& out, int64_t i, const acc_t* r, int64_t C, const RowStats<acc_t>& st,
                             const acc_t* e) {
  const acc_t log_s = entropy::fast_log(st.s);  // once: a libm call per row
  const acc_t H = entropy::entropy_from_log(log_s, st.s, st.t);
  out.entropy[i] = H;
  out.lse[2 * i] = st.m;  // the log-sum-exp as (max, log sum exp(z - max))
  out.lse[2 * i + 1] = log_s;
  if (out.uncertain == nullptr) return;
  out.uncertain[i] = H >= out.threshold;
  out.prediction[i] = st.argmax >= 0 ? st.argmax : row_argmax(r, C, st.m, st.has_nan);
  if (out.clusters != nullptr) out.cluster[i] = cluster_bins(e, C, st.s, out.clusters, out.S, out.cluster_probs + i * out.S);
}

template <typename scalar_t, typename acc_t>
LK_CLONE_BODY void forward_rows_impl(const scalar_t* x, int64_t C, int64_t begin, int64_t end, const GateRows<acc_t>& out, acc_t* buf, acc_t* e) {
  const bool routed = out.clusters != nullptr;
  const int64_t rows = std::is_same_v<scalar_t, acc_t> ? end - begin : cpu::rows_per_convert(C);
  for (int64_t b = begin; b < end; b += rows) {
    const int64_t n = std::min(rows, end - b);
    const acc_t* block = cpu::acc_rows<scalar_t, acc_t>(x + b * C, n * C, buf);
    for (int64_t i = 0; i < n; ++i) {
      const acc_t* r = block + i * C;
      write_row(out, b + i, r, C, row_stats(r, C, routed ? e : nullptr), e);
    }
  }
}

// Short rows (C = 10: the ensemble's case) would leave most of a vector idle in the row loops
// above, and their horizontal max/sum reductions cost more than the row. They run in blocks of
// kShortBlock rows, transposed, so that every step is a vertical vector loop across the rows of
// the block; each row's sums still run in index order (a row's result does not depend on its
// batch).
// Up to 32 classes; past that the row loops above win (C = 64: 1.2 ms against 2.4 ms
// transposed, C = 128: 2.0 against 4.1, float32, N = 65,536).
constexpr int64_t kShortC = 32;
constexpr int64_t kShortBlock = 64;  // rows per block: the scratch arrays stay in L1

int64_t short_scratch(int64_t C) {
  return 3 * kShortBlock * C;
}

template <typename scalar_t, typename acc_t>
LK_CLONE_BODY void forward_short_rows_impl(const scalar_t* x, int64_t C, int64_t begin, int64_t end, const GateRows<acc_t>& out,
                                           acc_t* scratch) {
  constexpr int64_t B = kShortBlock;
  acc_t* v = scratch;       // the block in acc_t, row-major (half types only)
  acc_t* vt = v + B * C;    // the block transposed: vt[j * B + i] = row i, class j
  acc_t* et = vt + B * C;   // exp(z - m), transposed (routed only)
  const bool routed = out.clusters != nullptr;
  acc_t m[B], s[B], t[B], e_row[kShortC];
  int32_t nan[B], best[B], first_nan[B];  // torch.argmax's rule: the first NaN, else the first max
  for (int64_t b = begin; b < end; b += B) {
    const int64_t n = std::min(B, end - b);
    const acc_t* r;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      r = x + b * C;
    } else {
      const scalar_t* src = x + b * C;
#pragma omp simd
      for (int64_t k = 0; k < n * C; ++k) v[k] = static_cast<acc_t>(src[k]);
      r = v;
    }
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < C; ++j) vt[j * B + i] = r[i * C + j];
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      m[i] = neg_inf<acc_t>();
      nan[i] = 0;
      best[i] = 0;
      first_nan[i] = -1;
      s[i] = acc_t(0);
      t[i] = acc_t(0);
    }
    for (int64_t j = 0; j < C; ++j) {
      const acc_t* col = vt + j * B;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        const bool is_nan = col[i] != col[i];
        best[i] = col[i] > m[i] ? static_cast<int32_t>(j) : best[i];
        m[i] = col[i] > m[i] ? col[i] : m[i];  // drops NaN, tracked separately
        first_nan[i] = is_nan && first_nan[i] < 0 ? static_cast<int32_t>(j) : first_nan[i];
        nan[i] |= static_cast<int32_t>(is_nan);
      }
    }
    for (int64_t j = 0; j < C; ++j) {
      const acc_t* col = vt + j * B;
      acc_t* ecol = et + j * B;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) {
        acc_t e, ed;
        entropy::term(col[i], m[i], e, ed);
        s[i] += e;
        t[i] += ed;
        ecol[i] = e;
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      if (routed) {
        for (int64_t j = 0; j < C; ++j) e_row[j] = et[j * B + i];
      }
      const int64_t argmax = nan[i] != 0 ? first_nan[i] : best[i];
      write_row(out, b + i, r + i * C, C, RowStats<acc_t>{m[i], nan[i] != 0, s[i], t[i], argmax}, e_row);
    }
  }
}

// Per-block arguments of the backward.
template <typename acc_t>
struct GradRows {
  const acc_t* lse;
  const acc_t* entropy;
  const acc_t* grad_entropy;   // null: no entropy gradient
  int64_t grad_entropy_stride;  // 0: one value for every row
  const acc_t* grad_cluster;   // [N, S]; null: no cluster-mass gradient
  const acc_t* cluster_probs;  // [N, S]
  const int64_t* clusters;
  int64_t S;
};

template <typename T>
LK_CLONE_BODY void grad_chunk(const T* x, T m, T log_s, T H, T g_H, T* gx) {
#pragma omp simd
  for (int64_t l = 0; l < cpu::kLanes; ++l) gx[l] = entropy::gate_grad(x[l], m, log_s, H, g_H, T(0));
}

// In whole chunks of kLanes: a partial last chunk is the row's last kLanes elements, recomputing
// a few to the same values (no scalar tail; gx never aliases x).
template <typename T>
LK_CLONE_BODY void grad_row(const T* x, int64_t C, const T* lse, T H, T g_H, T* gx) {
  const T m = lse[0], log_s = lse[1];
  if (C < cpu::kLanes) {
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) gx[j] = entropy::gate_grad(x[j], m, log_s, H, g_H, T(0));
    return;
  }
  int64_t j = 0;
  for (; j + cpu::kLanes <= C; j += cpu::kLanes) grad_chunk(x + j, m, log_s, H, g_H, gx + j);
  if (j < C) grad_chunk(x + C - cpu::kLanes, m, log_s, H, g_H, gx + C - cpu::kLanes);
}

template <typename T>
LK_CLONE_BODY void grad_row_clusters(const T* x, int64_t C, const T* lse, T H, T g_H, const T* g_c, T dot, const int64_t* clusters, T* gx) {
  const T m = lse[0], log_s = lse[1];
  // The cluster terms go through gx first: a scalar gather, then a vector loop over contiguous
  // data (x86 has no cheap gather; inside the vector loop it halves the speed).
  for (int64_t j = 0; j < C; ++j) gx[j] = g_c[clusters[j]] - dot;
#pragma omp simd
  for (int64_t j = 0; j < C; ++j) gx[j] = entropy::gate_grad(x[j], m, log_s, H, g_H, gx[j]);
}

template <typename acc_t>
LK_CLONE_BODY void backward_row(const acc_t* r, int64_t C, int64_t i, const GradRows<acc_t>& in, acc_t* g) {
  const acc_t g_H = in.grad_entropy != nullptr ? in.grad_entropy[i * in.grad_entropy_stride] : acc_t(0);
  if (in.grad_cluster == nullptr) {
    grad_row(r, C, in.lse + 2 * i, in.entropy[i], g_H, g);
    return;
  }
  const acc_t* g_c = in.grad_cluster + i * in.S;
  const acc_t* cp = in.cluster_probs + i * in.S;
  acc_t dot = acc_t(0);
  for (int64_t k = 0; k < in.S; ++k) dot += g_c[k] * cp[k];
  grad_row_clusters(r, C, in.lse + 2 * i, in.entropy[i], g_H, g_c, dot, in.clusters, g);
}

int64_t backward_rows_per_convert(int64_t C) {
  return C <= kShortC ? kShortBlock : cpu::rows_per_convert(C);
}

// Short rows without clusters: each row's statistics are broadcast over its elements, then the
// whole block is one flat vector loop (a loop per row of C = 10 leaves most of a vector idle).
// stats holds 4 kShortBlock x C arrays.
template <typename acc_t>
LK_CLONE_BODY void backward_short_block(const acc_t* r, int64_t C, int64_t row0, int64_t n, const GradRows<acc_t>& in,
                                        acc_t* g, acc_t* stats) {
  acc_t* M = stats;
  acc_t* LS = M + kShortBlock * C;
  acc_t* HH = LS + kShortBlock * C;
  acc_t* GH = HH + kShortBlock * C;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t row = row0 + i;
    const acc_t m = in.lse[2 * row], log_s = in.lse[2 * row + 1], H = in.entropy[row];
    const acc_t g_H = in.grad_entropy != nullptr ? in.grad_entropy[row * in.grad_entropy_stride] : acc_t(0);
#pragma omp simd
    for (int64_t j = 0; j < C; ++j) {
      M[i * C + j] = m;
      LS[i * C + j] = log_s;
      HH[i * C + j] = H;
      GH[i * C + j] = g_H;
    }
  }
#pragma omp simd
  for (int64_t k = 0; k < n * C; ++k) g[k] = entropy::gate_grad(r[k], M[k], LS[k], HH[k], GH[k], acc_t(0));
}

bool short_backward(int64_t C, bool routed) {
  return C <= kShortC && !routed;
}

// Rows [b, b + n) of the block r (already in acc_t) into g.
template <typename acc_t>
LK_CLONE_BODY void backward_block(const acc_t* r, int64_t C, int64_t b, int64_t n, const GradRows<acc_t>& in, acc_t* g,
                                  acc_t* stats) {
  if (short_backward(C, in.grad_cluster != nullptr)) {
    for (int64_t k = 0; k < n; k += kShortBlock) {
      const int64_t rows = std::min(kShortBlock, n - k);
      backward_short_block(r + k * C, C, b + k, rows, in, g + k * C, stats);
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) backward_row(r + i * C, C, b + i, in, g + i * C);
}

template <typename scalar_t, typename acc_t>
LK_CLONE_BODY void backward_rows_impl(const scalar_t* x, int64_t C, int64_t begin, int64_t end, const GradRows<acc_t>& in,
                                      scalar_t* gx, acc_t* buf, acc_t* gbuf, acc_t* stats) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    backward_block(x + begin * C, C, begin, end - begin, in, gx + begin * C, stats);
  } else {
    const int64_t rows = backward_rows_per_convert(C);
    for (int64_t b = begin; b < end; b += rows) {
      const int64_t n = std::min(rows, end - b);
      const int64_t len = n * C;
      backward_block(cpu::acc_rows(x + b * C, len, buf), C, b, n, in, gbuf, stats);
      scalar_t* dst = gx + b * C;
#pragma omp simd
      for (int64_t k = 0; k < len; ++k) dst[k] = cpu::narrow<scalar_t>(gbuf[k]);
    }
  }
}

// Clones per input type (float math for the half types, double for gradcheck).
#define LK_BLOCK_FNS(scalar_t, acc_t)                                                                  \
  LK_CPU_CLONES void forward_rows(const scalar_t* x, int64_t C, int64_t begin, int64_t end,           \
                                  const GateRows<acc_t>& out, acc_t* buf, acc_t* e) {                  \
    if (C <= kShortC) return forward_short_rows_impl<scalar_t, acc_t>(x, C, begin, end, out, buf);     \
    forward_rows_impl<scalar_t, acc_t>(x, C, begin, end, out, buf, e);                                 \
  }                                                                                                    \
  LK_CPU_CLONES void backward_rows(const scalar_t* x, int64_t C, int64_t begin, int64_t end,          \
                                   const GradRows<acc_t>& in, scalar_t* gx, acc_t* buf, acc_t* gbuf,   \
                                   acc_t* stats) {                                                     \
    backward_rows_impl<scalar_t, acc_t>(x, C, begin, end, in, gx, buf, gbuf, stats);                   \
  }
LK_BLOCK_FNS(float, float)
LK_BLOCK_FNS(c10::Half, float)
LK_BLOCK_FNS(c10::BFloat16, float)
LK_BLOCK_FNS(double, double)
#undef LK_BLOCK_FNS

int64_t rows_of(const at::Tensor& x) {
  return x.numel() / x.size(-1);
}

// Runs the forward over all rows in parallel tasks, each with its own scratch rows.
template <typename scalar_t, typename acc_t>
void run_forward(const at::Tensor& x, const GateRows<acc_t>& out) {
  const int64_t C = x.size(-1);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  at::parallel_for(0, rows_of(x), row_grain(C), [&](int64_t begin, int64_t end) {
    // Short rows use buf as their block scratch (forward_short_rows_impl).
    std::vector<acc_t> buf(C <= kShortC ? short_scratch(C)
                                        : (std::is_same_v<scalar_t, acc_t> ? 0 : cpu::rows_per_convert(C) * C));
    std::vector<acc_t> e(out.clusters != nullptr ? C : 0);
    forward_rows(xp, C, begin, end, out, buf.data(), e.data());
  });
}

// ---- ops -------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> softmax_entropy_cpu(const at::Tensor& logits) {
  check_logits(logits, "softmax_entropy", 1);
  const at::Tensor x = logits.contiguous();
  const auto opts = x.options().dtype(entropy_dtype(x.scalar_type()));
  at::Tensor ent = at::empty(x.sizes().slice(0, x.dim() - 1), opts);
  at::Tensor lse = at::empty(lse_shape(x), opts);
  if (ent.numel() == 0) return {ent, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_entropy_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GateRows<acc_t> out{ent.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>(), nullptr, nullptr, acc_t(0), nullptr, 0, nullptr, nullptr};
    run_forward<scalar_t, acc_t>(x, out);
  });
  return {ent, lse};
}

// Cluster ids must lie in [0, S): checked before any write, so a bad id can never index out of
// the per-row bins.
void check_cluster_ids(const at::Tensor& clusters, int64_t S, const char* op) {
  const int64_t* c = clusters.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < clusters.numel(); ++j) {
    TORCH_CHECK(c[j] >= 0 && c[j] < S, op, ": clusters must hold ids in [0, num_clusters = ", S,
                "), got ", c[j], " at class ", j);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> entropy_gate_cpu(
    const at::Tensor& logits, double threshold, const c10::optional<at::Tensor>& clusters, int64_t num_clusters) {
  check_gate_args(logits, threshold, clusters, num_clusters);
  const at::Tensor x = logits.contiguous();
  const int64_t N = x.size(0);
  const bool routed = clusters.has_value();
  const int64_t S = routed ? num_clusters : 0;
  at::Tensor cl;
  if (routed) {
    cl = clusters->contiguous();
    check_cluster_ids(cl, S, "entropy_gate");
  }
  const auto opts = x.options();
  const auto acc_opts = opts.dtype(entropy_dtype(x.scalar_type()));
  at::Tensor ent = at::empty({N}, acc_opts);
  at::Tensor lse = at::empty({N, 2}, acc_opts);
  at::Tensor unc = at::empty({N}, opts.dtype(at::kBool));
  at::Tensor pred = at::empty({N}, opts.dtype(at::kLong));
  at::Tensor cprob = at::empty({N, S}, acc_opts);
  at::Tensor cidx = at::empty({routed ? N : 0}, opts.dtype(at::kLong));
  if (N == 0) return {ent, unc, pred, cprob, cidx, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "entropy_gate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GateRows<acc_t> out{
        ent.mutable_data_ptr<acc_t>(),
        lse.mutable_data_ptr<acc_t>(),
        unc.mutable_data_ptr<bool>(),
        pred.mutable_data_ptr<int64_t>(),
        static_cast<acc_t>(threshold),
        routed ? cl.const_data_ptr<int64_t>() : nullptr,
        S,
        routed ? cprob.mutable_data_ptr<acc_t>() : nullptr,
        routed ? cidx.mutable_data_ptr<int64_t>() : nullptr};
    run_forward<scalar_t, acc_t>(x, out);
  });
  return {ent, unc, pred, cprob, cidx, lse};
}

at::Tensor run_backward(const at::Tensor& logits, const c10::optional<at::Tensor>& grad_entropy,
                        const c10::optional<at::Tensor>& grad_cluster, const at::Tensor& entropy, const at::Tensor& lse,
                        const c10::optional<at::Tensor>& clusters, const at::Tensor& cluster_probs) {
  const BackwardInputs b = backward_inputs(logits, grad_entropy, grad_cluster, entropy, lse, clusters, cluster_probs);
  const at::Tensor& x = b.x;
  const int64_t C = x.size(-1);
  at::Tensor gx = cpu::empty_output_like(x);
  if (x.numel() == 0) return gx;
  const bool routed = b.routed();
  const int64_t S = routed ? b.cluster_probs.size(1) : 0;
  if (routed) check_cluster_ids(b.clusters, S, "entropy_gate_backward");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "entropy_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GradRows<acc_t> in{
        b.lse.const_data_ptr<acc_t>(),
        b.entropy.const_data_ptr<acc_t>(),
        b.grad_entropy.defined() ? b.grad_entropy.const_data_ptr<acc_t>() : nullptr,
        b.grad_entropy_stride,
        routed ? b.grad_cluster.const_data_ptr<acc_t>() : nullptr,
        routed ? b.cluster_probs.const_data_ptr<acc_t>() : nullptr,
        routed ? b.clusters.const_data_ptr<int64_t>() : nullptr,
        S};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows_of(x), row_grain(C), [&](int64_t begin, int64_t end) {
      const int64_t scratch = std::is_same_v<scalar_t, acc_t> ? 0 : backward_rows_per_convert(C) * C;
      std::vector<acc_t> buf(scratch);
      std::vector<acc_t> gbuf(scratch);
      std::vector<acc_t> stats(short_backward(C, routed) ? 4 * kShortBlock * C : 0);
      backward_rows(xp, C, begin, end, in, gxp, buf.data(), gbuf.data(), stats.data());
    });
  });
  return gx;
}

at::Tensor softmax_entropy_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& entropy,
                                        const at::Tensor& lse) {
  check_softmax_entropy_backward_args(grad, logits, entropy, lse);
  return run_backward(logits, grad, c10::nullopt, entropy, lse, c10::nullopt, entropy);
}

at::Tensor entropy_gate_backward_cpu(const c10::optional<at::Tensor>& grad_entropy,
                                     const c10::optional<at::Tensor>& grad_cluster_probs, const at::Tensor& logits,
                                     const at::Tensor& entropy, const at::Tensor& lse,
                                     const c10::optional<at::Tensor>& clusters, const at::Tensor& cluster_probs) {
  check_entropy_gate_backward_args(grad_entropy, grad_cluster_probs, logits, entropy, lse, clusters, cluster_probs);
  return run_backward(logits, grad_entropy, grad_cluster_probs, entropy, lse, clusters, cluster_probs);
}

}  // namespace

TORCH_LIBRARY_IMPL(labelkit, CPU, m) {
  m.impl("softmax_entropy", &softmax_entropy_cpu);
  m.impl("_softmax_entropy_backward", &softmax_entropy_backward_cpu);
  m.impl("entropy_gate", &entropy_gate_cpu);
  m.impl("_entropy_gate_backward", &entropy_gate_backward_cpu);
}

}  // namespace labelkit
