// CUDA kernels of the entropy family: one read of each row (forward, cluster masses included),
// one elementwise pass from the saved lse and entropy (backward).
//
// Forward. A group of kGroup threads (a power of two <= 32, inside one warp) owns a row; rows of
// C >= kBlockRowMinC use a whole block, whose warps then act as groups over interleaved chunks.
// Lanes read the row as 16-byte packs (4 floats, 8 halves, 2 doubles) on a grid that starts at the
// 16-byte boundary at or before the row, so rows of any C and offset load whole packs; only the
// partial packs at either end load scalars, bounds-checked.
// * Without clusters each lane folds its values into online softmax moments (ops/entropy.h push);
//   the group merges them with xor-shuffles. Partners merge in opposite operand order, and nvcc
//   may contract merge's products into FMAs, so lanes can end with statistics a rounding apart:
//   only lane 0's are ever used (the rows kernel writes from lane 0, block_reduce broadcasts it).
// * With clusters a group steps through the row in lockstep, one pack per lane, with a shared
//   running max m: each e = exp(z - m) is computed once and goes both into the lane's moments and
//   into the group's shared-memory bin of its cluster. Lanes whose values share a cluster are
//   matched (__match_any_sync) and the lowest adds their e in lane order: no atomics, a fixed
//   summation order, the same bits on every run. When m grows the group rescales its bins (the
//   online-softmax trick); at the end a block's warps add their bins in warp order. Bins get at
//   most kBinBytes of shared memory per block; with more clusters than fit (S > 1024 in float,
//   512 in double), the row is scanned once per tile of clusters instead.
// The forward kernels have not yet run on a GPU (none was available to the session that wrote
// them); scripts/gpu_check.sh runs their tests and compute-sanitizer when one is.
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

#include "ops/cuda/grid.h"
#include "ops/entropy.h"
#include "ops/entropy_checks.h"

