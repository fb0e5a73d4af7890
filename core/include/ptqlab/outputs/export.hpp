#pragma once
// Quantized checkpoints for other tools (docs/model-format.md, "Exported checkpoints"): an arm's
// model as a Hugging Face directory (config.json with a ptqlab_quantization_config, safetensors with an
// index when sharded, tokenizer.model) holding the dequantized weights in F16, BF16 or F32.
// lm-eval-harness, vLLM and ptqlab itself load it like any LLaMA checkpoint.
#include "ptqlab/support/internal.hpp"  // not part of the plugin SDK
#include <filesystem>
#include <string>

#include "ptqlab/model/model.hpp"

namespace ptqlab {

struct ExportOptions {
  DType dtype = DType::F16;
  std::size_t max_shard_bytes = std::size_t{5} << 30;  // as HF save_pretrained's default (5 GB)
  // JSON object stored as config.json's "ptqlab_quantization_config" (what produced the weights).
  std::string quantization_config_json = "{}";
};

// Writes `model` tensor by tensor (one tensor widened at a time) into `out`, which must not hold a
// checkpoint yet; config.json and tokenizer.model come from model.source_dir.
void export_checkpoint(const LlamaModel& model, const std::filesystem::path& out, const ExportOptions& options);

}  // namespace ptqlab
