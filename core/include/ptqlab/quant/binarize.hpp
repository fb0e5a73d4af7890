#pragma once
// The masked, mean-shifted, per-row binarizer with residual orders (BiLLM's "binary residual
// approximation", research/baselines.md §2.2), reusable by any binarizing method.
//
// One order over a set of values v (one row's members of one group):
//   μ = mean v          (0 without the mean shift)
//   α = mean |v − μ|    (the L1-optimal scale for the signs)
//   q = μ + α · sgn(v − μ)
// Order k binarizes the residual left by orders 1..k−1 and adds its q: order 2 is two sign planes
// with (μ₁, α₁) and (μ₂, α₂). An empty set contributes nothing (μ = α = 0).
//
// Arithmetic (fixed, so results never depend on alignment or thread count): values and q are
// float32; the sums behind μ and α are accumulated in double over 8 fixed lanes (element i goes
// to lane i mod 8, lanes combined pairwise) and the quotients rounded to float once. The
// residual is v − (q₁ + … + q_{k−1}) in float32, exactly like a masked torch implementation.
//
// The span kernels are inline (they sit in the inner loops of the BiLLM searches); the masked
// matrix form lives in binarize.cpp.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <vector>

#include "ptqlab/model/model.hpp"

namespace ptqlab {

struct BinarizerStyle {
  // true: μ + α·sgn(v − μ) (the BiLLM code); false: α·sgn(v), α = mean |v| (the BiLLM paper, Eq. 1).
  bool mean_shift = true;
  // true: sgn(0) = 0, as torch.sign (a value equal to μ is reconstructed as μ);
  // false: sgn(0) = +1, so every reconstructed value is ±α around μ (strictly binary codes).
  bool zero_sign_is_zero = true;
};

// The coefficients of one order for one set of values.
struct BinaryCoeffs {
  float mu = 0.0f;
  float alpha = 0.0f;
};

namespace binarize_detail {

// Σ f(i) over i in [0, n) in double, over 8 fixed lanes.
template <class F>
inline double lane_sum(std::ptrdiff_t n, F&& f) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::ptrdiff_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += static_cast<double>(f(i + j));
  for (int j = 0; i < n; ++i, ++j) acc[j] += static_cast<double>(f(i));
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// sgn as a branch-free select (vectorises): ZeroIsZero: sgn(0) = 0, else sgn(0) = +1.
template <bool ZeroIsZero>
inline float sgn(float d) {
  if constexpr (ZeroIsZero) return static_cast<float>(d > 0.0f) - static_cast<float>(d < 0.0f);
  return 1.0f - 2.0f * static_cast<float>(d < 0.0f);
}

template <bool ZeroIsZero>
inline float step_value(float x, float mu, float alpha) {
  return alpha * sgn<ZeroIsZero>(x - mu) + mu;
}

}  // namespace binarize_detail

// The coefficients of one order for the n values v (n == 0: zeros).
inline BinaryCoeffs binary_coeffs(const float* v, std::ptrdiff_t n, BinarizerStyle style = {}) {
  using binarize_detail::lane_sum;
  BinaryCoeffs c;
  if (n <= 0) return c;
  const double inv_n = 1.0 / static_cast<double>(n);
  if (style.mean_shift) c.mu = static_cast<float>(lane_sum(n, [v](std::ptrdiff_t i) { return v[i]; }) * inv_n);
  const float mu = c.mu;
  c.alpha = static_cast<float>(lane_sum(n, [v, mu](std::ptrdiff_t i) { return std::fabs(v[i] - mu); }) * inv_n);
  return c;
}

namespace binarize_detail {

template <bool Z>
inline void add_step(const float* r, float* approx, std::ptrdiff_t n, BinaryCoeffs c) {
  for (std::ptrdiff_t i = 0; i < n; ++i) approx[i] += step_value<Z>(r[i], c.mu, c.alpha);
}

template <bool Z>
inline double error1(const float* v, std::ptrdiff_t n, BinarizerStyle style) {
  const BinaryCoeffs c = binary_coeffs(v, n, style);
  return lane_sum(n, [v, c](std::ptrdiff_t i) {
    const float e = v[i] - step_value<Z>(v[i], c.mu, c.alpha);
    return static_cast<double>(e) * e;
  });
}

template <bool Z>
inline double error2(const float* v, std::ptrdiff_t n, BinarizerStyle style, float* r) {
  const BinaryCoeffs c1 = binary_coeffs(v, n, style);
  for (std::ptrdiff_t i = 0; i < n; ++i) r[i] = v[i] - step_value<Z>(v[i], c1.mu, c1.alpha);
  const BinaryCoeffs c2 = binary_coeffs(r, n, style);
  return lane_sum(n, [v, r, c1, c2](std::ptrdiff_t i) {
    const float e = v[i] - (step_value<Z>(v[i], c1.mu, c1.alpha) + step_value<Z>(r[i], c2.mu, c2.alpha));
    return static_cast<double>(e) * e;
  });
}

}  // namespace binarize_detail

// One order: q[i] = μ + α·sgn(v[i] − μ). Returns (μ, α). q may alias v.
inline BinaryCoeffs binarize_step(const float* v, float* q, std::ptrdiff_t n, BinarizerStyle style = {}) {
  const BinaryCoeffs c = binary_coeffs(v, n, style);
  for (std::ptrdiff_t i = 0; i < n; ++i)
    q[i] = style.zero_sign_is_zero ? binarize_detail::step_value<true>(v[i], c.mu, c.alpha)
                                   : binarize_detail::step_value<false>(v[i], c.mu, c.alpha);
  return c;
}

// Residual binarization of the n values v to `order` orders: approx = q₁ + … + q_order, q_k the
// step applied to v − (q₁ + … + q_{k−1}). `scratch` holds n floats (the residual); `coeffs`
// (optional) receives `order` coefficient pairs. approx must not alias v.
inline void residual_binarize(const float* v, float* approx, std::ptrdiff_t n, int order, BinarizerStyle style,
                              float* scratch, BinaryCoeffs* coeffs = nullptr) {
  for (std::ptrdiff_t i = 0; i < n; ++i) approx[i] = 0.0f;
  for (int k = 0; k < order; ++k) {
    const float* r = v;
    if (k > 0) {
      for (std::ptrdiff_t i = 0; i < n; ++i) scratch[i] = v[i] - approx[i];
      r = scratch;
    }
    const BinaryCoeffs c = binary_coeffs(r, n, style);
    if (coeffs != nullptr) coeffs[k] = c;
    if (style.zero_sign_is_zero)
      binarize_detail::add_step<true>(r, approx, n, c);
    else
      binarize_detail::add_step<false>(r, approx, n, c);
  }
}

// Σ (v[i] − approx[i])² in double (same lanes as above) for the approximation residual_binarize
// makes; `scratch` holds 2n floats. Equal, value for value, to computing approx and summing:
// orders 1 and 2 run as fused passes that recompute q₁ = α₁·sgn(v − μ₁) + μ₁ instead of storing
// it (the same float operations, so the same values).
inline double residual_binarize_error(const float* v, std::ptrdiff_t n, int order, BinarizerStyle style,
                                      float* scratch) {
  using namespace binarize_detail;
  if (n <= 0) return 0.0;
  const bool z = style.zero_sign_is_zero;
  if (order == 1) return z ? error1<true>(v, n, style) : error1<false>(v, n, style);
  if (order == 2) return z ? error2<true>(v, n, style, scratch) : error2<false>(v, n, style, scratch);
  float* approx = scratch;
  residual_binarize(v, approx, n, order, style, scratch + n);
  return lane_sum(n, [v, approx](std::ptrdiff_t i) {
    const float e = v[i] - approx[i];
    return static_cast<double>(e) * e;
  });
}

// The masked matrix form (§2.2): for each row r of x, the members are the columns c with
// mask[r·cols + c] != 0, taken in column order; the result holds their residual binarization and
// 0 elsewhere. `coeffs` (optional) receives rows × order pairs, row-major (zeros for rows without
// members).
Matrix residual_binarize_masked(const Matrix& x, const std::vector<std::uint8_t>& mask, int order,
                                BinarizerStyle style = {}, std::vector<BinaryCoeffs>* coeffs = nullptr);

}  // namespace ptqlab
