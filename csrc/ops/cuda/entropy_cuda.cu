// CUDA kernels of the entropy family: one read of each row (forward), one elementwise pass
// from the saved lse and entropy (backward). A group of kGroup threads (a power
// of two <= 32, inside one warp) owns a row; each thread folds its strided share of the row into
// online softmax moments (ops/entropy.h push), and the group merges them with xor-shuffles, so
// every lane ends with the same row statistics. Rows with C >= kBlockRowMinC use a whole block.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>
#include <cstdint>

#include "ops/entropy.h"
#include "ops/entropy_checks.h"

namespace labelkit {
namespace {

using entropy::Moments;

constexpr int kThreads = 256;
constexpr int64_t kBlockRowMinC = 4096;
constexpr long long kNoIndex = INT64_MAX;  // argmax sentinel: nothing seen yet
constexpr unsigned kFullMask = 0xffffffffu;

// Row statistics a thread, group or block accumulates: softmax moments and a running argmax.
template <typename T>
struct RowStat {
  Moments<T> mom;
  T best;
  long long idx;
};

template <typename T>
__device__ __forceinline__ RowStat<T> empty_stat() {
  return RowStat<T>{entropy::empty_moments<T>(), entropy::neg_inf<T>(), kNoIndex};
}

// Larger value wins (NaN largest); equal values keep the smaller index. Commutative, so every
// lane of an xor-butterfly ends with identical bits.
template <typename T>
__device__ __forceinline__ void merge_argmax(T& best, long long& idx, T ob, long long oi) {
  if (entropy::better(ob, best) || (!entropy::better(best, ob) && oi < idx)) {
    best = ob;
    idx = oi;
  }
}

template <int kGroup, typename T>
__device__ __forceinline__ void group_reduce(RowStat<T>& st) {
#pragma unroll
  for (int off = kGroup / 2; off > 0; off /= 2) {
    Moments<T> o;
    o.m = __shfl_xor_sync(kFullMask, st.mom.m, off, kGroup);
    o.s = __shfl_xor_sync(kFullMask, st.mom.s, off, kGroup);
    o.t = __shfl_xor_sync(kFullMask, st.mom.t, off, kGroup);
    const T ob = __shfl_xor_sync(kFullMask, st.best, off, kGroup);
    const long long oi = __shfl_xor_sync(kFullMask, st.idx, off, kGroup);
    st.mom = entropy::merge(st.mom, o);
    merge_argmax(st.best, st.idx, ob, oi);
  }
}

// Whole-block reduction; the result is returned to every thread. Ends with a barrier so the
// shared slots can be reused by the next call.
template <typename T>
__device__ RowStat<T> block_reduce(RowStat<T> st) {
  __shared__ T sm_m[32], sm_s[32], sm_t[32], sm_b[32];
  __shared__ long long sm_i[32];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int nwarps = blockDim.x / 32;
  group_reduce<32>(st);
  if (lane == 0) {
    sm_m[warp] = st.mom.m;
    sm_s[warp] = st.mom.s;
    sm_t[warp] = st.mom.t;
    sm_b[warp] = st.best;
    sm_i[warp] = st.idx;
  }
  __syncthreads();
  if (warp == 0) {
    RowStat<T> w = empty_stat<T>();
    if (lane < nwarps) {
      w.mom = Moments<T>{sm_m[lane], sm_s[lane], sm_t[lane]};
      w.best = sm_b[lane];
      w.idx = sm_i[lane];
    }
    group_reduce<32>(w);
    if (lane == 0) {
      sm_m[0] = w.mom.m;
      sm_s[0] = w.mom.s;
      sm_t[0] = w.mom.t;
      sm_b[0] = w.best;
      sm_i[0] = w.idx;
    }
  }
  __syncthreads();
  RowStat<T> out;
  out.mom = Moments<T>{sm_m[0], sm_s[0], sm_t[0]};
  out.best = sm_b[0];
  out.idx = sm_i[0];
  __syncthreads();
  return out;
}

template <typename scalar_t, typename acc_t, bool kArgmax>
__device__ __forceinline__ void scan_row(const scalar_t* __restrict__ row, int64_t C, int tid, int nthreads, RowStat<acc_t>& st) {
  for (int64_t j = tid; j < C; j += nthreads) {
    const acc_t v = static_cast<acc_t>(row[j]);
    entropy::push(st.mom, v);
    if (kArgmax && entropy::better(v, st.best)) {  // first hit per thread: j only grows
      st.best = v;
      st.idx = j;
    }
  }
}

// Softmax mass per cluster into bins (pre-zeroed), then each thread's best bin.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void scatter_cluster_mass(
    const scalar_t* __restrict__ row, int64_t C, int tid, int nthreads, const Moments<acc_t>& mom,
    const int64_t* __restrict__ clusters, int64_t S, acc_t* __restrict__ bins) {
  const acc_t inv_s = acc_t(1) / mom.s;
  for (int64_t j = tid; j < C; j += nthreads) {
    const int64_t c = clusters[j];
    // The CPU kernel raises for a bad id; here (no host sync) it is a device-side assert, and
    // the write below never leaves the row's bins.
    CUDA_KERNEL_ASSERT(c >= 0 && c < S && "entropy_gate: clusters must hold ids in [0, num_clusters)");
    if (c < 0 || c >= S) continue;
    acc_t e, ed;
    entropy::term(static_cast<acc_t>(row[j]), mom.m, e, ed);
    atomicAdd(bins + c, e * inv_s);
  }
}

template <typename acc_t>
__device__ __forceinline__ RowStat<acc_t> best_bin(const acc_t* __restrict__ bins, int64_t S, int tid, int nthreads) {
  RowStat<acc_t> st = empty_stat<acc_t>();
  for (int64_t k = tid; k < S; k += nthreads) {
    const acc_t v = bins[k];
    if (entropy::better(v, st.best)) {
      st.best = v;
      st.idx = k;
    }
  }
  return st;
}

__device__ __forceinline__ int64_t index_or_zero(long long idx) {
  return idx == kNoIndex ? 0 : static_cast<int64_t>(idx);  // all -inf row: index 0, as torch
}

template <typename acc_t>
struct GateOut {
  acc_t* entropy;
  acc_t* lse;
  bool* uncertain;      // null for plain softmax_entropy
  int64_t* prediction;  // null for plain softmax_entropy
  acc_t threshold;
  const int64_t* clusters;  // null when not routing
  int64_t S;
  acc_t* cluster_probs;
  int64_t* cluster;
};

template <typename acc_t>
__device__ __forceinline__ void write_row(const GateOut<acc_t>& out, int64_t row, const RowStat<acc_t>& st) {
  const acc_t H = entropy::entropy_from(st.mom.s, st.mom.t);
  out.entropy[row] = H;
  out.lse[2 * row] = st.mom.m;  // the log-sum-exp as (max, log sum exp(z - max))
  out.lse[2 * row + 1] = entropy::fast_log(st.mom.s);
  if (out.uncertain != nullptr) {
    out.uncertain[row] = H >= out.threshold;
    out.prediction[row] = index_or_zero(st.idx);
  }
}

// Rows owned by groups of kGroup threads. The row loop bound is uniform across the block, and
// inactive groups still join every shuffle, so full-mask shuffles are safe.
template <typename scalar_t, int kGroup, bool kGate>
__global__ void __launch_bounds__(kThreads) entropy_rows_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t C, GateOut<at::opmath_type<scalar_t>> out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kThreads / kGroup;
  const int g = threadIdx.x / kGroup;
  const int lane = threadIdx.x % kGroup;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; base < N;
       base += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = base + g;
    const bool active = row < N;
    RowStat<acc_t> st = empty_stat<acc_t>();
    if (active) scan_row<scalar_t, acc_t, kGate>(x + row * C, C, lane, kGroup, st);
    group_reduce<kGroup>(st);
    if (active && lane == 0) write_row(out, row, st);
    if (!kGate || out.clusters == nullptr) continue;  // uniform across the block
    acc_t* bins = out.cluster_probs + (active ? row : 0) * out.S;
    if (active) scatter_cluster_mass(x + row * C, C, lane, kGroup, st.mom, out.clusters, out.S, bins);
    __syncwarp();  // orders this warp's atomics before the reads below
    RowStat<acc_t> bb = active ? best_bin(bins, out.S, lane, kGroup) : empty_stat<acc_t>();
    group_reduce<kGroup>(bb);
    if (active && lane == 0) out.cluster[row] = index_or_zero(bb.idx);
  }
}

