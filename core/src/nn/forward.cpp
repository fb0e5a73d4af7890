// The numerical heart of the forward pass. Every Eigen-heavy routine lives in this one
// translation unit so that the build stays fast on a single core.
#include "ptqlab/nn/forward.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>

#include <fmt/format.h>
#include <tbb/blocked_range.h>
#include <tbb/blocked_range2d.h>
#include <tbb/parallel_for.h>
#include <tbb/partitioner.h>

#include "ptqlab/support/error.hpp"

namespace ptqlab {

using Eigen::Index;

const char* linear_input_name(LinearInput which) {
  switch (which) {
    case LinearInput::attn_in: return "attn_in";
    case LinearInput::o_in: return "o_in";
    case LinearInput::mlp_in: return "mlp_in";
    case LinearInput::down_in: return "down_in";
  }
  return "?";
}

LinearInput input_of(Linear which) {
  switch (which) {
    case Linear::q_proj:
    case Linear::k_proj:
    case Linear::v_proj: return LinearInput::attn_in;
    case Linear::o_proj: return LinearInput::o_in;
    case Linear::gate_proj:
    case Linear::up_proj: return LinearInput::mlp_in;
    case Linear::down_proj: return LinearInput::down_in;
  }
  return LinearInput::attn_in;
}

RopeTable::RopeTable(int head_dim, double theta, int max_positions)
    : half_(head_dim / 2), max_positions_(max_positions) {
  cos_.resize(static_cast<std::size_t>(max_positions) * half_);
  sin_.resize(cos_.size());
  for (int pos = 0; pos < max_positions; ++pos) {
    for (int i = 0; i < half_; ++i) {
      const double inv_freq = 1.0 / std::pow(theta, (2.0 * i) / head_dim);
      const double angle = pos * inv_freq;
      cos_[static_cast<std::size_t>(pos) * half_ + i] = static_cast<float>(std::cos(angle));
      sin_[static_cast<std::size_t>(pos) * half_ + i] = static_cast<float>(std::sin(angle));
    }
  }
}

void linear_forward(const Eigen::Ref<const Matrix>& x, const Eigen::Ref<const Matrix>& w, Matrix& y) {
  const Index n = x.rows(), out = w.rows(), in = w.cols();
  y.resize(n, out);
  // Small products: one Eigen GEMM call, no task overhead.
  if (static_cast<double>(n) * out * in < 2e6) {
    y.noalias() = x * w.transpose();
    return;
  }
  // Fixed tiles (simple_partitioner never splits below the grain nor merges tiles), so the set of
  // GEMM calls, and hence every rounding, is independent of the thread count.
  constexpr Index kRowTile = 512, kColTile = 256;
  tbb::parallel_for(
      tbb::blocked_range2d<Index>(0, n, kRowTile, 0, out, kColTile),
      [&](const tbb::blocked_range2d<Index>& r) {
        const Index r0 = r.rows().begin(), nr = r.rows().size();
        const Index c0 = r.cols().begin(), nc = r.cols().size();
        y.block(r0, c0, nr, nc).noalias() = x.middleRows(r0, nr) * w.middleRows(c0, nc).transpose();
      },
      tbb::simple_partitioner());
}

void rms_norm(const Matrix& x, const Eigen::Ref<const Vector>& weight, float eps, Matrix& out) {
  out.resize(x.rows(), x.cols());
  const float inv_cols = 1.0f / static_cast<float>(x.cols());
  tbb::parallel_for(tbb::blocked_range<Index>(0, x.rows(), 256), [&](const tbb::blocked_range<Index>& r) {
    for (Index i = r.begin(); i < r.end(); ++i) {
      const float inv_rms = 1.0f / std::sqrt(x.row(i).squaredNorm() * inv_cols + eps);
      out.row(i).array() = (x.row(i).array() * inv_rms) * weight.transpose().array();
    }
  });
}

void apply_rope(Matrix& x, int n_heads, int head_dim, const RopeTable& rope, BatchShape shape) {
  const int half = head_dim / 2;
  if (shape.seq_len > rope.max_positions())
    throw Error(fmt::format("sequence length {} exceeds the {} positions of the rotary table", shape.seq_len,
                            rope.max_positions()));
  tbb::parallel_for(tbb::blocked_range<Index>(0, x.rows(), 256), [&](const tbb::blocked_range<Index>& r) {
    for (Index row = r.begin(); row < r.end(); ++row) {
      const int pos = static_cast<int>(row % shape.seq_len);
      const float* c = rope.cos(pos);
      const float* s = rope.sin(pos);
      float* p = x.row(row).data();
      for (int h = 0; h < n_heads; ++h) {
        float* a = p + h * head_dim;  // first half
        float* b = a + half;          // second half
        for (int i = 0; i < half; ++i) {
          const float x1 = a[i], x2 = b[i];
          a[i] = x1 * c[i] - x2 * s[i];  // rotate_half: (x1, x2) -> (-x2, x1)
          b[i] = x2 * c[i] + x1 * s[i];
        }
      }
    }
  });
}

namespace {

constexpr Index kLanes = 16;  // one AVX-512 register of floats (two AVX2 registers)
using Lane = Eigen::Array<float, kLanes, 1>;

// Attention of one (sequence, kv head) for small head dims (HD = 4..32), where GEMM calls with
// an inner dimension of 8 spend more time packing than multiplying. Keys and values are
// transposed once ([HD, T], zero-padded to whole lanes) so that each query is two vector passes
// over key positions: (1) scores and their max, (2) exp, sum and the weighted sum of values,
// with the HD accumulators in registers.
template <int HD>
class SmallHeadAttention {
 public:
  SmallHeadAttention(const Matrix& k, const Matrix& v, Index row0, Index col, Index T)
      : padded_((T + kLanes - 1) / kLanes * kLanes) {
    kt_ = Matrix::Zero(HD, padded_);
    vt_ = Matrix::Zero(HD, padded_);
    kt_.leftCols(T) = k.block(row0, col, T, HD).transpose();
    vt_.leftCols(T) = v.block(row0, col, T, HD).transpose();
    scores_.resize(padded_);
  }

