// Quantizer "pbllm": PB-GPTQ, the post-training method of PB-LLM (Shang et al., ICLR 2024) as in
// hahnyuan/PB-LLM gptq_pb/ (research/baselines.md §3). Each weight is either salient, kept on a
// `high_bits` per-row min-max grid, or binarized with a per-row (per-group) mean-shifted sign
// binarizer; GPTQ's column loop compensates every rounding error (salient ones included).
//
//   mask:      the arm's mask if it has one, else PB-LLM's own element mask: scores |w|
//              (magnitude) or w² / U_jj² (hessian), one threshold per column group,
//              τ = sorted[floor(n · low_frac)], salient = score > τ (computed once, from the
//              original weights with dead columns zeroed, fixed during the sweep);
//   high:      asymmetric per-row grid of GPTQ's find_params at high_bits, fitted once on the whole
//              original row (every weight, not only the salient ones), applied to compensated
//              weights (which are clamped to it);
//   binarizer: μ, α per row and column group, fitted once before the sweep on V = W ⊙ binarized
//              (salient entries zeroed): μ = mean_j V_rj, α = mean_j |V_rj − μ| over all columns
//              of the group (binary_stats: zeroed_row, the code), or over the binarized entries
//              only (binary_stats: binarized_only, the paper's Eq. 9); q = μ + α · sgn(w − μ),
//              sgn(0) = 0;
//   sweep:     gptq_column_loop (full in-block OBS updates + lazy block GEMM), or no compensation
//              with disable_gptq (the paper's RTN rows).
// Bits: docs/methods/pbllm.md.
#include <cmath>

#include <fmt/format.h>

#include "ptqlab/engine/param_rows.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/quant/gptq.hpp"
#include "ptqlab/quant/salience.hpp"

namespace {

using Eigen::Index;
using ptqlab::Matrix;
using ptqlab::MatrixCM;

// Everything the per-element quantizer needs, shared read-only by the row chunks.
struct PbParams {
  const ptqlab::SalientMask* mask = nullptr;
  const ptqlab::UniformGrid* grid = nullptr;  // high-precision grid, per row
  Eigen::MatrixXf mu, alpha;                   // binarizer [rows, groups]
  Index group = 0;                             // columns per group (the whole row when <= 0)

  Index group_of(Index col) const { return group > 0 ? col / group : 0; }
  float quantize(Index row, Index col, float w) const {
    if (mask->at(row, col)) return grid->quantize(row, w);
    const Index g = group_of(col);
    const float m = mu(row, g), d = w - m;
    const float s = d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : 0.0f);  // torch.sign
    return m + alpha(row, g) * s;
  }
};

class PbColumns : public ptqlab::ColumnQuantizer {
 public:
  PbColumns(const PbParams& p, Index row0) : p_(p), row0_(row0) {}
  void quantize_column(Index col, const MatrixCM&, const Eigen::VectorXf& w, Eigen::VectorXf& q) override {
    for (Index r = 0; r < w.size(); ++r) q(r) = p_.quantize(row0_ + r, col, w(r));
  }

 private:
  const PbParams& p_;
  Index row0_;
};

class PbLlm : public ptqlab::Quantizer {
 public:
  explicit PbLlm(const ptqlab::Params& p)
      : low_frac_(p.get_real("low_frac")),
        hessian_metric_(p.get_string("salient_metric") == "hessian"),
        high_bits_(static_cast<int>(p.get_int("high_bits"))),
        group_(p.get_int("group_size")),
        block_size_(static_cast<int>(p.get_int("block_size"))),
        percdamp_(p.get_real("percdamp")),
        disable_gptq_(p.get_bool("disable_gptq")),
        binarized_only_(p.get_string("binary_stats") == "binarized_only"),
        encoding_(ptqlab::salience::parse_encoding(p.get_string("mask_encoding"))),
        eq3_(p.get_string("paper_convention") == "eq3") {}

  bool needs_hessian() const override { return true; }

