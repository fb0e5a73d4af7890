// Quantizer "arbllm": ARB-LLM (Li et al., ICLR 2025) as in ZHITENGLI/ARB-LLM (research/arbllm.md;
// docs/methods/arbllm.md). BiLLM's block algorithm (salient columns, break-point split, block-wise
// compensation; the billm plugin's pieces) with alternating refined binarizers: `method: arb`
// (μ, α, signs refined), `arb-x` (plus input-weighted sweeps of μ, α and an input-weighted
// break-point search), `arb-rc` (row × column scales, no μ); `order2_group` (CGB) splits the
// salient columns by magnitude too. The paper's ARB-LLM_X = arb-x + CGB, ARB-LLM_RC = arb-rc + CGB.
#include <fmt/format.h>

#include "arbllm_algo.hpp"
#include "ptqlab/engine/param_rows.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/quant/gptq.hpp"
#include "ptqlab/support/error.hpp"

namespace {

using Eigen::Index;
namespace arbllm = ptqlab::arbllm;

arbllm::Options options_from(const ptqlab::Params& p) {
  arbllm::Options o;
  const auto& m = p.get_string("method");
  o.method = m == "arb-x" ? arbllm::Method::arb_x : m == "arb-rc" ? arbllm::Method::arb_rc : arbllm::Method::arb;
  o.order2_group = p.get_bool("order2_group");
  o.metric = p.get_string("salient_metric") == "magnitude" ? ptqlab::billm::Metric::magnitude
                                                            : ptqlab::billm::Metric::hessian;
  o.block_size = p.get_int("block_size");
  o.min_salient = static_cast<int>(p.get_int("min_salient"));
  o.max_salient = static_cast<int>(p.get_int("max_salient"));
  o.split_min = p.get_real("split_min");
  o.split_max = p.get_real("split_max");
  o.split_points = static_cast<int>(p.get_int("split_points"));
  o.disable_gptq = p.get_bool("disable_gptq");
  o.refine.iterations = static_cast<int>(p.get_int("iterations"));
  o.refine.x_iterations = static_cast<int>(p.get_int("x_iterations"));
  o.refine.eps = p.get_real("eps");
  o.refine.x_eps = p.get_real("x_eps");
  o.refine.x_from_init = p.get_string("x_schedule") == "paper";
  if (o.min_salient > o.max_salient)
    throw ptqlab::Error(fmt::format("arbllm: min_salient ({}) is larger than max_salient ({})", o.min_salient, o.max_salient));
  if (o.split_min > o.split_max)
    throw ptqlab::Error(fmt::format("arbllm: split_min ({}) is larger than split_max ({})", o.split_min, o.split_max));
  if (p.get_int("num_p") != 1)
    throw ptqlab::Error(fmt::format("arbllm: num_p {} is not implemented (only 1, the published runs' value)",
                                    p.get_int("num_p")));
  return o;
}

class ArbLlm : public ptqlab::Quantizer {
 public:
  explicit ArbLlm(const ptqlab::Params& p) : opts_(options_from(p)), percdamp_(p.get_real("percdamp")) {}

  bool needs_hessian() const override { return true; }

  ptqlab::BitCount quantize_linear(const ptqlab::LinearContext& ctx, ptqlab::Matrix& w) override {
    const std::string what = fmt::format("layer {} {}", ctx.layer, ptqlab::linear_name(ctx.which));
    if (!ctx.hessian) throw ptqlab::Error(what + ": arbllm needs the calibration Hessian");
    const Eigen::MatrixXd& H = ctx.hessian();
    const auto factor_ptr = ptqlab::inverse_hessian_factor(ctx, w, percdamp_, what);  // shared by q/k/v, gate/up
    const auto& factor = *factor_ptr;
    if (ctx.log != nullptr && factor.retries > 0) ctx.log->series(ctx.log_prefix + "/percdamp", {factor.percdamp});
    const auto blocks = arbllm::quantize_weight(w, factor.U, &H, opts_);

    std::vector<int> salient;
    for (const auto& b : blocks) salient.push_back(b.salient);
    if (ctx.log != nullptr && ctx.log->enabled()) {
      const auto nblocks = static_cast<Index>(blocks.size());
      ptqlab::Matrix cols = ptqlab::Matrix::Zero(1, w.cols()), breakpoints(1, nblocks), salient_bp(1, nblocks);
      for (std::size_t i = 0; i < blocks.size(); ++i) {
        for (Index j = blocks[i].b0; j < blocks[i].b1; ++j) cols(0, j) = blocks[i].salient_columns[j - blocks[i].b0];
        breakpoints(0, static_cast<Index>(i)) = blocks[i].breakpoint;
        salient_bp(0, static_cast<Index>(i)) = blocks[i].salient_breakpoint;
      }
      ctx.log->tensor(ctx.log_prefix + "/salient_columns", cols);
      ctx.log->tensor(ctx.log_prefix + "/breakpoints", breakpoints);
      if (opts_.order2_group) ctx.log->tensor(ctx.log_prefix + "/salient_breakpoints", salient_bp);
    }
    return arbllm::ledger(w.rows(), w.cols(), opts_.block_size, salient, opts_.method, opts_.order2_group);
  }

