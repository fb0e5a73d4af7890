// Mask "hessian-elementwise": PB-LLM's Hessian salience (research/baselines.md §3.2,
// salient_metric hessian): score_rj = w_rj² / U_jj², U the upper Cholesky factor of
// (H + λI)⁻¹ from prepare_inverse_hessian (dead input columns zeroed first, λ = percdamp ·
// mean(diag H)). The top `ratio` of scores are salient, by PB-LLM's rule on each group of input
// columns (one threshold over all rows): τ = ascending sorted score at floor(n · (1 - ratio)),
// salient = score > τ. U_jj² is the conditional [H⁻¹]_jj, so this is the OBS salience
// w² / [H_F⁻¹]_jj (not w² / ([H⁻¹]_jj)², the papers' notation). See docs/methods/masks.md.
#include "ptqlab/engine/param_rows.hpp"
#include "ptqlab/quant/salience.hpp"

namespace {

using Eigen::Index;

class HessianElementwiseMask : public ptqlab::Mask {
 public:
  explicit HessianElementwiseMask(const ptqlab::Params& p)
      : ratio_(p.get_real("ratio")),
        group_(p.get_int("group_size")),
        percdamp_(p.get_real("percdamp")),
        encoding_(ptqlab::salience::parse_encoding(p.get_string("encoding"))) {}

  bool needs_hessian() const override { return true; }

  std::optional<ptqlab::MaskPrediction> predict(Index rows, Index cols) const override {
    return ptqlab::salience::predicted_threshold_mask(rows, cols, 1.0 - ratio_, group_, encoding_);
  }

  ptqlab::SalientMask select(const ptqlab::LinearContext& ctx, const ptqlab::Matrix& weight) override {
    const auto prepared = ptqlab::salience::prepare(ctx, weight, percdamp_);
    const auto scores =
        ptqlab::salience::element_scores(prepared.weight, ptqlab::salience::inverse_u_diag_squared(prepared.factor->U));
    auto mask = ptqlab::salience::threshold_mask(scores, 1.0 - ratio_, group_);
    mask.storage_bits = ptqlab::salience::storage_bits(mask, encoding_);
    ptqlab::salience::log_mask(ctx, mask);
    return mask;
  }

 private:
  double ratio_;
  Index group_;
  double percdamp_;
  ptqlab::salience::Encoding encoding_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema schema;
  schema.name = "hessian-elementwise";
  schema.description = "element-wise salient mask: the top `ratio` of weights by w^2 / U_jj^2 (PB-LLM's Hessian salience)";
  schema.params = {
      ptqlab::param_rows::element_salient_ratio(),
      ptqlab::param_rows::threshold_group_size(),
      ptqlab::param_rows::percdamp(),
      ptqlab::param_rows::element_mask_encoding(),
  };
  registrar->add_mask(schema, [](const ptqlab::Params& p) { return std::make_unique<HessianElementwiseMask>(p); });
}
