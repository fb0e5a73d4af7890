// GPTQ: the shared core (grid, inverse-Hessian factor, column loop) and the gptq plugin, against
// RTN and a brute-force eager OBS loop, on hand-made and real calibration Hessians.
#include <gtest/gtest.h>

#include <random>

#include <set>

#include <Eigen/Cholesky>
#include <Eigen/LU>
#include <tbb/global_control.h>

#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/quant/calibration.hpp"
#include "ptqlab/quant/gptq.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/text_file.hpp"
#include "quantizer_test_support.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

using test::output_error;
using test::random_hessian;
using test::random_weight;
using test::run_with_hessian;

std::shared_ptr<Quantizer> quantizer(const std::string& name, const std::map<std::string, ParamValue>& params) {
  return test::make_quantizer(name, params);
}

using Eigen::Index;







TEST(Gptq, IdentityHessianEqualsRtnExactly) {
  for (const auto& params : std::vector<std::map<std::string, ParamValue>>{
           {{"bits", std::int64_t{2}}},
           {{"bits", std::int64_t{3}}, {"group_size", std::int64_t{16}}},
           {{"bits", std::int64_t{4}}, {"symmetric", true}}}) {
    const Matrix w0 = random_weight(70, 64, 1);
    Matrix a = w0, b = w0;
    const Eigen::MatrixXd I = Eigen::MatrixXd::Identity(64, 64);
    const auto bits_gptq = run_with_hessian(*quantizer("gptq", params), a, I);
    const auto bits_rtn = quantizer("rtn", params)->quantize_linear(LinearContext{}, b);
    EXPECT_EQ(a, b);  // with U diagonal there is no error feedback: GPTQ is RTN
    EXPECT_EQ(bits_gptq.all_in(), bits_rtn.all_in());
  }
}

// The eager form of GPTQ/OBS: after each column, update every later column (no blocks), with
// U recomputed here independently of prepare_inverse_hessian.
Matrix eager_obs(Matrix w, const Eigen::MatrixXd& H, int bits, double percdamp) {
  Eigen::MatrixXd Hd = H;
  Hd.diagonal().array() += percdamp * H.diagonal().mean();
  const Eigen::MatrixXd Hinv = Hd.inverse();
  const Eigen::MatrixXd U = Eigen::LLT<Eigen::MatrixXd>(Hinv).matrixU();
  UniformGrid grid(bits, false);
  grid.fit(w);
  for (Index i = 0; i < w.cols(); ++i) {
    for (Index r = 0; r < w.rows(); ++r) {
      const float q = grid.quantize(r, w(r, i));
      const double e = (w(r, i) - q) / U(i, i);
      w(r, i) = q;
      for (Index j = i + 1; j < w.cols(); ++j) w(r, j) -= static_cast<float>(e * U(i, j));
    }
  }
  return w;
}

TEST(Gptq, LazyBlocksEqualEagerObs) {
  const Matrix w0 = random_weight(10, 24, 2);
  const auto H = random_hessian(24, 200, 3);
  const Matrix expected = eager_obs(w0, H, 3, 0.01);
  for (const std::int64_t block : {1, 5, 8, 128}) {
    Matrix w = w0;
    run_with_hessian(*quantizer("gptq", {{"bits", std::int64_t{3}}, {"block_size", block}}), w, H);
    EXPECT_LT((w - expected).cwiseAbs().maxCoeff(), 1e-5) << "block " << block;
  }
}

TEST(Gptq, LowerOutputErrorThanRtnOnRealCalibrationData) {
  // Real inputs: the four layer-1 inputs of stories260K on 16 TinyStories calibration windows.
  const auto model = load_model(test::model_dir("stories260K"));
  const auto hessians = test::real_layer_hessians(model, 1);
  for (auto which : {Linear::q_proj, Linear::o_proj, Linear::gate_proj, Linear::down_proj}) {
    const Eigen::MatrixXd& H = hessians[static_cast<int>(input_of(which))];
    for (const std::int64_t bits : {2, 3, 4}) {
      const Matrix& w0 = model.layers[1].linear(which);
      Matrix g = w0, r = w0;
      run_with_hessian(*quantizer("gptq", {{"bits", bits}}), g, H);
      quantizer("rtn", {{"bits", bits}})->quantize_linear(LinearContext{}, r);
      EXPECT_LT(output_error(w0, g, H), output_error(w0, r, H)) << linear_name(which) << " " << bits << " bits";
    }
  }
}

