// The float32 forward kernels against the brute-force double reference (reference_forward.hpp),
// on random inputs of several shapes (both attention paths: small head dims and GEMM tiles) and on
// the real stories260K checkpoint with real text.
#include <gtest/gtest.h>

#include <random>

#include <tbb/global_control.h>

#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/nn/forward.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/text_file.hpp"
#include "reference_forward.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

Matrix random_matrix(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  Matrix m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = d(rng);
  return m;
}

// Largest |a - b| over all entries, relative to max(1, |b|).
double max_rel_diff(const Matrix& a, const reference::Mat& b) {
  double worst = 0;
  for (Eigen::Index i = 0; i < a.rows(); ++i)
    for (Eigen::Index j = 0; j < a.cols(); ++j)
      worst = std::max(worst, std::abs(a(i, j) - b[i][j]) / std::max(1.0, std::abs(b[i][j])));
  return worst;
}

struct AttentionCase {
  int batch, seq_len, heads, kv_heads, head_dim;
};

class AttentionVsReference : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(AttentionVsReference, MatchesBruteForce) {
  const auto p = GetParam();
  const BatchShape shape{p.batch, p.seq_len};
  const Matrix q = random_matrix(shape.rows(), p.heads * p.head_dim, 1);
  const Matrix k = random_matrix(shape.rows(), p.kv_heads * p.head_dim, 2);
  const Matrix v = random_matrix(shape.rows(), p.kv_heads * p.head_dim, 3);
  Matrix out;
  causal_attention(q, k, v, p.heads, p.kv_heads, p.head_dim, shape, out);
  const auto ref = reference::attention(reference::from(q), reference::from(k), reference::from(v), p.heads,
                                        p.kv_heads, p.head_dim, p.batch, p.seq_len);
  EXPECT_LT(max_rel_diff(out, ref), 2e-5);
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionVsReference,
                         ::testing::Values(AttentionCase{1, 1, 2, 1, 8},      // a single position
                                           AttentionCase{3, 17, 8, 4, 8},     // stories260K heads, GQA 2:1
                                           AttentionCase{2, 100, 4, 1, 16},   // multi-query
                                           AttentionCase{1, 33, 2, 2, 4},     // tiny head dim
                                           AttentionCase{2, 70, 4, 2, 32},    // largest small-head kernel
                                           AttentionCase{2, 130, 4, 2, 64},   // GEMM path, several query tiles
                                           AttentionCase{1, 65, 2, 1, 128},   // GEMM path, LLaMA head dim
                                           AttentionCase{2, 21, 6, 3, 12}),   // odd head dim: GEMM path
                         [](const auto& info) {
                           const auto& p = info.param;
                           return "b" + std::to_string(p.batch) + "_T" + std::to_string(p.seq_len) + "_h" +
                                  std::to_string(p.heads) + "_kv" + std::to_string(p.kv_heads) + "_d" +
                                  std::to_string(p.head_dim);
                         });

TEST(Rope, MatchesBruteForceRotateHalf) {
  for (const double theta : {10000.0, 500000.0}) {
    for (const int head_dim : {8, 64}) {
      const BatchShape shape{2, 300};
      Matrix x = random_matrix(shape.rows(), 3 * head_dim, 7);
      auto ref = reference::from(x);
      const RopeTable table(head_dim, theta, shape.seq_len);
      apply_rope(x, 3, head_dim, table, shape);
      reference::rope(ref, 3, head_dim, theta, shape.seq_len);
      EXPECT_LT(max_rel_diff(x, ref), 2e-5) << "theta " << theta << " head_dim " << head_dim;
    }
  }
}

TEST(Rope, PositionZeroIsIdentityAndNormIsPreserved) {
  const BatchShape shape{1, 50};
  Matrix x = random_matrix(shape.rows(), 16, 3);
  const Matrix before = x;
  apply_rope(x, 2, 8, RopeTable(8, 10000.0, 50), shape);
  EXPECT_EQ(x.row(0), before.row(0));
  for (Eigen::Index r = 0; r < x.rows(); ++r) EXPECT_NEAR(x.row(r).norm(), before.row(r).norm(), 1e-4);
}

