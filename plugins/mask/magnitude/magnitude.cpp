// Mask "magnitude": PB-LLM's magnitude salience (research/baselines.md §3.2, salient_metric
// magnitude): the weights with the largest |w| of the layer are salient. The threshold is PB-LLM's
// rule on each group of input columns (the whole matrix by default), one threshold over all rows:
// τ = ascending sorted |w| at position floor(n · (1 - ratio)), salient = |w| > τ.
// Dead input columns (H_jj == 0 on the calibration data) rank as 0, because the code zeroes them
// before computing the mask. See docs/methods/masks.md.
#include "ptqlab/engine/param_rows.hpp"
#include "ptqlab/quant/salience.hpp"

namespace {

using Eigen::Index;

class MagnitudeMask : public ptqlab::Mask {
 public:
  explicit MagnitudeMask(const ptqlab::Params& p)
      : ratio_(p.get_real("ratio")),
        group_(p.get_int("group_size")),
        encoding_(ptqlab::salience::parse_encoding(p.get_string("encoding"))) {}

  std::optional<ptqlab::MaskPrediction> predict(Index rows, Index cols) const override {
    return ptqlab::salience::predicted_threshold_mask(rows, cols, 1.0 - ratio_, group_, encoding_);
  }

  ptqlab::SalientMask select(const ptqlab::LinearContext& ctx, const ptqlab::Matrix& weight) override {
    ptqlab::Matrix w = weight;
    if (ctx.hessian) {
      const Eigen::MatrixXd& H = ctx.hessian();
      if (H.rows() == w.cols())
        for (Index j = 0; j < w.cols(); ++j)
          if (H(j, j) == 0.0) w.col(j).setZero();
    }
    auto mask = ptqlab::salience::threshold_mask(ptqlab::salience::element_scores(w, {}), 1.0 - ratio_, group_);
    mask.storage_bits = ptqlab::salience::storage_bits(mask, encoding_);
    ptqlab::salience::log_mask(ctx, mask);
    return mask;
  }

 private:
  double ratio_;
  Index group_;
  ptqlab::salience::Encoding encoding_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema schema;
  schema.name = "magnitude";
  schema.description = "element-wise salient mask: the top `ratio` of weights by magnitude abs(w) (PB-LLM's magnitude salience)";
  schema.params = {
      ptqlab::param_rows::element_salient_ratio(),
      ptqlab::param_rows::threshold_group_size(),
      ptqlab::param_rows::element_mask_encoding(),
  };
  registrar->add_mask(schema, [](const ptqlab::Params& p) { return std::make_unique<MagnitudeMask>(p); });
}
