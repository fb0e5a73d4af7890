// Mask "activation-channels": PTQ1.61's structured 1-D mask. Input channels whose FP activation
// magnitude (max |x| over all calibration tokens by default, as the code does; mean |x| as the
// pseudocode says) is in the top `ratio` are salient: whole columns of [out, in]. Linears that
// share an input (q/k/v, gate/up) get the same mask because they share the statistic.
#include "ptqlab/quant/activation_channels.hpp"

namespace {

class ActivationChannels : public ptqlab::Mask {
 public:
  explicit ActivationChannels(const ptqlab::Params& p) : ratio_(p.get_real("ratio")), statistic_(p.get_string("statistic")) {}
  bool needs_input_stats() const override { return true; }
  std::optional<ptqlab::MaskPrediction> predict(Eigen::Index, Eigen::Index cols) const override {
    return ptqlab::MaskPrediction{ptqlab::SalientMask::Shape::channels,
                                  ptqlab::ptq161::predicted_channel_count(cols, ratio_), static_cast<double>(cols)};
  }
  ptqlab::SalientMask select(const ptqlab::LinearContext& ctx, const ptqlab::Matrix& weight) override {
    auto m = ptqlab::ptq161::activation_channel_mask(ptqlab::ptq161::channel_statistic(ctx.input_stats(), statistic_),
                                                     weight.rows(), ratio_);
    if (ctx.log != nullptr && ctx.log->enabled()) {
      ptqlab::Matrix row(1, m.cols);
      for (Eigen::Index j = 0; j < m.cols; ++j) row(0, j) = m.salient[j];
      ctx.log->tensor(ctx.log_prefix + "/mask", row);
    }
    return m;
  }

 private:
  double ratio_;
  std::string statistic_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema schema;
  schema.name = "activation-channels";
  schema.description = "PTQ1.61's 1-D mask: input channels with the largest FP activation magnitude (whole columns)";
  schema.params = {
      {"ratio", ptqlab::ParamType::real, 0.2, "salient fraction of input channels (threshold at sorted position floor(ratio*n))",
       0.0, 1.0, {}},
      {"statistic", ptqlab::ParamType::string, std::string("max"),
       "per-channel activation statistic: max |x| (the code) or mean |x| (the pseudocode)", {}, {}, {"max", "mean"}},
  };
  registrar->add_mask(schema, [](const ptqlab::Params& p) { return std::make_unique<ActivationChannels>(p); });
}