  // out[0..HD) = softmax(scale * q · K[0..t]) V[0..t]
  void query(const float* q, Index t, float scale, float* out) {
    const Index len = t + 1;
    const Index chunks = (len + kLanes - 1) / kLanes;
    const Index tail = len - (chunks - 1) * kLanes;  // valid lanes in the last chunk, 1..kLanes
    const Lane lane_index = Lane::LinSpaced(kLanes, 0, kLanes - 1);
    float qs[HD];
    for (int d = 0; d < HD; ++d) qs[d] = q[d] * scale;

    Lane vmax = Lane::Constant(-std::numeric_limits<float>::infinity());
    for (Index c = 0; c < chunks; ++c) {
      Lane acc = Lane::Zero();
      for (int d = 0; d < HD; ++d) acc += qs[d] * Eigen::Map<const Lane>(kt_.data() + d * padded_ + c * kLanes);
      if (c == chunks - 1) acc = (lane_index < static_cast<float>(tail)).select(acc, vmax);
      vmax = vmax.max(acc);
      Eigen::Map<Lane>(scores_.data() + c * kLanes) = acc;
    }
    const float m = vmax.maxCoeff();

    // exp as one whole-array pass (Eigen unrolls and pipelines it), zeroing the padded lanes.
    auto p = scores_.head(chunks * kLanes).array();
    p.head(len) = (p.head(len) - m).exp();
    p.tail(chunks * kLanes - len).setZero();
    const float inv_sum = 1.0f / p.head(len).sum();

    Lane acc[HD];
    for (int d = 0; d < HD; ++d) acc[d] = Lane::Zero();
    for (Index c = 0; c < chunks; ++c) {
      const Lane pc = Eigen::Map<const Lane>(scores_.data() + c * kLanes);
      for (int d = 0; d < HD; ++d) acc[d] += pc * Eigen::Map<const Lane>(vt_.data() + d * padded_ + c * kLanes);
    }
    for (int d = 0; d < HD; ++d) out[d] = acc[d].sum() * inv_sum;
  }

