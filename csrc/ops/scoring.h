// Per-element math of the pool-scoring op family, shared by the CPU and CUDA kernels so that CPU
// tests check the arithmetic the GPU runs. The softmax row statistics (max, s = sum e^{z-m},
// t = sum e^{z-m}(z-m)) and the entropy formula come from the entropy family (ops/entropy.h).
//
// Conventions (docs/ops/scoring.md):
//   uncertainty   larger = query first. With p_(1) >= p_(2) the two largest probabilities:
//                 entropy H, margin 1 - (p_(1) - p_(2)), least confidence 1 - p_(1),
//                 BALD H(mean p) - mean H(p), mean_std mean_c std_s p.
//   cosine        <x / max(|x|, eps), y / max(|y|, eps)> (F.cosine_similarity's clamp).
//   ordering      top-k and greedy argmax order by (value, then lower index): deterministic and
//                 independent of tiling and thread count.
//   k-center      squared euclidean distances from the coordinates' differences; a sample whose
//                 nearest center a satisfies |c - a|^2 > 4 m (1 + kPruneSlack) cannot get closer
//                 to the new center c (triangle inequality) and is skipped.
#pragma once

#include <cstdint>

#include "ops/entropy.h"

namespace labelkit {
namespace scoring {

// Method codes of the uncertainty op (parsed once from the schema's string).
enum class Method : int { kEntropy = 0, kMargin, kLeastConfidence, kVariationRatio, kBald, kMeanStd };

// True when (v, i) ranks before (bv, bi): larger (or, with kLargest false, smaller) values first,
// equal values by lower index.
template <bool kLargest, typename T>
LK_HD bool ranks_before(T v, int64_t i, T bv, int64_t bi) {
  if (v == bv) return i < bi;
  return kLargest ? v > bv : v < bv;
}

// Inserts (v, i) into the sorted top-k arrays (vals/idx, `filled` of k used), keeping order.
// The caller has checked that (v, i) ranks before the last entry or that the list is not full.
template <bool kLargest, typename T>
LK_HD void topk_insert(T* vals, int64_t* idx, int64_t k, int64_t& filled, T v, int64_t i) {
  int64_t pos = filled < k ? filled : k - 1;
  while (pos > 0 && ranks_before<kLargest>(v, i, vals[pos - 1], idx[pos - 1])) {
    vals[pos] = vals[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  vals[pos] = v;
  idx[pos] = i;
  if (filled < k) ++filled;
}

// 1 / max(|x|, eps) from sum x^2.
template <typename T>
LK_HD T inv_clamped_norm(T sumsq, T eps) {
  const T n = ::sqrt(sumsq);
  return T(1) / (n > eps ? n : eps);
}

// Slack of the k-center pruning test: covers the rounding of the squared distances it compares
// (a few ulp times D), so a skipped sample's true distance to the new center exceeds its current
// minimum by a margin no rounding can cross.
constexpr double kPruneSlack = 1e-3;

template <typename T>
LK_HD bool kcenter_can_skip(T center_gap_sq, T min_sq) {
  return center_gap_sq > T(4) * min_sq * T(1 + kPruneSlack);
}

// Squared distance between q_i (x) h_i and q_c (x) h_c from the factors (BADGE):
// |g_i|^2 + |g_c|^2 - 2 <q_i, q_c><h_i, h_c>. The formula cancels: its rounding error is a few
// ulp of |g_i|^2 + |g_c|^2, so anything below kBadgeCancel ulp of that is exactly 0 (duplicates
// of a pick then carry no sampling mass, as with the explicit embeddings).
constexpr double kBadgeCancel = 16.0;

template <typename T>
LK_HD T badge_sq_dist(T g2_i, T g2_c, T qq, T hh) {
  const T d = g2_i + g2_c - T(2) * qq * hh;
  const T floor = T(kBadgeCancel) * std::numeric_limits<T>::epsilon() * (g2_i + g2_c);
  return d > floor ? d : T(0);
}

// BADGE's inverse-CDF draw: the first i with sum_{j <= i} w_j > u * total, w_j = min_d[j] on
// untaken samples. Sums are float64 over fixed blocks of kDrawBlock samples, each in index
// order, then the blocks in order: the same bits on every backend and thread count (given the
// same min_d), and a pick never lands on a sample without mass (a taken one).
constexpr int64_t kDrawBlock = 8192;

template <typename T>
LK_HD double draw_weight(const T* min_d, const uint8_t* taken, int64_t i) {
  return taken[i] ? 0.0 : static_cast<double>(min_d[i]);
}

// Sum of the weights of samples [begin, end).
template <typename T>
LK_HD double draw_block_sum(const T* min_d, const uint8_t* taken, int64_t begin, int64_t end) {
  double s = 0.0;
  for (int64_t i = begin; i < end; ++i) s += draw_weight(min_d, taken, i);
  return s;
}

// The pick, from the nb = ceil(N / kDrawBlock) block sums. No mass left: the lowest untaken
// sample (-1 if none). u * total rounded onto the last step of the CDF: the last sample with mass.
template <typename T>
LK_HD int64_t draw_pick(const T* min_d, const uint8_t* taken, int64_t N, const double* block_sum, double u) {
  const int64_t nb = (N + kDrawBlock - 1) / kDrawBlock;
  double total = 0.0;
  for (int64_t b = 0; b < nb; ++b) total += block_sum[b];
  if (!(total > 0.0)) {
    for (int64_t i = 0; i < N; ++i) {
      if (!taken[i]) return i;
    }
    return -1;
  }
  const double target = u * total;
  double acc = 0.0;
  for (int64_t b = 0; b < nb; ++b) {
    if (acc + block_sum[b] <= target) {
      acc += block_sum[b];
      continue;
    }
    const int64_t end = (b + 1) * kDrawBlock < N ? (b + 1) * kDrawBlock : N;
    for (int64_t i = b * kDrawBlock; i < end; ++i) {
      acc += draw_weight(min_d, taken, i);
      if (acc > target) return i;
    }
  }
  for (int64_t i = N - 1; i >= 0; --i) {
    if (draw_weight(min_d, taken, i) > 0.0) return i;
  }
  return -1;
}

// Uncertainty of one [C] row from its softmax statistics: max m, second largest logit z2
// (-inf with one class), s and t (ops/entropy.h). Rows with NaN or +inf give NaN; an all -inf
// row (s == 0) gives NaN, like softmax.
template <typename T>
LK_HD T uncertainty_from_logit_stats(Method method, T m, T z2, T s, T t, bool has_nan) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  if (has_nan || !(s > T(0))) return nan;
  switch (method) {
    case Method::kEntropy:
      return entropy::entropy_from(s, t);
    case Method::kMargin: {
      const T p2 = z2 == entropy::neg_inf<T>() ? T(0) : entropy::fast_exp(z2 - m) / s;
      return T(1) - (T(1) / s - p2);
    }
    default:  // least confidence and the single-prediction variation ratio: 1 - p_(1)
      return T(1) - T(1) / s;
  }
}

// d u / d z_j for the [N, C] logit methods: with a = argmax, b = second, p = softmax,
// d p_a / d z_j = p_a ([j == a] - p_j).
template <typename T>
LK_HD T uncertainty_logit_grad(Method method, int64_t j, int64_t a, int64_t b, T p_j, T p_a, T p_b) {
  const T dpa = p_a * (T(j == a) - p_j);
  if (method == Method::kMargin) {
    const T dpb = b < 0 ? T(0) : p_b * (T(j == b) - p_j);
    return -dpa + dpb;
  }
  return -dpa;
}

}  // namespace scoring
}  // namespace labelkit
