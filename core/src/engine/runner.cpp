// `ptqlab run`: an experiment's stages (docs/architecture.md, "The arm run"):
//   select      which arms, and which are done already (same config hash: skipped)
//   components  each arm's plugins (a factory may refuse: that arm fails) and the evaluators' checks
//   shared      the model (mapped), tokenizer, token streams and calibration windows, once
//   memory      the predicted peak, refused before any compute when it does not fit
//   statistics  FP input statistics, when a component asks for them
//   allocation  the allocation tables of allocated arms, once per content key
//   arms        run_arm (arm_run.cpp) for each arm, in parallel in a task arena of --jobs threads
//   report      the outcomes in the experiment's arm order
#include "ptqlab/engine/runner.hpp"

#include <fnmatch.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include "ptqlab/engine/memory_watch.hpp"
#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/outputs/report.hpp"
#include "ptqlab/support/build_info.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/progress.hpp"
#include "ptqlab/support/stop.hpp"
#include "ptqlab/support/utf8.hpp"
#include "run_stages.hpp"

namespace ptqlab {

int RunReport::failed() const {
  int n = 0;
  for (const auto& a : arms) n += a.status == ArmOutcome::Status::failed;
  return n;
}

int RunReport::stopped() const {
  int n = 0;
  for (const auto& a : arms) n += a.status == ArmOutcome::Status::stopped;
  return n;
}

namespace run_stages {

DType export_dtype(const std::string& dtype) {
  if (dtype == "f32") return DType::F32;
  if (dtype == "f16") return DType::F16;
  if (dtype == "bf16") return DType::BF16;
  throw Error(fmt::format("--export-dtype: unknown dtype '{}' (f16, bf16, f32)", dtype));
}

DType layer_store_dtype(const std::string& store) {
  if (store == "f32") return DType::F32;
  if (store == "f16") return DType::F16;
  if (store == "bf16") return DType::BF16;
  throw Error(fmt::format("--layer-store: unknown store '{}' (memory, f32, f16, bf16)", store));
}

std::filesystem::path layer_store_dir(const std::filesystem::path& out, const std::string& arm) {
  return out / ("." + arm + ".layers");
}

// The memory model of one arm (docs/architecture.md, "Memory model"): its peak is what it keeps
// (quantized layers) plus the larger of its quantization stage and its evaluation.
MemoryEstimate::Arm arm_memory(const ArmSpec& arm, const ArmComponents& comp, const LlamaModel& model,
                               const Experiment& exp, int nsamples, int calib_len, const RunOptions& options,
                               const std::map<std::filesystem::path, std::vector<int>>& streams) {
  const auto& c = model.config;
  const double f = sizeof(float), d = sizeof(double);
  const double layer = static_cast<double>(model.layer_f32_bytes());
  MemoryEstimate::Arm a;
  a.name = arm.name;
  const bool resident = !comp.preprocessors.empty();
  const double whole = layer * c.num_layers + static_cast<double>(model.head_f32_bytes()) *
                                                  (c.tie_word_embeddings ? 1 : 2);
  if (resident) a.items.push_back({"whole model in f32 (preprocessing)", whole});
  const double kept = options.layer_store == "memory" && !resident ? layer * c.num_layers : 0.0;
  if (kept > 0) a.items.push_back({"quantized layers kept in f32", kept});

  // Quantization stage.
  const bool fp_stream = comp.quantizer && comp.quantizer->granularity() == Quantizer::Granularity::decoder_layer &&
                         comp.quantizer->needs_fp_stream();
  const double stream = static_cast<double>(nsamples) * calib_len * c.hidden_size *
                        static_cast<double>(stream_dtype_bytes(exp.calibration.stream_dtype));
  const double widths[4] = {static_cast<double>(c.hidden_size), static_cast<double>(c.q_dim()),
                            static_cast<double>(c.hidden_size), static_cast<double>(c.intermediate_size)};
  const bool per_layer = comp.quantizer && comp.quantizer->granularity() == Quantizer::Granularity::decoder_layer;
  const bool factors = comp.quantizer && comp.quantizer->needs_hessian();
  // With fewer calibration tokens than inputs the records use the inputs X (calibration.cpp), and
  // an input whose components read no Hessian (RTN without a mask) gets none.
  const double tokens = static_cast<double>(nsamples) * calib_len;
  const bool hessians_read = per_layer || factors || comp.mask || comp.allocator;
  double hess_all = 0, widest = 0, widest_hessian = 0;
  for (double w : widths) {
    widest = std::max(widest, w);
    if (!hessians_read && w > std::max(256.0, tokens)) continue;
    hess_all += w * w * d;
    widest_hessian = std::max(widest_hessian, w);
  }
  // The factor of an n-input Hessian at its peak (gptq.cpp, reversed_factor): above 256 inputs the
  // float32 triangular inverse and its float64 copy (4 + 8 bytes per entry), else float64 (8 + 8).
  const double factor_peak = widest * widest * (widest > 256 ? 12.0 : 16.0);
  const double largest_linear = static_cast<double>(c.hidden_size) * std::max(widest, widths[1]) * f;
  const double rows = std::min<double>(nsamples, std::max(1, 4096 / std::max(1, calib_len))) * calib_len;
  const double layer_tmp =
      rows * f * (3.0 * c.hidden_size + 2.0 * c.q_dim() + 2.0 * c.kv_dim() + 2.0 * c.intermediate_size);
  // Two phases never overlap (calibration.cpp): the Hessian pass holds all four Hessians and one
  // batch's layer temporaries; a per-linear quantizer then frees each input's Hessian and factors
  // after its last linear, so at most the widest input's are held, with its factor being made and
  // the column loop's copy of the weight. A decoder-layer quantizer keeps all of them, the
  // original layer and every factor until the layer is done.
  // The inputs X are kept for every input wider than the token count through the layer's quantization.
  double kept_x = 0;
  for (double w : widths)
    if (w > std::max(256.0, tokens)) kept_x += tokens * w * f;
  double phases;
  if (per_layer) {
    // every input's factor stays cached (a float64 n x n each: as much as the Hessians)
    phases = hess_all + layer_tmp + (factors ? hess_all + factor_peak : 0.0);
  } else {
    phases = std::max(hess_all + layer_tmp,
                      widest_hessian * widest_hessian * d + (factors ? factor_peak + largest_linear : 0.0));
  }
  phases += kept_x;
  std::vector<MemoryItem> quant;
  if (per_layer)
    quant.push_back({"layer being quantized (copy + original, f32)", 2 * layer});
  else
    quant.push_back({"layer being quantized (f32) + the largest linear's original", layer + largest_linear});
  quant.push_back({fp_stream ? "calibration streams (quantized + FP)" : "calibration stream", stream * (fp_stream ? 2 : 1)});
  quant.push_back(
      {factors ? "Hessians, factors, temporaries (the larger phase)" : "Hessians and temporaries (the larger phase)", phases});
  // Evaluation stage: the largest dataset.
  std::vector<MemoryItem> eval;
  double eval_bytes = 0;
  for (const auto& e : exp.evaluators) {
    int seq_len = c.max_position_embeddings;
    long long max_windows = 0;
    auto int_param = [&](const char* name) -> long long {
      if (!e.evaluator.params.values().count(name)) return 0;
      try {
        return e.evaluator.params.get_int(name);
      } catch (const std::exception&) {
        return 0;
      }
    };
    if (int_param("seq_len") > 0) seq_len = static_cast<int>(int_param("seq_len"));
    max_windows = int_param("max_windows");
    for (const auto& ds : e.datasets) {
      const auto it = streams.find(ds.file);
      if (it == streams.end() || seq_len < 2) continue;
      long long windows = static_cast<long long>(it->second.size()) / seq_len;
      if (max_windows > 0) windows = std::min(windows, max_windows);
      if (windows == 0) continue;
      // The arm's layers are resident or spilled (f32 spill: in place); the base's are stored.
      auto items = eval_memory(model, windows, seq_len, 0, 0);
      // The arm's own layers are resident (memory) or mapped F32 in place: none is widened.
      if (options.layer_store == "memory" || options.layer_store == "f32")
        for (auto& i : items)
          if (i.what == "one layer widened to f32") i.bytes = 0;
      double sum = 0;
      for (const auto& i : items) sum += i.bytes;
      if (sum > eval_bytes) {
        eval_bytes = sum;
        eval = items;
      }
    }
  }
  double quant_bytes = 0;
  for (const auto& i : quant) quant_bytes += i.bytes;
  const auto& stage = quant_bytes >= eval_bytes ? quant : eval;
  a.items.insert(a.items.end(), stage.begin(), stage.end());
  return a;
}

}  // namespace run_stages

namespace {

using namespace run_stages;

std::string host_name() {
  char buf[256] = {0};
  return ::gethostname(buf, sizeof buf - 1) == 0 ? std::string(buf) : std::string("unknown");
}

// Stage "select": the arms --arms names, less those whose result file exists with the same config
// hash (reported as skipped). A result of another configuration under an arm's name is refused
// unless --force.
std::vector<const ArmSpec*> select_arms(const Experiment& exp, const RunOptions& options, RunReport& report) {
  std::vector<const ArmSpec*> selected;
  for (const auto& arm : exp.arms)
    if (::fnmatch(options.arms_glob.c_str(), arm.name.c_str(), 0) == 0) selected.push_back(&arm);
  if (selected.empty()) {
    std::vector<std::string> names;
    for (const auto& a : exp.arms) names.push_back(a.name);
    throw Error(fmt::format("--arms '{}' matches no arm of {} (arms: {})", options.arms_glob, exp.file.string(),
                            fmt::join(names, ", ")));
  }
  std::error_code out_error;
  if (std::filesystem::exists(options.out_dir, out_error) && !std::filesystem::is_directory(options.out_dir, out_error))
    throw Error(fmt::format("{}: the result directory (--out) is not a directory", options.out_dir.string()));

  std::vector<const ArmSpec*> todo;
  std::vector<std::string> conflicts;
  for (const ArmSpec* arm : selected) {
    const auto file = options.out_dir / (arm->name + ".h5");
    if (!options.force && std::filesystem::exists(file)) {
      const auto hash = read_config_hash(file);
      if (hash && *hash == arm->config_hash) {
        ArmOutcome skipped{arm->name, ArmOutcome::Status::skipped, "result exists with the same config", file, {}};
        bool readable = true;
        try {
          skipped.result = read_arm_result(file);
        } catch (const Error&) {
          readable = false;  // not a complete result: recompute it
        }
        if (readable && skipped.result.status == "ok") {
          report.arms.push_back(std::move(skipped));
          continue;
        }
      } else if (hash) {
        conflicts.push_back(file.string());
      }
    }
    todo.push_back(arm);
  }
  if (!conflicts.empty())
    throw Error(fmt::format("{} already hold results of a different configuration (config hash differs); rerun with "
                            "--force to recompute them, or choose another --out",
                            fmt::join(conflicts, ", ")));
  return todo;
}

// Stage "components": each arm's plugins. A factory may refuse a combination of valid
// parameters: that arm fails (ArmComponents::error), the others run.
std::vector<ArmComponents> make_components(const PluginRegistry& registry, const std::vector<const ArmSpec*>& todo,
                                           bool& need_stats) {
  std::vector<ArmComponents> components(todo.size());
  need_stats = false;
  for (std::size_t i = 0; i < todo.size(); ++i) {
    const ArmSpec& arm = *todo[i];
    auto& c = components[i];
    try {
      for (const auto& p : arm.preprocessors) c.preprocessors.push_back(registry.make_preprocessor(p.name, p.params));
      if (arm.allocation) {
        c.allocator = registry.make_allocator(arm.allocation->allocator.name, arm.allocation->allocator.params);
        c.candidates = make_candidates(registry, *arm.allocation);
        for (const auto& k : c.candidates)
          need_stats = need_stats || k.quantizer->needs_input_stats() || (k.mask && k.mask->needs_input_stats());
      } else {
        if (arm.mask) c.mask = registry.make_mask(arm.mask->name, arm.mask->params);
        c.quantizer = registry.make_quantizer(arm.quantizer.name, arm.quantizer.params);
        need_stats = need_stats || c.quantizer->needs_input_stats() || (c.mask && c.mask->needs_input_stats());
      }
    } catch (const Error& e) {
      c = ArmComponents{};
      c.error = e.what();
    }
  }
  return components;
}

// The evaluators, each checking its datasets against the model before anything is computed.
std::vector<std::shared_ptr<Evaluator>> make_evaluators(const Experiment& exp, const PluginRegistry& registry) {
  std::vector<std::shared_ptr<Evaluator>> evaluators;
  for (const auto& e : exp.evaluators) evaluators.push_back(registry.make_evaluator(e.evaluator.name, e.evaluator.params));
  const LlamaConfig config = load_llama_config(exp.model_dir / "config.json");
  for (std::size_t e = 0; e < exp.evaluators.size(); ++e)
    for (const auto& d : exp.evaluators[e].datasets) {
      try {
        evaluators[e]->check(EvalCheckContext{d.name, d.file, &config});
      } catch (const Error& err) {
        throw Error(fmt::format("{}:{}:{}: eval[{}] {} dataset '{}': {}", exp.file.string(), d.line, d.column, e,
                                exp.evaluators[e].evaluator.name, d.name, err.what()));
      }
    }
  return evaluators;
}

// A text's token stream from the cache, or tokenized; `store_key` is set when the caller should
// store it (only once the inputs are known to be good, so a bad input leaves no cache behind).
std::vector<int> tokenize_file(const std::filesystem::path& text, const Tokenizer& tok, int bos,
                               const std::filesystem::path& tokenizer_model, const ArtifactCache& cache,
                               std::string& store_key) {
  const auto key = cache.enabled() ? token_stream_key(tokenizer_model, text) : std::string();
  if (cache.enabled())
    if (auto hit = cache.load_tokens(key)) return *hit;
  store_key = key;
  return perplexity_stream(tok, read_utf8_text_file(text), bos);
}

// Stage "shared": the model (the checkpoint stays mapped: layers are widened one at a time while
// computed, model.hpp), the tokenizer, the token streams of every text (in parallel) and the
// calibration windows.
void load_shared(const Experiment& exp, const RunOptions& options,
                 const std::vector<std::shared_ptr<Evaluator>>& evaluators, const ArtifactCache& cache,
                 RunMonitor& monitor, SharedArtifacts& shared) {
  monitor.stage("shared", "loading model");
  shared.model = open_model(exp.model_dir);
  const auto tokenizer_path = exp.model_dir / "tokenizer.model";
  shared.calibration_seq_len =
      exp.calibration.seq_len > 0 ? exp.calibration.seq_len : shared.model.config.max_position_embeddings;
  shared.tokenizer = std::make_unique<Tokenizer>(tokenizer_path);
  std::vector<std::filesystem::path> texts = {exp.calibration.text};
  for (std::size_t e = 0; e < exp.evaluators.size(); ++e)
    if (evaluators[e]->needs_token_stream())
      for (const auto& d : exp.evaluators[e].datasets) texts.push_back(d.file);
  std::sort(texts.begin(), texts.end());
  texts.erase(std::unique(texts.begin(), texts.end()), texts.end());
  std::vector<std::vector<int>> streams(texts.size());
  std::vector<std::string> store_keys(texts.size());
  monitor.stage("shared", fmt::format("tokenizing {} text files", texts.size()));
  const auto t0 = Clock::now();
  tbb::task_arena arena(options.jobs);
  arena.execute([&] {
    tbb::parallel_for(std::size_t{0}, texts.size(), [&](std::size_t i) {
      streams[i] = tokenize_file(texts[i], *shared.tokenizer, shared.model.config.bos_token_id, tokenizer_path, cache,
                                 store_keys[i]);
    });
  });
  for (std::size_t i = 0; i < texts.size(); ++i) shared.streams[texts[i]] = std::move(streams[i]);
  monitor.step("shared", fmt::format("tokenized {} text files in {:.2f}s", texts.size(), seconds_since(t0)));
  try {
    shared.calibration = draw_calibration_windows(shared.streams.at(exp.calibration.text), exp.calibration.nsamples,
                                                  shared.calibration_seq_len, exp.calibration.seed);
  } catch (const Error& e) {
    throw Error(fmt::format("{}: {}", exp.calibration.text.string(), e.what()));
  }
  for (const auto& w : shared.calibration)
    shared.calibration_tokens.insert(shared.calibration_tokens.end(), w.begin(), w.end());
  for (std::size_t i = 0; i < texts.size(); ++i)
    if (!store_keys[i].empty()) cache.store_tokens(store_keys[i], shared.streams.at(texts[i]));
}

// Stage "memory": the memory model, before any model compute; refused (exit 2) over the limit.
double check_memory(const Experiment& exp, const RunOptions& options, const std::vector<const ArmSpec*>& todo,
                  const std::vector<ArmComponents>& components, bool need_stats, const SharedArtifacts& shared,
                  RunMonitor& monitor) {
  const int calib_len = shared.calibration_seq_len;
  MemoryEstimate estimate;
  estimate.jobs = std::min<int>(options.jobs, static_cast<int>(todo.size()));
  std::size_t tokens = 0;
  for (const auto& [file, stream] : shared.streams) tokens += stream.size();
  estimate.shared.push_back({"token streams", static_cast<double>(tokens) * sizeof(int)});
  estimate.shared.push_back({"model held in memory", static_cast<double>(shared.model.resident_bytes())});
  if (need_stats) {
    const auto& c = shared.model.config;
    estimate.shared.push_back(
        {"FP input statistics", 2.0 * c.num_layers * (3.0 * c.hidden_size + c.intermediate_size) * sizeof(float)});
    estimate.shared.push_back({"FP statistics pass stream", static_cast<double>(exp.calibration.nsamples) * calib_len *
                                                             c.hidden_size * sizeof(float)});
  }
  for (std::size_t i = 0; i < todo.size(); ++i)
    estimate.arms.push_back(arm_memory(*todo[i], components[i], shared.model, exp, exp.calibration.nsamples, calib_len,
                                       options, shared.streams));
  const double limit = options.memory_limit > 0 ? options.memory_limit : available_memory_bytes();
  if (options.print_memory) {
    monitor.step("memory", estimate.describe());
    monitor.step("memory", fmt::format("available: {}{}", format_bytes(limit),
                                       options.memory_limit > 0 ? " (--memory-limit)" : ""));
  }
  if (limit > 0 && estimate.total_bytes() > limit)
    throw Error(fmt::format(
        "{}: predicted peak memory {} exceeds the {} available{}; lower --jobs (now {}) or calibration.nsamples (now "
        "{}), hold the calibration streams in 16 bits (calibration.stream_dtype: bf16, now {}), keep quantized "
        "layers on disk (--layer-store f16), or set --memory-limit",
        exp.file.string(), format_bytes(estimate.total_bytes()), format_bytes(limit),
        options.memory_limit > 0 ? " (--memory-limit)" : "", options.jobs, exp.calibration.nsamples,
        stream_dtype_name(exp.calibration.stream_dtype)));
  return estimate.total_bytes();
}

// Stage "statistics": the FP input statistics (from the cache, or one FP pass).
void input_statistics(const RunOptions& options, const ArtifactCache& cache, const RunKeys& keys, RunMonitor& monitor,
                      SharedArtifacts& shared) {
  const auto t0 = Clock::now();
  std::string key;
  if (cache.enabled()) {
    key = keys.input_stats(shared.calibration);
    if (auto hit = cache.load_stats(key)) shared.input_stats = std::move(*hit);
  }
  if (shared.input_stats.empty()) {
    monitor.stage("shared", "FP calibration pass (input statistics)");
    tbb::task_arena arena(options.jobs);
    arena.execute([&] { shared.input_stats = collect_input_stats(shared.model, shared.calibration); });
    cache.store_stats(key, shared.input_stats);
  }
  monitor.step("shared", fmt::format("FP input statistics ready in {:.2f}s", seconds_since(t0)));
}

// Stage "allocation": the tables of allocated arms, once per content key, before any arm: every
// budget and allocator of a sweep shares one measurement (docs/allocation.md). Throws Stopped on
// SIGTERM; a table that cannot be measured fails its arms.
void allocation_tables(const Experiment& exp, const RunOptions& options, const std::vector<const ArmSpec*>& todo,
                       std::vector<ArmComponents>& components, const ArtifactCache& cache, const RunKeys& keys,
                       RunMonitor& monitor, SharedArtifacts& shared) {
  for (std::size_t i = 0; i < todo.size(); ++i) {
    const ArmSpec& arm = *todo[i];
    if (!arm.allocation || !components[i].error.empty()) continue;
    const std::string key = keys.allocation_table(*arm.allocation);
    if (shared.allocation_tables.count(key) != 0) continue;
    const auto t0 = Clock::now();
    MeasureOptions mo;
    mo.input_stats = &shared.input_stats;
    mo.seed = exp.seed;
    mo.status = [&](const std::string& what) { monitor.stage("shared", what); };
    bool loaded = false;
    try {
      tbb::task_arena arena(options.jobs);
      arena.execute([&] {
        shared.allocation_tables[key] = cached_allocation_table(cache, key, shared.model, shared.calibration,
                                                                *arm.allocation, components[i].candidates, mo, &loaded);
      });
    } catch (const Error& e) {
      components[i].error = fmt::format("allocation table: {}", e.what());
      continue;
    }
    const auto& t = shared.allocation_tables[key];
    monitor.step("shared", fmt::format("allocation table {} linears x {} candidates {} in {:.2f}s", t.units.size(),
                                       t.candidates.size(), loaded ? "loaded from the cache" : "measured",
                                       seconds_since(t0)));
  }
}

// What every result file records about the build and the host.
Provenance provenance_of(const Experiment& exp) {
  Provenance p;
  p.ptqlab_version = version();
  p.git_revision = git_revision();
  p.library_versions = library_versions();
  p.library_versions["hdf5"] = hdf5_version();
  p.host = host_name();
  p.seeds = {{"experiment", static_cast<std::int64_t>(exp.seed)},
             {"calibration", static_cast<std::int64_t>(exp.calibration.seed)}};
  return p;
}

// SIGTERM before any arm started: every arm to do is reported stopped, "not started".
RunReport stopped_before_arms(RunReport report, const std::vector<const ArmSpec*>& todo, const RunOptions& options,
                              RunMonitor& monitor, Clock::time_point run_start) {
  monitor.finish();
  for (const ArmSpec* arm : todo)
    report.arms.push_back({arm->name, ArmOutcome::Status::stopped, "not started", options.out_dir / (arm->name + ".h5"), {}});
  report.seconds = seconds_since(run_start);
  return report;
}

}  // namespace

RunReport run_experiment(const Experiment& exp, const PluginRegistry& registry, const RunOptions& options) {
  const auto run_start = Clock::now();
  if (options.jobs < 1) throw Error(fmt::format("--jobs must be at least 1, got {}", options.jobs));
  if (options.layer_store != "memory") (void)layer_store_dtype(options.layer_store);
  if (!options.export_dir.empty()) (void)export_dtype(options.export_dtype);

  RunReport report;
  const std::vector<const ArmSpec*> todo = select_arms(exp, options, report);
  RunMonitor monitor(static_cast<int>(todo.size()));
  if (todo.empty()) {
    report.seconds = seconds_since(run_start);
    return report;
  }
  MemoryWatch memory_watch([&monitor] { return monitor.doing(); }, options.memory_trace);
  monitor.on_change([&memory_watch] { memory_watch.sample(); });

  bool need_stats = false;
  std::vector<ArmComponents> components = make_components(registry, todo, need_stats);
  const auto evaluators = make_evaluators(exp, registry);

  const ArtifactCache cache = options.cache_dir.empty() ? ArtifactCache() : ArtifactCache(options.cache_dir);
  SharedArtifacts shared;
  load_shared(exp, options, evaluators, cache, monitor, shared);
  report.predicted_peak_bytes = check_memory(exp, options, todo, components, need_stats, shared, monitor);
  const RunKeys keys(exp.model_dir, shared.calibration_tokens, exp.seed);
  if (need_stats) input_statistics(options, cache, keys, monitor, shared);
  monitor.stage_done("shared");
  if (stop_requested()) return stopped_before_arms(std::move(report), todo, options, monitor, run_start);
  try {
    allocation_tables(exp, options, todo, components, cache, keys, monitor, shared);
  } catch (const Stopped&) {  // SIGTERM while measuring: no arm has started
    return stopped_before_arms(std::move(report), todo, options, monitor, run_start);
  }
  monitor.stage_done("shared");

  // Stage "arms", in parallel; each arm's result goes to the single writer thread. The result
  // directory is made only now, so a bad input found above leaves nothing behind.
  std::error_code out_error;
  std::filesystem::create_directories(options.out_dir, out_error);
  if (out_error)
    throw Error(fmt::format("{}: cannot create the result directory (--out): {}", options.out_dir.string(),
                            out_error.message()));
  ResultWriter writer;
  const Provenance provenance = provenance_of(exp);
  const RunContext run{exp, options, shared, keys, evaluators, cache, provenance, monitor, writer};
  std::vector<ArmOutcome> outcomes(todo.size());
  tbb::task_arena arena(options.jobs);
  arena.execute([&] {
    tbb::parallel_for(tbb::blocked_range<std::size_t>(0, todo.size(), 1),
                      [&](const tbb::blocked_range<std::size_t>& range) {
                        for (std::size_t i = range.begin(); i < range.end(); ++i)
                          outcomes[i] = run_arm(run, *todo[i], components[i]);
                      },
                      tbb::simple_partitioner());
  });
  monitor.on_change({});
  memory_watch.stop();
  const MemoryWatch::Peak peak = memory_watch.peak();
  report.measured_peak_bytes = peak.bytes;
  if (options.print_memory && peak.bytes > 0)
    monitor.step("memory", fmt::format("measured peak RssAnon {} at {} (predicted {}, {:+.0f}%) during: {}",
                                       format_bytes(peak.bytes), format_duration(peak.seconds),
                                       format_bytes(report.predicted_peak_bytes),
                                       100.0 * (report.predicted_peak_bytes / peak.bytes - 1.0), peak.doing));
  monitor.finish();

  // Stage "report": in the experiment's arm order.
  for (auto& o : outcomes) report.arms.push_back(std::move(o));
  std::map<std::string, std::size_t> order;
  for (std::size_t i = 0; i < exp.arms.size(); ++i) order[exp.arms[i].name] = i;
  std::stable_sort(report.arms.begin(), report.arms.end(),
                   [&](const ArmOutcome& a, const ArmOutcome& b) { return order[a.arm] < order[b.arm]; });
  report.seconds = seconds_since(run_start);
  return report;
}

std::string format_results_table(const RunReport& report) {
  // Columns: every (evaluator, dataset) that has a "ppl" (or else its first metric).
  std::vector<std::pair<std::string, std::string>> columns;
  std::set<std::pair<std::string, std::string>> seen;
  for (const auto& a : report.arms)
    for (const auto& [ev, datasets] : a.result.metrics)
      for (const auto& [ds, metrics] : datasets)
        if (seen.insert({ev, ds}).second) columns.push_back({ev, ds});

  auto metric_of = [](const std::map<std::string, double>& m) {
    auto it = m.find("ppl");
    return it != m.end() ? it->second : (m.empty() ? std::nan("") : m.begin()->second);
  };
  std::vector<std::vector<std::string>> rows;
  std::vector<std::string> header = {"arm", "status", "bits (paper)", "bits (all-in)"};
  // Arms chosen by a bit budget show their all-in target beside the achieved bits.
  bool any_budget = false;
  for (const auto& a : report.arms) any_budget = any_budget || budget_target_bits(a.result.config_yaml).has_value();
  if (any_budget) header.push_back("target");
  for (const auto& [ev, ds] : columns) header.push_back(ev == "perplexity" ? ds + " ppl" : ev + "/" + ds);
  header.push_back("time");
  rows.push_back(header);
  for (const auto& a : report.arms) {
    const auto& r = a.result;
    const char* status = a.status == ArmOutcome::Status::completed ? "done"
                         : a.status == ArmOutcome::Status::skipped ? "cached"
                         : a.status == ArmOutcome::Status::stopped ? "stopped"
                                                                   : "FAILED";
    std::vector<std::string> row = {a.arm, status, fmt::format("{:.3f}", r.total_bits.paper_per_weight()),
                                    fmt::format("{:.3f}", r.total_bits.all_in_per_weight())};
    if (any_budget) {
      const auto target = budget_target_bits(r.config_yaml);
      row.push_back(target ? fmt::format("{:.3f}", *target) : "-");
    }
    for (const auto& [ev, ds] : columns) {
      auto e = r.metrics.find(ev);
      if (e == r.metrics.end() || e->second.find(ds) == e->second.end()) {
        row.push_back("-");
        continue;
      }
      const double v = metric_of(e->second.at(ds));
      row.push_back(std::isfinite(v) ? fmt::format("{:.4f}", v) : "NaN");
    }
    row.push_back(format_duration(r.seconds));
    rows.push_back(row);
  }
  std::vector<std::size_t> width(header.size(), 0);
  for (const auto& row : rows)
    for (std::size_t i = 0; i < row.size(); ++i) width[i] = std::max(width[i], row[i].size());
  std::string out;
  for (std::size_t r = 0; r < rows.size(); ++r) {
    for (std::size_t i = 0; i < rows[r].size(); ++i)
      out += i == 0 ? fmt::format("{:<{}}", rows[r][i], width[i]) : fmt::format("  {:>{}}", rows[r][i], width[i]);
    out += "\n";
    if (r == 0) {
      std::size_t total = 0;
      for (auto w : width) total += w + 2;
      out += std::string(total - 2, '-') + "\n";
    }
  }
  return out;
}

}  // namespace ptqlab
