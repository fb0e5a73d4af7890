// The full-model causal-LM backward (core/src/nn/model_backward.cpp) and LoRA (plugins/preprocessor/restorative-lora/lora.cpp)
// against central finite differences of the double-precision reference forward
// (reference_forward.hpp), as in test_backward.cpp.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <random>
#include <string>

#include <fmt/format.h>

#include "grad_check.hpp"
#include "ptqlab/nn/forward.hpp"
#include "lora.hpp"
#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/nn/model_backward.hpp"
#include "ptqlab/support/text_file.hpp"
#include "reference_forward.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

using reference::Mat;

LlamaConfig tiny_config(int heads, int kv_heads, bool tied) {
  LlamaConfig c;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_layers = 2;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = 16 / heads;
  c.vocab_size = 23;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-5;
  c.tie_word_embeddings = tied;
  return c;
}

std::vector<int> random_tokens(int n, int vocab, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int> d(0, vocab - 1);
  std::vector<int> t(static_cast<std::size_t>(n));
  for (auto& x : t) x = d(rng);
  return t;
}

// Mean next-token NLL of `m` on the double reference.
double reference_loss(const LlamaModel& m, const std::vector<int>& tokens, BatchShape shape) {
  return reference::mean_next_token_nll(reference::logits(m, tokens, shape.batch, shape.seq_len), tokens,
                                        shape.seq_len);
}

// Checks every parameter group of `grads` against finite differences of reference_loss on a
// perturbed copy of `model` (k entries per tensor).
void check_model_grads(const std::string& name, const LlamaModel& model, const ModelGrads& grads,
                       const std::vector<int>& tokens, BatchShape shape, Index k, double rtol) {
  LlamaModel mp = model;
  auto loss = [&] { return reference_loss(mp, tokens, shape); };
  GradCheck embed{name + " d embed"};
  // Rows of tokens that occur (an untied model's other rows have zero gradient) plus random ones.
  std::vector<Index> rows;
  for (std::size_t i = 0; i < 4 && i < tokens.size(); ++i) rows.push_back(tokens[i]);
  for (Index r : pick(mp.embed.rows(), 3, 5)) rows.push_back(r);
  for (Index r : rows)
    for (Index j : pick(mp.embed.cols(), 4, static_cast<std::uint64_t>(r)))
      embed.add(grads.head.embed(r, j), central(mp.embed(r, j), 1e-3, loss));
  embed.expect(rtol);
  GradCheck norm{name + " d final_norm"};
  for (Index j : pick(mp.final_norm.size(), k, 7)) norm.add(grads.head.final_norm(j), central(mp.final_norm(j), 1e-3, loss));
  norm.expect(rtol);
  if (mp.lm_head.size() > 0) {
    GradCheck head{name + " d lm_head"};
    for (Index e : pick(mp.lm_head.size(), k, 8))
      head.add(grads.head.lm_head.data()[e], central(mp.lm_head.data()[e], 1e-3, loss));
    head.expect(rtol);
  } else {
    EXPECT_EQ(grads.head.lm_head.size(), 0) << "a tied model's head gradient goes into embed";
  }
  for (std::size_t l = 0; l < mp.layers.size(); ++l) {
    for (Linear which : kAllLinears) {
      Matrix& w = mp.layers[l].linear(which);
      GradCheck check{fmt::format("{} layer{} d{}", name, l, linear_name(which))};
      for (Index e : pick(w.size(), k, 100 + l * 10 + static_cast<int>(which)))
        check.add(grads.layers[l].linear_grad(which).data()[e], central(w.data()[e], 1e-3, loss));
      check.expect(rtol);
    }
    GradCheck in{fmt::format("{} layer{} d input_norm", name, l)}, post{fmt::format("{} layer{} d post_norm", name, l)};
    for (Index j : pick(mp.layers[l].input_norm.size(), k, 300 + l)) {
      in.add(grads.layers[l].input_norm(j), central(mp.layers[l].input_norm(j), 1e-3, loss));
      post.add(grads.layers[l].post_norm(j), central(mp.layers[l].post_norm(j), 1e-3, loss));
    }
    in.expect(rtol);
    post.expect(rtol);
  }
}

