// KL divergence against the FP model (docs/kl-divergence.md; research/evaluation.md §5.2, §8.1
// E7, §8.2): hand-checked tokens, llama.cpp's percentile rule, FP against itself, the cached
// reference, and RTN 2-bit on stories260K.
#include <gtest/gtest.h>

#include <cmath>

#include "ptqlab/eval/kl_divergence.hpp"
#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/support/text_file.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

struct Fixture {
  LlamaModel model;
  std::vector<int> stream;
};

const Fixture& fixture() {
  static const Fixture f = [] {
    Fixture f;
    const auto dir = test::model_dir("stories260K");
    f.model = load_model(dir);
    const Tokenizer tok(dir / "tokenizer.model");
    f.stream = perplexity_stream(tok, read_text_file(test::data_file("tinystories/valid.txt")).substr(0, 40000), 1);
    return f;
  }();
  return f;
}

// A round-to-nearest copy (per row, min/max grid of 2^bits levels), to have a model that differs.
LlamaModel rtn(const LlamaModel& fp, int bits) {
  const float levels = static_cast<float>((1 << bits) - 1);
  LlamaModel m = fp;
  for (auto& layer : m.layers)
    for (Linear which : kAllLinears) {
      Matrix& w = layer.linear(which);
      for (Eigen::Index r = 0; r < w.rows(); ++r) {
        const float lo = w.row(r).minCoeff(), hi = w.row(r).maxCoeff(), scale = (hi - lo) / levels;
        for (Eigen::Index c = 0; c < w.cols(); ++c) w(r, c) = lo + std::round((w(r, c) - lo) / scale) * scale;
      }
    }
  return m;
}

LlamaModel rtn2(const LlamaModel& fp) { return rtn(fp, 2); }

KldOptions small(int windows = 4) {
  KldOptions o;
  o.seq_len = 256;
  o.max_windows = windows;
  return o;
}

TEST(Kld, HandCheckedTokens) {
  const std::vector<float> b1 = {0, 0}, q1 = {static_cast<float>(std::log(3.0)), 0};
  const auto t1 = kld_token(b1, q1, 1);
  EXPECT_NEAR(t1.kld, 0.143841036, 1e-7);
  EXPECT_NEAR(t1.dp, -0.25, 1e-7);
  EXPECT_TRUE(t1.same_top);  // the base tie resolves to index 0, Q's argmax
  EXPECT_NEAR(t1.nll_base, std::log(2.0), 1e-9);
  const std::vector<float> b2 = {2, 1, 0}, q2 = {1.5f, 1.5f, 0};
  const auto t2 = kld_token(b2, q2, 0);
  EXPECT_NEAR(t2.kld, 0.101566463, 1e-7);
  EXPECT_TRUE(t2.same_top);
  const auto t3 = kld_token(q2, std::vector<float>{0, 1, 0}, 0);
  EXPECT_FALSE(t3.same_top);
}

TEST(Kld, PercentilesInterpolateLikeLlamaCpp) {
  const std::vector<double> v = {1, 2, 3, 4};
  EXPECT_DOUBLE_EQ(kld_percentile(v, 0.5), 2.5);
  EXPECT_DOUBLE_EQ(kld_percentile(v, 0.0), 1.0);
  EXPECT_DOUBLE_EQ(kld_percentile(v, 1.0), 4.0);
  EXPECT_DOUBLE_EQ(kld_percentile(v, 0.9), 3.7);  // pos 2.7
}

