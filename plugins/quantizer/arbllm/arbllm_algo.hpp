#pragma once
// ARB-LLM's block algorithm (research/arbllm.md §4; docs/methods/arbllm.md), header only (the
// plugin and tests/test_arbllm.cpp compile their own copies). It is BiLLM's block algorithm with
// other binarizers, so it is built from BiLLM's pieces (core/include/ptqlab/quant/billm_algo.hpp):
// the salience matrix, the column ranking and structural search (A), the quantile break-points and
// BiLLM's break-point search (B), and the same block-wise-only compensation (D). Per block:
//   S  salience of the block as it arrives (hessian w²/U_jj², or magnitude w)
//   (A) k* salient columns: BiLLM's search with its order-2 binarizer on both sides (unchanged)
//   (B') order2_group (CGB) only: the salient columns split at a break-point of |S| into a high and
//       a low group (quantiles of the nonzero |S| there; error of BiLLM's order-2 binarizer on S)
//   (B) non-salient break-point: BiLLM's search for arb and arb-rc (the code's criterion differs
//       only by a constant, so the argmin is the same); for arb-x the candidates are scored by the
//       input-weighted error tr(E Σ_b Eᵀ), E = S − [bin1(S, Mc) + bin1(S, Ms) + ARB2(S, Msal)]
//   (C) the block's weights binarized group by group with the method's binarizer
//       (arb_binarizers.hpp): salient groups order 2, concentrated and sparse order 1
//   (D) E = (Wb − Q)/U_jj, W[:, b1:] −= E U[b0:b1, b1:] (no in-block updates)
// Σ_b = ½ H_raw[b0:b1, b0:b1], the block of the sample-mean XᵀX: H_raw is the calibration Hessian
// before the dead-input fix and dampening (the code keeps the inputs and forms the same matrix).
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include <Eigen/Core>
#include "ptqlab/quant/billm_algo.hpp"
#include "arb_binarizers.hpp"
#include "ptqlab/quant/binarize.hpp"
#include "ptqlab/quant/bits.hpp"

namespace ptqlab::arbllm {

enum class Method { arb, arb_x, arb_rc };

struct Options {
  Method method = Method::arb;
  bool order2_group = false;  // CGB (--order2_group): split the salient columns by |S| too
  billm::Metric metric = billm::Metric::hessian;
  Index block_size = 128;
  int min_salient = 1;  // k in [min, max] (the code: 1 … up_lim − 1 = 49)
  int max_salient = 49;
  double split_min = 0.10, split_max = 0.90;  // break-point quantile levels (both searches)
  int split_points = 81;
  bool disable_gptq = false;  // no propagation (the code's --disable_gptq, which crashes as shipped)
  Refinement refine;

