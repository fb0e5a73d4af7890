#pragma once
// Every content key of a run in one place (docs/architecture.md, "Cache keys"): what the artifact
// cache stores under (token streams, FP input statistics, allocation tables, a preprocessor's
// stage-1 quantization) and what a layer-level checkpoint must match to be resumed. A key is its
// material (named parts joined by '|') hashed with sha256. The formats are those of earlier
// releases, so entries already on disk stay valid.
#include "ptqlab/support/internal.hpp"  // not part of the plugin SDK

#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "ptqlab/engine/experiment.hpp"

namespace ptqlab {

// The material of a key, built part by part.
class KeyMaterial {
 public:
  explicit KeyMaterial(std::string start = {}) : text_(std::move(start)) {}
  // "|name:value"
  KeyMaterial& field(std::string_view name, std::string_view value);
  // "|role:<name>|<param>=<value>..." in the parameters' (sorted) order
  KeyMaterial& component(std::string_view role, const ComponentRef& c);
  // raw text, no separator (the input-statistics key appends window digests back to back)
  KeyMaterial& append(std::string_view text);
  const std::string& text() const { return text_; }
  std::string digest() const;

 private:
  std::string text_;
};

// sha256 of token ids as stored (int32, little-endian on every supported host).
std::string token_digest(const std::vector<int>& ids);

// Tokens: tokenizer file bytes + text bytes + protocol. Model: config.json bytes plus each
// safetensors file's size and header (shapes, dtypes, offsets); weights are not hashed, so a file
// rewritten with different values but the same layout must not reuse a cache directory.
std::string token_stream_key(const std::filesystem::path& tokenizer_model, const std::filesystem::path& text);
std::string model_key(const std::filesystem::path& model_dir);

// The keys of one run: the model and calibration windows are hashed once.
class RunKeys {
 public:
  // `calibration_tokens`: the calibration windows back to back (SharedArtifacts::calibration_tokens).
  RunKeys(const std::filesystem::path& model_dir, const std::vector<int>& calibration_tokens, std::uint64_t seed);

  const std::string& model() const { return model_; }  // also the KL reference logits' key
  const std::string& calibration_digest() const { return calibration_digest_; }
  // FP input statistics: the model and each calibration window.
  std::string input_stats(const std::vector<std::vector<int>>& calibration) const;
  // The allocation table of an allocated arm: model, calibration, seed, the candidates' components.
  // Budgets, metrics, unit kinds and allocators are not part of it: the table is measured per
  // linear and every arm sums it into its own units (aggregate_allocation_table).
  std::string allocation_table(const AllocationSpec& spec) const;
  // What an arm's quantization before preprocessing step `step` depends on: model, calibration,
  // seed, the mask, the quantizer and the earlier preprocessing steps.
  std::string quantize(const ArmSpec& arm, std::size_t step) const;
  // What an arm's layer-level checkpoint must match (docs/slurm.md): its config hash, the layer
  // store, the model directory and the calibration windows.
  std::string layer_checkpoint(const ArmSpec& arm, const std::string& layer_store,
                               const std::filesystem::path& model_dir) const;

 private:
  std::string model_, calibration_digest_, stage1_;
};

}  // namespace ptqlab
