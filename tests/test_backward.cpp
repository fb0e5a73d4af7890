// The hand-written backward pass (core/src/nn/backward.cpp) against central finite differences.
//
// How: the analytic gradients come from the float32 kernels; the finite differences are taken on
// the brute-force double-precision reference (reference_forward.hpp, or a double loop written
// here), so float noise does not pollute the differences. Double inputs are stepped by h; float
// parameters (weights) are stepped in float and divided by the step actually taken. The scalar is
// a random linear functional L = Σ R∘Y of the op's output (dL/dY = R), or the real loss.
//
// An entry passes when |analytic - fd| <= rtol * max(|fd|, 1% of the largest |fd| of the check):
// relative error for the gradients that matter, an absolute floor for those near zero.

// GCC 12 reports false "maybe-uninitialized" warnings inside Eigen's AVX-512 kernels.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>

#include <tbb/global_control.h>

#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/nn/backward.hpp"
#include "ptqlab/nn/forward.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/text_file.hpp"
#include "grad_check.hpp"
#include "reference_forward.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

using Eigen::Index;
using reference::Mat;

Matrix random_matrix(Index rows, Index cols, std::uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  Matrix m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = d(rng);
  return m;
}

// Σ R∘Y in double.
double functional(const Mat& y, const Matrix& r) {
  double s = 0;
  for (std::size_t i = 0; i < y.size(); ++i)
    for (std::size_t j = 0; j < y[i].size(); ++j) s += y[i][j] * static_cast<double>(r(i, j));
  return s;
}

// ---------------------------------------------------------------------------------------------
// Op by op.

TEST(Backward, LinearMatchesFiniteDifferences) {
  const Matrix x = random_matrix(14, 12, 1), w = random_matrix(10, 12, 2, 0.3f), r = random_matrix(14, 10, 3);
  Matrix dx, dw;
  linear_backward(x, w, r, &dx, dw);

  Mat xd = reference::from(x);
  Matrix wp = w;
  auto loss = [&] { return functional(reference::linear(xd, wp), r); };
  GradCheck gx{"linear dX"}, gw{"linear dW"};
  for (Index i = 0; i < x.rows(); ++i)
    for (Index j = 0; j < x.cols(); ++j) gx.add(dx(i, j), central(xd[i][j], 1e-4, loss));
  for (Index i = 0; i < w.rows(); ++i)
    for (Index j = 0; j < w.cols(); ++j) gw.add(dw(i, j), central(wp(i, j), 1e-3, loss));
  gx.expect();
  gw.expect();
}

TEST(Backward, LinearParallelPathsMatchPlainProductsForAnyThreadCount) {
  // (tokens, out, in): dX in 2x2 tiles with dW summed over 2 token chunks (a small weight);
  // then a large weight, whose dW is cut into 3x3 tiles.
  const std::array<std::array<Index, 3>, 2> shapes = {{{600, 280, 300}, {100, 600, 700}}};
  for (const auto& [n, out, in] : shapes) {
    const Matrix x = random_matrix(n, in, 4), w = random_matrix(out, in, 5, 0.1f), r = random_matrix(n, out, 6);
    Matrix dx, dw;
    linear_backward(x, w, r, &dx, dw);
    const Eigen::MatrixXd dx_ref = r.cast<double>() * w.cast<double>();
    const Eigen::MatrixXd dw_ref = r.cast<double>().transpose() * x.cast<double>();
    EXPECT_LT((dx.cast<double>() - dx_ref).cwiseAbs().maxCoeff() / dx_ref.cwiseAbs().maxCoeff(), 1e-5);
    EXPECT_LT((dw.cast<double>() - dw_ref).cwiseAbs().maxCoeff() / dw_ref.cwiseAbs().maxCoeff(), 1e-5);

    Matrix dx1, dw1;
    {
      tbb::global_control single(tbb::global_control::max_allowed_parallelism, 1);
      linear_backward(x, w, r, &dx1, dw1);
    }
    EXPECT_EQ(dx, dx1) << n << "x" << out << "x" << in;
    EXPECT_EQ(dw, dw1) << n << "x" << out << "x" << in;

    // Gradients accumulate: a second call adds the same again (exactly, g + g = 2g).
    linear_backward(x, w, r, &dx, dw);
    EXPECT_EQ(dx, Matrix(2 * dx1));
    EXPECT_EQ(dw, Matrix(2 * dw1));
  }

  // Shape mismatches are reported, not silently broadcast.
  const Matrix x = random_matrix(4, 3, 1), w = random_matrix(2, 3, 2), r = random_matrix(4, 2, 3);
  Matrix bad(3, 3), dw;
  EXPECT_THROW(linear_backward(x, w, r, &bad, dw), Error);
}

