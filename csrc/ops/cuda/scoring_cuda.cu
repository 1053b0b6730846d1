// CUDA kernels of the pool-scoring family. Compiled for sm_80/sm_90 in every build; this project's
// CI has no GPU, so they are compile-checked only (docs/ops/scoring.md says so).
//
// cosine_topk / cosine_reduce(max|min): for each query tile, each key tile's scores are one
//   cuBLAS GEMM written transposed ([keys, queries]) into a bounded buffer, so the merge kernel
//   (one thread per query row, walking keys in index order) reads coalesced columns and folds
//   them into the running top-k kept in the outputs. mean/sum: <q_hat, sum_j k_hat_j>.
// kcenter_greedy: the labeled set in one GEMM-style launch (64-row x 64-center tiles through
//   shared memory); then per pick, three launches and no host sync: distances between the new
//   center and the previous ones, the fused running-min pass (triangle-inequality skip) with a
//   block argmax, and a one-block argmax that writes the next center's index to device memory.
// badge_select: the running min on BADGE's implicit gradient embeddings, then an inverse-CDF
//   draw from fixed-block float64 sums (scoring::draw_pick, as on the CPU) that stays on the device.
//   Both greedy passes read each pool row with a group of 1, 8 or 32 lanes (coalesced).
// uncertainty: one thread per [C] row; Monte-Carlo samples use a per-(s, n) statistics pass and
//   one thread per sample n for the two-pass per-class means and deviations.
// Grids come from ops/cuda/grid.h (32 blocks per SM at most): grid-stride loops wrap on the
// emulator's small device in tests.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Context.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "ops/cuda/grid.h"
#include "ops/entropy.h"
#include "ops/scoring.h"
#include "ops/scoring_checks.h"
#include "ops/scoring_host.h"

namespace labelkit {
namespace {

using entropy::neg_inf;
using scoring::acc_type;
using scoring::Method;
using scoring::normalized_rows;

constexpr int kThreads = 256;
constexpr int64_t kTileElements = int64_t(1) << 26;  // score buffer bound: 256 MiB of float32
constexpr int64_t kKeyTile = 4096;
constexpr int64_t kGreedyBlock = 65536;  // rows per block of k-center's first pick


// ---- uncertainty ----------------------------------------------------------------------------------

// Largest and second largest of a row read through acc_t (first index of each on ties).
template <typename scalar_t, typename T>
__device__ void row_top2(const scalar_t* x, int64_t C, T& v1, T& v2, int64_t& a, int64_t& b, bool& has_nan) {
  v1 = neg_inf<T>();
  v2 = neg_inf<T>();
  a = -1;
  b = -1;
  has_nan = false;
  for (int64_t j = 0; j < C; ++j) {
    const T v = static_cast<T>(x[j]);
    if (v != v) {
      has_nan = true;
    } else if (v > v1 || a < 0) {
      v2 = v1;
      b = a;
      v1 = v;
      a = j;
    } else if (v > v2 || b < 0) {
      v2 = v;
      b = j;
    }
  }
}

template <typename scalar_t, typename T>
__device__ void row_moments(const scalar_t* x, int64_t C, T m, T& s, T& t) {
  s = T(0);
  t = T(0);
  for (int64_t j = 0; j < C; ++j) {
    T e, ed;
    entropy::term(static_cast<T>(x[j]), m, e, ed);
    s += e;
    t += ed;
  }
}

template <typename T>
__device__ T plogp(T p) {
  return p > T(0) ? p * entropy::fast_log(p) : T(0);
}

template <typename scalar_t, typename T>
__global__ void uncertainty_rows_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t C, Method method,
                                        bool from_logits, T* __restrict__ out) {
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
    const scalar_t* row = x + n * C;
    T v1, v2;
    int64_t a, b;
    bool has_nan;
    row_top2<scalar_t, T>(row, C, v1, v2, a, b, has_nan);
    if (from_logits) {
      T s, t;
      row_moments<scalar_t, T>(row, C, v1, s, t);
      out[n] = scoring::uncertainty_from_logit_stats(method, v1, v2, s, t, has_nan);
      continue;
    }
    T u;
    if (has_nan) {
      u = std::numeric_limits<T>::quiet_NaN();
    } else if (method == Method::kEntropy) {
      u = T(0);
      for (int64_t j = 0; j < C; ++j) u -= plogp(static_cast<T>(row[j]));
    } else if (method == Method::kMargin) {
      u = T(1) - (v1 - (b < 0 ? T(0) : v2));
    } else {
      u = T(1) - v1;
    }
    out[n] = u;
  }
}

template <typename scalar_t, typename T>
__global__ void uncertainty_rows_backward_kernel(const scalar_t* __restrict__ x, const T* __restrict__ grad,
                                                 int64_t N, int64_t C, Method method, bool from_logits,
                                                 scalar_t* __restrict__ gx) {
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
    const scalar_t* row = x + n * C;
    scalar_t* grow = gx + n * C;
    const T g = grad[n];
    T v1, v2;
    int64_t a, b;
    bool has_nan;
    row_top2<scalar_t, T>(row, C, v1, v2, a, b, has_nan);
    if (!from_logits) {
      for (int64_t j = 0; j < C; ++j) {
        T d;
        if (method == Method::kEntropy) {
          d = -(entropy::fast_log(static_cast<T>(row[j])) + T(1));
        } else {
          d = -T(j == a) + (method == Method::kMargin ? T(j == b) : T(0));
        }
        grow[j] = static_cast<scalar_t>(g * d);
      }
      continue;
    }
    T s, t;
    row_moments<scalar_t, T>(row, C, v1, s, t);
    const T log_s = entropy::fast_log(s);
    if (method == Method::kEntropy) {
      const T H = entropy::entropy_from(s, t);
      for (int64_t j = 0; j < C; ++j) {
        grow[j] = static_cast<scalar_t>(entropy::gate_grad(static_cast<T>(row[j]), v1, log_s, H, g, T(0)));
      }
      continue;
    }
    const T p_a = T(1) / s;
    const T p_b = (b < 0 || v2 == neg_inf<T>()) ? T(0) : entropy::fast_exp(v2 - v1) / s;
    for (int64_t j = 0; j < C; ++j) {
      const T z = static_cast<T>(row[j]);
      const T p_j = z == neg_inf<T>() ? T(0) : entropy::fast_exp((z - v1) - log_s);
      grow[j] = static_cast<scalar_t>(g * scoring::uncertainty_logit_grad(method, j, a, b, p_j, p_a, p_b));
    }
  }
}