namespace labelkit {
namespace {

using entropy::Moments;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kBlockRowMinC = 4096;
constexpr int kBinBytes = 32 * 1024;       // cluster bins per block; the rest stays for occupancy
constexpr long long kNoIndex = INT64_MAX;  // argmax sentinel: nothing seen yet
constexpr unsigned kFullMask = 0xffffffffu;

// What a forward computes: the entropy (softmax_entropy), plus argmax (entropy_gate), plus
// cluster masses (entropy_gate with clusters).
enum class Fwd { kEntropy, kGate, kClusters };

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

// A lane's scan keeps the first of equal values: its indices only grow.
template <typename T>
__device__ __forceinline__ void see_argmax(RowStat<T>& st, T v, int64_t j) {
  if (entropy::better(v, st.best)) {
    st.best = v;
    st.idx = j;
  }
}

template <int kGroup, typename T>
__device__ __forceinline__ void group_argmax(RowStat<T>& st) {
#pragma unroll
  for (int off = kGroup / 2; off > 0; off /= 2) {
    const T ob = __shfl_xor_sync(kFullMask, st.best, off, kGroup);
    const long long oi = __shfl_xor_sync(kFullMask, st.idx, off, kGroup);
    merge_argmax(st.best, st.idx, ob, oi);
  }
}

// kArgmax = false (softmax_entropy) leaves the argmax out: half the shuffles of short rows.
template <int kGroup, bool kArgmax = true, typename T>
__device__ __forceinline__ void group_reduce(RowStat<T>& st) {
#pragma unroll
  for (int off = kGroup / 2; off > 0; off /= 2) {
    Moments<T> o;
    o.m = __shfl_xor_sync(kFullMask, st.mom.m, off, kGroup);
    o.s = __shfl_xor_sync(kFullMask, st.mom.s, off, kGroup);
    o.t = __shfl_xor_sync(kFullMask, st.mom.t, off, kGroup);
    st.mom = entropy::merge(st.mom, o);
  }
  if constexpr (kArgmax) group_argmax<kGroup>(st);
}

// group_reduce for lanes whose moments share one max (a lockstep scan): s and t just add up.
template <int kGroup, typename T>
__device__ __forceinline__ void group_reduce_shared_max(RowStat<T>& st) {
#pragma unroll
  for (int off = kGroup / 2; off > 0; off /= 2) {
    st.mom.s += __shfl_xor_sync(kFullMask, st.mom.s, off, kGroup);
    st.mom.t += __shfl_xor_sync(kFullMask, st.mom.t, off, kGroup);
  }
  group_argmax<kGroup>(st);
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

// ---- loading a row as 16-byte packs ------------------------------------------------------------

template <typename scalar_t>
constexpr int pack_size() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

// Pack p holds elements [p * kPack - head, +kPack) of the row: head is how far the row starts
// past the 16-byte boundary below it, so every whole pack is an aligned 16-byte load.
template <typename scalar_t>
struct PackedRow {
  const scalar_t* row;
  int64_t len;  // C, or 0 for a group without a row (every element then reads as missing)
  int head;
};

template <typename scalar_t>
__device__ __forceinline__ PackedRow<scalar_t> packed_row(const scalar_t* row, int64_t len) {
  const int head = static_cast<int>(reinterpret_cast<uintptr_t>(row) % 16 / sizeof(scalar_t));
  return PackedRow<scalar_t>{row, len, head};
}

// Packs that cover a row of C elements at any head: the same for every row, so loops over them
// run in step across a warp.
__host__ __device__ __forceinline__ int64_t packs_for(int64_t C, int pack) {
  return (C + 2 * pack - 2) / pack;
}

// Pack p in the accumulation type; elements outside the row read as -inf (a masked class).
// Returns the row index of v[0].
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ int64_t load_pack(const PackedRow<scalar_t>& r, int64_t p, acc_t (&v)[pack_size<scalar_t>()]) {
  constexpr int kPack = pack_size<scalar_t>();
  struct alignas(16) Pack {
    scalar_t v[kPack];
  };
  const int64_t j0 = p * kPack - r.head;
  if (j0 >= 0 && j0 + kPack <= r.len) {
    const Pack pk = *reinterpret_cast<const Pack*>(r.row + j0);
#pragma unroll
    for (int k = 0; k < kPack; ++k) v[k] = static_cast<acc_t>(pk.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      const int64_t j = j0 + k;
      v[k] = j >= 0 && j < r.len ? static_cast<acc_t>(r.row[j]) : entropy::neg_inf<acc_t>();
    }
  }
  return j0;
}

// ---- scans ---------------------------------------------------------------------------------------

// Folds packs p0, p0 + pstep, ... < np into the lane's moments (and argmax for the gate).
template <typename scalar_t, typename acc_t, bool kArgmax>
__device__ __forceinline__ void scan_packs(const PackedRow<scalar_t>& r, int64_t p0, int64_t pstep, int64_t np, RowStat<acc_t>& st) {
  constexpr int kPack = pack_size<scalar_t>();
  for (int64_t p = p0; p < np; p += pstep) {
    acc_t v[kPack];
    const int64_t j0 = load_pack(r, p, v);
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      entropy::push(st.mom, v[k]);
      if (kArgmax) see_argmax(st, v[k], j0 + k);
    }
  }
}

// A group's cluster bins for clusters [c0, c0 + tile) in shared memory, and its warp's slots for
// passing e values to the lane that adds them.
template <typename acc_t>
struct Bins {
  acc_t* bin;     // [tile]
  acc_t* stage;   // [32], shared by the warp's groups
  int tile;
  int key_base;   // (group within its warp) * tile: groups of a warp never match each other
  int64_t c0;
  int64_t S;
  const int64_t* clusters;
};

// The lockstep scan of a group with clusters, over the packs whose first lane is at
// base0, base0 + step, ... < np (a bound the same for all the warp's groups: every lane reaches
// each __syncwarp and __match_any_sync). st.mom.m is the group's running max, the same bits in
// every lane; the bins are relative to it. Leaves the bins complete behind a __syncwarp.
template <int kGroup, typename scalar_t, typename acc_t>
__device__ void scan_packs_binned(const PackedRow<scalar_t>& r, int64_t base0, int64_t step, int64_t np, const Bins<acc_t>& b, RowStat<acc_t>& st, bool& ids_ok) {
  constexpr int kPack = pack_size<scalar_t>();
  const int lane = threadIdx.x % kGroup;
  const int wlane = threadIdx.x % 32;
  for (int c = lane; c < b.tile; c += kGroup) b.bin[c] = entropy::empty_bin<acc_t>();
  for (int64_t base = base0; base < np; base += step) {
    acc_t v[kPack];
    const int64_t j0 = load_pack(r, base + lane, v);
    // Keys first: cluster id loads overlap the max reduction. A lane with no element to add
    // gets a key of its own (negative).
    int key[kPack];
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      const int64_t j = j0 + k;
      key[k] = -1 - wlane;
      if (j >= 0 && j < r.len) {
        const int64_t c = b.clusters[j];
        ids_ok = ids_ok && c >= 0 && c < b.S;  // a bad id gets no bin: no write leaves them
        if (c >= b.c0 && c < b.c0 + b.tile) key[k] = b.key_base + static_cast<int>(c - b.c0);
      }
    }
    acc_t m = entropy::neg_inf<acc_t>();  // NaN never wins: the max of the finite and inf values
#pragma unroll
    for (int k = 0; k < kPack; ++k) m = v[k] > m ? v[k] : m;
#pragma unroll
    for (int off = kGroup / 2; off > 0; off /= 2) {
      const acc_t o = __shfl_xor_sync(kFullMask, m, off, kGroup);
      m = o > m ? o : m;
    }
    if (m > st.mom.m) {  // the same in every lane of the group
      const acc_t old = st.mom.m;
      entropy::rebase(st.mom, m);
      // Bins under a max of -inf hold only +-0 or NaN, which the factor 0 would not change.
      if (old != entropy::neg_inf<acc_t>()) {
        const acc_t rb = entropy::fast_exp(old - m);
        for (int c = lane; c < b.tile; c += kGroup) b.bin[c] *= rb;
      }
    }
    __syncwarp();  // emptied or rescaled bins before the adds below
#pragma unroll
    for (int k = 0; k < kPack; ++k) {
      const int64_t j = j0 + k;
      acc_t e = acc_t(0);
      if (j >= 0 && j < r.len) {
        e = entropy::accumulate(st.mom, v[k]);
        see_argmax(st, v[k], j);
      }
      const unsigned peers = __match_any_sync(kFullMask, key[k]);
      b.stage[wlane] = e;
      __syncwarp();
      if (key[k] >= 0 && wlane == __ffs(static_cast<int>(peers)) - 1) {
        acc_t sum = e;
        for (unsigned rest = peers & (peers - 1); rest != 0; rest &= rest - 1) sum += b.stage[__ffs(static_cast<int>(rest)) - 1];
        b.bin[key[k] - b.key_base] += sum;
      }
      __syncwarp();  // bins and slots free for the next element
    }
  }
  __syncwarp();  // also when this group had no pack
}

// The CPU kernel raises for a bad cluster id; here (no host sync) it is a device-side assert.
// Kernels call it once, at their end: a call inside the loops keeps values live across it (spills).
__device__ __forceinline__ void assert_ids_ok(bool ids_ok) {
  CUDA_KERNEL_ASSERT(ids_ok && "entropy_gate: clusters must hold ids in [0, num_clusters)");
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

// Dynamic shared memory of the clusters forward, in acc_t elements: `groups` bins of `tile`,
// then each warp's 32 slots, then each warp's max (block kernel).
int64_t bin_smem_elems(int groups, int tile) {
  return static_cast<int64_t>(groups) * tile + kWarps * 32 + kWarps;
}

template <typename acc_t>
__device__ __forceinline__ acc_t* shared_bins() {
  extern __shared__ __align__(16) unsigned char smem_raw[];  // sized by the launch
  return reinterpret_cast<acc_t*>(smem_raw);
}

// Rows owned by groups of kGroup threads. The row, tile and pack loops have bounds uniform
// across the block, and groups without a row still join them, so every lane reaches each
// warp-wide shuffle, match and __syncwarp.
template <typename scalar_t, int kGroup, Fwd kMode>
__global__ void __launch_bounds__(kThreads) entropy_rows_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t C, GateOut<at::opmath_type<scalar_t>> out, int tile) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRowsPerBlock = kThreads / kGroup;
  const int g = threadIdx.x / kGroup;
  const int lane = threadIdx.x % kGroup;
  const int64_t np = packs_for(C, pack_size<scalar_t>());
  bool ids_ok = true;
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock; base < N;
       base += static_cast<int64_t>(gridDim.x) * kRowsPerBlock) {
    const int64_t row = base + g;
    const bool active = row < N;
    const PackedRow<scalar_t> r = packed_row(x + (active ? row : 0) * C, active ? C : 0);
    if constexpr (kMode != Fwd::kClusters) {
      RowStat<acc_t> st = empty_stat<acc_t>();
      scan_packs<scalar_t, acc_t, kMode == Fwd::kGate>(r, lane, kGroup, np, st);
      group_reduce<kGroup, kMode == Fwd::kGate>(st);
      if (active && lane == 0) write_row(out, row, st);
    } else {
      acc_t* const smem = shared_bins<acc_t>();
      acc_t* const stage = smem + kRowsPerBlock * tile + threadIdx.x / 32 * 32;
      const Bins<acc_t> proto{smem + g * tile, stage, tile, (g % (32 / kGroup)) * tile, 0, out.S, out.clusters};
      RowStat<acc_t> cbest = empty_stat<acc_t>();  // over all tiles: ids only grow per lane
      for (int64_t c0 = 0; c0 < out.S; c0 += tile) {
        Bins<acc_t> b = proto;
        b.c0 = c0;
        b.tile = static_cast<int>(std::min<int64_t>(tile, out.S - c0));
        RowStat<acc_t> st = empty_stat<acc_t>();
        scan_packs_binned<kGroup>(r, 0, kGroup, np, b, st, ids_ok);
        group_reduce_shared_max<kGroup>(st);  // every lane: the bins' max, and the row's s
        if (c0 == 0 && active && lane == 0) write_row(out, row, st);
        const acc_t inv_s = acc_t(1) / st.mom.s;
        for (int c = lane; c < b.tile; c += kGroup) {
          const acc_t mass = entropy::cluster_mass(b.bin[c], inv_s);
          if (active) out.cluster_probs[row * out.S + c0 + c] = mass;
          see_argmax(cbest, mass, c0 + c);
        }
        __syncwarp();  // bins read before the next tile or row empties them
      }
      group_argmax<kGroup>(cbest);
      if (active && lane == 0) out.cluster[row] = index_or_zero(cbest.idx);
    }
  }
  assert_ids_ok(ids_ok);
}