LlamaConfig small_config(int head_dim, int heads, int kv_heads) {
  LlamaConfig c;
  c.hidden_size = 48;
  c.intermediate_size = 80;
  c.num_layers = 2;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.vocab_size = 97;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = false;
  return c;
}

TEST(DecoderForward, RandomModelMatchesReference) {
  for (const auto& c : {small_config(8, 6, 3), small_config(16, 3, 1), small_config(64, 2, 2)}) {
    const auto model = random_llama(c, 42, 0.2f);
    std::mt19937 rng(5);
    std::vector<int> tokens(3 * 40);
    for (auto& t : tokens) t = static_cast<int>(rng() % c.vocab_size);
    const auto logits = forward_logits(model, tokens, BatchShape{3, 40});
    const auto ref = reference::logits(model, tokens, 3, 40);
    EXPECT_LT(max_rel_diff(logits, ref), 1e-4) << "head_dim " << c.head_dim;
  }
}

std::vector<int> real_window(int length) {
  const auto dir = test::model_dir("stories260K");
  const Tokenizer tok(dir / "tokenizer.model");
  auto stream = perplexity_stream(tok, read_text_file(test::data_file("tinystories/valid.txt")), 1);
  stream.resize(length);
  return stream;
}

TEST(DecoderForward, Stories260KMatchesDoubleReferenceOnRealText) {
  const auto model = load_model(test::model_dir("stories260K"));
  const auto tokens = real_window(512);
  const auto logits = forward_logits(model, tokens, BatchShape{1, 512});
  const auto ref = reference::logits(model, tokens, 1, 512);
  // The checkpoint's README measured float32-vs-float64 logit differences up to ~3e-5.
  double worst = 0;
  for (Eigen::Index i = 0; i < logits.rows(); ++i)
    for (Eigen::Index j = 0; j < logits.cols(); ++j) worst = std::max(worst, std::abs(logits(i, j) - ref[i][j]));
  EXPECT_LT(worst, 2e-4);
  EXPECT_GT(worst, 0.0);  // float32 is not double: an exact match would mean the oracle is not independent
}

TEST(DecoderForward, BatchedSequencesEqualSeparateRuns) {
  const auto model = load_model(test::model_dir("stories260K"));
  const auto tokens = real_window(3 * 128);
  const auto batched = forward_logits(model, tokens, BatchShape{3, 128});
  for (int b = 0; b < 3; ++b) {
    const std::span<const int> one(tokens.data() + b * 128, 128);
    const auto alone = forward_logits(model, one, BatchShape{1, 128});
    EXPECT_LT((batched.middleRows(b * 128, 128) - alone).cwiseAbs().maxCoeff(), 1e-5) << "sequence " << b;
  }
}

TEST(DecoderForward, ThreadCountDoesNotChangeResults) {
  const auto model = load_model(test::model_dir("stories260K"));
  const auto tokens = real_window(8 * 512);
  std::vector<double> one, many;
  {
    tbb::global_control c(tbb::global_control::max_allowed_parallelism, 1);
    one = sequence_nll(model, tokens, BatchShape{8, 512});
  }
  many = sequence_nll(model, tokens, BatchShape{8, 512});
  EXPECT_EQ(one, many);  // bit-identical: tiling never depends on the thread count
}

TEST(DecoderForward, SequenceNllEqualsLogSoftmaxOfLogits) {
  const auto model = load_model(test::model_dir("stories260K"));
  const auto tokens = real_window(2 * 64);
  const auto logits = forward_logits(model, tokens, BatchShape{2, 64});
  const auto nll = sequence_nll(model, tokens, BatchShape{2, 64});
  for (int b = 0; b < 2; ++b) {
    double expected = 0;
    for (int t = 0; t < 63; ++t) {
      const auto row = logits.row(b * 64 + t).cast<double>();
      const double lse = std::log(row.array().exp().sum());
      expected += lse - row(tokens[b * 64 + t + 1]);
    }
    EXPECT_NEAR(nll[b], expected, 1e-6 * std::abs(expected));
  }
}

