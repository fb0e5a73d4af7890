#pragma once
// The architecture of a Hugging Face LLaMA checkpoint, read from its config.json.
#include <filesystem>
#include <string>

namespace ptqlab {

struct LlamaConfig {
  int hidden_size = 0;
  int intermediate_size = 0;
  int num_layers = 0;
  int num_heads = 0;
  int num_kv_heads = 0;  // < num_heads means grouped-query attention
  int head_dim = 0;
  int vocab_size = 0;
  int max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;
  int bos_token_id = 1;
  int eos_token_id = 2;
  std::string torch_dtype;  // informational only: tensors carry their own dtype

  int q_dim() const { return num_heads * head_dim; }
  int kv_dim() const { return num_kv_heads * head_dim; }
  int heads_per_kv() const { return num_heads / num_kv_heads; }
};

// Parses and validates config.json; errors name the file and the key.
LlamaConfig load_llama_config(const std::filesystem::path& config_json);
LlamaConfig parse_llama_config(const std::string& json_text, const std::string& source_name);

}  // namespace ptqlab
