#pragma once
// Runs an experiment's arms (docs/architecture.md, "The arm run"):
//   1. select arms (--arms GLOB) and skip those whose result file exists with the same config hash;
//   2. compute the work shared by all arms once: token streams of the calibration and eval texts,
//      calibration windows, FP input statistics (when a component needs them);
//   3. run the arms in parallel in a TBB task_arena of --jobs threads (parallelism inside an arm
//      uses the same arena, so there is no oversubscription);
//   4. each arm writes DIR/<arm>.h5 through the process's single HDF5 writer thread.
// Before the arms start, the memory model predicts the peak (memory_model.hpp); a run predicted to
// exceed the available memory (or --memory-limit) is refused with an Error naming what to change.
// After SIGTERM (ptqlab/stop.hpp) arms stop at the next safe point and write nothing; they come
// back with status `stopped`, finished arms keep their files.
#include "ptqlab/support/internal.hpp"  // not part of the plugin SDK
#include <filesystem>
#include <string>
#include <vector>

#include "ptqlab/engine/experiment.hpp"
#include "ptqlab/outputs/results.hpp"

namespace ptqlab {

class PluginRegistry;

struct RunOptions {
  std::filesystem::path out_dir;
  std::string arms_glob = "*";
  int jobs = 1;
  bool force = false;                  // recompute arms whose results exist
  std::filesystem::path cache_dir;     // on-disk cache of shared artifacts; empty: none
  // Where an arm keeps its quantized layers: "memory" (float32, resident) or spilled to its own
  // safetensors files under <out>/.<arm>.layers/ in "f32" (exact), "f16" or "bf16" (mapped, so
  // they are file cache, not the process's memory). Removed once the arm's result is written.
  std::string layer_store = "memory";
  double memory_limit = 0;  // bytes; 0: what the machine has available (memory_model.hpp)
  bool print_memory = true;  // print the predicted peak before the arms start
  // When set, every arm that completes also writes its quantized model as a Hugging Face
  // checkpoint to <export_dir>/<arm>/ (export.hpp), dequantized weights in `export_dtype`.
  std::filesystem::path export_dir;
  std::string export_dtype = "f16";
  // When set, a timeline of the process's RssAnon and what each arm did (memory_watch.hpp).
  std::filesystem::path memory_trace;
};

struct ArmOutcome {
  enum class Status { completed, skipped, failed, stopped };  // stopped: no result file written
  std::string arm;
  Status status = Status::completed;
  std::string message;
  std::filesystem::path file;
  ArmResult result;  // as written (or read back, when skipped)
};

struct RunReport {
  std::vector<ArmOutcome> arms;
  double seconds = 0;
  double predicted_peak_bytes = 0;  // the memory model's prediction (0: the run stopped before it)
  double measured_peak_bytes = 0;   // peak RssAnon sampled every 0.2 s while the run went on
  int failed() const;
  int stopped() const;
};

RunReport run_experiment(const Experiment& experiment, const PluginRegistry& registry, const RunOptions& options);

// One row per arm: bits (paper / all-in), every evaluator metric "ppl" per dataset, status, time.
std::string format_results_table(const RunReport& report);

}  // namespace ptqlab