  ptqlab::BitCount quantize_linear(const ptqlab::LinearContext& ctx, Matrix& w) override {
    const std::string what = ptqlab::salience::what(ctx);
    const Index rows = w.rows(), cols = w.cols();

    // The high-precision grid is calibrated on the original weights, before dead columns are
    // zeroed (gptq_pb: high_quantizer.calibrate(W) comes first).
    ptqlab::UniformGrid grid(high_bits_, /*symmetric=*/false);
    grid.fit(w);

    if (!ctx.hessian) throw ptqlab::Error(what + ": pbllm needs the layer's Hessian");
    const auto factor_ptr = ptqlab::inverse_hessian_factor(ctx, w, percdamp_, what);  // zeroes dead columns
    const auto& factor = *factor_ptr;
    if (ctx.log != nullptr && factor.retries > 0) ctx.log->series(ctx.log_prefix + "/percdamp", {factor.percdamp});

    // The salient mask: the arm's, or PB-LLM's own from the weights as they are now.
    ptqlab::SalientMask own;
    const ptqlab::SalientMask* mask = ctx.mask;
    if (mask == nullptr) {
      const Eigen::VectorXd inv_u2 =
          hessian_metric_ ? ptqlab::salience::inverse_u_diag_squared(factor.U) : Eigen::VectorXd();
      own = ptqlab::salience::threshold_mask(ptqlab::salience::element_scores(w, inv_u2), low_frac_, group_);
      own.storage_bits = ptqlab::salience::storage_bits(own, encoding_);
      ptqlab::salience::log_mask(ctx, own);
      mask = &own;
    } else if (mask->rows != rows || mask->cols != cols ||
               mask->salient.size() != static_cast<std::size_t>(
                                           mask->shape == ptqlab::SalientMask::Shape::channels ? cols : rows * cols)) {
      throw ptqlab::Error(fmt::format("{}: the mask is {}x{} but the weight is {}x{}", what, mask->rows, mask->cols,
                                      rows, cols));
    }

    PbParams p;
    p.mask = mask;
    p.grid = &grid;
    p.group = group_ > 0 && group_ < cols ? group_ : 0;
    fit_binarizer(w, *mask, p);

    if (disable_gptq_) {
      for (Index r = 0; r < rows; ++r)
        for (Index c = 0; c < cols; ++c) w(r, c) = p.quantize(r, c, w(r, c));
    } else {
      const double loss = ptqlab::gptq_column_loop(
          w, factor.U, block_size_, [&p](Index row0, Index) { return std::make_unique<PbColumns>(p, row0); });
      if (ctx.log != nullptr) ctx.log->series(ctx.log_prefix + "/gptq_loss", {loss});
    }
    if (ctx.log != nullptr && ctx.log->enabled()) ctx.log->tensor(ctx.log_prefix + "/weight", w);

    return ledger(rows, cols, mask->count(), ctx.mask == nullptr ? own.storage_bits : 0.0);
  }

  std::optional<ptqlab::BitCount> predict_bits(Index rows, Index cols, const ptqlab::MaskPrediction* mask) const override {
    if (mask != nullptr)  // the engine adds the arm mask's storage
      return ledger(rows, cols, mask->shape == ptqlab::SalientMask::Shape::channels ? mask->salient * rows : mask->salient,
                    0.0);
    const auto own = ptqlab::salience::predicted_threshold_mask(rows, cols, low_frac_, group_, encoding_);
    return ledger(rows, cols, own.salient, own.storage_bits);
  }

 private:
  // The ledger (docs/methods/pbllm.md): `salient` weights at high_bits, the rest 1 bit; `own_mask_bits`
  // the own mask's storage (an arm mask's is added by the engine).
  ptqlab::BitCount ledger(Index rows, Index cols, std::int64_t salient, double own_mask_bits) const {
    const std::int64_t n = rows * cols;
    const Index step = group_ > 0 && group_ < cols ? group_ : cols;
    const Index groups_per_row = step > 0 ? std::max<Index>((cols + step - 1) / step, 1) : 1;
    const double groups = static_cast<double>(groups_per_row) * static_cast<double>(rows);
    ptqlab::BitCount b;
    b.weights = n;
    b.payload = static_cast<double>(n - salient) + static_cast<double>(high_bits_) * static_cast<double>(salient);
    b.scales = 16.0 * groups + 16.0 * static_cast<double>(rows);       // FP16 α per group, FP16 grid scale per row
    b.zeros = 16.0 * groups + static_cast<double>(high_bits_) * rows;  // FP16 μ per group, integer grid zero per row
    b.masks = own_mask_bits;
    b.paper = b.payload + (eq3_ ? static_cast<double>(n) : 0.0);  // 1·r_bin + high·r_sal (+1 bitmap, Eq. 3)
    return b;
  }