 private:
  arbllm::Options opts_;
  double percdamp_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  using ptqlab::ParamType;
  ptqlab::ComponentSchema schema;
  schema.name = "arbllm";
  schema.description =
      "ARB-LLM: BiLLM's salient columns and break-point split with alternating refined binarizers (arb, arb-x, "
      "arb-rc) and the column-group bitmap (ZHITENGLI/ARB-LLM)";
  schema.params = {
      {"method", ParamType::string, std::string("arb"),
       "arb: refine mu, alpha, signs; arb-x: arb plus input-weighted sweeps and break-point search; arb-rc: row x "
       "column scales, no mu (the code's low_quant_method)",
       {}, {}, {"arb", "arb-x", "arb-rc"}},
      {"order2_group", ParamType::boolean, false,
       "CGB: split the salient columns by abs(S) into two order-2 groups (--order2_group; the paper's ARB-LLM_X/RC)",
       {}, {}, {}},
      {"num_p", ParamType::integer, std::int64_t{1},
       "break-points per region (--num_p); only 1 (the published runs) is implemented", 1.0, 1.0, {}},
      {"salient_metric", ParamType::string, std::string("hessian"),
       "salience: hessian w^2/U_jj^2 (the README's runs) or magnitude (signed w, the code's argparse default)", {}, {},
       {"hessian", "magnitude"}},
      {"block_size", ParamType::integer, std::int64_t{128},
       "columns per block (binarization group and propagation block, --blocksize)", 1.0, 1048576.0, {}},
      {"min_salient", ParamType::integer, std::int64_t{1}, "fewest salient columns per block searched", 1.0, 1048576.0,
       {}},
      {"max_salient", ParamType::integer, std::int64_t{49},
       "most salient columns per block searched (the code's up_lim 50 gives 1..49)", 1.0, 1048576.0, {}},
      {"split_min", ParamType::real, 0.10, "lowest break-point quantile level (both break-point searches)", 0.0, 1.0,
       {}},
      {"split_max", ParamType::real, 0.90, "highest break-point quantile level", 0.0, 1.0, {}},
      {"split_points", ParamType::integer, std::int64_t{81}, "break-point levels, evenly spaced in [split_min, split_max]",
       1.0, 100000.0, {}},
      {"iterations", ParamType::integer, std::int64_t{15},
       "alternating refinement iterations of arb / arb-rc (hard-coded 15 in the code); 0: BiLLM's binarizer", 0.0,
       10000.0, {}},
      {"x_iterations", ParamType::integer, std::int64_t{15},
       "arb-x: input-weighted sweeps of mu and alpha after the refinement (iter2 = 15)", 0.0, 10000.0, {}},
      {"x_schedule", ParamType::string, std::string("code"),
       "arb-x: code = the sweeps follow the full arb refinement; paper = they start from the initial binarization "
       "(paper Fig. 4)",
       {}, {}, {"code", "paper"}},
      {"eps", ParamType::real, 1e-8, "added to the arb alpha and arb-rc scale denominators", 0.0, 1.0, {}},
      {"x_eps", ParamType::real, 1e-10, "added to the arb-x denominators", 0.0, 1.0, {}},
      ptqlab::param_rows::percdamp(),
      ptqlab::param_rows::disable_gptq(),
  };
  registrar->add_quantizer(schema, [](const ptqlab::Params& p) { return std::make_unique<ArbLlm>(p); });
}
