// Quantizer "rtn": round-to-nearest onto a uniform grid, per output row or per group of input
// columns. The grid is GPTQ's Quantizer.find_params (baselines.md §1.5), the RTN rows of the GPTQ,
// BiLLM and PB-LLM papers:
//   asymmetric: range [min(0, min w), max(0, max w)] (or [-1, 1] if both are 0),
//               scale = (hi - lo) / (2^b - 1), zero = round(-lo / scale)
//   symmetric:  hi = max(|lo|, hi), lo = -hi (when lo < 0), zero = (2^b - 1 + 1) / 2
//   q = scale * (clamp(round(w / scale) + zero, 0, 2^b - 1) - zero), round half to even.
#include <cmath>

#include "ptqlab/engine/param_rows.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/quant/gptq.hpp"

namespace {

using ptqlab::Matrix;

class RoundToNearest : public ptqlab::Quantizer {
 public:
  explicit RoundToNearest(const ptqlab::Params& p)
      : bits_(static_cast<int>(p.get_int("bits"))),
        group_size_(p.get_int("group_size")),
        symmetric_(p.get_bool("symmetric")) {}

  std::optional<ptqlab::BitCount> predict_bits(Eigen::Index rows, Eigen::Index cols,
                                               const ptqlab::MaskPrediction*) const override {
    return ptqlab::uniform_grid_ledger(rows, cols, bits_, group_size_, symmetric_);
  }

  ptqlab::BitCount quantize_linear(const ptqlab::LinearContext&, Matrix& w) override {
    const Eigen::Index cols = w.cols();
    const Eigen::Index group = group_size_ > 0 ? std::min<Eigen::Index>(group_size_, cols) : cols;
    ptqlab::UniformGrid grid(bits_, symmetric_);
    for (Eigen::Index c0 = 0; c0 < cols; c0 += group) {
      const Eigen::Index n = std::min(group, cols - c0);
      auto g = w.middleCols(c0, n);
      grid.fit(g);
      for (Eigen::Index r = 0; r < g.rows(); ++r)
        for (Eigen::Index c = 0; c < n; ++c) g(r, c) = grid.quantize(r, g(r, c));
    }
    return ptqlab::uniform_grid_ledger(w.rows(), cols, bits_, group_size_, symmetric_);
  }

 private:
  int bits_;
  std::int64_t group_size_;
  bool symmetric_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema schema;
  schema.name = "rtn";
  schema.description = "round-to-nearest uniform quantization, per output row or per group (GPTQ's grid)";
  schema.params = {
      ptqlab::param_rows::bits(),
      ptqlab::param_rows::weight_group_size(),
      {"symmetric", ptqlab::ParamType::boolean, false, "symmetric grid with a fixed zero point", {}, {}, {}},
  };
  registrar->add_quantizer(schema, [](const ptqlab::Params& p) { return std::make_unique<RoundToNearest>(p); });
}
