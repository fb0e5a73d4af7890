#pragma once
#include "ptqlab/support/internal.hpp"  // not part of the plugin SDK
#include <cstdint>
#include <vector>

#include "ptqlab/model/model.hpp"

namespace ptqlab {

struct GenerateOptions {
  int max_new_tokens = 256;
  float temperature = 0.0f;  // 0: greedy (argmax)
  std::uint64_t seed = 0;    // for temperature > 0
  std::vector<int> stop_ids;  // generation ends when one of these is produced (not included)
};

// Autoregressive decoding from `prompt` (which should already start with BOS). Each step re-runs
// the forward pass over the whole context (no KV cache): simple and exact, and fast enough for the
// demo and tests; the context is capped at max_position_embeddings.
std::vector<int> generate(const LlamaModel& model, const std::vector<int>& prompt, const GenerateOptions& options);

}  // namespace ptqlab
