#include "ptqlab/runner.hpp"

#include <fnmatch.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <map>
#include <mutex>
#include <set>
#include <variant>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>
#include <tbb/parallel_for.h>
#include <tbb/task_arena.h>

#include "ptqlab/allocation_stage.hpp"
#include "ptqlab/artifact_cache.hpp"
#include "ptqlab/build_info.hpp"
#include "ptqlab/calibration.hpp"
#include "ptqlab/error.hpp"
#include "ptqlab/export.hpp"
#include "ptqlab/fault.hpp"
#include "ptqlab/forward.hpp"
#include "ptqlab/layer_checkpoint.hpp"
#include "ptqlab/memory_model.hpp"
#include "ptqlab/perplexity.hpp"
#include "ptqlab/plugin.hpp"
#include "ptqlab/progress.hpp"
#include "ptqlab/report.hpp"
#include "ptqlab/stop.hpp"
#include "ptqlab/text_file.hpp"
#include "ptqlab/tokenizer.hpp"
#include "ptqlab/utf8.hpp"

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

namespace {

using Clock = std::chrono::steady_clock;

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

std::string host_name() {
  char buf[256] = {0};
  return ::gethostname(buf, sizeof buf - 1) == 0 ? std::string(buf) : std::string("unknown");
}

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// Progress of a run: on a terminal a status line (arms done, ETA, what each running arm does)
// redrawn in place with finished steps printed above it; otherwise one line per finished step.
class RunMonitor {
 public:
  RunMonitor(int total) : total_(total), start_(Clock::now()), interactive_(::isatty(STDOUT_FILENO) == 1) {}

  void stage(const std::string& arm, std::string what) {
    std::lock_guard lock(mutex_);
    if (!interactive_) {
      // A log file (Slurm, nohup) gets the current stage of an arm at most every 30 s, so that a
      // long arm (a 7B model's layers) shows how far it is without flooding short runs.
      const auto now = Clock::now();
      const auto [it, first] = last_line_.try_emplace(arm, now);
      if (!first && now - it->second >= std::chrono::seconds(30)) {
        it->second = now;
        std::printf("[%s] %s (%s elapsed)\n", arm.c_str(), what.c_str(), format_duration(seconds_since(start_)).c_str());
        std::fflush(stdout);
      }
    }
    stages_[arm] = std::move(what);
    redraw();
  }
  void step(const std::string& arm, const std::string& line) {
    std::lock_guard lock(mutex_);
    clear();
    std::printf("[%s] %s\n", arm.c_str(), line.c_str());
    redraw();
    std::fflush(stdout);
  }
  void stage_done(const std::string& what) {
    std::lock_guard lock(mutex_);
    stages_.erase(what);
    redraw();
  }
  void arm_finished(const std::string& arm) {
    std::lock_guard lock(mutex_);
    stages_.erase(arm);
    ++done_;
    redraw();
  }
  void finish() {
    std::lock_guard lock(mutex_);
    clear();
    std::fflush(stdout);
  }

 private:
  void clear() {
    if (interactive_ && drawn_) std::printf("\r\033[K");
    drawn_ = false;
  }
  void redraw() {
    if (!interactive_) return;
    const double elapsed = seconds_since(start_);
    const std::string eta = done_ > 0 ? format_duration(elapsed / done_ * (total_ - done_)) : std::string("?");
    std::string line = fmt::format("[{}/{} arms, {} elapsed, ETA {}]", done_, total_, format_duration(elapsed), eta);
    for (const auto& [arm, what] : stages_) line += fmt::format("  {}: {}", arm, what);
    if (line.size() > 200) line = line.substr(0, 197) + "...";
    std::printf("\r\033[K%s", line.c_str());
    std::fflush(stdout);
    drawn_ = true;
  }

  int total_;
  int done_ = 0;
  Clock::time_point start_;
  bool interactive_;
  bool drawn_ = false;
  std::mutex mutex_;
  std::map<std::string, std::string> stages_;
  std::map<std::string, Clock::time_point> last_line_;  // non-interactive: when an arm's stage was last printed
};

// Collects logged tensors and series into the arm's result.
class ArmLog : public TensorLog {
 public:
  ArmLog(bool tensors_enabled, ArmResult& result) : enabled_(tensors_enabled), result_(result) {}
  bool enabled() const override { return enabled_; }
  void tensor(const std::string& path, const Matrix& value) override {
    if (!enabled_) return;
    std::lock_guard lock(mutex_);
    LoggedTensor t;
    t.path = path;
    t.shape = {value.rows(), value.cols()};
    t.data.assign(value.data(), value.data() + value.size());
    result_.tensors.push_back(std::move(t));
  }
  void series(const std::string& path, std::vector<double> values) override {
    std::lock_guard lock(mutex_);
    result_.series.push_back({path, std::move(values)});
  }

