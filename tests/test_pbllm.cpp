// PB-LLM (quantizer "pbllm") and the salient-mask plugins (magnitude, hessian-elementwise,
// hessian-salience): the binarizer's closed form against brute force and hand-computed values,
// the masks on hand-made weights and Hessians, GPTQ's lazy blocks against an eager OBS loop with
// the mixed per-element quantizer, the bit ledger by hand, and arms on the real stories260K.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <iostream>
#include <limits>
#include <numeric>
#include <random>
#include <set>

#include <Eigen/Cholesky>
#include <Eigen/LU>
#include <tbb/global_control.h>

#include "ptqlab/engine/experiment.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/engine/runner.hpp"
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

std::shared_ptr<Quantizer> quantizer(const std::string& name, const std::map<std::string, ParamValue>& params = {}) {
  return test::make_quantizer(name, params);
}
std::shared_ptr<Mask> mask_plugin(const std::string& name, const std::map<std::string, ParamValue>& params = {}) {
  return test::make_mask(name, params);
}

using Eigen::Index;
using ParamMap = std::map<std::string, ParamValue>;





class RecordingLog : public TensorLog {
 public:
  bool enabled() const override { return true; }
  void tensor(const std::string& path, const Matrix& value) override { tensors[path] = value; }
  void series(const std::string& path, std::vector<double> v) override { series_[path] = std::move(v); }
  std::map<std::string, Matrix> tensors;
  std::map<std::string, std::vector<double>> series_;
};

LinearContext context(const Eigen::MatrixXd& H, const SalientMask* mask = nullptr, TensorLog* log = nullptr) {
  LinearContext ctx;
  ctx.layer = 3;
  ctx.which = Linear::q_proj;
  ctx.hessian = [&H]() -> const Eigen::MatrixXd& { return H; };
  ctx.mask = mask;
  ctx.log = log;
  ctx.log_prefix = "layer3/q_proj";
  return ctx;
}

SalientMask element_mask(Index rows, Index cols, const std::vector<std::pair<Index, Index>>& salient = {}) {
  SalientMask m;
  m.shape = SalientMask::Shape::elements;
  m.rows = rows;
  m.cols = cols;
  m.salient.assign(static_cast<std::size_t>(rows * cols), 0);
  for (auto [r, c] : salient) m.salient[static_cast<std::size_t>(r * cols + c)] = 1;
  return m;
}

std::set<std::pair<Index, Index>> salient_set(const SalientMask& m) {
  std::set<std::pair<Index, Index>> out;
  for (Index r = 0; r < m.rows; ++r)
    for (Index c = 0; c < m.cols; ++c)
      if (m.at(r, c)) out.insert({r, c});
  return out;
}


// ---- the binarizer ------------------------------------------------------------------------------

TEST(PbllmBinarizer, ClosedFormScaleIsTheL2OptimumForFixedSigns) {
  // No salient weight and an identity Hessian (U diagonal: no compensation): every row becomes
  // μ ± α. For the signs s = sgn(w − μ), α = mean |w − μ| minimises Σ (w − μ − a·s)² over a; a fine
  // scan of a confirms it, and μ is the row mean.
  const Index rows = 6, cols = 24;
  const Matrix w0 = random_weight(rows, cols, 21);
  const Eigen::MatrixXd I = Eigen::MatrixXd::Identity(cols, cols);
  const auto none = element_mask(rows, cols);
  Matrix q = w0;
  quantizer("pbllm")->quantize_linear(context(I, &none), q);
  for (Index r = 0; r < rows; ++r) {
    const double hi = q.row(r).maxCoeff(), lo = q.row(r).minCoeff();
    const double mu = (hi + lo) / 2, alpha = (hi - lo) / 2;
    EXPECT_NEAR(mu, w0.row(r).cast<double>().mean(), 1e-6);
    auto err = [&](double a) {
      double e = 0;
      for (Index c = 0; c < cols; ++c) {
        const double d = w0(r, c) - mu, s = d > 0 ? 1.0 : (d < 0 ? -1.0 : 0.0);
        e += (d - a * s) * (d - a * s);
      }
      return e;
    };
    double best_a = 0, best = std::numeric_limits<double>::infinity();
    const double step = 1e-5;
    for (double a = 0; a <= 0.2; a += step)
      if (err(a) < best) best = err(a), best_a = a;
    EXPECT_NEAR(alpha, best_a, step) << "row " << r;
    EXPECT_LE(err(alpha), best + 1e-9);
  }
}