TEST(Kld, FpAgainstItselfIsZeroWithFullAgreement) {
  const auto& f = fixture();
  const auto r = evaluate_kld(f.model, f.model, f.stream, small());
  ASSERT_EQ(r.tokens.size(), 4u * 255u);
  for (const auto& t : r.tokens) {
    EXPECT_EQ(t.kld, 0.0);
    EXPECT_EQ(t.dp, 0.0);
    EXPECT_TRUE(t.same_top);
  }
  const auto& m = r.metrics;
  EXPECT_EQ(m.at("kld_mean"), 0.0);
  EXPECT_EQ(m.at("kld_mean_unc"), 0.0);
  EXPECT_EQ(m.at("kld_max"), 0.0);
  EXPECT_EQ(m.at("same_top"), 1.0);
  EXPECT_EQ(m.at("same_top_unc"), 0.0);
  EXPECT_EQ(m.at("ppl_ratio"), 1.0);
  EXPECT_EQ(m.at("ln_ppl_ratio"), 0.0);
  EXPECT_NEAR(m.at("cor_ln_ppl"), 1.0, 1e-12);
  EXPECT_EQ(m.at("ppl_q"), m.at("ppl_base"));
  // PPL(Q) is the perplexity of the same windows (ptqlab-ppl-v1).
  PerplexityOptions po;
  po.seq_len = 256;
  po.max_windows = 4;
  po.show_progress = false;
  // (sequence_nll sums the exponentials in float, KLD in double: equal to float rounding)
  EXPECT_NEAR(m.at("ppl_q"), evaluate_perplexity(f.model, f.stream, po).ppl, 1e-6 * m.at("ppl_q"));
}

TEST(Kld, Rtn2BitDivergesAndTheCachedReferenceGivesTheSameNumbers) {
  const auto& f = fixture();
  const LlamaModel q = rtn2(f.model);
  const auto direct = evaluate_kld(q, f.model, f.stream, small());
  EXPECT_GT(direct.metrics.at("kld_mean"), 0.01);
  EXPECT_LT(direct.metrics.at("same_top"), 1.0);
  EXPECT_GT(direct.metrics.at("same_top_unc"), 0.0);
  EXPECT_GT(direct.metrics.at("ppl_ratio"), 1.0);
  EXPECT_GE(direct.metrics.at("kld_min"), -1e-7);
  EXPECT_LE(direct.metrics.at("kld_p99"), direct.metrics.at("kld_max"));
  EXPECT_LE(direct.metrics.at("kld_median"), direct.metrics.at("kld_p90"));

  test::TempDir cache;
  KldOptions o = small();
  o.cache_dir = cache.path();
  o.reference_key = "stories260K-test";
  o.batch_windows = 3;  // batches cut differently from the file's: reading streams across them
  const auto first = evaluate_kld(q, f.model, f.stream, o);
  EXPECT_FALSE(first.reference_from_cache);
  ASSERT_TRUE(std::filesystem::exists(first.reference_file));
  EXPECT_GE(std::filesystem::file_size(first.reference_file), 4u * 255u * 512u * 4u);  // float32 logits
  const auto second = evaluate_kld(q, f.model, f.stream, o);
  EXPECT_TRUE(second.reference_from_cache);
  for (const auto& r : {first, second}) {
    ASSERT_EQ(r.tokens.size(), direct.tokens.size());
    EXPECT_NEAR(r.metrics.at("kld_mean"), direct.metrics.at("kld_mean"), 1e-9);
    EXPECT_EQ(r.metrics.at("same_top"), direct.metrics.at("same_top"));
  }
  // A corrupt reference file is recomputed, never trusted.
  std::filesystem::resize_file(first.reference_file, 100);
  EXPECT_FALSE(evaluate_kld(q, f.model, f.stream, o).reference_from_cache);
}

// The quickstart's arms (FP, RTN 4/3/2-bit per row): KLD against FP orders them as perplexity does.
TEST(Kld, QuickstartArmsRankTheSameByKldAndByPerplexity) {
  const auto& f = fixture();
  PerplexityOptions po;
  po.seq_len = 256;
  po.max_windows = 4;
  po.show_progress = false;
  std::vector<double> klds = {evaluate_kld(f.model, f.model, f.stream, small()).metrics.at("kld_mean")};
  std::vector<double> ppls = {evaluate_perplexity(f.model, f.stream, po).ppl};
  for (int bits : {4, 3, 2}) {
    const LlamaModel q = rtn(f.model, bits);
    klds.push_back(evaluate_kld(q, f.model, f.stream, small()).metrics.at("kld_mean"));
    ppls.push_back(evaluate_perplexity(q, f.stream, po).ppl);
  }
  EXPECT_EQ(klds[0], 0.0);
  for (std::size_t i = 1; i < klds.size(); ++i) {
    EXPECT_GT(klds[i], klds[i - 1]) << "arm " << i;
    EXPECT_GT(ppls[i], ppls[i - 1]) << "arm " << i;
  }
}

}  // namespace
}  // namespace ptqlab
