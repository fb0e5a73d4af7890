// Backward pass of one LLaMA decoder layer, the PTQ1.61 reconstruction losses and Adam.
// Every Eigen-heavy routine of the backward pass lives in this one translation unit (why it is
// over 600 lines: builds run on one effective core, and each Eigen-heavy unit costs minutes, so the
// ops' backward passes stay together here rather than one file each). The math of each op is
// written out in docs/backward.md; the code follows it line by line.

// GCC 12 reports false "(maybe-)uninitialized" warnings inside Eigen's AVX-512 kernels and
// intrinsics (forward.cpp gets -Wno-maybe-uninitialized in core/CMakeLists.txt).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "ptqlab/nn/backward.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include <fmt/format.h>
#include <tbb/blocked_range.h>
#include <tbb/blocked_range2d.h>
#include <tbb/parallel_for.h>
#include <tbb/partitioner.h>

#include "ptqlab/support/error.hpp"

namespace ptqlab {

using Eigen::Index;

namespace {

// Gradients accumulate: an empty gradient is created as zeros, a sized one must match.
void prepare(Matrix& grad, Index rows, Index cols, const char* what) {
  if (grad.size() == 0) {
    grad.setZero(rows, cols);
  } else if (grad.rows() != rows || grad.cols() != cols) {
    throw Error(fmt::format("backward: gradient '{}' is {}x{}, expected {}x{}", what, grad.rows(), grad.cols(),
                            rows, cols));
  }
}

void prepare(Vector& grad, Index size, const char* what) {
  if (grad.size() == 0) {
    grad.setZero(size);
  } else if (grad.size() != size) {
    throw Error(fmt::format("backward: gradient '{}' has {} entries, expected {}", what, grad.size(), size));
  }
}

void check_shape(const Matrix& m, Index rows, Index cols, const char* what) {
  if (m.rows() != rows || m.cols() != cols)
    throw Error(fmt::format("backward: '{}' is {}x{}, expected {}x{}", what, m.rows(), m.cols(), rows, cols));
}

// Products below this many multiply-adds run as one Eigen call (no task overhead), as in
// linear_forward.
constexpr double kSmallGemm = 2e6;
// Output tiles of the parallel GEMMs. Each tile is one Eigen call that does the whole inner sum,
// so the rounding never depends on the thread count.
constexpr Index kRowTile = 512, kColTile = 256, kWeightTile = 256;
// Weights with at most this many entries (up to 4 dW tiles) get their dW summed over fixed chunks
// of tokens instead, in parallel; the partials cost chunks * out * in floats.
constexpr double kSmallWeight = 4.0 * kWeightTile * kWeightTile;
constexpr Index kTokenChunk = 512;
// Rows per task of the row-wise ops; the RMSNorm weight gradient sums one partial per chunk, in
// chunk order.
constexpr Index kRowChunk = 256;

}  // namespace

// ---------------------------------------------------------------------------------------------
// Linear: y = x Wᵀ  =>  dx = dy W,  dW = dyᵀ x.

// Gradients accumulate (dx += ..., dW += ...): each product is formed on its own and then added,
// never accumulated into the gradient inside the GEMM, because the GEMM splits the inner
// dimension into cache-sized blocks that differ between CPUs (an AVX2 host with 512 KB of L2
// splits where an AVX-512 one did not): g + P is then the same sum on every host, and a second
// call adds exactly what the first did.
void linear_backward_input(const Matrix& w, const Matrix& grad_y, Matrix& dx) {
  const Index n = grad_y.rows(), in = w.cols(), out = w.rows();
  check_shape(grad_y, n, out, "linear output gradient");
  prepare(dx, n, in, "linear input");
  if (static_cast<double>(n) * out * in < kSmallGemm) {
    dx += Matrix(grad_y * w);
    return;
  }
  tbb::parallel_for(
      tbb::blocked_range2d<Index>(0, n, kRowTile, 0, in, kColTile),
      [&](const tbb::blocked_range2d<Index>& r) {
        const Index r0 = r.rows().begin(), nr = r.rows().size();
        const Index c0 = r.cols().begin(), nc = r.cols().size();
        dx.block(r0, c0, nr, nc) += Matrix(grad_y.middleRows(r0, nr) * w.middleCols(c0, nc));
      },
      tbb::simple_partitioner());
}

void linear_backward(const Matrix& x, const Matrix& w, const Matrix& grad_y, Matrix* grad_x, Matrix& grad_w) {
  const Index n = x.rows(), in = w.cols(), out = w.rows();
  check_shape(x, n, in, "linear input");
  check_shape(grad_y, n, out, "linear output gradient");
  const bool small = static_cast<double>(n) * out * in < kSmallGemm;

  if (grad_x != nullptr) linear_backward_input(w, grad_y, *grad_x);

  prepare(grad_w, out, in, "linear weight");
  if (small) {
    grad_w += Matrix(grad_y.transpose() * x);
  } else if (static_cast<double>(out) * in <= kSmallWeight && n > kTokenChunk) {
    // A small weight (stories260K) over many tokens: few dW tiles, so the sum over tokens is cut
    // into fixed chunks summed in order afterwards (same rounding for any thread count).
    const Index chunks = (n + kTokenChunk - 1) / kTokenChunk;
    std::vector<Matrix> partial(static_cast<std::size_t>(chunks));
    tbb::parallel_for(Index{0}, chunks, [&](Index c) {
      const Index t0 = c * kTokenChunk, nt = std::min(kTokenChunk, n - t0);
      partial[static_cast<std::size_t>(c)].noalias() = grad_y.middleRows(t0, nt).transpose() * x.middleRows(t0, nt);
    });
    Matrix total = std::move(partial[0]);
    for (Index c = 1; c < chunks; ++c) total += partial[static_cast<std::size_t>(c)];
    grad_w += total;
  } else {
    // Tiles of dW; the sum over the n tokens stays inside one tile.
    tbb::parallel_for(
        tbb::blocked_range2d<Index>(0, out, kWeightTile, 0, in, kWeightTile),
        [&](const tbb::blocked_range2d<Index>& r) {
          const Index o0 = r.rows().begin(), no = r.rows().size();
          const Index i0 = r.cols().begin(), ni = r.cols().size();
          grad_w.block(o0, i0, no, ni) += Matrix(grad_y.middleCols(o0, no).transpose() * x.middleCols(i0, ni));
        },
        tbb::simple_partitioner());
  }
}

// ---------------------------------------------------------------------------------------------
// RMSNorm: y_j = x_j r w_j with r = (mean(x²) + eps)^(-1/2), so dr/dx_j = -r³ x_j / H and
//   dx_j = r w_j g_j - x_j r³/H Σ_i w_i g_i x_i,   dw_j = Σ_rows g_j x_j r.

Vector rms_norm_inv_rms(const Matrix& x, float eps) {
  Vector inv(x.rows());
  const float inv_cols = 1.0f / static_cast<float>(x.cols());
  tbb::parallel_for(tbb::blocked_range<Index>(0, x.rows(), kRowChunk), [&](const tbb::blocked_range<Index>& r) {
    for (Index i = r.begin(); i < r.end(); ++i) inv(i) = 1.0f / std::sqrt(x.row(i).squaredNorm() * inv_cols + eps);
  });
  return inv;
}

void rms_norm_backward(const Matrix& x, const Vector& weight, const Vector& inv_rms, const Matrix& grad_y,
                       Matrix* grad_x, Vector& grad_weight) {
  const Index rows = x.rows(), H = x.cols();
  check_shape(grad_y, rows, H, "rms_norm output gradient");
  if (weight.size() != H || inv_rms.size() != rows)
    throw Error(fmt::format("rms_norm_backward: weight has {} entries and inv_rms {}, expected {} and {}",
                            weight.size(), inv_rms.size(), H, rows));
  if (grad_x != nullptr) prepare(*grad_x, rows, H, "rms_norm input");
  prepare(grad_weight, H, "rms_norm weight");

  const Index chunks = (rows + kRowChunk - 1) / kRowChunk;
  std::vector<Vector> partial_w(static_cast<std::size_t>(chunks));
  tbb::parallel_for(Index{0}, chunks, [&](Index c) {
    Vector& dw = partial_w[static_cast<std::size_t>(c)];
    dw.setZero(H);
    const auto w = weight.transpose().array();
    for (Index i = c * kRowChunk; i < std::min(rows, (c + 1) * kRowChunk); ++i) {
      const float r = inv_rms(i);
      const auto xi = x.row(i).array();
      const auto gi = grad_y.row(i).array();
      dw.transpose().array() += gi * xi * r;
      if (grad_x != nullptr) {
        const float dot = (w * gi * xi).sum();
        grad_x->row(i).array() += r * w * gi - xi * (r * r * r / static_cast<float>(H) * dot);
      }
    }
  });
  Vector total = Vector::Zero(H);
  for (const Vector& dw : partial_w) total += dw;
  grad_weight += total;
}

// ---------------------------------------------------------------------------------------------
// RoPE: (a, b) -> (a c - b s, b c + a s) is a rotation; its transpose (the inverse rotation)
// maps the gradient back: (ga, gb) -> (ga c + gb s, gb c - ga s).

void rope_backward(Matrix& grad, int n_heads, int head_dim, const RopeTable& rope, BatchShape shape) {
  const int half = head_dim / 2;
  if (shape.seq_len > rope.max_positions())
    throw Error(fmt::format("sequence length {} exceeds the {} positions of the rotary table", shape.seq_len,
                            rope.max_positions()));
  check_shape(grad, shape.rows(), static_cast<Index>(n_heads) * head_dim, "rope gradient");
  tbb::parallel_for(tbb::blocked_range<Index>(0, grad.rows(), kRowChunk), [&](const tbb::blocked_range<Index>& r) {
    for (Index row = r.begin(); row < r.end(); ++row) {
      const int pos = static_cast<int>(row % shape.seq_len);
      const float* c = rope.cos(pos);
      const float* s = rope.sin(pos);
      float* p = grad.row(row).data();
      for (int h = 0; h < n_heads; ++h) {
        float* a = p + h * head_dim;  // first half
        float* b = a + half;          // second half
        for (int i = 0; i < half; ++i) {
          const float ga = a[i], gb = b[i];
          a[i] = ga * c[i] + gb * s[i];
          b[i] = gb * c[i] - ga * s[i];
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Causal attention, per (sequence, query head): S = scale Q Kᵀ (keys 0..t visible to query t),
// P = softmax(S) row-wise, O = P V. Backward:
//   dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP - rowsum(P ∘ dP)),  dQ = scale dS K,  dK = scale dSᵀ Q.
// P is recomputed from Q and K (one query, or one tile of 64 queries, at a time) instead of being
// stored. Like the forward pass there are two kernels: one for small head dims (vector passes over
// key positions, K and V transposed) and Eigen GEMMs over query tiles for large ones.

namespace {

constexpr Index kLanes = 16;  // one AVX-512 register of floats
using Lane = Eigen::Array<float, kLanes, 1>;

// Backward of one (sequence, kv head) for head dims 4..32. Keys, values and their gradients are
// held transposed ([HD, T], zero-padded to whole lanes), so that every step below is a vector pass
// over key positions j with the HD components of the query in registers. For query t:
//   (1) s_j = scale q·k_j and their max            (2) p_j = softmax(s)_j
//   (3) dp_j = dO·v_j,  dV_j += p_j dO,  D = Σ p_j dp_j
//   (4) ds_j = scale p_j (dp_j - D),  dq += Σ ds_j k_j,  dK_j += ds_j q
template <int HD>
class SmallHeadAttentionBackward {
 public:
  SmallHeadAttentionBackward(const Matrix& k, const Matrix& v, Index row0, Index col, Index T)
      : T_(T), padded_((T + kLanes - 1) / kLanes * kLanes) {
    kt_ = Matrix::Zero(HD, padded_);
    vt_ = Matrix::Zero(HD, padded_);
    kt_.leftCols(T) = k.block(row0, col, T, HD).transpose();
    vt_.leftCols(T) = v.block(row0, col, T, HD).transpose();
    dkt_ = Matrix::Zero(HD, padded_);
    dvt_ = Matrix::Zero(HD, padded_);
    p_.resize(padded_);
    dp_.resize(padded_);
  }

  // Query t with (roped) query vector q and output gradient dout: dq[0..HD) += dL/dq, and the
  // contributions to dK, dV are accumulated inside.
  void query(const float* q, const float* dout, Index t, float scale, float* dq) {
    const Index len = t + 1;
    const Index chunks = (len + kLanes - 1) / kLanes;
    const Index tail = len - (chunks - 1) * kLanes;  // valid lanes in the last chunk, 1..kLanes
    const Lane lane_index = Lane::LinSpaced(kLanes, 0, kLanes - 1);
    // Raw pointers and local copies of q and dO: stores through the maps below could alias the
    // members, which would make the compiler reload them in every iteration.
    const Index pad = padded_;
    const float* kt = kt_.data();
    const float* vt = vt_.data();
    float* dkt = dkt_.data();
    float* dvt = dvt_.data();
    float* pp = p_.data();
    float* dpp = dp_.data();
    auto K = [=](int d, Index c) { return Eigen::Map<const Lane>(kt + d * pad + c * kLanes); };
    auto V = [=](int d, Index c) { return Eigen::Map<const Lane>(vt + d * pad + c * kLanes); };
    auto dK = [=](int d, Index c) { return Eigen::Map<Lane>(dkt + d * pad + c * kLanes); };
    auto dV = [=](int d, Index c) { return Eigen::Map<Lane>(dvt + d * pad + c * kLanes); };
    auto P = [=](Index c) { return Eigen::Map<Lane>(pp + c * kLanes); };
    auto dP = [=](Index c) { return Eigen::Map<Lane>(dpp + c * kLanes); };
    float qv[HD], qs[HD], dov[HD];
    for (int d = 0; d < HD; ++d) {
      qv[d] = q[d];
      qs[d] = q[d] * scale;
      dov[d] = dout[d];
    }

    // (1) scores (the same arithmetic as the forward kernel) and their max.
    Lane vmax = Lane::Constant(-std::numeric_limits<float>::infinity());
    for (Index c = 0; c < chunks; ++c) {
      Lane acc = Lane::Zero();
      for (int d = 0; d < HD; ++d) acc += qs[d] * K(d, c);
      if (c == chunks - 1) acc = (lane_index < static_cast<float>(tail)).select(acc, vmax);
      vmax = vmax.max(acc);
      P(c) = acc;
    }
    const float m = vmax.maxCoeff();

    // (2) probabilities; lanes past the query (future keys, padding) are 0.
    auto p = p_.head(chunks * kLanes).array();
    p.head(len) = (p.head(len) - m).exp();
    p.tail(chunks * kLanes - len).setZero();
    p.head(len) *= 1.0f / p.head(len).sum();

    // (3) dp_j = dO·v_j, dV_j += p_j dO, D = Σ_j p_j dp_j.
    Lane d_acc = Lane::Zero();
    for (Index c = 0; c < chunks; ++c) {
      const Lane pc = P(c);
      Lane acc = Lane::Zero();
      for (int d = 0; d < HD; ++d) {
        acc += dov[d] * V(d, c);
        dV(d, c) += pc * dov[d];
      }
      dP(c) = acc;
      d_acc += pc * acc;
    }
    const float D = d_acc.sum();

    // (4) ds_j = scale p_j (dp_j - D), dq = Σ_j ds_j k_j, dK_j += ds_j q.
    Lane dq_acc[HD];
    for (int d = 0; d < HD; ++d) dq_acc[d] = Lane::Zero();
    for (Index c = 0; c < chunks; ++c) {
      const Lane ds = scale * P(c) * (dP(c) - D);
      for (int d = 0; d < HD; ++d) {
        dq_acc[d] += ds * K(d, c);
        dK(d, c) += ds * qv[d];
      }
    }
    for (int d = 0; d < HD; ++d) dq[d] += dq_acc[d].sum();
  }

  // Adds the accumulated dK, dV of this (sequence, kv head) to the full gradients.
  void write(Matrix& grad_k, Matrix& grad_v, Index row0, Index col) const {
    grad_k.block(row0, col, T_, HD) += dkt_.leftCols(T_).transpose();
    grad_v.block(row0, col, T_, HD) += dvt_.leftCols(T_).transpose();
  }

 private:
  Index T_, padded_;
  Matrix kt_, vt_, dkt_, dvt_;
  Eigen::VectorXf p_, dp_;
};

template <int HD>
void small_head_attention_backward(const Matrix& q, const Matrix& k, const Matrix& v, const Matrix& grad_out,
                                   Index row0, Index kv_col, Index first_q_col, int group, Index T, float scale,
                                   Matrix& grad_q, Matrix& grad_k, Matrix& grad_v) {
  SmallHeadAttentionBackward<HD> attn(k, v, row0, kv_col, T);
  for (int g = 0; g < group; ++g) {
    const Index q_col = first_q_col + g * HD;
    for (Index t = 0; t < T; ++t)
      attn.query(&q(row0 + t, q_col), &grad_out(row0 + t, q_col), t, scale, &grad_q(row0 + t, q_col));
  }
  attn.write(grad_k, grad_v, row0, kv_col);
}

// Backward of one (sequence, kv head) for any head dim: GEMMs over tiles of 64 queries; a tile
// reads the keys up to its last query only.
void tiled_attention_backward(const Matrix& q, const Matrix& k, const Matrix& v, const Matrix& grad_out,
                              Index row0, Index kv_col, Index first_q_col, int group, Index T, Index head_dim,
                              float scale, Matrix& grad_q, Matrix& grad_k, Matrix& grad_v) {
  constexpr Index kQueryTile = 64;
  const Matrix K = k.block(row0, kv_col, T, head_dim);
  const Matrix V = v.block(row0, kv_col, T, head_dim);
  Matrix dK = Matrix::Zero(T, head_dim), dV = Matrix::Zero(T, head_dim);
  Matrix P(std::min(kQueryTile, T), T), dP(std::min(kQueryTile, T), T);

  for (int g = 0; g < group; ++g) {
    const Index q_col = first_q_col + g * head_dim;
    for (Index q0 = 0; q0 < T; q0 += kQueryTile) {
      const Index nq = std::min(kQueryTile, T - q0);
      const Index nk = q0 + nq;  // the tile's last query sees keys 0..nk-1
      const auto Q = q.block(row0 + q0, q_col, nq, head_dim);
      const auto dO = grad_out.block(row0 + q0, q_col, nq, head_dim);
      auto p = P.topLeftCorner(nq, nk);
      auto dp = dP.topLeftCorner(nq, nk);

      // Recompute the probabilities exactly as the forward pass does (masked entries are 0).
      p.noalias() = (Q * scale) * K.topRows(nk).transpose();
      for (Index r = 0; r < nq; ++r) {
        const Index len = q0 + r + 1;
        auto visible = p.row(r).head(len);
        visible = (visible.array() - visible.maxCoeff()).exp();
        visible /= visible.sum();
        if (len < nk) p.row(r).tail(nk - len).setZero();
      }

      dV.topRows(nk).noalias() += p.transpose() * dO;
      dp.noalias() = dO * V.topRows(nk).transpose();
      // Softmax backward, with the scale of S folded in: dp becomes scale * dS.
      for (Index r = 0; r < nq; ++r) {
        const float d = p.row(r).dot(dp.row(r));
        dp.row(r).array() = scale * p.row(r).array() * (dp.row(r).array() - d);
      }
      grad_q.block(row0 + q0, q_col, nq, head_dim).noalias() += dp * K.topRows(nk);
      dK.topRows(nk).noalias() += dp.transpose() * Q;
    }
  }
  grad_k.block(row0, kv_col, T, head_dim) += dK;
  grad_v.block(row0, kv_col, T, head_dim) += dV;
}

}  // namespace

void causal_attention_backward(const Matrix& q, const Matrix& k, const Matrix& v, const Matrix& grad_out,
                               int n_heads, int n_kv_heads, int head_dim, BatchShape shape, Matrix& grad_q,
                               Matrix& grad_k, Matrix& grad_v) {
  const Index T = shape.seq_len, rows = shape.rows();
  const Index q_dim = static_cast<Index>(n_heads) * head_dim, kv_dim = static_cast<Index>(n_kv_heads) * head_dim;
  check_shape(q, rows, q_dim, "attention q");
  check_shape(k, rows, kv_dim, "attention k");
  check_shape(v, rows, kv_dim, "attention v");
  check_shape(grad_out, rows, q_dim, "attention output gradient");
  prepare(grad_q, rows, q_dim, "attention q");
  prepare(grad_k, rows, kv_dim, "attention k");
  prepare(grad_v, rows, kv_dim, "attention v");
  const int group = n_heads / n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));

  // One task per (sequence, kv head): it owns the dK, dV of that head and the dQ of the group of
  // query heads reading it, so tasks never write the same memory.
  tbb::parallel_for(0, shape.batch * n_kv_heads, [&](int task) {
    const Index row0 = static_cast<Index>(task / n_kv_heads) * T;
    const Index kv_col = static_cast<Index>(task % n_kv_heads) * head_dim;
    const Index first_q_col = static_cast<Index>(task % n_kv_heads) * group * head_dim;
    switch (head_dim) {
      case 4:
        return small_head_attention_backward<4>(q, k, v, grad_out, row0, kv_col, first_q_col, group, T, scale,
                                                grad_q, grad_k, grad_v);
      case 8:
        return small_head_attention_backward<8>(q, k, v, grad_out, row0, kv_col, first_q_col, group, T, scale,
                                                grad_q, grad_k, grad_v);
      case 16:
        return small_head_attention_backward<16>(q, k, v, grad_out, row0, kv_col, first_q_col, group, T, scale,
                                                 grad_q, grad_k, grad_v);
      case 32:
        return small_head_attention_backward<32>(q, k, v, grad_out, row0, kv_col, first_q_col, group, T, scale,
                                                 grad_q, grad_k, grad_v);
      default:
        return tiled_attention_backward(q, k, v, grad_out, row0, kv_col, first_q_col, group, T, head_dim, scale,
                                        grad_q, grad_k, grad_v);
    }
  });
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: a = silu(g) u with silu(g) = g σ(g), silu'(g) = σ(g) (1 + g (1 - σ(g))).

void swiglu_backward(const Matrix& gate, const Matrix& up, const Matrix& grad_act, Matrix& grad_gate,
                     Matrix& grad_up) {
  const Index rows = gate.rows(), cols = gate.cols();
  check_shape(up, rows, cols, "swiglu up");
  check_shape(grad_act, rows, cols, "swiglu output gradient");
  prepare(grad_gate, rows, cols, "swiglu gate");
  prepare(grad_up, rows, cols, "swiglu up");
  tbb::parallel_for(tbb::blocked_range<Index>(0, rows, kRowChunk), [&](const tbb::blocked_range<Index>& r) {
    const Index r0 = r.begin(), nr = r.size();
    const auto g = gate.middleRows(r0, nr).array();
    const auto u = up.middleRows(r0, nr).array();
    const auto da = grad_act.middleRows(r0, nr).array();
    const Eigen::Array<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor> sig = 1.0f / (1.0f + (-g).exp());
    grad_gate.middleRows(r0, nr).array() += da * u * sig * (1.0f + g * (1.0f - sig));
    grad_up.middleRows(r0, nr).array() += da * g * sig;
  });
}

// ---------------------------------------------------------------------------------------------
// One decoder layer.

std::size_t DecoderLayerTape::bytes() const {
  const Index floats = input.size() + inv_rms1.size() + normed1.size() + q.size() + k.size() + v.size() +
                       attn.size() + h1.size() + inv_rms2.size() + normed2.size() + gate.size() + up.size() +
                       act.size();
  return static_cast<std::size_t>(floats) * sizeof(float);
}

void DecoderLayerGrads::reset(const DecoderLayer& layer) {
  for (Linear which : kAllLinears) {
    const Matrix& w = layer.linear(which);
    linear_grad(which).setZero(w.rows(), w.cols());
  }
  input_norm.setZero(layer.input_norm.size());
  post_norm.setZero(layer.post_norm.size());
}

void decoder_layer_forward_tape(const LlamaConfig& c, const DecoderLayer& layer, const RopeTable& rope,
                                BatchShape shape, const Matrix& input, Matrix& output, DecoderLayerTape& tape) {
  check_shape(input, shape.rows(), c.hidden_size, "decoder layer input");
  if (&input == &output) throw Error("decoder_layer_forward_tape: input and output must be different matrices");
  const float eps = static_cast<float>(c.rms_norm_eps);
  tape.shape = shape;
  tape.input = input;  // assignments into a reused tape keep its memory

  // Attention block: h1 = x + o_proj(attention(rope(q), rope(k), v)), q/k/v from rmsnorm(x).
  tape.inv_rms1 = rms_norm_inv_rms(input, eps);
  rms_norm(input, layer.input_norm, eps, tape.normed1);
  linear_forward(tape.normed1, layer.q_proj, tape.q);
  linear_forward(tape.normed1, layer.k_proj, tape.k);
  linear_forward(tape.normed1, layer.v_proj, tape.v);
  apply_rope(tape.q, c.num_heads, c.head_dim, rope, shape);
  apply_rope(tape.k, c.num_kv_heads, c.head_dim, rope, shape);
  causal_attention(tape.q, tape.k, tape.v, c.num_heads, c.num_kv_heads, c.head_dim, shape, tape.attn);
  linear_forward(tape.attn, layer.o_proj, output);  // output holds the projection for now
  tape.h1 = input + output;

  // MLP block: out = h1 + down(silu(gate(x)) * up(x)), x = rmsnorm(h1).
  tape.inv_rms2 = rms_norm_inv_rms(tape.h1, eps);
  rms_norm(tape.h1, layer.post_norm, eps, tape.normed2);
  linear_forward(tape.normed2, layer.gate_proj, tape.gate);
  linear_forward(tape.normed2, layer.up_proj, tape.up);
  tape.act.resize(tape.gate.rows(), tape.gate.cols());
  // The same expression and row blocks as decoder_layer_forward.
  tbb::parallel_for(tbb::blocked_range<Index>(0, tape.gate.rows(), 256), [&](const tbb::blocked_range<Index>& r) {
    const auto g = tape.gate.middleRows(r.begin(), r.size()).array();
    tape.act.middleRows(r.begin(), r.size()).array() =
        g / (1.0f + (-g).exp()) * tape.up.middleRows(r.begin(), r.size()).array();
  });
  linear_forward(tape.act, layer.down_proj, output);
  output = tape.h1 + output;  // h1 + proj, the order of decoder_layer_forward's hidden += proj
}

namespace {

// Zeroes a scratch gradient, keeping its memory when the shape is unchanged.
Matrix& zeroed(Matrix& m, Index rows, Index cols) {
  m.setZero(rows, cols);
  return m;
}

}  // namespace

void decoder_layer_backward_with(const LlamaConfig& c, const DecoderLayer& layer, const RopeTable& rope,
                                 BatchShape shape, const DecoderLayerTape& tape, const Matrix& input,
                                 const Matrix& grad_output, const LinearBackward& linear_backward_of,
                                 Vector& post_norm_grad, Vector& input_norm_grad, Matrix* grad_input,
                                 DecoderLayerScratch& s) {
  const Index rows = shape.rows(), H = c.hidden_size, I = c.intermediate_size;

  // MLP block, backwards: out = h1 + act Wdᵀ, act = silu(gate) up, gate/up = normed2 W{g,u}ᵀ.
  s.grad_h1 = grad_output;  // the residual passes the gradient through
  linear_backward_of(Linear::down_proj, tape.act, grad_output, zeroed(s.grad_act, rows, I));
  swiglu_backward(tape.gate, tape.up, s.grad_act, zeroed(s.grad_gate, rows, I), zeroed(s.grad_up, rows, I));
  zeroed(s.grad_normed2, rows, H);
  linear_backward_of(Linear::gate_proj, tape.normed2, s.grad_gate, s.grad_normed2);
  linear_backward_of(Linear::up_proj, tape.normed2, s.grad_up, s.grad_normed2);
  rms_norm_backward(tape.h1, layer.post_norm, tape.inv_rms2, s.grad_normed2, &s.grad_h1, post_norm_grad);

  // Attention block, backwards: h1 = x + attn Woᵀ, attn = attention(rope(q), rope(k), v),
  // q/k/v = normed1 W{q,k,v}ᵀ.
  linear_backward_of(Linear::o_proj, tape.attn, s.grad_h1, zeroed(s.grad_attn, rows, c.q_dim()));
  causal_attention_backward(tape.q, tape.k, tape.v, s.grad_attn, c.num_heads, c.num_kv_heads, c.head_dim, shape,
                            zeroed(s.grad_q, rows, c.q_dim()), zeroed(s.grad_k, rows, c.kv_dim()),
                            zeroed(s.grad_v, rows, c.kv_dim()));
  rope_backward(s.grad_q, c.num_heads, c.head_dim, rope, shape);
  rope_backward(s.grad_k, c.num_kv_heads, c.head_dim, rope, shape);
  zeroed(s.grad_normed1, rows, H);
  linear_backward_of(Linear::q_proj, tape.normed1, s.grad_q, s.grad_normed1);
  linear_backward_of(Linear::k_proj, tape.normed1, s.grad_k, s.grad_normed1);
  linear_backward_of(Linear::v_proj, tape.normed1, s.grad_v, s.grad_normed1);
  if (grad_input != nullptr) *grad_input = s.grad_h1;  // residual: x -> h1
  rms_norm_backward(input, layer.input_norm, tape.inv_rms1, s.grad_normed1, grad_input, input_norm_grad);
}

void decoder_layer_backward(const LlamaConfig& c, const DecoderLayer& layer, const RopeTable& rope,
                            BatchShape shape, const DecoderLayerTape& tape, const Matrix& grad_output,
                            DecoderLayerGrads& grads, Matrix* grad_input, DecoderLayerScratch* scratch) {
  if (tape.shape.batch != shape.batch || tape.shape.seq_len != shape.seq_len || tape.input.rows() != shape.rows())
    throw Error(fmt::format("decoder_layer_backward: the tape was recorded for {} sequences of {}, not {} of {}",
                            tape.shape.batch, tape.shape.seq_len, shape.batch, shape.seq_len));
  check_shape(grad_output, shape.rows(), c.hidden_size, "decoder layer output gradient");
  DecoderLayerScratch local;
  // Every linear trains: dX and dW.
  const auto trained = [&](Linear which, const Matrix& x, const Matrix& grad_y, Matrix& grad_x) {
    linear_backward(x, layer.linear(which), grad_y, &grad_x, grads.linear_grad(which));
  };
  decoder_layer_backward_with(c, layer, rope, shape, tape, tape.input, grad_output, trained, grads.post_norm,
                              grads.input_norm, grad_input, scratch != nullptr ? *scratch : local);
}

// ---------------------------------------------------------------------------------------------
// Losses.

double mse_loss(const Matrix& y, const Matrix& target, Matrix* grad) {
  check_shape(target, y.rows(), y.cols(), "mse target");
  const double n = static_cast<double>(y.size());
  double sum = 0.0;
  for (Index i = 0; i < y.size(); ++i) {
    const double d = static_cast<double>(y.data()[i]) - target.data()[i];
    sum += d * d;
  }
  if (grad != nullptr) {
    prepare(*grad, y.rows(), y.cols(), "mse");
    grad->array() += static_cast<float>(2.0 / n) * (y - target).array();
  }
  return sum / n;
}

double nlc_loss(const Matrix& y, const Matrix& target, Matrix* grad) {
  check_shape(target, y.rows(), y.cols(), "nlc target");
  constexpr double kEps = 1e-8;  // torch.nn.CosineSimilarity
  const Index rows = y.rows();
  std::vector<double> cos(rows), ny(rows), nf(rows);
  double mean = 0.0;
  for (Index t = 0; t < rows; ++t) {
    const auto yt = y.row(t).cast<double>();
    const auto ft = target.row(t).cast<double>();
    ny[t] = std::sqrt(yt.squaredNorm());
    nf[t] = std::sqrt(ft.squaredNorm());
    cos[t] = yt.dot(ft) / (std::max(ny[t], kEps) * std::max(nf[t], kEps));
    mean += cos[t];
  }
  mean /= static_cast<double>(rows);

  if (grad != nullptr) {
    prepare(*grad, y.rows(), y.cols(), "nlc");
    const double coef = -1.0 / (mean * static_cast<double>(rows));  // dL/dc_t
    for (Index t = 0; t < rows; ++t) {
      const double cy = std::max(ny[t], kEps), cf = std::max(nf[t], kEps);
      // dc/dy = f/(|y||f|) - c y/|y|²; a norm clamped to eps is a constant (no second term).
      const double a = coef / (cy * cf);
      const double b = ny[t] > kEps ? coef * cos[t] / (ny[t] * cy) : 0.0;
      grad->row(t) += (a * target.row(t).cast<double>() - b * y.row(t).cast<double>()).cast<float>();
    }
  }
  return -std::log(std::abs(mean));
}

// ---------------------------------------------------------------------------------------------
// Adam (AdamW, weight decay 0), PyTorch's formula.

void Adam::step(std::span<float> param, std::span<const float> grad, AdamState& state) const {
  const Index n = static_cast<Index>(param.size());
  if (static_cast<Index>(grad.size()) != n)
    throw Error(fmt::format("adam: parameter has {} entries, gradient {}", n, grad.size()));
  if (state.m.size() == 0) {
    state.m.setZero(n);
    state.v.setZero(n);
  } else if (state.m.size() != n) {
    throw Error(fmt::format("adam: state has {} entries, parameter {}", state.m.size(), n));
  }
  ++state.t;
  const double bias1 = 1.0 - std::pow(beta1, static_cast<double>(state.t));
  const double bias2 = 1.0 - std::pow(beta2, static_cast<double>(state.t));
  const double step_size = lr / bias1;
  const double bias2_sqrt = std::sqrt(bias2);
  for (Index i = 0; i < n; ++i) {
    const double g = grad[i];
    const double m = beta1 * state.m(i) + (1.0 - beta1) * g;
    const double v = beta2 * state.v(i) + (1.0 - beta2) * g * g;
    state.m(i) = static_cast<float>(m);
    state.v(i) = static_cast<float>(v);
    param[i] = static_cast<float>(param[i] - step_size * m / (std::sqrt(v) / bias2_sqrt + eps));
  }
}

void Adam::step(Matrix& param, const Matrix& grad, AdamState& state) const {
  check_shape(grad, param.rows(), param.cols(), "adam gradient");
  step(std::span<float>(param.data(), static_cast<std::size_t>(param.size())),
       std::span<const float>(grad.data(), static_cast<std::size_t>(grad.size())), state);
}

void Adam::step(Vector& param, const Vector& grad, AdamState& state) const {
  step(std::span<float>(param.data(), static_cast<std::size_t>(param.size())),
       std::span<const float>(grad.data(), static_cast<std::size_t>(grad.size())), state);
}

}  // namespace ptqlab
