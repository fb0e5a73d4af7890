#pragma once
// A brute-force scalar LLaMA forward pass in double precision, written independently of
// core/src/forward.cpp (plain loops, angles computed per element, explicit softmax), used as the
// oracle for the optimised float32 kernels.
#include <cmath>
#include <vector>

#include "ptqlab/model.hpp"

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

inline void decoder_layer(const LlamaConfig& c, const DecoderLayer& l, Mat& h, int batch, int seq_len) {
  auto x = rms_norm(h, l.input_norm, c.rms_norm_eps);
  auto q = linear(x, l.q_proj), k = linear(x, l.k_proj), v = linear(x, l.v_proj);
  rope(q, c.num_heads, c.head_dim, c.rope_theta, seq_len);
  rope(k, c.num_kv_heads, c.head_dim, c.rope_theta, seq_len);
  const auto o = linear(attention(q, k, v, c.num_heads, c.num_kv_heads, c.head_dim, batch, seq_len), l.o_proj);
  for (std::size_t r = 0; r < h.size(); ++r)
    for (std::size_t i = 0; i < h[r].size(); ++i) h[r][i] += o[r][i];
  x = rms_norm(h, l.post_norm, c.rms_norm_eps);
  auto g = linear(x, l.gate_proj);
  const auto u = linear(x, l.up_proj);
  for (std::size_t r = 0; r < g.size(); ++r)
    for (std::size_t i = 0; i < g[r].size(); ++i) g[r][i] = g[r][i] / (1.0 + std::exp(-g[r][i])) * u[r][i];
  const auto d = linear(g, l.down_proj);
  for (std::size_t r = 0; r < h.size(); ++r)
    for (std::size_t i = 0; i < h[r].size(); ++i) h[r][i] += d[r][i];
}

inline Mat logits(const LlamaModel& m, const std::vector<int>& tokens, int batch, int seq_len) {
  Mat h;
  for (int id : tokens) {
    std::vector<double> row(m.embed.cols());
    for (Eigen::Index i = 0; i < m.embed.cols(); ++i) row[i] = m.embed(id, i);
    h.push_back(row);
  }
  for (const auto& l : m.layers) decoder_layer(m.config, l, h, batch, seq_len);
  return linear(rms_norm(h, m.final_norm, m.config.rms_norm_eps), m.output_head());
}

}  // namespace ptqlab::reference