TEST(Gptq, DeadInputsAreZeroedAndSkipped) {
  Matrix w = random_weight(8, 6, 4);
  Eigen::MatrixXd H = random_hessian(6, 50, 5);
  H.row(2).setZero();
  H.col(2).setZero();
  Matrix w2 = w;
  const auto f = prepare_inverse_hessian(H, w2, 0.01, "test");
  ASSERT_EQ(f.dead.size(), 1u);
  EXPECT_EQ(f.dead[0], 2);
  EXPECT_TRUE(w2.col(2).isZero());
  EXPECT_EQ(f.retries, 0);
  run_with_hessian(*quantizer("gptq", {{"bits", std::int64_t{4}}}), w, H);
  EXPECT_TRUE(w.col(2).isZero());
}

TEST(Gptq, DampeningIsIncreasedUntilTheFactorisationWorks) {
  // Rank-deficient H (4 tokens for 12 inputs) with no dampening: Cholesky fails, then succeeds
  // once dampening is raised from 0 to 1e-6.
  const auto H = random_hessian(12, 4, 6);
  Matrix w = random_weight(5, 12, 7);
  const auto f = prepare_inverse_hessian(H, w, 0.0, "layer 3 q_proj");
  EXPECT_GE(f.retries, 1);
  EXPECT_GT(f.percdamp, 0.0);
  EXPECT_TRUE(f.U.allFinite());
  // The gptq plugin logs the dampening it ended with.
  class Log : public TensorLog {
   public:
    bool enabled() const override { return false; }
    void tensor(const std::string&, const Matrix&) override {}
    void series(const std::string& path, std::vector<double> v) override { logged[path] = v; }
    std::map<std::string, std::vector<double>> logged;
  } log;
  LinearContext ctx;
  ctx.hessian = [&H]() -> const Eigen::MatrixXd& { return H; };
  ctx.log = &log;
  ctx.log_prefix = "layer3/q_proj";
  quantizer("gptq", {{"percdamp", 0.0}})->quantize_linear(ctx, w);
  ASSERT_TRUE(log.logged.count("layer3/q_proj/percdamp"));
  EXPECT_GT(log.logged["layer3/q_proj/percdamp"][0], 0.0);
}

TEST(Gptq, HopelessHessianIsAClearErrorNamingTheLayer) {
  Eigen::MatrixXd H = -Eigen::MatrixXd::Identity(6, 6);  // negative definite: no dampening helps enough
  H(0, 0) = -1e12;
  Matrix w = random_weight(3, 6, 8);
  try {
    prepare_inverse_hessian(H, w, 0.01, "layer 2 down_proj", 3);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find("layer 2 down_proj: the Hessian is not positive definite"), std::string::npos) << msg;
    EXPECT_NE(msg.find("after 3 increases"), std::string::npos) << msg;
  }
  Eigen::MatrixXd bad = Eigen::MatrixXd::Identity(6, 6);
  bad(1, 1) = std::nan("");
  EXPECT_THROW(prepare_inverse_hessian(bad, w, 0.01, "x"), Error);
}

TEST(Gptq, ActOrderQuantizesOnTheSameGridAndHelpsOnSkewedHessians) {
  // One input with a huge activation scale: act-order handles it first.
  Eigen::MatrixXd H = random_hessian(32, 400, 9);
  H.row(20) *= 30.0;
  H.col(20) *= 30.0;
  const Matrix w0 = random_weight(40, 32, 10);
  Matrix plain = w0, ordered = w0;
  run_with_hessian(*quantizer("gptq", {{"bits", std::int64_t{2}}}), plain, H);
  run_with_hessian(*quantizer("gptq", {{"bits", std::int64_t{2}}, {"act_order", true}}), ordered, H);
  EXPECT_NE(plain, ordered);
  // Every row still uses at most 4 distinct values (one 2-bit grid per row).
  for (Index r = 0; r < ordered.rows(); ++r) {
    std::set<float> levels(ordered.row(r).data(), ordered.row(r).data() + ordered.cols());
    EXPECT_LE(levels.size(), 4u);
  }
  EXPECT_LE(output_error(w0, ordered, H), output_error(w0, plain, H) * 1.05);
}

