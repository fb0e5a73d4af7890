// PTQ1.61 without preprocessing: the activation-channel mask rule, the binary-scale
// parametrization and its chain rule (finite differences), training off = analytic binarization,
// training lowers the block loss on real calibration data, and the bit ledger formula.
#include <gtest/gtest.h>

#include <fstream>
#include <random>

#include "../plugins/quantizer/ptq161/binary_scales.hpp"
#include "ptqlab/engine/experiment.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/engine/runner.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

using ptq161::activation_channel_mask;
using ptq161::BinaryScales;

TEST(Ptq161Mask, ThresholdRuleOnHandMadeStatistics) {
  // 10 channels, ratio 0.2: t = sorted_desc[floor(0.2 * 10)] = sorted_desc[2]; a >= t is salient:
  // floor(ratio n) + 1 = 3 channels without ties.
  Eigen::VectorXf a(10);
  a << 0.5f, 9.0f, 0.1f, 3.0f, 7.0f, 0.0f, 2.0f, 1.0f, 0.3f, 0.2f;
  auto m = activation_channel_mask(a, 4, 0.2);
  const std::vector<std::uint8_t> expected = {0, 1, 0, 1, 1, 0, 0, 0, 0, 0};
  EXPECT_EQ(m.salient, expected);
  EXPECT_EQ(m.shape, SalientMask::Shape::channels);
  EXPECT_DOUBLE_EQ(m.storage_bits, 10.0);
  EXPECT_EQ(m.count(), 3 * 4);
  // Ties at the threshold are all salient; the 1e-5 clamp makes zeros tie with tiny values.
  Eigen::VectorXf ties(5);
  ties << 1.0f, 2.0f, 2.0f, 2.0f, 0.0f;
  EXPECT_EQ(activation_channel_mask(ties, 1, 0.2).salient, (std::vector<std::uint8_t>{0, 1, 1, 1, 0}));
  Eigen::VectorXf tiny(4);
  tiny << 0.0f, 1e-7f, 5.0f, 4.0f;
  EXPECT_EQ(activation_channel_mask(tiny, 1, 0.75).salient, (std::vector<std::uint8_t>{1, 1, 1, 1}));
  EXPECT_EQ(activation_channel_mask(a, 4, 0.0).count(), 0);
  // 4096 channels at ratio 0.2 keep 820 (the spec's count).
  Eigen::VectorXf big = Eigen::VectorXf::LinSpaced(4096, 1.0f, 4096.0f);
  EXPECT_EQ(activation_channel_mask(big, 1, 0.2).count(), 820);
}

Matrix random_weight(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.01f, 0.05f);
  Matrix w(rows, cols);
  for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = d(rng);
  return w;
}

TEST(Ptq161Scales, InitIsTheAnalyticBinarizationAndSalientColumnsUseTheRowGrid) {
  Matrix w(2, 4);
  w << 0.4f, -0.2f, 0.1f, 2.0f,  //
      -0.3f, 0.0f, 0.5f, -1.0f;
  const BinaryScales sc(w, {0, 0, 0, 1}, 4, true);
  // Row 0 non-salient entries 0.4, -0.2, 0.1: mu = 0.1, s = mean|w| = 0.7/3 (not mean-centred).
  EXPECT_FLOAT_EQ(sc.mu(0), 0.1f);
  EXPECT_FLOAT_EQ(sc.s(0), 0.7f / 3.0f);
  // Row 1: the exact zero is skipped in the means: -0.3, 0.5 -> mu 0.1, s 0.4; sign(0 - 0.1) = -1.
  EXPECT_FLOAT_EQ(sc.mu(1), 0.1f);
  EXPECT_FLOAT_EQ(sc.s(1), 0.4f);
  Matrix eff;
  sc.effective(eff);
  EXPECT_FLOAT_EQ(eff(0, 0), 0.7f / 3.0f + 0.1f);   // sign(0.4 - 0.1) = +1
  EXPECT_FLOAT_EQ(eff(0, 2), 0.1f);                 // sign(0.1 - 0.1) = 0: only mu
  EXPECT_FLOAT_EQ(eff(1, 1), -0.4f + 0.1f);
  // Salient column 3 on the 4-bit grid of the whole row: row 0 range [-0.2, 2] -> 2.0 exactly representable.
  UniformGrid grid(4, false);
  grid.fit(w);
  EXPECT_FLOAT_EQ(eff(0, 3), grid.quantize(0, 2.0f));
  EXPECT_FLOAT_EQ(eff(1, 3), grid.quantize(1, -1.0f));
  // Salient-only range differs.
  const BinaryScales only(w, {0, 0, 0, 1}, 4, false);
  Matrix eff2;
  only.effective(eff2);
  EXPECT_NE(eff2(1, 3), 0.0f);
}

