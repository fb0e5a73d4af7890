// Quantizer "ptq161": PTQ1.61 without preprocessing ("PTQ1.61*"; research/ptq161.md §3–5, §7).
// Per decoder layer: salient input channels (the arm's mask, or the activation-channels mask
// computed here) keep a 4-bit per-row grid; the other columns are binarized as
// r1_i r2_j (s_i sign(W - mu_i) + mu_i) with s, r1, r2 trained jointly for all seven linears by
// block reconstruction against two targets (FP layer on the FP stream, FP layer on the quantized
// stream) with MSE + NLC loss and Adam. Every piece can be switched off for ablations.
#include <cmath>

#include <fmt/format.h>

#include "binary_scales.hpp"
#include "block_reconstruction.hpp"
#include "ptqlab/support/error.hpp"

namespace {

using ptqlab::kAllLinears;
using ptqlab::Matrix;
using ptqlab::ptq161::BinaryScales;

// The seven linears' scales as one parametrization: group "s" (lr_s) and group "r" (lr_r: r1, r2).
class LayerScales : public ptqlab::WeightParametrization {
 public:
  LayerScales(std::vector<BinaryScales>& scales, double lr_s, double lr_r) : scales_(scales), lr_s_(lr_s), lr_r_(lr_r) {}

  std::vector<ptqlab::ParameterGroup> parameter_groups() override {
    ptqlab::ParameterGroup s{"s", {}, lr_s_}, r{"r1_r2", {}, lr_r_};
    for (auto& sc : scales_) {
      s.tensors.push_back(&sc.s);
      r.tensors.push_back(&sc.r1);
      r.tensors.push_back(&sc.r2);
    }
    return {s, r};
  }
  void effective_weights(ptqlab::DecoderLayer& layer) const override {
    for (std::size_t i = 0; i < kAllLinears.size(); ++i) scales_[i].effective(layer.linear(kAllLinears[i]));
  }
  void backward(const std::array<Matrix, 7>& g, std::vector<std::vector<Eigen::VectorXf>>& grads) const override {
    for (std::size_t i = 0; i < kAllLinears.size(); ++i)
      scales_[i].backward(g[i], grads[0][i], grads[1][2 * i], grads[1][2 * i + 1]);
  }

 private:
  std::vector<BinaryScales>& scales_;
  double lr_s_, lr_r_;
};

class Ptq161 : public ptqlab::Quantizer {
 public:
  explicit Ptq161(const ptqlab::Params& p)
      : use_mask_(p.get_bool("use_mask")),
        ratio_(p.get_real("ratio")),
        statistic_(p.get_string("statistic")),
        salient_bits_(static_cast<int>(p.get_int("salient_bits"))),
        salient_range_row_(p.get_string("salient_range") == "row"),
        learn_scales_(p.get_bool("learn_scales")),
        epochs_(static_cast<int>(p.get_int("epochs"))),
        lr_s_(p.get_real("lr_s")),
        lr_r_(p.get_real("lr_r")),
        mse_(p.get_bool("mse")),
        nlc_(p.get_bool("nlc")),
        target_fp_(p.get_bool("target_fp")),
        target_fq_(p.get_bool("target_fq")) {
    if (learn_scales_ && epochs_ > 0 && !target_fp_ && !target_fq_)
      throw ptqlab::Error("ptq161: learn_scales needs at least one target (target_fp or target_fq)");
    if (learn_scales_ && epochs_ > 0 && !mse_ && !nlc_)
      throw ptqlab::Error("ptq161: learn_scales needs at least one loss term (mse or nlc)");
  }

  Granularity granularity() const override { return Granularity::decoder_layer; }
  bool needs_input_stats() const override { return use_mask_; }
  bool needs_fp_stream() const override { return training() && target_fp_; }

  std::optional<ptqlab::BitCount> predict_bits(Eigen::Index rows, Eigen::Index cols,
                                               const ptqlab::MaskPrediction* mask) const override {
    if (mask != nullptr) {
      if (mask->shape != ptqlab::SalientMask::Shape::channels) return std::nullopt;  // refused at run time
      return ledger(rows, cols, mask->salient, false);
    }
    return ledger(rows, cols, use_mask_ ? ptqlab::ptq161::predicted_channel_count(cols, ratio_) : 0, use_mask_);
  }

