// Full-model causal-LM loss and backward with per-layer activation checkpointing
// (docs/backward.md, "The whole model").
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "ptqlab/nn/model_backward.hpp"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include "ptqlab/support/error.hpp"

namespace ptqlab {

using Eigen::Index;

namespace {

// Rows of logits alive at once: 256 x vocab (32 MB at LLaMA's 32000-token vocabulary).
constexpr Index kHeadChunk = 256;

void check_window(const LlamaModel& model, std::span<const int> tokens, BatchShape shape) {
  if (shape.batch <= 0 || shape.seq_len < 2 || static_cast<Index>(tokens.size()) != shape.rows())
    throw Error(fmt::format("causal-LM loss: {} tokens do not form {} sequences of {} (>= 2) tokens", tokens.size(),
                            shape.batch, shape.seq_len));
  if (shape.seq_len > model.config.max_position_embeddings)
    throw Error(fmt::format("causal-LM loss: sequence length {} exceeds max_position_embeddings {}", shape.seq_len,
                            model.config.max_position_embeddings));
}

// Cross-entropy of one chunk of rows given their logits. Writes grad_scale * dNLL/dlogits into
// `logits` in place (softmax - onehot; zero rows at the last position of a window, which predicts
// nothing) and returns the summed NLL. Per-row sums are added in row order (thread-independent).
double cross_entropy_chunk(Matrix& logits, std::span<const int> tokens, Index row0, BatchShape shape,
                           double grad_scale, long long& predicted) {
  const Index n = logits.rows();
  std::vector<double> nll(static_cast<std::size_t>(n), 0.0);
  tbb::parallel_for(tbb::blocked_range<Index>(0, n, 64), [&](const tbb::blocked_range<Index>& r) {
    for (Index i = r.begin(); i < r.end(); ++i) {
      const Index row = row0 + i;
      auto z = logits.row(i);
      if ((row + 1) % shape.seq_len == 0) {  // last position of its window
        z.setZero();
        continue;
      }
      const int target = tokens[static_cast<std::size_t>(row + 1)];
      const float m = z.maxCoeff();
      const double target_logit = static_cast<double>(z(target)) - m;
      z.array() = (z.array() - m).exp();
      const double sum = z.cast<double>().sum();
      nll[static_cast<std::size_t>(i)] = std::log(sum) - target_logit;
      z *= static_cast<float>(grad_scale / sum);
      z(target) -= static_cast<float>(grad_scale);
    }
  });
  double total = 0;
  for (Index i = 0; i < n; ++i) {
    total += nll[static_cast<std::size_t>(i)];
    predicted += (row0 + i + 1) % shape.seq_len != 0;
  }
  return total;
}

}  // namespace

void HeadGrads::reset(const LlamaModel& model) {
  embed.setZero(model.embed.rows(), model.embed.cols());
  final_norm.setZero(model.final_norm.size());
  if (model.lm_head.size() > 0)
    lm_head.setZero(model.lm_head.rows(), model.lm_head.cols());
  else
    lm_head.resize(0, 0);
}

void ModelGrads::reset(const LlamaModel& model) {
  head.reset(model);
  layers.resize(model.layers.size());
  for (std::size_t l = 0; l < layers.size(); ++l) layers[l].reset(model.layers[l]);
}

CausalLmLoss causal_lm_loss(const LlamaModel& model, LayerStack& layers, std::span<const int> tokens,
                            BatchShape shape) {
  check_window(model, tokens, shape);
  Matrix hidden = embed_tokens(model, tokens);
  for (int l = 0; l < model.config.num_layers; ++l) layers.forward(l, shape, hidden);
  Matrix normed, logits;
  rms_norm(hidden, model.final_norm, static_cast<float>(model.config.rms_norm_eps), normed);
  CausalLmLoss loss;
  for (Index r0 = 0; r0 < shape.rows(); r0 += kHeadChunk) {
    const Index n = std::min(kHeadChunk, shape.rows() - r0);
    linear_forward(normed.middleRows(r0, n), model.output_head(), logits);
    loss.nll_sum += cross_entropy_chunk(logits, tokens, r0, shape, 0.0, loss.predicted);
  }
  return loss;
}

CausalLmLoss causal_lm_backward(const LlamaModel& model, LayerStack& layers, std::span<const int> tokens,
                                BatchShape shape, double grad_scale, HeadGrads* head) {
  check_window(model, tokens, shape);
  const auto& c = model.config;
  const float eps = static_cast<float>(c.rms_norm_eps);
  const Index rows = shape.rows();

  // Forward, keeping only each layer's input (the checkpoints): L x rows x hidden floats.
  std::vector<Matrix> inputs(static_cast<std::size_t>(c.num_layers));
  Matrix hidden = embed_tokens(model, tokens);
  for (int l = 0; l < c.num_layers; ++l) {
    inputs[static_cast<std::size_t>(l)] = hidden;
    layers.forward(l, shape, hidden);
  }

  // Final norm, lm_head and cross-entropy, chunk by chunk: dL/dnormed = dlogits H, dH += dlogitsᵀ normed.
  const Vector inv_rms = rms_norm_inv_rms(hidden, eps);
  Matrix normed;
  rms_norm(hidden, model.final_norm, eps, normed);
  const Matrix& head_w = model.output_head();
  Matrix* grad_head = nullptr;
  if (head != nullptr) grad_head = model.lm_head.size() > 0 ? &head->lm_head : &head->embed;
  Matrix grad_normed(rows, c.hidden_size);
  CausalLmLoss loss;
  Matrix logits, chunk, grad_chunk;
  for (Index r0 = 0; r0 < rows; r0 += kHeadChunk) {
    const Index n = std::min(kHeadChunk, rows - r0);
    chunk = normed.middleRows(r0, n);
    linear_forward(chunk, head_w, logits);
    loss.nll_sum += cross_entropy_chunk(logits, tokens, r0, shape, grad_scale, loss.predicted);
    grad_chunk.setZero(n, c.hidden_size);
    if (grad_head != nullptr)
      linear_backward(chunk, head_w, logits, &grad_chunk, *grad_head);
    else
      linear_backward_input(head_w, logits, grad_chunk);
    grad_normed.middleRows(r0, n) = grad_chunk;
  }
  Matrix grad_hidden = Matrix::Zero(rows, c.hidden_size);
  Vector unused_norm_grad;
  rms_norm_backward(hidden, model.final_norm, inv_rms, grad_normed, &grad_hidden,
                    head != nullptr ? head->final_norm : unused_norm_grad);
  hidden.resize(0, 0);
  normed.resize(0, 0);

  // Layers in reverse: each recomputes its tape from its checkpoint (one tape alive at a time).
  Matrix grad_input;
  for (int l = c.num_layers - 1; l >= 0; --l) {
    layers.backward(l, shape, inputs[static_cast<std::size_t>(l)], grad_hidden, grad_input);
    std::swap(grad_hidden, grad_input);
    inputs[static_cast<std::size_t>(l)].resize(0, 0);
  }

  // Embedding: a row gather, so its gradient is a scatter-add (in token order).
  if (head != nullptr)
    for (Index i = 0; i < rows; ++i) head->embed.row(tokens[static_cast<std::size_t>(i)]) += grad_hidden.row(i);
  return loss;
}

PlainLayerStack::PlainLayerStack(const LlamaModel& model, int max_seq_len, std::vector<DecoderLayerGrads>* grads)
    : model_(model), rope_(model.config.head_dim, model.config.rope_theta, max_seq_len), grads_(grads) {}

void PlainLayerStack::forward(int l, BatchShape shape, Matrix& hidden) {
  decoder_layer_forward(model_.config, model_.layers[static_cast<std::size_t>(l)], rope_, shape, hidden);
}

void PlainLayerStack::backward(int l, BatchShape shape, const Matrix& input, const Matrix& grad_output,
                               Matrix& grad_input) {
  const auto& layer = model_.layers[static_cast<std::size_t>(l)];
  decoder_layer_forward_tape(model_.config, layer, rope_, shape, input, output_, tape_);
  decoder_layer_backward(model_.config, layer, rope_, shape, tape_, grad_output, (*grads_)[static_cast<std::size_t>(l)],
                         &grad_input, &scratch_);
}

CausalLmLoss causal_lm_backward(const LlamaModel& model, std::span<const int> tokens, BatchShape shape,
                                double grad_scale, ModelGrads& grads) {
  if (grads.layers.size() != model.layers.size()) grads.reset(model);
  PlainLayerStack stack(model, shape.seq_len, &grads.layers);
  return causal_lm_backward(model, stack, tokens, shape, grad_scale, &grads.head);
}

}  // namespace ptqlab
