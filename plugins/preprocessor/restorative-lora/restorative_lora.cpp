// Preprocessor "restorative-lora": PTQ1.61's quantization preprocessing (research/ptq161.md §6,
// docs/methods/restorative-lora.md). Stage 1 quantizes the model with the arm's own mask and
// quantizer, LoRA adapters are trained on the fake-quantized model with the causal-LM loss, and
// the merged model W_q1 + s B A is handed back; the engine then quantizes it again (stage 2).
// The merged model is cached content-addressed, so arms and runs with the same stage 1 and the
// same training share one training run.
#include <algorithm>
#include <cmath>
#include <sstream>

#include <fmt/format.h>
#include <tbb/task_arena.h>

#include "ptqlab/engine/artifact_cache.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/sha256.hpp"
#include "lora.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/support/progress.hpp"
#include "ptqlab/support/text_file.hpp"

namespace {

using ptqlab::Error;

std::array<bool, 7> parse_targets(const std::string& text) {
  std::array<bool, 7> t{};
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    item.erase(std::remove_if(item.begin(), item.end(), ::isspace), item.end());
    if (item.empty()) continue;
    bool found = false;
    for (ptqlab::Linear which : ptqlab::kAllLinears) {
      const std::string full = ptqlab::linear_name(which);  // "q_proj"
      if (item == full || item == full.substr(0, full.size() - 5)) {
        t[static_cast<std::size_t>(which)] = true;
        found = true;
      }
    }
    if (!found)
      throw Error(fmt::format("preprocessor restorative-lora: parameter 'targets': unknown linear '{}' (use q, k, v, "
                              "o, gate, up, down)",
                              item));
  }
  if (std::none_of(t.begin(), t.end(), [](bool b) { return b; }))
    throw Error("preprocessor restorative-lora: parameter 'targets' names no linear");
  return t;
}

class RestorativeLora : public ptqlab::Preprocessor {
 public:
  explicit RestorativeLora(const ptqlab::Params& p) : params_(p) {
    lora_.rank = static_cast<int>(p.get_int("rank"));
    lora_.alpha = p.get_real("alpha");
    lora_.dropout = p.get_real("dropout");
    lora_.targets = parse_targets(p.get_string("targets"));
    train_.seq_len = static_cast<int>(p.get_int("seq_len"));
    train_.steps = static_cast<int>(p.get_int("steps"));
    train_.batch = static_cast<int>(p.get_int("batch"));
    train_.accumulation = static_cast<int>(p.get_int("accumulation"));
    train_.lr = p.get_real("lr");
    train_.warmup_fraction = p.get_real("warmup");
    train_.weight_decay = p.get_real("weight_decay");
    train_.clip = p.get_real("clip");
    train_.seed = static_cast<std::uint64_t>(p.get_int("seed"));
    text_ = p.get_string("text");
    if (!text_.empty()) {
      std::error_code ec;
      if (!std::filesystem::is_regular_file(text_, ec))
        throw Error(fmt::format("{}: preprocessor restorative-lora: parameter 'text': no such file", text_));
    }
    recompute_stats_ = p.get_string("stage2_stats") == "recompute";
  }

  bool recompute_input_stats() const override { return recompute_stats_; }

  void apply(const ptqlab::PreprocessContext& ctx, ptqlab::LlamaModel& model) override {
    auto say = [&](const std::string& line) {
      if (ctx.note) ctx.note(line);
    };
    std::vector<int> own_stream;
    const std::vector<int>* stream = ctx.calibration_stream;
    if (!text_.empty()) {
      own_stream = ptqlab::perplexity_stream(*ctx.tokenizer, ptqlab::read_text_file(text_), model.config.bos_token_id);
      stream = &own_stream;
    }
    if (stream == nullptr) throw Error("preprocessor restorative-lora: the engine gave no training text");
    if (train_.seq_len > model.config.max_position_embeddings)
      throw Error(fmt::format("preprocessor restorative-lora: seq_len {} exceeds the model's max_position_embeddings {}",
                              train_.seq_len, model.config.max_position_embeddings));

    // Everything the merged model depends on; stage2_stats only affects stage 2, so it is left out
    // and arms differing only in it share the training.
    std::string material = "restorative-lora/v1|" + ctx.quantize_key;
    for (const auto& [name, value] : params_.values())
      if (name != "stage2_stats") material += "|" + name + "=" + ptqlab::param_value_text(value);
    material += "|tokens:" + ptqlab::sha256_hex(std::string(reinterpret_cast<const char*>(stream->data()),
                                                            stream->size() * sizeof(int)));
    const std::string key = ptqlab::sha256_hex(material);
    const ptqlab::ArtifactCache cache = ctx.cache_dir.empty() ? ptqlab::ArtifactCache() : ptqlab::ArtifactCache(ctx.cache_dir);

    // One arm (or process) trains; the others wait on the lock and then load its result. The work
    // under the lock is isolated so that this thread never picks up another arm's task while it
    // waits inside its own parallel loops (that arm could block on this very lock).
    const auto lock = cache.lock(key);
    std::vector<double> curve;
    if (cache.load_linears(key, model, curve)) {
      say(fmt::format("restorative-lora: reused the cached merged model {} (no training)", key.substr(0, 12)));
      log(ctx, curve, {}, {}, true);
      return;
    }
    tbb::this_task_arena::isolate([&] {
      if (ctx.status) ctx.status("restorative-lora: stage 1 quantization");
      ctx.quantize(model);
      auto adapters = ptqlab::LoraAdapters::init(model, lora_, train_.seed);
      auto options = train_;
      const int report_every = std::max(1, options.steps / 10);
      options.on_step = [&](const ptqlab::LoraTrainOptions::Step& s) {
        const double eta = s.elapsed_s / s.step * (s.steps - s.step);
        const std::string line = fmt::format("restorative-lora step {}/{} loss {:.4f} lr {:.2e} {:.0f} tokens/s ETA {}",
                                             s.step, s.steps, s.loss, s.lr, s.tokens_per_s, ptqlab::format_duration(eta));
        if (ctx.status) ctx.status(line);
        if (s.step % report_every == 0 || s.step == s.steps) say(line);
      };
      say(fmt::format("restorative-lora: training {} LoRA parameters (rank {}, alpha {}) for {} steps of {} x {} tokens",
                      adapters.parameter_count(), lora_.rank, lora_.alpha, options.steps,
                      options.batch * options.accumulation, options.seq_len));
      const auto result = ptqlab::train_lora(model, adapters, *stream, options);
      ptqlab::merge_lora(model, adapters);
      say(fmt::format("restorative-lora: trained in {:.1f}s ({:.0f} tokens/s), loss {:.4f} -> {:.4f}", result.seconds,
                      result.tokens_per_s(), result.loss.front(), result.loss.back()));
      cache.store_linears(key, model, result.loss);
      log(ctx, result.loss, result.lr, result.grad_norm, false);
    });
  }