 private:
  bool enabled_;
  ArmResult& result_;
  std::mutex mutex_;
};

// The arm's log under a path prefix: a preprocessor's stage-1 quantization logs the same series
// names (layer0/loss, ...) as the final quantization.
class PrefixedLog : public TensorLog {
 public:
  PrefixedLog(TensorLog& inner, std::string prefix) : inner_(inner), prefix_(std::move(prefix)) {}
  bool enabled() const override { return inner_.enabled(); }
  void tensor(const std::string& path, const Matrix& value) override { inner_.tensor(prefix_ + path, value); }
  void series(const std::string& path, std::vector<double> values) override {
    inner_.series(prefix_ + path, std::move(values));
  }

 private:
  TensorLog& inner_;
  std::string prefix_;
};

struct ArmComponents {
  std::vector<std::shared_ptr<Preprocessor>> preprocessors;
  std::shared_ptr<Mask> mask;
  std::shared_ptr<Quantizer> quantizer;
  std::shared_ptr<Allocator> allocator;            // allocated arms (docs/allocation.md)
  std::vector<CandidateComponents> candidates;     // allocated arms: the candidates' quantizers and masks
};

// What every arm reads and nobody writes: computed once before the arms start.
struct SharedArtifacts {
  LlamaModel model;
  std::unique_ptr<Tokenizer> tokenizer;
  std::vector<std::vector<int>> calibration;
  std::map<std::filesystem::path, std::vector<int>> streams;  // dataset file -> BOS + ids
  ModelInputStats input_stats;                                // empty unless a component needs it
  std::map<std::string, AllocationTable> allocation_tables;   // content key -> table (allocated arms)
};

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

// What an arm's quantization before preprocessing step `step` depends on, besides the model and
// calibration windows (`base`): the mask, the quantizer and the earlier preprocessing steps.
std::string quantize_key(const ArmSpec& arm, std::size_t step, const std::string& base) {
  auto component = [](const ComponentRef& c) {
    std::string text = c.name;
    for (const auto& [name, value] : c.params.values()) text += "|" + name + "=" + param_value_text(value);
    return text;
  };
  std::string material = base + "|quantizer:" + component(arm.quantizer);
  if (arm.mask) material += "|mask:" + component(*arm.mask);
  for (std::size_t i = 0; i < step; ++i) material += "|preprocess:" + component(arm.preprocessors[i]);
  return sha256_hex(material);
}

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

}  // namespace

