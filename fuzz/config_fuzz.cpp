// Fuzz target: config.json text through parse_llama_config, then the derived sizes the model
// loader and forward pass compute from an accepted config (q_dim, kv_dim, heads_per_kv): an
// accepted config must not overflow them.
#include <string>

#include "fuzz_target.hpp"
#include "ptqlab/model/model_config.hpp"
#include "ptqlab/support/error.hpp"

PTQLAB_FUZZ_TARGET(config) {
  using namespace ptqlab;
  LlamaConfig c;
  try {
    c = parse_llama_config(std::string(reinterpret_cast<const char*>(data), size), "config.json");
  } catch (const Error&) {
    return 0;
  }
  PTQLAB_FUZZ_CHECK(c.hidden_size > 0 && c.intermediate_size > 0 && c.num_layers > 0 && c.vocab_size > 0);
  PTQLAB_FUZZ_CHECK(c.num_heads > 0 && c.num_kv_heads > 0 && c.num_heads % c.num_kv_heads == 0);
  PTQLAB_FUZZ_CHECK(c.head_dim > 0 && c.head_dim % 2 == 0);
  PTQLAB_FUZZ_CHECK(c.q_dim() > 0 && c.kv_dim() > 0 && c.kv_dim() <= c.q_dim());
  PTQLAB_FUZZ_CHECK(c.heads_per_kv() >= 1);
  PTQLAB_FUZZ_CHECK(c.bos_token_id >= 0 && c.bos_token_id < c.vocab_size);
  PTQLAB_FUZZ_CHECK(c.rms_norm_eps > 0 && c.rope_theta > 0);
  return 0;
}
