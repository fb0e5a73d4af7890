// LoRA adapters: forward/backward through a decoder layer with frozen base weights, merge, and
// the restorative-LoRA trainer (docs/methods/restorative-lora.md).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "lora.hpp"

#include <chrono>
#include <cmath>
#include <numbers>
#include <random>

#include <fmt/format.h>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>

#include "ptqlab/nn/forward.hpp"
#include "ptqlab/support/error.hpp"

namespace ptqlab {

using Eigen::Index;

namespace {

std::size_t idx(Linear which) { return static_cast<std::size_t>(which); }

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

// The dropout key of one (draw, layer, linear): every element's keep/drop is a hash of it and the
// element's index, so masks need no storage and do not depend on threads.
std::uint64_t mask_key(DropoutStream s, int layer, Linear which) {
  return splitmix64(splitmix64(splitmix64(s.seed) ^ s.draw) ^ (static_cast<std::uint64_t>(layer) * 8 + idx(which)));
}

// 1/(1-p) when element i is kept, 0 when dropped.
inline float keep_factor(std::uint64_t key, std::uint64_t i, double p, float inv_keep) {
  const double u = static_cast<double>(splitmix64(key ^ (i * 0xd1342543de82ef95ull)) >> 11) * 0x1.0p-53;
  return u < p ? 0.0f : inv_keep;
}

// out = x ∘ mask or grad_x += g ∘ mask, row-parallel with a fixed partition.
template <class F>
void for_each_row(Index rows, F&& f) {
  tbb::parallel_for(tbb::blocked_range<Index>(0, rows, 256), [&](const tbb::blocked_range<Index>& r) {
    for (Index i = r.begin(); i < r.end(); ++i) f(i);
  });
}

Matrix& zeroed(Matrix& m, Index rows, Index cols) {
  m.setZero(rows, cols);
  return m;
}

std::vector<Matrix*> tensors_of(LoraAdapters& a) {
  std::vector<Matrix*> out;
  a.for_each([&](Matrix& m) { out.push_back(&m); });
  return out;
}

}  // namespace

float lora_dropout_factor(DropoutStream stream, int layer, Linear which, std::uint64_t i, double p) {
  return keep_factor(mask_key(stream, layer, which), i, p, static_cast<float>(1.0 / (1.0 - p)));
}

// ---------------------------------------------------------------------------------------------
// Adapters.

LoraAdapters LoraAdapters::init(const LlamaModel& model, const LoraConfig& config, std::uint64_t seed) {
  if (config.rank < 1) throw Error(fmt::format("lora: rank must be >= 1, got {}", config.rank));
  if (!(config.dropout >= 0 && config.dropout < 1))
    throw Error(fmt::format("lora: dropout must be in [0, 1), got {}", config.dropout));
  LoraAdapters a;
  a.config = config;
  a.layers.resize(model.layers.size());
  std::mt19937_64 rng(seed);
  for (std::size_t l = 0; l < model.layers.size(); ++l)
    for (Linear which : kAllLinears) {
      if (!config.targets[idx(which)]) continue;
      const Matrix& w = model.layers[l].linear(which);
      auto& ad = a.layers[l][idx(which)];
      const double bound = 1.0 / std::sqrt(static_cast<double>(w.cols()));
      std::uniform_real_distribution<double> dist(-bound, bound);
      ad.a.resize(config.rank, w.cols());
      for (Index i = 0; i < ad.a.size(); ++i) ad.a.data()[i] = static_cast<float>(dist(rng));
      ad.b.setZero(w.rows(), config.rank);
    }
  return a;
}

LoraAdapters LoraAdapters::zeros_like() const {
  LoraAdapters z = *this;
  z.for_each([](Matrix& m) { m.setZero(); });
  return z;
}

long long LoraAdapters::parameter_count() const {
  long long n = 0;
  for (const auto& layer : layers)
    for (const auto& ad : layer) n += ad.a.size() + ad.b.size();
  return n;
}

void LoraAdapters::for_each(const std::function<void(Matrix&)>& f) {
  for (auto& layer : layers)
    for (auto& ad : layer)
      if (ad.active()) {
        f(ad.a);
        f(ad.b);
      }
}

void merge_lora(LlamaModel& model, const LoraAdapters& adapters) {
  if (adapters.layers.size() != model.layers.size())
    throw Error(fmt::format("lora: adapters for {} layers, model has {}", adapters.layers.size(), model.layers.size()));
  const float s = adapters.config.scale();
  for (std::size_t l = 0; l < model.layers.size(); ++l)
    for (Linear which : kAllLinears) {
      const auto& ad = adapters.layers[l][idx(which)];
      if (!ad.active()) continue;
      Matrix& w = model.layers[l].linear(which);
      if (ad.b.rows() != w.rows() || ad.a.cols() != w.cols())
        throw Error(fmt::format("lora: adapter of layer {} {} does not fit its weight", l, linear_name(which)));
      w.noalias() += s * (ad.b * ad.a);
    }
}

// ---------------------------------------------------------------------------------------------
// The adapted decoder layer: decoder_layer_forward_tape / decoder_layer_backward with every
// linear replaced by base + adapter, base frozen.

LoraLayerStack::LoraLayerStack(const LlamaModel& base, const LoraAdapters& adapters, LoraAdapters* grads,
                               int max_seq_len)
    : base_(base), adapters_(adapters), grads_(grads),
      rope_(base.config.head_dim, base.config.rope_theta, max_seq_len) {
  if (adapters.layers.size() != base.layers.size())
    throw Error(fmt::format("lora: adapters for {} layers, model has {}", adapters.layers.size(), base.layers.size()));
}

void LoraLayerStack::adapted_forward(int l, Linear which, const Matrix& x, Matrix& y, BatchShape) {
  linear_forward(x, base_.layers[static_cast<std::size_t>(l)].linear(which), y);
  const auto& ad = adapters_.layers[static_cast<std::size_t>(l)][idx(which)];
  auto& t = linear_tape_[idx(which)];
  if (!ad.active()) return;
  const double p = adapters_.config.dropout;
  const Matrix* in = &x;
  if (training_ && p > 0) {
    const std::uint64_t key = mask_key(stream_, l, which);
    const float inv_keep = static_cast<float>(1.0 / (1.0 - p));
    const Index cols = x.cols();
    t.dropped.resize(x.rows(), cols);
    for_each_row(x.rows(), [&](Index r) {
      for (Index c = 0; c < cols; ++c)
        t.dropped(r, c) = x(r, c) * keep_factor(key, static_cast<std::uint64_t>(r * cols + c), p, inv_keep);
    });
    in = &t.dropped;
  } else {
    t.dropped.resize(0, 0);
  }
  linear_forward(*in, ad.a, t.u);
  linear_forward(t.u, ad.b, delta_);
  y += adapters_.config.scale() * delta_;
}

void LoraLayerStack::adapted_backward(int l, Linear which, const Matrix& x, const Matrix& grad_y, Matrix& grad_x) {
  linear_backward_input(base_.layers[static_cast<std::size_t>(l)].linear(which), grad_y, grad_x);
  const auto& ad = adapters_.layers[static_cast<std::size_t>(l)][idx(which)];
  if (!ad.active()) return;
  auto& g = grads_->layers[static_cast<std::size_t>(l)][idx(which)];
  const auto& t = linear_tape_[idx(which)];
  const float s = adapters_.config.scale();
  // y += s u Bᵀ:  dB += s dyᵀ u,  du = s dy B.   u = xd Aᵀ:  dA += duᵀ xd,  dxd = du A.
  Matrix grad_b = Matrix::Zero(ad.b.rows(), ad.b.cols());
  linear_backward(t.u, ad.b, grad_y, &zeroed(grad_u_, grad_y.rows(), ad.b.cols()), grad_b);
  g.b += s * grad_b;
  grad_u_ *= s;
  const bool dropped = t.dropped.size() > 0;
  linear_backward(dropped ? t.dropped : x, ad.a, grad_u_, &zeroed(grad_dropped_, x.rows(), x.cols()), g.a);
  if (!dropped) {
    grad_x += grad_dropped_;
    return;
  }
  const double p = adapters_.config.dropout;
  const std::uint64_t key = mask_key(stream_, l, which);
  const float inv_keep = static_cast<float>(1.0 / (1.0 - p));
  const Index cols = x.cols();
  for_each_row(x.rows(), [&](Index r) {
    for (Index c = 0; c < cols; ++c)
      grad_x(r, c) += grad_dropped_(r, c) * keep_factor(key, static_cast<std::uint64_t>(r * cols + c), p, inv_keep);
  });
}

void LoraLayerStack::forward_tape(int l, BatchShape shape, const Matrix& input, Matrix& output) {
  const auto& c = base_.config;
  const auto& layer = base_.layers[static_cast<std::size_t>(l)];
  const float eps = static_cast<float>(c.rms_norm_eps);
  auto& t = tape_;
  t.shape = shape;
  t.inv_rms1 = rms_norm_inv_rms(input, eps);
  rms_norm(input, layer.input_norm, eps, t.normed1);
  adapted_forward(l, Linear::q_proj, t.normed1, t.q, shape);
  adapted_forward(l, Linear::k_proj, t.normed1, t.k, shape);
  adapted_forward(l, Linear::v_proj, t.normed1, t.v, shape);
  apply_rope(t.q, c.num_heads, c.head_dim, rope_, shape);
  apply_rope(t.k, c.num_kv_heads, c.head_dim, rope_, shape);
  causal_attention(t.q, t.k, t.v, c.num_heads, c.num_kv_heads, c.head_dim, shape, t.attn);
  adapted_forward(l, Linear::o_proj, t.attn, output, shape);
  t.h1 = input + output;
  t.inv_rms2 = rms_norm_inv_rms(t.h1, eps);
  rms_norm(t.h1, layer.post_norm, eps, t.normed2);
  adapted_forward(l, Linear::gate_proj, t.normed2, t.gate, shape);
  adapted_forward(l, Linear::up_proj, t.normed2, t.up, shape);
  t.act.resize(t.gate.rows(), t.gate.cols());
  tbb::parallel_for(tbb::blocked_range<Index>(0, t.gate.rows(), 256), [&](const tbb::blocked_range<Index>& r) {
    const auto g = t.gate.middleRows(r.begin(), r.size()).array();
    t.act.middleRows(r.begin(), r.size()).array() = g / (1.0f + (-g).exp()) * t.up.middleRows(r.begin(), r.size()).array();
  });
  adapted_forward(l, Linear::down_proj, t.act, output, shape);
  output = t.h1 + output;
}

void LoraLayerStack::forward(int l, BatchShape shape, Matrix& hidden) {
  forward_tape(l, shape, hidden, output_);
  hidden.swap(output_);
}

void LoraLayerStack::backward(int l, BatchShape shape, const Matrix& input, const Matrix& grad_output,
                              Matrix& grad_input) {
  if (grads_ == nullptr) throw Error("lora: backward needs a gradient buffer");
  forward_tape(l, shape, input, output_);
  // The adapters' tapes of q/k/v and gate/up are overwritten by the later linears of the same
  // input, so the forward keeps one LinearTape per linear (linear_tape_[which]). The norm weights
  // are frozen: their gradients go to a buffer nobody reads.
  const auto adapted = [&](Linear which, const Matrix& x, const Matrix& grad_y, Matrix& grad_x) {
    adapted_backward(l, which, x, grad_y, grad_x);
  };
  unused_norm_grad_.resize(0);
  decoder_layer_backward_with(base_.config, base_.layers[static_cast<std::size_t>(l)], rope_, shape, tape_, input,
                              grad_output, adapted, unused_norm_grad_, unused_norm_grad_, &grad_input, scratch_);
}

// ---------------------------------------------------------------------------------------------
// Optimizer pieces and the trainer.

double warmup_cosine_lr(double peak, long long step, long long total, long long warmup) {
  if (step < warmup) return peak * static_cast<double>(step) / static_cast<double>(std::max(1LL, warmup));
  const double progress =
      static_cast<double>(step - warmup) / static_cast<double>(std::max(1LL, total - warmup));
  return peak * std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * progress)));
}

