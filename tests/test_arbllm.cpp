// ARB-LLM: the refined binarizers against the hand-worked cases of research/arbllm.md §8 (O1-O5),
// their invariants (O8, O9, the reductions to BiLLM and to μ ≡ 0), the searches against brute
// force, the block algorithm against BiLLM's with zero iterations, the bit ledger by hand, and the
// plugin on real stories260K Hessians.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>

#include <tbb/global_control.h>

#include "../plugins/quantizer/arbllm/arbllm_algo.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/model/model.hpp"
#include "ptqlab/quant/binarize.hpp"
#include "ptqlab/quant/gptq.hpp"
#include "ptqlab/support/error.hpp"
#include "quantizer_test_support.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

using Eigen::Index;
using arbllm::Mask;
using arbllm::Refinement;
using test::random_hessian;
using test::run_with_hessian;

Matrix random_matrix(Index rows, Index cols, std::uint64_t seed, float sigma = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  Matrix w(rows, cols);
  for (Index i = 0; i < w.size(); ++i) w.data()[i] = d(rng);
  return w;
}

Mask random_mask(Index rows, Index cols, std::uint64_t seed, double p = 0.6) {
  std::mt19937_64 rng(seed);
  std::bernoulli_distribution b(p);
  Mask m(static_cast<std::size_t>(rows * cols));
  for (auto& x : m) x = b(rng) ? 1 : 0;
  return m;
}

Refinement iters(int t, int x = 15) {
  Refinement s;
  s.iterations = t;
  s.x_iterations = x;
  return s;
}

// One row through arb_row: returns (fit, q, trace).
struct RowRun {
  arbllm::RowFit fit;
  std::vector<float> q;
  std::vector<double> trace;
};
RowRun run_row(const std::vector<float>& v, int order, const Refinement& s) {
  RowRun out;
  const Index m = static_cast<Index>(v.size());
  std::vector<float> b1(m), b2(m);
  out.q.resize(m);
  out.trace.assign(s.iterations + 1, 0.0);
  out.fit = arbllm::arb_row(v.data(), m, order, s, b1.data(), b2.data(), out.q.data(), out.trace.data());
  return out;
}

std::shared_ptr<Quantizer> arbllm_quantizer(const std::map<std::string, ParamValue>& params = {}) {
  return test::make_quantizer("arbllm", params);
}

// ---- O1-O3: ARB ------------------------------------------------------------------------------------

TEST(ArbBinarizer, OneIterationOnTheHandWorkedBlock) {
  // research/arbllm.md O1: a 4 × 6 block with a mask, T = 1 and T = 15.
  Matrix W(4, 6);
  W << 1, 1, 1, 1, 1, -5,  //
      0.4f, -0.2f, 0.1f, -0.5f, 0.7f, -0.1f,  //
      2, 9, 3, 100, 0, 11,  //
      5, 6, 7, 8, 9, 10;
  const Mask M = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0};
  Matrix Q = Matrix::Constant(4, 6, 123.0f);  // entries off the mask are left alone
  std::vector<double> trace;
  arbllm::arb_group(W, M, 1, iters(1), Q, &trace);
  const float a = 35.0f / 27, b = -95.0f / 27;
  for (int j = 0; j < 5; ++j) EXPECT_NEAR(Q(0, j), a, 1e-6);
  EXPECT_NEAR(Q(0, 5), b, 1e-6);
  // Row 1: balanced signs, a fixed point: μ = 1/15, α = 1/3.
  for (int j = 0; j < 6; ++j) EXPECT_NEAR(Q(1, j), (j % 2 ? -1.0f / 3 : 1.0f / 3) + 1.0f / 15, 1e-6) << j;
  // Row 2: members 0, 2, 4, 5; output [11/8, ·, 11/8, ·, 11/8, 81/8].
  EXPECT_NEAR(Q(2, 0), 11.0 / 8, 1e-5);
  EXPECT_NEAR(Q(2, 2), 11.0 / 8, 1e-5);
  EXPECT_NEAR(Q(2, 4), 11.0 / 8, 1e-5);
  EXPECT_NEAR(Q(2, 5), 81.0 / 8, 1e-5);
  EXPECT_EQ(Q(2, 1), 123.0f);
  EXPECT_EQ(Q(2, 3), 123.0f);
  for (int j = 0; j < 6; ++j) EXPECT_EQ(Q(3, j), 123.0f);  // no members
  // Block L1 = 40/3 + 4/15 + 21 at t = 0 and 640/243 + 4/15 + 91/16 at t = 1.
  ASSERT_EQ(trace.size(), 2u);
  EXPECT_NEAR(trace[0], 40.0 / 3 + 4.0 / 15 + 21, 1e-5);
  EXPECT_NEAR(trace[1], 640.0 / 243 + 4.0 / 15 + 91.0 / 16, 1e-5);

  // Per row, the parameters after 1 and after 15 iterations.
  const auto r0 = run_row({1, 1, 1, 1, 1, -5}, 1, iters(1));
  EXPECT_NEAR(r0.fit.mu, -10.0 / 9, 1e-6);
  EXPECT_NEAR(r0.fit.a1, 65.0 / 27, 1e-6);
  const auto r0_15 = run_row({1, 1, 1, 1, 1, -5}, 1, iters(15));
  EXPECT_NEAR(r0_15.fit.mu, -1.99998957, 2e-6);
  EXPECT_NEAR(r0_15.fit.a1, 2.99999305, 2e-6);
  EXPECT_LT(r0_15.trace[15], 1e-8);
  const auto r2_15 = run_row({2, 3, 0, 11}, 1, iters(15));
  EXPECT_NEAR(r2_15.fit.mu, 19.0 / 3, 1e-5);
  EXPECT_NEAR(r2_15.fit.a1, 14.0 / 3, 1e-5);
  EXPECT_NEAR(r2_15.trace[15], 14.0 / 3, 1e-4);
}