// One block per row, for long rows. With clusters each warp is a group with its own bins and
// running max over packs warp * 32 + lane + i * kThreads; the block merges them in warp order.
template <typename scalar_t, Fwd kMode>
__global__ void __launch_bounds__(kThreads) entropy_block_kernel(const scalar_t* __restrict__ x, int64_t N, int64_t C, GateOut<at::opmath_type<scalar_t>> out, int tile) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t np = packs_for(C, pack_size<scalar_t>());
  bool ids_ok = true;
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {
    const PackedRow<scalar_t> r = packed_row(x + row * C, C);
    if constexpr (kMode != Fwd::kClusters) {
      RowStat<acc_t> st = empty_stat<acc_t>();
      scan_packs<scalar_t, acc_t, kMode == Fwd::kGate>(r, threadIdx.x, kThreads, np, st);
      st = block_reduce(st);
      if (threadIdx.x == 0) write_row(out, row, st);
    } else {
      acc_t* const smem = shared_bins<acc_t>();
      const int warp = threadIdx.x / 32;
      acc_t* const bins = smem;                                // [kWarps][t]
      acc_t* const wmax = smem + kWarps * tile + kWarps * 32;  // [kWarps]
      RowStat<acc_t> cbest = empty_stat<acc_t>();
      for (int64_t c0 = 0; c0 < out.S; c0 += tile) {
        const int t = static_cast<int>(std::min<int64_t>(tile, out.S - c0));
        const Bins<acc_t> b{bins + warp * t, smem + kWarps * tile + warp * 32, t, 0, c0, out.S, out.clusters};
        RowStat<acc_t> st = empty_stat<acc_t>();
        scan_packs_binned<32>(r, warp * 32, kThreads, np, b, st, ids_ok);
        if (threadIdx.x % 32 == 0) wmax[warp] = st.mom.m;  // the max this warp's bins are relative to
        st = block_reduce(st);  // its barriers also publish every warp's bins and max
        if (c0 == 0 && threadIdx.x == 0) write_row(out, row, st);
        acc_t scale[kWarps];
#pragma unroll
        for (int w = 0; w < kWarps; ++w) scale[w] = entropy::fast_exp(wmax[w] - st.mom.m);
        const acc_t inv_s = acc_t(1) / st.mom.s;
        for (int c = threadIdx.x; c < t; c += kThreads) {
          acc_t total = entropy::empty_bin<acc_t>();
#pragma unroll
          for (int w = 0; w < kWarps; ++w) total = entropy::add_bin(total, bins[w * t + c], scale[w]);
          const acc_t mass = entropy::cluster_mass(total, inv_s);
          out.cluster_probs[row * out.S + c0 + c] = mass;
          see_argmax(cbest, mass, c0 + c);
        }
        __syncthreads();  // bins and maxima read before the next tile or row overwrites them
      }
      cbest = block_reduce(cbest);
      if (threadIdx.x == 0) out.cluster[row] = index_or_zero(cbest.idx);
    }
  }
  assert_ids_ok(ids_ok);
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
  int64_t grad_entropy_stride;                    // 0: one value for every row
  const at::opmath_type<scalar_t>* grad_cluster;  // [N, S]; null: no cluster-mass gradient
  const at::opmath_type<scalar_t>* dot;           // [N]: <grad_cluster, cluster_probs> per row
  const int64_t* clusters;
  int64_t S;
};