// Observer: sees the four distinct linear inputs of every layer, with the right shapes; the
// attention input it sees really is what q_proj multiplies.
class RecordingObserver : public ForwardObserver {
 public:
  void on_linear_input(int layer, LinearInput which, const Matrix& x, BatchShape shape) override {
    calls.push_back({layer, which, x.rows(), x.cols()});
    if (layer == 1 && which == LinearInput::attn_in) attn_in_layer1 = x;
  }
  struct Call {
    int layer;
    LinearInput which;
    Eigen::Index rows, cols;
  };
  std::vector<Call> calls;
  Matrix attn_in_layer1;
};

TEST(DecoderForward, ObserverSeesEveryLinearInput) {
  const auto model = load_model(test::model_dir("stories260K"));
  const auto& c = model.config;
  const auto tokens = real_window(2 * 32);
  RecordingObserver obs;
  forward_logits(model, tokens, BatchShape{2, 32}, &obs);
  ASSERT_EQ(obs.calls.size(), 4u * c.num_layers);
  const LinearInput order[] = {LinearInput::attn_in, LinearInput::o_in, LinearInput::mlp_in, LinearInput::down_in};
  const Eigen::Index cols[] = {c.hidden_size, c.q_dim(), c.hidden_size, c.intermediate_size};
  for (std::size_t i = 0; i < obs.calls.size(); ++i) {
    EXPECT_EQ(obs.calls[i].layer, static_cast<int>(i / 4));
    EXPECT_EQ(obs.calls[i].which, order[i % 4]);
    EXPECT_EQ(obs.calls[i].rows, 64);
    EXPECT_EQ(obs.calls[i].cols, cols[i % 4]);
  }
  // Recompute layer 1's input by hand: embed -> layer 0 -> RMSNorm.
  Matrix h = embed_tokens(model, tokens);
  decoder_layer_forward(c, model.layers[0], RopeTable(c.head_dim, c.rope_theta, 32), BatchShape{2, 32}, h);
  Matrix normed;
  rms_norm(h, model.layers[1].input_norm, static_cast<float>(c.rms_norm_eps), normed);
  EXPECT_LT((normed - obs.attn_in_layer1).cwiseAbs().maxCoeff(), 1e-6);
}

TEST(DecoderForward, ReplacedWeightsAreUsed) {
  auto model = load_model(test::model_dir("stories260K"));
  const auto tokens = real_window(16);
  const auto before = forward_logits(model, tokens, BatchShape{1, 16});
  // With every o_proj and down_proj zeroed the layers add nothing: logits = head(norm(embed)).
  for (auto& l : model.layers) {
    l.linear(Linear::o_proj).setZero();
    l.linear(Linear::down_proj).setZero();
  }
  const auto after = forward_logits(model, tokens, BatchShape{1, 16});
  const Matrix expected = output_logits(model, embed_tokens(model, tokens));
  EXPECT_GT((after - before).cwiseAbs().maxCoeff(), 0.1);
  EXPECT_LT((after - expected).cwiseAbs().maxCoeff(), 1e-5);
}

TEST(DecoderForward, RejectsBadInputs) {
  const auto model = load_model(test::model_dir("stories260K"));
  std::vector<int> bad = {1, 2, 512};
  EXPECT_THROW(forward_logits(model, bad, BatchShape{1, 3}), Error);
  std::vector<int> ok(10, 5);
  EXPECT_THROW(forward_logits(model, ok, BatchShape{3, 3}), Error);
  std::vector<int> too_long(513, 5);
  try {
    forward_logits(model, too_long, BatchShape{1, 513});
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("exceeds max_position_embeddings 512"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace ptqlab
