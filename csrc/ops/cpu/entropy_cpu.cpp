// CPU kernels of the entropy family. Each row runs two passes over data that stays in cache:
// max (+ NaN flag), then exp-moments (s, t) through the shared math in ops/entropy.h. The row
// loops are `omp simd` reductions (vectorised, with a fixed per-binary summation order) and are
// compiled for several ISAs (target_clones) with a runtime pick.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "ops/entropy.h"
#include "ops/entropy_checks.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
// The selects in ops/entropy.h vectorise only with -fno-trapping-math (set by setup.py and
// CMakeLists.txt): otherwise a compare that may trap on NaN cannot be if-converted.
#define LK_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LK_CPU_CLONES
#endif
// Row templates are inlined into each ISA clone (a call would run the generic-ISA copy).
#if defined(__GNUC__)
#define LK_ROW inline __attribute__((always_inline))
#else
#define LK_ROW inline
#endif

namespace labelkit {
namespace {

using entropy::neg_inf;

constexpr int64_t kGrainElements = 1 << 15;  // elements per parallel task, amortises scheduling

int64_t row_grain(int64_t C) {
  return std::max<int64_t>(1, kGrainElements / C);
}

// ---- row primitives, generic over the accumulation type -------------------------------------

template <typename T>
LK_ROW T row_max_impl(const T* x, int64_t C, bool& has_nan) {
  T m = neg_inf<T>();
  int32_t any_nan = 0;
#pragma omp simd reduction(max : m) reduction(| : any_nan)
  for (int64_t j = 0; j < C; ++j) {
    const T v = x[j];
    m = v > m ? v : m;  // drops NaN, tracked separately
    any_nan |= static_cast<int32_t>(v != v);
  }
  has_nan = any_nan != 0;
  return m;
}

// s = sum exp(x - m), t = sum exp(x - m) (x - m); with kStore also writes exp(x - m) to e_out.
template <typename T, bool kStore>
LK_ROW void row_moments_impl(const T* x, int64_t C, T m, T* e_out, T& s_out, T& t_out) {
  T s = T(0);
  T t = T(0);
#pragma omp simd reduction(+ : s, t)
  for (int64_t j = 0; j < C; ++j) {
    T e, ed;
    entropy::term(x[j], m, e, ed);
    s += e;
    t += ed;
    if constexpr (kStore) e_out[j] = e;
  }
  s_out = s;
  t_out = t;
}

template <typename T>
LK_ROW void row_grad_impl(const T* x, int64_t C, T m, T log_s, T H, T g, T* gx) {
#pragma omp simd
  for (int64_t j = 0; j < C; ++j) {
    gx[j] = entropy::entropy_grad(x[j], m, log_s, H, g);
  }
}

// ---- float instances compiled per ISA; double uses the generic code directly ---------------

LK_CPU_CLONES float row_max(const float* x, int64_t C, bool& has_nan) {
  return row_max_impl<float>(x, C, has_nan);
}
LK_CPU_CLONES void row_moments(const float* x, int64_t C, float m, float& s, float& t) {
  row_moments_impl<float, false>(x, C, m, nullptr, s, t);
}
LK_CPU_CLONES void row_moments_store(const float* x, int64_t C, float m, float* e, float& s, float& t) {
  row_moments_impl<float, true>(x, C, m, e, s, t);
}
LK_CPU_CLONES void row_grad(const float* x, int64_t C, float m, float log_s, float H, float g, float* gx) {
  row_grad_impl<float>(x, C, m, log_s, H, g, gx);
}

double row_max(const double* x, int64_t C, bool& has_nan) {
  return row_max_impl<double>(x, C, has_nan);
}
void row_moments(const double* x, int64_t C, double m, double& s, double& t) {
  row_moments_impl<double, false>(x, C, m, nullptr, s, t);
}
void row_moments_store(const double* x, int64_t C, double m, double* e, double& s, double& t) {
  row_moments_impl<double, true>(x, C, m, e, s, t);
}
void row_grad(const double* x, int64_t C, double m, double log_s, double H, double g, double* gx) {
  row_grad_impl<double>(x, C, m, log_s, H, g, gx);
}

// First index of the maximum; with a NaN in the row, the first NaN (torch.argmax's rule).
template <typename T>
int64_t row_argmax(const T* x, int64_t C, T m, bool has_nan) {
  for (int64_t j = 0; j < C; ++j) {
    if (has_nan ? x[j] != x[j] : x[j] == m) return j;
  }
  return 0;  // unreachable: m is one of the values (all -inf rows match at j == 0)
}

// Max, NaN flag and exp-moments of one row: the prologue every op shares.
template <typename T>
struct RowStats {
  T m;
  bool has_nan;
  T s;
  T t;
};

template <typename T>
RowStats<T> row_stats(const T* x, int64_t C, T* e_out = nullptr) {
  RowStats<T> st;
  st.m = row_max(x, C, st.has_nan);
  if (e_out != nullptr) {
    row_moments_store(x, C, st.m, e_out, st.s, st.t);
  } else {
    row_moments(x, C, st.m, st.s, st.t);
  }
  return st;
}

// ---- rows in the accumulation type ----------------------------------------------------------

// Gives a pointer to row i as acc_t: the row itself for float/double, else a converted copy.
template <typename scalar_t, typename acc_t>
class RowReader {
 public:
  RowReader(const scalar_t* base, int64_t C) : base_(base), C_(C) {
    if constexpr (!std::is_same_v<scalar_t, acc_t>) buf_.resize(C);
  }
  const acc_t* row(int64_t i) {
    const scalar_t* src = base_ + i * C_;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return src;
    } else {
      for (int64_t j = 0; j < C_; ++j) buf_[j] = static_cast<acc_t>(src[j]);
      return buf_.data();
    }
  }

