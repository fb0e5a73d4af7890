// Quantizer "fp": leaves weights unchanged. The full-precision baseline row of every table.
#include "ptqlab/engine/plugin.hpp"

namespace {

class FullPrecision : public ptqlab::Quantizer {
 public:
  ptqlab::BitCount quantize_linear(const ptqlab::LinearContext&, ptqlab::Matrix& weight) override {
    return *predict_bits(weight.rows(), weight.cols(), nullptr);
  }
  std::optional<ptqlab::BitCount> predict_bits(Eigen::Index rows, Eigen::Index cols,
                                               const ptqlab::MaskPrediction*) const override {
    // Counted as FP16 storage, the convention of the "FP16" rows in PTQ papers.
    ptqlab::BitCount bits;
    bits.weights = rows * cols;
    bits.payload = 16.0 * static_cast<double>(rows * cols);
    bits.paper = bits.payload;
    return bits;
  }
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema schema;
  schema.name = "fp";
  schema.description = "no quantization (weights unchanged; counted as FP16, 16 bits per weight)";
  registrar->add_quantizer(schema, [](const ptqlab::Params&) { return std::make_unique<FullPrecision>(); });
}
