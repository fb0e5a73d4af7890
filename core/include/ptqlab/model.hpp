#pragma once
// A LLaMA-architecture model held in float32 (whatever the checkpoint's dtype), with every weight
// matrix in PyTorch nn.Linear layout: row-major [out_features, in_features].
#include <array>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "ptqlab/model_config.hpp"

namespace ptqlab {

using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Vector = Eigen::VectorXf;

// The seven linear layers of a decoder layer, in the order HF names them.
enum class Linear { q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj };
inline constexpr std::array<Linear, 7> kAllLinears = {Linear::q_proj,    Linear::k_proj,  Linear::v_proj,
                                                      Linear::o_proj,    Linear::gate_proj, Linear::up_proj,
                                                      Linear::down_proj};
const char* linear_name(Linear which);       // "q_proj", ...
std::string linear_tensor_name(int layer, Linear which);  // "model.layers.3.self_attn.q_proj.weight"

struct DecoderLayer {
  Vector input_norm;  // input_layernorm.weight [hidden]
  Vector post_norm;   // post_attention_layernorm.weight [hidden]
  Matrix q_proj, k_proj, v_proj, o_proj;
  Matrix gate_proj, up_proj, down_proj;

  Matrix& linear(Linear which);
  const Matrix& linear(Linear which) const;
};

struct LlamaModel {
  LlamaConfig config;
  Matrix embed;  // [vocab, hidden]
  std::vector<DecoderLayer> layers;
  Vector final_norm;  // [hidden]
  Matrix lm_head;     // [vocab, hidden]; empty when tied to embed
  std::filesystem::path source_dir;
  std::string source_dtype;  // dtype of the checkpoint's tensors ("F32", "BF16", "mixed", ...)

  const Matrix& output_head() const { return lm_head.size() > 0 ? lm_head : embed; }
  long long parameter_count() const;  // as stored in the checkpoint (tied head counted once)
};

// Loads config.json and model.safetensors (or a sharded checkpoint) from a HF model directory.
// Every failure is a ptqlab::Error naming the file and the tensor or key.
LlamaModel load_model(const std::filesystem::path& dir);

// A model with the given architecture and random weights (normal, std `weight_std`; norm weights
// 1 + N(0, 0.1)), for tests and benchmarks at shapes no shipped checkpoint has.
LlamaModel random_llama(const LlamaConfig& config, std::uint64_t seed, float weight_std = 0.02f);

}  // namespace ptqlab
