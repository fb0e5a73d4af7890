#pragma once
// LoRA adapters on the linears of the decoder layers, their forward/backward through the whole
// model (model_backward.hpp), merging, and a small causal-LM trainer (AdamW, linear warmup + cosine
// decay, global-norm clipping). Restorative LoRA (research/ptq161.md §6, docs/methods/
// restorative-lora.md) trains these on a fake-quantized model and merges them.
//
// A targeted linear W [out, in] computes  y = x Wᵀ + s · (drop(x) Aᵀ) Bᵀ,  s = alpha / rank,
// A [rank, in], B [out, rank], drop = inverted dropout with probability p (as PEFT's lora_dropout,
// which drops the adapter's input only). Merging gives W + s B A, the same map when p = 0.
#include <array>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <vector>

#include "ptqlab/model/model.hpp"
#include "ptqlab/nn/backward.hpp"
#include "ptqlab/nn/model_backward.hpp"

namespace ptqlab {

struct LoraConfig {
  int rank = 16;
  double alpha = 32;
  double dropout = 0.05;
  // Which linears get adapters (kAllLinears order). The reference code adapts all but o_proj.
  std::array<bool, 7> targets = {true, true, true, false, true, true, true};
  float scale() const { return static_cast<float>(alpha / rank); }
};

struct LoraAdapter {
  Matrix a;  // [rank, in]; empty when the linear is not targeted
  Matrix b;  // [out, rank]
  bool active() const { return a.size() > 0; }
};

struct LoraAdapters {
  LoraConfig config;
  std::vector<std::array<LoraAdapter, 7>> layers;  // [layer][linear]

  // PEFT's initialisation: A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming_uniform_ with a = sqrt(5)) from
  // std::mt19937_64(seed), B = 0, so the adapted model starts equal to the base model.
  static LoraAdapters init(const LlamaModel& model, const LoraConfig& config, std::uint64_t seed);
  // Same shapes, all zeros (gradients, optimizer moments).
  LoraAdapters zeros_like() const;
  long long parameter_count() const;
  // Calls f(tensor) for every A and B in a fixed order (layer, linear, A then B).
  void for_each(const std::function<void(Matrix&)>& f);
};

// W <- W + s B A for every adapter (the merged model computes what the adapted one does with p = 0).
void merge_lora(LlamaModel& model, const LoraAdapters& adapters);

// Which dropout mask to use: masks are a pure function of (seed, draw, layer, linear, element), so
// the recomputation during backward (checkpointing) and finite-difference tests see the same masks.
// Each micro-batch of training is one draw.
struct DropoutStream {
  std::uint64_t seed = 0;
  std::uint64_t draw = 0;
};

// The dropout factor of element `i` (row-major index into the [rows, in] adapter input) of one
// linear's adapter input: 0 (dropped, probability p) or 1/(1-p).
float lora_dropout_factor(DropoutStream stream, int layer, Linear which, std::uint64_t i, double p);

// The base model's layers with adapters: what causal_lm_backward drives. The base weights are
// frozen (no dW is computed); the gradients of A and B accumulate into `grads` (same shapes as the
// adapters). With dropout > 0 and `training` set, adapter inputs are dropped; otherwise not.
class LoraLayerStack : public LayerStack {
 public:
  LoraLayerStack(const LlamaModel& base, const LoraAdapters& adapters, LoraAdapters* grads, int max_seq_len);
  void set_dropout(bool training, DropoutStream stream) {
    training_ = training;
    stream_ = stream;
  }
  void forward(int l, BatchShape shape, Matrix& hidden) override;
  void backward(int l, BatchShape shape, const Matrix& input, const Matrix& grad_output, Matrix& grad_input) override;

  struct LinearTape {
    Matrix dropped;  // drop(x), empty when no dropout is applied (then x itself)
    Matrix u;        // drop(x) Aᵀ  [rows, rank]
  };

 private:
  void forward_tape(int l, BatchShape shape, const Matrix& input, Matrix& output);
  void adapted_forward(int l, Linear which, const Matrix& x, Matrix& y, BatchShape shape);
  void adapted_backward(int l, Linear which, const Matrix& x, const Matrix& grad_y, Matrix& grad_x);

  const LlamaModel& base_;
  const LoraAdapters& adapters_;
  LoraAdapters* grads_;
  RopeTable rope_;
  bool training_ = false;
  DropoutStream stream_;
  DecoderLayerTape tape_;
  std::array<LinearTape, 7> linear_tape_;
  DecoderLayerScratch scratch_;
  Matrix output_, delta_, grad_u_, grad_dropped_;
  Vector unused_norm_grad_;
};

// Learning rate of optimizer step k (0-based) of `total`: linear warmup from 0 over `warmup` steps,
// then cosine decay to 0 (HF get_cosine_schedule_with_warmup).
double warmup_cosine_lr(double peak, long long step, long long total, long long warmup);

// PyTorch AdamW: p *= 1 - lr·wd (decoupled weight decay), then Adam with this lr.
struct AdamW {
  double lr = 1e-4;
  double weight_decay = 0;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  void step(Matrix& param, const Matrix& grad, AdamState& state) const;
};

// Scales all gradients so their global L2 norm is at most max_norm (torch clip_grad_norm_:
// factor max_norm / (norm + 1e-6) when below 1). Returns the norm before clipping. max_norm <= 0:
// no clipping.
double clip_global_norm(LoraAdapters& grads, double max_norm);

struct LoraTrainOptions {
  int seq_len = 256;
  int steps = 200;          // optimizer steps
  int batch = 4;            // windows per micro-batch
  int accumulation = 1;     // micro-batches per optimizer step
  double lr = 1e-3;
  double warmup_fraction = 0.05;
  double weight_decay = 0;
  double clip = 1.0;
  std::uint64_t seed = 42;  // window sampling and dropout masks
  // Called after every optimizer step.
  struct Step {
    int step, steps;
    double loss, lr, grad_norm, tokens_per_s, elapsed_s;
  };
  std::function<void(const Step&)> on_step;
};

struct LoraTrainResult {
  std::vector<double> loss, lr, grad_norm;  // per optimizer step (loss: mean NLL of its windows)
  long long tokens = 0;                     // tokens processed (forward + backward)
  double seconds = 0;
  double tokens_per_s() const { return seconds > 0 ? static_cast<double>(tokens) / seconds : 0.0; }
};

// Trains `adapters` on windows of `seq_len` tokens drawn uniformly from `stream` (a token stream,
// std::mt19937_64(seed)) with the causal-LM loss of the frozen `base` + adapters.
LoraTrainResult train_lora(const LlamaModel& base, LoraAdapters& adapters, const std::vector<int>& stream,
                           const LoraTrainOptions& options);

// Mean next-token NLL of base + adapters (no dropout) over `windows` (each of equal length).
double lora_eval_loss(const LlamaModel& base, const LoraAdapters& adapters, const std::vector<std::vector<int>>& windows);

}  // namespace ptqlab