// What the backward reads once per row.
template <typename acc_t>
struct RowSaved {
  acc_t m, log_s, H, g_H, dot;
};

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__device__ __forceinline__ RowSaved<acc_t> row_saved(const GradIn<scalar_t>& in, int64_t row) {
  return RowSaved<acc_t>{in.lse[2 * row], in.lse[2 * row + 1], in.entropy[row],
                         in.grad_entropy != nullptr ? in.grad_entropy[row * in.grad_entropy_stride] : acc_t(0),
                         in.grad_cluster != nullptr ? in.dot[row] : acc_t(0)};
}

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__device__ __forceinline__ scalar_t element_grad(const GradIn<scalar_t>& in, const RowSaved<acc_t>& r, int64_t row, int64_t col, scalar_t z) {
  acc_t cluster_term = acc_t(0);
  if (in.grad_cluster != nullptr) {
    const int64_t c = in.clusters[col];
    CUDA_KERNEL_ASSERT(c >= 0 && c < in.S && "entropy_gate_backward: cluster id out of range");
    cluster_term = (c >= 0 && c < in.S ? in.grad_cluster[row * in.S + c] : acc_t(0)) - r.dot;
  }
  return static_cast<scalar_t>(entropy::gate_grad(static_cast<acc_t>(z), r.m, r.log_s, r.H, r.g_H, cluster_term));
}

