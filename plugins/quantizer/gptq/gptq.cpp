// Quantizer "gptq": GPTQ (Frantar et al. 2023) as in IST-DASLab/gptq (research/baselines.md §1):
// uniform per-row grid (optionally per group of input columns), columns quantized one by one with
// OBS error feedback through the upper Cholesky factor of H⁻¹, lazy block updates, optional
// act-order, dampening percdamp · mean(diag H) (increased automatically if H is not positive
// definite).
#include <algorithm>
#include <numeric>

#include <fmt/format.h>

#include "ptqlab/engine/param_rows.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/quant/gptq.hpp"

namespace {

using Eigen::Index;
using ptqlab::MatrixCM;

class GridColumns : public ptqlab::ColumnQuantizer {
 public:
  GridColumns(int bits, bool symmetric, Index group) : grid_(bits, symmetric), group_(group) {}

  void begin_block(Index b0, Index, const MatrixCM& rows) override {
    if (group_ <= 0 && b0 == 0) grid_.fit(rows);  // per-channel: one grid from the whole row, once
  }
  void quantize_column(Index col, const MatrixCM& rows, const Eigen::VectorXf& w, Eigen::VectorXf& q) override {
    // Groups: refit when a group starts, from the next `group` columns as they stand now.
    if (group_ > 0 && col % group_ == 0) grid_.fit(rows.middleCols(col, std::min(group_, rows.cols() - col)));
    for (Index r = 0; r < w.size(); ++r) q(r) = grid_.quantize(r, w(r));
  }

 private:
  ptqlab::UniformGrid grid_;
  Index group_;
};

class Gptq : public ptqlab::Quantizer {
 public:
  explicit Gptq(const ptqlab::Params& p)
      : bits_(static_cast<int>(p.get_int("bits"))),
        group_(p.get_int("group_size")),
        symmetric_(p.get_bool("symmetric")),
        act_order_(p.get_bool("act_order")),
        block_size_(static_cast<int>(p.get_int("block_size"))),
        percdamp_(p.get_real("percdamp")) {}

  bool needs_hessian() const override { return true; }

  ptqlab::BitCount quantize_linear(const ptqlab::LinearContext& ctx, ptqlab::Matrix& w) override {
    const std::string what = fmt::format("layer {} {}", ctx.layer, ptqlab::linear_name(ctx.which));
    std::vector<Index> order;
    if (act_order_) {
      // The permuted Hessian is this linear's own: its factor is not shared.
      Eigen::MatrixXd H = ctx.hessian();
      // Columns by descending diag(H) (stable, so ties keep their index order).
      order.resize(w.cols());
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return H(a, a) > H(b, b); });
      Eigen::MatrixXd P(H.rows(), H.cols());
      for (Index i = 0; i < H.rows(); ++i)
        for (Index j = 0; j < H.cols(); ++j) P(i, j) = H(order[i], order[j]);
      H = std::move(P);
      // Dead columns are found on the permuted Hessian; zero the matching original columns.
      ptqlab::Matrix permuted(w.rows(), w.cols());
      for (Index k = 0; k < w.cols(); ++k) permuted.col(k) = w.col(order[k]);
      const auto factor = ptqlab::prepare_inverse_hessian(H, permuted, percdamp_, what);
      for (Index k = 0; k < w.cols(); ++k) w.col(order[k]) = permuted.col(k);
      record(ctx, factor);
      run(w, factor.U, order);
    } else {
      const auto factor = ptqlab::inverse_hessian_factor(ctx, w, percdamp_, what);  // shared by q/k/v, gate/up
      record(ctx, *factor);
      run(w, factor->U, order);
    }

    return ledger(w.rows(), w.cols());
  }

  std::optional<ptqlab::BitCount> predict_bits(Index rows, Index cols, const ptqlab::MaskPrediction*) const override {
    return ledger(rows, cols);
  }

 private:
  ptqlab::BitCount ledger(Index rows, Index cols) const {
    auto b = ptqlab::uniform_grid_ledger(rows, cols, bits_, group_, symmetric_);
    // act-order with groups needs each input column's group index (g_idx, int32) to dequantize.
    b.masks = act_order_ && group_ > 0 ? 32.0 * static_cast<double>(cols) : 0.0;
    return b;
  }

  void run(ptqlab::Matrix& w, const Eigen::MatrixXd& U, const std::vector<Index>& order) const {
    const int bits = bits_;
    const bool sym = symmetric_;
    const Index group = group_;
    ptqlab::gptq_column_loop(w, U, block_size_,
                             [=](Index, Index) { return std::make_unique<GridColumns>(bits, sym, group); }, order);
  }

  static void record(const ptqlab::LinearContext& ctx, const ptqlab::InverseHessianFactor& f) {
    if (ctx.log != nullptr && f.retries > 0) ctx.log->series(ctx.log_prefix + "/percdamp", {f.percdamp});
  }

  int bits_;
  Index group_;
  bool symmetric_, act_order_;
  int block_size_;
  double percdamp_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema schema;
  schema.name = "gptq";
  schema.description = "GPTQ: OBS column-by-column quantization with lazy block updates (IST-DASLab/gptq)";
  schema.params = {
      ptqlab::param_rows::bits(),
      ptqlab::param_rows::weight_group_size(),
      {"symmetric", ptqlab::ParamType::boolean, false, "symmetric grid (--sym)", {}, {}, {}},
      {"act_order", ptqlab::ParamType::boolean, false, "process columns by descending diag(H) (--act-order)", {}, {}, {}},
      {"block_size", ptqlab::ParamType::integer, std::int64_t{128}, "columns per lazy-update block", 1.0, 1048576.0, {}},
      ptqlab::param_rows::percdamp(),
  };
  registrar->add_quantizer(schema, [](const ptqlab::Params& p) { return std::make_unique<Gptq>(p); });
}