TEST(PbllmBinarizer, BinarizedOnlyStatisticsAreTheL2OptimumOnTheBinarizedWeights) {
  // binary_stats: binarized_only (the paper, Eq. 9): μ and α from the binarized entries only, so α
  // is again the L2 optimum for fixed signs on exactly those entries.
  const Index rows = 4, cols = 20;
  const Matrix w0 = random_weight(rows, cols, 22);
  const Eigen::MatrixXd I = Eigen::MatrixXd::Identity(cols, cols);
  const auto mask = element_mask(rows, cols, {{0, 1}, {0, 7}, {1, 3}, {2, 0}, {2, 19}, {3, 5}});
  Matrix q = w0;
  quantizer("pbllm", {{"binary_stats", std::string("binarized_only")}})->quantize_linear(context(I, &mask), q);
  for (Index r = 0; r < rows; ++r) {
    std::vector<double> v, out;
    for (Index c = 0; c < cols; ++c)
      if (!mask.at(r, c)) v.push_back(w0(r, c)), out.push_back(q(r, c));
    const double mu = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
    const double hi = *std::max_element(out.begin(), out.end()), lo = *std::min_element(out.begin(), out.end());
    EXPECT_NEAR((hi + lo) / 2, mu, 1e-6);
    const double alpha = (hi - lo) / 2;
    auto err = [&](double a) {
      double e = 0;
      for (double x : v) {
        const double d = x - mu, s = d > 0 ? 1.0 : (d < 0 ? -1.0 : 0.0);
        e += (d - a * s) * (d - a * s);
      }
      return e;
    };
    double best_a = 0, best = std::numeric_limits<double>::infinity();
    const double step = 1e-5;
    for (double a = 0; a <= 0.2; a += step)
      if (err(a) < best) best = err(a), best_a = a;
    EXPECT_NEAR(alpha, best_a, step) << "row " << r;
  }
}

TEST(PbllmBinarizer, CodeStatisticsCountSalientZerosByHand) {
  // Row 0 = [1, -2, 3, 9] with (0, 3) salient. The code (zeroed_row) fits the binarizer on
  // V = [1, -2, 3, 0] over all 4 columns: μ = 2/4 = 0.5, α = (0.5 + 2.5 + 2.5 + 0.5)/4 = 1.5, so
  // 1 -> 2, -2 -> -1, 3 -> 2. The salient 9 goes to the 8-bit grid of the whole row [-2, 9]:
  // scale 11/255, zero round(2/scale) = round(46.36) = 46, code round(9/scale) + 46 = 209 + 46,
  // value 209 · 11/255.
  // Row 1 = [2, 0, 4, 2], nothing salient: μ = 2, α = 1; sgn(0) = 0 keeps the mean: [2, 1, 3, 2].
  Matrix w(2, 4);
  w << 1, -2, 3, 9, 2, 0, 4, 2;
  const Eigen::MatrixXd I = Eigen::MatrixXd::Identity(4, 4);
  const auto mask = element_mask(2, 4, {{0, 3}});
  for (const bool rtn : {false, true}) {
    Matrix q = w;
    quantizer("pbllm", {{"disable_gptq", rtn}})->quantize_linear(context(I, &mask), q);
    Matrix expected(2, 4);
    expected << 2, -1, 2, 209.0f * (11.0f / 255.0f), 2, 1, 3, 2;
    for (Index i = 0; i < q.size(); ++i) EXPECT_FLOAT_EQ(q.data()[i], expected.data()[i]) << i << " rtn " << rtn;
  }
  // The paper's statistics (binarized_only), over the 3 binarized entries: μ = 2/3,
  // α = (1/3 + 8/3 + 7/3)/3 = 16/9: 1 -> 22/9, -2 -> -10/9, 3 -> 22/9.
  Matrix q = w;
  quantizer("pbllm", {{"binary_stats", std::string("binarized_only")}})->quantize_linear(context(I, &mask), q);
  EXPECT_FLOAT_EQ(q(0, 0), 22.0f / 9.0f);
  EXPECT_FLOAT_EQ(q(0, 1), -10.0f / 9.0f);
  EXPECT_FLOAT_EQ(q(0, 2), 22.0f / 9.0f);
  EXPECT_FLOAT_EQ(q(1, 1), 1.0f);
}

// ---- the quantizer --------------------------------------------------------------------------------