TEST(ArbBinarizer, ASignOfZeroCanMakeTheFirstIterationWorse) {
  // O2: the entry equal to the row mean starts with sign 0 (reconstructed exactly), the first
  // update forces it to ±1 and the loss rises from 1 to 376/225; the code does this too.
  const auto r = run_row({3, 1, 0, 0, 0, 2}, 1, iters(15));
  EXPECT_NEAR(r.trace[0], 1.0, 1e-6);
  EXPECT_NEAR(r.trace[1], 376.0 / 225, 1e-5);
  EXPECT_NEAR(r.trace[2], 1.256955, 1e-5);
  EXPECT_NEAR(r.trace[3], 1.250086, 1e-5);
  EXPECT_NEAR(r.trace[15], 1.25, 1e-5);
}

TEST(ArbBinarizer, SecondOrderRefinementByHand) {
  // O3: init = BiLLM's order 2 (L1 = 8), iteration 1 gives L1 = 17/3, then the listed sequence.
  const auto r = run_row({-4, -7, -4, -8, 5, -3}, 2, iters(15));
  const double expected[16] = {8,       5.66667, 3.14403, 1.77696, 1.35503, 1.2248,  1.18461, 1.1722,
                               1.16838, 1.16719, 1.16683, 1.16672, 1.16668, 1.16667, 1.16667, 1.16667};
  EXPECT_NEAR(r.trace[1], 17.0 / 3, 1e-5);
  for (int t = 0; t < 16; ++t) EXPECT_NEAR(r.trace[t], expected[t], 2e-5) << "t = " << t;
  EXPECT_NEAR(r.fit.mu, -1.25041354, 1e-5);
  EXPECT_NEAR(r.fit.a1, 4.33305764, 1e-5);
  EXPECT_NEAR(r.fit.a2, 1.91680451, 1e-5);
  // After one iteration: μ = −5/2, α₁ = 10/3, α₂ = 5/2.
  const auto one = run_row({-4, -7, -4, -8, 5, -3}, 2, iters(1));
  EXPECT_NEAR(one.fit.mu, -2.5, 1e-6);
  EXPECT_NEAR(one.fit.a1, 10.0 / 3, 1e-6);
  EXPECT_NEAR(one.fit.a2, 2.5, 1e-6);
}

TEST(ArbBinarizer, ZeroIterationsIsBillmsBinarizerExactly) {
  // With T = 0 the refinement is BiLLM's binarizer (core binarize.hpp), float for float.
  const Matrix X = random_matrix(70, 40, 3);
  const Mask M = random_mask(70, 40, 4);
  for (int order : {1, 2}) {
    Matrix Q = Matrix::Zero(70, 40);
    arbllm::arb_group(X, M, order, iters(0), Q);
    EXPECT_EQ(Q, residual_binarize_masked(X, M, order)) << "order " << order;
  }
}

// ---- O4: RC ------------------------------------------------------------------------------------------

