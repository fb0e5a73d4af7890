// The dense kernels of the Hessian pipeline: the tiled Hessian accumulation (accumulate_gram)
// against a double-precision product, the blocked parallel kernels of the inverse-Hessian factor
// (ptqlab/cholesky.hpp) against Eigen's unblocked LLT, and the factor's float32 path against its
// float64 path on synthetic and real (stories260K calibration) Hessians. Small blocks force the
// blocked code at small sizes.
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include <Eigen/Cholesky>
#include <Eigen/Eigenvalues>
#include <tbb/global_control.h>

#include "ptqlab/quant/calibration.hpp"
#include "ptqlab/quant/cholesky.hpp"
#include "ptqlab/quant/gptq.hpp"
#include "quantizer_test_support.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

using Eigen::Index;
using test::random_hessian;
using test::random_weight;

TEST(Gram, TiledAccumulationMatchesADoubleProduct) {
  // 300 inputs: two 256-tiles (one partial) and their off-diagonal tile.
  const Matrix x = random_weight(70, 300, 20) * 10.0f, y = random_weight(50, 300, 21);
  Eigen::MatrixXd sum = Eigen::MatrixXd::Zero(300, 300);
  accumulate_gram(x, sum);
  accumulate_gram(y, sum);
  const Eigen::MatrixXd xd = x.cast<double>(), yd = y.cast<double>();
  const Eigen::MatrixXd expected = xd.transpose() * xd + yd.transpose() * yd;
  EXPECT_LT((sum - expected).cwiseAbs().maxCoeff() / expected.cwiseAbs().maxCoeff(), 1e-6);
  EXPECT_EQ(sum, sum.transpose());  // exactly symmetric
  Eigen::MatrixXd one = Eigen::MatrixXd::Zero(300, 300);
  {
    tbb::global_control single(tbb::global_control::max_allowed_parallelism, 1);
    accumulate_gram(x, one);
    accumulate_gram(y, one);
  }
  EXPECT_EQ(sum, one);
}

TEST(Gram, UpToOneTileItIsOneFloatGemm) {
  const Matrix x = random_weight(40, 172, 22);
  Eigen::MatrixXd sum = Eigen::MatrixXd::Ones(172, 172);
  accumulate_gram(x, sum);
  Eigen::MatrixXf xtx(172, 172);
  xtx.noalias() = x.transpose() * x;
  EXPECT_EQ(sum, (Eigen::MatrixXd::Ones(172, 172) + xtx.cast<double>()).eval());
}

template <class Scalar>
DenseMatrix<Scalar> lower_of(const DenseMatrix<Scalar>& a) {
  return a.template triangularView<Eigen::Lower>();
}

template <class Scalar>
void check_blocked_cholesky(double tolerance) {
  // 100 inputs in blocks of 16 (7 steps, the last one partial); and one block larger than n.
  const DenseMatrix<Scalar> a = random_hessian(100, 150, 1).cast<Scalar>();
  const DenseMatrix<Scalar> expected = Eigen::LLT<DenseMatrix<Scalar>>(a).matrixL();
  for (const Index block : {16, 37, 128}) {
    DenseMatrix<Scalar> l = a;
    ASSERT_TRUE(cholesky_lower_in_place(l, block)) << block;
    const DenseMatrix<Scalar> got = lower_of(l);
    EXPECT_LT((got - expected).cwiseAbs().maxCoeff() / expected.cwiseAbs().maxCoeff(), tolerance) << block;
    // The strict upper triangle is left as it was.
    EXPECT_EQ(DenseMatrix<Scalar>(l.template triangularView<Eigen::StrictlyUpper>()),
              DenseMatrix<Scalar>(a.template triangularView<Eigen::StrictlyUpper>()));
    // L Lᵀ reproduces a.
    EXPECT_LT(((got * got.transpose()) - a).cwiseAbs().maxCoeff() / a.cwiseAbs().maxCoeff(), tolerance) << block;
  }
  // One block covering the matrix is Eigen's LLT itself, bit for bit.
  DenseMatrix<Scalar> l = a;
  ASSERT_TRUE(cholesky_lower_in_place(l, 128));
  EXPECT_EQ(lower_of(l), expected);
}

