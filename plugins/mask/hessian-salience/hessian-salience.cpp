// Mask "hessian-salience": BiLLM's structural column salience (research/baselines.md §2.3–2.4
// (A)) made reusable: whole input columns chosen by their total OBS salience
//   colscore_j = Σ_r w_rj² / U_jj²,
// U the upper Cholesky factor of (H + λI)⁻¹ from prepare_inverse_hessian (dead input columns
// zeroed first). The top `columns` columns (or round(ratio · cols) when columns = 0) are salient,
// over the whole matrix or, with block_size > 0, in every block of block_size input columns (the
// count applies per block then). Ties go to the lower column index.
//
// BiLLM itself does not use a fixed count: inside its quantizer it re-scores every 128-column
// block from the already-compensated weights and searches the count (1…49) that minimises the
// order-2 binarization error of the salience matrix. This plugin is the column-salience criterion
// only, computed once from the original weights, for use by other quantizers (docs/methods/masks.md).
#include "ptqlab/engine/param_rows.hpp"
#include "ptqlab/quant/salience.hpp"

namespace {

using Eigen::Index;

class HessianSalienceMask : public ptqlab::Mask {
 public:
  explicit HessianSalienceMask(const ptqlab::Params& p)
      : ratio_(p.get_real("ratio")),
        columns_(p.get_int("columns")),
        block_(p.get_int("block_size")),
        percdamp_(p.get_real("percdamp")),
        encoding_(ptqlab::salience::parse_encoding(p.get_string("encoding"))) {}

  bool needs_hessian() const override { return true; }

  // The count is fixed by the parameters (columns, or round(ratio · n) per block), not the data.
  std::optional<ptqlab::MaskPrediction> predict(Index, Index cols) const override {
    std::int64_t k = 0;
    for (Index b0 = 0; b0 < cols; b0 += step(cols)) k += per_block(std::min(b0 + step(cols), cols) - b0);
    return ptqlab::MaskPrediction{ptqlab::SalientMask::Shape::channels, k,
                                  ptqlab::salience::storage_bits(ptqlab::SalientMask::Shape::channels, 0, cols, k, encoding_)};
  }

  ptqlab::SalientMask select(const ptqlab::LinearContext& ctx, const ptqlab::Matrix& weight) override {
    const auto prepared = ptqlab::salience::prepare(ctx, weight, percdamp_);
    const Eigen::VectorXd inv_u2 = ptqlab::salience::inverse_u_diag_squared(prepared.factor->U);
    const Index cols = weight.cols();
    Eigen::VectorXd score(cols);
    for (Index j = 0; j < cols; ++j)
      score(j) = prepared.weight.col(j).cast<double>().squaredNorm() * inv_u2(j);

    ptqlab::SalientMask mask;
    mask.shape = ptqlab::SalientMask::Shape::channels;
    mask.rows = weight.rows();
    mask.cols = cols;
    mask.salient.assign(static_cast<std::size_t>(cols), 0);
    std::vector<Index> order;
    for (Index b0 = 0; b0 < cols; b0 += step(cols)) {
      const Index b1 = std::min(b0 + step(cols), cols), n = b1 - b0;
      const Index k = per_block(n);
      order.resize(static_cast<std::size_t>(n));
      std::iota(order.begin(), order.end(), b0);
      std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return score(a) > score(b); });
      for (Index i = 0; i < k; ++i) mask.salient[static_cast<std::size_t>(order[static_cast<std::size_t>(i)])] = 1;
    }
    mask.storage_bits = ptqlab::salience::storage_bits(mask, encoding_);
    ptqlab::salience::log_mask(ctx, mask);
    return mask;
  }

 private:
  Index step(Index cols) const { return block_ > 0 ? block_ : std::max<Index>(cols, 1); }
  // Salient columns in a block of n.
  Index per_block(Index n) const {
    return std::min<Index>(n, columns_ > 0 ? columns_ : static_cast<Index>(std::llround(ratio_ * static_cast<double>(n))));
  }

  double ratio_;
  Index columns_, block_;
  double percdamp_;
  ptqlab::salience::Encoding encoding_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema schema;
  schema.name = "hessian-salience";
  schema.description =
      "channel mask: the input columns with the largest sum_r w^2 / U_jj^2 (BiLLM's structural column salience)";
  schema.params = {
      {"ratio", ptqlab::ParamType::real, 0.1,
       "salient fraction of input columns: round(ratio * cols) columns (per block with block_size > 0)", 0.0, 1.0, {}},
      {"columns", ptqlab::ParamType::integer, std::int64_t{0},
       "salient column count (per block with block_size > 0); 0: use ratio", 0.0, 1048576.0, {}},
      {"block_size", ptqlab::ParamType::integer, std::int64_t{-1},
       "choose the columns in every block of this many input columns (BiLLM: 128); -1: over the whole matrix", -1.0,
       1048576.0, {}},
      ptqlab::param_rows::percdamp(),
      {"encoding", ptqlab::ParamType::string, std::string("bitmap"),
       "storage counted in the ledger: bitmap (1 bit per input column) or csr (a list of column indices)", {}, {},
       {"bitmap", "csr"}},
  };
  registrar->add_mask(schema, [](const ptqlab::Params& p) { return std::make_unique<HessianSalienceMask>(p); });
}