TEST(ArbRc, FirstOrderByHand) {
  Matrix W(2, 3);
  W << 1, -3, 0.5f, -2, 3, -2;
  const Mask M(6, 1);
  Matrix Q = Matrix::Zero(2, 3);
  std::vector<double> trace;
  const auto fit1 = arbllm::rc_group(W, M, 1, iters(1), Q, &trace);
  EXPECT_NEAR(trace[0], 50137.0 / 31752, 1e-5);
  EXPECT_NEAR(trace[1], 1.166027, 1e-5);
  EXPECT_NEAR(fit1.a[0](0), 1.647894, 1e-5);
  EXPECT_NEAR(fit1.a[0](1), 2.103276, 1e-5);
  EXPECT_NEAR(fit1.c[0](0), 0.820028, 1e-5);
  EXPECT_NEAR(fit1.c[0](1), 1.576271, 1e-5);
  EXPECT_NEAR(fit1.c[0](2), 0.704618, 1e-5);
  const auto init = arbllm::rc_group(W, M, 1, iters(0), Q);
  EXPECT_NEAR(init.a[0](0), 1.5, 1e-6);
  EXPECT_NEAR(init.a[0](1), 7.0 / 3, 1e-6);
  EXPECT_NEAR(init.c[0](0), 16.0 / 21, 1e-6);
  EXPECT_NEAR(init.c[0](1), 23.0 / 14, 1e-6);
  EXPECT_NEAR(init.c[0](2), 25.0 / 42, 1e-6);
  arbllm::rc_group(W, M, 1, iters(15), Q, &trace);
  EXPECT_NEAR(trace[15], 1.15942, 1e-4);
  // Column scales frozen at 1: a = mean |w| per row and L1 = 25/6 at every iteration.
  Refinement unit = iters(5);
  unit.unit_columns = true;
  const auto u = arbllm::rc_group(W, M, 1, unit, Q, &trace);
  EXPECT_NEAR(u.a[0](0), 1.5, 1e-6);
  EXPECT_NEAR(u.a[0](1), 7.0 / 3, 1e-6);
  for (double l : trace) EXPECT_NEAR(l, 25.0 / 6, 1e-5);
}

TEST(ArbRc, UnitColumnScalesAreArbWithoutTheMean) {
  // RC with c ≡ 1 is ARB with μ ≡ 0 (both orders), on a random masked block.
  const Matrix X = random_matrix(90, 30, 11);
  const Mask M = random_mask(90, 30, 12);
  for (int order : {1, 2}) {
    Refinement rc = iters(15), arb = iters(15);
    rc.unit_columns = true;
    arb.fit_mean = false;
    Matrix Qr = Matrix::Zero(90, 30), Qa = Qr;
    arbllm::rc_group(X, M, order, rc, Qr);
    arbllm::arb_group(X, M, order, arb, Qa);
    EXPECT_LT((Qr - Qa).cwiseAbs().maxCoeff(), 1e-5f) << "order " << order;
    EXPECT_GT(Qa.cwiseAbs().maxCoeff(), 0.1f);
  }
}

// ---- O5: ARB-X ----------------------------------------------------------------------------------------

TEST(ArbX, InputWeightedSweepsByHand) {
  Matrix W(1, 4);
  W << 3, -1, 2, -2;
  const Mask M(4, 1);
  Eigen::MatrixXf Sigma(4, 4);
  Sigma << 2, 1, 0, 0, 1, 2, 0, 0, 0, 0, 1, 0, 0, 0, 0, 3;
  Matrix Q = Matrix::Zero(1, 4);
  std::vector<double> trace;
  arbllm::arbx_group(W, M, 1, Sigma, iters(15, 1), Q, &trace);  // ARB stage: a fixed point μ = 1/2, α = 2
  EXPECT_NEAR(trace[0], 2.5, 1e-6);
  EXPECT_NEAR(trace[1], 54.0 / 25, 1e-6);
  // μ = 3/5, α = 11/5: q = [14/5, −8/5, 14/5, −8/5].
  EXPECT_NEAR(Q(0, 0), 2.8, 1e-6);
  EXPECT_NEAR(Q(0, 1), -1.6, 1e-6);
  arbllm::arbx_group(W, M, 1, Sigma, iters(15, 200), Q, &trace);
  EXPECT_NEAR(trace[2], 2.142933, 1e-6);
  for (std::size_t t = 1; t < trace.size(); ++t) EXPECT_LE(trace[t], trace[t - 1] + 1e-9);
  EXPECT_NEAR(trace.back(), 15.0 / 7, 1e-5);  // the limit μ = 9/14, α = 31/14
  EXPECT_NEAR(Q(0, 0), 31.0 / 14 + 9.0 / 14, 1e-5);
}