TEST(Gptq, BitLedgerByHand) {
  Matrix w = random_weight(8, 20, 11);
  const Eigen::MatrixXd I = Eigen::MatrixXd::Identity(20, 20);
  const auto b = run_with_hessian(
      *quantizer("gptq", {{"bits", std::int64_t{3}}, {"group_size", std::int64_t{8}}, {"act_order", true}}), w, I);
  // 160 weights x 3 bits; 3 groups per row (8, 8, 4) x 8 rows = 24 groups: FP16 scale + 3-bit zero;
  // act-order with groups stores a 32-bit group index per input column.
  EXPECT_EQ(b.weights, 160);
  EXPECT_DOUBLE_EQ(b.payload, 480.0);
  EXPECT_DOUBLE_EQ(b.scales, 24 * 16.0);
  EXPECT_DOUBLE_EQ(b.zeros, 24 * 3.0);
  EXPECT_DOUBLE_EQ(b.masks, 20 * 32.0);
  EXPECT_DOUBLE_EQ(b.paper_per_weight(), 3.0);
}

TEST(Gptq, SharedFactorIsComputedOncePerInputAndGivesTheSameWeights) {
  Eigen::MatrixXd H = random_hessian(40, 300, 14);
  H.row(7).setZero();
  H.col(7).setZero();  // a dead input: every linear reading it gets that column zeroed
  InverseFactorCache factors;
  const auto a = factors.get(0, H, 0.01, "layer 0 q_proj");
  EXPECT_EQ(factors.get(0, H, 0.01, "layer 0 k_proj"), a);   // same input, same dampening: shared
  EXPECT_NE(factors.get(0, H, 0.1, "layer 0 k_proj"), a);    // another dampening: its own
  EXPECT_NE(factors.get(1, H, 0.01, "layer 0 o_proj"), a);   // another input: its own
  EXPECT_EQ(factors.size(), 3u);
  for (const std::string name : {"gptq", "pbllm", "billm"}) {
    auto q = quantizer(name, {});
    for (std::uint64_t seed : {15, 16}) {  // two linears on the same input
      const Matrix w0 = random_weight(30, 40, seed);
      Matrix own = w0, shared = w0;
      run_with_hessian(*q, own, H);
      LinearContext ctx;
      ctx.hessian = [&H]() -> const Eigen::MatrixXd& { return H; };
      ctx.inverse_factor = [&](double percdamp, const std::string& what) { return factors.get(0, H, percdamp, what); };
      q->quantize_linear(ctx, shared);
      EXPECT_EQ(own, shared) << name;
      if (name == "gptq") EXPECT_TRUE(shared.col(7).isZero());  // binarizers map a zeroed column to ±α
    }
  }
  EXPECT_EQ(factors.size(), 3u);  // all three quantizers used the cached 0.01 factor of input 0
  // A cached factor of another width is an error naming the linear.
  LinearContext ctx;
  ctx.inverse_factor = [&](double percdamp, const std::string& what) { return factors.get(0, H, percdamp, what); };
  Matrix narrow = random_weight(3, 20, 17);
  EXPECT_THROW(inverse_hessian_factor(ctx, narrow, 0.01, "layer 0 v_proj"), Error);
}

TEST(Gptq, RowParallelLoopIsDeterministic) {
  const Matrix w0 = random_weight(300, 48, 12);
  const auto H = random_hessian(48, 300, 13);
  Matrix a = w0, b = w0;
  run_with_hessian(*quantizer("gptq", {{"bits", std::int64_t{2}}}), a, H);
  {
    tbb::global_control one(tbb::global_control::max_allowed_parallelism, 1);
    run_with_hessian(*quantizer("gptq", {{"bits", std::int64_t{2}}}), b, H);
  }
  EXPECT_EQ(a, b);
}

}  // namespace
}  // namespace ptqlab