TEST(PbllmQuantizer, IdentityHessianAndEmptyMaskIsPlainBinarization) {
  // U diagonal: no compensation; no salient weight: per-row μ + α·sgn(w − μ) with μ = mean,
  // α = mean |w − μ|, which is the sign quantizer with center: true.
  const Index rows = 70, cols = 64;
  const Matrix w0 = random_weight(rows, cols, 23);
  const Eigen::MatrixXd I = Eigen::MatrixXd::Identity(cols, cols);
  const auto none = element_mask(rows, cols);
  Matrix sign = w0;
  quantizer("sign", {{"center", true}})->quantize_linear(LinearContext{}, sign);
  for (const bool rtn : {false, true}) {
    Matrix q = w0;
    quantizer("pbllm", {{"disable_gptq", rtn}})->quantize_linear(context(I, &none), q);
    EXPECT_LT((q - sign).cwiseAbs().maxCoeff(), 1e-6f) << "rtn " << rtn;
    for (Index r = 0; r < rows; ++r) {
      const double mu = w0.row(r).cast<double>().mean();
      const double alpha = (w0.row(r).cast<double>().array() - mu).abs().mean();
      for (Index c = 0; c < cols; ++c)
        EXPECT_NEAR(q(r, c), mu + (w0(r, c) > mu ? alpha : -alpha), 1e-6) << r << "," << c;
    }
  }
}

// Eager OBS with PB-LLM's per-element quantizer, written out independently: mask fixed, the
// 8-bit grid from the original rows, the binarizer (code statistics) from the rows with salient
// entries zeroed, then every column's error fed to all later columns at once.
Matrix eager_pb_obs(Matrix w, const Eigen::MatrixXd& H, const SalientMask& mask, double percdamp) {
  UniformGrid grid(8, false);
  grid.fit(w);
  Eigen::VectorXd mu(w.rows()), alpha(w.rows());
  for (Index r = 0; r < w.rows(); ++r) {
    double s = 0;
    for (Index c = 0; c < w.cols(); ++c) s += mask.at(r, c) ? 0.0 : w(r, c);
    mu(r) = static_cast<float>(s / static_cast<double>(w.cols()));
    double a = 0;
    for (Index c = 0; c < w.cols(); ++c) a += std::abs((mask.at(r, c) ? 0.0f : w(r, c)) - static_cast<float>(mu(r)));
    alpha(r) = static_cast<float>(a / static_cast<double>(w.cols()));
  }
  Eigen::MatrixXd Hd = H;
  Hd.diagonal().array() += percdamp * H.diagonal().mean();
  const Eigen::MatrixXd U = Eigen::LLT<Eigen::MatrixXd>(Eigen::MatrixXd(Hd.inverse())).matrixU();
  for (Index i = 0; i < w.cols(); ++i)
    for (Index r = 0; r < w.rows(); ++r) {
      const float x = w(r, i);
      const float m = static_cast<float>(mu(r));
      const float q = mask.at(r, i) ? grid.quantize(r, x)
                                    : m + static_cast<float>(alpha(r)) * (x > m ? 1.0f : (x < m ? -1.0f : 0.0f));
      const double e = (x - q) / U(i, i);
      w(r, i) = q;
      for (Index j = i + 1; j < w.cols(); ++j) w(r, j) -= static_cast<float>(e * U(i, j));
    }
  return w;
}

TEST(PbllmQuantizer, LazyBlocksEqualEagerObsWithTheMixedQuantizer) {
  const Index rows = 12, cols = 30;
  const Matrix w0 = random_weight(rows, cols, 24);
  const auto H = random_hessian(cols, 300, 25);
  std::vector<std::pair<Index, Index>> picks;
  std::mt19937_64 rng(26);
  for (int i = 0; i < 40; ++i) picks.push_back({static_cast<Index>(rng() % rows), static_cast<Index>(rng() % cols)});
  const auto mask = element_mask(rows, cols, picks);
  const Matrix expected = eager_pb_obs(w0, H, mask, 0.01);
  for (const std::int64_t block : {1, 7, 128}) {
    Matrix w = w0;
    quantizer("pbllm", {{"block_size", block}})->quantize_linear(context(H, &mask), w);
    EXPECT_LT((w - expected).cwiseAbs().maxCoeff(), 2e-5) << "block " << block;
  }
}