void AdamW::step(Matrix& param, const Matrix& grad, AdamState& state) const {
  if (weight_decay != 0) param *= static_cast<float>(1.0 - lr * weight_decay);
  Adam adam;
  adam.lr = lr;
  adam.beta1 = beta1;
  adam.beta2 = beta2;
  adam.eps = eps;
  adam.step(param, grad, state);
}

double clip_global_norm(LoraAdapters& grads, double max_norm) {
  double sq = 0;
  grads.for_each([&](Matrix& g) { sq += g.cast<double>().squaredNorm(); });
  const double norm = std::sqrt(sq);
  if (max_norm > 0) {
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0) grads.for_each([&](Matrix& g) { g *= static_cast<float>(coef); });
  }
  return norm;
}

LoraTrainResult train_lora(const LlamaModel& base, LoraAdapters& adapters, const std::vector<int>& stream,
                           const LoraTrainOptions& o) {
  if (o.seq_len < 2 || o.steps < 1 || o.batch < 1 || o.accumulation < 1)
    throw Error(fmt::format("lora training: seq_len {} (>= 2), steps {}, batch {}, accumulation {} (>= 1)", o.seq_len,
                            o.steps, o.batch, o.accumulation));
  if (static_cast<long long>(stream.size()) < o.seq_len)
    throw Error(fmt::format("lora training: the text has {} tokens, fewer than seq_len {}", stream.size(), o.seq_len));
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  LoraAdapters grads = adapters.zeros_like();
  const std::vector<Matrix*> params = tensors_of(adapters), grad_tensors = tensors_of(grads);
  std::vector<AdamState> states(params.size());
  LoraLayerStack stack(base, adapters, &grads, o.seq_len);
  std::mt19937_64 rng(o.seed);
  std::uniform_int_distribution<std::size_t> start(0, stream.size() - static_cast<std::size_t>(o.seq_len));
  const BatchShape shape{o.batch, o.seq_len};
  const long long warmup = std::llround(o.warmup_fraction * o.steps);
  const double predicted_per_step = static_cast<double>(o.accumulation) * o.batch * (o.seq_len - 1);
  LoraTrainResult result;
  std::vector<int> tokens(static_cast<std::size_t>(shape.rows()));
  for (int step = 0; step < o.steps; ++step) {
    for (Matrix* g : grad_tensors) g->setZero();
    double nll = 0;
    for (int micro = 0; micro < o.accumulation; ++micro) {
      for (int b = 0; b < o.batch; ++b) {
        const std::size_t s0 = start(rng);
        std::copy_n(stream.begin() + static_cast<std::ptrdiff_t>(s0), o.seq_len,
                    tokens.begin() + static_cast<std::ptrdiff_t>(b) * o.seq_len);
      }
      stack.set_dropout(true, {o.seed, static_cast<std::uint64_t>(step) * o.accumulation + micro});
      nll += causal_lm_backward(base, stack, tokens, shape, 1.0 / predicted_per_step, nullptr).nll_sum;
      result.tokens += shape.rows();
    }
    const double norm = clip_global_norm(grads, o.clip);
    AdamW opt;
    opt.lr = warmup_cosine_lr(o.lr, step, o.steps, warmup);
    opt.weight_decay = o.weight_decay;
    for (std::size_t i = 0; i < params.size(); ++i) opt.step(*params[i], *grad_tensors[i], states[i]);
    const double loss = nll / predicted_per_step;
    if (!std::isfinite(loss)) throw Error(fmt::format("lora training: the loss became {} at step {}", loss, step + 1));
    result.loss.push_back(loss);
    result.lr.push_back(opt.lr);
    result.grad_norm.push_back(norm);
    result.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    if (o.on_step) o.on_step({step + 1, o.steps, loss, opt.lr, norm, result.tokens_per_s(), result.seconds});
  }
  return result;
}

double lora_eval_loss(const LlamaModel& base, const LoraAdapters& adapters, const std::vector<std::vector<int>>& windows) {
  if (windows.empty()) return 0;
  LoraLayerStack stack(base, adapters, nullptr, static_cast<int>(windows.front().size()));
  CausalLmLoss total;
  for (const auto& w : windows) {
    const auto l = causal_lm_loss(base, stack, w, {1, static_cast<int>(w.size())});
    total.nll_sum += l.nll_sum;
    total.predicted += l.predicted;
  }
  return total.mean();
}

}  // namespace ptqlab
