#pragma once
// Salience helpers shared by the mask plugins (magnitude, hessian-elementwise, hessian-salience)
// and the pbllm quantizer. Header only: every plugin library compiles its own copy, so nothing
// here crosses a library boundary. docs/methods/masks.md describes every rule and cost.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include <Eigen/Core>
#include <fmt/format.h>

#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/quant/gptq.hpp"
#include "ptqlab/support/error.hpp"

namespace ptqlab::salience {

using Eigen::Index;

// "layer 3 q_proj": how errors name a linear.
inline std::string what(const LinearContext& ctx) { return fmt::format("layer {} {}", ctx.layer, linear_name(ctx.which)); }

// 1 / U_jj² per input column, U the upper Cholesky factor of H⁻¹ (prepare_inverse_hessian).
// U_jj² is the conditional inverse-Hessian diagonal, so w² / U_jj² is the OBS salience used by
// PB-LLM and BiLLM (research/baselines.md §2.3, §3.2).
inline Eigen::VectorXd inverse_u_diag_squared(const Eigen::MatrixXd& U) {
  return U.diagonal().array().square().inverse().matrix();
}

// Element scores |w| (magnitude) or w² / U_jj² (hessian, when `inv_u2` is non-empty).
inline Matrix element_scores(const Matrix& w, const Eigen::VectorXd& inv_u2) {
  Matrix s(w.rows(), w.cols());
  for (Index r = 0; r < w.rows(); ++r)
    for (Index c = 0; c < w.cols(); ++c) {
      const double x = w(r, c);
      s(r, c) = static_cast<float>(inv_u2.size() > 0 ? x * x * inv_u2(c) : std::abs(x));
    }
  return s;
}

// PB-LLM's element rule (gptq_pb/gptq.py), on each group of `group` input columns (group <= 0:
// the whole matrix, the code's default groupsize -1): with the group's n scores sorted
// ascending, τ = sorted[floor(n · low_frac)]; a weight is binarized when score <= τ and salient
// when score > τ. So about (1 - low_frac) · n - 1 weights are salient (ties at τ are binarized);
// when floor(n · low_frac) >= n (low_frac = 1) none is. One threshold per group over all rows:
// the mask is not per row.
inline SalientMask threshold_mask(const Matrix& score, double low_frac, Index group) {
  SalientMask m;
  m.shape = SalientMask::Shape::elements;
  m.rows = score.rows();
  m.cols = score.cols();
  m.salient.assign(static_cast<std::size_t>(m.rows * m.cols), 0);
  const Index step = group > 0 ? group : std::max<Index>(m.cols, 1);
  std::vector<float> values;
  for (Index c0 = 0; c0 < m.cols; c0 += step) {
    const Index c1 = std::min(c0 + step, m.cols);
    values.clear();
    for (Index r = 0; r < m.rows; ++r)
      for (Index c = c0; c < c1; ++c) values.push_back(score(r, c));
    const auto n = static_cast<Index>(values.size());
    const auto k = static_cast<Index>(std::floor(static_cast<double>(n) * low_frac));
    if (n == 0 || k >= n) continue;  // everything binarized
    std::nth_element(values.begin(), values.begin() + k, values.end());
    const float tau = values[static_cast<std::size_t>(k)];
    for (Index r = 0; r < m.rows; ++r)
      for (Index c = c0; c < c1; ++c) m.salient[static_cast<std::size_t>(r * m.cols + c)] = score(r, c) > tau;
  }
  return m;
}

// How many weights threshold_mask marks on an [rows, cols] score matrix when the scores are
// distinct (bit budgets predict from this): per group of n scores, n - floor(n · low_frac) - 1,
// or none when floor(n · low_frac) >= n.
inline std::int64_t predicted_threshold_count(Index rows, Index cols, double low_frac, Index group) {
  const Index step = group > 0 ? group : std::max<Index>(cols, 1);
  std::int64_t count = 0;
  for (Index c0 = 0; c0 < cols; c0 += step) {
    const auto n = static_cast<Index>(rows * (std::min(c0 + step, cols) - c0));
    const auto k = static_cast<Index>(std::floor(static_cast<double>(n) * low_frac));
    if (n > 0 && k < n) count += n - k - 1;
  }
  return count;
}

// Storage encodings of a mask (docs/methods/masks.md):
//   bitmap: elements rows·cols bits, channels cols bits;
//   csr:    elements nnz·⌈log2 cols⌉ (column index per salient weight) + (rows+1)·⌈log2(nnz+1)⌉
//           (row pointers); channels k·⌈log2 cols⌉ (the list of salient column indices).
enum class Encoding { bitmap, csr };
inline Encoding parse_encoding(const std::string& s) {
  if (s == "bitmap") return Encoding::bitmap;
  if (s == "csr") return Encoding::csr;
  throw Error("mask encoding must be bitmap or csr, got '" + s + "'");
}

inline double ceil_log2(std::int64_t n) {  // bits to store an index in [0, n)
  double b = 0;
  while ((std::int64_t{1} << static_cast<int>(b)) < n) b += 1;
  return b;
}

// The cost of a mask of `shape` with `nnz` salient entries on an [rows, cols] weight.
inline double storage_bits(SalientMask::Shape shape, Index rows, Index cols, std::int64_t nnz, Encoding e) {
  const auto r = static_cast<double>(rows), c = static_cast<double>(cols);
  if (shape == SalientMask::Shape::channels) return e == Encoding::bitmap ? c : static_cast<double>(nnz) * ceil_log2(cols);
  if (e == Encoding::bitmap) return r * c;
  return static_cast<double>(nnz) * ceil_log2(cols) + (r + 1.0) * ceil_log2(nnz + 1);
}

inline double storage_bits(const SalientMask& m, Encoding e) {
  std::int64_t nnz = 0;
  for (auto s : m.salient) nnz += s != 0;
  return storage_bits(m.shape, m.rows, m.cols, nnz, e);
}

// The prediction of a threshold (element) mask, for Mask::predict.
inline MaskPrediction predicted_threshold_mask(Index rows, Index cols, double low_frac, Index group, Encoding e) {
  const auto nnz = predicted_threshold_count(rows, cols, low_frac, group);
  return {SalientMask::Shape::elements, nnz, storage_bits(SalientMask::Shape::elements, rows, cols, nnz, e)};
}

// The mask as a 0/1 matrix: [rows, cols] for element masks, [1, cols] for channel masks.
inline Matrix as_matrix(const SalientMask& m) {
  const bool channels = m.shape == SalientMask::Shape::channels;
  Matrix out(channels ? 1 : m.rows, m.cols);
  for (Index r = 0; r < out.rows(); ++r)
    for (Index c = 0; c < out.cols(); ++c) out(r, c) = m.salient[static_cast<std::size_t>(r * m.cols + c)] ? 1.0f : 0.0f;
  return out;
}

// Logs the mask as ctx.log_prefix + "/mask" when the experiment logs tensors.
inline void log_mask(const LinearContext& ctx, const SalientMask& m) {
  if (ctx.log != nullptr && ctx.log->enabled()) ctx.log->tensor(ctx.log_prefix + "/mask", as_matrix(m));
}

// The weight with dead input columns (H_jj == 0) zeroed and the factor U, exactly as
// prepare_inverse_hessian does it before the PB-LLM/BiLLM code computes salience.
// The factor is the layer's shared one when the engine offers it (inverse_hessian_factor).
struct Prepared {
  Matrix weight;
  std::shared_ptr<const InverseHessianFactor> factor;
};
inline Prepared prepare(const LinearContext& ctx, const Matrix& weight, double percdamp) {
  if (!ctx.hessian && !ctx.inverse_factor) throw Error(what(ctx) + ": this mask needs the layer's Hessian");
  Prepared p{weight, {}};
  p.factor = inverse_hessian_factor(ctx, p.weight, percdamp, what(ctx));
  return p;
}

}  // namespace ptqlab::salience