TEST(Backward, RmsNormMatchesFiniteDifferences) {
  const float eps = 1e-5f;
  const Matrix x = random_matrix(10, 16, 7, 2.0f), r = random_matrix(10, 16, 8);
  Vector w(16);
  for (Index i = 0; i < 16; ++i) w(i) = 1.0f + 0.1f * std::sin(static_cast<float>(i));
  const Vector inv = rms_norm_inv_rms(x, eps);
  for (Index i = 0; i < x.rows(); ++i)
    EXPECT_FLOAT_EQ(inv(i), 1.0f / std::sqrt(x.row(i).squaredNorm() / 16.0f + eps));
  Matrix dx;
  Vector dw;
  rms_norm_backward(x, w, inv, r, &dx, dw);

  Mat xd = reference::from(x);
  Vector wp = w;
  auto loss = [&] { return functional(reference::rms_norm(xd, wp, eps), r); };
  GradCheck gx{"rms_norm dX"}, gw{"rms_norm dweight"};
  for (Index i = 0; i < x.rows(); ++i)
    for (Index j = 0; j < x.cols(); ++j) gx.add(dx(i, j), central(xd[i][j], 1e-4, loss));
  for (Index j = 0; j < w.size(); ++j) gw.add(dw(j), central(wp(j), 1e-3, loss));
  gx.expect();
  gw.expect();

  // Without grad_x only the weight gradient is made, the same one.
  Vector dw2;
  rms_norm_backward(x, w, inv, r, nullptr, dw2);
  EXPECT_EQ(dw, dw2);
}

TEST(Backward, RopeMatchesFiniteDifferencesAndIsTheInverseRotation) {
  const int heads = 3, hd = 8;
  const BatchShape shape{2, 7};
  const RopeTable table(hd, 10000.0, shape.seq_len);
  const Matrix x = random_matrix(shape.rows(), heads * hd, 9), r = random_matrix(shape.rows(), heads * hd, 10);
  Matrix dx = r;
  rope_backward(dx, heads, hd, table, shape);

  Mat xd = reference::from(x);
  auto loss = [&] {
    Mat y = xd;
    reference::rope(y, heads, hd, 10000.0, shape.seq_len);
    return functional(y, r);
  };
  GradCheck g{"rope dX"};
  for (Index i = 0; i < x.rows(); ++i)
    for (Index j = 0; j < x.cols(); ++j) g.add(dx(i, j), central(xd[i][j], 1e-3, loss));
  g.expect();

  // A rotation's transpose is its inverse: backward(forward(x)) == x.
  Matrix y = x;
  apply_rope(y, heads, hd, table, shape);
  rope_backward(y, heads, hd, table, shape);
  EXPECT_LT((y - x).cwiseAbs().maxCoeff(), 1e-5);
}

