// Quantizer "sign": plain binarization, W ≈ α_i · sign(W_ij) with one scale per output row,
// α_i = mean_j |W_ij| (the closed-form L2-optimal scale for fixed signs; XNOR-Net, and the "sign"
// mode of BiLLM's binary.py). It is also the complete example of docs/plugins.md.
#include <cmath>

#include "ptqlab/engine/plugin.hpp"

namespace {

class SignQuantizer : public ptqlab::Quantizer {
 public:
  explicit SignQuantizer(const ptqlab::Params& p) : center_(p.get_bool("center")) {}

  ptqlab::BitCount quantize_linear(const ptqlab::LinearContext& ctx, ptqlab::Matrix& w) override {
    for (Eigen::Index r = 0; r < w.rows(); ++r) {
      auto row = w.row(r);
      // With centring, binarize around the row mean μ: W ≈ α·sign(W - μ) + μ.
      const float mu = center_ ? row.mean() : 0.0f;
      const float alpha = (row.array() - mu).abs().mean();
      for (Eigen::Index c = 0; c < row.size(); ++c) row(c) = (row(c) - mu >= 0.0f ? alpha : -alpha) + mu;
    }
    if (ctx.log != nullptr && ctx.log->enabled()) ctx.log->tensor(ctx.log_prefix + "/weight", w);

    return *predict_bits(w.rows(), w.cols(), nullptr);
  }

  std::optional<ptqlab::BitCount> predict_bits(Eigen::Index rows, Eigen::Index cols,
                                               const ptqlab::MaskPrediction*) const override {
    ptqlab::BitCount bits;
    bits.weights = rows * cols;
    bits.payload = static_cast<double>(rows * cols);                 // one sign bit per weight
    bits.scales = 16.0 * static_cast<double>(rows);                  // FP16 α per row
    bits.zeros = center_ ? 16.0 * static_cast<double>(rows) : 0.0;  // FP16 μ per row
    bits.paper = bits.payload;                                       // "1 bit"
    return bits;
  }

 private:
  bool center_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema schema;
  schema.name = "sign";
  schema.description = "binarization with one scale per row: alpha * sign(W), alpha = mean |W|";
  schema.params = {
      {"center", ptqlab::ParamType::boolean, false, "binarize around the row mean (adds an FP16 mean per row)", {}, {}, {}},
  };
  registrar->add_quantizer(schema, [](const ptqlab::Params& p) { return std::make_unique<SignQuantizer>(p); });
}
