// Evaluator "perplexity": the ptqlab-ppl-v1 protocol (docs/protocols.md) on a dataset.
#include "ptqlab/perplexity.hpp"
#include "ptqlab/plugin.hpp"

namespace {

class PerplexityEvaluator : public ptqlab::Evaluator {
 public:
  explicit PerplexityEvaluator(const ptqlab::Params& p)
      : seq_len_(static_cast<int>(p.get_int("seq_len"))), max_windows_(p.get_int("max_windows")) {}

  std::map<std::string, double> evaluate(const ptqlab::EvalContext& ctx, const ptqlab::LlamaModel& model) override {
    ptqlab::PerplexityOptions o;
    o.seq_len = seq_len_;
    o.max_windows = max_windows_;
    o.show_progress = ctx.show_progress;
    o.label = ctx.progress_label;
    const auto r = ptqlab::evaluate_perplexity(model, ctx.tokens(), o);
    return {{"ppl", r.ppl},
            {"nll", r.mean_nll},
            {"tokens", static_cast<double>(r.tokens)},
            {"predicted_tokens", static_cast<double>(r.predicted_tokens)},
            {"windows", static_cast<double>(r.windows)},
            {"seq_len", static_cast<double>(r.seq_len)}};
  }

 private:
  int seq_len_;
  long long max_windows_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema schema;
  schema.name = "perplexity";
  schema.description = "token perplexity on non-overlapping windows, BOS at the start only (ptqlab-ppl-v1)";
  schema.params = {
      {"seq_len", ptqlab::ParamType::integer, std::int64_t{0}, "window length; 0: the model's max_position_embeddings",
       0.0, 1048576.0, {}},
      {"max_windows", ptqlab::ParamType::integer, std::int64_t{0}, "evaluate only the first K windows; 0: all", 0.0,
       {}, {}},
  };
  registrar->add_evaluator(schema, [](const ptqlab::Params& p) { return std::make_unique<PerplexityEvaluator>(p); });
}