TEST(ArbX, IdentityGramGivesTheLeastSquaresFitForTheFrozenSigns) {
  // Σ = I: the sweeps converge to the least-squares (μ, α) of each row for its ARB signs.
  const Matrix X = random_matrix(20, 16, 21);
  const Mask M = random_mask(20, 16, 22);
  const Eigen::MatrixXf I = Eigen::MatrixXf::Identity(16, 16);
  Matrix Qx = Matrix::Zero(20, 16), Qa = Qx;
  arbllm::arbx_group(X, M, 1, I, iters(15, 300), Qx);
  arbllm::arb_group(X, M, 1, iters(15), Qa);
  for (Index r = 0; r < 20; ++r) {
    // Rebuild the row's signs from the ARB output and solve the 2 × 2 normal equations.
    double n = 0, sb = 0, sbb = 0, sw = 0, sbw = 0;
    std::vector<std::pair<Index, double>> members;
    for (Index j = 0; j < 16; ++j)
      if (M[r * 16 + j]) members.push_back({j, Qa(r, j)});
    if (members.size() < 2) continue;
    double mean_q = 0;
    for (auto& [j, q] : members) mean_q += q / members.size();
    for (auto& [j, q] : members) {
      const double b = q > mean_q ? 1.0 : -1.0;
      n += 1;
      sb += b;
      sbb += b * b;
      sw += X(r, j);
      sbw += b * X(r, j);
    }
    const double det = n * sbb - sb * sb;
    if (std::fabs(det) < 1e-9) continue;
    const double mu = (sbb * sw - sb * sbw) / det, alpha = (n * sbw - sb * sw) / det;
    for (auto& [j, q] : members) {
      const double b = q > mean_q ? 1.0 : -1.0;
      EXPECT_NEAR(Qx(r, j), mu + alpha * b, 1e-4) << r << "," << j;
    }
  }
}

// ---- O8, O9: invariants ----------------------------------------------------------------------------

TEST(ArbBinarizer, SignPairIsTheBruteForceArgminFirstOnTies) {
  std::mt19937_64 rng(5);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (int i = 0; i < 2000; ++i) {
    const float t = d(rng), g1 = d(rng), g2 = i % 7 == 0 ? g1 : d(rng);
    int best = -1;
    float bd = 0;
    for (int k = 0; k < 4; ++k) {
      const float b1 = k < 2 ? -1.0f : 1.0f, b2 = (k % 2) ? 1.0f : -1.0f;
      const float dist = std::fabs(t - (b1 * g1 + b2 * g2));
      if (best < 0 || dist < bd) {
        best = k;
        bd = dist;
      }
    }
    EXPECT_EQ(arbllm::detail::closest_pair(t, g1, g2), best);
  }
  EXPECT_EQ(arbllm::detail::closest_pair(0.0f, 1.0f, 1.0f), 1);  // (−,+) and (+,−) tie at 0: the first
}

bool non_increasing(const std::vector<double>& l) {
  for (std::size_t t = 1; t < l.size(); ++t)
    if (l[t] > l[t - 1] * (1 + 1e-6) + 1e-9) return false;
  return true;
}

TEST(ArbBinarizer, ReconstructionErrorNeverIncreasesOverIterations) {
  // O9 on Gaussian blocks (no exact ties): L1 of ARB and RC, L2 of the ARB-X sweeps.
  for (std::uint64_t seed = 0; seed < 4; ++seed) {
    const Matrix X = random_matrix(64, 48, 100 + seed);
    const Mask M = random_mask(64, 48, 200 + seed);
    Eigen::MatrixXf A = random_matrix(48, 48, 300 + seed).transpose();
    const Eigen::MatrixXf Sigma = A.transpose() * A / 48.0f + 0.1f * Eigen::MatrixXf::Identity(48, 48);
    for (int order : {1, 2}) {
      Matrix Q = Matrix::Zero(64, 48);
      std::vector<double> la, lr, lx;
      arbllm::arb_group(X, M, order, iters(15), Q, &la);
      arbllm::rc_group(X, M, order, iters(15), Q, &lr);
      arbllm::arbx_group(X, M, order, Sigma, iters(15), Q, &lx);
      EXPECT_TRUE(non_increasing(la)) << "arb order " << order << " seed " << seed;
      EXPECT_TRUE(non_increasing(lr)) << "rc order " << order << " seed " << seed;
      EXPECT_TRUE(non_increasing(lx)) << "arb-x order " << order << " seed " << seed;
      EXPECT_LT(la.back(), la.front());
      EXPECT_LT(lr.back(), lr.front());
      EXPECT_LT(lx.back(), lx.front());
    }
  }
}