TEST(PbllmQuantizer, ChannelMaskKeepsWholeColumnsOnTheHighGrid) {
  const Index rows = 5, cols = 16;
  Matrix w0 = random_weight(rows, cols, 27);
  const Eigen::MatrixXd I = Eigen::MatrixXd::Identity(cols, cols);
  SalientMask m;
  m.shape = SalientMask::Shape::channels;
  m.rows = rows;
  m.cols = cols;
  m.salient.assign(cols, 0);
  m.salient[3] = m.salient[11] = 1;
  Matrix q = w0;
  quantizer("pbllm", {{"high_bits", std::int64_t{4}}})->quantize_linear(context(I, &m), q);
  UniformGrid grid(4, false);
  grid.fit(w0);
  for (Index r = 0; r < rows; ++r) {
    std::set<float> binary;
    for (Index c = 0; c < cols; ++c) {
      if (m.salient[c])
        EXPECT_EQ(q(r, c), grid.quantize(r, w0(r, c)));
      else
        binary.insert(q(r, c));
    }
    EXPECT_LE(binary.size(), 2u);
  }
}

TEST(PbllmQuantizer, GptqLowersTheOutputErrorOnARealHessian) {
  // Real inputs: layer-1 inputs of stories260K on 16 TinyStories calibration windows.
  const auto model = load_model(test::model_dir("stories260K"));
  const auto hessians = test::real_layer_hessians(model, 1);
  for (auto which : kAllLinears) {
    const Eigen::MatrixXd& H = hessians[static_cast<int>(input_of(which))];
    for (const char* metric : {"hessian", "magnitude"}) {
      const Matrix& w0 = model.layers[1].linear(which);
      Matrix g = w0, r = w0;
      quantizer("pbllm", {{"salient_metric", std::string(metric)}})->quantize_linear(context(H), g);
      quantizer("pbllm", {{"salient_metric", std::string(metric)}, {"disable_gptq", true}})
          ->quantize_linear(context(H), r);
      const double eg = output_error(w0, g, H), er = output_error(w0, r, H);
      EXPECT_LT(eg, er) << linear_name(which) << " " << metric;
    }
  }
}

TEST(PbllmQuantizer, OwnMaskIsPbLlmsRuleAndEqualsTheMaskPlugins) {
  const Index rows = 70, cols = 64;  // 4480 weights: floor(4480 · 0.9) = 4032, so 4480 − 4033 = 447 salient
  const Matrix w0 = random_weight(rows, cols, 28);
  const auto H = random_hessian(cols, 500, 29);
  for (const char* metric : {"hessian", "magnitude"}) {
    RecordingLog log;
    Matrix own = w0;
    const auto bits_own = quantizer("pbllm", {{"salient_metric", std::string(metric)}})
                              ->quantize_linear(context(H, nullptr, &log), own);
    ASSERT_TRUE(log.tensors.count("layer3/q_proj/mask"));
    const Matrix& logged = log.tensors["layer3/q_proj/mask"];
    EXPECT_EQ(logged.sum(), 447.0f) << metric;
    EXPECT_TRUE(log.series_.count("layer3/q_proj/gptq_loss"));
    EXPECT_DOUBLE_EQ(bits_own.masks, 4480.0);  // its own bitmap

    // The same mask from the plugin (ratio 0.1 = 1 − low_frac): the same weights, the same bits
    // once the engine adds the plugin's storage.
    const auto plugin = mask_plugin(std::string(metric) == "hessian" ? "hessian-elementwise" : "magnitude");
    const auto m = plugin->select(context(H), w0);
    EXPECT_EQ(m.count(), 447) << metric;
    for (Index r = 0; r < rows; ++r)
      for (Index c = 0; c < cols; ++c) EXPECT_EQ(m.at(r, c), logged(r, c) != 0.0f);
    Matrix ext = w0;
    auto bits_ext = quantizer("pbllm")->quantize_linear(context(H, &m), ext);
    EXPECT_EQ(ext, own) << metric;
    EXPECT_DOUBLE_EQ(bits_ext.masks, 0.0);
    bits_ext.masks += m.storage_bits;
    EXPECT_DOUBLE_EQ(bits_ext.all_in(), bits_own.all_in());
    EXPECT_DOUBLE_EQ(bits_ext.paper, bits_own.paper);
  }
}

