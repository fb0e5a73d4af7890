// Evaluator "kl-divergence": KL(FP || arm) per token with llama.cpp's statistics
// (docs/kl-divergence.md). The FP logits are computed once per experiment into the artifact cache
// and streamed from there by every arm.
#include <fmt/format.h>

#include "ptqlab/engine/param_rows.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/eval/kl_divergence.hpp"
#include "ptqlab/support/error.hpp"

namespace {

class KlDivergenceEvaluator : public ptqlab::Evaluator {
 public:
  explicit KlDivergenceEvaluator(const ptqlab::Params& p)
      : seq_len_(static_cast<int>(p.get_int("seq_len"))),
        max_windows_(p.get_int("max_windows")),
        batch_windows_(static_cast<int>(p.get_int("batch_windows"))) {}

  void check(const ptqlab::EvalCheckContext& ctx) const override {
    if (seq_len_ > ctx.config->max_position_embeddings)
      throw ptqlab::Error(fmt::format("seq_len {} exceeds the model's max_position_embeddings {}", seq_len_,
                                      ctx.config->max_position_embeddings));
  }

  std::map<std::string, double> evaluate(const ptqlab::EvalContext& ctx, const ptqlab::LlamaModel& model) override {
    if (ctx.reference == nullptr) throw ptqlab::Error("kl-divergence needs the FP reference model");
    ptqlab::KldOptions o;
    o.seq_len = seq_len_;
    o.max_windows = max_windows_;
    o.batch_windows = batch_windows_;
    o.cache_dir = ctx.cache_dir;
    o.reference_key = ctx.reference_key;
    o.show_progress = ctx.show_progress;
    o.label = ctx.progress_label.empty() ? "kld " + ctx.dataset : ctx.progress_label;
    auto r = ptqlab::evaluate_kld(model, *ctx.reference, ctx.tokens(), o);
    if (ctx.protocol != nullptr) *ctx.protocol = fmt::format("ptqlab-kld-v1/seq{}", r.seq_len);
    if (ctx.note && !r.reference_file.empty())
      ctx.note(fmt::format("kl-divergence {}: FP reference {} ({})", ctx.dataset,
                           r.reference_from_cache ? "read from" : "written to", r.reference_file.string()));
    if (ctx.log != nullptr) {
      std::vector<double> kld, dp, nq, nb, same;
      for (const auto& t : r.tokens) {
        kld.push_back(t.kld);
        dp.push_back(t.dp);
        nq.push_back(t.nll_q);
        nb.push_back(t.nll_base);
        same.push_back(t.same_top ? 1.0 : 0.0);
      }
      const auto& p = ctx.log_prefix;
      ctx.log->series(p + "token_kld", std::move(kld));
      ctx.log->series(p + "token_dp", std::move(dp));
      ctx.log->series(p + "token_nll_q", std::move(nq));
      ctx.log->series(p + "token_nll_base", std::move(nb));
      ctx.log->series(p + "token_same_top", std::move(same));
    }
    return r.metrics;
  }

 private:
  int seq_len_;
  long long max_windows_;
  int batch_windows_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema schema;
  schema.name = "kl-divergence";
  schema.description =
      "KL(FP || quantized) per token on ptqlab-ppl-v1 windows, with llama.cpp's statistics (mean KLD, percentiles, "
      "same top token, delta p, PPL ratio); the FP logits are cached once per experiment";
  schema.params = {
      ptqlab::param_rows::window_seq_len(),
      {"max_windows", ptqlab::ParamType::integer, std::int64_t{64},
       "evaluate the first K windows; 0: all (the cached FP logits take 4 * vocab bytes per scored token)", 0.0, {},
       {}},
      {"batch_windows", ptqlab::ParamType::integer, std::int64_t{0},
       "windows per forward call; 0: about 4096 tokens and at most 64 MiB of reference logits", 0.0, 65536.0, {}},
  };
  registrar->add_evaluator(schema, [](const ptqlab::Params& p) { return std::make_unique<KlDivergenceEvaluator>(p); });
}
