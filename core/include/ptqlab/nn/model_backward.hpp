#pragma once
// Backward pass through the whole model for the causal-LM loss: embedding -> decoder layers ->
// final RMSNorm -> lm_head (tied or untied) -> cross-entropy, reusing the decoder-layer backward
// (backward.hpp). Used by restorative-LoRA training (lora.hpp); the math and the memory choice
// (activation checkpointing per layer) are in docs/backward.md, "The whole model".
//
//   ModelGrads grads;  grads.reset(model);
//   CausalLmLoss l = causal_lm_backward(model, tokens, shape, 1.0 / predicted_tokens, grads);
//   // l.nll_sum / l.predicted = mean next-token NLL; grads.embed = dL/dembed, ...
//
// Conventions as in backward.hpp: gradients accumulate, results do not depend on the thread count.
#include <span>
#include <vector>

#include "ptqlab/model/model.hpp"
#include "ptqlab/nn/backward.hpp"
#include "ptqlab/nn/forward.hpp"

namespace ptqlab {

// The decoder layers as the full-model pass drives them. The pass keeps only each layer's input
// and asks the stack to rerun a layer with a tape when its backward comes (checkpointing).
class LayerStack {
 public:
  virtual ~LayerStack() = default;
  // hidden <- layer l (hidden), no tape.
  virtual void forward(int l, BatchShape shape, Matrix& hidden) = 0;
  // Recomputes layer l's tape from `input`, accumulates the gradients of the layer's trainable
  // parameters given dL/d(output), and WRITES dL/d(input) to grad_input.
  virtual void backward(int l, BatchShape shape, const Matrix& input, const Matrix& grad_output,
                        Matrix& grad_input) = 0;
};

// What the loss saw: the summed next-token NLL (double) over `predicted` positions (positions
// 0..T-2 of each window predict 1..T-1).
struct CausalLmLoss {
  double nll_sum = 0;
  long long predicted = 0;
  double mean() const { return predicted > 0 ? nll_sum / static_cast<double>(predicted) : 0.0; }
};

// Gradients of the parameters outside the decoder layers. With a tied head the lm_head gradient
// is added to `embed` and `lm_head` stays empty.
struct HeadGrads {
  Matrix embed;       // [vocab, hidden]
  Vector final_norm;  // [hidden]
  Matrix lm_head;     // [vocab, hidden], untied models only
  void reset(const LlamaModel& model);
};

// The generic pass: loss = grad_scale * Σ NLL (so grad_scale = 1/predicted gives the mean, and
// 1/(tokens of the whole optimizer step) gives gradient accumulation). When `head` is null the
// embedding, final norm and lm_head are frozen (their gradients are not computed). The lm_head
// and cross-entropy run over chunks of rows so no [rows, vocab] logits matrix is ever held.
CausalLmLoss causal_lm_backward(const LlamaModel& model, LayerStack& layers, std::span<const int> tokens,
                                BatchShape shape, double grad_scale, HeadGrads* head);

// Forward only: the same loss, no gradients (held-out evaluation during training).
CausalLmLoss causal_lm_loss(const LlamaModel& model, LayerStack& layers, std::span<const int> tokens, BatchShape shape);

// Every parameter's gradient (full-model backward of the plain model).
struct ModelGrads {
  HeadGrads head;
  std::vector<DecoderLayerGrads> layers;
  void reset(const LlamaModel& model);
};

// The plain model's layers, every weight trainable: decoder_layer_forward_tape + decoder_layer_backward.
class PlainLayerStack : public LayerStack {
 public:
  PlainLayerStack(const LlamaModel& model, int max_seq_len, std::vector<DecoderLayerGrads>* grads);
  void forward(int l, BatchShape shape, Matrix& hidden) override;
  void backward(int l, BatchShape shape, const Matrix& input, const Matrix& grad_output, Matrix& grad_input) override;

 private:
  const LlamaModel& model_;
  RopeTable rope_;
  std::vector<DecoderLayerGrads>* grads_;
  DecoderLayerTape tape_;
  DecoderLayerScratch scratch_;
  Matrix output_;
};

// Convenience: dL/d(every parameter) of grad_scale * Σ NLL for the plain model.
CausalLmLoss causal_lm_backward(const LlamaModel& model, std::span<const int> tokens, BatchShape shape,
                                double grad_scale, ModelGrads& grads);

}  // namespace ptqlab
