#pragma once
// `ptqlab sweep EXP.yaml --slurm` (docs/slurm.md): an experiment's arms as a Slurm job array.
//
// Everything here is text generation and file inspection, so it is tested without Slurm: which
// arms still need a run (no result, a failed one, or with --force every arm), the sbatch array
// script (task i runs arm i of a frozen copy of the experiment), the report script run after the
// array (afterok), the manifest (task index -> arm -> config hash) and the sbatch command lines.
// Submitting (running sbatch) is the CLI's job.
#include "ptqlab/support/internal.hpp"  // not part of the plugin SDK
#include <filesystem>
#include <string>
#include <vector>

#include "ptqlab/engine/experiment.hpp"

namespace ptqlab {

class PluginRegistry;

struct SlurmSweepOptions {
  std::filesystem::path out_dir;                    // absolute: results, and the files under out_dir/slurm
  std::string partition;                            // empty: the cluster's default partition
  std::string time_limit = "01:00:00";              // per task, any sbatch --time form with a number
  std::string mem;                                  // per task, e.g. "4G"; empty: the cluster's default
  int cpus = 1;                                     // per task; each task runs `ptqlab run --jobs <cpus>`
  int throttle = 0;                                 // at most this many tasks at once (%N); 0: no limit
  std::string arms_glob = "*";                      // submit only arms whose names match (fnmatch)
  bool force = false;                               // submit every arm, recomputing existing results
  std::filesystem::path ptqlab_binary;              // absolute path the jobs run
  std::vector<std::filesystem::path> plugin_paths;  // --plugin-path directories, passed on to the jobs
};

// Seconds of an sbatch --time value: "M", "M:S", "H:M:S", "D-H", "D-H:M", "D-H:M:S".
// Throws ptqlab::Error naming --time for anything else (also "UNLIMITED": SIGTERM needs a limit).
long long parse_slurm_time(const std::string& text);

// Checks every option; throws ptqlab::Error with a one-line message naming the option.
void validate_slurm_options(const SlurmSweepOptions& options);

// How long before the time limit Slurm sends SIGTERM (#SBATCH --signal=B:TERM@<secs>): 120 s, or
// half the limit when that is shorter.
long long signal_lead_seconds(long long limit_seconds);

struct SweepArm {
  enum class State { missing, done, failed, stale };  // result file: none/incomplete, ok, failed, other config
  int index = 0;  // the array task index: the arm's position in the experiment
  std::string arm;
  std::string config_hash;
  State state = State::missing;
};

struct SlurmSweepPlan {
  std::vector<SweepArm> arms;  // every arm of the experiment, in order
  std::vector<int> pending;    // task indices to submit: selected arms that are missing or failed (all with --force)
  std::string frozen_name;     // "experiment-<12 hex>.yaml", named by its content
  std::string frozen_yaml;     // the experiment with every path absolute and its name explicit
  std::string array_script;
  std::string report_script;
  std::string manifest;        // TSV: index, arm, config_hash, result
  std::string array_spec;      // sbatch --array value, e.g. "0-2,5%4"; empty when nothing is pending
};

// Looks at the result files in out_dir and generates every file's text. Throws ptqlab::Error when
// a result file holds another configuration (without force), or a bad option.
SlurmSweepPlan plan_slurm_sweep(const Experiment& experiment, const SlurmSweepOptions& options);

// Writes out_dir/slurm/{<frozen_name>, array.sbatch, report.sbatch, manifest.tsv} and creates
// out_dir/slurm/logs. Each file is written to a temporary name and renamed. The frozen copy is
// loaded back first and must give the same arms and config hashes as the experiment (otherwise
// nothing is written and ptqlab::Error says why).
void write_slurm_sweep(const SlurmSweepPlan& plan, const Experiment& experiment, const SlurmSweepOptions& options,
                       const PluginRegistry& registry);

// The two submission commands (shell), the report's dependency on `array_job` ("$jobid" when the
// commands are printed for the user to run).
std::string sbatch_array_command(const SlurmSweepPlan& plan, const SlurmSweepOptions& options);
std::string sbatch_report_command(const SlurmSweepOptions& options, const std::string& array_job);

// "0-3,5,7-8" from sorted task indices.
std::string compress_indices(const std::vector<int>& indices);

// The string in single quotes for a POSIX shell.
std::string shell_quote(const std::string& s);

}  // namespace ptqlab
