#pragma once
// Hand-written backward pass through one LLaMA decoder layer (float32, Eigen + TBB), plus the
// block-reconstruction losses of PTQ1.61 (MSE and NLC, research/ptq161.md §5.1-5.2) and Adam.
// Written in the spirit of llm.c: one plain function per op, forward saves what backward needs
// in a tape, no autograd graph. The math of every op is in docs/backward.md.
//
//   DecoderLayerTape tape;
//   decoder_layer_forward_tape(config, layer, rope, shape, input, output, tape);
//   Matrix grad_output;  mse_loss(output, target, &grad_output); nlc_loss(output, target, &grad_output);
//   DecoderLayerGrads grads;   DecoderLayerScratch scratch;   // both reusable across steps
//   decoder_layer_backward(config, layer, rope, shape, tape, grad_output, grads, nullptr, &scratch);
//   // grads.linear_grad(Linear::q_proj) = dL/dW_q, [out, in] like the weight.
//
// Conventions (all functions in this header):
// - Activations are row-major [rows, features] with row b*seq_len + t = sequence b, position t,
//   exactly like forward.hpp.
// - Every gradient output ACCUMULATES (+=), like PyTorch's .grad and llm.c: an empty matrix or
//   vector is first created as zeros of the right shape; a sized one must already have that shape.
//   Zero the grads between optimizer steps (DecoderLayerGrads::reset).
// - Parallel loops use fixed partitions and never split a reduction across tasks, so every result
//   is bit-identical for any number of threads.
#include <array>
#include <cstddef>
#include <functional>
#include <span>

#include "ptqlab/model/model.hpp"
#include "ptqlab/nn/forward.hpp"

namespace ptqlab {

// ---------------------------------------------------------------------------------------------
// Op-level backward functions. Each takes what its forward op consumed (and, for RMSNorm, the
// saved inverse rms) and the gradient of the op's output.

// y = x Wᵀ (linear_forward).  grad_x += grad_y W   (when grad_x != nullptr),  grad_w += grad_yᵀ x.
// x: [n, in], w: [out, in], grad_y: [n, out].
void linear_backward(const Matrix& x, const Matrix& w, const Matrix& grad_y, Matrix* grad_x, Matrix& grad_w);
// Only the input gradient, for a frozen weight: grad_x += grad_y W.
void linear_backward_input(const Matrix& w, const Matrix& grad_y, Matrix& grad_x);

// Inverse rms of each row: 1 / sqrt(mean(x²) + eps), the factor rms_norm multiplies by.
Vector rms_norm_inv_rms(const Matrix& x, float eps);
// y = x * inv_rms * weight (rms_norm).  grad_x += inv*(w∘g) - x * inv³/H * Σ(w∘g∘x) per row
// (when grad_x != nullptr), grad_weight += Σ_rows g ∘ x * inv.  inv_rms: rms_norm_inv_rms(x, eps).
void rms_norm_backward(const Matrix& x, const Vector& weight, const Vector& inv_rms, const Matrix& grad_y,
                       Matrix* grad_x, Vector& grad_weight);

// RoPE is a rotation per (position, pair of dims), so its backward is the inverse rotation
// (angle -θ) applied to the gradient, in place: grad [rows, n_heads*head_dim] goes from dL/d(rope(x))
// to dL/dx.
void rope_backward(Matrix& grad, int n_heads, int head_dim, const RopeTable& rope, BatchShape shape);

// Backward of causal_attention(q, k, v) for q/k after rope. The softmax probabilities are not
// stored: they are recomputed from q and k (flash-attention style), one query at a time for head
// dims 4..32 and one tile of 64 queries for the others, so memory stays O(rows * dim) plus a
// scratch of O(seq_len * head_dim) (+ 64 x seq_len) per task. One task per (sequence, kv head).
// Per head: S = scale q kᵀ (causal), P = softmax(S), O = P v;  dP = dO vᵀ,
// dS = P ∘ (dP - rowsum(P ∘ dP)), dq += scale dS k, dk += scale dSᵀ q, dv += Pᵀ dO.
// With GQA the gradients of a kv head sum over the query heads that read it.
void causal_attention_backward(const Matrix& q, const Matrix& k, const Matrix& v, const Matrix& grad_out,
                               int n_heads, int n_kv_heads, int head_dim, BatchShape shape, Matrix& grad_q,
                               Matrix& grad_k, Matrix& grad_v);

// act = silu(gate) * up (SwiGLU), silu(g) = g σ(g), silu'(g) = σ(g) (1 + g (1 - σ(g))).
// grad_gate += grad_act ∘ up ∘ silu'(gate),  grad_up += grad_act ∘ silu(gate).
void swiglu_backward(const Matrix& gate, const Matrix& up, const Matrix& grad_act, Matrix& grad_gate,
                     Matrix& grad_up);

// ---------------------------------------------------------------------------------------------
// One decoder layer.

// What decoder_layer_backward needs from the forward pass (each op's inputs). Memory is
// rows * (8*hidden + 3*intermediate) floats when q_dim = kv_dim = hidden (LLaMA-7B at 2048
// tokens: 539 MB, i.e. 263 KB per token); no [seq_len, seq_len] attention matrix is kept.
struct DecoderLayerTape {
  BatchShape shape;
  Matrix input;     // x, the layer input (residual stream)            [rows, hidden]
  Vector inv_rms1;  // 1/sqrt(mean(x²)+eps) per row                    [rows]
  Matrix normed1;   // rms_norm(x, input_norm): input of q/k/v          [rows, hidden]
  Matrix q, k, v;   // projections, q and k after rope                 [rows, q_dim|kv_dim]
  Matrix attn;      // attention output: input of o_proj               [rows, q_dim]
  Matrix h1;        // x + attn Woᵀ: residual after attention          [rows, hidden]
  Vector inv_rms2;  // inverse rms of h1                               [rows]
  Matrix normed2;   // rms_norm(h1, post_norm): input of gate/up        [rows, hidden]
  Matrix gate, up;  // pre-activation projections                      [rows, intermediate]
  Matrix act;       // silu(gate) * up: input of down_proj             [rows, intermediate]