 private:
  const scalar_t* base_;
  int64_t C_;
  std::vector<acc_t> buf_;
};

// Gives a row of acc_t to write gradients into: the output row itself for float/double, else a
// buffer that commit() converts into the output.
template <typename scalar_t, typename acc_t>
class RowWriter {
 public:
  RowWriter(scalar_t* base, int64_t C) : base_(base), C_(C) {
    if constexpr (!std::is_same_v<scalar_t, acc_t>) buf_.resize(C);
  }
  acc_t* row(int64_t i) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return base_ + i * C_;
    } else {
      return buf_.data();
    }
  }
  void commit(int64_t i) {
    if constexpr (!std::is_same_v<scalar_t, acc_t>) {
      for (int64_t j = 0; j < C_; ++j) base_[i * C_ + j] = static_cast<scalar_t>(buf_[j]);
    }
  }

 private:
  scalar_t* base_;
  int64_t C_;
  std::vector<acc_t> buf_;
};

int64_t rows_of(const at::Tensor& x) {
  return x.numel() / x.size(-1);
}

at::ScalarType entropy_dtype(at::ScalarType in) {
  return in == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- ops -------------------------------------------------------------------------------------

at::Tensor softmax_entropy_cpu(const at::Tensor& logits) {
  check_logits(logits, "softmax_entropy", 1);
  const at::Tensor x = logits.contiguous();
  const int64_t C = x.size(-1);
  const int64_t N = rows_of(x);
  at::Tensor out = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(entropy_dtype(x.scalar_type())));
  if (N == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_entropy_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    acc_t* op = out.mutable_data_ptr<acc_t>();
    at::parallel_for(0, N, row_grain(C), [&](int64_t begin, int64_t end) {
      RowReader<scalar_t, acc_t> reader(xp, C);
      for (int64_t i = begin; i < end; ++i) {
        const RowStats<acc_t> st = row_stats(reader.row(i), C);
        op[i] = entropy::entropy_from(st.s, st.t);
      }
    });
  });
  return out;
}

at::Tensor softmax_entropy_backward_cpu(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& entropy) {
  check_logits(logits, "softmax_entropy_backward", 1);
  const at::Tensor x = logits.contiguous();
  const int64_t C = x.size(-1);
  const int64_t N = rows_of(x);
  TORCH_CHECK(grad.numel() == N && entropy.numel() == N,
              "softmax_entropy_backward: grad and entropy must have one value per row (", N, ")");
  const at::Tensor acc_type_grad = grad.to(entropy_dtype(x.scalar_type())).contiguous();
  const at::Tensor H = entropy.to(entropy_dtype(x.scalar_type())).contiguous();
  at::Tensor gx = at::empty_like(x);
  if (N == 0) return gx;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_entropy_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* gp = acc_type_grad.const_data_ptr<acc_t>();
    const acc_t* hp = H.const_data_ptr<acc_t>();
    scalar_t* gxp = gx.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, row_grain(C), [&](int64_t begin, int64_t end) {
      RowReader<scalar_t, acc_t> reader(xp, C);
      RowWriter<scalar_t, acc_t> writer(gxp, C);
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* r = reader.row(i);
        const RowStats<acc_t> st = row_stats(r, C);
        row_grad(r, C, st.m, entropy::fast_log(st.s), hp[i], gp[i], writer.row(i));
        writer.commit(i);
      }
    });
  });
  return gx;
}

