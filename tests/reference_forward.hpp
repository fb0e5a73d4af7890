#pragma once
// A brute-force scalar LLaMA forward pass in double precision, written independently of
// core/src/nn/forward.cpp (plain loops, angles computed per element, explicit softmax), used as the
// oracle for the optimised float32 kernels.
#include <cmath>
#include <vector>

#include "ptqlab/model/model.hpp"

namespace ptqlab::reference {

using Mat = std::vector<std::vector<double>>;  // [rows][cols]

inline Mat from(const Matrix& m) {
  Mat r(m.rows(), std::vector<double>(m.cols()));
  for (Eigen::Index i = 0; i < m.rows(); ++i)
    for (Eigen::Index j = 0; j < m.cols(); ++j) r[i][j] = m(i, j);
  return r;
}

// y = x Wᵀ
inline Mat linear(const Mat& x, const Matrix& w) {
  Mat y(x.size(), std::vector<double>(w.rows(), 0.0));
  for (std::size_t t = 0; t < x.size(); ++t)
    for (Eigen::Index o = 0; o < w.rows(); ++o) {
      double s = 0;
      for (Eigen::Index i = 0; i < w.cols(); ++i) s += x[t][i] * static_cast<double>(w(o, i));
      y[t][o] = s;
    }
  return y;
}

inline Mat rms_norm(const Mat& x, const Vector& w, double eps) {
  Mat y = x;
  for (auto& row : y) {
    double ss = 0;
    for (double v : row) ss += v * v;
    const double inv = 1.0 / std::sqrt(ss / row.size() + eps);
    for (std::size_t i = 0; i < row.size(); ++i) row[i] = row[i] * inv * w(i);
  }
  return y;
}

// HF rotate_half RoPE on each head of every row; row r is position r % seq_len.
inline void rope(Mat& x, int heads, int head_dim, double theta, int seq_len) {
  const int half = head_dim / 2;
  for (std::size_t r = 0; r < x.size(); ++r) {
    const int pos = static_cast<int>(r % seq_len);
    for (int h = 0; h < heads; ++h) {
      std::vector<double> v(x[r].begin() + h * head_dim, x[r].begin() + (h + 1) * head_dim);
      for (int i = 0; i < head_dim; ++i) {
        const int fi = i % half;  // emb = cat(freqs, freqs)
        const double angle = pos / std::pow(theta, 2.0 * fi / head_dim);
        const double rot = i < half ? -v[i + half] : v[i - half];  // rotate_half
        x[r][h * head_dim + i] = v[i] * std::cos(angle) + rot * std::sin(angle);
      }
    }
  }
}

inline Mat attention(const Mat& q, const Mat& k, const Mat& v, int heads, int kv_heads, int head_dim, int batch,
                     int seq_len) {
  Mat out(q.size(), std::vector<double>(static_cast<std::size_t>(heads) * head_dim, 0.0));
  const int group = heads / kv_heads;
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h) {
      const int kvh = h / group;
      for (int t = 0; t < seq_len; ++t) {
        const auto& qr = q[b * seq_len + t];
        std::vector<double> s(t + 1);
        double m = -1e300;
        for (int j = 0; j <= t; ++j) {
          double dot = 0;
          for (int d = 0; d < head_dim; ++d) dot += qr[h * head_dim + d] * k[b * seq_len + j][kvh * head_dim + d];
          s[j] = dot / std::sqrt(static_cast<double>(head_dim));
          m = std::max(m, s[j]);
        }
        double z = 0;
        for (auto& e : s) z += (e = std::exp(e - m));
        for (int j = 0; j <= t; ++j)
          for (int d = 0; d < head_dim; ++d)
            out[b * seq_len + t][h * head_dim + d] += s[j] / z * v[b * seq_len + j][kvh * head_dim + d];
      }
    }
  return out;
}

// One decoder layer; `lin(which, x)` computes each linear (plain x Wᵀ, or with adapters).
template <class LinearFn>
inline void decoder_layer_with(const LlamaConfig& c, const DecoderLayer& l, Mat& h, int batch, int seq_len,
                               LinearFn&& lin) {
  auto x = rms_norm(h, l.input_norm, c.rms_norm_eps);
  auto q = lin(Linear::q_proj, x), k = lin(Linear::k_proj, x), v = lin(Linear::v_proj, x);
  rope(q, c.num_heads, c.head_dim, c.rope_theta, seq_len);
  rope(k, c.num_kv_heads, c.head_dim, c.rope_theta, seq_len);
  const auto o = lin(Linear::o_proj, attention(q, k, v, c.num_heads, c.num_kv_heads, c.head_dim, batch, seq_len));
  for (std::size_t r = 0; r < h.size(); ++r)
    for (std::size_t i = 0; i < h[r].size(); ++i) h[r][i] += o[r][i];
  x = rms_norm(h, l.post_norm, c.rms_norm_eps);
  auto g = lin(Linear::gate_proj, x);
  const auto u = lin(Linear::up_proj, x);
  for (std::size_t r = 0; r < g.size(); ++r)
    for (std::size_t i = 0; i < g[r].size(); ++i) g[r][i] = g[r][i] / (1.0 + std::exp(-g[r][i])) * u[r][i];
  const auto d = lin(Linear::down_proj, g);
  for (std::size_t r = 0; r < h.size(); ++r)
    for (std::size_t i = 0; i < h[r].size(); ++i) h[r][i] += d[r][i];
}

inline void decoder_layer(const LlamaConfig& c, const DecoderLayer& l, Mat& h, int batch, int seq_len) {
  decoder_layer_with(c, l, h, batch, seq_len, [&](Linear which, const Mat& x) { return linear(x, l.linear(which)); });
}

inline Mat embed(const LlamaModel& m, const std::vector<int>& tokens) {
  Mat h;
  for (int id : tokens) {
    std::vector<double> row(m.embed.cols());
    for (Eigen::Index i = 0; i < m.embed.cols(); ++i) row[i] = m.embed(id, i);
    h.push_back(row);
  }
  return h;
}

inline Mat head_logits(const LlamaModel& m, const Mat& h) {
  return linear(rms_norm(h, m.final_norm, m.config.rms_norm_eps), m.output_head());
}

inline Mat logits(const LlamaModel& m, const std::vector<int>& tokens, int batch, int seq_len) {
  Mat h = embed(m, tokens);
  for (const auto& l : m.layers) decoder_layer(m.config, l, h, batch, seq_len);
  return head_logits(m, h);
}

// Mean next-token cross-entropy of logits over windows of seq_len (the last position of each
// window predicts nothing).
inline double mean_next_token_nll(const Mat& logits, const std::vector<int>& tokens, int seq_len) {
  double sum = 0;
  long long n = 0;
  for (std::size_t r = 0; r < logits.size(); ++r) {
    if ((r + 1) % static_cast<std::size_t>(seq_len) == 0) continue;
    double m = -1e300;
    for (double z : logits[r]) m = std::max(m, z);
    double z = 0;
    for (double v : logits[r]) z += std::exp(v - m);
    sum += m + std::log(z) - logits[r][static_cast<std::size_t>(tokens[r + 1])];
    ++n;
  }
  return sum / static_cast<double>(n);
}

}  // namespace ptqlab::reference