  std::size_t bytes() const;  // memory held by the tape
};

// The same math as decoder_layer_forward (same kernels, same order), recording the tape.
// output = h1 + act Wdᵀ.  `input` and `output` may not alias.
void decoder_layer_forward_tape(const LlamaConfig& config, const DecoderLayer& layer, const RopeTable& rope,
                                BatchShape shape, const Matrix& input, Matrix& output, DecoderLayerTape& tape);

// dL/d(parameters) of one decoder layer, shaped like the parameters.
struct DecoderLayerGrads {
  std::array<Matrix, 7> linear;  // dL/dW for q,k,v,o,gate,up,down (kAllLinears order), [out, in]
  Vector input_norm, post_norm;  // dL/d norm weights [hidden]

  Matrix& linear_grad(Linear which) { return linear[static_cast<std::size_t>(which)]; }
  const Matrix& linear_grad(Linear which) const { return linear[static_cast<std::size_t>(which)]; }
  // Shapes every gradient like `layer` and sets it to zero.
  void reset(const DecoderLayer& layer);
};

// The intermediate gradients of decoder_layer_backward (dL/d of each op's output). Passing the
// same scratch to every call of a training loop keeps their memory: fresh multi-megabyte buffers
// cost a page fault per 4 KB on first touch, which on a VM can exceed the arithmetic of a small
// layer (docs/backward.md). Its contents between calls mean nothing.
struct DecoderLayerScratch {
  Matrix grad_h1, grad_act, grad_gate, grad_up, grad_normed2;
  Matrix grad_attn, grad_q, grad_k, grad_v, grad_normed1;
};

// Given dL/d(output) ([rows, hidden]) and the tape of the forward pass, accumulates dL/dW of the
// seven linears and the two norm weights into `grads` (empty entries are created as zeros) and,
// when grad_input != nullptr, WRITES dL/d(input) to *grad_input (resized; not accumulated).
// `scratch` (optional) is reused for the intermediate gradients; without it they are allocated.
void decoder_layer_backward(const LlamaConfig& config, const DecoderLayer& layer, const RopeTable& rope,
                            BatchShape shape, const DecoderLayerTape& tape, const Matrix& grad_output,
                            DecoderLayerGrads& grads, Matrix* grad_input, DecoderLayerScratch* scratch = nullptr);

// One linear's backward inside decoder_layer_backward_with: ADDS dL/dx of y = x Wᵀ (plus whatever
// the caller adds to that linear) to grad_x and records the caller's parameter gradients.
using LinearBackward = std::function<void(Linear which, const Matrix& x, const Matrix& grad_y, Matrix& grad_x)>;

// The layer backward of decoder_layer_backward with each linear's backward supplied by the caller
// (restorative LoRA: the frozen base plus its adapters) and the norm weights' gradients
// accumulated into post_norm_grad / input_norm_grad. `input` is the layer input the tape was
// recorded from; no shape checks beyond the ops' own.
void decoder_layer_backward_with(const LlamaConfig& config, const DecoderLayer& layer, const RopeTable& rope,
                                 BatchShape shape, const DecoderLayerTape& tape, const Matrix& input,
                                 const Matrix& grad_output, const LinearBackward& linear_backward_of,
                                 Vector& post_norm_grad, Vector& input_norm_grad, Matrix* grad_input,
                                 DecoderLayerScratch& s);

// ---------------------------------------------------------------------------------------------
// Block-reconstruction losses (PTQ1.61 §5.1-5.2). Values are computed in double. When grad is
// not null, dLoss/dy is accumulated into *grad (created as zeros when empty), so that
// L = mse(y,a) + nlc(y,a) + mse(y,b) + nlc(y,b) builds one dL/dy.

// Mean over all rows*cols elements of (y - target)², no sqrt.  dL/dy = 2 (y - target) / N.
double mse_loss(const Matrix& y, const Matrix& target, Matrix* grad);

// Negative log of the absolute mean cosine similarity, per token (row) over the hidden dimension:
//   c_t = y_t·f_t / (max(|y_t|, 1e-8) max(|f_t|, 1e-8)) (torch.nn.CosineSimilarity, eps 1e-8),
//   C = mean over all rows of c_t,   L = -log |C|.
// dL/dy_t = -(1 / (C * rows)) (f_t / (|y_t||f_t|) - c_t y_t / |y_t|²)   (a clamped norm is a constant).
// The mean runs over every row of the batch (the paper uses batch 1).
double nlc_loss(const Matrix& y, const Matrix& target, Matrix* grad);

// ---------------------------------------------------------------------------------------------
// Adam, i.e. PyTorch's AdamW with weight_decay = 0 (PTQ1.61 §5.3), same update formula:
//   m = β1 m + (1-β1) g,  v = β2 v + (1-β2) g²,
//   p -= lr / (1-β1^t) * m / (sqrt(v) / sqrt(1-β2^t) + eps).
// One AdamState per parameter tensor (PyTorch keeps the step count per parameter too); use one
// Adam per parameter group (learning rate).
struct AdamState {
  Vector m, v;       // first and second moments, created as zeros on the first step
  long long t = 0;   // steps taken
};

struct Adam {
  double lr = 1e-3;
  double beta1 = 0.9, beta2 = 0.999;
  double eps = 1e-8;

  // One update of `param` (any contiguous float storage) given its gradient.
  void step(std::span<float> param, std::span<const float> grad, AdamState& state) const;
  void step(Matrix& param, const Matrix& grad, AdamState& state) const;
  void step(Vector& param, const Vector& grad, AdamState& state) const;
};

}  // namespace ptqlab
