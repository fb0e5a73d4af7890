// Quantizer "billm": BiLLM (Huang et al., ICML 2024) as in Aaronhuang-778/BiLLM (`braq`,
// research/baselines.md §2; docs/methods/billm.md). Per block of 128 input columns: a structural
// search for salient columns (binarized twice, residually), a break-point search splitting the
// other weights into concentrated and sparse groups (binarized once each, per row), and
// block-wise-only error propagation through the diagonal of U. `mode: paper` switches every
// paper-vs-code item of research/baselines.md §4 (B1-B4) to the paper's version.
#include <fmt/format.h>

#include "ptqlab/engine/param_rows.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/quant/billm_algo.hpp"
#include "ptqlab/quant/gptq.hpp"
#include "ptqlab/support/error.hpp"

namespace {

using Eigen::Index;
namespace billm = ptqlab::billm;

billm::Options options_from(const ptqlab::Params& p) {
  const auto mode = p.get_string("mode") == "paper" ? billm::Mode::paper : billm::Mode::faithful;
  billm::Options o = billm::defaults(mode);
  o.metric = p.get_string("salient_metric") == "magnitude" ? billm::Metric::magnitude : billm::Metric::hessian;
  o.block_size = p.get_int("block_size");
  if (p.get_int("min_salient") > 0) o.min_salient = static_cast<int>(p.get_int("min_salient"));
  if (p.get_int("max_salient") > 0) o.max_salient = static_cast<int>(p.get_int("max_salient"));
  if (p.get_int("search_salient_order") > 0) o.search_salient_order = static_cast<int>(p.get_int("search_salient_order"));
  if (p.get_int("search_rest_order") > 0) o.search_rest_order = static_cast<int>(p.get_int("search_rest_order"));
  o.split_min = p.get_real("split_min");
  o.split_max = p.get_real("split_max");
  o.split_points = static_cast<int>(p.get_int("split_points"));
  o.disable_gptq = p.get_bool("disable_gptq");
  // Per-item overrides of the mode's paper-vs-code choices ("auto": the mode's).
  if (const auto& b = p.get_string("binarizer"); b != "auto") {
    o.mean_shift = b == "mean_shift";
    o.zero_sign_is_zero = b == "mean_shift";
  }
  if (const auto& v = p.get_string("salience_scale"); v != "auto") o.inverse_diagonal = v == "inverse";
  if (const auto& v = p.get_string("search_on"); v != "auto") o.search_weights = v == "weights";
  if (const auto& v = p.get_string("breakpoints"); v != "auto") o.max_fraction_breakpoints = v == "max_fraction";
  if (o.min_salient > o.max_salient)
    throw ptqlab::Error(fmt::format("billm: min_salient ({}) is larger than max_salient ({})", o.min_salient, o.max_salient));
  if (o.split_min > o.split_max)
    throw ptqlab::Error(fmt::format("billm: split_min ({}) is larger than split_max ({})", o.split_min, o.split_max));
  return o;
}

class Billm : public ptqlab::Quantizer {
 public:
  explicit Billm(const ptqlab::Params& p)
      : opts_(options_from(p)), percdamp_(p.get_real("percdamp")), log_inputs_(p.get_bool("log_inputs")) {}

  bool needs_hessian() const override { return true; }

  ptqlab::BitCount quantize_linear(const ptqlab::LinearContext& ctx, ptqlab::Matrix& w) override {
    const std::string what = fmt::format("layer {} {}", ctx.layer, ptqlab::linear_name(ctx.which));
    if (!ctx.hessian) throw ptqlab::Error(what + ": billm needs the calibration Hessian");
    // What the linear was given (and, below, what it returns), so that another implementation (the
    // reference code) can be run on exactly these inputs and compared (docs/methods/billm.md,
    // "Check against the reference code").
    if (log_inputs_ && ctx.log != nullptr && ctx.log->enabled()) {
      ctx.log->tensor(ctx.log_prefix + "/weight_in", w);
      ctx.log->tensor(ctx.log_prefix + "/hessian", ctx.hessian().cast<float>());
    }
    const auto factor_ptr = ptqlab::inverse_hessian_factor(ctx, w, percdamp_, what);  // shared by q/k/v, gate/up
    const auto& factor = *factor_ptr;
    if (ctx.log != nullptr && factor.retries > 0) ctx.log->series(ctx.log_prefix + "/percdamp", {factor.percdamp});
    const auto blocks = billm::quantize_weight(w, factor.U, opts_);

    std::vector<int> salient;
    for (const auto& b : blocks) salient.push_back(b.salient);
    if (ctx.log != nullptr && ctx.log->enabled()) {
      ptqlab::Matrix cols = ptqlab::Matrix::Zero(1, w.cols());
      ptqlab::Matrix breakpoints(1, static_cast<Index>(blocks.size()));
      for (std::size_t i = 0; i < blocks.size(); ++i) {
        for (Index j = blocks[i].b0; j < blocks[i].b1; ++j) cols(0, j) = blocks[i].salient_columns[j - blocks[i].b0];
        breakpoints(0, static_cast<Index>(i)) = blocks[i].breakpoint;
      }
      if (log_inputs_) ctx.log->tensor(ctx.log_prefix + "/weight_out", w);
      ctx.log->tensor(ctx.log_prefix + "/salient_columns", cols);
      ctx.log->tensor(ctx.log_prefix + "/breakpoints", breakpoints);
    }
    return billm::ledger(w.rows(), w.cols(), opts_.block_size, salient, opts_.mean_shift);
  }

