#pragma once
// Paper tables from result files (never recomputing anything): `ptqlab report DIR... --format
// md|latex|csv --layout paper|ablation|long`.
//
// Rows group arms by method: the arm name with a trailing "-seed<N>" removed, per model; several
// seeds (or several result directories of the same experiment run with different seeds) become
// mean ± std (sample standard deviation). The best value of each metric column is bold (lowest,
// for perplexity). A missing cell is "–"; a failed or collapsed run shows its value or NaN, never
// disappears.
#include "ptqlab/support/internal.hpp"  // not part of the plugin SDK
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace ptqlab {

struct ReportOptions {
  std::string format = "md";      // md | latex | csv | lm-eval-json
  std::string layout = "paper";   // paper | ablation | long
  // Which metric of each evaluator/dataset fills the cells. "ppl" (the default) also fills
  // zero-shot columns with acc in % (plus a zero-shot average per model) and KL-divergence
  // columns with the mean KLD, the papers' layout; any other name fills every column with it.
  std::string metric = "ppl";
};

// The metric a column of evaluator `ev` shows under --metric `metric` ("ppl": acc for zeroshot,
// kld_mean for kl-divergence, ppl otherwise).
std::string column_metric(const std::string& evaluator, const std::string& metric);
// Whether higher is better for that column (zero-shot accuracy).
bool higher_is_better(const std::string& evaluator, const std::string& metric);

// lm-evaluation-harness's results JSON (research/evaluation.md §1.7) for one arm's result file:
// results / versions / n-shot / higher_is_better / n-samples / config, plus "ptqlab" provenance.
std::string lmeval_results_json(const std::filesystem::path& file);

// One result file as the report and plot commands see it.
struct ResultEntry {
  std::string method;  // the arm name without a trailing "-seed<N>"
  std::string model;   // the model directory's name
  std::string status;  // "ok" or "failed"
  double bits_paper = 0, bits_all_in = 0;
  std::optional<double> target_bits;            // the arm's bit budget (all-in), if a budget chose it
  bool allocated = false;                       // a mixed-precision arm (allocation stage, docs/allocation.md)
  std::map<std::string, std::string> switches;  // "quantizer.bits" -> "2", ...
  std::map<std::string, double> values;         // "evaluator/dataset" -> the chosen metric's value
  std::map<std::string, double> chance;         // zero-shot "evaluator/dataset" -> chance accuracy (%)
};

// Reads one result file (throws ptqlab::Error naming it when it is not one).
ResultEntry load_result_entry(const std::filesystem::path& file, const std::string& metric);

// The bit budget recorded in a resolved arm config (arm.budget.target_bits, or an allocated arm's
// arm.allocation.budget), if any.
std::optional<double> budget_target_bits(const std::string& config_yaml);

// Result files (*.h5, dot files skipped) found under the given files or directories, sorted.
std::vector<std::filesystem::path> find_result_files(const std::vector<std::filesystem::path>& inputs);

std::string make_report(const std::vector<std::filesystem::path>& inputs, const ReportOptions& options);

}  // namespace ptqlab