// One block per row, for long rows.
template <typename scalar_t, bool kGate>
__global__ void __launch_bounds__(kThreads) entropy_block_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t C, GateOut<at::opmath_type<scalar_t>> out) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    RowStat<acc_t> st = empty_stat<acc_t>();
    scan_row<scalar_t, acc_t, kGate>(x + row * C, C, threadIdx.x, blockDim.x, st);
    st = block_reduce(st);
    if (threadIdx.x == 0) write_row(out, row, st);
    if (!kGate || out.clusters == nullptr) continue;
    acc_t* bins = out.cluster_probs + row * out.S;
    scatter_cluster_mass(x + row * C, C, threadIdx.x, blockDim.x, st.mom, out.clusters, out.S, bins);
    __syncthreads();  // all atomics of the row land before the scan
    RowStat<acc_t> bb = block_reduce(best_bin(bins, out.S, threadIdx.x, blockDim.x));
    if (threadIdx.x == 0) out.cluster[row] = index_or_zero(bb.idx);
  }
}

// The backward needs no reduction: with the forward's lse and entropy saved, every element's
// gradient is independent (ops/entropy.h gate_grad), so one grid-stride pass reads each logit
// once and writes its gradient once.
template <typename scalar_t>
struct GradIn {
  const scalar_t* x;
  const at::opmath_type<scalar_t>* lse;  // [N, 2]: (max, log sum exp(z - max))
  const at::opmath_type<scalar_t>* entropy;
  const at::opmath_type<scalar_t>* grad_entropy;  // null: no entropy gradient
  const at::opmath_type<scalar_t>* grad_cluster;  // [N, S]; null: no cluster-mass gradient
  const at::opmath_type<scalar_t>* dot;           // [N]: <grad_cluster, cluster_probs> per row
  const int64_t* clusters;
  int64_t S;
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) entropy_backward_kernel(GradIn<scalar_t> in, int64_t total, int64_t C, scalar_t* __restrict__ gx) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / C;
    const acc_t g_H = in.grad_entropy != nullptr ? in.grad_entropy[row] : acc_t(0);
    acc_t cluster_term = acc_t(0);
    if (in.grad_cluster != nullptr) {
      const int64_t c = in.clusters[idx - row * C];
      CUDA_KERNEL_ASSERT(c >= 0 && c < in.S && "entropy_gate_backward: cluster id out of range");
      cluster_term = (c >= 0 && c < in.S ? in.grad_cluster[row * in.S + c] : acc_t(0)) - in.dot[row];
    }
    gx[idx] = static_cast<scalar_t>(
        entropy::gate_grad(static_cast<acc_t>(in.x[idx]), in.lse[2 * row], in.lse[2 * row + 1], in.entropy[row], g_H, cluster_term));
  }
}

