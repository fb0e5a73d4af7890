// Evaluator "perplexity": token perplexity under a named protocol (docs/protocols.md):
// ptqlab-ppl-v1 (default), gptq-wikitext2, llamacpp.
#include <map>
#include <memory>
#include <mutex>

#include <fmt/format.h>

#include "ptqlab/engine/param_rows.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/utf8.hpp"

namespace {

class PerplexityEvaluator : public ptqlab::Evaluator {
 public:
  explicit PerplexityEvaluator(const ptqlab::Params& p)
      : seq_len_(static_cast<int>(p.get_int("seq_len"))),
        max_windows_(p.get_int("max_windows")),
        protocol_(p.get_string("protocol")) {}

  void check(const ptqlab::EvalCheckContext& ctx) const override {
    if (seq_len_ > ctx.config->max_position_embeddings)
      throw ptqlab::Error(fmt::format("seq_len {} exceeds the model's max_position_embeddings {}", seq_len_,
                                      ctx.config->max_position_embeddings));
  }

  std::map<std::string, double> evaluate(const ptqlab::EvalContext& ctx, const ptqlab::LlamaModel& model) override {
    ptqlab::PerplexityOptions o;
    o.seq_len = seq_len_;
    o.max_windows = max_windows_;
    o.show_progress = ctx.show_progress;
    o.label = ctx.progress_label;
    ptqlab::PerplexityResult r;
    std::map<std::string, double> extra;
    if (protocol_ == ptqlab::kLlamaCppProtocol) {
      double unc = 0;
      r = ptqlab::evaluate_perplexity_llamacpp(model, ctx.tokens(), o, &unc);
      extra["ppl_unc"] = unc;
    } else if (protocol_ == ptqlab::kGptqWikitextProtocol) {
      r = ptqlab::evaluate_perplexity(model, gptq_stream(ctx, model.config.bos_token_id), o);
    } else {
      r = ptqlab::evaluate_perplexity(model, ctx.tokens(), o);
    }
    if (ctx.protocol != nullptr) *ctx.protocol = fmt::format("{}/seq{}", protocol_, r.seq_len);
    std::map<std::string, double> m = {{"ppl", r.ppl},
                                       {"nll", r.mean_nll},
                                       {"tokens", static_cast<double>(r.tokens)},
                                       {"predicted_tokens", static_cast<double>(r.predicted_tokens)},
                                       {"windows", static_cast<double>(r.windows)},
                                       {"seq_len", static_cast<double>(r.seq_len)}};
    if (protocol_ != ptqlab::kPerplexityProtocol) m["stream_tokens"] = static_cast<double>(r.stream_tokens);
    m.insert(extra.begin(), extra.end());
    return m;
  }

 private:
  // GPTQ's text is re-tokenized from the file once per dataset (shared by the arms).
  const std::vector<int>& gptq_stream(const ptqlab::EvalContext& ctx, int bos) {
    if (ctx.tokenizer == nullptr) throw ptqlab::Error("the gptq-wikitext2 protocol needs the tokenizer");
    std::lock_guard lock(mutex_);
    auto& s = gptq_streams_[ctx.file.string()];
    if (!s)
      s = std::make_unique<std::vector<int>>(ptqlab::perplexity_stream(
          *ctx.tokenizer, ptqlab::gptq_wikitext2_text(ptqlab::read_utf8_text_file(ctx.file)), bos));
    return *s;
  }

  int seq_len_;
  long long max_windows_;
  std::string protocol_;
  std::mutex mutex_;
  std::map<std::string, std::unique_ptr<std::vector<int>>> gptq_streams_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema schema;
  schema.name = "perplexity";
  schema.description =
      "token perplexity on non-overlapping windows; protocol ptqlab-ppl-v1 (BOS at the start only, every position), "
      "gptq-wikitext2 or llamacpp (docs/protocols.md)";
  schema.params = {
      ptqlab::param_rows::window_seq_len(),
      {"max_windows", ptqlab::ParamType::integer, std::int64_t{0}, "evaluate only the first K windows; 0: all", 0.0,
       {}, {}},
      {"protocol", ptqlab::ParamType::string, std::string(ptqlab::kPerplexityProtocol),
       "ptqlab-ppl-v1: BOS + raw file, all positions; gptq-wikitext2: HF wikitext rows joined with \"\\n\\n\", same "
       "windows; llamacpp: BOS replaces each chunk's first token, second half scored",
       {}, {}, {ptqlab::kPerplexityProtocol, ptqlab::kGptqWikitextProtocol, ptqlab::kLlamaCppProtocol},
       /*hashed_when_default=*/false},  // added later: results made before it keep their config hash
  };
  registrar->add_evaluator(schema, [](const ptqlab::Params& p) { return std::make_unique<PerplexityEvaluator>(p); });
}