TEST(PbllmQuantizer, BitLedgerByHand) {
  const Index rows = 4, cols = 8;
  const Matrix w0 = random_weight(rows, cols, 30);
  const Eigen::MatrixXd I = Eigen::MatrixXd::Identity(cols, cols);
  // An arm mask of 3 salient weights: 29 signs + 3 · 8 bits; per row an FP16 α and μ and the 8-bit
  // grid's FP16 scale and 8-bit zero point; the mask's storage is the mask plugin's to count.
  const auto mask = element_mask(rows, cols, {{0, 0}, {1, 5}, {3, 7}});
  Matrix w = w0;
  auto b = quantizer("pbllm")->quantize_linear(context(I, &mask), w);
  EXPECT_EQ(b.weights, 32);
  EXPECT_DOUBLE_EQ(b.payload, 29.0 + 24.0);
  EXPECT_DOUBLE_EQ(b.scales, 4 * 16.0 + 4 * 16.0);
  EXPECT_DOUBLE_EQ(b.zeros, 4 * 16.0 + 4 * 8.0);
  EXPECT_DOUBLE_EQ(b.masks, 0.0);
  EXPECT_DOUBLE_EQ(b.paper, 53.0);  // 0.906 · 1 + 0.094 · 8 = 1.656 bits per weight
  w = w0;
  b = quantizer("pbllm", {{"paper_convention", std::string("eq3")}})->quantize_linear(context(I, &mask), w);
  EXPECT_DOUBLE_EQ(b.paper, 53.0 + 32.0);  // Eq. 3's +1 bit index per weight

  // Its own mask at low_frac 0.75 over 32 weights: threshold at sorted position 24, 7 salient;
  // 2 groups of 4 columns per row: α and μ per row and group.
  w = w0;
  b = quantizer("pbllm", {{"low_frac", 0.75}, {"group_size", std::int64_t{4}}, {"high_bits", std::int64_t{6}}})
          ->quantize_linear(context(I), w);
  // Per group of 16 weights: floor(16 · 0.75) = 12, so 16 − 13 = 3 salient; 6 over two groups.
  EXPECT_DOUBLE_EQ(b.payload, 26.0 + 6 * 6.0);
  EXPECT_DOUBLE_EQ(b.scales, 4 * 2 * 16.0 + 4 * 16.0);
  EXPECT_DOUBLE_EQ(b.zeros, 4 * 2 * 16.0 + 4 * 6.0);
  EXPECT_DOUBLE_EQ(b.masks, 32.0);  // bitmap
  w = w0;
  b = quantizer("pbllm", {{"low_frac", 0.75}, {"mask_encoding", std::string("csr")}})->quantize_linear(context(I), w);
  // One group of 32: floor(24) = 24, so 32 − 25 = 7 salient; CSR: 7 column indices of ⌈log2 8⌉ = 3
  // bits, 5 row pointers of ⌈log2 8⌉ = 3 bits.
  EXPECT_DOUBLE_EQ(b.payload, 25.0 + 7 * 8.0);
  EXPECT_DOUBLE_EQ(b.masks, 7 * 3.0 + 5 * 3.0);
}

TEST(PbllmQuantizer, MaskOfTheWrongShapeIsAnError) {
  const Matrix w0 = random_weight(4, 8, 31);
  const Eigen::MatrixXd I = Eigen::MatrixXd::Identity(8, 8);
  const auto mask = element_mask(8, 4);
  Matrix w = w0;
  try {
    quantizer("pbllm")->quantize_linear(context(I, &mask), w);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("layer 3 q_proj: the mask is 8x4 but the weight is 4x8"), std::string::npos)
        << e.what();
  }
}

TEST(PbllmQuantizer, RowParallelLoopIsDeterministic) {
  const Matrix w0 = random_weight(300, 48, 32);
  const auto H = random_hessian(48, 300, 33);
  Matrix a = w0, b = w0;
  quantizer("pbllm")->quantize_linear(context(H), a);
  {
    tbb::global_control one(tbb::global_control::max_allowed_parallelism, 1);
    quantizer("pbllm")->quantize_linear(context(H), b);
  }
  EXPECT_EQ(a, b);
}

// ---- the mask plugins -----------------------------------------------------------------------------

// H = [[2, 1, 0], [1, 2, 0], [0, 0, 4]] with no dampening. U_jj² is the conditional inverse
// diagonal [(H_{j:, j:})⁻¹]_jj: column 0: [H⁻¹]_00 = 2/3; column 1: (H_{1:,1:})⁻¹ = diag(1/2, 1/4)
// so 1/2; column 2: 1/4. Scores w² / U_jj² are 1.5 w², 2 w², 4 w².
Eigen::MatrixXd hand_hessian() {
  Eigen::MatrixXd H(3, 3);
  H << 2, 1, 0, 1, 2, 0, 0, 0, 4;
  return H;
}