struct ModelCase {
  const char* name;
  int heads, kv_heads;
  bool tied;
};
void PrintTo(const ModelCase& p, std::ostream* os) { *os << p.name; }

class FullModelBackward : public ::testing::TestWithParam<ModelCase> {};

TEST_P(FullModelBackward, MatchesFiniteDifferences) {
  const auto& p = GetParam();
  const auto model = random_llama(tiny_config(p.heads, p.kv_heads, p.tied), 11, 0.3f);
  const BatchShape shape{2, 7};
  const auto tokens = random_tokens(static_cast<int>(shape.rows()), model.config.vocab_size, 12);
  ModelGrads grads;
  grads.reset(model);
  const auto l = causal_lm_backward(model, tokens, shape, 1.0 / (shape.batch * (shape.seq_len - 1)), grads);
  EXPECT_EQ(l.predicted, shape.batch * (shape.seq_len - 1));
  EXPECT_NEAR(l.mean(), reference_loss(model, tokens, shape), 1e-5 * l.mean());
  // The loss alone (no backward) is the same number, and equals sequence_nll's.
  PlainLayerStack stack(model, shape.seq_len, nullptr);
  EXPECT_NEAR(causal_lm_loss(model, stack, tokens, shape).mean(), l.mean(), 1e-6 * l.mean());
  const auto nll = sequence_nll(model, tokens, shape);
  EXPECT_NEAR((nll[0] + nll[1]) / l.predicted, l.mean(), 1e-5 * l.mean());
  check_model_grads(p.name, model, grads, tokens, shape, 12, 1e-3);
}

INSTANTIATE_TEST_SUITE_P(Configs, FullModelBackward,
                         ::testing::Values(ModelCase{"gqa_tied", 4, 2, true}, ModelCase{"gqa_untied", 4, 2, false},
                                           ModelCase{"mha_tied", 2, 2, true}, ModelCase{"mha_untied", 2, 2, false}),
                         [](const auto& info) { return std::string(info.param.name); });

TEST(FullModelBackward, GradientsAccumulateOverCalls) {
  const auto model = random_llama(tiny_config(4, 2, false), 13, 0.3f);
  const BatchShape shape{1, 9};
  const auto tokens = random_tokens(9, model.config.vocab_size, 14);
  ModelGrads once, twice;
  causal_lm_backward(model, tokens, shape, 2.0, once);
  causal_lm_backward(model, tokens, shape, 1.0, twice);
  causal_lm_backward(model, tokens, shape, 1.0, twice);
  EXPECT_LE((once.head.embed - twice.head.embed).cwiseAbs().maxCoeff(), 1e-5 * once.head.embed.cwiseAbs().maxCoeff());
  EXPECT_LE((once.layers[1].linear_grad(Linear::q_proj) - twice.layers[1].linear_grad(Linear::q_proj)).cwiseAbs().maxCoeff(),
            1e-5 * once.layers[1].linear_grad(Linear::q_proj).cwiseAbs().maxCoeff());
}

TEST(FullModelBackward, Stories260KOnRealTextMatchesFiniteDifferences) {
  const auto model = load_model(test::model_dir("stories260K"));
  const Tokenizer tok(test::model_dir("stories260K") / "tokenizer.model");
  auto tokens = perplexity_stream(tok, read_text_file(test::data_file("tinystories/valid.txt")), 1);
  const BatchShape shape{1, 12};
  tokens.resize(static_cast<std::size_t>(shape.rows()));
  ModelGrads grads;
  grads.reset(model);
  const auto l = causal_lm_backward(model, tokens, shape, 1.0 / (shape.seq_len - 1), grads);
  EXPECT_NEAR(l.mean(), reference_loss(model, tokens, shape), 1e-5 * l.mean());
  std::printf("[fd] stories260K: mean NLL %.4f over %lld tokens\n", l.mean(), l.predicted);
  check_model_grads("stories260K", model, grads, tokens, shape, 6, 2e-3);
}

// ---------------------------------------------------------------------------------------------
// LoRA.

