#pragma once
// Helpers shared by the Google Benchmark programs: a wall clock, random matrices, and the
// LLaMA-7B shapes the benchmarks measure at.
#include <chrono>
#include <cstdint>
#include <random>

#include "ptqlab/model/model.hpp"

namespace ptqlab::bench {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Normal(0, scale) entries from a fixed seed.
inline Matrix random_matrix(Eigen::Index rows, Eigen::Index cols, float scale, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  Matrix m(rows, cols);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = dist(rng);
  return m;
}

// LLaMA-7B shapes (hidden 4096, intermediate 11008, 32 heads of 128), untied lm_head. Benchmarks
// of single layers pass a tiny vocabulary so that random_llama does not spend 500 MB on an
// embedding nobody reads; whole-model ones pass 32000.
inline LlamaConfig llama7b_config(int layers, int vocab_size) {
  LlamaConfig c;
  c.hidden_size = 4096;
  c.intermediate_size = 11008;
  c.num_layers = layers;
  c.num_heads = 32;
  c.num_kv_heads = 32;
  c.head_dim = 128;
  c.vocab_size = vocab_size;
  c.max_position_embeddings = 4096;
  c.rms_norm_eps = 1e-5;
  c.tie_word_embeddings = false;
  return c;
}

}  // namespace ptqlab::bench