TEST(MaskPlugins, HandHessianHasTheHandComputedFactor) {
  Matrix w = Matrix::Ones(1, 3);
  const auto f = prepare_inverse_hessian(hand_hessian(), w, 0.0, "test");
  EXPECT_NEAR(f.U(0, 0) * f.U(0, 0), 2.0 / 3.0, 1e-12);
  EXPECT_NEAR(f.U(1, 1) * f.U(1, 1), 0.5, 1e-12);
  EXPECT_NEAR(f.U(2, 2) * f.U(2, 2), 0.25, 1e-12);
}

TEST(MaskPlugins, MagnitudePicksTheLargestWeightsByPbLlmsRule) {
  // 6 weights, ratio 0.5: threshold at sorted position floor(6 · 0.5) = 3 (the 4th smallest |w|),
  // salient = |w| above it: the 2 largest, one fewer than ratio · n.
  Matrix w(2, 3);
  w << 1.0f, 0.8f, 0.7f, 0.3f, -0.9f, 0.1f;
  const auto m = mask_plugin("magnitude", {{"ratio", 0.5}})->select(LinearContext{}, w);
  EXPECT_EQ(m.shape, SalientMask::Shape::elements);
  EXPECT_EQ(salient_set(m), (std::set<std::pair<Index, Index>>{{0, 0}, {1, 1}}));
  EXPECT_DOUBLE_EQ(m.storage_bits, 6.0);  // bitmap
  // CSR: 2 column indices of ⌈log2 3⌉ = 2 bits + 3 row pointers of ⌈log2 3⌉ = 2 bits.
  EXPECT_DOUBLE_EQ(mask_plugin("magnitude", {{"ratio", 0.5}, {"encoding", std::string("csr")}})
                       ->select(LinearContext{}, w)
                       .storage_bits,
                   2 * 2.0 + 3 * 2.0);
  // Ties at the threshold are binarized: all equal -> nothing salient; ratio 0 -> nothing.
  EXPECT_EQ(mask_plugin("magnitude", {{"ratio", 0.5}})->select(LinearContext{}, Matrix::Ones(2, 3)).count(), 0);
  EXPECT_EQ(mask_plugin("magnitude", {{"ratio", 0.0}})->select(LinearContext{}, w).count(), 0);
  // ratio 1: threshold at the smallest, everything above it is salient.
  EXPECT_EQ(mask_plugin("magnitude", {{"ratio", 1.0}})->select(LinearContext{}, w).count(), 5);
}

TEST(MaskPlugins, MagnitudeGroupsHaveTheirOwnThreshold) {
  // group_size 2 over 4 columns: two groups of 4 weights, each with its own threshold (sorted
  // position 2): the largest |w| of each group.
  Matrix w(2, 4);
  w << 5, 4, 0.1f, 0.2f, 3, 2, 0.3f, -0.4f;
  const auto m = mask_plugin("magnitude", {{"ratio", 0.5}, {"group_size", std::int64_t{2}}})->select(LinearContext{}, w);
  EXPECT_EQ(salient_set(m), (std::set<std::pair<Index, Index>>{{0, 0}, {1, 3}}));
}

TEST(MaskPlugins, MagnitudeTreatsDeadInputsAsZero) {
  Matrix w(2, 3);
  w << 1.0f, 0.8f, 0.7f, 0.3f, -0.9f, 0.1f;
  Eigen::MatrixXd H = hand_hessian();
  H.row(0).setZero();
  H.col(0).setZero();  // input 0 never fires: PB-LLM zeroes its weights before the mask
  const auto m = mask_plugin("magnitude", {{"ratio", 0.5}})->select(context(H), w);
  EXPECT_EQ(salient_set(m), (std::set<std::pair<Index, Index>>{{0, 1}, {1, 1}}));
}

TEST(MaskPlugins, HessianElementwiseUsesTheConditionalInverseDiagonal) {
  // Scores 1.5 w², 2 w², 4 w²: row 0 = [1, 0.8, 0.7] -> 1.5, 1.28, 1.96; row 1 = [0.3, -0.9, 0.1]
  // -> 0.135, 1.62, 0.04. Top 2 (ratio 0.5): (0, 2) and (1, 1); by magnitude it would be (0, 0)
  // and (1, 1).
  Matrix w(2, 3);
  w << 1.0f, 0.8f, 0.7f, 0.3f, -0.9f, 0.1f;
  const auto H = hand_hessian();
  const auto m = mask_plugin("hessian-elementwise", {{"ratio", 0.5}, {"percdamp", 0.0}})->select(context(H), w);
  EXPECT_EQ(salient_set(m), (std::set<std::pair<Index, Index>>{{0, 2}, {1, 1}}));
  EXPECT_DOUBLE_EQ(m.storage_bits, 6.0);
  // ratio 0.7: threshold at floor(6 · 0.3) = 1 (the 2nd smallest score, 0.135): 4 salient.
  const auto m4 = mask_plugin("hessian-elementwise", {{"ratio", 0.7}, {"percdamp", 0.0}})->select(context(H), w);
  EXPECT_EQ(salient_set(m4), (std::set<std::pair<Index, Index>>{{0, 0}, {0, 1}, {0, 2}, {1, 1}}));
}