// ---- the searches -------------------------------------------------------------------------------

// Σ (S − approx)² of the salient columns split at p, via the masked binarizer.
double salient_split_error(const Matrix& S, const std::vector<std::uint8_t>& sal, float p) {
  const Index rows = S.rows(), n = S.cols();
  Mask lo(rows * n, 0), hi = lo;
  for (Index r = 0; r < rows; ++r)
    for (Index j = 0; j < n; ++j)
      if (sal[j]) (std::fabs(S(r, j)) < p ? lo : hi)[r * n + j] = 1;
  const Matrix A = residual_binarize_masked(S, lo, 2) + residual_binarize_masked(S, hi, 2);
  double e = 0;
  for (Index r = 0; r < rows; ++r)
    for (Index j = 0; j < n; ++j)
      if (sal[j]) e += std::pow(static_cast<double>(S(r, j)) - A(r, j), 2);
  return e;
}

TEST(ArbSearch, SalientSplitAndInputWeightedBreakpointAreTheBruteForceArgmins) {
  const Index rows = 40, n = 32;
  const Matrix S = random_matrix(rows, n, 31);
  std::vector<std::uint8_t> sal(n, 0);
  for (Index j : {1, 5, 6, 20}) sal[j] = 1;
  const std::vector<double> levels = billm::split_levels(arbllm::Options{}.billm_options());
  // (B'): candidates are the quantiles of the nonzero |S| in the salient columns.
  const auto cand = arbllm::salient_breakpoints(S, sal, levels);
  std::vector<float> values;
  for (Index r = 0; r < rows; ++r)
    for (Index j = 0; j < n; ++j)
      if (sal[j]) values.push_back(std::fabs(S(r, j)));
  EXPECT_EQ(cand, billm::quantiles_linear(values, 0, levels));
  const auto res = arbllm::salient_split_search(S, sal, cand);
  for (std::size_t k = 0; k < cand.size(); ++k)
    EXPECT_NEAR(res.errors[k], salient_split_error(S, sal, cand[k]), 1e-7 * res.errors[k]);  // float residuals
  EXPECT_EQ(res.best, std::min_element(res.errors.begin(), res.errors.end()) - res.errors.begin());

  // (B) for arb-x: tr(E Σ Eᵀ) in double from the materialised approximation.
  Eigen::MatrixXf A = random_matrix(n, n, 32);
  const Eigen::MatrixXf Sigma = A.transpose() * A / static_cast<float>(n);
  Mask salmask(rows * n, 0);
  for (Index r = 0; r < rows; ++r)
    for (Index j = 0; j < n; ++j) salmask[r * n + j] = sal[j];
  Matrix g = Matrix::Zero(rows, n);
  arbllm::arb_group(S, salmask, 2, iters(15), g);
  const auto bcand = billm::quantile_breakpoints(S, sal, levels);
  const auto xres = arbllm::x_breakpoint_search(S, sal, g, bcand, Sigma);
  for (std::size_t k = 0; k < bcand.size(); k += 10) {
    Mask lo(rows * n, 0), hi = lo;
    for (Index r = 0; r < rows; ++r)
      for (Index j = 0; j < n; ++j)
        if (!sal[j]) (std::fabs(S(r, j)) < bcand[k] ? lo : hi)[r * n + j] = 1;
    const Matrix Q = residual_binarize_masked(S, lo, 1) + residual_binarize_masked(S, hi, 1) + g;
    const Eigen::MatrixXd E = (S - Q).cast<double>();
    const double want = (E * Sigma.cast<double>()).cwiseProduct(E).sum();
    EXPECT_NEAR(xres.errors[k], want, 1e-4 * want) << k;
  }
  EXPECT_EQ(xres.best, std::min_element(xres.errors.begin(), xres.errors.end()) - xres.errors.begin());
}