  // BiLLM's options for the shared searches: faithful mode (searches on S, quantile break-points,
  // the mean-shifted binarizer with sgn(0) = 0, order 2 on both sides of (A)).
  billm::Options billm_options() const {
    billm::Options o = billm::defaults(billm::Mode::faithful);
    o.metric = metric;
    o.block_size = block_size;
    o.min_salient = min_salient;
    o.max_salient = max_salient;
    o.split_min = split_min;
    o.split_max = split_max;
    o.split_points = split_points;
    return o;
  }
};

// Group ids of a block's entries, and their orders.
enum Group : std::uint8_t { kSalientHigh = 0, kSalientLow = 1, kSparse = 2, kConcentrated = 3 };
inline constexpr int kGroups = 4;
inline int group_order(int g) { return g <= kSalientLow ? 2 : 1; }

struct BlockPlan {
  int salient = 0;                      // k*
  std::vector<std::uint8_t> salient_columns;
  billm::SearchResult structural;       // (A)
  std::vector<float> salient_candidates;  // (B') (CGB only)
  billm::SearchResult salient_split;
  float salient_breakpoint = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> candidates;        // (B)
  billm::SearchResult split;
  float breakpoint = 0.0f;
  Mask groups;                          // rows × nb group ids (Group)
};

// ---- (B') CGB: the salient columns' break-point -----------------------------------------------------

// Candidates: the quantiles of the nonzero |S| in the salient columns (zeros excluded here, unlike
// (B)). Each candidate's error: per row, BiLLM's order-2 binarizer of the salient entries with
// |S| < p and of those with |S| ≥ p, Σ (S − approx)² (the non-salient entries add a constant).
inline billm::SearchResult salient_split_search(const Matrix& T, const std::vector<std::uint8_t>& salient,
                                                const std::vector<float>& candidates) {
  const Index rows = T.rows(), nb = T.cols();
  const std::size_t P = candidates.size();
  std::vector<std::vector<double>> parts(billm::row_chunks(rows), std::vector<double>(P, 0.0));
  billm::for_row_chunks(rows, [&](Index c, Index r0, Index r1) {
    std::vector<float> lo(nb), hi(nb), scratch(2 * nb);
    for (Index r = r0; r < r1; ++r)
      for (std::size_t k = 0; k < P; ++k) {
        Index nl = 0, nh = 0;
        for (Index j = 0; j < nb; ++j) {
          if (!salient[j]) continue;
          const float t = T(r, j);
          if (std::fabs(t) < candidates[k])
            lo[nl++] = t;
          else
            hi[nh++] = t;
        }
        parts[c][k] += residual_binarize_error(lo.data(), nl, 2, BinarizerStyle{}, scratch.data()) +
                       residual_binarize_error(hi.data(), nh, 2, BinarizerStyle{}, scratch.data());
      }
  });
  billm::SearchResult out;
  out.errors = billm::merge_chunks(parts, P);
  double best = std::numeric_limits<double>::infinity();
  out.best = 0;  // the code's fallback when nothing is below +inf: the first candidate
  for (std::size_t k = 0; k < P; ++k)
    if (out.errors[k] < best) {
      best = out.errors[k];
      out.best = static_cast<int>(k);
    }
  return out;
}

inline std::vector<float> salient_breakpoints(const Matrix& T, const std::vector<std::uint8_t>& salient,
                                              const std::vector<double>& levels) {
  std::vector<float> values;
  for (Index r = 0; r < T.rows(); ++r)
    for (Index j = 0; j < T.cols(); ++j)
      if (salient[j] && T(r, j) != 0.0f) values.push_back(std::fabs(T(r, j)));
  if (values.empty()) return std::vector<float>(levels.size(), 0.0f);  // numpy raises; all entries go "high"
  return billm::quantiles_linear(values, 0, levels);
}

// ---- (B) for arb-x: the input-weighted break-point search ---------------------------------------------

// E = S − Q with Q = ARB2(S, Msal) on the salient columns (`salient_approx`, constant) and BiLLM's
// order-1 binarizer of the concentrated (|S| < p) and sparse (|S| ≥ p) entries elsewhere; the
// error of p is tr(E Σ Eᵀ) (the code's error_computing_x_all_accelerate up to a constant factor).
// Per row chunk: E (64 × nb), then one GEMM E·Σ per candidate.
inline billm::SearchResult x_breakpoint_search(const Matrix& T, const std::vector<std::uint8_t>& salient,
                                               const Matrix& salient_approx, const std::vector<float>& candidates,
                                               const Eigen::MatrixXf& Sigma) {
  using binarize_detail::step_value;
  const Index rows = T.rows(), nb = T.cols();
  const std::size_t P = candidates.size();
  std::vector<std::vector<double>> parts(billm::row_chunks(rows), std::vector<double>(P, 0.0));
  billm::for_row_chunks(rows, [&](Index c, Index r0, Index r1) {
    const Index nr = r1 - r0;
    Eigen::MatrixXf E(nr, nb), ES(nr, nb);
    std::vector<float> lo(nb), hi(nb);
    for (Index i = 0; i < nr; ++i)
      for (Index j = 0; j < nb; ++j)
        if (salient[j]) E(i, j) = T(r0 + i, j) - salient_approx(r0 + i, j);
    for (std::size_t k = 0; k < P; ++k) {
      const float p = candidates[k];
      for (Index i = 0; i < nr; ++i) {
        const Index r = r0 + i;
        Index nl = 0, nh = 0;
        for (Index j = 0; j < nb; ++j) {
          if (salient[j]) continue;
          const float t = T(r, j);
          if (std::fabs(t) < p)
            lo[nl++] = t;
          else
            hi[nh++] = t;
        }
        const BinaryCoeffs cl = binary_coeffs(lo.data(), nl), ch = binary_coeffs(hi.data(), nh);
        for (Index j = 0; j < nb; ++j) {
          if (salient[j]) continue;
          const float t = T(r, j);
          E(i, j) = std::fabs(t) < p ? t - step_value<true>(t, cl.mu, cl.alpha) : t - step_value<true>(t, ch.mu, ch.alpha);
        }
      }
      ES.noalias() = E * Sigma;
      double acc = 0.0;
      for (Index i = 0; i < nr; ++i)
        for (Index j = 0; j < nb; ++j) acc += static_cast<double>(ES(i, j)) * E(i, j);
      parts[c][k] += acc;
    }
  });
  billm::SearchResult out;
  out.errors = billm::merge_chunks(parts, P);
  double best = std::numeric_limits<double>::infinity();
  out.best = 0;
  for (std::size_t k = 0; k < P; ++k)
    if (out.errors[k] < best) {
      best = out.errors[k];
      out.best = static_cast<int>(k);
    }
  return out;
}

// ---- one block -------------------------------------------------------------------------------------

// (A), (B'), (B) for one block. Wb: the block's current weights; d: its salience denominators
// (U_jj); Sigma: Σ_b (arb-x only, else unused). T receives the salience matrix.
inline BlockPlan plan_block(const Matrix& Wb, const Eigen::VectorXf& d, const Eigen::MatrixXf* Sigma, const Options& o,
                            Matrix& T, billm::QuantileBuffers* qbuf = nullptr) {
  const billm::Options bo = o.billm_options();
  const Index rows = Wb.rows(), nb = Wb.cols();
  BlockPlan plan;
  billm::salience_matrix(Wb, d, o.metric, T);
  const auto order = billm::rank_columns(T);
  const auto [kmin, kmax] = billm::salient_range(bo, nb);
  plan.structural = billm::structural_search(T, order, kmin, kmax, 2, 2, bo.style());
  plan.salient = plan.structural.best;
  plan.salient_columns.assign(nb, 0);
  for (int i = 0; i < plan.salient; ++i) plan.salient_columns[order[i]] = 1;
  const auto levels = billm::split_levels(bo);
  if (o.order2_group) {
    plan.salient_candidates = salient_breakpoints(T, plan.salient_columns, levels);
    plan.salient_split = salient_split_search(T, plan.salient_columns, plan.salient_candidates);
    plan.salient_breakpoint = plan.salient_candidates.empty() ? 0.0f : plan.salient_candidates[plan.salient_split.best];
  }
  plan.candidates = billm::quantile_breakpoints(T, plan.salient_columns, levels, qbuf);
  if (o.method == Method::arb_x) {
    if (Sigma == nullptr) throw std::invalid_argument("arbllm: arb-x needs the block's input Gram matrix");
    Mask sal(static_cast<std::size_t>(rows * nb), 0);
    for (Index r = 0; r < rows; ++r)
      for (Index j = 0; j < nb; ++j) sal[r * nb + j] = plan.salient_columns[j];
    Matrix g = Matrix::Zero(rows, nb);
    arb_group(T, sal, 2, o.refine, g);  // the code's ARB2 of S (not X-refined, not split)
    plan.split = x_breakpoint_search(T, plan.salient_columns, g, plan.candidates, *Sigma);
  } else {
    plan.split = billm::breakpoint_search(T, plan.salient_columns, plan.candidates, false, bo.style());
  }
  plan.breakpoint = plan.candidates.empty() ? 0.0f : plan.candidates[plan.split.best];
  plan.groups.resize(static_cast<std::size_t>(rows * nb));
  for (Index r = 0; r < rows; ++r)
    for (Index j = 0; j < nb; ++j) {
      const float a = std::fabs(T(r, j));
      std::uint8_t g;
      if (plan.salient_columns[j])
        g = (!o.order2_group || a >= plan.salient_breakpoint) ? kSalientHigh : kSalientLow;
      else
        g = a < plan.breakpoint ? kConcentrated : kSparse;
      plan.groups[r * nb + j] = g;
    }
  return plan;
}

// (C): the block's weights binarized group by group.
inline Matrix binarize_block(const Matrix& Wb, const BlockPlan& plan, const Eigen::MatrixXf* Sigma, const Options& o) {
  Matrix Q = Matrix::Zero(Wb.rows(), Wb.cols());
  Mask m(plan.groups.size());
  for (int g = 0; g < kGroups; ++g) {
    bool any = false;
    for (std::size_t i = 0; i < m.size(); ++i) any |= (m[i] = plan.groups[i] == g) != 0;
    if (!any) continue;
    switch (o.method) {
      case Method::arb: arb_group(Wb, m, group_order(g), o.refine, Q); break;
      case Method::arb_x: arbx_group(Wb, m, group_order(g), *Sigma, o.refine, Q); break;
      case Method::arb_rc: rc_group(Wb, m, group_order(g), o.refine, Q); break;
    }
  }
  return Q;
}

// ---- the block loop -----------------------------------------------------------------------------

struct BlockRecord {
  Index b0 = 0, b1 = 0;
  int salient = 0;
  float breakpoint = 0.0f, salient_breakpoint = 0.0f;
  std::vector<std::uint8_t> salient_columns;
};

// ARB-LLM on W ([rows, cols], in place). U: the upper Cholesky factor of the dampened H⁻¹
// (prepare_inverse_hessian); H_raw: the calibration Hessian as accumulated (needed by arb-x).
inline std::vector<BlockRecord> quantize_weight(Matrix& W, const Eigen::MatrixXd& U, const Eigen::MatrixXd* H_raw,
                                                const Options& o) {
  const Index cols = W.cols();
  if (U.rows() != cols || U.cols() != cols) throw std::invalid_argument("arbllm: U does not match the weight");
  if (o.block_size < 1) throw std::invalid_argument("arbllm: block size must be >= 1");
  if (o.method == Method::arb_x && (H_raw == nullptr || H_raw->rows() != cols || H_raw->cols() != cols))
    throw std::invalid_argument("arbllm: arb-x needs the raw Hessian of the weight's input");
  const Eigen::VectorXf d_sal = billm::salience_denominators(U, false);
  const Eigen::VectorXf u_diag = U.diagonal().cast<float>();
  std::vector<BlockRecord> records;
  Matrix Wb, T;
  billm::QuantileBuffers qbuf;
  Eigen::MatrixXf Ub, Sigma;
  for (Index b0 = 0; b0 < cols; b0 += o.block_size) {
    const Index b1 = std::min(b0 + o.block_size, cols), nb = b1 - b0;
    Wb = W.middleCols(b0, nb);
    if (o.method == Method::arb_x) Sigma = (0.5 * H_raw->block(b0, b0, nb, nb)).cast<float>();
    const Eigen::MatrixXf* sig = o.method == Method::arb_x ? &Sigma : nullptr;
    const BlockPlan plan = plan_block(Wb, d_sal.segment(b0, nb), sig, o, T, &qbuf);
    const Matrix Q = binarize_block(Wb, plan, sig, o);
    // (D): BiLLM's block-wise compensation.
    billm::compensate_block(W, U, Wb, b0, u_diag, !o.disable_gptq, Ub,
                            [&](Index r0, Index r1, Matrix& Qc) { Qc = Q.middleRows(r0, r1 - r0); });
    BlockRecord rec;
    rec.b0 = b0;
    rec.b1 = b1;
    rec.salient = plan.salient;
    rec.breakpoint = plan.breakpoint;
    rec.salient_breakpoint = o.order2_group ? plan.salient_breakpoint : 0.0f;
    rec.salient_columns = plan.salient_columns;
    records.push_back(std::move(rec));
  }
  return records;
}

// ---- bit ledger (research/arbllm.md §5) --------------------------------------------------------

// paper  = BiLLM's: 1 sign per weight + 1 more per salient weight (the ARB paper copies BiLLM's
//          figures: "our methods have the same bit-width as BiLLM");
// all-in = the signs (payload)
//        + FP16 parameters per row per block: arb/arb-x μ (zeros) and α (scales) of each group:
//          salient order 2 (μ, α₁, α₂), concentrated and sparse (μ, α): 3 zeros + 4 scales, with
//          CGB two salient groups: 4 + 6; arb-rc has no μ: row scales 4 (CGB 6)
//        + arb-rc FP16 column scales per block, only over the columns a group can use:
//          2·nb (salient 2 planes × k, concentrated and sparse 1 × (nb − k) each), CGB 2·nb + 2·k
//        + masks: 1 bit per non-salient weight (concentrated/sparse), with CGB also per salient
//          weight (high/low), and the per-block salient-column bitmap (cols bits).
inline BitCount ledger(Index rows, Index cols, Index block_size, const std::vector<int>& salient_per_block, Method method,
                       bool order2_group) {
  BitCount b;
  const Index blocks = (cols + block_size - 1) / block_size;
  if (static_cast<Index>(salient_per_block.size()) != blocks) throw std::invalid_argument("arbllm ledger: blocks");
  double salient_cols = 0;
  for (int k : salient_per_block) salient_cols += k;
  const double r = static_cast<double>(rows), n = r * static_cast<double>(cols), B = static_cast<double>(blocks);
  b.weights = rows * cols;
  b.payload = n + r * salient_cols;
  b.paper = b.payload;
  if (method == Method::arb_rc) {
    b.scales = 16.0 * (order2_group ? 6.0 : 4.0) * r * B + 16.0 * (2.0 * static_cast<double>(cols) +
                                                                    (order2_group ? 2.0 * salient_cols : 0.0));
    b.zeros = 0.0;
  } else {
    b.scales = 16.0 * (order2_group ? 6.0 : 4.0) * r * B;
    b.zeros = 16.0 * (order2_group ? 4.0 : 3.0) * r * B;
  }
  b.masks = (order2_group ? n : n - r * salient_cols) + static_cast<double>(cols);
  return b;
}

}  // namespace ptqlab::arbllm