TEST(Ptq161Scales, ChainRuleMatchesFiniteDifferences) {
  const Matrix w = random_weight(5, 7, 3);
  BinaryScales sc(w, {0, 1, 0, 0, 1, 0, 0}, 4, true);
  std::mt19937_64 rng(4);
  std::normal_distribution<float> d(0.0f, 1.0f);
  for (Eigen::Index i = 0; i < 5; ++i) {  // move away from r = 1 so every term matters
    sc.r1(i) = 1.0f + 0.3f * d(rng);
    sc.s(i) += 0.01f * d(rng);
  }
  for (Eigen::Index j = 0; j < 7; ++j) sc.r2(j) = 1.0f + 0.3f * d(rng);
  const Matrix R = random_weight(5, 7, 5);  // L = Σ R ∘ W_eff, so dL/dW_eff = R
  auto loss = [&](const BinaryScales& s) {
    Matrix e;
    s.effective(e);
    return static_cast<double>((R.array() * e.array()).sum());
  };
  Eigen::VectorXf ds = Eigen::VectorXf::Zero(5), dr1 = Eigen::VectorXf::Zero(5), dr2 = Eigen::VectorXf::Zero(7);
  sc.backward(R, ds, dr1, dr2);
  auto check = [&](Eigen::VectorXf BinaryScales::*member, const Eigen::VectorXf& analytic, const char* name) {
    for (Eigen::Index k = 0; k < analytic.size(); ++k) {
      BinaryScales plus = sc, minus = sc;
      const float h = 1e-2f;
      (plus.*member)(k) += h;
      (minus.*member)(k) -= h;
      const double fd = (loss(plus) - loss(minus)) / (2.0 * h);  // L is linear in each parameter
      EXPECT_NEAR(analytic(k), fd, 1e-4 * std::max(1.0, std::abs(fd))) << name << "[" << k << "]";
    }
  };
  check(&BinaryScales::s, ds, "s");
  check(&BinaryScales::r1, dr1, "r1");
  check(&BinaryScales::r2, dr2, "r2");
  EXPECT_EQ(dr2(1), 0.0f);  // salient columns take no gradient
  EXPECT_EQ(dr2(4), 0.0f);
}

// The runner on stories260K: analytic vs trained, each switch, the ledger.
struct Runs {
  test::TempDir dir;
  PluginRegistry registry;
  RunReport report;
  Runs(const std::string& arms, int nsamples = 16) {
    registry.add_search_path(PluginRegistry::default_plugin_dir());
    const auto yaml = dir.path() / "exp.yaml";
    std::ofstream(yaml) << "name: ptq161-test\nmodel: " << test::model_dir("stories260K").string()
                        << "\ncalibration:\n  text: " << test::data_file("tinystories/calib.txt").string()
                        << "\n  nsamples: " << nsamples << "\n  seq_len: 256\n"
                        << "eval:\n  - evaluator: perplexity\n    params: {max_windows: 8}\n    datasets:\n      tinystories: "
                        << test::data_file("tinystories/valid.txt").string() << "\narms:\n" << arms;
    RunOptions o;
    o.out_dir = dir.path() / "out";
    o.jobs = 2;
    report = run_experiment(load_experiment(yaml, registry), registry, o);
  }
  const ArmResult& arm(const std::string& name) const {
    for (const auto& a : report.arms)
      if (a.arm == name) return a.result;
    throw std::runtime_error(name);
  }
};