// ---- launch helpers ---------------------------------------------------------------------------

// Threads per row: enough that each thread handles about 4 values, at most a warp.
int group_size(int64_t C) {
  int g = 1;
  while (g < 32 && static_cast<int64_t>(g) * 4 < C) g *= 2;
  return g;
}

// Streaming multiprocessors of the current device, cached per device. (ATen/cuda/CUDAContext.h
// would give this too, but drags in cuBLAS/cuSPARSE headers a bare toolkit may lack.)
int sm_count() {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices] = {};
  const int dev = c10::cuda::current_device();
  if (dev >= kMaxDevices) return 1;
  if (cache[dev] == 0) {
    int sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    cache[dev] = sms;
  }
  return cache[dev];
}

int64_t grid_for(int64_t work_items, int64_t items_per_block) {
  const int sms = sm_count();
  const int64_t needed = (work_items + items_per_block - 1) / items_per_block;
  return std::max<int64_t>(1, std::min<int64_t>(needed, static_cast<int64_t>(sms) * 32));
}

template <typename scalar_t, bool kGate>
void launch_forward(const at::Tensor& x, int64_t N, int64_t C, const GateOut<at::opmath_type<scalar_t>>& out) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  if (C >= kBlockRowMinC) {
    entropy_block_kernel<scalar_t, kGate><<<grid_for(N, 1), kThreads, 0, stream>>>(xp, N, C, out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int g = group_size(C);
  const int64_t grid = grid_for(N, kThreads / g);
#define LK_LAUNCH_ROWS(G)                                                                    \
  case G:                                                                                    \
    entropy_rows_kernel<scalar_t, G, kGate><<<grid, kThreads, 0, stream>>>(xp, N, C, out); \
    break;
  switch (g) {
    LK_LAUNCH_ROWS(1)
    LK_LAUNCH_ROWS(2)
    LK_LAUNCH_ROWS(4)
    LK_LAUNCH_ROWS(8)
    LK_LAUNCH_ROWS(16)
    LK_LAUNCH_ROWS(32)
  }
#undef LK_LAUNCH_ROWS
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_backward(const GradIn<scalar_t>& in, int64_t total, int64_t C, at::Tensor& gx) {
  auto stream = c10::cuda::getCurrentCUDAStream();
  entropy_backward_kernel<scalar_t><<<grid_for(total, kThreads), kThreads, 0, stream>>>(in, total, C, gx.mutable_data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::ScalarType entropy_dtype(at::ScalarType in) {
  return in == at::kDouble ? at::kDouble : at::kFloat;
}

// ---- ops ----------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> softmax_entropy_cuda(const at::Tensor& logits) {
  check_logits(logits, "softmax_entropy", 1);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const int64_t C = x.size(-1);
  const int64_t N = x.numel() / C;
  at::Tensor ent = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(entropy_dtype(x.scalar_type())));
  std::vector<int64_t> lse_shape(x.sizes().begin(), x.sizes().end() - 1);
  lse_shape.push_back(2);
  at::Tensor lse = at::empty(lse_shape, ent.options());
  if (N == 0) return {ent, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_entropy_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GateOut<acc_t> out{ent.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>(), nullptr, nullptr, acc_t(0), nullptr, 0, nullptr, nullptr};
    launch_forward<scalar_t, false>(x, N, C, out);
  });
  return {ent, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> entropy_gate_cuda(
    const at::Tensor& logits, double threshold, const c10::optional<at::Tensor>& clusters, int64_t num_clusters) {
  check_gate_args(logits, threshold, clusters, num_clusters);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const int64_t N = x.size(0);
  const int64_t C = x.size(1);
  const bool routed = clusters.has_value();
  const int64_t S = routed ? num_clusters : 0;
  const at::Tensor cl = routed ? clusters->contiguous() : at::Tensor();
  const auto opts = x.options();
  const auto acc_dtype = entropy_dtype(x.scalar_type());
  at::Tensor ent = at::empty({N}, opts.dtype(acc_dtype));
  at::Tensor lse = at::empty({N, 2}, opts.dtype(acc_dtype));
  at::Tensor unc = at::empty({N}, opts.dtype(at::kBool));
  at::Tensor pred = at::empty({N}, opts.dtype(at::kLong));
  // Bins are accumulated with atomics, so they start at zero.
  at::Tensor cprob = routed ? at::zeros({N, S}, opts.dtype(acc_dtype)) : at::empty({N, 0}, opts.dtype(acc_dtype));
  at::Tensor cidx = at::empty({routed ? N : 0}, opts.dtype(at::kLong));
  if (N == 0) return {ent, unc, pred, cprob, cidx, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "entropy_gate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GateOut<acc_t> out{
        ent.mutable_data_ptr<acc_t>(),
        lse.mutable_data_ptr<acc_t>(),
        unc.mutable_data_ptr<bool>(),
        pred.mutable_data_ptr<int64_t>(),
        static_cast<acc_t>(threshold),
        routed ? cl.const_data_ptr<int64_t>() : nullptr,
        S,
        routed ? cprob.mutable_data_ptr<acc_t>() : nullptr,
        routed ? cidx.mutable_data_ptr<int64_t>() : nullptr};
    launch_forward<scalar_t, true>(x, N, C, out);
  });
  return {ent, unc, pred, cprob, cidx, lse};
}

// Row statistics in the accumulation type, contiguous (a no-op for the forward's own outputs).
at::Tensor acc_rows(const at::Tensor& t, const at::Tensor& x) {
  return t.to(entropy_dtype(x.scalar_type())).contiguous();
}

at::Tensor run_backward(const at::Tensor& logits, const c10::optional<at::Tensor>& grad_entropy,
                        const c10::optional<at::Tensor>& grad_cluster, const at::Tensor& entropy, const at::Tensor& lse,
                        const c10::optional<at::Tensor>& clusters, const at::Tensor& cluster_probs) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  at::Tensor gx = at::empty_like(x);
  if (x.numel() == 0) return gx;
  const at::Tensor H = acc_rows(entropy, x);
  const at::Tensor L = acc_rows(lse, x);
  const at::Tensor gH = grad_entropy.has_value() ? acc_rows(*grad_entropy, x) : at::Tensor();
  const bool routed = grad_cluster.has_value();
  const at::Tensor gC = routed ? acc_rows(*grad_cluster, x) : at::Tensor();
  // <g_c, cp> per row: an [N] vector (the only temporary besides [N, S]-sized casts).
  const at::Tensor dot = routed ? (gC * acc_rows(cluster_probs, x)).sum(1) : at::Tensor();
  const at::Tensor cl = routed ? clusters->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "entropy_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GradIn<scalar_t> in{
        x.const_data_ptr<scalar_t>(),
        L.const_data_ptr<acc_t>(),
        H.const_data_ptr<acc_t>(),
        gH.defined() ? gH.const_data_ptr<acc_t>() : nullptr,
        routed ? gC.const_data_ptr<acc_t>() : nullptr,
        routed ? dot.const_data_ptr<acc_t>() : nullptr,
        routed ? cl.const_data_ptr<int64_t>() : nullptr,
        routed ? gC.size(1) : 0};
    launch_backward<scalar_t>(in, x.numel(), x.size(-1), gx);
  });
  return gx;
}