// One element per thread and step: for logits that do not start on a 16-byte boundary.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) entropy_backward_kernel(GradIn<scalar_t> in, int64_t total, int64_t C, scalar_t* __restrict__ gx) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // (row, col) of idx advance by the stride's quotient and remainder: no 64-bit division per
  // element (a long software sequence on the GPU).
  const int64_t row_step = stride / C, col_step = stride % C;
  int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t row = idx / C, col = idx % C;
  for (; idx < total; idx += stride, row += row_step, col += col_step) {
    if (col >= C) {
      col -= C;
      ++row;
    }
    gx[idx] = element_grad(in, row_saved(in, row), row, col, in.x[idx]);
  }
}

// The same pass with one 16-byte load and store per thread and step (logits and gradient both
// 16-byte aligned): 4 to 8 times the bytes in flight of one element per thread, which a
// streaming pass needs to come near HBM bandwidth (2-byte loads of half types cannot). A pack
// may span rows (C not a multiple of the pack); the few elements after the last whole pack go
// one per thread.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) entropy_backward_packed_kernel(GradIn<scalar_t> in, int64_t total, int64_t C, scalar_t* __restrict__ gx) {
  constexpr int kPack = pack_size<scalar_t>();
  struct alignas(16) Pack {
    scalar_t v[kPack];
  };
  const int64_t packs = total / kPack;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t row_step = stride * kPack / C, col_step = stride * kPack % C;
  int64_t row = first * kPack / C, col = first * kPack % C;
  for (int64_t p = first; p < packs; p += stride, row += row_step, col += col_step) {
    if (col >= C) {
      col -= C;
      ++row;
    }
    const Pack z = reinterpret_cast<const Pack*>(in.x)[p];
    Pack g;
    int64_t r = row, c = col;
    auto saved = row_saved(in, r);
#pragma unroll
    for (int k = 0; k < kPack; ++k, ++c) {
      if (c == C) {
        c = 0;
        saved = row_saved(in, ++r);
      }
      g.v[k] = element_grad(in, saved, r, c, z.v[k]);
    }
    reinterpret_cast<Pack*>(gx)[p] = g;
  }
  const int64_t t = packs * kPack + first;
  if (t < total) gx[t] = element_grad(in, row_saved(in, t / C), t / C, t % C, in.x[t]);
}