TEST(Ptq161Runner, TrainingOffEqualsAnalyticAndTrainingLowersTheLoss) {
  const Runs r(
      "  - name: analytic\n    quantizer: {name: ptq161, params: {learn_scales: false}}\n"
      "  - name: zero-epochs\n    quantizer: {name: ptq161, params: {epochs: 0}}\n"
      "  - name: trained\n    quantizer: {name: ptq161, params: {epochs: 5}}\n"
      "  - name: sign-centered\n    quantizer: {name: sign, params: {center: true}}\n"
      "  - name: plain\n    quantizer: {name: ptq161, params: {use_mask: false, learn_scales: false}}\n");
  ASSERT_EQ(r.report.failed(), 0);
  const auto& analytic = r.arm("analytic");
  const auto& zero = r.arm("zero-epochs");
  EXPECT_EQ(analytic.metrics, zero.metrics);  // epochs 0 is the analytic binarization
  EXPECT_TRUE(analytic.series.empty());
  // Without mask and training, ptq161's binarizer is mu + s sign(W - mu) with s = mean|W| (not
  // mean-centred): close to, but not the same as, sign centred (alpha = mean|W - mu|).
  EXPECT_NE(r.arm("plain").metrics, r.arm("sign-centered").metrics);
  // Training at the code's learning rates: one loss curve per layer, decreasing every epoch.
  // (A gradient that leaks across steps makes these curves turn upward after a few epochs.)
  const auto& trained = r.arm("trained");
  ASSERT_EQ(trained.series.size(), 5u);
  for (const auto& s : trained.series) {
    ASSERT_EQ(s.values.size(), 5u) << s.path;
    for (std::size_t e = 1; e < s.values.size(); ++e) EXPECT_LT(s.values[e], s.values[e - 1]) << s.path << " epoch " << e;
  }
  EXPECT_LT(trained.metrics.at("perplexity").at("tinystories").at("ppl"),
            analytic.metrics.at("perplexity").at("tinystories").at("ppl"));
}

TEST(Ptq161Runner, LedgerFollowsTheSpecFormula) {
  const Runs r("  - name: a\n    quantizer: {name: ptq161, params: {learn_scales: false}}\n"
               "  - name: t\n    quantizer: {name: ptq161, params: {epochs: 1}}\n", 4);
  // q_proj of stories260K: 64 x 64, k = floor(0.2 * 64) + 1 = 13 salient columns (no ties expected).
  const auto& t = r.arm("t").linears[0];
  EXPECT_EQ(t.linear, "q_proj");
  const double rows = 64, cols = 64, k = 13;
  EXPECT_DOUBLE_EQ(t.bits.payload, rows * (cols - k) + 4 * rows * k);
  EXPECT_DOUBLE_EQ(t.bits.masks, cols);
  // Trained: per row a, c, Δ, z and per column r2, all FP16: 16 (4 rows + cols) (ptq161.md §7).
  EXPECT_DOUBLE_EQ(t.bits.scales + t.bits.zeros, 16 * (4 * rows + cols));
  // Analytic: r2 is 1 and not stored.
  const auto& a = r.arm("a").linears[0];
  EXPECT_DOUBLE_EQ(a.bits.scales + a.bits.zeros, 16 * (4 * rows));
}

TEST(Ptq161Runner, SwitchesAndErrors) {
  const Runs r("  - name: no-nlc\n    quantizer: {name: ptq161, params: {epochs: 1, nlc: false}}\n"
               "  - name: fq-only\n    quantizer: {name: ptq161, params: {epochs: 1, target_fp: false}}\n"
               "  - name: fp-only\n    quantizer: {name: ptq161, params: {epochs: 1, target_fq: false}}\n"
               "  - name: masked-arm\n    mask: {name: activation-channels, params: {ratio: 0.2}}\n"
               "    quantizer: {name: ptq161, params: {learn_scales: false}}\n"
               "  - name: own-mask\n    quantizer: {name: ptq161, params: {learn_scales: false}}\n"
               "  - name: bad\n    quantizer: {name: ptq161, params: {epochs: 1, target_fp: false, target_fq: false}}\n",
               4);
  for (const char* a : {"no-nlc", "fq-only", "fp-only"}) EXPECT_EQ(r.arm(a).status, "ok") << a;
  EXPECT_NE(r.arm("no-nlc").metrics, r.arm("fq-only").metrics);
  // The activation-channels mask plugin gives the same model as ptq161's own mask.
  EXPECT_EQ(r.arm("masked-arm").metrics, r.arm("own-mask").metrics);
  EXPECT_EQ(r.arm("bad").status, "failed");
  EXPECT_NE(r.arm("bad").failure.find("needs at least one target"), std::string::npos) << r.arm("bad").failure;
}

}  // namespace
}  // namespace ptqlab