TEST(Cholesky, BlockedEqualsEigenLltInBothPrecisions) {
  check_blocked_cholesky<double>(1e-13);
  check_blocked_cholesky<float>(1e-4);
}

TEST(Cholesky, NotPositiveDefiniteInALaterBlockIsReported) {
  Eigen::MatrixXd a = random_hessian(60, 100, 2);
  a(50, 50) = -1.0;  // the pivot of row 50 (block 3 of 16) goes negative
  Eigen::MatrixXd l = a;
  EXPECT_FALSE(cholesky_lower_in_place(l, 16));
  l = a;
  EXPECT_FALSE(cholesky_lower_in_place(l, 64));
}

TEST(Cholesky, TriangularInverseTimesFactorIsIdentity) {
  const Eigen::MatrixXd a = random_hessian(90, 150, 3);
  const Eigen::MatrixXd l = Eigen::LLT<Eigen::MatrixXd>(a).matrixL();
  for (const Index block : {8, 32, 200}) {
    const Eigen::MatrixXd inv = lower_triangular_inverse(l, block);
    EXPECT_TRUE(inv.triangularView<Eigen::StrictlyUpper>().toDenseMatrix().isZero(0.0));
    EXPECT_LT((inv * l - Eigen::MatrixXd::Identity(90, 90)).cwiseAbs().maxCoeff(), 1e-12) << block;
  }
}

TEST(Cholesky, BlockedKernelsDoNotDependOnTheThreadCount) {
  const Eigen::MatrixXf a = random_hessian(120, 200, 4).cast<float>();
  Eigen::MatrixXf many = a, one = a;
  ASSERT_TRUE(cholesky_lower_in_place(many, 16));
  const Eigen::MatrixXf inv_many = lower_triangular_inverse(many, 16);
  Eigen::MatrixXf inv_one;
  {
    tbb::global_control single(tbb::global_control::max_allowed_parallelism, 1);
    ASSERT_TRUE(cholesky_lower_in_place(one, 16));
    inv_one = lower_triangular_inverse(one, 16);
  }
  EXPECT_EQ(many, one);
  EXPECT_EQ(inv_many, inv_one);
}

// max |U32 - U64| / max |U64| and the identity check Uᵀ U (H + λI) = I for the float32 factor.
// Measured: 1.6e-6 and 5.4e-6 on the synthetic Hessians, 0.9e-7 to 3.1e-7 on the real ones; the
// identity within 2.1e-5 (synthetic) and 7.9e-7 (real).
void compare_precisions(const Eigen::MatrixXd& H, Index block, double tolerance, const std::string& what) {
  Matrix w = random_weight(4, H.cols(), 5);
  const auto f64 = prepare_inverse_hessian(H, w, 0.01, what, 6, {FactorPrecision::float64, block});
  const auto f32 = prepare_inverse_hessian(H, w, 0.01, what, 6, {FactorPrecision::float32, block});
  EXPECT_EQ(f32.retries, 0) << what;
  const double rel = (f32.U - f64.U).cwiseAbs().maxCoeff() / f64.U.cwiseAbs().maxCoeff();
  EXPECT_LT(rel, tolerance) << what;
  EXPECT_GT(rel, 0.0) << what;  // the two paths did run in different precisions
  Eigen::MatrixXd Hd = H;
  Hd.diagonal().array() += 0.01 * H.diagonal().mean();
  const Eigen::MatrixXd id = f32.U.transpose() * f32.U * Hd;
  EXPECT_LT((id - Eigen::MatrixXd::Identity(H.cols(), H.cols())).cwiseAbs().maxCoeff(), 50 * tolerance) << what;
}

TEST(InverseHessianFactor, Float32MatchesFloat64OnSyntheticHessians) {
  compare_precisions(random_hessian(200, 300, 6), 32, 1e-5, "synthetic 200 (block 32)");
  compare_precisions(random_hessian(300, 150, 7), 64, 3e-5, "synthetic rank-deficient 300 (block 64)");
}

TEST(InverseHessianFactor, Float32MatchesFloat64OnRealCalibrationHessians) {
  const auto model = load_model(test::model_dir("stories260K"));
  const auto hessians = test::real_layer_hessians(model, 1);
  for (int input = 0; input < 4; ++input)
    compare_precisions(hessians[input], 16, 2e-6, "stories260K layer 1 input " + std::to_string(input));
}

