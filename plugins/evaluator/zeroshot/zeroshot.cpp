// Evaluator "zeroshot": lm-eval-style multiple choice by log-likelihood (docs/zeroshot.md). The
// dataset name selects the task (piqa, arc_easy, ..., or "<task>-<suffix>"), unless `task` is set.
#include <memory>
#include <mutex>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/eval/zeroshot.hpp"
#include "ptqlab/support/error.hpp"

namespace {

class ZeroShotEvaluator : public ptqlab::Evaluator {
 public:
  explicit ZeroShotEvaluator(const ptqlab::Params& p)
      : preset_(ptqlab::lmeval_preset(p.get_string("preset"))),
        task_(p.get_string("task")),
        limit_(p.get_int("limit")),
        max_length_(static_cast<int>(p.get_int("max_length"))),
        bootstrap_iters_(p.get_int("bootstrap_iters")),
        batch_tokens_(p.get_int("batch_tokens")) {}

  bool needs_token_stream() const override { return false; }

  void check(const ptqlab::EvalCheckContext& ctx) const override {
    if (max_length_ > ctx.config->max_position_embeddings)
      throw ptqlab::Error(fmt::format("max_length {} exceeds the model's max_position_embeddings {}", max_length_,
                                      ctx.config->max_position_embeddings));
    task(ctx.dataset, ctx.file);  // parses and checks the whole file
  }

  std::map<std::string, double> evaluate(const ptqlab::EvalContext& ctx, const ptqlab::LlamaModel& model) override {
    if (ctx.tokenizer == nullptr) throw ptqlab::Error("zeroshot needs the model's tokenizer");
    const auto& t = task(ctx.dataset, ctx.file);
    ptqlab::ZeroShotOptions o;
    o.preset = preset_;
    o.max_length = max_length_;
    o.limit = limit_;
    o.bootstrap_iters = bootstrap_iters_;
    o.batch_tokens = batch_tokens_;
    o.show_progress = ctx.show_progress;
    o.label = ctx.progress_label.empty() ? "zeroshot " + ctx.dataset : ctx.progress_label;
    auto r = ptqlab::evaluate_zeroshot(model, *ctx.tokenizer, t, o);
    if (ctx.protocol != nullptr) *ctx.protocol = r.protocol;
    if (ctx.note)
      ctx.note(fmt::format("zeroshot {}: {} docs, {} requests, {:.1f} docs/s, {:.0f} tokens/s", ctx.dataset, r.docs,
                           r.requests.size(), r.seconds > 0 ? r.docs / r.seconds : 0.0,
                           r.seconds > 0 ? r.tokens / r.seconds : 0.0));
    if (ctx.log != nullptr) {  // per-item values: a table can be recomputed without rerunning
      std::vector<double> ll, greedy, doc, choice, ntok, gold;
      for (std::size_t i = 0; i < r.requests.size(); ++i) {
        ll.push_back(r.scores[i].logprob);
        greedy.push_back(r.scores[i].greedy ? 1.0 : 0.0);
        doc.push_back(r.requests[i].doc);
        choice.push_back(r.requests[i].choice);
        ntok.push_back(static_cast<double>(r.requests[i].continuation_tokens.size()));
      }
      for (long long d = 0; d < r.docs; ++d) gold.push_back(t.docs[d].gold);
      const auto& p = ctx.log_prefix;
      ctx.log->series(p + "request_ll", std::move(ll));
      ctx.log->series(p + "request_greedy", std::move(greedy));
      ctx.log->series(p + "request_doc", std::move(doc));
      ctx.log->series(p + "request_choice", std::move(choice));
      ctx.log->series(p + "request_continuation_tokens", std::move(ntok));
      ctx.log->series(p + "doc_gold", std::move(gold));
      ctx.log->series(p + "doc_acc", r.doc_acc);
      if (!r.doc_acc_norm.empty()) ctx.log->series(p + "doc_acc_norm", r.doc_acc_norm);
      if (!r.doc_ll.empty()) ctx.log->series(p + "doc_ll", r.doc_ll);
    }
    return r.metrics;
  }

 private:
  // Each task file is parsed once (check() runs before the arms; evaluate() in parallel arms).
  const ptqlab::ZeroShotTask& task(const std::string& dataset, const std::filesystem::path& file) const {
    const std::string name = task_.empty() ? ptqlab::zeroshot_task_of(dataset) : task_;
    if (name.empty())
      throw ptqlab::Error(fmt::format("dataset name '{}' names no zero-shot task (known: {}; or set params.task)",
                                      dataset, fmt::join(ptqlab::zeroshot_task_names(), ", ")));
    std::lock_guard lock(mutex_);
    const std::string key = name + "|" + file.string();
    auto it = tasks_.find(key);
    if (it == tasks_.end())
      it = tasks_.emplace(key, std::make_unique<ptqlab::ZeroShotTask>(ptqlab::load_zeroshot_task(name, file))).first;
    return *it->second;
  }

  ptqlab::LmEvalPreset preset_;
  std::string task_;
  long long limit_;
  int max_length_;
  long long bootstrap_iters_;
  long long batch_tokens_;
  mutable std::mutex mutex_;
  mutable std::map<std::string, std::unique_ptr<ptqlab::ZeroShotTask>> tasks_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema schema;
  schema.name = "zeroshot";
  schema.description =
      "lm-eval-style zero-shot multiple choice by log-likelihood (piqa, arc_easy, arc_challenge, hellaswag, "
      "winogrande, boolq, openbookqa, lambada_openai): acc, acc_norm, perplexity, stderr";
  schema.params = {
      {"preset", ptqlab::ParamType::string, std::string("lmeval-0.4.10"),
       "lm-eval version's tokenization rules: lmeval-0.3 (no BOS, separate encodings; PTQ1.61's vendored copy), "
       "lmeval-0.4 (no BOS, joint), lmeval-0.4.10 (BOS, joint; v0.4.9.2+)",
       {}, {}, ptqlab::lmeval_preset_names()},
      {"task", ptqlab::ParamType::string, std::string(""), "the task; empty: the dataset name (or its part before '-')",
       {}, {}, {}},
      {"limit", ptqlab::ParamType::integer, std::int64_t{0}, "evaluate the first N items only; 0: all", 0.0, {}, {}},
      {"num_fewshot", ptqlab::ParamType::integer, std::int64_t{0}, "few-shot examples (only 0 is implemented)", 0.0,
       0.0, {}},
      {"max_length", ptqlab::ParamType::integer, std::int64_t{0},
       "left-truncation length; 0: the model's max_position_embeddings (as lm-eval)", 0.0, 1048576.0, {}},
      {"bootstrap_iters", ptqlab::ParamType::integer, std::int64_t{100000},
       "resamples for LAMBADA's perplexity stderr (lm-eval's default); 0: none", 0.0, 10000000.0, {}},
      {"batch_tokens", ptqlab::ParamType::integer, std::int64_t{4096}, "padded tokens per forward call", 1.0,
       1048576.0, {}},
  };
  registrar->add_evaluator(schema, [](const ptqlab::Params& p) { return std::make_unique<ZeroShotEvaluator>(p); });
}
