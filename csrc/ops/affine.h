// Per-pixel math of the affine grid-sample op, shared by the CPU and CUDA kernels so that CPU
// tests check the arithmetic the GPU runs.
//
// Geometry. F.affine_grid maps output pixel (ox, oy) to the normalised point
// g = θ · (xn, yn, 1) with xn = (2 ox - (Wo - 1)) kx (kx = 1/Wo, or 1/(Wo - 1) with
// align_corners; xn = 0 when Wo == 1), and grid_sample un-normalises g to the pixel coordinate
// u = sx gx + (W - 1)/2 (sx = W/2, or (W - 1)/2 with align_corners). Composed, the source
// coordinate is affine in the output indices:
//     u = ax ox + bx oy + cx,    v = ay ox + by oy + cy          (PixelMap, in double)
// so no grid is ever stored. Padding (border/reflection) then folds (u, v) into the image, and
// bilinear/nearest taps read at most four input pixels (Taps).
//
// Backward. θ's gradient is, per sample, sum over output pixels of (dL/du) sx (xn, yn, 1) and
// likewise for v: six numbers, reduced per row/block and then in a fixed order. The input's
// gradient is a gather: input pixel (x, y) collects from the output pixels whose taps touch it.
// Those lie where the padded (u, v) is within one pixel of (x, y), a union of parallelograms in
// output space found through the inverse map (gather_taps); every candidate re-runs the forward
// tap computation, so the set and the weights are exactly the scatter's. No atomics anywhere.
//
// Safety. A sample whose θ (or map) is not finite samples nothing. Any coordinate that is NaN or
// farther than two pixels outside the image is moved to -2 before the integer conversion, where
// every tap is out of bounds: no out-of-range read or write, no undefined float-to-int cast.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define LK_AFF_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define LK_AFF_HD inline __attribute__((always_inline))
#else
#define LK_AFF_HD inline
#endif

