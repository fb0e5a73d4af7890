#pragma once
// The record of one experiment arm, as stored in DIR/<arm>.h5 (docs/results-schema.md).
// Writing goes through a temporary file renamed into place only when complete, so a killed run
// never leaves a file that looks finished.
#include <cstdint>
#include <filesystem>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "ptqlab/quant/bits.hpp"

namespace ptqlab {

inline constexpr int kResultSchemaVersion = 1;

struct Provenance {
  std::string ptqlab_version;
  std::string git_revision;
  std::map<std::string, std::string> library_versions;  // eigen, tbb, fmt, hdf5, yaml-cpp, ...
  std::string host;
  std::string start_time;  // ISO 8601, UTC
  std::string end_time;
  std::map<std::string, std::int64_t> seeds;  // "experiment", "calibration", ...
};

// One linear layer of one decoder layer, after quantization.
struct LinearRecord {
  int layer = 0;
  std::string linear;             // "q_proj", ...
  double weight_error = 0;        // ||W_q - W||_F / ||W||_F
  double output_error = 0;        // ||X W_qᵀ - X Wᵀ||_F / ||X Wᵀ||_F on calibration inputs; NaN if not measured
  BitCount bits;                  // the bit ledger of this linear
  double seconds = 0;             // time spent quantizing it
};

// A tensor logged by a plugin (masks, scales, quantized weights) when log_tensors is on.
struct LoggedTensor {
  std::string path;  // relative path under /tensors, e.g. "layer3/q_proj/mask"
  std::vector<std::int64_t> shape;
  std::vector<float> data;  // row-major
};

// A named series (loss curve per epoch, ...), stored under /series.
struct LoggedSeries {
  std::string path;  // e.g. "layer3/loss"
  std::vector<double> values;
};

// The allocation stage of an allocated arm (docs/results-schema.md, group /allocation): the
// measured table, the solver's certificate and the chosen candidate per unit.
struct AllocationRecord {
  std::string allocator;  // allocator plugin name
  std::string status;     // the solver's status ("optimal", "optimal (GLPK 5.0)", "feasible", ...)
  std::string metric, unit, loss;  // budget metric (allin|paper), unit kind, loss kind (hess|out_mse)
  std::string table_key;           // content hash of the table (shared by arms with the same key)
  bool table_from_cache = false;
  double budget = 0;                 // bits per weight asked for
  std::int64_t budget_bits = 0;      // floor(budget * weights)
  std::int64_t weights = 0;          // weights of all quantized linears
  std::int64_t solver_bits = 0;      // the table's bits of the choice
  double solver_loss = 0;            // the table's loss of the choice
  double lower_bound = 0;            // the solver's lower bound on the optimum (NaN: none)
  double solve_seconds = 0;
  double measure_seconds = 0;        // the table's total measurement time (when it was measured)
  double ledger_allin_bits = 0, ledger_paper_bits = 0;  // after quantization, from the ledger
  std::map<std::string, double> info;  // solver details
  std::vector<std::string> candidates;
  std::vector<std::string> units;
  std::vector<std::int32_t> unit_layer;
  std::vector<std::string> unit_linears;  // members joined by ','
  std::vector<std::int64_t> unit_weights;
  std::vector<std::int32_t> choice;       // candidate index per unit
  // [units x candidates], row-major.
  std::vector<std::int64_t> bits_allin, bits_paper;
  std::vector<double> loss_hess, loss_mse, seconds;
  std::vector<double> loss_block;  // [units x candidates] for layer units; empty otherwise
};

struct ArmResult {
  std::string arm;                 // arm name (the file is <arm>.h5)
  std::string experiment;          // experiment name
  std::string status = "ok";       // "ok" or "failed"
  std::string failure;             // message when failed
  std::string config_yaml;         // resolved arm config, YAML text
  std::string config_hash;         // hex digest of config_yaml (resume key)
  Provenance provenance;
  std::vector<std::int32_t> calibration_tokens;  // [nsamples, seq_len], row-major
  int calibration_nsamples = 0;
  int calibration_seq_len = 0;
  // metrics[evaluator][dataset][name] = value, e.g. metrics["perplexity"]["wikitext2"]["ppl"]
  std::map<std::string, std::map<std::string, std::map<std::string, double>>> metrics;
  // protocols[evaluator][dataset]: the evaluation protocol id, e.g. "lmeval-0.4.10/piqa@orig",
  // stored as the string attribute `protocol` of /metrics/<evaluator>/<dataset> (when set).
  std::map<std::string, std::map<std::string, std::string>> protocols;
  std::vector<LinearRecord> linears;
  BitCount total_bits;  // sum over all quantized linears
  std::vector<LoggedTensor> tensors;
  std::vector<LoggedSeries> series;
  double seconds = 0;  // wall time of the arm
  std::optional<AllocationRecord> allocation;  // allocated arms only
};

// Writes `result` to `path` atomically: a temporary file in the same directory, fsync'ed, then
// renamed. Throws ptqlab::Error naming the file on failure (nothing is left at `path` then).
void write_arm_result(const std::filesystem::path& path, const ArmResult& result);
// Reads a complete result file; throws ptqlab::Error naming the file when it is not one.
ArmResult read_arm_result(const std::filesystem::path& path);
// The stored config hash, or nullopt when the file is absent or not a complete ptqlab result
// (garbage, truncated, interrupted, or of another schema_version). Never throws.
std::optional<std::string> read_config_hash(const std::filesystem::path& path);

// The version of the HDF5 library in use ("1.10.8"), for Provenance::library_versions["hdf5"].
std::string hdf5_version();

// The process's single HDF5 writer: results are queued and written in order on one thread
// (libhdf5 is not thread-safe). The future reports the outcome of each write.
class ResultWriter {
 public:
  ResultWriter();
  ~ResultWriter();  // drains the queue
  ResultWriter(const ResultWriter&) = delete;
  ResultWriter& operator=(const ResultWriter&) = delete;
  std::future<void> submit(std::filesystem::path path, ArmResult result);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ptqlab