TEST(Backward, SwigluMatchesFiniteDifferences) {
  const Matrix gate = random_matrix(10, 12, 11, 2.0f), up = random_matrix(10, 12, 12, 2.0f),
               r = random_matrix(10, 12, 13);
  Matrix dg, du;
  swiglu_backward(gate, up, r, dg, du);
  Mat gd = reference::from(gate), ud = reference::from(up);
  auto loss = [&] {
    double s = 0;
    for (Index i = 0; i < gate.rows(); ++i)
      for (Index j = 0; j < gate.cols(); ++j) s += gd[i][j] / (1.0 + std::exp(-gd[i][j])) * ud[i][j] * r(i, j);
    return s;
  };
  GradCheck gg{"swiglu dgate"}, gu{"swiglu dup"};
  for (Index i = 0; i < gate.rows(); ++i)
    for (Index j = 0; j < gate.cols(); ++j) {
      gg.add(dg(i, j), central(gd[i][j], 1e-4, loss));
      gu.add(du(i, j), central(ud[i][j], 1e-4, loss));
    }
  gg.expect();
  gu.expect();
}

struct AttentionCase {
  int batch, seq_len, heads, kv_heads, head_dim, max_entries;
};
void PrintTo(const AttentionCase& p, std::ostream* os) {
  *os << "batch " << p.batch << ", T " << p.seq_len << ", heads " << p.heads << "/" << p.kv_heads << ", head_dim "
      << p.head_dim;
}

class AttentionBackward : public ::testing::TestWithParam<AttentionCase> {};

TEST_P(AttentionBackward, MatchesFiniteDifferences) {
  const auto p = GetParam();
  const BatchShape shape{p.batch, p.seq_len};
  const Matrix q = random_matrix(shape.rows(), p.heads * p.head_dim, 21, 1.5f);
  const Matrix k = random_matrix(shape.rows(), p.kv_heads * p.head_dim, 22, 1.5f);
  const Matrix v = random_matrix(shape.rows(), p.kv_heads * p.head_dim, 23);
  const Matrix r = random_matrix(shape.rows(), p.heads * p.head_dim, 24);
  Matrix dq, dk, dv;
  causal_attention_backward(q, k, v, r, p.heads, p.kv_heads, p.head_dim, shape, dq, dk, dv);

  Mat qd = reference::from(q), kd = reference::from(k), vd = reference::from(v);
  auto loss = [&] {
    return functional(reference::attention(qd, kd, vd, p.heads, p.kv_heads, p.head_dim, p.batch, p.seq_len), r);
  };
  auto check = [&](const char* name, const Matrix& grad, Mat& xd, std::uint64_t seed) {
    GradCheck g{name};
    for (Index e : pick(grad.size(), p.max_entries, seed)) {
      const Index i = e / grad.cols(), j = e % grad.cols();
      g.add(grad(i, j), central(xd[i][j], 1e-4, loss));
    }
    g.expect();
  };
  check("attention dQ", dq, qd, 1);
  check("attention dK", dk, kd, 2);
  check("attention dV", dv, vd, 3);
}

INSTANTIATE_TEST_SUITE_P(Shapes, AttentionBackward,
                         ::testing::Values(AttentionCase{2, 7, 4, 2, 8, 100000},   // GQA 2:1, every entry
                                           AttentionCase{2, 9, 2, 2, 4, 100000},   // MHA, head dim 4
                                           AttentionCase{2, 5, 4, 1, 8, 100000},   // multi-query
                                           AttentionCase{2, 6, 3, 3, 16, 100000},  // MHA, head dim 16
                                           AttentionCase{2, 6, 2, 1, 32, 100000},  // largest small-head kernel
                                           AttentionCase{2, 9, 2, 1, 64, 600},     // GEMM path (head dim 64)
                                           AttentionCase{2, 7, 2, 1, 12, 100000},  // odd head dim: GEMM path
                                           AttentionCase{1, 150, 2, 1, 8, 300},    // 10 lane chunks
                                           AttentionCase{1, 150, 2, 1, 64, 200}),  // GEMM path, 3 query tiles
                         [](const auto& info) {
                           const auto& p = info.param;
                           return "b" + std::to_string(p.batch) + "_T" + std::to_string(p.seq_len) + "_h" +
                                  std::to_string(p.heads) + "_kv" + std::to_string(p.kv_heads) + "_d" +
                                  std::to_string(p.head_dim);
                         });

// ---------------------------------------------------------------------------------------------
// The whole decoder layer.