// ---- launch helpers ---------------------------------------------------------------------------

// Threads per row: enough packs to cover the row, at most a warp.
int group_size(int64_t C, int pack) {
  int g = 1;
  while (g < 32 && static_cast<int64_t>(g) * pack < C) g *= 2;
  return g;
}

// Bins per group: all S clusters when `groups` sets of them fit kBinBytes, else a tile.
template <typename acc_t>
int bin_tile(int64_t S, int groups) {
  return static_cast<int>(std::min<int64_t>(S, kBinBytes / (groups * static_cast<int64_t>(sizeof(acc_t)))));
}

template <typename scalar_t, Fwd kMode>
void launch_forward(const at::Tensor& x, int64_t N, int64_t C, const GateOut<at::opmath_type<scalar_t>>& out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kBinned = kMode == Fwd::kClusters;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  if (C >= kBlockRowMinC) {
    const int tile = kBinned ? bin_tile<acc_t>(out.S, kWarps) : 0;
    const size_t smem = kBinned ? bin_smem_elems(kWarps, tile) * sizeof(acc_t) : 0;
    entropy_block_kernel<scalar_t, kMode><<<grid_for(N, 1), kThreads, smem, stream>>>(xp, N, C, out, tile);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  int g = group_size(C, pack_size<scalar_t>());
  int tile = 0;
  if (kBinned) {
    // Wider groups (fewer rows per block) when one set of bins per row does not fit.
    while (g < 32 && bin_tile<acc_t>(out.S, kThreads / g) < out.S) g *= 2;
    tile = bin_tile<acc_t>(out.S, kThreads / g);
  }
  const size_t smem = kBinned ? bin_smem_elems(kThreads / g, tile) * sizeof(acc_t) : 0;
  const int64_t grid = grid_for(N, kThreads / g);
#define LK_LAUNCH_ROWS(G)                                                                           \
  case G:                                                                                           \
    entropy_rows_kernel<scalar_t, G, kMode><<<grid, kThreads, smem, stream>>>(xp, N, C, out, tile); \
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
  scalar_t* out = gx.mutable_data_ptr<scalar_t>();
  const bool aligned = reinterpret_cast<uintptr_t>(in.x) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (aligned) {
    // At least one block: its first threads take the tail when there is no whole pack.
    const int64_t grid = grid_for(total / pack_size<scalar_t>(), kThreads);
    entropy_backward_packed_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(in, total, C, out);
  } else {
    entropy_backward_kernel<scalar_t><<<grid_for(total, kThreads), kThreads, 0, stream>>>(in, total, C, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---- ops ----------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> softmax_entropy_cuda(const at::Tensor& logits) {
  check_logits(logits, "softmax_entropy", 1);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor x = logits.contiguous();
  const int64_t C = x.size(-1);
  const int64_t N = x.numel() / C;
  at::Tensor ent = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(entropy_dtype(x.scalar_type())));
  at::Tensor lse = at::empty(lse_shape(x), ent.options());
  if (N == 0) return {ent, lse};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "softmax_entropy_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    GateOut<acc_t> out{ent.mutable_data_ptr<acc_t>(), lse.mutable_data_ptr<acc_t>(), nullptr, nullptr, acc_t(0), nullptr, 0, nullptr, nullptr};
    launch_forward<scalar_t, Fwd::kEntropy>(x, N, C, out);
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
  at::Tensor cprob = at::empty({N, S}, opts.dtype(acc_dtype));  // every element is written
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
    if (routed) {
      launch_forward<scalar_t, Fwd::kClusters>(x, N, C, out);
    } else {
      launch_forward<scalar_t, Fwd::kGate>(x, N, C, out);
    }
  });
  return {ent, unc, pred, cprob, cidx, lse};
}

at::Tensor run_backward(const at::Tensor& logits, const c10::optional<at::Tensor>& grad_entropy,
                        const c10::optional<at::Tensor>& grad_cluster, const at::Tensor& entropy, const at::Tensor& lse,
                        const c10::optional<at::Tensor>& clusters, const at::Tensor& cluster_probs) {
  const c10::cuda::CUDAGuard guard(logits.device());
  const BackwardInputs b = backward_inputs(logits, grad_entropy, grad_cluster, entropy, lse, clusters, cluster_probs);
  const at::Tensor& x = b.x;
  at::Tensor gx = at::empty_like(x);
  if (x.numel() == 0) return gx;
  const bool routed = b.routed();
  // <g_c, cp> per row: an [N] vector (the only temporary besides [N, S]-sized casts).
  const at::Tensor dot = routed ? (b.grad_cluster * b.cluster_probs).sum(1) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "entropy_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const GradIn<scalar_t> in{
        x.const_data_ptr<scalar_t>(),
        b.lse.const_data_ptr<acc_t>(),
        b.entropy.const_data_ptr<acc_t>(),
        b.grad_entropy.defined() ? b.grad_entropy.const_data_ptr<acc_t>() : nullptr,
        b.grad_entropy_stride,
        routed ? b.grad_cluster.const_data_ptr<acc_t>() : nullptr,
        routed ? dot.const_data_ptr<acc_t>() : nullptr,
        routed ? b.clusters.const_data_ptr<int64_t>() : nullptr,
        routed ? b.grad_cluster.size(1) : 0};
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