namespace labelkit {
namespace affine {

enum Mode : int64_t { kBilinear = 0, kNearest = 1 };
enum Padding : int64_t { kZeros = 0, kBorder = 1, kReflection = 2 };

template <typename T>
LK_AFF_HD bool is_finite(T x) {
  return x - x == T(0);  // false for NaN and ±inf; no <cmath> overload issues on the device
}

template <typename T>
LK_AFF_HD T t_floor(T x) {
  return ::floor(x);
}
template <typename T>
LK_AFF_HD T t_abs(T x) {
  return x < T(0) ? -x : x;
}
template <typename T>
LK_AFF_HD T t_rint(T x) {
  return ::nearbyint(x);  // round half to even, as grid_sample's nearest mode
}
template <typename T>
LK_AFF_HD T t_fmod(T x, T y) {
  return ::fmod(x, y);
}
template <typename T>
LK_AFF_HD T t_inf() {
  return std::numeric_limits<T>::infinity();
}

// ---- geometry ------------------------------------------------------------------------------

// Normalised output coordinate of index i along an axis of n output pixels (F.affine_grid's
// base grid).
template <typename T>
LK_AFF_HD T norm_step(int64_t n, bool align_corners) {
  if (n <= 1) return T(0);
  return align_corners ? T(1) / T(n - 1) : T(1) / T(n);
}

template <typename T>
LK_AFF_HD T base_coord(int64_t i, int64_t n, bool align_corners) {
  return T(2 * i - (n - 1)) * norm_step<T>(n, align_corners);
}

// d u / d g: the un-normalisation scale of an input axis of `size` pixels.
template <typename T>
LK_AFF_HD T unnorm_scale(int64_t size, bool align_corners) {
  return align_corners ? T(size - 1) / T(2) : T(size) / T(2);
}

// Source pixel coordinates as an affine function of the output indices. The coefficients stay
// in double whatever the compute type T: u is formed in double and rounded once, so the rounding
// error is half an ulp of u itself, not of the (possibly much larger, cancelling) terms ax ox and
// cx of a zoom-out or a large shift. T only tags the type the rest of the math runs in.
template <typename T>
struct PixelMap {
  double ax, bx, cx;  // u = ax ox + bx oy + cx
  double ay, by, cy;  // v = ay ox + by oy + cy
  bool valid;         // θ and the coefficients are finite; otherwise the sample reads nothing
};

// Two per-axis constants of the map, each formed as one correctly rounded quotient of integers,
// so that a map taking pixel centres to pixel centres is exact: at θ = I with equal sizes,
// ratio = 1 and offset = (W - 1)/2, u = ox exactly, and every tap sits at weight 0/1. (Forming
// them as products of rounded factors leaves u a few ulps off an integer, and then bilinear's
// θ-gradient flips between the left and right slope pixel by pixel: the kink is at the integer.)
//   ratio(in, out)  = 2 s(in) k(out)            d u / d (output index)
//   offset(in, out) = s(in) (out - 1) k(out)    s(in) · (-xn at index 0)
LK_AFF_HD double axis_ratio(int64_t in, int64_t out, bool align_corners) {
  if (out <= 1) return 0.0;
  return align_corners ? double(in - 1) / double(out - 1) : double(in) / double(out);
}

LK_AFF_HD double axis_offset(int64_t in, int64_t out, bool align_corners) {
  if (out <= 1) return 0.0;
  return align_corners ? double(in - 1) / 2.0 : double(in * (out - 1)) / double(2 * out);
}

// th: the six entries of one θ, row-major.
template <typename T>
LK_AFF_HD PixelMap<T> pixel_map(const double* th, int64_t H, int64_t W, int64_t Ho, int64_t Wo, bool align_corners) {
  const double sx = unnorm_scale<double>(W, align_corners);
  const double sy = unnorm_scale<double>(H, align_corners);
  PixelMap<T> m;
  m.ax = th[0] * axis_ratio(W, Wo, align_corners);
  m.bx = th[1] * axis_ratio(W, Ho, align_corners);
  m.cx = sx * th[2] - th[0] * axis_offset(W, Wo, align_corners) - th[1] * axis_offset(W, Ho, align_corners) +
         double(W - 1) / 2.0;
  m.ay = th[3] * axis_ratio(H, Wo, align_corners);
  m.by = th[4] * axis_ratio(H, Ho, align_corners);
  m.cy = sy * th[5] - th[3] * axis_offset(H, Wo, align_corners) - th[4] * axis_offset(H, Ho, align_corners) +
         double(H - 1) / 2.0;
  bool ok = true;
  for (int k = 0; k < 6; ++k) ok = ok && is_finite(th[k]);
  ok = ok && is_finite(m.ax) && is_finite(m.bx) && is_finite(m.cx);
  ok = ok && is_finite(m.ay) && is_finite(m.by) && is_finite(m.cy);
  // The coefficients must also fit float (with room), or the gather's interval math in float
  // would overflow; float64 follows the same rule, so validity never depends on the dtype
  // (docs/ops/affine.md; found by test_affine_fuzz: float64 once sampled such maps).
  const double big = double(std::numeric_limits<float>::max()) / 16.0;
  ok = ok && t_abs(m.ax) < big && t_abs(m.bx) < big && t_abs(m.cx) < big;
  ok = ok && t_abs(m.ay) < big && t_abs(m.by) < big && t_abs(m.cy) < big;
  m.valid = ok;
  return m;
}

template <typename T>
LK_AFF_HD T map_u(const PixelMap<T>& m, int64_t ox, int64_t oy) {
  return T(m.ax * double(ox) + (m.bx * double(oy) + m.cx));
}

template <typename T>
LK_AFF_HD T map_v(const PixelMap<T>& m, int64_t ox, int64_t oy) {
  return T(m.ay * double(ox) + (m.by * double(oy) + m.cy));
}

// ---- padding (grid_sample's compute_coordinates, with the derivative) -----------------------

// Clamp to [0, size - 1] (grid_sample's clip_coordinates_set_grad); NaN stays NaN. The
// derivative d(out)/d(in) is multiplied into `grad`.
template <typename T>
LK_AFF_HD T clip_coord(T u, int64_t size, T& grad) {
  const T hi = T(size - 1);
  const bool out = u <= T(0) || u >= hi;  // false for NaN, which passes through
  grad = out ? T(0) : grad;
  const T lo_clamped = u <= T(0) ? T(0) : u;
  return u >= hi ? hi : lo_clamped;  // selects only: the CPU row loops vectorise over this
}

// Reflect into [twice_low / 2, twice_high / 2] (grid_sample's reflect_coordinates).
template <typename T>
LK_AFF_HD T reflect_coord(T u, int64_t twice_low, int64_t twice_high, T& grad) {
  if (twice_low == twice_high) {
    grad = T(0);
    return T(0);
  }
  const T lo = T(twice_low) / T(2);
  const T span = T(twice_high - twice_low) / T(2);
  const T d0 = u - lo;
  const T sign = d0 < T(0) ? T(-1) : T(1);
  const T d = d0 < T(0) ? -d0 : d0;
  const T extra = t_fmod(d, span);
  const T flips = t_floor(d / span);
  // flips is integral; its parity via fmod is exact for any magnitude.
  const bool even = t_fmod(flips, T(2)) == T(0);
  grad = even ? grad * sign : -grad * sign;
  return even ? extra + lo : span - extra + lo;
}

// Unpadded pixel coordinate -> padded one (still unguarded), and d(padded)/d(unpadded).
template <typename T>
LK_AFF_HD T pad_coord(T u, int64_t size, int64_t padding, bool align_corners, T& grad) {
  grad = T(1);
  if (padding == kBorder) return clip_coord(u, size, grad);
  if (padding == kReflection) {
    const T r = align_corners ? reflect_coord(u, 0, 2 * (size - 1), grad)
                              : reflect_coord(u, -1, 2 * size - 1, grad);
    return clip_coord(r, size, grad);
  }
  return u;
}

// NaN, ±inf and coordinates beyond two pixels outside touch no pixel: clamp them to -2 (NaN
// too) or size + 1, where every tap is out of bounds and the integer conversion is defined.
// Two independent selects, not one with && : GCC then keeps the CPU row loops branch-free and
// vectorises them (a single select with a constant arm gets threaded into a branch).
template <typename T>
LK_AFF_HD T guard_coord(T p, int64_t size) {
  p = p >= T(-2) ? p : T(-2);
  return p <= T(size + 1) ? p : T(size + 1);
}

// ---- taps ------------------------------------------------------------------------------------

// Up to four input pixels and their weights. Out-of-bounds taps have weight 0 and offset 0, so a
// kernel may read all four unconditionally. x0/y0 and the fractions serve the backward.
template <typename T>
struct Taps {
  int64_t off[4];
  T w[4];
  int64_t x0, y0;  // top-left tap (bilinear) or the nearest pixel
  T fx, fy;        // fractional parts (bilinear)
  bool in[4];      // tap k inside the image
};

// Tap k of bilinear is (x0 + (k & 1), y0 + (k >> 1)); nearest uses tap 0 only.
template <typename T>
LK_AFF_HD Taps<T> make_taps(T px, T py, int64_t H, int64_t W, int64_t stride_h, int64_t stride_w, int64_t mode) {
  Taps<T> t;
  px = guard_coord(px, W);
  py = guard_coord(py, H);
  if (mode == kNearest) {
    t.x0 = static_cast<int64_t>(t_rint(px));
    t.y0 = static_cast<int64_t>(t_rint(py));
    t.fx = T(0);
    t.fy = T(0);
    const bool in = t.x0 >= 0 && t.x0 < W && t.y0 >= 0 && t.y0 < H;
    t.in[0] = in;
    t.off[0] = in ? t.y0 * stride_h + t.x0 * stride_w : 0;
    t.w[0] = in ? T(1) : T(0);
    for (int k = 1; k < 4; ++k) {
      t.in[k] = false;
      t.off[k] = 0;
      t.w[k] = T(0);
    }
    return t;
  }
  const T fx0 = t_floor(px);
  const T fy0 = t_floor(py);
  t.x0 = static_cast<int64_t>(fx0);
  t.y0 = static_cast<int64_t>(fy0);
  t.fx = px - fx0;
  t.fy = py - fy0;
  const T wx[2] = {T(1) - t.fx, t.fx};
  const T wy[2] = {T(1) - t.fy, t.fy};
  for (int k = 0; k < 4; ++k) {
    const int64_t x = t.x0 + (k & 1);
    const int64_t y = t.y0 + (k >> 1);
    const bool in = x >= 0 && x < W && y >= 0 && y < H;
    t.in[k] = in;
    t.off[k] = in ? y * stride_h + x * stride_w : 0;
    t.w[k] = in ? wx[k & 1] * wy[k >> 1] : T(0);
  }
  return t;
}

// Padded coordinates of output pixel (ox, oy) and their derivatives w.r.t. (u, v).
template <typename T>
struct Point {
  T px, py;
  T du, dv;  // d px / d u, d py / d v
};

template <typename T>
LK_AFF_HD Point<T> source_point(const PixelMap<T>& m, int64_t ox, int64_t oy, int64_t H, int64_t W, int64_t padding, bool align_corners) {
  Point<T> p;
  p.px = pad_coord(map_u(m, ox, oy), W, padding, align_corners, p.du);
  p.py = pad_coord(map_v(m, ox, oy), H, padding, align_corners, p.dv);
  return p;
}

// Taps of output pixel (ox, oy): the forward's only geometry.
template <typename T>
LK_AFF_HD Taps<T> output_taps(const PixelMap<T>& m, int64_t ox, int64_t oy, int64_t H, int64_t W, int64_t stride_h, int64_t stride_w, int64_t mode, int64_t padding, bool align_corners) {
  const Point<T> p = source_point(m, ox, oy, H, W, padding, align_corners);
  return make_taps(p.px, p.py, H, W, stride_h, stride_w, mode);
}

// Bilinear derivative of one channel's sample w.r.t. the padded coordinates, from the four tap
// values (0 outside the image).
template <typename T>
LK_AFF_HD void bilinear_slope(const Taps<T>& t, const T v[4], T& d_px, T& d_py) {
  d_px = (T(1) - t.fy) * (v[1] - v[0]) + t.fy * (v[3] - v[2]);
  d_py = (T(1) - t.fx) * (v[2] - v[0]) + t.fx * (v[3] - v[1]);
}

// ---- the gather: output pixels whose taps touch input pixel (x, y) ---------------------------

// A closed interval of unpadded coordinates plus the cell that owns it (see axis_cells).
template <typename T>
struct Span {
  T lo, hi;
};

// The unpadded coordinates u whose padded value lies within the footprint radius r of x form,
// per padding mode:
//   zeros:      [x - r, x + r]  (r = 1 bilinear, 1/2 nearest)
//   border:     the same, open to -inf at x == 0 and to +inf at x == size - 1
//   reflection: one interval per monotone cell [lo + j span, lo + (j + 1) span) of the fold.
// Cells partition the axis, so a candidate is counted in exactly one (cell_of).
template <typename T>
struct Fold {
  bool folded;  // reflection with span > 0
  T lo, span;
};

template <typename T>
LK_AFF_HD Fold<T> axis_fold(int64_t size, int64_t padding, bool align_corners) {
  Fold<T> f;
  f.folded = false;
  f.lo = T(0);
  f.span = T(0);
  if (padding != kReflection) return f;
  const int64_t twice_low = align_corners ? 0 : -1;
  const int64_t twice_high = align_corners ? 2 * (size - 1) : 2 * size - 1;
  if (twice_low == twice_high) return f;  // a single pixel: every u reflects onto it
  f.folded = true;
  f.lo = T(twice_low) / T(2);
  f.span = T(twice_high - twice_low) / T(2);
  return f;
}

template <typename T>
LK_AFF_HD int64_t cell_of(const Fold<T>& f, T u) {
  if (!f.folded) return 0;
  const T c = t_floor((u - f.lo) / f.span);
  // Coordinates this far out are guarded to -2 anyway; keep the cast defined.
  const T lim = T(1) * T(1 << 30);
  return static_cast<int64_t>(c < -lim ? -lim : (c > lim ? lim : (c == c ? c : T(0))));
}

// The interval of cell j for pixel x (empty when hi < lo).
// `radius` is the footprint's half-width: 1 for bilinear, 1/2 for nearest.
template <typename T>
LK_AFF_HD Span<T> cell_span(const Fold<T>& f, int64_t x, int64_t size, int64_t padding, int64_t j, T radius) {
  Span<T> s;
  if (!f.folded) {
    const bool single = padding == kReflection || (padding == kBorder && size == 1);
    s.lo = (padding == kBorder && x == 0) || single ? -t_inf<T>() : T(x) - radius;
    s.hi = (padding == kBorder && x == size - 1) || single ? t_inf<T>() : T(x) + radius;
    return s;
  }
  // Footprint in reflected space, within the cell's range [lo, lo + span].
  T a = T(x) - radius - f.lo;
  T b = T(x) + radius - f.lo;
  a = a < T(0) ? T(0) : a;
  b = b > f.span ? f.span : b;
  const T base = f.lo + T(j) * f.span;
  const bool even = (j % 2) == 0;
  s.lo = even ? base + a : base + (f.span - b);
  s.hi = even ? base + b : base + (f.span - a);
  return s;
}

// [lo, hi] of t with lo_c <= k t + r <= hi_c, as floating bounds (may be ±inf or empty).
template <typename T>
LK_AFF_HD void solve_linear(T k, T r, T lo_c, T hi_c, T& lo, T& hi) {
  if (k == T(0)) {
    const bool inside = r >= lo_c && r <= hi_c;
    lo = inside ? -t_inf<T>() : t_inf<T>();
    hi = inside ? t_inf<T>() : -t_inf<T>();
    return;
  }
  const T a = (lo_c - r) / k;
  const T b = (hi_c - r) / k;
  lo = k > T(0) ? a : b;
  hi = k > T(0) ? b : a;
}

// Floating bounds -> the index range [first, last] within [0, n - 1] of integers in
// [lo - 1/256, hi + 1/256] (the margin absorbs the rounding of the bounds themselves). NaN
// bounds (0 * inf) give the whole range, which is always safe: the exact test follows.
template <typename T>
LK_AFF_HD void index_range(T lo, T hi, int64_t n, int64_t& first, int64_t& last) {
  if (!(lo == lo) || !(hi == hi)) {
    first = 0;
    last = n - 1;
    return;
  }
  const T margin = T(1) / T(256);
  lo = -t_floor(-(lo - margin));  // ceil
  hi = t_floor(hi + margin);
  lo = lo < T(0) ? T(0) : (lo > T(n) ? T(n) : lo);
  hi = hi < T(-1) ? T(-1) : (hi > T(n - 1) ? T(n - 1) : hi);
  // Clamp again after the cast: T(n - 1) rounds up once n - 1 exceeds T's integers (2^24 in float).
  first = static_cast<int64_t>(lo);
  last = static_cast<int64_t>(hi);
  first = first > n ? n : first;
  last = last > n - 1 ? n - 1 : last;
}

// Extent of an axis' unpadded coordinate over the whole output (its extremes are at corners).
template <typename T>
LK_AFF_HD void coord_extent(T a, T b, T c, int64_t Wo, int64_t Ho, T& lo, T& hi) {
  const T c00 = c;
  const T c10 = a * T(Wo - 1) + c;
  const T c01 = b * T(Ho - 1) + c;
  const T c11 = a * T(Wo - 1) + (b * T(Ho - 1) + c);
  lo = c00 < c10 ? c00 : c10;
  lo = lo < c01 ? lo : c01;
  lo = lo < c11 ? lo : c11;
  hi = c00 > c10 ? c00 : c10;
  hi = hi > c01 ? hi : c01;
  hi = hi > c11 ? hi : c11;
}

// Rounding slack added to every interval: a few ulps of the largest term of the map.
template <typename T>
LK_AFF_HD T map_slack(T a, T b, T c, int64_t Wo, int64_t Ho) {
  const T eps = std::numeric_limits<T>::epsilon();
  return T(16) * eps * (t_abs(a) * T(Wo) + t_abs(b) * T(Ho) + t_abs(c) + T(1)) + T(1) / T(1024);
}

// The cells [j_first, j_last] of an axis that the output's coordinates reach.
template <typename T>
LK_AFF_HD void cell_range(const Fold<T>& f, T lo, T hi, int64_t& j_first, int64_t& j_last) {
  j_first = cell_of(f, lo) - 1;
  j_last = cell_of(f, hi) + 1;
}

// Exact test of one candidate: re-runs the forward's coordinate and tap computation for output
// pixel (ox, oy) and calls visit(ox, oy, w) when one of its taps is input pixel (x, y). With
// `owned`, the candidate must also fall in cells (ju, jv), so overlapping searches count it once.
template <typename T, typename Visit>
LK_AFF_HD void try_candidate(const PixelMap<T>& m, const Fold<T>& fu, const Fold<T>& fv, bool owned, int64_t ju, int64_t jv, int64_t x, int64_t y, int64_t ox, int64_t oy, int64_t H, int64_t W, int64_t mode, int64_t padding, bool align_corners, Visit& visit) {
  const T u = map_u(m, ox, oy);
  const T v = map_v(m, ox, oy);
  if (owned && (cell_of(fu, u) != ju || cell_of(fv, v) != jv)) return;
  T du, dv;
  const T px = pad_coord(u, W, padding, align_corners, du);
  const T py = pad_coord(v, H, padding, align_corners, dv);
  const Taps<T> t = make_taps(px, py, H, W, int64_t(0), int64_t(0), mode);
  const int64_t dx = x - t.x0;
  const int64_t dy = y - t.y0;
  if (mode == kNearest) {
    if (dx == 0 && dy == 0 && t.in[0]) visit(ox, oy, T(1));
  } else if ((dx == 0 || dx == 1) && (dy == 0 || dy == 1)) {
    // Tap dx + 2 dy by constant indices: a computed index keeps t in local memory on a GPU.
    const bool right = dx == 1, down = dy == 1;
    const bool in = down ? (right ? t.in[3] : t.in[2]) : (right ? t.in[1] : t.in[0]);
    const T w = down ? (right ? t.w[3] : t.w[2]) : (right ? t.w[1] : t.w[0]);
    if (in) visit(ox, oy, w);
  }
}

// Calls visit(ox, oy, w) once for every output pixel with a tap on input pixel (x, y), w being
// that tap's weight (the value the forward used). Only for a valid map. The work is about the
// number of such pixels, plus one row scan for the edge pixels of border padding and for
// singular maps; reflection that folds the output over more cells than it has pixels (extreme
// zoom-out) scans the whole output instead.
template <typename T, typename Visit>
LK_AFF_HD void gather_taps(const PixelMap<T>& m, int64_t x, int64_t y, int64_t H, int64_t W, int64_t Ho, int64_t Wo, int64_t mode, int64_t padding, bool align_corners, Visit&& visit) {
  const T ax = T(m.ax), bx = T(m.bx), cx = T(m.cx);
  const T ay = T(m.ay), by = T(m.by), cy = T(m.cy);
  const Fold<T> fu = axis_fold<T>(W, padding, align_corners);
  const Fold<T> fv = axis_fold<T>(H, padding, align_corners);
  const T su = map_slack(ax, bx, cx, Wo, Ho);
  const T sv = map_slack(ay, by, cy, Wo, Ho);
  int64_t ju0 = 0, ju1 = 0, jv0 = 0, jv1 = 0;
  if (fu.folded || fv.folded) {
    T ulo, uhi, vlo, vhi;
    coord_extent(ax, bx, cx, Wo, Ho, ulo, uhi);
    coord_extent(ay, by, cy, Wo, Ho, vlo, vhi);
    if (fu.folded) cell_range(fu, ulo, uhi, ju0, ju1);
    if (fv.folded) cell_range(fv, vlo, vhi, jv0, jv1);
    // Corners of opposite infinite signs give a NaN extent (inf - inf), which bounds nothing.
    const bool unbounded = (fu.folded && (ulo != ulo || uhi != uhi)) || (fv.folded && (vlo != vlo || vhi != vhi));
    const double cells = double(ju1 - ju0 + 1) * double(jv1 - jv0 + 1);
    if (unbounded || cells > double(Ho) * double(Wo)) {
      for (int64_t oy = 0; oy < Ho; ++oy) {
        for (int64_t ox = 0; ox < Wo; ++ox) {
          try_candidate(m, fu, fv, false, 0, 0, x, y, ox, oy, H, W, mode, padding, align_corners, visit);
        }
      }
      return;
    }
  }
  const T radius = mode == kNearest ? T(0.5) : T(1);
  const T det = ax * by - bx * ay;
  const T scale = (t_abs(ax) + t_abs(bx)) * (t_abs(ay) + t_abs(by));
  const bool invertible = t_abs(det) > T(1e-6) * scale && is_finite(T(1) / det);
  for (int64_t ju = ju0; ju <= ju1; ++ju) {
    Span<T> iu = cell_span(fu, x, W, padding, ju, radius);
    if (iu.hi < iu.lo) continue;
    iu.lo -= su;
    iu.hi += su;
    for (int64_t jv = jv0; jv <= jv1; ++jv) {
      Span<T> iv = cell_span(fv, y, H, padding, jv, radius);
      if (iv.hi < iv.lo) continue;
      iv.lo -= sv;
      iv.hi += sv;
      // Rows: the parallelogram's corners through the inverse map, when it is bounded.
      int64_t oy0 = 0, oy1 = Ho - 1;
      if (invertible && is_finite(iu.lo) && is_finite(iu.hi) && is_finite(iv.lo) && is_finite(iv.hi)) {
        T rlo = t_inf<T>(), rhi = -t_inf<T>();
        for (int k = 0; k < 4; ++k) {
          const T du = ((k & 1) ? iu.hi : iu.lo) - cx;
          const T dv = ((k >> 1) ? iv.hi : iv.lo) - cy;
          const T oy = (ax * dv - ay * du) / det;
          rlo = oy < rlo ? oy : rlo;
          rhi = oy > rhi ? oy : rhi;
        }
        index_range(rlo, rhi, Ho, oy0, oy1);
      }
      const bool owned = fu.folded || fv.folded;
      for (int64_t oy = oy0; oy <= oy1; ++oy) {
        T alo, ahi, blo, bhi;
        solve_linear(ax, bx * T(oy) + cx, iu.lo, iu.hi, alo, ahi);
        solve_linear(ay, by * T(oy) + cy, iv.lo, iv.hi, blo, bhi);
        const T lo = alo > blo ? alo : blo;
        const T hi = ahi < bhi ? ahi : bhi;
        if (hi < lo) continue;
        int64_t ox0, ox1;
        index_range(lo, hi, Wo, ox0, ox1);
        for (int64_t ox = ox0; ox <= ox1; ++ox) {
          try_candidate(m, fu, fv, owned, ju, jv, x, y, ox, oy, H, W, mode, padding, align_corners, visit);
        }
      }
    }
  }
}

}  // namespace affine
}  // namespace labelkit