 private:
  Index padded_;
  Matrix kt_, vt_;
  Eigen::VectorXf scores_;
};

template <int HD>
void small_head_attention(const Matrix& q, const Matrix& k, const Matrix& v, Index row0, Index kv_col,
                          Index first_q_col, int group, Index T, float scale, Matrix& out) {
  SmallHeadAttention<HD> attn(k, v, row0, kv_col, T);
  for (int g = 0; g < group; ++g) {
    const Index q_col = first_q_col + g * HD;
    for (Index t = 0; t < T; ++t) attn.query(&q(row0 + t, q_col), t, scale, &out(row0 + t, q_col));
  }
}

}  // namespace

void causal_attention(const Matrix& q, const Matrix& k, const Matrix& v, int n_heads, int n_kv_heads,
                      int head_dim, BatchShape shape, Matrix& out) {
  const Index T = shape.seq_len;
  const int group = n_heads / n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  out.resize(q.rows(), static_cast<Index>(n_heads) * head_dim);

  // One task per (sequence, kv head): its K and V are prepared once and shared by the group of
  // query heads that read them.
  tbb::parallel_for(0, shape.batch * n_kv_heads, [&](int task) {
    const Index row0 = static_cast<Index>(task / n_kv_heads) * T;
    const Index kv_col = static_cast<Index>(task % n_kv_heads) * head_dim;
    const Index first_q_col = static_cast<Index>(task % n_kv_heads) * group * head_dim;

    switch (head_dim) {
      case 4: return small_head_attention<4>(q, k, v, row0, kv_col, first_q_col, group, T, scale, out);
      case 8: return small_head_attention<8>(q, k, v, row0, kv_col, first_q_col, group, T, scale, out);
      case 16: return small_head_attention<16>(q, k, v, row0, kv_col, first_q_col, group, T, scale, out);
      case 32: return small_head_attention<32>(q, k, v, row0, kv_col, first_q_col, group, T, scale, out);
      default: break;
    }

    // Large head dims: GEMMs over query tiles. A tile only reads the keys up to its last row, so
    // at most one tile-width triangle per tile is wasted.
    constexpr Index kQueryTile = 64;
    const Matrix K = k.block(row0, kv_col, T, head_dim);
    const Matrix V = v.block(row0, kv_col, T, head_dim);
    Matrix scores(std::min(kQueryTile, T), T);
    for (int g = 0; g < group; ++g) {
      const Index q_col = first_q_col + g * head_dim;
      for (Index q0 = 0; q0 < T; q0 += kQueryTile) {
        const Index nq = std::min(kQueryTile, T - q0);
        const Index nk = q0 + nq;
        auto s = scores.topLeftCorner(nq, nk);
        s.noalias() = (q.block(row0 + q0, q_col, nq, head_dim) * scale) * K.topRows(nk).transpose();
        for (Index r = 0; r < nq; ++r) {
          const Index len = q0 + r + 1;  // keys 0..q0+r are visible
          auto visible = s.row(r).head(len);
          visible = (visible.array() - visible.maxCoeff()).exp();
          visible /= visible.sum();
          if (len < nk) s.row(r).tail(nk - len).setZero();
        }
        out.block(row0 + q0, q_col, nq, head_dim).noalias() = s * V.topRows(nk);
      }
    }
  });
}

Matrix embed_tokens(const LlamaModel& model, std::span<const int> tokens) { return model.embed_rows(tokens); }

void decoder_layer_forward(const LlamaConfig& c, const DecoderLayer& layer, const RopeTable& rope, BatchShape shape,
                           Matrix& hidden, int layer_index, ForwardObserver* observer) {
  decoder_layer_forward(c, LayerView::of(layer), rope, shape, hidden, layer_index, observer);
}

void decoder_layer_forward(const LlamaConfig& c, const LayerView& layer, const RopeTable& rope, BatchShape shape,
                           Matrix& hidden, int layer_index, ForwardObserver* observer) {
  const float eps = static_cast<float>(c.rms_norm_eps);
  Matrix normed, q, k, v, attn, proj;

  // Attention block: h += o_proj(attention(rope(q), rope(k), v)).
  rms_norm(hidden, layer.input_norm.vector(), eps, normed);
  if (observer) observer->on_linear_input(layer_index, LinearInput::attn_in, normed, shape);
  linear_forward(normed, layer.linear(Linear::q_proj), q);
  linear_forward(normed, layer.linear(Linear::k_proj), k);
  linear_forward(normed, layer.linear(Linear::v_proj), v);
  apply_rope(q, c.num_heads, c.head_dim, rope, shape);
  apply_rope(k, c.num_kv_heads, c.head_dim, rope, shape);
  causal_attention(q, k, v, c.num_heads, c.num_kv_heads, c.head_dim, shape, attn);
  if (observer) observer->on_linear_input(layer_index, LinearInput::o_in, attn, shape);
  linear_forward(attn, layer.linear(Linear::o_proj), proj);
  hidden += proj;

  // MLP block (SwiGLU): h += down(silu(gate(x)) * up(x)).
  rms_norm(hidden, layer.post_norm.vector(), eps, normed);
  if (observer) observer->on_linear_input(layer_index, LinearInput::mlp_in, normed, shape);
  Matrix gate, up;
  linear_forward(normed, layer.linear(Linear::gate_proj), gate);
  linear_forward(normed, layer.linear(Linear::up_proj), up);
  tbb::parallel_for(tbb::blocked_range<Index>(0, gate.rows(), 256), [&](const tbb::blocked_range<Index>& r) {
    auto g = gate.middleRows(r.begin(), r.size()).array();
    g = g / (1.0f + (-g).exp()) * up.middleRows(r.begin(), r.size()).array();
  });
  if (observer) observer->on_linear_input(layer_index, LinearInput::down_in, gate, shape);
  linear_forward(gate, layer.linear(Linear::down_proj), proj);
  hidden += proj;
}

namespace {

void run_decoder(const LlamaModel& model, Matrix& hidden, BatchShape shape, ForwardObserver* observer) {
  const auto& c = model.config;
  if (shape.seq_len > c.max_position_embeddings)
    throw Error(fmt::format("sequence length {} exceeds max_position_embeddings {}", shape.seq_len,
                            c.max_position_embeddings));
  const RopeTable rope(c.head_dim, c.rope_theta, shape.seq_len);
  for (int i = 0; i < c.num_layers; ++i) decoder_layer_forward(c, model.layer_view(i), rope, shape, hidden, i, observer);
}

void check_tokens(std::span<const int> tokens, BatchShape shape) {
  if (shape.batch <= 0 || shape.seq_len <= 0 || static_cast<Index>(tokens.size()) != shape.rows())
    throw Error(fmt::format("forward: {} tokens do not form {} sequences of {}", tokens.size(), shape.batch,
                            shape.seq_len));
}

}  // namespace

void decoder_forward_layer_major(const LlamaModel& model, std::vector<Matrix>& hidden, std::span<const BatchShape> shapes,
                                 ForwardObserver* observer, const std::function<void(int)>& between_layers) {
  const auto& c = model.config;
  if (hidden.size() != shapes.size()) throw std::logic_error("decoder_forward_layer_major: hidden/shapes mismatch");
  if (hidden.empty()) return;
  // One table per distinct length, as run_decoder and the calibration pipeline make them.
  std::map<int, RopeTable> ropes;
  for (const auto& s : shapes)
    if (!ropes.count(s.seq_len)) ropes.emplace(s.seq_len, RopeTable(c.head_dim, c.rope_theta, s.seq_len));
  for (int l = 0; l < c.num_layers; ++l) {
    if (between_layers) between_layers(l);
    const LayerView layer = model.layer_view(l);
    // Batches in order when an observer accumulates (its sums must see them as forward_logits
    // would batch after batch); in parallel otherwise (each batch's arithmetic is unchanged).
    if (observer != nullptr) {
      for (std::size_t b = 0; b < hidden.size(); ++b)
        decoder_layer_forward(c, layer, ropes.at(shapes[b].seq_len), shapes[b], hidden[b], l, observer);
    } else {
      tbb::parallel_for(std::size_t{0}, hidden.size(), [&](std::size_t b) {
        decoder_layer_forward(c, layer, ropes.at(shapes[b].seq_len), shapes[b], hidden[b], l, nullptr);
      });
    }
  }
}

Matrix output_logits(const LlamaModel& model, const Matrix& hidden) {
  Matrix normed, logits;
  rms_norm(hidden, model.final_norm, static_cast<float>(model.config.rms_norm_eps), normed);
  const F32Tensor head = model.head_view();
  linear_forward(normed, head.matrix(), logits);
  return logits;
}

Matrix forward_logits(const LlamaModel& model, std::span<const int> tokens, BatchShape shape,
                      ForwardObserver* observer) {
  check_tokens(tokens, shape);
  Matrix hidden = embed_tokens(model, tokens);
  run_decoder(model, hidden, shape, observer);
  return output_logits(model, hidden);
}

Matrix final_hidden_states(const LlamaModel& model, std::span<const int> tokens, BatchShape shape) {
  check_tokens(tokens, shape);
  Matrix hidden = embed_tokens(model, tokens);
  run_decoder(model, hidden, shape, nullptr);
  Matrix normed;
  rms_norm(hidden, model.final_norm, static_cast<float>(model.config.rms_norm_eps), normed);
  return normed;
}

std::vector<double> sequence_nll(const LlamaModel& model, std::span<const int> tokens, BatchShape shape) {
  check_tokens(tokens, shape);
  Matrix hidden = embed_tokens(model, tokens);
  run_decoder(model, hidden, shape, nullptr);
  const F32Tensor head = model.head_view();
  return sequence_nll_from_hidden(model, head.matrix(), hidden, tokens, shape);
}

std::vector<double> sequence_nll_from_hidden(const LlamaModel& model, const Eigen::Ref<const Matrix>& head,
                                             const Matrix& hidden, std::span<const int> tokens, BatchShape shape) {
  check_tokens(tokens, shape);
  Matrix normed;
  rms_norm(hidden, model.final_norm, static_cast<float>(model.config.rms_norm_eps), normed);

  // Logits are made one sequence at a time, so memory is seq_len x vocab at most.
  std::vector<double> nll(shape.batch, 0.0);
  tbb::parallel_for(0, shape.batch, [&](int b) {
    const Index row0 = static_cast<Index>(b) * shape.seq_len;
    const Index n = shape.seq_len - 1;  // the last position predicts nothing inside the window
    Matrix logits;
    linear_forward(normed.middleRows(row0, n), head, logits);
    double sum = 0.0;
    for (Index t = 0; t < n; ++t) {
      const auto row = logits.row(t);
      const float m = row.maxCoeff();
      const double lse = m + std::log(static_cast<double>((row.array() - m).exp().sum()));
      sum += lse - row(tokens[row0 + t + 1]);
    }
    nll[b] = sum;
  });
  return nll;
}

}  // namespace ptqlab
