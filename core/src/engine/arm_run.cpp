// One arm of `ptqlab run`, as named stages (docs/architecture.md, "The arm run"):
//   allocate    an allocated arm solves its table: every linear gets a candidate
//   preprocess  preprocessors change the whole model (restorative LoRA quantizes, trains, merges);
//               the preprocessed model is evaluated ("preprocessed:<evaluator>")
//   quantize    layer by layer, with a layer-level checkpoint after each layer (docs/slurm.md)
//   evaluate    every evaluator on every dataset
//   export      the quantized model as a HF checkpoint (--export-dir)
//   write       the result file, through the process's single writer thread; the checkpoint goes
// A stage reads the run's context (run_stages.hpp) and the arm's own state below.
#include <ctime>
#include <optional>
#include <variant>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ptqlab/engine/layer_checkpoint.hpp"
#include "ptqlab/outputs/export.hpp"
#include "ptqlab/support/build_info.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/fault.hpp"
#include "ptqlab/support/progress.hpp"
#include "ptqlab/support/stop.hpp"
#include "run_stages.hpp"

namespace ptqlab::run_stages {
namespace {

std::string utc_now() {
  const std::time_t t = std::time(nullptr);
  std::tm tm{};
  ::gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

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

class ArmRun {
 public:
  ArmRun(const RunContext& run, const ArmSpec& arm, const ArmComponents& comp)
      : run_(run),
        arm_(arm),
        comp_(comp),
        log_(run.exp.log_tensors, out_.result),
        checkpoint_(layer_store_dir(run.options.out_dir, arm.name),
                    run.keys.layer_checkpoint(arm, run.options.layer_store, run.exp.model_dir)) {}

  ArmOutcome run() {
    const auto t0 = Clock::now();
    out_.arm = arm_.name;
    out_.file = run_.options.out_dir / (arm_.name + ".h5");
    if (stop_requested()) {  // SIGTERM before this arm started
      out_.status = ArmOutcome::Status::stopped;
      out_.message = "not started";
      return std::move(out_);
    }
    ArmResult& r = out_.result;
    start_result(r);
    try {
      if (!comp_.error.empty()) throw Error(comp_.error);
      // Each arm's model shares the mapped base and owns only the layers it quantizes.
      LlamaModel model = run_.shared.model;
      // Preprocessors change the whole model (restorative LoRA trains every layer): resident float32.
      if (!comp_.preprocessors.empty()) model.make_resident();
      allocate();
      preprocess(model);
      quantize_final(model);
      evaluate(model, "");
      export_model(model);
      out_.status = ArmOutcome::Status::completed;
    } catch (const Stopped&) {
      // SIGTERM: nothing of this arm is written, so nothing looks complete; a rerun redoes it.
      out_.status = ArmOutcome::Status::stopped;
      out_.message = "stopped during " + doing_;
      r.seconds = seconds_since(t0);
      run_.monitor.step(arm_.name, fmt::format("STOPPED (SIGTERM) during {}: no result written", doing_));
      run_.monitor.stage_done(arm_.name);
      // The layer checkpoint stays: rerunning resumes at the layer where it stopped.
      return std::move(out_);
    } catch (const std::exception& e) {
      // The arm failed (bad numerics, a plugin's error): record it; the other arms go on.
      r.status = "failed";
      r.failure = e.what();
      out_.status = ArmOutcome::Status::failed;
      out_.message = e.what();
      run_.monitor.step(arm_.name, fmt::format("FAILED: {}", e.what()));
    }
    r.seconds = seconds_since(t0);
    r.provenance.end_time = utc_now();
    write();
    return std::move(out_);
  }

 private:
  // `detail` (an ETA) is shown with the stage but left out of the SIGTERM message.
  void stage(std::string what, const std::string& detail = "") {
    doing_ = what;
    run_.monitor.stage(arm_.name, detail.empty() ? std::move(what) : what + ", " + detail);
  }

  void start_result(ArmResult& r) const {
    r.arm = arm_.name;
    r.experiment = run_.exp.name;
    r.config_yaml = arm_.resolved_yaml;
    r.config_hash = arm_.config_hash;
    r.provenance = run_.provenance;
    r.provenance.start_time = utc_now();
    r.calibration_tokens = run_.shared.calibration_tokens;
    r.calibration_nsamples = static_cast<int>(run_.shared.calibration.size());
    r.calibration_seq_len = run_.shared.calibration_seq_len;
  }

  // Stage "allocate": an allocated arm solves its table first; the plan gives every linear its candidate.
  void allocate() {
    if (!arm_.allocation) return;
    stage(fmt::format("allocation ({})", arm_.allocation->allocator.name));
    const auto table = aggregate_allocation_table(run_.shared.allocation_tables.at(run_.keys.allocation_table(*arm_.allocation)),
                                                  allocation_units(run_.shared.model.config, arm_.allocation->unit));
    allocation_ = solve_allocation(table, *arm_.allocation, *comp_.allocator, comp_.candidates);
    const auto& rec = allocation_->record;
    run_.monitor.step(arm_.name, fmt::format("allocation {}: {} bits of {} ({:.4f} per weight), table loss {:.6g}, {} in "
                                             "{:.3f}s",
                                             rec.allocator, rec.solver_bits, rec.budget_bits,
                                             static_cast<double>(rec.solver_bits) / static_cast<double>(rec.weights),
                                             rec.solver_loss, rec.status, rec.solve_seconds));
  }

  // Stage "preprocess": each preprocessor in turn, then the FP quality of the preprocessed model
  // itself (PTQ1.61 Table 9), before the final quantization.
  void preprocess(LlamaModel& model) {
    for (std::size_t p = 0; p < comp_.preprocessors.size(); ++p) {
      throw_if_stop_requested();
      stage(fmt::format("preprocess {}", arm_.preprocessors[p].name));
      PreprocessContext pc;
      pc.tokenizer = run_.shared.tokenizer.get();
      pc.quantize = [this, p](LlamaModel& m) {
        PrefixedLog stage1(log_, fmt::format("preprocess/{}/stage1/", arm_.preprocessors[p].name));
        quantize(m, &stage1, false);
      };
      pc.calibration = &run_.shared.calibration;
      pc.calibration_stream = &run_.shared.streams.at(run_.exp.calibration.text);
      pc.seed = run_.exp.seed;
      pc.log = &log_;
      pc.status = [this](const std::string& what) {
        throw_if_stop_requested();  // a long preprocessing step (training) stops cleanly on SIGTERM too
        stage(what);
      };
      pc.note = [this](const std::string& line) { run_.monitor.step(arm_.name, line); };
      pc.cache_dir = run_.options.cache_dir;
      pc.quantize_key = run_.keys.quantize(arm_, p);
      const auto tp = Clock::now();
      comp_.preprocessors[p]->apply(pc, model);
      run_.monitor.step(arm_.name,
                        fmt::format("preprocess {} done in {:.2f}s", arm_.preprocessors[p].name, seconds_since(tp)));
      // Stage 2 quantizes the preprocessed model: its masks see its own activations, unless the
      // preprocessor keeps the original ones (restorative-lora stage2_stats: stage1).
      if (!run_.shared.input_stats.empty() && comp_.preprocessors[p]->recompute_input_stats()) {
        stage("input statistics of the preprocessed model");
        preprocessed_stats_ = collect_input_stats(model, run_.shared.calibration);
        stats_ = &preprocessed_stats_;
      }
    }
    if (!comp_.preprocessors.empty()) evaluate(model, "preprocessed:");
  }

  // Stage "quantize", the final one: the records and the ledger (an allocation's budget confirmed).
  void quantize_final(LlamaModel& model) {
    ArmResult& r = out_.result;
    const auto tq = Clock::now();
    r.linears = quantize(model, &log_, true);
    for (const auto& l : r.linears) r.total_bits += l.bits;
    if (allocation_) {  // the ledger confirms the budget (never exceeded)
      confirm_allocation_budget(*arm_.allocation, r.linears, allocation_->record);
      r.allocation = allocation_->record;
    }
    run_.monitor.step(arm_.name,
                      fmt::format("quantized {} linears with {} in {:.2f}s: {:.3f} bits/weight (paper), {:.3f} (all-in)",
                                  r.linears.size(), arm_.allocation ? "the allocation" : arm_.quantizer.name,
                                  seconds_since(tq), r.total_bits.paper_per_weight(), r.total_bits.all_in_per_weight()));
  }

  // The layer-wise quantization of `m`. The final one (not a preprocessor's stage 1) keeps a
  // layer-level checkpoint (docs/slurm.md): after each decoder layer, the quantized layer as its
  // own file (in the --layer-store dtype, F32 for "memory"; the files are also the spilled
  // layers) and the state to go on from; an existing checkpoint is resumed.
  std::vector<LinearRecord> quantize(LlamaModel& m, TensorLog* tensor_log, bool final_stage) {
    LayerwiseOptions lo;
    LayerwiseResume resume;
    if (final_stage && comp_.preprocessors.empty()) keep_layer_checkpoints(m, lo, resume);
    lo.quantizer = comp_.quantizer.get();
    lo.mask = comp_.mask.get();
    if (allocation_) lo.plan = allocation_->plan;
    lo.input_stats = stats_;
    lo.log = tensor_log;
    lo.seed = run_.exp.seed;
    lo.stream_dtype = run_.exp.calibration.stream_dtype;
    const auto quantize_start = Clock::now();
    const int first_layer = resume.start_layer;
    lo.on_layer = [this, quantize_start, first_layer](int l, int n) {
      throw_if_stop_requested();  // between layers: a safe point
      const int done = l - first_layer;
      const std::string eta = done > 0 ? format_duration(seconds_since(quantize_start) / done * (n - l)) : std::string("?");
      layer_stage_ = fmt::format("quantize layer {}/{}", l + 1, n);
      layer_eta_ = "ETA " + eta;
      stage(layer_stage_, layer_eta_);
    };
    lo.on_phase = [this](const std::string& what) { stage(layer_stage_, what + ", " + layer_eta_); };
    return quantize_layerwise_resumable(m, run_.shared.calibration, lo, resume);
  }

  void keep_layer_checkpoints(LlamaModel& m, LayerwiseOptions& lo, LayerwiseResume& resume) {
    const bool memory_store = run_.options.layer_store == "memory";
    const DType dtype = memory_store ? DType::F32 : layer_store_dtype(run_.options.layer_store);
    if (!memory_store) std::filesystem::create_directories(checkpoint_.dir());
    // With the memory store the files are only a checkpoint: when they cannot be written (disk
    // full, a file-size limit) the arm goes on without one and says so once.
    lo.keep_layer = [this, dtype, memory_store](LlamaModel& mm, int l, DecoderLayer layer) {
      if (!memory_store) {
        mm.set_stored_layer(l, write_layer_file(checkpoint_.layer_file(l), mm.config, l, layer, dtype));
        return;
      }
      if (checkpointing_) {
        try {
          std::filesystem::create_directories(checkpoint_.dir());
          (void)write_layer_file(checkpoint_.layer_file(l), mm.config, l, layer, dtype);
        } catch (const std::exception& e) {
          checkpointing_ = false;
          checkpoint_.remove();  // give the space back to the result file
          run_.monitor.step(arm_.name, fmt::format("no layer checkpoints from layer {} on: {}", l, e.what()));
        }
      }
      mm.set_layer(l, std::move(layer));
    };
    resume.after_layer = [this, memory_store](int l, const std::vector<LinearRecord>& records,
                                              const LayerStreams& streams) {
      if (!checkpointing_) return;
      try {
        checkpoint_.save(l + 1, records, streams, out_.result.series, out_.result.tensors);
      } catch (const std::exception& e) {
        if (!memory_store) throw;
        checkpointing_ = false;
        checkpoint_.remove();
        run_.monitor.step(arm_.name, fmt::format("no layer checkpoints from layer {} on: {}", l, e.what()));
      }
      fault_point("layer-checkpoint");
    };
    auto state = checkpoint_.load();
    if (!state) return;
    for (int l = 0; l < state->next_layer; ++l) {
      m.set_stored_layer(l, open_layer_file(checkpoint_.layer_file(l), m.config, l));
      if (memory_store) m.set_layer(l, m.layer_copy(l));
    }
    out_.result.series = std::move(state->series);
    out_.result.tensors = std::move(state->tensors);
    // Saved widened; held again in the stream dtype (exact: the values came from it).
    resumed_streams_.quant = ActivationBatches(run_.exp.calibration.stream_dtype);
    resumed_streams_.fp = ActivationBatches(run_.exp.calibration.stream_dtype);
    for (auto& x : state->quant) resumed_streams_.quant.push_back(std::move(x));
    for (auto& x : state->fp) resumed_streams_.fp.push_back(std::move(x));
    resumed_streams_.shapes = std::move(state->shapes);
    resume.start_layer = state->next_layer;
    resume.records = std::move(state->records);
    resume.streams = &resumed_streams_;
    const int n = m.config.num_layers;
    run_.monitor.step(arm_.name, state->next_layer < n
                                     ? fmt::format("resuming at layer {}/{} from the layer checkpoint in {}",
                                                   state->next_layer + 1, n, checkpoint_.dir().string())
                                     : fmt::format("resuming after all {} layers from the layer checkpoint in {}", n,
                                                   checkpoint_.dir().string()));
  }

  // Stage "evaluate": every evaluator on `m`; metrics go under "<prefix><evaluator>".
  void evaluate(const LlamaModel& m, const std::string& prefix) {
    ArmResult& r = out_.result;
    for (std::size_t e = 0; e < run_.exp.evaluators.size(); ++e) {
      const auto& spec = run_.exp.evaluators[e];
      for (const auto& d : spec.datasets) {
        throw_if_stop_requested();  // between datasets (perplexity also checks between batches)
        stage(fmt::format("{}{} {}", prefix, spec.evaluator.name, d.name));
        EvalContext ec;
        ec.dataset = d.name;
        ec.file = d.file;
        static const std::vector<int> no_stream;
        const auto found = run_.shared.streams.find(d.file);
        const auto* stream = found != run_.shared.streams.end() ? &found->second : &no_stream;
        ec.tokens = [stream]() -> const std::vector<int>& { return *stream; };
        ec.reference = &run_.shared.model;
        ec.tokenizer = run_.shared.tokenizer.get();
        ec.log = &log_;
        ec.log_prefix = "eval/" + prefix + spec.evaluator.name + "/" + d.name + "/";
        ec.cache_dir = run_.cache.enabled() ? run_.cache.dir() : std::filesystem::path();
        ec.reference_key = run_.keys.model();
        std::string protocol;
        ec.protocol = &protocol;
        ec.note = [this](const std::string& what) { run_.monitor.step(arm_.name, what); };
        const auto te = Clock::now();
        std::map<std::string, double> metrics;
        try {
          metrics = run_.evaluators[e]->evaluate(ec, m);
        } catch (const Error& err) {  // name the dataset and its file: the message may not
          throw Error(fmt::format("{}{} on dataset '{}' ({}): {}", prefix, spec.evaluator.name, d.name,
                                  d.file.string(), err.what()));
        }
        std::string shown;
        for (const auto& [k, v] : metrics)
          if (k == "ppl") shown = fmt::format("ppl {:.4f}", v);
        run_.monitor.step(arm_.name, fmt::format("{}{} {}: {} ({:.2f}s)", prefix, spec.evaluator.name, d.name,
                                                 shown.empty() ? std::string("done") : shown, seconds_since(te)));
        r.metrics[prefix + spec.evaluator.name][d.name] = std::move(metrics);
        if (!protocol.empty()) r.protocols[prefix + spec.evaluator.name][d.name] = protocol;
      }
    }
  }

  // Stage "export" (--export-dir): the quantized model as a HF checkpoint with a quantization_config.
  void export_model(const LlamaModel& model) {
    if (run_.options.export_dir.empty()) return;
    const ArmResult& r = out_.result;
    stage("exporting the quantized checkpoint");
    ExportOptions eo;
    eo.dtype = export_dtype(run_.options.export_dtype);
    nlohmann::json params = nlohmann::json::object();
    for (const auto& param : arm_.quantizer.params.values()) {
      const std::string& key = param.first;
      std::visit([&params, &key](const auto& v) { params[key] = v; }, param.second);
    }
    nlohmann::json q = {{"quant_method", "ptqlab-dequantized"},
                        {"method", arm_.quantizer.name},
                        {"params", params},
                        {"bits", {{"paper", r.total_bits.paper_per_weight()}, {"all_in", r.total_bits.all_in_per_weight()}}},
                        {"ptqlab_version", version()},
                        {"git_revision", git_revision()},
                        {"config_hash", arm_.config_hash},
                        {"experiment", run_.exp.name},
                        {"arm", arm_.name},
                        {"weights", fmt::format("dequantized, stored as {}", run_.options.export_dtype)}};
    if (arm_.mask) q["mask"] = arm_.mask->name;
    for (const auto& p : arm_.preprocessors) q["preprocessors"].push_back(p.name);
    eo.quantization_config_json = q.dump();
    const auto dir = run_.options.export_dir / arm_.name;
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);  // a rerun replaces an earlier export of the same arm
    export_checkpoint(model, dir, eo);
    run_.monitor.step(arm_.name, fmt::format("exported {} checkpoint -> {}", run_.options.export_dtype, dir.string()));
  }

  // Stage "write": the result file (completed or failed), then the arm's layer checkpoint and
  // spilled layers go. A failed arm would fail again the same way; one whose result could not be
  // written reruns.
  void write() {
    stage("writing results");
    try {
      run_.writer.submit(out_.file, out_.result).get();
      if (out_.status == ArmOutcome::Status::completed)
        run_.monitor.step(arm_.name, fmt::format("done in {:.2f}s -> {}", out_.result.seconds, out_.file.string()));
    } catch (const std::exception& e) {
      out_.status = ArmOutcome::Status::failed;
      out_.message = e.what();
      run_.monitor.step(arm_.name, fmt::format("FAILED to write results: {}", e.what()));
    }
    std::error_code ec;
    std::filesystem::remove_all(layer_store_dir(run_.options.out_dir, arm_.name), ec);
    run_.monitor.arm_finished(arm_.name);
  }

  const RunContext& run_;
  const ArmSpec& arm_;
  const ArmComponents& comp_;
  ArmOutcome out_;
  ArmLog log_;
  std::string layer_stage_, layer_eta_;  // "quantize layer 3/32", "ETA 5m" (with the phase in the stage shown)
  std::string doing_ = "starting";  // what the arm is doing, for the message when SIGTERM stops it
  const ModelInputStats* stats_ = &run_.shared.input_stats;
  ModelInputStats preprocessed_stats_;
  std::optional<AllocationOutcome> allocation_;
  const LayerCheckpoint checkpoint_;
  LayerStreams resumed_streams_;
  bool checkpointing_ = true;
};

}  // namespace

ArmOutcome run_arm(const RunContext& run, const ArmSpec& arm, const ArmComponents& components) {
  ArmRun one(run, arm, components);
  return one.run();
}

}  // namespace ptqlab::run_stages
