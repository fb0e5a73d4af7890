// ptqlab plot: bits-per-weight vs perplexity plots (gnuplot) from result files.
#include <iostream>

#include <boost/program_options.hpp>
#include <fmt/format.h>

#include "commands.hpp"
#include "ptqlab/outputs/plot.hpp"
#include "ptqlab/support/error.hpp"

namespace po = boost::program_options;

namespace ptqlab::cli {

int cmd_plot(const Args& args) {
  std::vector<std::string> inputs;
  std::string out, formats;
  PlotOptions options;
  po::options_description desc("ptqlab plot options");
  desc.add_options()
      ("help,h", "show this help")
      ("inputs", po::value(&inputs)->multitoken(), "result directories or files")
      ("out", po::value(&out)->default_value("plots"), "directory for the .dat, .gp and image files")
      ("format", po::value(&formats)->default_value("png"), "comma-separated image formats: png, svg, pdf")
      ("x", po::value(&options.x)->default_value("all-in"), "bits on the x axis: all-in | paper")
      ("metric", po::value(&options.metric)->default_value("ppl"), "which metric is plotted (log scale)");
  po::positional_options_description pos;
  pos.add("inputs", -1);
  po::variables_map vm;
  po::store(po::command_line_parser(args).options(desc).positional(pos).run(), vm);
  if (vm.count("help")) {
    fmt::print("usage: ptqlab plot DIR... [--out DIR] [--format png,svg,pdf] [--x all-in|paper]\n\n"
               "One plot per model x dataset: bits per weight vs perplexity, a point per method (mean and std\n"
               "over seeds), the Pareto front highlighted (uniform and allocated arms get a front each), and a\n"
               "per-layer bits heatmap of every allocated result. Needs gnuplot (Debian: gnuplot-nox).\n\n");
    std::cout << desc << std::endl;
    return 0;
  }
  po::notify(vm);
  if (inputs.empty()) throw Error("ptqlab plot needs at least one result directory or file");
  options.out = out;
  options.formats.clear();
  std::size_t start = 0;
  while (start <= formats.size()) {
    const auto comma = formats.find(',', start);
    const auto item = formats.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    if (!item.empty()) options.formats.push_back(item);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  const std::vector<std::filesystem::path> paths(inputs.begin(), inputs.end());
  auto plots = make_plots(paths, options);
  for (auto& h : make_allocation_heatmaps(paths, options)) plots.push_back(std::move(h));
  for (const auto& p : plots) {
    fmt::print("{}:", p.stem);
    for (const auto& f : p.files) fmt::print(" {}", f.string());
    fmt::print("\n");
    for (const auto& n : p.notes) fmt::print("  not plotted: {}\n", n);
  }
  return 0;
}

}  // namespace ptqlab::cli
