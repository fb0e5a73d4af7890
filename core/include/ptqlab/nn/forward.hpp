#pragma once
// LLaMA decoder forward pass in Eigen (float32), batched over equal-length sequences and
// parallelised with TBB. The pieces are exposed one by one because calibration (layer by layer)
// and block reconstruction need them separately:
//
//   hidden = embed_tokens(model, tokens)                      [batch*seq_len, hidden]
//   for each layer: decoder_layer_forward(..., hidden)        in place
//   logits = output_logits(model, hidden)                     final RMSNorm + lm_head
//
// Rows are tokens: row b*seq_len + t holds sequence b at position t; every sequence starts at
// position 0.
#include <functional>
#include <span>
#include <vector>

#include "ptqlab/model/model.hpp"

namespace ptqlab {

struct BatchShape {
  int batch = 1;
  int seq_len = 0;
  Eigen::Index rows() const { return static_cast<Eigen::Index>(batch) * seq_len; }
};

// The inputs of the linear layers of a decoder layer. q/k/v share one input, gate/up another.
enum class LinearInput { attn_in, o_in, mlp_in, down_in };
const char* linear_input_name(LinearInput which);
LinearInput input_of(Linear which);

// Sees the input of every linear layer during a forward pass (calibration statistics, Hessians).
// Called on the thread that runs decoder_layer_forward; must be thread-safe if several batches run
// concurrently.
class ForwardObserver {
 public:
  virtual ~ForwardObserver() = default;
  virtual void on_linear_input(int layer, LinearInput which, const Matrix& x, BatchShape shape) = 0;
};

// cos/sin tables for rotary embeddings (HF rotate_half convention), computed in double.
class RopeTable {
 public:
  RopeTable(int head_dim, double theta, int max_positions);
  int half() const { return half_; }
  int max_positions() const { return max_positions_; }
  const float* cos(int pos) const { return cos_.data() + static_cast<std::size_t>(pos) * half_; }
  const float* sin(int pos) const { return sin_.data() + static_cast<std::size_t>(pos) * half_; }

 private:
  int half_;
  int max_positions_;
  std::vector<float> cos_, sin_;
};

// y = x Wᵀ for W in nn.Linear layout [out, in]. Large products are split into fixed tiles run in
// parallel; the tiling does not depend on the thread count, so results are bit-identical for any
// number of threads.
// `w` may be a resident matrix or a map of mapped/widened weights (LayerView): no copy either way.
void linear_forward(const Eigen::Ref<const Matrix>& x, const Eigen::Ref<const Matrix>& w, Matrix& y);
void rms_norm(const Matrix& x, const Eigen::Ref<const Vector>& weight, float eps, Matrix& out);
// Rotates each head of x ([rows, n_heads*head_dim]) in place.
void apply_rope(Matrix& x, int n_heads, int head_dim, const RopeTable& rope, BatchShape shape);
// Causal scaled-dot-product attention with grouped-query heads: query head h reads kv head
// h / (n_heads / n_kv_heads). q: [rows, n_heads*head_dim], k/v: [rows, n_kv_heads*head_dim].
void causal_attention(const Matrix& q, const Matrix& k, const Matrix& v, int n_heads, int n_kv_heads,
                      int head_dim, BatchShape shape, Matrix& out);

Matrix embed_tokens(const LlamaModel& model, std::span<const int> tokens);
void decoder_layer_forward(const LlamaConfig& config, const DecoderLayer& layer, const RopeTable& rope,
                           BatchShape shape, Matrix& hidden, int layer_index = -1,
                           ForwardObserver* observer = nullptr);
// The same arithmetic on a layer however it is stored (LlamaModel::layer_view).
void decoder_layer_forward(const LlamaConfig& config, const LayerView& layer, const RopeTable& rope,
                           BatchShape shape, Matrix& hidden, int layer_index = -1,
                           ForwardObserver* observer = nullptr);
// Every decoder layer on several batches, layer by layer: layer l's float32 weights are made once
// (widened when stored as F16/BF16) and every batch goes through them before layer l+1, so one
// layer's float32 weights are in memory at a time. Each batch's arithmetic is exactly that of
// forward_logits (same operations in the same order), so results are bit-identical to it.
// `between_layers` (optional) is called before each layer (progress, stop requests).
void decoder_forward_layer_major(const LlamaModel& model, std::vector<Matrix>& hidden,
                                 std::span<const BatchShape> shapes, ForwardObserver* observer = nullptr,
                                 const std::function<void(int)>& between_layers = {});
// Final RMSNorm then lm_head: [rows, vocab].
Matrix output_logits(const LlamaModel& model, const Matrix& hidden);
// The summed next-token NLL of each sequence from the hidden states after the last decoder layer
// (what sequence_nll does after the decoder), with the head already made (LlamaModel::head_view).
std::vector<double> sequence_nll_from_hidden(const LlamaModel& model, const Eigen::Ref<const Matrix>& head,
                                             const Matrix& hidden, std::span<const int> tokens, BatchShape shape);

// Whole model: tokens (batch*seq_len ids) -> logits [batch*seq_len, vocab].
Matrix forward_logits(const LlamaModel& model, std::span<const int> tokens, BatchShape shape,
                      ForwardObserver* observer = nullptr);

// Whole model up to the final RMSNorm: [batch*seq_len, hidden]; logits of any row are that row
// times output_head()ᵀ. The scoring functions (ptqlab/scoring.hpp) make logits from it for the
// positions they need only.
Matrix final_hidden_states(const LlamaModel& model, std::span<const int> tokens, BatchShape shape);

// Whole model, reduced to the summed next-token negative log-likelihood of each sequence
// (positions 0..seq_len-2 predict 1..seq_len-1), in double. Never materialises the full
// [rows, vocab] logits, so memory stays bounded for large vocabularies.
std::vector<double> sequence_nll(const LlamaModel& model, std::span<const int> tokens, BatchShape shape);

}  // namespace ptqlab
