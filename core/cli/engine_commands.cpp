// ptqlab run / ptqlab plugins: the experiment engine's command line.
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <iostream>

#include <boost/program_options.hpp>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "ptqlab/engine/experiment.hpp"
#include "ptqlab/engine/memory_model.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/engine/runner.hpp"
#include "ptqlab/outputs/report.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/stop.hpp"

namespace po = boost::program_options;

namespace ptqlab::cli {

// The build's plugin directory first, then --plugin-path directories, then the experiment's.
void add_plugin_paths(PluginRegistry& registry, const std::vector<std::string>& extra) {
  const auto builtin = PluginRegistry::default_plugin_dir();
  if (!builtin.empty()) registry.add_search_path(builtin);
  for (const auto& p : extra) registry.add_search_path(p);
}

std::optional<po::variables_map> parse_options(const std::string& command, const std::string& usage,
                                               po::options_description& desc, po::positional_options_description* pos,
                                               const Args& args) {
  desc.add_options()("help,h", "show this help");
  po::variables_map vm;
  po::command_line_parser parser(args);
  parser.options(desc);
  if (pos != nullptr) parser.positional(*pos);
  po::store(parser.run(), vm);
  if (vm.count("help")) {
    fmt::print("usage: ptqlab {} {}\n\n", command, usage);
    std::cout << desc << std::endl;
    return std::nullopt;
  }
  po::notify(vm);
  return vm;
}

namespace {

std::string param_range(const ParamSpec& p) {
  if (!p.choices.empty()) return fmt::format("one of {}", fmt::join(p.choices, ", "));
  if (!p.min && !p.max) return "";
  auto text = [&](const std::optional<double>& b, const char* inf) {
    if (!b) return std::string(inf);
    return p.type == ParamType::integer ? std::to_string(static_cast<long long>(*b)) : param_value_text(*b);
  };
  return fmt::format("[{}, {}]", text(p.min, "-inf"), text(p.max, "inf"));
}

}  // namespace

int cmd_run(const Args& args) {
  std::string file, out, arms = "*", cache_dir, layer_store = "memory", memory_limit, memory_trace, export_dir,
      export_dtype = "f16";
  int jobs = 1;
  std::vector<std::string> plugin_paths;
  po::options_description desc("ptqlab run options");
  desc.add_options()
      ("experiment", po::value(&file)->required(), "experiment YAML file")
      ("out", po::value(&out), "result directory (default: results/<experiment name>)")
      ("arms", po::value(&arms)->default_value("*"), "run only the arms whose names match this glob")
      ("jobs,j", po::value(&jobs)->default_value(1), "arms run in parallel (TBB threads in all)")
      ("force", "recompute arms whose results already exist")
      ("cache-dir", po::value(&cache_dir), "on-disk cache of shared artifacts (default: <out>/.cache)")
      ("no-cache", "do not use an on-disk cache")
      ("layer-store", po::value(&layer_store)->default_value("memory"),
       "where arms keep quantized layers: memory (f32), or their own files under <out>: f32, f16, bf16")
      ("memory-limit", po::value(&memory_limit), "memory the run may use (e.g. 6G; default: what is available)")
      ("memory-trace", po::value(&memory_trace), "write a TSV timeline of RssAnon and each arm's stage to FILE")
      ("export-dir", po::value(&export_dir), "also write each completed arm as a HF checkpoint to DIR/<arm>/")
      ("export-dtype", po::value(&export_dtype)->default_value("f16"), "dtype of exported weights: f16, bf16, f32")
      ("plugin-path", po::value(&plugin_paths)->composing(), "extra plugin directory (repeatable)");
  po::positional_options_description pos;
  pos.add("experiment", 1);
  auto vm = parse_options("run",
                          "EXPERIMENT.yaml [--out DIR] [--arms GLOB] [--jobs N] [--force]\n\n"
                          "Exit status: 0 all arms done, 1 an arm failed, 2 bad input, 75 stopped by SIGTERM\n"
                          "(unfinished arms wrote nothing; rerun the same command to resume; docs/slurm.md).",
                          desc, &pos, args);
  if (!vm) return 0;
  // SIGTERM (sent by Slurm before a time limit) stops the run cleanly at the next safe point.
  install_stop_handler();
  if (jobs < 1) throw Error(fmt::format("--jobs must be at least 1, got {}", jobs));

  PluginRegistry registry;
  add_plugin_paths(registry, plugin_paths);
  for (const auto& p : experiment_plugin_paths(file)) registry.add_search_path(p);
  const Experiment exp = load_experiment(file, registry);

  RunOptions options;
  options.out_dir = out.empty() ? std::filesystem::path("results") / exp.name : std::filesystem::path(out);
  options.arms_glob = arms;
  options.jobs = jobs;
  options.force = vm->count("force") > 0;
  options.layer_store = layer_store;
  options.export_dir = export_dir;
  options.export_dtype = export_dtype;
  options.memory_trace = memory_trace;
  if (!memory_limit.empty()) options.memory_limit = parse_memory_size(memory_limit, "--memory-limit");
  if (!vm->count("no-cache")) options.cache_dir = cache_dir.empty() ? options.out_dir / ".cache" : std::filesystem::path(cache_dir);

  fmt::print("experiment {} ({}): {} arms, model {}, results in {}\n", exp.name, exp.file.string(), exp.arms.size(),
             exp.model_dir.string(), options.out_dir.string());
  std::fflush(stdout);
  const auto report = run_experiment(exp, registry, options);
  fmt::print("\n{}", format_results_table(report));
  int skipped = 0;
  for (const auto& a : report.arms) skipped += a.status == ArmOutcome::Status::skipped;
  const int ran = static_cast<int>(report.arms.size()) - skipped - report.failed() - report.stopped();
  fmt::print("\n{} arms: {} run, {} already done, {} failed, {} stopped, in {:.1f}s\n", report.arms.size(), ran,
             skipped, report.failed(), report.stopped(), report.seconds);
  std::fflush(stdout);
  for (const auto& a : report.arms)
    if (a.status == ArmOutcome::Status::failed) fmt::print(stderr, "ptqlab: arm '{}' failed: {}\n", a.arm, a.message);
  if (report.stopped() > 0) {
    std::vector<std::string> stopped;
    for (const auto& a : report.arms)
      if (a.status == ArmOutcome::Status::stopped) stopped.push_back(fmt::format("{} ({})", a.arm, a.message));
    fmt::print(stderr,
               "ptqlab: stopped by SIGTERM: {} arm(s) unfinished, no result written for them: {}; {} finished arm(s) "
               "kept; rerun the same command to resume\n",
               stopped.size(), fmt::join(stopped, ", "), ran + skipped);
    return kExitStopped;
  }
  return report.failed() > 0 ? 1 : 0;
}

int cmd_plugins(const Args& args) {
  std::string kind_text, name;
  std::vector<std::string> plugin_paths;
  po::options_description desc("ptqlab plugins options");
  desc.add_options()
      ("name", po::value(&name), "show one component")
      ("kind", po::value(&kind_text), "quantizer | mask | preprocessor | evaluator | allocator")
      ("plugin-path", po::value(&plugin_paths)->composing(), "extra plugin directory (repeatable)")
      ("json", "print JSON")
      ("markdown", "print the Markdown parameter reference (docs/config-reference.md)");
  po::positional_options_description pos;
  pos.add("name", 1);
  auto vm = parse_options("plugins", "[NAME] [--kind K] [--json|--markdown]", desc, &pos, args);
  if (!vm) return 0;
  std::optional<ComponentKind> kind;
  if (!kind_text.empty()) {
    kind = parse_component_kind(kind_text);
    if (!kind) throw Error(fmt::format("--kind '{}': must be quantizer, mask, preprocessor, evaluator or allocator", kind_text));
  }
  PluginRegistry registry;
  add_plugin_paths(registry, plugin_paths);
  std::vector<const ComponentSchema*> list;
  for (const auto* s : registry.list(kind))
    if (name.empty() || s->name == name) list.push_back(s);
  if (list.empty() && !name.empty()) throw Error(fmt::format("no plugin component named '{}' (see 'ptqlab plugins')", name));

  if (vm->count("json")) {
    nlohmann::json j = nlohmann::json::array();
    for (const auto* s : list) {
      nlohmann::json params = nlohmann::json::array();
      for (const auto& p : s->params) {
        nlohmann::json pj = {{"name", p.name}, {"type", param_type_name(p.type)}, {"doc", p.doc},
                             {"default", param_value_text(p.default_value)}};
        if (p.min) pj["min"] = *p.min;
        if (p.max) pj["max"] = *p.max;
        if (!p.choices.empty()) pj["choices"] = p.choices;
        params.push_back(pj);
      }
      j.push_back({{"kind", component_kind_name(s->kind)}, {"name", s->name}, {"description", s->description},
                   {"library", registry.library_of(s->kind, s->name).filename().string()}, {"params", params}});
    }
    fmt::print("{}\n", j.dump(2));
    return 0;
  }
  if (vm->count("markdown")) {
    fmt::print("# Plugin parameter reference\n\n");
    fmt::print("Generated by `ptqlab plugins --markdown` from the plugins' own schemas; do not edit by hand.\n");
    fmt::print("The experiment file format is described in [experiments.md](experiments.md).\n");
    for (auto k : {ComponentKind::quantizer, ComponentKind::mask, ComponentKind::preprocessor, ComponentKind::evaluator,
                   ComponentKind::allocator}) {
      bool header = false;
      for (const auto* s : list) {
        if (s->kind != k) continue;
        if (!header) fmt::print("\n## {}s\n", component_kind_name(k));
        header = true;
        fmt::print("\n### `{}`\n\n{}\n\n", s->name, s->description);
        if (s->params.empty()) {
          fmt::print("No parameters.\n");
          continue;
        }
        fmt::print("| param | type | default | range | description |\n|---|---|---|---|---|\n");
        for (const auto& p : s->params)
          fmt::print("| `{}` | {} | `{}` | {} | {} |\n", p.name, param_type_name(p.type), param_value_text(p.default_value),
                     param_range(p), p.doc);
      }
    }
    return 0;
  }
  for (const auto* s : list) {
    fmt::print("{} {}: {}\n", component_kind_name(s->kind), s->name, s->description);
    for (const auto& p : s->params) {
      const auto range = param_range(p);
      fmt::print("    {:<14} {:<6} default {:<8} {}{}\n", p.name, param_type_name(p.type), param_value_text(p.default_value),
                 range.empty() ? "" : range + "  ", p.doc);
    }
  }
  return 0;
}

int cmd_report(const Args& args) {
  std::vector<std::string> inputs;
  std::string out;
  ReportOptions options;
  po::options_description desc("ptqlab report options");
  desc.add_options()
      ("inputs", po::value(&inputs)->multitoken(), "result directories or files")
      ("format", po::value(&options.format)->default_value("md"), "md | latex | csv | lm-eval-json (one arm's zero-shot results in lm-eval's layout)")
      ("layout", po::value(&options.layout)->default_value("paper"),
       "paper (a row per method, a column per model x dataset) | ablation (a row per switch combination) | long")
      ("metric", po::value(&options.metric)->default_value("ppl"),
       "which metric fills the cells; ppl: perplexity, zero-shot acc (%) and mean KLD columns")
      ("out", po::value(&out), "write to this file instead of stdout");
  po::positional_options_description pos;
  pos.add("inputs", -1);
  auto vm = parse_options("report", "DIR... [--format md|latex|csv|lm-eval-json] [--layout paper|ablation|long] [--out FILE]", desc,
                          &pos, args);
  if (!vm) return 0;
  if (inputs.empty()) throw Error("ptqlab report needs at least one result directory or file");
  std::vector<std::filesystem::path> paths(inputs.begin(), inputs.end());
  const std::string text = make_report(paths, options);
  if (out.empty()) {
    fmt::print("{}", text);
    return 0;
  }
  // Written to a temporary name and renamed: an existing report is never left half-written.
  const auto tmp = std::filesystem::path(out).parent_path() /
                   fmt::format(".{}.tmp-{}", std::filesystem::path(out).filename().string(), ::getpid());
  {
    std::ofstream f(tmp);
    f << text;
    if (!f.flush()) throw Error(fmt::format("{}: cannot write the report", out));
  }
  std::filesystem::rename(tmp, out);
  return 0;
}

}  // namespace ptqlab::cli