TEST(MaskPlugins, HessianSalienceChoosesWholeColumns) {
  // Column scores Σ_r w² / U_jj²: col 0 = 1.5 (1 + 0.09) = 1.635, col 1 = 2 (0.64 + 0.81) = 2.9,
  // col 2 = 4 (0.49 + 0.01) = 2.0. By Σ|w| col 0 (1.3) would beat col 2 (0.8).
  Matrix w(2, 3);
  w << 1.0f, 0.8f, 0.7f, 0.3f, -0.9f, 0.1f;
  const auto H = hand_hessian();
  auto select = [&](const ParamMap& p) {
    ParamMap params = p;
    params["percdamp"] = 0.0;
    return mask_plugin("hessian-salience", params)->select(context(H), w);
  };
  const auto one = select({{"columns", std::int64_t{1}}});
  EXPECT_EQ(one.shape, SalientMask::Shape::channels);
  EXPECT_EQ(one.salient, (std::vector<std::uint8_t>{0, 1, 0}));
  EXPECT_EQ(one.count(), 2);  // 2 rows x 1 column
  EXPECT_DOUBLE_EQ(one.storage_bits, 3.0);  // 1 bit per input column
  EXPECT_EQ(select({{"columns", std::int64_t{2}}}).salient, (std::vector<std::uint8_t>{0, 1, 1}));
  EXPECT_EQ(select({{"ratio", 0.6}}).salient, (std::vector<std::uint8_t>{0, 1, 1}));  // round(1.8) = 2
  EXPECT_EQ(select({{"ratio", 0.1}}).salient, (std::vector<std::uint8_t>{0, 0, 0}));  // round(0.3) = 0
  // Per block of 2 columns, 1 each: block [0, 2) -> col 1, block [2, 3) -> col 2.
  EXPECT_EQ(select({{"columns", std::int64_t{1}}, {"block_size", std::int64_t{2}}}).salient,
            (std::vector<std::uint8_t>{0, 1, 1}));
  // CSR: 2 column indices of ⌈log2 3⌉ = 2 bits.
  EXPECT_DOUBLE_EQ(select({{"columns", std::int64_t{2}}, {"encoding", std::string("csr")}}).storage_bits, 4.0);
}

TEST(MaskPlugins, MasksAreLoggedWhenTensorsAreLogged) {
  Matrix w(2, 3);
  w << 1.0f, 0.8f, 0.7f, 0.3f, -0.9f, 0.1f;
  const auto H = hand_hessian();
  RecordingLog log;
  mask_plugin("hessian-elementwise", {{"ratio", 0.5}, {"percdamp", 0.0}})->select(context(H, nullptr, &log), w);
  ASSERT_TRUE(log.tensors.count("layer3/q_proj/mask"));
  Matrix expected(2, 3);
  expected << 0, 0, 1, 0, 1, 0;
  EXPECT_EQ(log.tensors["layer3/q_proj/mask"], expected);
  RecordingLog log2;
  mask_plugin("hessian-salience", {{"columns", std::int64_t{1}}, {"percdamp", 0.0}})
      ->select(context(H, nullptr, &log2), w);
  ASSERT_TRUE(log2.tensors.count("layer3/q_proj/mask"));
  EXPECT_EQ(log2.tensors["layer3/q_proj/mask"], (Matrix(1, 3) << 0, 1, 0).finished());
}

// ---- arms on stories260K --------------------------------------------------------------------------

const ArmResult& result_of(const RunReport& r, const std::string& name) {
  for (const auto& a : r.arms)
    if (a.arm == name) return a.result;
  throw std::runtime_error("no arm " + name);
}