  std::array<ptqlab::BitCount, 7> quantize_layer(const ptqlab::LayerContext& ctx, ptqlab::DecoderLayer& layer) override {
    std::vector<BinaryScales> scales;
    std::array<bool, 7> own_mask{};
    for (std::size_t i = 0; i < kAllLinears.size(); ++i) {
      const auto which = kAllLinears[i];
      const Matrix& w = ctx.fp_layer->linear(which);
      std::vector<std::uint8_t> mask(static_cast<std::size_t>(w.cols()), 0);
      if (ctx.masks[i] != nullptr) {
        if (ctx.masks[i]->shape != ptqlab::SalientMask::Shape::channels)
          throw ptqlab::Error("ptq161 needs a channel mask (whole input columns), got an element-wise mask");
        mask = ctx.masks[i]->salient;
      } else if (use_mask_) {
        mask = ptqlab::ptq161::activation_channel_mask(
                   ptqlab::ptq161::channel_statistic(ctx.input_stats(which), statistic_), w.rows(), ratio_)
                   .salient;
        own_mask[i] = true;
      }
      scales.emplace_back(w, std::move(mask), salient_bits_, salient_range_row_);
    }
    if (training()) {
      LayerScales param(scales, lr_s_, lr_r_);
      ptqlab::BlockReconstructionOptions o;
      o.epochs = epochs_;
      o.mse = mse_;
      o.nlc = nlc_;
      o.target_fp = target_fp_;
      o.target_fq = target_fq_;
      const auto losses = ptqlab::reconstruct_block(*ctx.config, *ctx.fp_layer, *ctx.rope, *ctx.inputs, param, o);
      if (ctx.log != nullptr) ctx.log->series(ctx.log_prefix + "/loss", losses);
    }
    std::array<ptqlab::BitCount, 7> bits;
    for (std::size_t i = 0; i < kAllLinears.size(); ++i) {
      const auto& sc = scales[i];
      scales[i].effective(layer.linear(kAllLinears[i]));
      bits[i] = ledger(sc.s.size(), sc.r2.size(), sc.salient_count(), own_mask[i]);
      if (ctx.log != nullptr && ctx.log->enabled()) {
        const auto prefix = fmt::format("{}/{}", ctx.log_prefix, ptqlab::linear_name(kAllLinears[i]));
        ctx.log->tensor(prefix + "/s", Matrix(sc.s.transpose()));
        ctx.log->tensor(prefix + "/r1", Matrix(sc.r1.transpose()));
        ctx.log->tensor(prefix + "/r2", Matrix(sc.r2.transpose()));
      }
    }
    return bits;
  }

 private:
  bool training() const { return learn_scales_ && epochs_ > 0; }

  // research/ptq161.md §7: code-faithful all-in count and the paper's own arithmetic.
  ptqlab::BitCount ledger(Eigen::Index out, Eigen::Index in, Eigen::Index salient, bool own_mask) const {
    const double rows = static_cast<double>(out), cols = static_cast<double>(in);
    const double k = static_cast<double>(salient), n = rows * cols;
    ptqlab::BitCount b;
    b.weights = static_cast<std::int64_t>(n);
    b.payload = rows * (cols - k) * 1.0 + rows * k * salient_bits_;
    // Per row: a = r1*s and c = r1*mu (FP16); with salient columns also the grid's Δ (FP16) and
    // z (FP16, as the code stores it); per column r2 (FP16) once it is trained.
    b.scales = 16.0 * rows + (k > 0 ? 16.0 * rows : 0.0) + (training() ? 16.0 * cols : 0.0);
    b.zeros = 16.0 * rows + (k > 0 ? 16.0 * rows : 0.0);
    b.masks = own_mask ? cols : 0.0;  // one bit per input channel (an arm mask is added by the engine)
    // The paper (App. A, Eq. 8) divides the mask and "3 low-dimensional scaling factors and a part
    // of zero points" (16 (3 rows + r_s rows) bits) by the weight *bits*, not the weight count.
    // Without training there is one scale vector (the analytic alpha), not three.
    const double weight_bits_per_weight = b.payload / n;
    const double extra = (k > 0 ? cols : 0.0) + 16.0 * ((training() ? 3.0 : 1.0) * rows + (k / cols) * rows);
    b.paper = n * weight_bits_per_weight + extra / weight_bits_per_weight;
    return b;
  }

  bool use_mask_;
  double ratio_;
  std::string statistic_;
  int salient_bits_;
  bool salient_range_row_;
  bool learn_scales_;
  int epochs_;
  double lr_s_, lr_r_;
  bool mse_, nlc_, target_fp_, target_fq_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  using ptqlab::ParamType;
  ptqlab::ComponentSchema schema;
  schema.name = "ptq161";
  schema.description =
      "PTQ1.61 (no preprocessing): 4-bit salient input channels, the rest binarized with scales trained block-wise";
  schema.params = {
      {"use_mask", ParamType::boolean, true, "keep salient channels at salient_bits (off: binarize everything)", {}, {}, {}},
      {"ratio", ParamType::real, 0.2, "salient channel fraction of the own mask (when the arm has no mask)", 0.0, 1.0, {}},
      {"statistic", ParamType::string, std::string("max"), "own mask's activation statistic: max |x| (code) or mean |x| (pseudocode)", {}, {}, {"max", "mean"}},
      {"salient_bits", ParamType::integer, std::int64_t{4}, "bits of the salient channels' per-row grid", 2.0, 8.0, {}},
      {"salient_range", ParamType::string, std::string("row"), "the 4-bit grid's range: the whole row (code) or the salient columns only", {}, {}, {"row", "salient"}},
      {"learn_scales", ParamType::boolean, true, "train s, r1, r2 (off: the analytic binarization, s = mean |W|)", {}, {}, {}},
      {"epochs", ParamType::integer, std::int64_t{20}, "passes over the calibration windows, one Adam step per window", 0.0, 10000.0, {}},
      {"lr_s", ParamType::real, 5e-4, "Adam learning rate of s", 0.0, 1.0, {}},
      {"lr_r", ParamType::real, 1e-3, "Adam learning rate of r1 and r2", 0.0, 1.0, {}},
      {"mse", ParamType::boolean, true, "MSE term of the loss", {}, {}, {}},
      {"nlc", ParamType::boolean, true, "NLC term -log|mean cos| of the loss (angular bias, Table 7)", {}, {}, {}},
      {"target_fp", ParamType::boolean, true, "target: FP layer on the FP stream", {}, {}, {}},
      {"target_fq", ParamType::boolean, true, "target: FP layer on the quantized stream", {}, {}, {}},
  };
  registrar->add_quantizer(schema, [](const ptqlab::Params& p) { return std::make_unique<Ptq161>(p); });
}