RunReport run_experiment(const Experiment& exp, const PluginRegistry& registry, const RunOptions& options) {
  const auto run_start = Clock::now();
  if (options.jobs < 1) throw Error(fmt::format("--jobs must be at least 1, got {}", options.jobs));
  if (options.layer_store != "memory") (void)layer_store_dtype(options.layer_store);
  if (!options.export_dir.empty()) (void)export_dtype(options.export_dtype);

  // 1. Which arms, and which of them are already done.
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

  RunReport report;
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

  RunMonitor monitor(static_cast<int>(todo.size()));
  if (todo.empty()) {
    report.seconds = seconds_since(run_start);
    return report;
  }

  // 2. Components (validated already; a factory may still refuse) and shared artifacts.
  std::vector<ArmComponents> components(todo.size());
  std::vector<std::string> component_errors(todo.size());
  bool need_stats = false;
  for (std::size_t i = 0; i < todo.size(); ++i) {
    const ArmSpec& arm = *todo[i];
    auto& c = components[i];
    // A factory may refuse a combination of valid parameters: that arm fails, the others run.
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
      component_errors[i] = e.what();
      c = ArmComponents{};
    }
  }
  std::vector<std::shared_ptr<Evaluator>> evaluators;
  for (const auto& e : exp.evaluators) evaluators.push_back(registry.make_evaluator(e.evaluator.name, e.evaluator.params));

  // Every evaluator checks its datasets against the model before anything is computed.
  {
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
  }

  const ArtifactCache cache = options.cache_dir.empty() ? ArtifactCache() : ArtifactCache(options.cache_dir);
  SharedArtifacts shared;
  monitor.stage("shared", "loading model");
  // The checkpoint stays mapped: layers are widened one at a time while computed (model.hpp).
  shared.model = open_model(exp.model_dir);
  const auto tokenizer_path = exp.model_dir / "tokenizer.model";
  const int calib_len = exp.calibration.seq_len > 0 ? exp.calibration.seq_len : shared.model.config.max_position_embeddings;
  shared.tokenizer = std::make_unique<Tokenizer>(tokenizer_path);
  {
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
                                                    calib_len, exp.calibration.seed);
    } catch (const Error& e) {
      throw Error(fmt::format("{}: {}", exp.calibration.text.string(), e.what()));
    }
    for (std::size_t i = 0; i < texts.size(); ++i)
      if (!store_keys[i].empty()) cache.store_tokens(store_keys[i], shared.streams.at(texts[i]));
  }
  {
    // The memory model, before any model compute.
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
  }
  if (need_stats) {
    const auto t0 = Clock::now();
    std::string key;
    if (cache.enabled()) {
      std::string material = model_key(exp.model_dir);
      for (const auto& w : shared.calibration) material += sha256_hex(std::string(reinterpret_cast<const char*>(w.data()), w.size() * sizeof(int)));
      key = "input-stats/v1/" + sha256_hex(material);
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
  monitor.stage_done("shared");
  if (stop_requested()) {  // SIGTERM during the shared work: no arm has started
    monitor.finish();
    for (const ArmSpec* arm : todo)
      report.arms.push_back({arm->name, ArmOutcome::Status::stopped, "not started", options.out_dir / (arm->name + ".h5"), {}});
    report.seconds = seconds_since(run_start);
    return report;
  }
  const std::string reference_key = model_key(exp.model_dir);
  std::vector<std::int32_t> calibration_tokens;
  for (const auto& w : shared.calibration) calibration_tokens.insert(calibration_tokens.end(), w.begin(), w.end());
  const std::string calibration_digest = sha256_hex(std::string(
      reinterpret_cast<const char*>(calibration_tokens.data()), calibration_tokens.size() * sizeof(std::int32_t)));
  // Model and calibration windows, then the experiment seed: what every arm's stage 1 shares.
  std::string stage1_material;
  if (cache.enabled()) {
    stage1_material = model_key(exp.model_dir) + "|calibration:" +
                      sha256_hex(std::string(reinterpret_cast<const char*>(calibration_tokens.data()),
                                             calibration_tokens.size() * sizeof(std::int32_t))) +
                      fmt::format("|seed:{}", exp.seed);
  }

  // Allocation tables, once per content key, before any arm: every budget and allocator of a sweep
  // shares one measurement (docs/allocation.md).
  for (std::size_t i = 0; i < todo.size(); ++i) {
    const ArmSpec& arm = *todo[i];
    if (!arm.allocation || !component_errors[i].empty()) continue;
    const std::string key = allocation_table_key(
        model_key(exp.model_dir) + "|calibration:" +
            sha256_hex(std::string(reinterpret_cast<const char*>(calibration_tokens.data()),
                                   calibration_tokens.size() * sizeof(std::int32_t))) +
            fmt::format("|seed:{}", exp.seed),
        *arm.allocation);
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
    } catch (const Stopped&) {  // SIGTERM while measuring: no arm has started
      monitor.finish();
      for (const ArmSpec* a : todo)
        report.arms.push_back({a->name, ArmOutcome::Status::stopped, "not started", options.out_dir / (a->name + ".h5"), {}});
      report.seconds = seconds_since(run_start);
      return report;
    } catch (const Error& e) {
      component_errors[i] = fmt::format("allocation table: {}", e.what());
      continue;
    }
    const auto& t = shared.allocation_tables[key];
    monitor.step("shared", fmt::format("allocation table {} linears x {} candidates {} in {:.2f}s", t.units.size(),
                                       t.candidates.size(),
                                       loaded ? "loaded from the cache" : "measured", seconds_since(t0)));
  }
  monitor.stage_done("shared");

  // 3. The arms, in parallel. Each arm's result goes to the single writer thread. The result
  // directory is made only now, so a bad input found above leaves nothing behind.
  std::filesystem::create_directories(options.out_dir, out_error);
  if (out_error)
    throw Error(fmt::format("{}: cannot create the result directory (--out): {}", options.out_dir.string(),
                            out_error.message()));
  ResultWriter writer;
  std::vector<ArmOutcome> outcomes(todo.size());
  auto provenance_base = [&] {
    Provenance p;
    p.ptqlab_version = version();
    p.git_revision = git_revision();
    p.library_versions = library_versions();
    p.library_versions["hdf5"] = hdf5_version();
    p.host = host_name();
    p.seeds = {{"experiment", static_cast<std::int64_t>(exp.seed)},
               {"calibration", static_cast<std::int64_t>(exp.calibration.seed)}};
    return p;
  }();

  auto run_arm = [&](std::size_t i) {
    const ArmSpec& arm = *todo[i];
    const auto& comp = components[i];
    const auto t0 = Clock::now();
    ArmOutcome& out = outcomes[i];
    out.arm = arm.name;
    out.file = options.out_dir / (arm.name + ".h5");
    if (stop_requested()) {  // SIGTERM before this arm started
      out.status = ArmOutcome::Status::stopped;
      out.message = "not started";
      return;
    }
    // What the arm is doing, for the message when SIGTERM stops it.
    std::string doing = "starting";
    // `detail` (an ETA) is shown with the stage but left out of the SIGTERM message.
    auto stage = [&](std::string what, const std::string& detail = "") {
      doing = what;
      monitor.stage(arm.name, detail.empty() ? std::move(what) : what + ", " + detail);
    };
    ArmResult& r = out.result;
    r.arm = arm.name;
    r.experiment = exp.name;
    r.config_yaml = arm.resolved_yaml;
    r.config_hash = arm.config_hash;
    r.provenance = provenance_base;
    r.provenance.start_time = utc_now();
    r.calibration_tokens = calibration_tokens;
    r.calibration_nsamples = static_cast<int>(shared.calibration.size());
    r.calibration_seq_len = calib_len;
    ArmLog log(exp.log_tensors, r);
    try {
      if (!component_errors[i].empty()) throw Error(component_errors[i]);
      // Each arm's model shares the mapped base and owns only the layers it quantizes.
      LlamaModel model = shared.model;
      // Preprocessors change the whole model (restorative LoRA trains every layer): resident float32.
      if (!comp.preprocessors.empty()) model.make_resident();
      const ModelInputStats* stats = &shared.input_stats;
      ModelInputStats preprocessed_stats;
      // An allocated arm solves its table first; the plan gives every linear its candidate.
      std::optional<AllocationOutcome> allocation;
      if (arm.allocation) {
        stage(fmt::format("allocation ({})", arm.allocation->allocator.name));
        const std::string key = allocation_table_key(
            model_key(exp.model_dir) + "|calibration:" +
                sha256_hex(std::string(reinterpret_cast<const char*>(calibration_tokens.data()),
                                       calibration_tokens.size() * sizeof(std::int32_t))) +
                fmt::format("|seed:{}", exp.seed),
            *arm.allocation);
        const auto table = aggregate_allocation_table(shared.allocation_tables.at(key),
                                                      allocation_units(shared.model.config, arm.allocation->unit));
        allocation = solve_allocation(table, *arm.allocation, *comp.allocator, comp.candidates);
        const auto& rec = allocation->record;
        monitor.step(arm.name, fmt::format("allocation {}: {} bits of {} ({:.4f} per weight), table loss {:.6g}, {} in "
                                           "{:.3f}s",
                                           rec.allocator, rec.solver_bits, rec.budget_bits,
                                           static_cast<double>(rec.solver_bits) / static_cast<double>(rec.weights),
                                           rec.solver_loss, rec.status, rec.solve_seconds));
      }
      // The final quantization keeps a layer-level checkpoint (docs/slurm.md): after each decoder
      // layer, the quantized layer as its own file (in the --layer-store dtype, F32 for "memory";
      // the files are also the spilled layers) and the state to go on from.
      const bool memory_store = options.layer_store == "memory";
      const LayerCheckpoint checkpoint(layer_store_dir(options.out_dir, arm.name),
                                       sha256_hex(arm.config_hash + "|" + options.layer_store + "|" +
                                                  exp.model_dir.string() + "|" + calibration_digest));
      LayerStreams resumed_streams;
      bool checkpointing = true;
      auto quantize = [&](LlamaModel& m, TensorLog* tensor_log, bool final_stage = false) {
        LayerwiseOptions lo;
        LayerwiseResume resume;
        if (final_stage && comp.preprocessors.empty()) {
          const DType dtype = memory_store ? DType::F32 : layer_store_dtype(options.layer_store);
          if (!memory_store) std::filesystem::create_directories(checkpoint.dir());
          // With the memory store the files are only a checkpoint: when they cannot be written (disk
          // full, a file-size limit) the arm goes on without one and says so once.
          lo.keep_layer = [&, dtype](LlamaModel& mm, int l, DecoderLayer layer) {
            if (!memory_store) {
              mm.set_stored_layer(l, write_layer_file(checkpoint.layer_file(l), mm.config, l, layer, dtype));
              return;
            }
            if (checkpointing) {
              try {
                std::filesystem::create_directories(checkpoint.dir());
                (void)write_layer_file(checkpoint.layer_file(l), mm.config, l, layer, dtype);
              } catch (const std::exception& e) {
                checkpointing = false;
                checkpoint.remove();  // give the space back to the result file
                monitor.step(arm.name, fmt::format("no layer checkpoints from layer {} on: {}", l, e.what()));
              }
            }
            mm.set_layer(l, std::move(layer));
          };
          resume.after_layer = [&](int l, const std::vector<LinearRecord>& records, const LayerStreams& streams) {
            if (!checkpointing) return;
            try {
              checkpoint.save(l + 1, records, streams, r.series, r.tensors);
            } catch (const std::exception& e) {
              if (!memory_store) throw;
              checkpointing = false;
              checkpoint.remove();
              monitor.step(arm.name, fmt::format("no layer checkpoints from layer {} on: {}", l, e.what()));
            }
            fault_point("layer-checkpoint");
          };
          if (auto state = checkpoint.load()) {
            for (int l = 0; l < state->next_layer; ++l) {
              m.set_stored_layer(l, open_layer_file(checkpoint.layer_file(l), m.config, l));
              if (memory_store) m.set_layer(l, m.layer_copy(l));
            }
            r.series = std::move(state->series);
            r.tensors = std::move(state->tensors);
            // Saved widened; held again in the stream dtype (exact: the values came from it).
            resumed_streams.quant = ActivationBatches(exp.calibration.stream_dtype);
            resumed_streams.fp = ActivationBatches(exp.calibration.stream_dtype);
            for (auto& x : state->quant) resumed_streams.quant.push_back(std::move(x));
            for (auto& x : state->fp) resumed_streams.fp.push_back(std::move(x));
            resumed_streams.shapes = std::move(state->shapes);
            resume.start_layer = state->next_layer;
            resume.records = std::move(state->records);
            resume.streams = &resumed_streams;
            const int n = m.config.num_layers;
            monitor.step(arm.name, state->next_layer < n
                                       ? fmt::format("resuming at layer {}/{} from the layer checkpoint in {}",
                                                     state->next_layer + 1, n, checkpoint.dir().string())
                                       : fmt::format("resuming after all {} layers from the layer checkpoint in {}", n,
                                                     checkpoint.dir().string()));
          }
        }
        lo.quantizer = comp.quantizer.get();
        lo.mask = comp.mask.get();
        if (allocation) lo.plan = allocation->plan;
        lo.input_stats = stats;
        lo.log = tensor_log;
        lo.seed = exp.seed;
        lo.stream_dtype = exp.calibration.stream_dtype;
        const auto quantize_start = Clock::now();
        const int first_layer = resume.start_layer;
        lo.on_layer = [&, quantize_start, first_layer](int l, int n) {
          throw_if_stop_requested();  // between layers: a safe point
          const int done = l - first_layer;
          const std::string eta =
              done > 0 ? format_duration(seconds_since(quantize_start) / done * (n - l)) : std::string("?");
          stage(fmt::format("quantize layer {}/{}", l + 1, n), "ETA " + eta);
        };
        return quantize_layerwise_resumable(m, shared.calibration, lo, resume);
      };
      // Runs every evaluator on `m`; metrics go under "<prefix><evaluator>".
      auto evaluate = [&](const LlamaModel& m, const std::string& prefix) {
        for (std::size_t e = 0; e < exp.evaluators.size(); ++e) {
          const auto& spec = exp.evaluators[e];
          for (const auto& d : spec.datasets) {
            throw_if_stop_requested();  // between datasets (perplexity also checks between batches)
            stage(fmt::format("{}{} {}", prefix, spec.evaluator.name, d.name));
            EvalContext ec;
            ec.dataset = d.name;
            ec.file = d.file;
            static const std::vector<int> no_stream;
            const auto found = shared.streams.find(d.file);
            const auto* stream = found != shared.streams.end() ? &found->second : &no_stream;
            ec.tokens = [stream]() -> const std::vector<int>& { return *stream; };
            ec.reference = &shared.model;
            ec.tokenizer = shared.tokenizer.get();
            ec.log = &log;
            ec.log_prefix = "eval/" + prefix + spec.evaluator.name + "/" + d.name + "/";
            ec.cache_dir = cache.enabled() ? cache.dir() : std::filesystem::path();
            ec.reference_key = reference_key;
            std::string protocol;
            ec.protocol = &protocol;
            ec.note = [&](const std::string& what) { monitor.step(arm.name, what); };
            const auto te = Clock::now();
            std::map<std::string, double> metrics;
            try {
              metrics = evaluators[e]->evaluate(ec, m);
            } catch (const Error& err) {  // name the dataset and its file: the message may not
              throw Error(fmt::format("{}{} on dataset '{}' ({}): {}", prefix, spec.evaluator.name, d.name,
                                      d.file.string(), err.what()));
            }
            std::string shown;
            for (const auto& [k, v] : metrics)
              if (k == "ppl") shown = fmt::format("ppl {:.4f}", v);
            monitor.step(arm.name, fmt::format("{}{} {}: {} ({:.2f}s)", prefix, spec.evaluator.name, d.name,
                                               shown.empty() ? std::string("done") : shown, seconds_since(te)));
            r.metrics[prefix + spec.evaluator.name][d.name] = std::move(metrics);
            if (!protocol.empty()) r.protocols[prefix + spec.evaluator.name][d.name] = protocol;
          }
        }
      };
      for (std::size_t p = 0; p < comp.preprocessors.size(); ++p) {
        throw_if_stop_requested();
        stage(fmt::format("preprocess {}", arm.preprocessors[p].name));
        PreprocessContext pc;
        pc.tokenizer = shared.tokenizer.get();
        pc.quantize = [&, p](LlamaModel& m) {
          PrefixedLog stage1(log, fmt::format("preprocess/{}/stage1/", arm.preprocessors[p].name));
          quantize(m, &stage1);
        };
        pc.calibration = &shared.calibration;
        pc.calibration_stream = &shared.streams.at(exp.calibration.text);
        pc.seed = exp.seed;
        pc.log = &log;
        pc.status = [&](const std::string& what) {
          throw_if_stop_requested();  // a long preprocessing step (training) stops cleanly on SIGTERM too
          stage(what);
        };
        pc.note = [&](const std::string& line) { monitor.step(arm.name, line); };
        pc.cache_dir = options.cache_dir;
        pc.quantize_key = quantize_key(arm, p, stage1_material);
        const auto tp = Clock::now();
        comp.preprocessors[p]->apply(pc, model);
        monitor.step(arm.name, fmt::format("preprocess {} done in {:.2f}s", arm.preprocessors[p].name, seconds_since(tp)));
        // Stage 2 quantizes the preprocessed model: its masks see its own activations, unless the
        // preprocessor keeps the original ones (restorative-lora stage2_stats: stage1).
        if (!shared.input_stats.empty() && comp.preprocessors[p]->recompute_input_stats()) {
          stage("input statistics of the preprocessed model");
          preprocessed_stats = collect_input_stats(model, shared.calibration);
          stats = &preprocessed_stats;
        }
      }
      // The FP quality of the preprocessed model itself (PTQ1.61 Table 9), before stage 2.
      if (!comp.preprocessors.empty()) evaluate(model, "preprocessed:");
      const auto tq = Clock::now();
      r.linears = quantize(model, &log, true);
      for (const auto& l : r.linears) r.total_bits += l.bits;
      if (allocation) {  // the ledger confirms the budget (never exceeded)
        confirm_allocation_budget(*arm.allocation, r.linears, allocation->record);
        r.allocation = allocation->record;
      }
      monitor.step(arm.name, fmt::format("quantized {} linears with {} in {:.2f}s: {:.3f} bits/weight (paper), {:.3f} (all-in)",
                                         r.linears.size(), arm.allocation ? "the allocation" : arm.quantizer.name,
                                         seconds_since(tq),
                                         r.total_bits.paper_per_weight(), r.total_bits.all_in_per_weight()));
      evaluate(model, "");
      if (!options.export_dir.empty()) {
        stage("exporting the quantized checkpoint");
        ExportOptions eo;
        eo.dtype = export_dtype(options.export_dtype);
        nlohmann::json params = nlohmann::json::object();
        for (const auto& param : arm.quantizer.params.values()) {
          const std::string& key = param.first;
          std::visit([&params, &key](const auto& v) { params[key] = v; }, param.second);
        }
        nlohmann::json q = {{"quant_method", "ptqlab-dequantized"},
                            {"method", arm.quantizer.name},
                            {"params", params},
                            {"bits", {{"paper", r.total_bits.paper_per_weight()}, {"all_in", r.total_bits.all_in_per_weight()}}},
                            {"ptqlab_version", version()},
                            {"git_revision", git_revision()},
                            {"config_hash", arm.config_hash},
                            {"experiment", exp.name},
                            {"arm", arm.name},
                            {"weights", fmt::format("dequantized, stored as {}", options.export_dtype)}};
        if (arm.mask) q["mask"] = arm.mask->name;
        for (const auto& p : arm.preprocessors) q["preprocessors"].push_back(p.name);
        eo.quantization_config_json = q.dump();
        const auto dir = options.export_dir / arm.name;
        std::error_code ec;
        std::filesystem::remove_all(dir, ec);  // a rerun replaces an earlier export of the same arm
        export_checkpoint(model, dir, eo);
        monitor.step(arm.name, fmt::format("exported {} checkpoint -> {}", options.export_dtype, dir.string()));
      }
      out.status = ArmOutcome::Status::completed;
    } catch (const Stopped&) {
      // SIGTERM: nothing of this arm is written, so nothing looks complete; a rerun redoes it.
      out.status = ArmOutcome::Status::stopped;
      out.message = "stopped during " + doing;
      r.seconds = seconds_since(t0);
      monitor.step(arm.name, fmt::format("STOPPED (SIGTERM) during {}: no result written", doing));
      monitor.stage_done(arm.name);
      // The layer checkpoint stays: rerunning resumes at the layer where it stopped.
      return;
    } catch (const std::exception& e) {
      // The arm failed (bad numerics, a plugin's error): record it; the other arms go on.
      r.status = "failed";
      r.failure = e.what();
      out.status = ArmOutcome::Status::failed;
      out.message = e.what();
      monitor.step(arm.name, fmt::format("FAILED: {}", e.what()));
    }
    r.seconds = seconds_since(t0);
    r.provenance.end_time = utc_now();
    stage("writing results");
    try {
      writer.submit(out.file, r).get();
      if (out.status == ArmOutcome::Status::completed)
        monitor.step(arm.name, fmt::format("done in {:.2f}s -> {}", r.seconds, out.file.string()));
    } catch (const std::exception& e) {
      out.status = ArmOutcome::Status::failed;
      out.message = e.what();
      monitor.step(arm.name, fmt::format("FAILED to write results: {}", e.what()));
    }
    // The arm is done (its result written, or failed): its layer checkpoint and spilled layers go.
    // A failed arm would fail again the same way; one whose result could not be written reruns.
    {
      std::error_code ec;
      std::filesystem::remove_all(layer_store_dir(options.out_dir, arm.name), ec);
    }
    monitor.arm_finished(arm.name);
  };

  tbb::task_arena arena(options.jobs);
  arena.execute([&] {
    tbb::parallel_for(tbb::blocked_range<std::size_t>(0, todo.size(), 1),
                      [&](const tbb::blocked_range<std::size_t>& range) {
                        for (std::size_t i = range.begin(); i < range.end(); ++i) run_arm(i);
                      },
                      tbb::simple_partitioner());
  });
  monitor.finish();

  // Report in the experiment's arm order.
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
