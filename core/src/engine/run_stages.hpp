#pragma once
// The stages of `ptqlab run` (docs/architecture.md, "The arm run"), private to the engine:
// runner.cpp runs the experiment's stages (select/resume, components, shared artifacts, memory
// check, input statistics, allocation tables, the arms, the report) and arm_run.cpp one arm's
// (allocate, preprocess, quantize with layer checkpoints, evaluate, export, write). This header
// holds what both see: progress, the arm's log, the components and the artifacts every arm reads.
#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "ptqlab/engine/allocation_stage.hpp"
#include "ptqlab/engine/artifact_cache.hpp"
#include "ptqlab/engine/cache_keys.hpp"
#include "ptqlab/engine/experiment.hpp"
#include "ptqlab/engine/memory_model.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/engine/runner.hpp"
#include "ptqlab/model/model.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/outputs/results.hpp"
#include "ptqlab/quant/calibration.hpp"

namespace ptqlab::run_stages {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0);

// Progress of a run: on a terminal a status line (arms done, ETA, what each running arm does)
// redrawn in place with finished steps printed above it; otherwise one line per finished step.
class RunMonitor {
 public:
  explicit RunMonitor(int total);
  void stage(const std::string& arm, std::string what);
  void step(const std::string& arm, const std::string& line);
  void stage_done(const std::string& what);
  void arm_finished(const std::string& arm);
  void finish();
  // What the running stages do now, "arm: stage; arm: stage" (for the memory watch's samples).
  std::string doing() const;
  // Called after every stage change, outside the monitor's lock (the memory watch samples then).
  void on_change(std::function<void()> f) { on_change_ = std::move(f); }

 private:
  void set_stage(const std::string& arm, std::string what);  // stage() without on_change_
  void clear();
  void redraw();

  int total_;
  int done_ = 0;
  Clock::time_point start_;
  bool interactive_;
  bool drawn_ = false;
  mutable std::mutex mutex_;
  std::map<std::string, std::string> stages_;
  std::map<std::string, Clock::time_point> last_line_;  // non-interactive: when an arm's stage was last printed
  std::function<void()> on_change_;
};

// The components an arm is made of (a factory may refuse: then `error` says why and the arm fails).
struct ArmComponents {
  std::vector<std::shared_ptr<Preprocessor>> preprocessors;
  std::shared_ptr<Mask> mask;
  std::shared_ptr<Quantizer> quantizer;
  std::shared_ptr<Allocator> allocator;         // allocated arms (docs/allocation.md)
  std::vector<CandidateComponents> candidates;  // allocated arms: the candidates' quantizers and masks
  std::string error;
};

// What every arm reads and nobody writes: computed once before the arms start.
struct SharedArtifacts {
  LlamaModel model;
  std::unique_ptr<Tokenizer> tokenizer;
  int calibration_seq_len = 0;
  std::vector<std::vector<int>> calibration;
  std::vector<std::int32_t> calibration_tokens;               // the windows back to back, as stored in results
  std::map<std::filesystem::path, std::vector<int>> streams;  // dataset file -> BOS + ids
  ModelInputStats input_stats;                                // empty unless a component needs it
  std::map<std::string, AllocationTable> allocation_tables;   // content key -> table (allocated arms)
};

// Everything an arm's stages read, fixed before the arms start.
struct RunContext {
  const Experiment& exp;
  const RunOptions& options;
  const SharedArtifacts& shared;
  const RunKeys& keys;
  const std::vector<std::shared_ptr<Evaluator>>& evaluators;
  const ArtifactCache& cache;
  const Provenance& provenance;
  RunMonitor& monitor;
  ResultWriter& writer;
};

// One arm, start to end: its outcome (completed, failed or stopped), its result file written
// unless stopped.
ArmOutcome run_arm(const RunContext& run, const ArmSpec& arm, const ArmComponents& components);

// --layer-store and --export-dtype values (a bad one is refused before any compute).
DType layer_store_dtype(const std::string& store);
DType export_dtype(const std::string& dtype);
// Where an arm's layer checkpoint and spilled layers live: <out>/.<arm>.layers/.
std::filesystem::path layer_store_dir(const std::filesystem::path& out, const std::string& arm);

// The memory model of one arm (docs/architecture.md, "Memory model").
MemoryEstimate::Arm arm_memory(const ArmSpec& arm, const ArmComponents& comp, const LlamaModel& model,
                               const Experiment& exp, int nsamples, int calib_len, const RunOptions& options,
                               const std::map<std::filesystem::path, std::vector<int>>& streams);

}  // namespace ptqlab::run_stages