TEST(InverseHessianFactor, AutomaticPrecisionIsFloat64UpToOneBlockAndFloat32Above) {
  EXPECT_EQ(factor_precision_for(256), FactorPrecision::float64);
  EXPECT_EQ(factor_precision_for(257), FactorPrecision::float32);
  EXPECT_EQ(factor_precision_for(100, {FactorPrecision::automatic, 64}), FactorPrecision::float32);
  EXPECT_EQ(factor_precision_for(4096, {FactorPrecision::float64, 256}), FactorPrecision::float64);
  // At one block the factor is the float64 one, bit for bit.
  const Eigen::MatrixXd H = random_hessian(80, 200, 8);
  Matrix w = random_weight(3, 80, 9);
  EXPECT_EQ(prepare_inverse_hessian(H, w, 0.01, "x").U,
            prepare_inverse_hessian(H, w, 0.01, "x", 6, {FactorPrecision::float64, 256}).U);
}

TEST(InverseHessianFactor, Float32PathKeepsTheDampeningRetry) {
  // An indefinite H: its smallest eigenvalue is -0.005 mean(diag H). Dampening 0, 1e-6 ... 1e-3
  // cannot fix it and 1e-2 does: five increases, in either precision.
  Eigen::MatrixXd H = random_hessian(96, 400, 10);
  const double lambda_min = Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd>(H).eigenvalues()(0);
  H.diagonal().array() -= lambda_min + 0.005 * H.diagonal().mean();
  Matrix w = random_weight(3, 96, 11);
  for (const auto precision : {FactorPrecision::float32, FactorPrecision::float64}) {
    const auto f = prepare_inverse_hessian(H, w, 0.0, "x", 6, {precision, 32});
    EXPECT_EQ(f.retries, 5);
    EXPECT_DOUBLE_EQ(f.percdamp, 1e-2);
    EXPECT_TRUE(f.U.allFinite());
  }
}

// The per-linear output-error record against a brute-force double sum: exact algebra up to 256
// inputs, float32 products (about 6 digits) and thread-count independent above.
TEST(OutputErrorRecord, MatchesBruteForceOnBothPaths) {
  std::mt19937 rng(17);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (Eigen::Index n : {200, 300}) {
    const Eigen::Index rows = 150, tokens = 400;
    Matrix w(rows, n), wq(rows, n), x(tokens, n);
    for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = normal(rng);
    for (Eigen::Index i = 0; i < w.size(); ++i) wq.data()[i] = w.data()[i] + 0.1f * normal(rng);
    for (Eigen::Index i = 0; i < x.size(); ++i) x.data()[i] = normal(rng);
    const Eigen::MatrixXd h = 2.0 * x.cast<double>().transpose() * x.cast<double>() / static_cast<double>(tokens);
    double num = 0, den = 0;
    for (Eigen::Index r = 0; r < rows; ++r)
      for (Eigen::Index a = 0; a < n; ++a)
        for (Eigen::Index b = 0; b < n; ++b) {
          const double da = static_cast<double>(wq(r, a)) - w(r, a), db = static_cast<double>(wq(r, b)) - w(r, b);
          num += da * h(a, b) * db;
          den += static_cast<double>(w(r, a)) * h(a, b) * w(r, b);
        }
    const double want = std::sqrt(num / den);
    const double got = relative_output_error(w, wq, h);
    EXPECT_NEAR(got, want, (n <= 256 ? 1e-12 : 1e-5) * want) << n;
    // From the inputs, in two batches: the same quantity (H's 2/n cancels).
    const std::vector<Matrix> xs = {x.topRows(150), x.bottomRows(tokens - 150)};
    const double on_x = relative_output_error_on_inputs(w, wq, xs);
    EXPECT_NEAR(on_x, want, 1e-5 * want) << n;
    tbb::global_control single(tbb::global_control::max_allowed_parallelism, 1);
    EXPECT_EQ(relative_output_error(w, wq, h), got) << n;
    EXPECT_EQ(relative_output_error_on_inputs(w, wq, xs), on_x) << n;
  }
}

}  // namespace
}  // namespace ptqlab