// Adapters with random (nonzero) B, so that A's gradient is nonzero too.
LoraAdapters random_adapters(const LlamaModel& m, double dropout, std::uint64_t seed) {
  LoraConfig cfg;
  cfg.rank = 3;
  cfg.alpha = 6;
  cfg.dropout = dropout;
  auto a = LoraAdapters::init(m, cfg, seed);
  std::mt19937_64 rng(seed + 1);
  std::normal_distribution<float> d(0.0f, 0.3f);
  a.for_each([&](Matrix& t) {
    if (t.cols() == cfg.rank)
      for (Index i = 0; i < t.size(); ++i) t.data()[i] = d(rng);
  });
  return a;
}

// Mean NLL of base + adapters in double, with the same dropout masks as LoraLayerStack.
double reference_lora_loss(const LlamaModel& m, const LoraAdapters& ad, const std::vector<int>& tokens,
                           BatchShape shape, bool dropout, DropoutStream stream) {
  Mat h = reference::embed(m, tokens);
  const double s = ad.config.alpha / ad.config.rank;
  for (std::size_t l = 0; l < m.layers.size(); ++l) {
    reference::decoder_layer_with(m.config, m.layers[l], h, shape.batch, shape.seq_len, [&](Linear which, const Mat& x) {
      Mat y = reference::linear(x, m.layers[l].linear(which));
      const auto& a = ad.layers[l][static_cast<std::size_t>(which)];
      if (!a.active()) return y;
      Mat xd = x;
      if (dropout)
        for (std::size_t r = 0; r < x.size(); ++r)
          for (std::size_t c = 0; c < x[r].size(); ++c)
            xd[r][c] *= lora_dropout_factor(stream, static_cast<int>(l), which, r * x[r].size() + c, ad.config.dropout);
      const Mat u = reference::linear(xd, a.a);
      const Mat d = reference::linear(u, a.b);
      for (std::size_t r = 0; r < y.size(); ++r)
        for (std::size_t c = 0; c < y[r].size(); ++c) y[r][c] += s * d[r][c];
      return y;
    });
  }
  return reference::mean_next_token_nll(reference::head_logits(m, h), tokens, shape.seq_len);
}

class LoraBackward : public ::testing::TestWithParam<double> {};

TEST_P(LoraBackward, MatchesFiniteDifferences) {
  const double p = GetParam();
  const auto model = random_llama(tiny_config(4, 2, false), 21, 0.3f);
  auto adapters = random_adapters(model, p, 22);
  const BatchShape shape{2, 6};
  const auto tokens = random_tokens(static_cast<int>(shape.rows()), model.config.vocab_size, 23);
  const DropoutStream stream{77, 5};
  LoraAdapters grads = adapters.zeros_like();
  LoraLayerStack stack(model, adapters, &grads, shape.seq_len);
  stack.set_dropout(p > 0, stream);
  const auto l = causal_lm_backward(model, stack, tokens, shape, 1.0 / (shape.batch * (shape.seq_len - 1)), nullptr);
  auto loss = [&] { return reference_lora_loss(model, adapters, tokens, shape, p > 0, stream); };
  EXPECT_NEAR(l.mean(), loss(), 1e-5 * l.mean());
  if (p > 0) {  // the masks really drop something: the loss differs from the undropped one
    EXPECT_GT(std::abs(loss() - reference_lora_loss(model, adapters, tokens, shape, false, stream)), 1e-4);
  }
  const std::string name = p > 0 ? "lora dropout" : "lora";
  for (std::size_t li = 0; li < model.layers.size(); ++li)
    for (Linear which : kAllLinears) {
      auto& ad = adapters.layers[li][static_cast<std::size_t>(which)];
      const auto& g = grads.layers[li][static_cast<std::size_t>(which)];
      ASSERT_EQ(ad.active(), which != Linear::o_proj) << "default targets exclude o_proj";
      if (!ad.active()) continue;
      GradCheck ca{fmt::format("{} layer{} dA {}", name, li, linear_name(which))};
      GradCheck cb{fmt::format("{} layer{} dB {}", name, li, linear_name(which))};
      for (Index e : pick(ad.a.size(), 10, 400 + li)) ca.add(g.a.data()[e], central(ad.a.data()[e], 1e-3, loss));
      for (Index e : pick(ad.b.size(), 10, 500 + li)) cb.add(g.b.data()[e], central(ad.b.data()[e], 1e-3, loss));
      ca.expect();
      cb.expect();
    }
}