TEST(PbllmRunner, ArmsOnStories260K) {
  test::TempDir dir;
  const auto yaml = dir.path() / "pbllm.yaml";
  std::ofstream(yaml) << "name: pbllm-test\n"
                         "model: " << test::model_dir("stories260K").string() << "\n"
                         "seed: 1\n"
                         "calibration:\n"
                         "  text: " << test::data_file("tinystories/calib.txt").string() << "\n"
                         "  nsamples: 16\n"
                         "  seq_len: 256\n"
                         "eval:\n"
                         "  - evaluator: perplexity\n"
                         "    params: {seq_len: 256, max_windows: 8}\n"
                         "    datasets:\n"
                         "      tinystories: " << test::data_file("tinystories/valid.txt").string() << "\n"
                         "arms:\n"
                         "  - name: fp\n"
                         "    quantizer: fp\n"
                         "  - name: pbllm\n"
                         "    quantizer: pbllm\n"
                         "  - name: pbllm-rtn\n"
                         "    quantizer: {name: pbllm, params: {disable_gptq: true}}\n"
                         "  - name: pbllm-masked\n"
                         "    mask: {name: hessian-elementwise, params: {ratio: 0.1}}\n"
                         "    quantizer: pbllm\n"
                         "  - name: pbllm-columns\n"
                         "    mask: {name: hessian-salience, params: {ratio: 0.1}}\n"
                         "    quantizer: pbllm\n";
  PluginRegistry registry;
  registry.add_search_path(PluginRegistry::default_plugin_dir());
  RunOptions o;
  o.out_dir = dir.path() / "out";
  o.jobs = 2;
  const auto report = run_experiment(load_experiment(yaml, registry), registry, o);
  ASSERT_EQ(report.failed(), 0);

  auto ppl = [&](const std::string& arm) {
    return result_of(report, arm).metrics.at("perplexity").at("tinystories").at("ppl");
  };
  for (const char* arm : {"fp", "pbllm", "pbllm-rtn", "pbllm-masked", "pbllm-columns"}) {
    EXPECT_TRUE(std::isfinite(ppl(arm))) << arm;
    std::cout << "[ppl] " << arm << " " << ppl(arm) << "\n";
  }
  EXPECT_LT(ppl("fp"), ppl("pbllm"));
  EXPECT_LT(ppl("pbllm"), ppl("pbllm-rtn"));

  // GPTQ compensation lowers every layer-0 linear's output error (same Hessians in both arms) and
  // the mean over all linears.
  const auto& g = result_of(report, "pbllm").linears;
  const auto& r = result_of(report, "pbllm-rtn").linears;
  ASSERT_EQ(g.size(), 35u);
  double sum_g = 0, sum_r = 0;
  for (std::size_t i = 0; i < g.size(); ++i) {
    if (g[i].layer == 0) {
      EXPECT_LT(g[i].output_error, r[i].output_error) << g[i].linear;
    }
    sum_g += g[i].output_error;
    sum_r += r[i].output_error;
  }
  EXPECT_LT(sum_g, sum_r);

  // The hessian-elementwise mask at ratio 0.1 is pbllm's own default mask: identical results.
  EXPECT_EQ(ppl("pbllm-masked"), ppl("pbllm"));
  const auto& m = result_of(report, "pbllm-masked");
  for (std::size_t i = 0; i < g.size(); ++i) EXPECT_EQ(m.linears[i].output_error, g[i].output_error);
  EXPECT_DOUBLE_EQ(m.total_bits.all_in(), result_of(report, "pbllm").total_bits.all_in());

  // Bits: a hair under 0.9 · 1 + 0.1 · 8 = 1.7 (PB-LLM's threshold leaves n·0.1 − 1 salient per
  // matrix); all-in adds the 1-bit bitmap and per-row floats.
  const auto& bits = result_of(report, "pbllm").total_bits;
  EXPECT_GT(bits.paper_per_weight(), 1.69);
  EXPECT_LT(bits.paper_per_weight(), 1.70);
  EXPECT_DOUBLE_EQ(bits.masks, static_cast<double>(bits.weights));
  EXPECT_NEAR(bits.all_in(), bits.paper + bits.weights + bits.scales + bits.zeros, 1e-6);
  std::cout << "[bits] pbllm paper " << bits.paper_per_weight() << " all-in " << bits.all_in_per_weight() << "\n";
  const auto& cbits = result_of(report, "pbllm-columns").total_bits;
  std::cout << "[bits] pbllm-columns paper " << cbits.paper_per_weight() << " all-in " << cbits.all_in_per_weight()
            << "\n";
}

}  // namespace
}  // namespace ptqlab
