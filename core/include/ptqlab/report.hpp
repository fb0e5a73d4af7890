#pragma once
// Paper tables from result files (never recomputing anything): `ptqlab report DIR... --format
// md|latex|csv --layout paper|ablation|long`.
//
// Rows group arms by method: the arm name with a trailing "-seed<N>" removed, per model; several
// seeds (or several result directories of the same experiment run with different seeds) become
// mean ± std (sample standard deviation). The best value of each metric column is bold (lowest,
// for perplexity). A missing cell is "–"; a failed or collapsed run shows its value or NaN, never
// disappears.
#include <filesystem>
#include <string>
#include <vector>

namespace ptqlab {

struct ReportOptions {
  std::string format = "md";      // md | latex | csv
  std::string layout = "paper";   // paper | ablation | long
  std::string metric = "ppl";     // which metric of each evaluator/dataset fills the cells
};

// Result files (*.h5, dot files skipped) found under the given files or directories, sorted.
std::vector<std::filesystem::path> find_result_files(const std::vector<std::filesystem::path>& inputs);

std::string make_report(const std::vector<std::filesystem::path>& inputs, const ReportOptions& options);

}  // namespace ptqlab