// Per (s, n) row of MC samples: shift m, log s (logits; 0 for probabilities), argmax, and whether
// the row is unusable (NaN, or for logits +inf / no mass).
template <typename scalar_t, typename T>
__global__ void mc_row_stats_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t C, bool from_logits,
                                    T* __restrict__ shift, T* __restrict__ log_norm, int64_t* __restrict__ argmax,
                                    uint8_t* __restrict__ bad) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < rows; r += int64_t(gridDim.x) * blockDim.x) {
    const scalar_t* row = x + r * C;
    T v1, v2;
    int64_t a, b;
    bool has_nan;
    row_top2<scalar_t, T>(row, C, v1, v2, a, b, has_nan);
    argmax[r] = a < 0 ? 0 : a;
    if (from_logits) {
      T s, t;
      row_moments<scalar_t, T>(row, C, v1, s, t);
      shift[r] = v1;
      log_norm[r] = entropy::fast_log(s);
      bad[r] = has_nan || !(s > T(0)) || s != s;
    } else {
      shift[r] = T(0);
      log_norm[r] = T(0);
      bad[r] = has_nan;
    }
  }
}

template <typename scalar_t, typename T>
__device__ T mc_prob(const scalar_t* x, int64_t r, int64_t C, int64_t j, bool from_logits, const T* shift,
                     const T* log_norm) {
  const T z = static_cast<T>(x[r * C + j]);
  if (!from_logits) return z;
  return z == neg_inf<T>() ? T(0) : entropy::fast_exp((z - shift[r]) - log_norm[r]);
}

// Per sample n: mean (pbar) and population std of p over the S samples, class by class.
template <typename scalar_t, typename T>
__device__ void mc_class_stats(const scalar_t* x, int64_t S, int64_t N, int64_t C, int64_t n, int64_t j,
                               bool from_logits, const T* shift, const T* log_norm, T& mean, T& sd) {
  mean = T(0);
  for (int64_t s = 0; s < S; ++s) mean += mc_prob<scalar_t, T>(x, s * N + n, C, j, from_logits, shift, log_norm);
  mean /= T(S);
  T var = T(0);
  for (int64_t s = 0; s < S; ++s) {
    const T d = mc_prob<scalar_t, T>(x, s * N + n, C, j, from_logits, shift, log_norm) - mean;
    var += d * d;
  }
  sd = ::sqrt(var / T(S));
}

template <typename scalar_t, typename T>
__global__ void mc_uncertainty_kernel(const scalar_t* __restrict__ x, int64_t S, int64_t N, int64_t C, Method method,
                                      bool from_logits, const T* __restrict__ shift, const T* __restrict__ log_norm,
                                      const int64_t* __restrict__ argmax, const uint8_t* __restrict__ bad,
                                      T* __restrict__ out) {
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
    bool any_bad = false;
    for (int64_t s = 0; s < S; ++s) any_bad |= bad[s * N + n] != 0;
    if (any_bad) {
      out[n] = std::numeric_limits<T>::quiet_NaN();
      continue;
    }
    if (method == Method::kVariationRatio) {
      int64_t mode = 0;
      for (int64_t s = 0; s < S; ++s) {
        int64_t votes = 0;
        for (int64_t s2 = 0; s2 < S; ++s2) votes += argmax[s2 * N + n] == argmax[s * N + n];
        mode = votes > mode ? votes : mode;
      }
      out[n] = T(1) - T(mode) / T(S);
      continue;
    }
    T h_mean = T(0), mean_h = T(0), sd_sum = T(0);
    for (int64_t j = 0; j < C; ++j) {
      T mean, sd;
      mc_class_stats<scalar_t, T>(x, S, N, C, n, j, from_logits, shift, log_norm, mean, sd);
      h_mean -= plogp(mean);
      sd_sum += sd;
      if (method == Method::kBald) {
        for (int64_t s = 0; s < S; ++s) mean_h -= plogp(mc_prob<scalar_t, T>(x, s * N + n, C, j, from_logits, shift, log_norm));
      }
    }
    out[n] = method == Method::kBald ? h_mean - mean_h / T(S) : sd_sum / T(C);
  }
}

// d u / d p_sj (BALD: (log p_sj - log pbar_j) / S; mean_std: (p_sj - pbar_j) / (S C sd_j)), pushed
// through the softmax for logits: d/dz_k = p_k (G_k - sum_j p_j G_j). pbar and sd come from
// mc_class_stats into scratch [N, C].
template <typename scalar_t, typename T>
__device__ T mc_dp(Method method, T p, T log_p, T mean, T sd, int64_t S, int64_t C, T g) {
  if (method == Method::kBald) return g * (log_p - entropy::fast_log(mean)) / T(S);
  return sd > T(0) ? g * (p - mean) / (T(S) * T(C) * sd) : T(0);
}