// Cluster ids must lie in [0, S): checked before any write, so a bad id can never index out of
// the per-row bins.
void check_cluster_ids(const at::Tensor& clusters, int64_t S) {
  const int64_t* c = clusters.const_data_ptr<int64_t>();
  for (int64_t j = 0; j < clusters.numel(); ++j) {
    TORCH_CHECK(c[j] >= 0 && c[j] < S, "entropy_gate: clusters must hold ids in [0, num_clusters = ", S,
                "), got ", c[j], " at class ", j);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> entropy_gate_cpu(
    const at::Tensor& logits, double threshold, const c10::optional<at::Tensor>& clusters, int64_t num_clusters) {
  check_gate_args(logits, threshold, clusters, num_clusters);
  const at::Tensor x = logits.contiguous();
  const int64_t N = x.size(0);
  const int64_t C = x.size(1);
  const bool routed = clusters.has_value();
  const int64_t S = routed ? num_clusters : 0;
  at::Tensor cl;
  if (routed) {
    cl = clusters->contiguous();
    check_cluster_ids(cl, S);
  }
  const auto opts = x.options();
  at::Tensor ent = at::empty({N}, opts.dtype(entropy_dtype(x.scalar_type())));
  at::Tensor unc = at::empty({N}, opts.dtype(at::kBool));
  at::Tensor pred = at::empty({N}, opts.dtype(at::kLong));
  at::Tensor cprob = at::empty({N, S}, opts.dtype(entropy_dtype(x.scalar_type())));
  at::Tensor cidx = at::empty({routed ? N : 0}, opts.dtype(at::kLong));
  if (N == 0) return {ent, unc, pred, cprob, cidx};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "entropy_gate_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t* cp = routed ? cl.const_data_ptr<int64_t>() : nullptr;
    acc_t* ep = ent.mutable_data_ptr<acc_t>();
    bool* up = unc.mutable_data_ptr<bool>();
    int64_t* pp = pred.mutable_data_ptr<int64_t>();
    acc_t* cpp = routed ? cprob.mutable_data_ptr<acc_t>() : nullptr;
    int64_t* cip = routed ? cidx.mutable_data_ptr<int64_t>() : nullptr;
    const acc_t thr = static_cast<acc_t>(threshold);
    at::parallel_for(0, N, row_grain(C), [&](int64_t begin, int64_t end) {
      RowReader<scalar_t, acc_t> reader(xp, C);
      std::vector<acc_t> e(routed ? C : 0);
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* r = reader.row(i);
        const RowStats<acc_t> st = row_stats(r, C, routed ? e.data() : nullptr);
        const acc_t H = entropy::entropy_from(st.s, st.t);
        ep[i] = H;
        up[i] = H >= thr;
        pp[i] = row_argmax(r, C, st.m, st.has_nan);
        if (!routed) continue;
        acc_t* bins = cpp + i * S;
        for (int64_t k = 0; k < S; ++k) bins[k] = acc_t(0);
        for (int64_t j = 0; j < C; ++j) bins[cp[j]] += e[j];
        const acc_t inv_s = acc_t(1) / st.s;
        int64_t best = 0;
        for (int64_t k = 0; k < S; ++k) {
          bins[k] *= inv_s;
          if (entropy::better(bins[k], bins[best])) best = k;
        }
        cip[i] = best;
      }
    });
  });
  return {ent, unc, pred, cprob, cidx};
}

}  // namespace

TORCH_LIBRARY_IMPL(labelkit, CPU, m) {
  m.impl("softmax_entropy", &softmax_entropy_cpu);
  m.impl("_softmax_entropy_backward", &softmax_entropy_backward_cpu);
  m.impl("entropy_gate", &entropy_gate_cpu);
}

}  // namespace labelkit