at::Tensor softmax_entropy_backward_cuda(const at::Tensor& grad, const at::Tensor& logits, const at::Tensor& entropy,
                                         const at::Tensor& lse) {
  check_softmax_entropy_backward_args(grad, logits, entropy, lse);
  return run_backward(logits, grad, c10::nullopt, entropy, lse, c10::nullopt, entropy);
}

at::Tensor entropy_gate_backward_cuda(const c10::optional<at::Tensor>& grad_entropy,
                                      const c10::optional<at::Tensor>& grad_cluster_probs, const at::Tensor& logits,
                                      const at::Tensor& entropy, const at::Tensor& lse,
                                      const c10::optional<at::Tensor>& clusters, const at::Tensor& cluster_probs) {
  check_entropy_gate_backward_args(grad_entropy, grad_cluster_probs, logits, entropy, lse, clusters, cluster_probs);
  return run_backward(logits, grad_entropy, grad_cluster_probs, entropy, lse, clusters, cluster_probs);
}

}  // namespace

TORCH_LIBRARY_IMPL(labelkit, CUDA, m) {
  m.impl("softmax_entropy", &softmax_entropy_cuda);
  m.impl("_softmax_entropy_backward", &softmax_entropy_backward_cuda);
  m.impl("entropy_gate", &entropy_gate_cuda);
  m.impl("_entropy_gate_backward", &entropy_gate_backward_cuda);
}

}  // namespace labelkit