  // μ, α per row and group from the weights (dead columns zeroed) with salient entries zeroed.
  void fit_binarizer(const Matrix& w, const ptqlab::SalientMask& mask, PbParams& p) const {
    const Index rows = w.rows(), cols = w.cols();
    const Index step = p.group > 0 ? p.group : cols;
    const Index groups = step > 0 ? (cols + step - 1) / step : 1;
    p.mu.setZero(rows, std::max<Index>(groups, 1));
    p.alpha.setZero(rows, std::max<Index>(groups, 1));
    for (Index r = 0; r < rows; ++r)
      for (Index g = 0; g < groups; ++g) {
        const Index c0 = g * step, c1 = std::min(c0 + step, cols);
        double sum = 0, count = 0;
        for (Index c = c0; c < c1; ++c)
          if (!mask.at(r, c)) {
            sum += w(r, c);
            count += 1;
          }
        // zeroed_row: salient entries count as zeros in the mean and the scale.
        const double n = binarized_only_ ? count : static_cast<double>(c1 - c0);
        if (n == 0) continue;
        const float mu = static_cast<float>(sum / n);
        double dev = 0;
        for (Index c = c0; c < c1; ++c) {
          const bool binarized = !mask.at(r, c);
          if (binarized)
            dev += std::abs(static_cast<double>(w(r, c) - mu));
          else if (!binarized_only_)
            dev += std::abs(static_cast<double>(mu));
        }
        p.mu(r, g) = mu;
        p.alpha(r, g) = static_cast<float>(dev / n);
      }
  }

  double low_frac_;
  bool hessian_metric_;
  int high_bits_;
  Index group_;
  int block_size_;
  double percdamp_;
  bool disable_gptq_, binarized_only_;
  ptqlab::salience::Encoding encoding_;
  bool eq3_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema schema;
  schema.name = "pbllm";
  schema.description =
      "PB-GPTQ (PB-LLM): salient weights on a high-bit per-row grid, the rest binarized per row, GPTQ compensation";
  schema.params = {
      {"low_frac", ptqlab::ParamType::real, 0.9,
       "fraction binarized when the arm has no mask (run scripts: 0.9 = 10% salient); threshold at sorted position "
       "floor(n * low_frac)",
       0.0, 1.0, {}},
      {"salient_metric", ptqlab::ParamType::string, std::string("hessian"),
       "own mask's score when the arm has no mask: hessian (w^2 / U_jj^2, the run scripts) or magnitude (abs(w), the "
       "argparse default)",
       {}, {}, {"hessian", "magnitude"}},
      {"high_bits", ptqlab::ParamType::integer, std::int64_t{8}, "bits of the salient weights' per-row min-max grid",
       2.0, 16.0, {}},
      {"group_size", ptqlab::ParamType::integer, std::int64_t{-1},
       "input columns sharing the own mask's threshold and the binarizer's mean/scale; -1: the whole row", -1.0,
       1048576.0, {}},
      {"block_size", ptqlab::ParamType::integer, std::int64_t{128}, "columns per lazy-update block of the GPTQ loop", 1.0,
       1048576.0, {}},
      ptqlab::param_rows::percdamp(),
      {"disable_gptq", ptqlab::ParamType::boolean, false, "no error compensation: round each weight directly (RTN rows)",
       {}, {}, {}},
      {"binary_stats", ptqlab::ParamType::string, std::string("zeroed_row"),
       "binarizer mean/scale over the whole row with salient entries zeroed (zeroed_row, the code) or over the "
       "binarized entries only (binarized_only, the paper)",
       {}, {}, {"zeroed_row", "binarized_only"}},
      {"mask_encoding", ptqlab::ParamType::string, std::string("bitmap"),
       "storage counted for the own mask (an arm mask counts its own): bitmap or csr", {}, {}, {"bitmap", "csr"}},
      {"paper_convention", ptqlab::ParamType::string, std::string("fraction"),
       "paper bits: fraction (1 * r_binary + high_bits * r_salient, the 1.7 bits quoted by BiLLM) or eq3 (PB-LLM Eq. 3: "
       "plus a 1-bit index per weight, 2.7)",
       {}, {}, {"fraction", "eq3"}},
  };
  registrar->add_quantizer(schema, [](const ptqlab::Params& p) { return std::make_unique<PbLlm>(p); });
}