template <typename scalar_t, typename T>
__global__ void mc_uncertainty_backward_kernel(const scalar_t* __restrict__ x, const T* __restrict__ grad, int64_t S,
                                               int64_t N, int64_t C, Method method, bool from_logits,
                                               const T* __restrict__ shift, const T* __restrict__ log_norm,
                                               const uint8_t* __restrict__ bad, T* __restrict__ means,
                                               T* __restrict__ sds, scalar_t* __restrict__ gx) {
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
    bool any_bad = false;
    for (int64_t s = 0; s < S; ++s) any_bad |= bad[s * N + n] != 0;
    const T g = grad[n];
    for (int64_t j = 0; j < C; ++j) {
      mc_class_stats<scalar_t, T>(x, S, N, C, n, j, from_logits, shift, log_norm, means[n * C + j], sds[n * C + j]);
    }
    for (int64_t s = 0; s < S; ++s) {
      const int64_t r = s * N + n;
      T dot = T(0);
      for (int64_t j = 0; j < C; ++j) {
        const T p = mc_prob<scalar_t, T>(x, r, C, j, from_logits, shift, log_norm);
        const T z = static_cast<T>(x[r * C + j]);
        const T log_p = from_logits ? (z - shift[r]) - log_norm[r] : entropy::fast_log(p);
        const T G = mc_dp<scalar_t, T>(method, p, log_p, means[n * C + j], sds[n * C + j], S, C, g);
        if (p > T(0)) dot += p * G;
      }
      for (int64_t j = 0; j < C; ++j) {
        const T p = mc_prob<scalar_t, T>(x, r, C, j, from_logits, shift, log_norm);
        const T z = static_cast<T>(x[r * C + j]);
        const T log_p = from_logits ? (z - shift[r]) - log_norm[r] : entropy::fast_log(p);
        const T G = mc_dp<scalar_t, T>(method, p, log_p, means[n * C + j], sds[n * C + j], S, C, g);
        T out;
        if (any_bad) {
          out = std::numeric_limits<T>::quiet_NaN();
        } else if (from_logits) {
          out = p > T(0) ? p * (G - dot) : T(0);
        } else {
          out = G;
        }
        gx[r * C + j] = static_cast<scalar_t>(out);
      }
    }
  }
}