TEST(ArbSearch, MasksPartitionTheBlockAndMatchBillmWithoutCgb) {
  // O10 on one block of real-looking weights with a random Hessian.
  const Index rows = 64, cols = 128;
  Matrix W = random_matrix(rows, cols, 41, 0.05f);
  const auto H = random_hessian(cols, 512, 42);
  const auto factor = prepare_inverse_hessian(H, W, 0.01, "test");
  const Eigen::VectorXf d = factor.U.diagonal().cast<float>();
  const Eigen::MatrixXf Sigma = (0.5 * H).cast<float>();
  Matrix T, Tb;
  for (const auto method : {arbllm::Method::arb, arbllm::Method::arb_x, arbllm::Method::arb_rc})
    for (bool cgb : {false, true}) {
      arbllm::Options o;
      o.method = method;
      o.order2_group = cgb;
      const auto plan = arbllm::plan_block(W, d, &Sigma, o, T);
      EXPECT_GE(plan.salient, 1);
      EXPECT_LE(plan.salient, 49);
      int counts[4] = {0, 0, 0, 0};
      for (Index r = 0; r < rows; ++r)
        for (Index j = 0; j < cols; ++j) {
          const int g = plan.groups[r * cols + j];
          ASSERT_LT(g, 4);
          ++counts[g];
          EXPECT_EQ(g <= arbllm::kSalientLow, plan.salient_columns[j] != 0);
        }
      EXPECT_EQ(counts[0] + counts[1], rows * plan.salient);
      EXPECT_EQ(counts[1] > 0, cgb);
      const auto dec = billm::decide_block(W, d, o.billm_options(), &Tb);
      EXPECT_EQ(plan.salient, dec.structural.best);
      EXPECT_EQ(plan.salient_columns, dec.salient);
      if (method != arbllm::Method::arb_x) EXPECT_EQ(plan.breakpoint, dec.breakpoint);
    }
}

// ---- the block algorithm and the plugin -----------------------------------------------------------

TEST(ArbLlm, ZeroIterationsIsBillmOnTheWholeWeight) {
  // method arb with T = 0 and no CGB: every block is BiLLM's (same searches, same binarizer, same
  // propagation), so the quantized weight equals the billm plugin's in faithful mode, bit for bit.
  const Matrix w0 = random_matrix(80, 300, 51, 0.05f);  // blocks of 128, 128, 44
  const auto H = random_hessian(300, 900, 52);
  Matrix a = w0, b = w0;
  const auto bits_a = run_with_hessian(*arbllm_quantizer({{"iterations", std::int64_t{0}}}), a, H);
  const auto bits_b = run_with_hessian(*test::make_quantizer("billm"), b, H);
  EXPECT_EQ(a, b);
  EXPECT_EQ(bits_a.payload, bits_b.payload);
  // With iterations the result moves away from BiLLM's.
  Matrix c = w0;
  run_with_hessian(*arbllm_quantizer(), c, H);
  EXPECT_NE(c, b);
}

TEST(ArbLlm, ResultDoesNotDependOnTheThreadCount) {
  const Matrix w0 = random_matrix(150, 200, 61, 0.05f);
  const auto H = random_hessian(200, 600, 62);
  for (const std::string method : {"arb", "arb-x", "arb-rc"}) {
    Matrix serial = w0, parallel = w0;
    {
      tbb::global_control one(tbb::global_control::max_allowed_parallelism, 1);
      run_with_hessian(*arbllm_quantizer({{"method", method}, {"order2_group", true}}), serial, H);
    }
    run_with_hessian(*arbllm_quantizer({{"method", method}, {"order2_group", true}}), parallel, H);
    EXPECT_EQ(serial, parallel) << method;
  }
}

TEST(ArbLlm, RefinementLowersTheOutputErrorOnRealHessians) {
  // O11 on stories260K layer 0 (real calibration Hessians): every ARB variant beats BiLLM on the
  // Hessian-weighted output error of the attention and MLP input linears.
  const auto model = load_model(test::model_dir("stories260K"));
  const auto H = test::real_layer_hessians(model, 0);
  const auto& layer = model.layers[0];
  for (const auto& [name, weight, h] : {std::tuple{"q_proj", &layer.q_proj, &H[0]}, std::tuple{"gate_proj", &layer.gate_proj, &H[2]}}) {
    Matrix b = *weight;
    run_with_hessian(*test::make_quantizer("billm"), b, *h);
    const double e_billm = test::output_error(*weight, b, *h);
    for (const std::string method : {"arb", "arb-x", "arb-rc"})
      for (bool cgb : {false, true}) {
        Matrix a = *weight;
        run_with_hessian(*arbllm_quantizer({{"method", method}, {"order2_group", cgb}}), a, *h);
        const double e = test::output_error(*weight, a, *h);
        EXPECT_LT(e, e_billm) << name << " " << method << (cgb ? " +CGB" : "");
      }
  }
}

