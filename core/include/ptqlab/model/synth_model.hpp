#pragma once
// Synthetic checkpoints at real LLaMA shapes (`ptqlab synth-model`, docs/benchmarks.md): a
// Hugging Face directory with config.json, safetensors (one file, or K shards and
// model.safetensors.index.json) and a tokenizer.model, holding seeded random weights. Real
// checkpoints are what users bring; these only give benchmarks and tests the real sizes.
//
// Vocabulary rule: vocab_size comes from --like (32000 for LLaMA-2) or --vocab; the tokenizer
// copied in (the shipped stories260K one unless told otherwise) must have at most that many pieces,
// so every id it produces indexes the embedding. Rows above its range exist, as in real checkpoints
// whose vocabulary is padded, and are simply never looked up.
#include "ptqlab/support/internal.hpp"  // not part of the plugin SDK
#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>

#include "ptqlab/model/model_config.hpp"
#include "ptqlab/model/safetensors.hpp"

namespace ptqlab {

struct SynthModelOptions {
  std::string like = "stories260K";  // llama-2-7b | llama-2-13b | stories260K
  int layers = 0;                    // 0: as --like
  int vocab = 0;                     // 0: as --like
  DType dtype = DType::F16;
  int shards = 1;
  std::uint64_t seed = 0;
  float weight_std = 0.02f;  // linears and embedding ~ N(0, std²); norm weights 1 + N(0, 0.1²)
  std::filesystem::path tokenizer;  // tokenizer.model to copy
  std::filesystem::path out;        // directory to create (must not hold a checkpoint already)
};

// The architecture --like names, with --layers/--vocab applied. Throws ptqlab::Error on an unknown
// name or a bad count.
LlamaConfig synth_config(const std::string& like, int layers, int vocab);

// Writes the checkpoint tensor by tensor (never more than a few MB of weights in memory).
// Values depend only on the seed, the tensor name and the element index, not on threads or shards.
// `progress(bytes_written, total_bytes)` is called now and then. Returns the bytes of tensor data.
std::size_t write_synthetic_model(const SynthModelOptions& options,
                                  const std::function<void(std::size_t, std::size_t)>& progress = {});

}  // namespace ptqlab