 private:
  billm::Options opts_;
  double percdamp_;
  bool log_inputs_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  using ptqlab::ParamType;
  ptqlab::ComponentSchema schema;
  schema.name = "billm";
  schema.description =
      "BiLLM: salient columns binarized twice + concentrated/sparse split of the rest, block-wise error "
      "propagation (Aaronhuang-778/BiLLM)";
  schema.params = {
      {"mode", ParamType::string, std::string("faithful"),
       "faithful: the reference code; paper: every paper-vs-code item the paper's way (binarizer plain, "
       "salience_scale inverse, search_on weights, breakpoints max_fraction, k in 3..30, search orders 1); "
       "see docs/methods/billm.md",
       {}, {}, {"faithful", "paper"}},
      {"salient_metric", ParamType::string, std::string("hessian"),
       "salience: hessian w^2/U_jj^2 (README and run.sh) or magnitude (signed w, the code's argparse default)", {}, {},
       {"hessian", "magnitude"}},
      {"block_size", ParamType::integer, std::int64_t{128}, "columns per block (binarization group and propagation block)",
       1.0, 1048576.0, {}},
      {"min_salient", ParamType::integer, std::int64_t{0},
       "fewest salient columns per block searched; 0: the mode's default (faithful 1, paper 3)", 0.0, 1048576.0, {}},
      {"max_salient", ParamType::integer, std::int64_t{0},
       "most salient columns per block searched; 0: the mode's default (faithful 49, paper 30)", 0.0, 1048576.0, {}},
      {"search_salient_order", ParamType::integer, std::int64_t{0},
       "residual order of the salient side inside the column search; 0: the mode's default (faithful 2, paper 1)", 0.0,
       8.0, {}},
      {"search_rest_order", ParamType::integer, std::int64_t{0},
       "residual order of the other side inside the column search; 0: the mode's default (faithful 2, paper 1)", 0.0,
       8.0, {}},
      {"split_min", ParamType::real, 0.10, "lowest break-point level (a quantile level, or a fraction of max abs(W) with max_fraction)",
       0.0, 1.0, {}},
      {"split_max", ParamType::real, 0.90, "highest break-point level", 0.0, 1.0, {}},
      {"split_points", ParamType::integer, std::int64_t{81}, "break-point levels, evenly spaced in [split_min, split_max]",
       1.0, 100000.0, {}},
      {"binarizer", ParamType::string, std::string("auto"),
       "mean_shift: mu + alpha*sgn(w - mu), sgn(0) = 0 (code); plain: alpha*sgn(w), sgn(0) = +1 (paper Eq. 1); "
       "auto: the mode's",
       {}, {}, {"auto", "mean_shift", "plain"}},
      {"salience_scale", ParamType::string, std::string("auto"),
       "hessian salience denominator: cholesky w^2/U_jj^2 (code) or inverse w^2/[H^-1]_jj^2 (paper's formula); "
       "auto: the mode's",
       {}, {}, {"auto", "cholesky", "inverse"}},
      {"search_on", ParamType::string, std::string("auto"),
       "what the column and break-point searches binarize: salience S (code) or weights W (paper); auto: the mode's",
       {}, {}, {"auto", "salience", "weights"}},
      {"breakpoints", ParamType::string, std::string("auto"),
       "break-point candidates: quantiles of abs(S) incl. salient zeros, concentrated abs(s) < p (code), or "
       "max_fraction: level * max abs(W), concentrated abs(w) <= p (paper); auto: the mode's",
       {}, {}, {"auto", "quantiles", "max_fraction"}},
      ptqlab::param_rows::percdamp(),
      ptqlab::param_rows::disable_gptq(),
      {"log_inputs", ParamType::boolean, false,
       "with log_tensors: also log each linear's incoming weight (weight_in), Hessian (hessian, float32) and "
       "quantized weight (weight_out)", {}, {},
       {}},
  };
  registrar->add_quantizer(schema, [](const ptqlab::Params& p) { return std::make_unique<Billm>(p); });
}