LlamaConfig layer_config(int hidden, int intermediate, int heads, int kv_heads, int head_dim) {
  LlamaConfig c;
  c.hidden_size = hidden;
  c.intermediate_size = intermediate;
  c.num_layers = 1;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.vocab_size = 11;
  c.max_position_embeddings = 512;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  return c;
}

struct LayerCase {
  const char* name;
  LlamaConfig config;
  int batch, seq_len;
};
void PrintTo(const LayerCase& p, std::ostream* os) { *os << p.name; }

class DecoderLayerBackward : public ::testing::TestWithParam<LayerCase> {};

TEST_P(DecoderLayerBackward, TapedForwardEqualsForward) {
  const auto& p = GetParam();
  const auto model = random_llama(p.config, 31, 0.3f);
  const BatchShape shape{p.batch, p.seq_len};
  const RopeTable rope(p.config.head_dim, p.config.rope_theta, p.seq_len);
  const Matrix input = random_matrix(shape.rows(), p.config.hidden_size, 32);
  Matrix expected = input, output;
  decoder_layer_forward(p.config, model.layers[0], rope, shape, expected);
  DecoderLayerTape tape;
  decoder_layer_forward_tape(p.config, model.layers[0], rope, shape, input, output, tape);
  EXPECT_LE((output - expected).cwiseAbs().maxCoeff(), 1e-6 * expected.cwiseAbs().maxCoeff());
  EXPECT_EQ(tape.input, input);
  std::printf("[tape] %s: taped forward vs decoder_layer_forward, max |diff| = %.3g\n", p.name,
              (output - expected).cwiseAbs().maxCoeff());
  Matrix same = input;
  EXPECT_THROW(decoder_layer_forward_tape(p.config, model.layers[0], rope, shape, same, same, tape), Error);
  EXPECT_EQ(tape.bytes(), sizeof(float) * static_cast<std::size_t>(
                                             shape.rows() * (4 * p.config.hidden_size + 2 * p.config.q_dim() +
                                                             2 * p.config.kv_dim() + 3 * p.config.intermediate_size + 2)));
}

TEST_P(DecoderLayerBackward, MatchesFiniteDifferences) {
  const auto& p = GetParam();
  const auto& c = p.config;
  const auto model = random_llama(c, 41, 0.3f);
  const DecoderLayer& layer = model.layers[0];
  const BatchShape shape{p.batch, p.seq_len};
  const RopeTable rope(c.head_dim, c.rope_theta, p.seq_len);
  const Matrix input = random_matrix(shape.rows(), c.hidden_size, 42);
  const Matrix r = random_matrix(shape.rows(), c.hidden_size, 43);

  Matrix output, grad_input;
  DecoderLayerTape tape;
  decoder_layer_forward_tape(c, layer, rope, shape, input, output, tape);
  DecoderLayerGrads grads;
  decoder_layer_backward(c, layer, rope, shape, tape, r, grads, &grad_input);

  // L = Σ R∘layer(x) on the double reference, with a copy of the layer to perturb.
  DecoderLayer lp = layer;
  Mat xd = reference::from(input);
  auto loss = [&] {
    Mat h = xd;
    reference::decoder_layer(c, lp, h, p.batch, p.seq_len);
    return functional(h, r);
  };
  for (Linear which : kAllLinears) {
    const Matrix& g = grads.linear_grad(which);
    Matrix& w = lp.linear(which);
    ASSERT_EQ(g.rows(), w.rows());
    ASSERT_EQ(g.cols(), w.cols());
    GradCheck check{std::string("layer d") + linear_name(which)};
    for (Index e : pick(w.size(), 120, 100 + static_cast<int>(which))) {
      const Index i = e / w.cols(), j = e % w.cols();
      check.add(g(i, j), central(w(i, j), 1e-3, loss));
    }
    check.expect();
  }
  GradCheck gin{"layer d input_norm"}, gpost{"layer d post_norm"}, gx{"layer d input"};
  for (Index j = 0; j < c.hidden_size; ++j) {
    gin.add(grads.input_norm(j), central(lp.input_norm(j), 1e-3, loss));
    gpost.add(grads.post_norm(j), central(lp.post_norm(j), 1e-3, loss));
  }
  for (Index i = 0; i < input.rows(); ++i)
    for (Index j = 0; j < input.cols(); ++j) gx.add(grad_input(i, j), central(xd[i][j], 1e-4, loss));
  gin.expect();
  gpost.expect();
  gx.expect();
}