TEST(ArbLlm, BadParametersAreClearErrors) {
  EXPECT_THROW(arbllm_quantizer({{"min_salient", std::int64_t{10}}, {"max_salient", std::int64_t{5}}}), Error);
  EXPECT_THROW(arbllm_quantizer({{"split_min", 0.8}, {"split_max", 0.2}}), Error);
  EXPECT_THROW(arbllm_quantizer({{"num_p", std::int64_t{2}}}), Error);
  Matrix w = random_matrix(4, 8, 1);
  EXPECT_THROW(arbllm_quantizer()->quantize_linear(LinearContext{}, w), Error);
}

// ---- the bit ledger ------------------------------------------------------------------------------

TEST(ArbLedger, HandCountedSmallShape) {
  // 4 rows × 10 columns in blocks of 4, 4, 2 with 1, 2 and 1 salient columns (K = 4).
  using arbllm::Method;
  const auto a = arbllm::ledger(4, 10, 4, {1, 2, 1}, Method::arb, false);
  EXPECT_DOUBLE_EQ(a.payload, 40 + 16);
  EXPECT_DOUBLE_EQ(a.paper, 56);
  EXPECT_DOUBLE_EQ(a.scales, 16.0 * 4 * 4 * 3);  // α₁, α₂ salient, α concentrated, α sparse
  EXPECT_DOUBLE_EQ(a.zeros, 16.0 * 3 * 4 * 3);   // one μ per group
  EXPECT_DOUBLE_EQ(a.masks, (40 - 16) + 10);
  const auto x = arbllm::ledger(4, 10, 4, {1, 2, 1}, Method::arb_x, true);
  EXPECT_DOUBLE_EQ(x.scales, 16.0 * 6 * 4 * 3);
  EXPECT_DOUBLE_EQ(x.zeros, 16.0 * 4 * 4 * 3);
  EXPECT_DOUBLE_EQ(x.masks, 40 + 10);  // the salient weights need their high/low bit too
  const auto rc = arbllm::ledger(4, 10, 4, {1, 2, 1}, Method::arb_rc, false);
  EXPECT_DOUBLE_EQ(rc.zeros, 0);
  EXPECT_DOUBLE_EQ(rc.scales, 16.0 * 4 * 4 * 3 + 16.0 * 2 * 10);  // row scales + 2 column scales per column
  const auto rcg = arbllm::ledger(4, 10, 4, {1, 2, 1}, Method::arb_rc, true);
  EXPECT_DOUBLE_EQ(rcg.scales, 16.0 * 6 * 4 * 3 + 16.0 * (2 * 10 + 2 * 4));
  EXPECT_THROW(arbllm::ledger(4, 10, 4, {1, 2}, Method::arb, false), std::invalid_argument);
}

TEST(ArbLedger, LlamaSizedAllInCounts) {
  // 4096 × 4096, 3 salient columns per block: paper 1.0234 for every variant; all-in
  // ARB-LLM_X = 2 + 1 (bitmap incl. salient) … see docs/bit-accounting.md.
  using arbllm::Method;
  const std::vector<int> k(32, 3);
  const double n = 4096.0 * 4096.0, sal = 4096.0 * 96;
  const auto x = arbllm::ledger(4096, 4096, 128, k, Method::arb_x, true);
  EXPECT_DOUBLE_EQ(x.paper_per_weight(), 1.0234375);
  EXPECT_NEAR(x.all_in_per_weight(), (n + sal + 10 * 16 * 4096.0 * 32 + n + 4096) / n, 1e-12);
  const auto rc = arbllm::ledger(4096, 4096, 128, k, Method::arb_rc, true);
  EXPECT_NEAR(rc.all_in_per_weight(),
              (n + sal + 6 * 16 * 4096.0 * 32 + 16 * (2 * 4096.0 + 2 * 96) + n + 4096) / n, 1e-12);
}

}  // namespace
}  // namespace ptqlab
