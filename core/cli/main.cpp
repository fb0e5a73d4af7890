// ptqlab: command-line entry point. Dispatches to subcommands; turns user errors into one line on
// stderr and exit status 2.
#include <csignal>
#include <cstdio>
#include <exception>
#include <functional>
#include <map>
#include <string>

#include <boost/program_options/errors.hpp>
#include <fmt/format.h>

#include "commands.hpp"
#include "ptqlab/support/build_info.hpp"
#include "ptqlab/support/error.hpp"

namespace {

struct Command {
  std::function<int(const ptqlab::cli::Args&)> run;
  const char* summary;
};

const std::map<std::string, Command>& commands() {
  static const std::map<std::string, Command> table = {
      {"ppl", {ptqlab::cli::cmd_ppl, "perplexity of a model on a text file (protocol ptqlab-ppl-v1)"}},
      {"generate", {ptqlab::cli::cmd_generate, "continue a prompt (greedy by default)"}},
      {"info", {ptqlab::cli::cmd_info, "show a checkpoint's architecture, dtype and parameter count"}},
      {"run", {ptqlab::cli::cmd_run, "run the arms of a YAML experiment, one HDF5 result file per arm"}},
      {"plugins", {ptqlab::cli::cmd_plugins, "list plugin components and their parameters"}},
      {"report", {ptqlab::cli::cmd_report, "paper tables (Markdown, LaTeX, CSV) from result files"}},
      {"plot", {ptqlab::cli::cmd_plot, "bits vs perplexity plots with the Pareto front (gnuplot) from result files"}},
      {"synth-model", {ptqlab::cli::cmd_synth_model, "write a checkpoint at real LLaMA shapes with random weights (benchmarks)"}},
      {"sweep", {ptqlab::cli::cmd_sweep, "run an experiment's arms as a Slurm job array (--slurm), then a report job"}},
  };
  return table;
}

void print_help() {
  fmt::print(
      "ptqlab {} ({}): low-bit post-training quantization research framework\n\n"
      "usage: ptqlab <command> [options]\n       ptqlab <command> --help\n\ncommands:\n",
      ptqlab::version(), ptqlab::git_revision());
  for (const auto& [name, cmd] : commands()) fmt::print("  {:<12} {}\n", name, cmd.summary);
}

// One line whatever the message holds: control characters (from a tensor name, a quoted YAML
// value) are shown as escapes.
std::string one_line(const std::string& s) {
  std::string out;
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '\n') out += "\\n";
    else if (c < 0x20 || c == 0x7f) out += fmt::format("\\x{:02x}", c);
    else out += ch;
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    print_help();
    return ptqlab::kExitUserError;
  }
  const std::string name = argv[1];
  if (name == "--help" || name == "-h" || name == "help") {
    print_help();
    return 0;
  }
  if (name == "--version") {
    fmt::print("ptqlab {} ({})\n", ptqlab::version(), ptqlab::git_revision());
    return 0;
  }
  const auto it = commands().find(name);
  if (it == commands().end()) {
    fmt::print(stderr, "ptqlab: error: unknown command '{}' (see 'ptqlab --help')\n", one_line(name));
    return ptqlab::kExitUserError;
  }
  // Past a file-size limit (ulimit -f) a write then fails with EFBIG and is reported like a full
  // disk, instead of the default SIGXFSZ killing the process with a half-written file.
  std::signal(SIGXFSZ, SIG_IGN);
  const ptqlab::cli::Args args(argv + 2, argv + argc);
  try {
    return it->second.run(args);
  } catch (const ptqlab::Error& e) {
    fmt::print(stderr, "ptqlab: error: {}\n", one_line(e.what()));
    return ptqlab::kExitUserError;
  } catch (const boost::program_options::error& e) {
    fmt::print(stderr, "ptqlab {}: error: {} (see 'ptqlab {} --help')\n", name, one_line(e.what()), name);
    return ptqlab::kExitUserError;
  } catch (const std::bad_alloc&) {
    fmt::print(stderr, "ptqlab: error: out of memory\n");
    return 1;
  } catch (const std::exception& e) {
    fmt::print(stderr, "ptqlab: internal error: {}\n", one_line(e.what()));
    return 1;
  }
}