INSTANTIATE_TEST_SUITE_P(
    Configs, DecoderLayerBackward,
    ::testing::Values(LayerCase{"gqa_h32_d8", layer_config(32, 48, 4, 2, 8), 2, 7},
                      LayerCase{"mha_h16_d4", layer_config(16, 40, 4, 4, 4), 2, 9},
                      LayerCase{"mqa_h24_d8", layer_config(24, 32, 3, 1, 8), 2, 5},
                      LayerCase{"mha_h16_qdim32", layer_config(16, 24, 4, 4, 8), 2, 6},  // q_dim != hidden
                      LayerCase{"gqa_h20_qdim16", layer_config(20, 28, 2, 1, 8), 2, 8}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(Backward, LayerGradientsAccumulateAndDoNotDependOnThreads) {
  // Big enough for tiled GEMMs (600 rows, several dW tiles) and several query tiles (T 200).
  const auto c = layer_config(320, 600, 5, 5, 64);
  const auto model = random_llama(c, 51, 0.05f);
  const BatchShape shape{3, 200};
  const RopeTable rope(c.head_dim, c.rope_theta, shape.seq_len);
  const Matrix input = random_matrix(shape.rows(), c.hidden_size, 52);
  const Matrix r = random_matrix(shape.rows(), c.hidden_size, 53);

  auto run = [&](DecoderLayerGrads& grads, Matrix* grad_input) {
    Matrix output;
    DecoderLayerTape tape;
    decoder_layer_forward_tape(c, model.layers[0], rope, shape, input, output, tape);
    decoder_layer_backward(c, model.layers[0], rope, shape, tape, r, grads, grad_input);
  };
  DecoderLayerGrads one, many;
  Matrix gx_one, gx_many;
  {
    tbb::global_control single(tbb::global_control::max_allowed_parallelism, 1);
    run(one, &gx_one);
  }
  run(many, &gx_many);
  for (Linear which : kAllLinears) EXPECT_EQ(one.linear_grad(which), many.linear_grad(which)) << linear_name(which);
  EXPECT_EQ(one.input_norm, many.input_norm);
  EXPECT_EQ(one.post_norm, many.post_norm);
  EXPECT_EQ(gx_one, gx_many);

  // A second backward without grad_input adds the same gradients again; reset() zeroes them.
  // This one reuses a scratch (and the tape) across calls, which must not change anything.
  DecoderLayerScratch scratch;
  DecoderLayerTape tape;
  Matrix output;
  for (int i = 0; i < 2; ++i) {
    decoder_layer_forward_tape(c, model.layers[0], rope, shape, input, output, tape);
    many.reset(model.layers[0]);
    decoder_layer_backward(c, model.layers[0], rope, shape, tape, r, many, &gx_many, &scratch);
    for (Linear which : kAllLinears) EXPECT_EQ(one.linear_grad(which), many.linear_grad(which)) << i;
    EXPECT_EQ(gx_one, gx_many) << i;
  }
  run(many, nullptr);
  for (Linear which : kAllLinears)
    EXPECT_EQ(many.linear_grad(which), Matrix(2 * one.linear_grad(which))) << linear_name(which);
  EXPECT_EQ(many.post_norm, Vector(2 * one.post_norm));
  EXPECT_EQ(many.input_norm, Vector(2 * one.input_norm));
  many.reset(model.layers[0]);
  EXPECT_EQ(many.linear_grad(Linear::down_proj).rows(), c.hidden_size);
  EXPECT_EQ(many.linear_grad(Linear::down_proj).cols(), c.intermediate_size);
  EXPECT_EQ(many.linear_grad(Linear::q_proj).cwiseAbs().maxCoeff(), 0.0f);
}

// ---------------------------------------------------------------------------------------------
// Real weights, real text: stories260K layer 0 on a TinyStories window, trained on the actual
// block-reconstruction loss (MSE + NLC against the full-precision output) of a perturbed layer.

double mse_double(const Mat& y, const Matrix& t) {
  double s = 0;
  for (std::size_t i = 0; i < y.size(); ++i)
    for (std::size_t j = 0; j < y[i].size(); ++j) s += (y[i][j] - t(i, j)) * (y[i][j] - t(i, j));
  return s / (static_cast<double>(y.size()) * static_cast<double>(y[0].size()));
}

double nlc_double(const Mat& y, const Matrix& t) {
  double mean = 0;
  for (std::size_t i = 0; i < y.size(); ++i) {
    double dot = 0, yy = 0, tt = 0;
    for (std::size_t j = 0; j < y[i].size(); ++j) {
      dot += y[i][j] * t(i, j);
      yy += y[i][j] * y[i][j];
      tt += static_cast<double>(t(i, j)) * t(i, j);
    }
    mean += dot / (std::max(std::sqrt(yy), 1e-8) * std::max(std::sqrt(tt), 1e-8));
  }
  return -std::log(std::abs(mean / static_cast<double>(y.size())));
}

TEST(Backward, Stories260KLayer0OnRealTextMatchesFiniteDifferences) {
  const auto model = load_model(test::model_dir("stories260K"));
  const auto& c = model.config;
  const Tokenizer tok(test::model_dir("stories260K") / "tokenizer.model");
  auto tokens = perplexity_stream(tok, read_text_file(test::data_file("tinystories/valid.txt")), 1);
  const BatchShape shape{1, 64};
  tokens.resize(static_cast<std::size_t>(shape.rows()));
  const Matrix input = embed_tokens(model, tokens);
  const RopeTable rope(c.head_dim, c.rope_theta, shape.seq_len);

  // Target: the full-precision layer. Trained: the layer with every weight perturbed (a stand-in
  // for quantization error).
  Matrix target = input;
  decoder_layer_forward(c, model.layers[0], rope, shape, target);
  DecoderLayer layer = model.layers[0];
  std::mt19937_64 rng(61);
  for (Linear which : kAllLinears) {
    Matrix& w = layer.linear(which);
    const float sd = std::sqrt(w.squaredNorm() / static_cast<float>(w.size()));
    std::normal_distribution<float> noise(0.0f, 0.2f * sd);
    for (Index i = 0; i < w.size(); ++i) w.data()[i] += noise(rng);
  }

  Matrix output, grad_output;
  DecoderLayerTape tape;
  decoder_layer_forward_tape(c, layer, rope, shape, input, output, tape);
  const double mse = mse_loss(output, target, &grad_output);
  const double nlc = nlc_loss(output, target, &grad_output);
  DecoderLayerGrads grads;
  decoder_layer_backward(c, layer, rope, shape, tape, grad_output, grads, nullptr);

  Mat xd = reference::from(input);
  auto loss = [&] {
    Mat h = xd;
    reference::decoder_layer(c, layer, h, shape.batch, shape.seq_len);
    return mse_double(h, target) + nlc_double(h, target);
  };
  EXPECT_NEAR(mse + nlc, loss(), 1e-5 * (mse + nlc));
  std::printf("[fd] stories260K layer 0: mse %.4e, nlc %.4e\n", mse, nlc);
  for (Linear which : kAllLinears) {
    Matrix& w = layer.linear(which);
    GradCheck check{std::string("stories260K d") + linear_name(which)};
    for (Index e : pick(w.size(), 40, 200 + static_cast<int>(which))) {
      const Index i = e / w.cols(), j = e % w.cols();
      check.add(grads.linear_grad(which)(i, j), central(w(i, j), 1e-3, loss));
    }
    check.expect(2e-3);
  }
  GradCheck gin{"stories260K d input_norm"}, gpost{"stories260K d post_norm"};
  for (Index j : pick(c.hidden_size, 16, 300)) {
    gin.add(grads.input_norm(j), central(layer.input_norm(j), 1e-3, loss));
    gpost.add(grads.post_norm(j), central(layer.post_norm(j), 1e-3, loss));
  }
  gin.expect(2e-3);
  gpost.expect(2e-3);
}

// ---------------------------------------------------------------------------------------------
// Losses.

TEST(Loss, MseValueAndGradient) {
  Matrix y(2, 3), t(2, 3);
  y << 1, 2, 3, 4, 5, 6;
  t << 1, 0, 3, 0, 5, 3;
  Matrix grad;
  EXPECT_DOUBLE_EQ(mse_loss(y, t, &grad), (4.0 + 16.0 + 9.0) / 6.0);
  Matrix expected(2, 3);
  expected << 0, 4, 0, 8, 0, 6;
  expected /= 6.0f;
  EXPECT_LT((grad - expected).cwiseAbs().maxCoeff(), 1e-7);

  Matrix yr = random_matrix(6, 8, 71), tr = random_matrix(6, 8, 72), g;
  mse_loss(yr, tr, &g);
  GradCheck check{"mse dY"};
  for (Index i = 0; i < yr.size(); ++i)
    check.add(g.data()[i], central(yr.data()[i], 1e-3, [&] { return mse_loss(yr, tr, nullptr); }));
  check.expect();
}

TEST(Loss, NlcValueAndGradient) {
  // Hand example: cos((1,0),(1,1)) = 1/√2, cos((0,2),(0,1)) = 1.
  Matrix y(2, 2), t(2, 2);
  y << 1, 0, 0, 2;
  t << 1, 1, 0, 1;
  EXPECT_NEAR(nlc_loss(y, t, nullptr), -std::log((1.0 / std::sqrt(2.0) + 1.0) / 2.0), 1e-12);
  // Same direction (any scale) or exactly opposite: |mean cos| = 1, loss 0, gradient 0.
  const Matrix a = random_matrix(5, 7, 73);
  Matrix g0;
  EXPECT_NEAR(nlc_loss(Matrix(3 * a), a, &g0), 0.0, 1e-12);
  EXPECT_LT(g0.cwiseAbs().maxCoeff(), 1e-6);
  EXPECT_NEAR(nlc_loss(Matrix(-a), a, nullptr), 0.0, 1e-12);

  Matrix yr = random_matrix(6, 8, 74), tr = random_matrix(6, 8, 75), g;
  yr += tr;  // mostly aligned, as in block reconstruction
  nlc_loss(yr, tr, &g);
  GradCheck check{"nlc dY"};
  for (Index i = 0; i < yr.size(); ++i)
    check.add(g.data()[i], central(yr.data()[i], 1e-3, [&] { return nlc_loss(yr, tr, nullptr); }));
  check.expect();

  // A mean cosine below zero: the absolute value flips the sign of the gradient, still FD-exact.
  Matrix yn = random_matrix(6, 8, 76) - tr, gn;
  nlc_loss(yn, tr, &gn);
  GradCheck neg{"nlc dY (negative mean cos)"};
  for (Index i = 0; i < yn.size(); ++i)
    neg.add(gn.data()[i], central(yn.data()[i], 1e-3, [&] { return nlc_loss(yn, tr, nullptr); }));
  neg.expect();
}

TEST(Loss, NlcZeroRowIsGuardedLikeTorch) {
  // A zero row has cosine 0 (norm clamped to 1e-8), not NaN; the gradient stays finite.
  Matrix y = random_matrix(4, 6, 77), t = random_matrix(4, 6, 78), g;
  y.row(2).setZero();
  const double l = nlc_loss(y, t, &g);
  EXPECT_TRUE(std::isfinite(l));
  EXPECT_TRUE(g.allFinite());
  double mean = 0;
  for (Index i = 0; i < 4; ++i)
    if (i != 2) mean += y.row(i).cast<double>().normalized().dot(t.row(i).cast<double>().normalized());
  EXPECT_NEAR(l, -std::log(std::abs(mean / 4)), 1e-6);
}

TEST(Loss, GradientsAccumulateIntoOneBuffer) {
  const Matrix y = random_matrix(5, 9, 79), a = random_matrix(5, 9, 80), b = random_matrix(5, 9, 81);
  Matrix sum, g1, g2, g3, g4;
  const double l = mse_loss(y, a, &sum) + nlc_loss(y, a, &sum) + mse_loss(y, b, &sum) + nlc_loss(y, b, &sum);
  const double l2 = mse_loss(y, a, &g1) + nlc_loss(y, a, &g2) + mse_loss(y, b, &g3) + nlc_loss(y, b, &g4);
  EXPECT_EQ(l, l2);
  EXPECT_LT((sum - (g1 + g2 + g3 + g4)).cwiseAbs().maxCoeff(), 1e-6 * sum.cwiseAbs().maxCoeff());
}

// ---------------------------------------------------------------------------------------------
// Adam.

TEST(Adam, FirstStepsMatchHandComputedValues) {
  // p = 1, lr 0.1, gradients 0.5, -0.25, 1.0, with m̂ = m/(1-0.9^t), v̂ = v/(1-0.999^t):
  // t=1: m = 0.05, v = 0.00025, m̂ = 0.5, v̂ = 0.25, p = 1 - 0.1*0.5/(0.5+1e-8) = 0.9 (+2e-9)
  // t=2: m = 0.02, v = 0.00031225, m̂ = 0.02/0.19 = 0.105263, v̂ = 0.00031225/0.001999 = 0.156203,
  //      p = 0.9 - 0.1*0.105263/0.395225 = 0.873366
  // t=3: m = 0.118, v = 0.0013119..., p = 0.807555
  const Adam adam{.lr = 0.1};
  AdamState state;
  Vector p = Vector::Constant(1, 1.0f);
  const double expected[] = {0.900000002, 0.8733662987078463, 0.8075551396770898};
  const float grads[] = {0.5f, -0.25f, 1.0f};
  for (int t = 0; t < 3; ++t) {
    adam.step(p, Vector::Constant(1, grads[t]), state);
    EXPECT_NEAR(p(0), expected[t], 1e-6) << "step " << t + 1;
  }
  EXPECT_EQ(state.t, 3);
  EXPECT_NEAR(state.m(0), 0.9 * 0.02 + 0.1 * 1.0, 1e-7);

  // The step is invariant to the gradient's scale (up to eps): Adam's defining property.
  AdamState s2;
  Vector p2 = Vector::Constant(1, 1.0f);
  adam.step(p2, Vector::Constant(1, 500.0f), s2);
  EXPECT_NEAR(p2(0), 0.9, 1e-6);
}

TEST(Adam, ConvergesOnA2DQuadratic) {
  // f(p) = ½ (p - c)ᵀ A (p - c), A positive definite with off-diagonal coupling.
  Eigen::Matrix2f A;
  A << 3, 1, 1, 2;
  const Eigen::Vector2f c(1.0f, -2.0f);
  Matrix p = Matrix::Zero(1, 2);  // a Matrix parameter, through the Matrix overload
  AdamState state;
  const Adam adam{.lr = 0.05};
  double first = 0, last = 0;
  for (int t = 0; t < 1000; ++t) {
    const Eigen::Vector2f d = p.row(0).transpose() - c;
    const double f = 0.5 * d.dot(A * d);
    if (t == 0) first = f;
    last = f;
    const Eigen::Vector2f g = A * d;
    Matrix grad(1, 2);
    grad << g(0), g(1);
    adam.step(p, grad, state);
  }
  EXPECT_LT(last, 1e-8 * first);
  EXPECT_NEAR(p(0, 0), 1.0f, 1e-4);
  EXPECT_NEAR(p(0, 1), -2.0f, 1e-4);

  Vector small(3);
  EXPECT_THROW(adam.step(small, Vector(4), state), Error);
}

}  // namespace
}  // namespace ptqlab