at::Tensor uncertainty_cuda(const at::Tensor& scores, c10::string_view method_sv, bool from_logits) {
  const std::string method_s(method_sv);
  check_uncertainty_args(scores, method_s);
  const Method method = parse_uncertainty_method(method_s, scores.dim());
  c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor x = scores.contiguous();
  const bool mc = x.dim() == 3;
  const int64_t S = mc ? x.size(0) : 1;
  const int64_t N = x.size(-2);
  const int64_t C = x.size(-1);
  const auto acc = acc_type(x.scalar_type());
  at::Tensor out = at::empty({N}, x.options().dtype(acc));
  if (N == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uncertainty_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (!mc) {
      uncertainty_rows_kernel<scalar_t, acc_t><<<grid_for(N, kThreads), kThreads, 0, stream>>>(
          xp, N, C, method, from_logits, out.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    at::Tensor shift = at::empty({S * N}, x.options().dtype(acc));
    at::Tensor log_norm = at::empty({S * N}, x.options().dtype(acc));
    at::Tensor argmax = at::empty({S * N}, x.options().dtype(at::kLong));
    at::Tensor bad = at::empty({S * N}, x.options().dtype(at::kByte));
    mc_row_stats_kernel<scalar_t, acc_t><<<grid_for(S * N, kThreads), kThreads, 0, stream>>>(
        xp, S * N, C, from_logits, shift.mutable_data_ptr<acc_t>(), log_norm.mutable_data_ptr<acc_t>(),
        argmax.mutable_data_ptr<int64_t>(), bad.mutable_data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    mc_uncertainty_kernel<scalar_t, acc_t><<<grid_for(N, kThreads), kThreads, 0, stream>>>(
        xp, S, N, C, method, from_logits, shift.const_data_ptr<acc_t>(), log_norm.const_data_ptr<acc_t>(),
        argmax.const_data_ptr<int64_t>(), bad.const_data_ptr<uint8_t>(), out.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor uncertainty_backward_cuda(const at::Tensor& grad, const at::Tensor& scores, c10::string_view method_sv,
                                     bool from_logits) {
  const std::string method_s(method_sv);
  check_uncertainty_args(scores, method_s);
  check_uncertainty_grad(grad, scores);
  const Method method = parse_uncertainty_method(method_s, scores.dim());
  c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor x = scores.contiguous();
  const bool mc = x.dim() == 3;
  const int64_t S = mc ? x.size(0) : 1;
  const int64_t N = x.size(-2);
  const int64_t C = x.size(-1);
  const auto acc = acc_type(x.scalar_type());
  const at::Tensor g = grad.to(acc).contiguous();
  if (N == 0 || (mc && method == Method::kVariationRatio)) return at::zeros_like(x);
  at::Tensor gx = at::empty_like(x);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "uncertainty_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    if (!mc) {
      uncertainty_rows_backward_kernel<scalar_t, acc_t><<<grid_for(N, kThreads), kThreads, 0, stream>>>(
          xp, g.const_data_ptr<acc_t>(), N, C, method, from_logits, gx.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    at::Tensor shift = at::empty({S * N}, x.options().dtype(acc));
    at::Tensor log_norm = at::empty({S * N}, x.options().dtype(acc));
    at::Tensor argmax = at::empty({S * N}, x.options().dtype(at::kLong));
    at::Tensor bad = at::empty({S * N}, x.options().dtype(at::kByte));
    at::Tensor means = at::empty({N, C}, x.options().dtype(acc));
    at::Tensor sds = at::empty({N, C}, x.options().dtype(acc));
    mc_row_stats_kernel<scalar_t, acc_t><<<grid_for(S * N, kThreads), kThreads, 0, stream>>>(
        xp, S * N, C, from_logits, shift.mutable_data_ptr<acc_t>(), log_norm.mutable_data_ptr<acc_t>(),
        argmax.mutable_data_ptr<int64_t>(), bad.mutable_data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    mc_uncertainty_backward_kernel<scalar_t, acc_t><<<grid_for(N, kThreads), kThreads, 0, stream>>>(
        xp, g.const_data_ptr<acc_t>(), S, N, C, method, from_logits, shift.const_data_ptr<acc_t>(),
        log_norm.const_data_ptr<acc_t>(), bad.const_data_ptr<uint8_t>(), means.mutable_data_ptr<acc_t>(),
        sds.mutable_data_ptr<acc_t>(), gx.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gx;
}

// ---- cosine top-k and reductions ------------------------------------------------------------------

// scores_t is [cols, rows] (key-major): thread r reads column r, coalesced across the warp.
template <bool kLargest, typename T>
__global__ void merge_topk_kernel(const T* __restrict__ scores_t, int64_t rows, int64_t cols, int64_t m0, int64_t k,
                                  T* __restrict__ vals, int64_t* __restrict__ idx, int64_t* __restrict__ filled) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < rows; r += int64_t(gridDim.x) * blockDim.x) {
    T* v = vals + r * k;
    int64_t* id = idx + r * k;
    int64_t f = filled[r];
    int64_t j = 0;
    for (; j < cols && f < k; ++j) scoring::topk_insert<kLargest>(v, id, k, f, scores_t[j * rows + r], m0 + j);
    T thr = v[k - 1];
    for (; j < cols; ++j) {
      const T s = scores_t[j * rows + r];
      if (kLargest ? s > thr : s < thr) {
        scoring::topk_insert<kLargest>(v, id, k, f, s, m0 + j);
        thr = v[k - 1];
      }
    }
    filled[r] = f;
  }
}

template <typename T>
__global__ void merge_extreme_kernel(const T* __restrict__ scores_t, int64_t rows, int64_t cols, bool largest,
                                     T* __restrict__ out) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; r < rows; r += int64_t(gridDim.x) * blockDim.x) {
    T best = out[r];
    for (int64_t j = 0; j < cols; ++j) {
      const T s = scores_t[j * rows + r];
      best = largest ? (s > best ? s : best) : (s < best ? s : best);
    }
    out[r] = best;
  }
}

// Calls merge(scores_t, n0, rows, m0, cols) for every tile pair; the score buffer is reused and
// bounded by kTileElements.
template <typename Merge>
void for_each_score_tile(const at::Tensor& q_hat, const at::Tensor& k_hat, int64_t tile_size, const Merge& merge) {
  const int64_t N = q_hat.size(0);
  const int64_t M = k_hat.size(0);
  const int64_t tm = std::min(M, tile_size > 0 ? tile_size : kKeyTile);
  const int64_t tn = std::min(N, tile_size > 0 ? tile_size : std::max<int64_t>(1, kTileElements / tm));
  at::Tensor buf = at::empty({tn * tm}, q_hat.options());
  // Full float32 products whatever allow_tf32 / set_float32_matmul_precision say: TF32's 10-bit
  // mantissa would reorder neighbours closer than ~1e-3 and let a cosine exceed 1.
  const at::NoTF32Guard no_tf32;
  for (int64_t n0 = 0; n0 < N; n0 += tn) {
    const int64_t rows = std::min(tn, N - n0);
    const at::Tensor q = q_hat.narrow(0, n0, rows);
    for (int64_t m0 = 0; m0 < M; m0 += tm) {
      const int64_t cols = std::min(tm, M - m0);
      at::Tensor s = buf.narrow(0, 0, rows * cols).view({cols, rows});
      at::mm_out(s, k_hat.narrow(0, m0, cols), q.t());
      merge(s, n0, rows, m0, cols);
    }
  }
}

std::tuple<at::Tensor, at::Tensor> cosine_topk_cuda(const at::Tensor& queries, const at::Tensor& keys, int64_t k,
                                                    bool largest, double eps, int64_t tile_size) {
  check_topk_args(queries, keys, k, eps, tile_size);
  c10::cuda::CUDAGuard guard(queries.device());
  const int64_t N = queries.size(0);
  const auto acc = acc_type(queries.scalar_type());
  at::Tensor values = at::empty({N, k}, queries.options().dtype(acc));
  at::Tensor indices = at::empty({N, k}, queries.options().dtype(at::kLong));
  if (N == 0) return {values, indices};
  const at::Tensor q_hat = normalized_rows(queries, eps);
  const at::Tensor k_hat = normalized_rows(keys, eps);
  at::Tensor filled = at::zeros({N}, queries.options().dtype(at::kLong));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q_hat.scalar_type(), "cosine_topk_cuda", [&] {
    scalar_t* vp = values.mutable_data_ptr<scalar_t>();
    int64_t* ip = indices.mutable_data_ptr<int64_t>();
    int64_t* fp = filled.mutable_data_ptr<int64_t>();
    for_each_score_tile(q_hat, k_hat, tile_size, [&](const at::Tensor& s, int64_t n0, int64_t rows, int64_t m0,
                                                     int64_t cols) {
      const scalar_t* sp = s.const_data_ptr<scalar_t>();
      if (largest) {
        merge_topk_kernel<true, scalar_t><<<grid_for(rows, kThreads), kThreads, 0, stream>>>(sp, rows, cols, m0, k, vp + n0 * k,
                                                                                   ip + n0 * k, fp + n0);
      } else {
        merge_topk_kernel<false, scalar_t><<<grid_for(rows, kThreads), kThreads, 0, stream>>>(sp, rows, cols, m0, k, vp + n0 * k,
                                                                                    ip + n0 * k, fp + n0);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {values, indices};
}

at::Tensor cosine_reduce_cuda(const at::Tensor& queries, const at::Tensor& keys, c10::string_view reduce_sv, double eps,
                              int64_t tile_size) {
  check_reduce_args(queries, keys, eps, tile_size);
  const Reduce reduce = parse_reduce(std::string(reduce_sv));
  c10::cuda::CUDAGuard guard(queries.device());
  const int64_t N = queries.size(0);
  const auto acc = acc_type(queries.scalar_type());
  if (N == 0) return at::empty({0}, queries.options().dtype(acc));
  const at::Tensor q_hat = normalized_rows(queries, eps);
  const at::Tensor k_hat = normalized_rows(keys, eps);
  if (reduce == Reduce::kMean || reduce == Reduce::kSum) {
    const at::Tensor out = at::mv(q_hat, k_hat.sum(0));
    return reduce == Reduce::kMean ? out / static_cast<double>(keys.size(0)) : out;
  }
  const bool largest = reduce == Reduce::kMax;
  at::Tensor out = at::full({N}, largest ? -INFINITY : INFINITY, queries.options().dtype(acc));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q_hat.scalar_type(), "cosine_reduce_cuda", [&] {
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    for_each_score_tile(q_hat, k_hat, tile_size, [&](const at::Tensor& s, int64_t n0, int64_t rows, int64_t,
                                                     int64_t cols) {
      merge_extreme_kernel<scalar_t><<<grid_for(rows, kThreads), kThreads, 0, stream>>>(s.const_data_ptr<scalar_t>(), rows, cols,
                                                                             largest, op + n0);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// ---- greedy selections ----------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void keep_better(T& best, int64_t& bi, T v, int64_t i) {
  if (i >= 0 && (bi < 0 || scoring::ranks_before<true>(v, i, best, bi))) {
    best = v;
    bi = i;
  }
}

// Block-wide argmax (value desc, index asc) into thread 0. bi < 0 means "none".
template <typename T>
__device__ void block_argmax(T& best, int64_t& bi) {
  __shared__ T sv[kThreads];
  __shared__ int64_t si[kThreads];
  sv[threadIdx.x] = best;
  si[threadIdx.x] = bi;
  __syncthreads();
  for (int off = blockDim.x / 2; off > 0; off /= 2) {
    if (threadIdx.x < off) {
      T v = sv[threadIdx.x];
      int64_t i = si[threadIdx.x];
      keep_better(v, i, sv[threadIdx.x + off], si[threadIdx.x + off]);
      sv[threadIdx.x] = v;
      si[threadIdx.x] = i;
    }
    __syncthreads();
  }
  best = sv[0];
  bi = si[0];
}

// The block's argmax, written by thread 0 to its slot of the partials.
template <typename T>
__device__ void store_block_best(T best, int64_t bi, T* __restrict__ part_v, int64_t* __restrict__ part_i) {
  block_argmax(best, bi);
  if (threadIdx.x == 0) {
    part_v[blockIdx.x] = best;
    part_i[blockIdx.x] = bi;
  }
}

// Pool rows are read by groups of `group` lanes (1, 8 or 32: row_group): lane l of a group reads
// elements l, l + group, ... so the group's loads are coalesced, and the partial sums meet by
// xor shuffles inside the group (every lane ends with the same bits: each step adds the same two
// values). All lanes of a group walk the same rows, so the group's collectives converge.
int row_group(int64_t row_len) {
  return row_len >= 128 ? 32 : row_len >= 16 ? 8 : 1;
}

// The lanes of this thread's group within its warp.
__device__ __forceinline__ unsigned group_mask(int group) {
  return group == 32 ? 0xffffffffu : ((1u << group) - 1u) << (threadIdx.x % 32 / group * group);
}

template <typename T>
__device__ __forceinline__ T group_sum(T v, int group) {
  const unsigned mask = group_mask(group);
  for (int off = group / 2; off > 0; off /= 2) v += __shfl_xor_sync(mask, v, off, group);
  return v;
}

template <typename T>
__device__ T group_sq_dist(const T* a, const T* b, int64_t n, int lane, int group) {
  T acc = T(0);
  for (int64_t d = lane; d < n; d += group) {
    const T diff = a[d] - b[d];
    acc += diff * diff;
  }
  return group_sum(acc, group);
}

template <typename T>
__device__ T group_dot(const T* a, const T* b, int64_t n, int lane, int group) {
  T acc = T(0);
  for (int64_t d = lane; d < n; d += group) acc += a[d] * b[d];
  return group_sum(acc, group);
}

// gap[a] = |x_{centers[p]} - x_{centers[a]}|^2 for a < p; also marks the new center taken.
template <typename T>
__global__ void kcenter_gap_kernel(const T* __restrict__ x, int64_t D, const int64_t* __restrict__ centers, int64_t p,
                                   T* __restrict__ gap, uint8_t* __restrict__ taken) {
  const int64_t c = centers[p];
  if (blockIdx.x == 0 && threadIdx.x == 0) taken[c] = 1;
  for (int64_t a = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; a < p; a += int64_t(gridDim.x) * blockDim.x) {
    gap[a] = group_sq_dist(x + centers[a] * D, x + c * D, D, 0, 1);
  }
}

// The fused running-min pass for center p, one group of lanes per row; lane 0 of each group owns
// the row's state and its candidacy for the block's argmax.
template <typename T>
__global__ void kcenter_update_kernel(const T* __restrict__ x, int64_t N, int64_t D,
                                      const int64_t* __restrict__ centers, int64_t p, const T* __restrict__ gap,
                                      T* __restrict__ min_d, int64_t* __restrict__ assign,
                                      const uint8_t* __restrict__ taken, int group, T* __restrict__ part_v,
                                      int64_t* __restrict__ part_i) {
  const T* xc = x + centers[p] * D;
  const int lane = threadIdx.x % group;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x / group;
  T best = T(0);
  int64_t bi = -1;
  for (int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / group; i < N; i += stride) {
    const int64_t a = assign[i];
    T m = min_d[i];
    if (a < 0 || !scoring::kcenter_can_skip(gap[a], m)) {
      const T d = group_sq_dist(x + i * D, xc, D, lane, group);
      if (d < m) {
        m = d;
        // Every lane read min_d[i] and assign[i] above; a shuffle orders no memory (CUDA's
        // memory model), so the group meets here before lane 0 overwrites them.
        __syncwarp(group_mask(group));
        if (lane == 0) {
          min_d[i] = d;
          assign[i] = p;
        }
      }
    }
    if (lane == 0 && !taken[i]) keep_better(best, bi, m, i);
  }
  store_block_best(best, bi, part_v, part_i);
}

// Partial argmax of min_d over untaken samples, per block (after seeding: no new center).
template <typename T>
__global__ void kcenter_farthest_kernel(const T* __restrict__ min_d, const uint8_t* __restrict__ taken, int64_t N,
                                        T* __restrict__ part_v, int64_t* __restrict__ part_i) {
  T best = T(0);
  int64_t bi = -1;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < N; i += int64_t(gridDim.x) * blockDim.x) {
    if (!taken[i]) keep_better(best, bi, min_d[i], i);
  }
  store_block_best(best, bi, part_v, part_i);
}

// ---- k-center seeding with the labeled set ----
// One pass per labeled center would read the pool L times, and in high dimension the skip rarely
// applies. Instead each block takes kSeedTile rows and sweeps all L centers over them in tiles of
// kSeedTile centers, GEMM style: both tiles pass through shared memory kSeedDepth coordinates at
// a time, and each thread accumulates kSeedMicro rows x kSeedMicro centers of squared
// differences in registers (rows ty + 16 i, centers tx + 16 j: conflict-free shared reads). Per
// row, the minimum and its center fold as (value, then lower center), which is what one strict-<
// pass per center in labeled order gives, as on the CPU.
constexpr int kSeedTile = 64;
constexpr int kSeedDepth = 16;
constexpr int kSeedSide = 16;  // kSeedSide x kSeedSide = kThreads threads
constexpr int kSeedMicro = kSeedTile / kSeedSide;
static_assert(kSeedSide * kSeedSide == kThreads, "one thread per micro tile");

// (dv, dc) replaces (v, c) if nearer, or as near and an earlier center. c < 0 (none) only ever
// goes with v = inf, which an infinite distance does not replace (as a strict < would not).
template <typename T>
__device__ __forceinline__ void keep_nearer(T& v, int64_t& c, T dv, int64_t dc) {
  if (dv < v || (dv == v && dc < c)) {
    v = dv;
    c = dc;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) kcenter_seed_kernel(const T* __restrict__ x, int64_t N, int64_t D,
                                                                const int64_t* __restrict__ centers, int64_t L,
                                                                T* __restrict__ min_d, int64_t* __restrict__ assign) {
  __shared__ T xs[kSeedDepth][kSeedTile + 1];  // +1: the staging writes spread over banks
  __shared__ T cs[kSeedDepth][kSeedTile + 1];
  const int tx = threadIdx.x % kSeedSide;
  const int ty = threadIdx.x / kSeedSide;
  const int64_t tiles = (N + kSeedTile - 1) / kSeedTile;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row0 = tile * kSeedTile;
    T run_v[kSeedMicro];
    int64_t run_c[kSeedMicro];
#pragma unroll
    for (int i = 0; i < kSeedMicro; ++i) {
      run_v[i] = std::numeric_limits<T>::infinity();
      run_c[i] = -1;
    }
    for (int64_t c0 = 0; c0 < L; c0 += kSeedTile) {
      T acc[kSeedMicro][kSeedMicro] = {};
      for (int64_t d0 = 0; d0 < D; d0 += kSeedDepth) {
        // Coordinates past D are 0 in both tiles and add exactly 0.
        for (int e = threadIdx.x; e < kSeedTile * kSeedDepth; e += kThreads) {
          const int r = e / kSeedDepth;
          const int dd = e % kSeedDepth;
          const int64_t d = d0 + dd;
          xs[dd][r] = row0 + r < N && d < D ? x[(row0 + r) * D + d] : T(0);
          cs[dd][r] = c0 + r < L && d < D ? x[centers[c0 + r] * D + d] : T(0);
        }
        __syncthreads();
#pragma unroll
        for (int dd = 0; dd < kSeedDepth; ++dd) {
          T a[kSeedMicro];
          T b[kSeedMicro];
#pragma unroll
          for (int i = 0; i < kSeedMicro; ++i) {
            a[i] = xs[dd][ty + kSeedSide * i];
            b[i] = cs[dd][tx + kSeedSide * i];
          }
#pragma unroll
          for (int i = 0; i < kSeedMicro; ++i) {
#pragma unroll
            for (int j = 0; j < kSeedMicro; ++j) {
              const T diff = a[i] - b[j];
              acc[i][j] += diff * diff;
            }
          }
        }
        __syncthreads();
      }
#pragma unroll
      for (int i = 0; i < kSeedMicro; ++i) {
        T v = std::numeric_limits<T>::infinity();
        int64_t c = -1;
#pragma unroll
        for (int j = 0; j < kSeedMicro; ++j) {
          const int64_t cj = c0 + tx + kSeedSide * j;
          if (cj < L) keep_nearer(v, c, acc[i][j], cj);
        }
        // The kSeedSide threads of a row are one half-warp.
        for (int off = kSeedSide / 2; off > 0; off /= 2) {
          keep_nearer(v, c, __shfl_xor_sync(0xffffffffu, v, off), __shfl_xor_sync(0xffffffffu, c, off));
        }
        keep_nearer(run_v[i], run_c[i], v, c);
      }
    }
    if (tx == 0) {
#pragma unroll
      for (int i = 0; i < kSeedMicro; ++i) {
        const int64_t row = row0 + ty + kSeedSide * i;
        if (row < N) {
          min_d[row] = run_v[i];
          assign[row] = run_c[i];
        }
      }
    }
  }
}

// One block: the argmax over the partials becomes centers[p + 1].
template <typename T>
__global__ void kcenter_argmax_kernel(const T* __restrict__ part_v, const int64_t* __restrict__ part_i, int64_t parts,
                                      int64_t* __restrict__ centers, int64_t p) {
  T best = T(0);
  int64_t bi = -1;
  for (int64_t b = threadIdx.x; b < parts; b += blockDim.x) keep_better(best, bi, part_v[b], part_i[b]);
  block_argmax(best, bi);
  if (threadIdx.x == 0) centers[p + 1] = bi;
}

at::Tensor kcenter_greedy_cuda(const at::Tensor& embeddings, int64_t budget, const c10::optional<at::Tensor>& labeled,
                               bool cosine, double eps) {
  const at::Tensor lab_cpu = labeled.has_value() ? labeled->to(at::kCPU).contiguous()
                                                 : at::empty({0}, embeddings.options().dtype(at::kLong).device(at::kCPU));
  check_kcenter_args(embeddings, budget, lab_cpu, eps);  // host-side index checks (one copy of L ints)
  c10::cuda::CUDAGuard guard(embeddings.device());
  if (budget == 0) return at::empty({0}, embeddings.options().dtype(at::kLong));
  const at::Tensor x = cosine ? normalized_rows(embeddings, eps)
                              : embeddings.to(acc_type(embeddings.scalar_type())).contiguous();
  const int64_t N = x.size(0);
  const int64_t D = x.size(1);
  const int64_t L = lab_cpu.numel();
  const int64_t total = L > 0 ? L + budget : budget;   // centers in all
  const auto opts = x.options();
  at::Tensor centers = at::empty({total + 1}, opts.dtype(at::kLong));
  if (L > 0) {
    centers.narrow(0, 0, L).copy_(lab_cpu, /*non_blocking=*/false);
  } else {
    centers.narrow(0, 0, 1).fill_(scoring::nearest_to_mean(x, kGreedyBlock));
  }
  at::Tensor min_d = at::full({N}, INFINITY, opts);
  at::Tensor assign = at::full({N}, -1, opts.dtype(at::kLong));
  at::Tensor taken = at::zeros({N}, opts.dtype(at::kByte));
  at::Tensor gap = at::empty({std::max<int64_t>(total, 1)}, opts);
  const int group = row_group(D);
  const int64_t parts = grid_for(N * group, kThreads);
  at::Tensor part_v = at::empty({parts}, opts);
  at::Tensor part_i = at::empty({parts}, opts.dtype(at::kLong));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kcenter_greedy_cuda", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    int64_t* cp = centers.mutable_data_ptr<int64_t>();
    int64_t p = 0;  // the next center to fold in
    if (L > 0) {    // the labeled set at once, then its farthest sample becomes centers[L]
      kcenter_seed_kernel<scalar_t><<<grid_for(N, kSeedTile), kThreads, 0, stream>>>(
          xp, N, D, cp, L, min_d.mutable_data_ptr<scalar_t>(), assign.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      taken.index_fill_(0, centers.narrow(0, 0, L), 1);
      kcenter_farthest_kernel<scalar_t><<<parts, kThreads, 0, stream>>>(
          min_d.const_data_ptr<scalar_t>(), taken.const_data_ptr<uint8_t>(), N, part_v.mutable_data_ptr<scalar_t>(),
          part_i.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      kcenter_argmax_kernel<scalar_t><<<1, kThreads, 0, stream>>>(part_v.const_data_ptr<scalar_t>(),
                                                                 part_i.const_data_ptr<int64_t>(), parts, cp, L - 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      p = L;
    }
    for (; p + 1 < total; ++p) {
      kcenter_gap_kernel<scalar_t><<<grid_for(p, kThreads), kThreads, 0, stream>>>(xp, D, cp, p, gap.mutable_data_ptr<scalar_t>(),
                                                                       taken.mutable_data_ptr<uint8_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      kcenter_update_kernel<scalar_t><<<parts, kThreads, 0, stream>>>(
          xp, N, D, cp, p, gap.const_data_ptr<scalar_t>(), min_d.mutable_data_ptr<scalar_t>(),
          assign.mutable_data_ptr<int64_t>(), taken.const_data_ptr<uint8_t>(), group, part_v.mutable_data_ptr<scalar_t>(),
          part_i.mutable_data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      kcenter_argmax_kernel<scalar_t><<<1, kThreads, 0, stream>>>(part_v.const_data_ptr<scalar_t>(),
                                                                 part_i.const_data_ptr<int64_t>(), parts, cp, p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return centers.narrow(0, L, budget).clone();
}

// One group of lanes per row (see row_group); lane 0 writes the row's minimum.
template <typename T>
__global__ void badge_update_kernel(const T* __restrict__ q, const T* __restrict__ h, const T* __restrict__ g2,
                                    int64_t N, int64_t C, int64_t D, const int64_t* __restrict__ centers, int64_t t,
                                    int group, T* __restrict__ min_d, uint8_t* __restrict__ taken) {
  const int64_t c = centers[t];
  if (blockIdx.x == 0 && threadIdx.x == 0) taken[c] = 1;
  const int lane = threadIdx.x % group;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x / group;
  for (int64_t i = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / group; i < N; i += stride) {
    const T qq = group_dot(q + i * C, q + c * C, C, lane, group);
    const T hh = group_dot(h + i * D, h + c * D, D, lane, group);
    if (lane == 0) {
      const T d = scoring::badge_sq_dist(g2[i], g2[c], qq, hh);
      min_d[i] = d < min_d[i] ? d : min_d[i];
    }
  }
}

// BADGE's draw (scoring::draw_pick): one thread per block of kDrawBlock samples sums it in
// index order, then one thread walks the blocks; the CPU kernel's arithmetic, bit for bit.
template <typename T>
__global__ void __launch_bounds__(kThreads) badge_block_sums_kernel(const T* __restrict__ min_d,
                                                                    const uint8_t* __restrict__ taken, int64_t N,
                                                                    double* __restrict__ block_sum) {
  const int64_t nb = (N + scoring::kDrawBlock - 1) / scoring::kDrawBlock;
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < nb; b += int64_t(gridDim.x) * blockDim.x) {
    const int64_t end = (b + 1) * scoring::kDrawBlock < N ? (b + 1) * scoring::kDrawBlock : N;
    block_sum[b] = scoring::draw_block_sum(min_d, taken, b * scoring::kDrawBlock, end);
  }
}

template <typename T>
__global__ void badge_pick_kernel(const T* __restrict__ min_d, const uint8_t* __restrict__ taken, int64_t N,
                                  const double* __restrict__ block_sum, double u, int64_t* __restrict__ center) {
  if (blockIdx.x == 0 && threadIdx.x == 0) *center = scoring::draw_pick(min_d, taken, N, block_sum, u);
}

at::Tensor badge_select_cuda(const at::Tensor& probs, const at::Tensor& embeddings, const at::Tensor& uniforms,
                             int64_t budget) {
  check_badge_args(probs, embeddings, uniforms, budget);
  c10::cuda::CUDAGuard guard(probs.device());
  at::Tensor centers = at::empty({budget}, probs.options().dtype(at::kLong));
  if (budget == 0) return centers;
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
  const int group = row_group(std::max(C, D));
  centers.narrow(0, 0, 1).copy_(g2.argmax().view({1}));
  at::Tensor min_d = at::full({N}, INFINITY, q.options());
  at::Tensor taken = at::zeros({N}, q.options().dtype(at::kByte));
  const int64_t nb = (N + scoring::kDrawBlock - 1) / scoring::kDrawBlock;
  at::Tensor block_sum = at::empty({nb}, q.options().dtype(at::kDouble));
  const at::Tensor uni = uniforms.contiguous();
  const double* u = uni.const_data_ptr<double>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "badge_select_cuda", [&] {
    for (int64_t t = 0; t < budget; ++t) {
      badge_update_kernel<scalar_t><<<grid_for(N * group, kThreads), kThreads, 0, stream>>>(
          q.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), g2.const_data_ptr<scalar_t>(), N, C, D,
          centers.const_data_ptr<int64_t>(), t, group, min_d.mutable_data_ptr<scalar_t>(),
          taken.mutable_data_ptr<uint8_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      if (t + 1 == budget) break;
      badge_block_sums_kernel<scalar_t><<<grid_for(nb, kThreads), kThreads, 0, stream>>>(
          min_d.const_data_ptr<scalar_t>(), taken.const_data_ptr<uint8_t>(), N, block_sum.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      badge_pick_kernel<scalar_t><<<1, 1, 0, stream>>>(min_d.const_data_ptr<scalar_t>(), taken.const_data_ptr<uint8_t>(),
                                                       N, block_sum.const_data_ptr<double>(), u[t + 1],
                                                       centers.mutable_data_ptr<int64_t>() + t + 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return centers;
}

}  // namespace

TORCH_LIBRARY_IMPL(labelkit, CUDA, m) {
  m.impl("uncertainty", &uncertainty_cuda);
  m.impl("_uncertainty_backward", &uncertainty_backward_cuda);
  m.impl("cosine_topk", &cosine_topk_cuda);
  m.impl("cosine_reduce", &cosine_reduce_cuda);
  m.impl("kcenter_greedy", &kcenter_greedy_cuda);
  m.impl("badge_select", &badge_select_cuda);
}

}  // namespace labelkit