INSTANTIATE_TEST_SUITE_P(Dropout, LoraBackward, ::testing::Values(0.0, 0.3),
                         [](const auto& info) { return info.param > 0 ? std::string("fixed_mask") : std::string("off"); });

TEST(Lora, InitIsPeftLikeAndStartsAtTheBaseModel) {
  const auto model = random_llama(tiny_config(4, 2, true), 31, 0.3f);
  LoraConfig cfg;
  cfg.rank = 4;
  const auto a = LoraAdapters::init(model, cfg, 5);
  const auto b = LoraAdapters::init(model, cfg, 5);
  const auto& q = a.layers[0][0];
  EXPECT_EQ(q.a.rows(), 4);
  EXPECT_EQ(q.a.cols(), model.config.hidden_size);
  EXPECT_EQ(q.b.rows(), model.config.q_dim());
  EXPECT_EQ(q.b.cwiseAbs().maxCoeff(), 0.0f);
  EXPECT_LE(q.a.cwiseAbs().maxCoeff(), 1.0f / std::sqrt(16.0f));
  EXPECT_EQ(q.a, b.layers[0][0].a) << "same seed, same adapters";
  EXPECT_FALSE(a.layers[1][static_cast<int>(Linear::o_proj)].active());
  // 2 layers x (q [16->16], k, v [16->8: 2 kv heads of 4], gate, up [16->24], down) x rank x (in + out)
  const long long per_layer = 4LL * ((16 + 16) + (16 + 8) * 2 + (16 + 24) * 2 + (24 + 16));
  EXPECT_EQ(a.parameter_count(), 2 * per_layer);
}

TEST(Lora, MergedWeightsGiveTheLogitsOfTheUnmergedAdapters) {
  const auto model = random_llama(tiny_config(4, 2, false), 41, 0.3f);
  auto adapters = random_adapters(model, 0.1, 42);
  adapters.config.targets[static_cast<int>(Linear::o_proj)] = true;  // o_proj has no adapter: still merges fine
  const BatchShape shape{2, 8};
  const auto tokens = random_tokens(static_cast<int>(shape.rows()), model.config.vocab_size, 43);
  LoraLayerStack stack(model, adapters, nullptr, shape.seq_len);
  stack.set_dropout(false, {});
  Matrix hidden = embed_tokens(model, tokens);
  for (int l = 0; l < model.config.num_layers; ++l) stack.forward(l, shape, hidden);
  const Matrix unmerged = output_logits(model, hidden);
  LlamaModel merged = model;
  merge_lora(merged, adapters);
  const Matrix logits = forward_logits(merged, tokens, shape);
  const float diff = (logits - unmerged).cwiseAbs().maxCoeff();
  std::printf("[lora] merged vs unmerged logits: max |diff| %.3g (max |logit| %.3g)\n", diff,
              unmerged.cwiseAbs().maxCoeff());
  EXPECT_LE(diff, 1e-5f * unmerged.cwiseAbs().maxCoeff());
  EXPECT_GT((logits - forward_logits(model, tokens, shape)).cwiseAbs().maxCoeff(), 1e-2f) << "the adapters do something";
}

