#pragma once
// Bits-per-weight vs perplexity plots from result files (never recomputing anything):
// `ptqlab plot DIR... --out DIR --format png,svg,pdf --x all-in|paper`.
//
// One plot per model × evaluator/dataset: one point per method (the arm name without "-seed<N>";
// several seeds give the mean with ± one sample standard deviation as error bars), labelled by
// method, perplexity on a log scale, and the Pareto front (no other point has fewer or equal bits
// and lower or equal perplexity, one of them strictly) drawn as a line through its marked points.
// Runs whose value is NaN or infinite (failed or collapsed) are listed in a note on the plot and
// in the data file, never dropped silently. Each plot is written as <stem>.dat (the data),
// <stem>.gp (the gnuplot script, rerunnable by hand to restyle) and one image per format, made by
// gnuplot (pngcairo, svg, pdfcairo terminals).
#include "ptqlab/support/internal.hpp"  // not part of the plugin SDK
#include <filesystem>
#include <string>
#include <vector>

namespace ptqlab {

struct PlotPoint {
  double bits = 0;
  double value = 0;  // perplexity (lower is better)
};

// Indices of the points on the Pareto front (lowest value for given bits), ordered by bits
// ascending (then value). A point is on the front when no other point has bits <= and value <=
// with at least one strict; exact duplicates of a front point are all on it. Non-finite points
// are never on the front (and never dominate).
std::vector<std::size_t> pareto_front(const std::vector<PlotPoint>& points);

struct PlotOptions {
  std::filesystem::path out = "plots";
  std::vector<std::string> formats = {"png"};  // png | svg | pdf
  std::string x = "all-in";                    // all-in | paper
  std::string metric = "ppl";
  std::string gnuplot;  // the gnuplot program; empty: $PTQLAB_GNUPLOT, else "gnuplot" on PATH
};

// What was written: per plot its stem (e.g. "stories260K-tinystories"), the files, and the notes
// (methods that were not plotted and why).
struct PlotOutput {
  std::string stem;
  std::vector<std::filesystem::path> files;
  std::vector<std::string> notes;
};

// Validates the options and checks that gnuplot runs before anything is written; throws
// ptqlab::Error (one line) on bad options, missing gnuplot, unreadable result files or a gnuplot
// failure.
std::vector<PlotOutput> make_plots(const std::vector<std::filesystem::path>& inputs, const PlotOptions& options);

// Per-layer bits heatmaps of allocated (mixed-precision) results: one picture per result file with
// an /allocation group, layers across and q/k/v/o/gate/up/down down, each cell coloured by the
// all-in bits per weight of its unit's chosen candidate and labelled with the candidate
// (<model>-<arm>-allocation.{dat,gp,png}). Call after make_plots (which checks options and gnuplot).
std::vector<PlotOutput> make_allocation_heatmaps(const std::vector<std::filesystem::path>& inputs,
                                                 const PlotOptions& options);

}  // namespace ptqlab
