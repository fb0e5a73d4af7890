#pragma once
// Layer-level checkpoints of an arm (docs/slurm.md, "Layer-level resume"). After each decoder
// layer the arm's quantized layer is a safetensors file of its own (write_layer_file, durable) and
// a state file records everything needed to go on: the per-linear records so far, the calibration
// streams entering the next layer, and what the arm logged. A run killed (SIGKILL, or SIGTERM at a
// Slurm time limit) in layer k resumes at layer k and ends bit-identical to an uninterrupted run.
// The directory is removed when the arm's result file is written.
#include "ptqlab/support/internal.hpp"  // not part of the plugin SDK
#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/model/model.hpp"
#include "ptqlab/nn/forward.hpp"
#include "ptqlab/outputs/results.hpp"
#include "ptqlab/quant/calibration.hpp"

namespace ptqlab {

struct LayerCheckpointState {
  int next_layer = 0;  // layers [0, next_layer) are done and have their files
  std::vector<LinearRecord> records;
  std::vector<Matrix> quant, fp;  // calibration streams entering next_layer (fp: empty unless kept)
  std::vector<BatchShape> shapes;
  std::vector<LoggedSeries> series;
  std::vector<LoggedTensor> tensors;
};

// quantize_layerwise (calibration.hpp), started at `start_layer` with the streams and records of
// a checkpoint (the model already holds the finished layers), calling `after_layer` with the
// streams entering the next layer after each layer is kept.
struct LayerwiseResume {
  int start_layer = 0;
  LayerStreams* streams = nullptr;  // moved from; nullptr: start from the embeddings
  std::vector<LinearRecord> records;
  std::function<void(int, const std::vector<LinearRecord>&, const LayerStreams&)> after_layer;
};
std::vector<LinearRecord> quantize_layerwise_resumable(LlamaModel& model, const std::vector<std::vector<int>>& windows,
                                                       const LayerwiseOptions& options, const LayerwiseResume& resume);

class LayerCheckpoint {
 public:
  // `key` names what the checkpoint belongs to (config hash, calibration tokens, model, store);
  // a state file with another key is ignored and overwritten.
  LayerCheckpoint(std::filesystem::path dir, std::string key);

  const std::filesystem::path& dir() const { return dir_; }
  std::filesystem::path layer_file(int l) const;
  // The saved state, or nullopt when there is none, it belongs to another key, or it is damaged
  // (then the arm starts from layer 0). Checks that every finished layer has its file.
  std::optional<LayerCheckpointState> load() const;
  // Durably replaces the state file (temporary file, fsync, rename, fsync of the directory),
  // written straight from the arm's data (no copy of the streams in memory).
  void save(int next_layer, const std::vector<LinearRecord>& records, const LayerStreams& streams,
            const std::vector<LoggedSeries>& series, const std::vector<LoggedTensor>& tensors) const;
  void remove() const;

 private:
  std::filesystem::path dir_;
  std::string key_;
};

}  // namespace ptqlab
