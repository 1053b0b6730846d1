// Per-element math of the softmax-entropy op family, shared by the CPU and CUDA kernels so
// that CPU tests check the arithmetic the GPU runs.
//
// For one row z[0..C) with max m, write d_j = z_j - m, e_j = exp(d_j), s = sum e_j and
// t = sum e_j d_j. Then p_j = e_j / s, log p_j = d_j - log s and the Shannon entropy is
//     H = -sum p_j log p_j = log s - t / s,
// a sum of two non-negative terms (d_j <= 0), so it never cancels. Partial (m, s, t) triples
// merge exactly (see merge()), which lets a GPU row be split across threads in one pass.
//
// Policy for special values (documented in docs/ops/entropy.md):
//   z_j == -inf   a masked class: contributes exactly 0 to s, t and to the gradient.
//   row all -inf  s == 0: H and its gradient are NaN (softmax is undefined), like torch.softmax.
//   NaN or +inf   propagates: H is NaN.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__CUDACC__)
#define LK_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// always_inline: CPU loops are compiled once per ISA (target_clones) and must inline this math
// to vectorise it in each clone.
#define LK_HD inline __attribute__((always_inline))
#else
#define LK_HD inline
#endif

namespace labelkit {
namespace entropy {

template <typename T>
LK_HD T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

LK_HD float bits_to_float(int32_t bits) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
#endif
}

// exp(x) for float, accurate to ~2 ulp on [-87.3, 88]: Cody-Waite reduction by ln 2 and a
// degree-7 polynomial. Branch-free (selects only), so CPU loops over it auto-vectorise; the GPU
// runs the same instructions. Underflow flushes to 0, NaN propagates.
LK_HD float fast_exp(float x) {
  const float kLo = -87.33654475f;  // exp(kLo) is the smallest normal float
  const float kHi = 88.0f;          // keeps 2^k finite below
  // Clamp with selects, not fminf/fmaxf: their NaN rules stop vectorisation. The compares are
  // written so that NaN clamps to kLo: converting a NaN k to int below would be undefined
  // behaviour (UBSan's float-cast-overflow, `make sanitize`). NaN is restored at the end.
  float xc = x > kLo ? x : kLo;
  xc = xc < kHi ? xc : kHi;
  const float k = floorf(fmaf(xc, 1.44269504088896341f, 0.5f));
  float r = fmaf(k, -0.693359375f, xc);  // ln 2 split in two for an exact first product
  r = fmaf(k, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = fmaf(p, r, 1.3981999507e-3f);
  p = fmaf(p, r, 8.3334519073e-3f);
  p = fmaf(p, r, 4.1665795894e-2f);
  p = fmaf(p, r, 1.6666665459e-1f);
  p = fmaf(p, r, 5.0000001201e-1f);
  p = fmaf(p, r * r, r + 1.0f);
  const float scale = bits_to_float((static_cast<int32_t>(k) + 127) << 23);
  float y = p * scale;
  y = x < kLo ? 0.0f : y;
  y = x > kHi ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}

// float64 (used for gradcheck) keeps libm's exp.
LK_HD double fast_exp(double x) {
  return ::exp(x);
}

LK_HD float fast_log(float x) {
  return ::logf(x);
}

LK_HD double fast_log(double x) {
  return ::log(x);
}

// Contribution of one logit z to (s, t) relative to the row max m.
template <typename T>
LK_HD void term(T z, T m, T& e, T& ed) {
  const T d = z - m;
  const T ex = fast_exp(d);
  const bool masked = z == neg_inf<T>();  // all -inf row: d is NaN, e must still be 0
  e = masked ? T(0) : ex;
  // e == 0 also when z - m overflows to -inf (finite logits ~ +-FLT_MAX apart): 0, not 0 * -inf.
  ed = masked || ex == T(0) ? T(0) : ex * d;
}

// r (t + d s) of a rescaled partial sum; 0 when r == 0, so that an overflowing gap d = -inf
// between two finite maxima cannot give 0 * -inf = NaN.
template <typename T>
LK_HD T rescaled(T r, T t, T d, T s) {
  return r == T(0) ? T(0) : r * (t + d * s);
}

// Partial softmax moments of a slice of a row: max, s and t relative to that max.
template <typename T>
struct Moments {
  T m;
  T s;
  T t;
};

template <typename T>
LK_HD Moments<T> empty_moments() {
  return Moments<T>{neg_inf<T>(), T(0), T(0)};
}

// Moments of a + b. Rescaling by exp(m_a - m) moves a's sums to the common max m:
// e^{z-m} = e^{z-m_a} e^{m_a-m} and (z - m) = (z - m_a) + (m_a - m).
template <typename T>
LK_HD Moments<T> merge(const Moments<T>& a, const Moments<T>& b) {
  if (a.m == neg_inf<T>() && a.s == T(0)) return b;  // nothing seen (or only masked) in a
  if (b.m == neg_inf<T>() && b.s == T(0)) return a;
  const T m = a.m > b.m ? a.m : b.m;
  const T ra = fast_exp(a.m - m);
  const T rb = fast_exp(b.m - m);
  const T da = a.m - m;
  const T db = b.m - m;
  Moments<T> out;
  out.m = m;
  out.s = a.s * ra + b.s * rb;
  out.t = rescaled(ra, a.t, da, a.s) + rescaled(rb, b.t, db, b.s);
  return out;
}

// Moves the sums of acc (0 when empty) to a new max m_new > acc.m. acc.m - m_new < 0, so the
// rescale cannot overflow.
template <typename T>
LK_HD void rebase(Moments<T>& acc, T m_new) {
  const T d_old = acc.m - m_new;
  const T r = acc.s == T(0) ? T(0) : fast_exp(d_old);
  acc.t = rescaled(r, acc.t, d_old, acc.s);
  acc.s = acc.s * r;
  acc.m = m_new;
}

// Adds a logit z <= acc.m (or -inf, or NaN) and returns its e = exp(z - m): +0 for a masked
// class, NaN for NaN (which poisons s and t), never -0.
template <typename T>
LK_HD T accumulate(Moments<T>& acc, T z) {
  T e, ed;
  term(z, acc.m, e, ed);
  acc.s += e;
  acc.t += ed;
  return e;
}

// Online update with one logit: the single-pass form the GPU uses without clusters.
template <typename T>
LK_HD void push(Moments<T>& acc, T z) {
  if (z == neg_inf<T>()) return;  // masked class
  if (z > acc.m) rebase(acc, z);
  accumulate(acc, z);  // NaN z (never > m) lands here
}

// Cluster-mass bins. A bin sums the e = exp(z - m) of its cluster's classes relative to a
// running max m; it starts at -0, which adding e values (+0, positive or NaN) never gives back
// and rescaling by exp(m_old - m_new) in [0, 1] keeps. So a bin still at -0 is a cluster that
// holds no class: its mass is exactly 0 whatever the row. Every other bin is multiplied by 1/s,
// which makes it NaN in a row with s == 0 (all -inf: its e are 0) or s NaN, as the per-class
// sum of e_j / s does on the CPU. (Signed zeros must be kept: no -ffast-math/--use_fast_math.)
template <typename T>
LK_HD T empty_bin() {
  return -T(0);
}

template <typename T>
LK_HD bool is_empty_bin(T b) {
  return b == T(0) && std::signbit(b);
}

// total + b r, where b is a bin relative to another max and r = exp(m_b - m_total); an empty b
// adds nothing (not even 0 * NaN when both maxima are -inf).
template <typename T>
LK_HD T add_bin(T total, T b, T r) {
  return is_empty_bin(b) ? total : total + b * r;
}

// The softmax mass of a cluster from its bin (relative to the row max) and 1/s.
template <typename T>
LK_HD T cluster_mass(T b, T inv_s) {
  return is_empty_bin(b) ? T(0) : b * inv_s;
}

// H = log s - t / s; NaN when the row had no finite mass (s == 0) or held a NaN.
template <typename T>
LK_HD T entropy_from_log(T log_s, T s, T t) {
  return log_s - t / s;
}

template <typename T>
LK_HD T entropy_from(T s, T t) {
  return entropy_from_log(fast_log(s), s, t);
}

// The one-pass backward of the family, from the row's saved max m, log s and H. The forward
// saves the log-sum-exp as that pair, not as m + log s: with large logits (|m| ~ 1e4) the sum
// would round log s to float's spacing at m, and p_j with it. With log p_j = (z_j - m) - log s,
//   d H / d z_j = -p_j (log p_j + H)   and   d cp_k / d z_j = p_j ([c_j == k] - cp_k),
// so the gradient of g_H H + <g_c, cp> is p_j (-g_H (log p_j + H) + g_c[c_j] - <g_c, cp>);
// `cluster_term` is g_c[c_j] - <g_c, cp> (0 without clusters). Masked classes get exactly 0 in a
// row with an entropy; a row whose H is NaN (all -inf, NaN or +inf) gets NaN everywhere, as
// autograd through softmax does.
template <typename T>
LK_HD T gate_grad(T z, T m, T log_s, T H, T g_H, T cluster_term) {
  const T log_p = (z - m) - log_s;
  const T p = fast_exp(log_p);
  const T grad = p * (cluster_term - g_H * (log_p + H));
  const bool zero = (z == neg_inf<T>()) | (p == T(0));  // p == 0: no 0 * -inf
  return zero && H == H ? T(0) : grad;  // an all -inf row: log_p, and so grad, is NaN
}

// Argmax ordering: NaN beats everything (as torch.argmax), then larger values; ties keep the
// earlier index, so callers scan left to right and replace only when strictly better.
template <typename T>
LK_HD bool better(T candidate, T best) {
  if (best != best) return false;
  return candidate != candidate || candidate > best;
}

}  // namespace entropy
}  // namespace labelkit