TEST(Lora, ScheduleClipAndAdamW) {
  EXPECT_DOUBLE_EQ(warmup_cosine_lr(1.0, 0, 100, 10), 0.0);
  EXPECT_DOUBLE_EQ(warmup_cosine_lr(1.0, 5, 100, 10), 0.5);
  EXPECT_DOUBLE_EQ(warmup_cosine_lr(1.0, 10, 100, 10), 1.0);
  EXPECT_NEAR(warmup_cosine_lr(1.0, 55, 100, 10), 0.5, 1e-12);
  EXPECT_NEAR(warmup_cosine_lr(1.0, 100, 100, 10), 0.0, 1e-12);
  EXPECT_DOUBLE_EQ(warmup_cosine_lr(2.0, 0, 10, 0), 2.0);

  const auto model = random_llama(tiny_config(4, 2, true), 51, 0.3f);
  LoraConfig cfg;
  cfg.rank = 2;
  auto g = LoraAdapters::init(model, cfg, 1);
  g.for_each([](Matrix& m) { m.setConstant(1.0f); });
  const double n = std::sqrt(static_cast<double>(g.parameter_count()));
  EXPECT_NEAR(clip_global_norm(g, 0), n, 1e-9 * n);
  EXPECT_NEAR(clip_global_norm(g, 1.0), n, 1e-9 * n);
  EXPECT_NEAR(clip_global_norm(g, 0), 1.0, 1e-5);

  // AdamW: decoupled decay shrinks the parameter by lr*wd before the Adam step (PyTorch).
  Matrix p = Matrix::Constant(1, 1, 2.0f), grad = Matrix::Constant(1, 1, 0.5f);
  AdamState st;
  AdamW opt;
  opt.lr = 0.1;
  opt.weight_decay = 0.5;
  opt.step(p, grad, st);
  EXPECT_NEAR(p(0, 0), 2.0 * (1 - 0.05) - 0.1, 1e-6);  // first Adam step moves by lr
}

// Training on a damaged model (weights with noise, a stand-in for quantization error) lowers the
// loss on held-out text.
TEST(Lora, TrainingLowersHeldOutLossOfADamagedModel) {
  LlamaModel model = load_model(test::model_dir("stories260K"));
  std::mt19937_64 rng(3);
  for (auto& layer : model.layers)
    for (Linear which : kAllLinears) {
      Matrix& w = layer.linear(which);
      const float sd = std::sqrt(w.squaredNorm() / static_cast<float>(w.size()));
      std::normal_distribution<float> noise(0.0f, 0.5f * sd);
      for (Index i = 0; i < w.size(); ++i) w.data()[i] += noise(rng);
    }
  const Tokenizer tok(test::model_dir("stories260K") / "tokenizer.model");
  const auto train = perplexity_stream(tok, read_text_file(test::data_file("tinystories/calib.txt")), 1);
  const auto valid = perplexity_stream(tok, read_text_file(test::data_file("tinystories/valid.txt")), 1);
  std::vector<std::vector<int>> held_out;
  for (int i = 0; i < 8; ++i) held_out.emplace_back(valid.begin() + i * 128, valid.begin() + (i + 1) * 128);
  LoraConfig cfg;
  cfg.rank = 8;
  cfg.alpha = 16;
  auto adapters = LoraAdapters::init(model, cfg, 7);
  const double before = lora_eval_loss(model, adapters, held_out);
  LoraTrainOptions o;
  o.seq_len = 128;
  o.steps = 40;
  o.batch = 4;
  o.lr = 3e-3;
  int calls = 0;
  o.on_step = [&](const LoraTrainOptions::Step& s) {
    ++calls;
    EXPECT_EQ(s.steps, 40);
    EXPECT_GT(s.tokens_per_s, 0);
  };
  const auto r = train_lora(model, adapters, train, o);
  const double after = lora_eval_loss(model, adapters, held_out);
  std::printf("[lora] held-out NLL %.4f -> %.4f after %d steps (%.0f tokens/s)\n", before, after, o.steps,
              r.tokens_per_s());
  EXPECT_EQ(calls, 40);
  EXPECT_EQ(r.loss.size(), 40u);
  EXPECT_LT(after, before - 0.05);
  // Merging keeps what was learned.
  LlamaModel merged = model;
  merge_lora(merged, adapters);
  CausalLmLoss total;
  PlainLayerStack plain(merged, 128, nullptr);
  for (const auto& w : held_out) {
    const auto l = causal_lm_loss(merged, plain, w, {1, 128});
    total.nll_sum += l.nll_sum;
    total.predicted += l.predicted;
  }
  EXPECT_NEAR(total.mean(), after, 1e-4);
}

}  // namespace
}  // namespace ptqlab