 private:
  static void log(const ptqlab::PreprocessContext& ctx, const std::vector<double>& loss, const std::vector<double>& lr,
                  const std::vector<double>& grad_norm, bool cache_hit) {
    if (ctx.log == nullptr) return;
    ctx.log->series("preprocess/restorative-lora/loss", loss);
    if (!lr.empty()) ctx.log->series("preprocess/restorative-lora/lr", lr);
    if (!grad_norm.empty()) ctx.log->series("preprocess/restorative-lora/grad_norm", grad_norm);
    ctx.log->series("preprocess/restorative-lora/cache_hit", {cache_hit ? 1.0 : 0.0});
  }

  ptqlab::Params params_;
  ptqlab::LoraConfig lora_;
  ptqlab::LoraTrainOptions train_;
  std::string text_;
  bool recompute_stats_ = true;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  using ptqlab::ParamType;
  ptqlab::ComponentSchema schema;
  schema.name = "restorative-lora";
  schema.description =
      "PTQ1.61 preprocessing: quantize with the arm's quantizer, train LoRA on the quantized model (causal LM), merge";
  schema.params = {
      {"rank", ParamType::integer, std::int64_t{16}, "LoRA rank r (reference: 64 for 7B+ models)", 1.0, 4096.0, {}},
      {"alpha", ParamType::real, 16.0, "LoRA alpha; the adapter is scaled by alpha / rank (reference: 16)", 0.0, 1e6, {}},
      {"dropout", ParamType::real, 0.05, "dropout on the adapter input (reference: 0.1)", 0.0, 0.95, {}},
      {"targets", ParamType::string, std::string("q,k,v,gate,up,down"), "linears with adapters, comma-separated (reference: all but o)", {}, {}, {}},
      {"steps", ParamType::integer, std::int64_t{300}, "optimizer steps (reference: 10000)", 1.0, 1e9, {}},
      {"seq_len", ParamType::integer, std::int64_t{256}, "tokens per training window (reference: documents up to 2048)", 2.0, 1e6, {}},
      {"batch", ParamType::integer, std::int64_t{8}, "windows per micro-batch (reference: 1)", 1.0, 1e6, {}},
      {"accumulation", ParamType::integer, std::int64_t{1}, "micro-batches per optimizer step (reference: 2)", 1.0, 1e6, {}},
      {"lr", ParamType::real, 1e-3, "peak AdamW learning rate (reference: 1e-4)", 0.0, 10.0, {}},
      {"warmup", ParamType::real, 0.05, "fraction of the steps with linear warmup, then cosine decay to 0", 0.0, 1.0, {}},
      {"weight_decay", ParamType::real, 0.0, "AdamW decoupled weight decay", 0.0, 10.0, {}},
      {"clip", ParamType::real, 1.0, "global gradient-norm clipping (0: off)", 0.0, 1e9, {}},
      {"seed", ParamType::integer, std::int64_t{42}, "adapter init, window sampling and dropout masks", 0.0, 9.2e18, {}},
      {"text", ParamType::string, std::string(""), "training text file (empty: the experiment's calibration text)", {}, {}, {}},
      {"stage2_stats", ParamType::string, std::string("recompute"),
       "stage 2's activation statistics: of the merged model (recompute, Algorithm 1) or of the original model "
       "(stage1; with activation-channels this reuses stage 1's masks, as remain.py)",
       {}, {}, {"recompute", "stage1"}},
  };
  registrar->add_preprocessor(schema, [](const ptqlab::Params& p) { return std::make_unique<RestorativeLora>(p); });
}
