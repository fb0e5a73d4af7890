// Measuring the allocation table (docs/allocation.md, research/bit-allocation.md §3.1): every
// candidate quantizes every linear of every layer on the FP model's calibration inputs ("fp
// chain"), and each (linear, candidate) gets its ledger bits, tr(ΔW H ΔWᵀ) and the measured output
// MSE on the captured inputs. The only Eigen-heavy code of the allocation stage.
#include <chrono>
#include <cmath>

#include <fmt/format.h>

#include "ptqlab/engine/allocation_stage.hpp"
#include "ptqlab/nn/forward.hpp"
#include "ptqlab/quant/gptq.hpp"
#include "ptqlab/quant/linear_context.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/progress.hpp"
#include "ptqlab/support/stop.hpp"

namespace ptqlab {
namespace {

using Clock = std::chrono::steady_clock;

int windows_per_batch(int seq_len) { return std::max(1, 4096 / seq_len); }

// The four linear inputs of one layer, batch by batch, and Σ XᵀX of each.
class CaptureObserver : public ForwardObserver {
 public:
  std::array<std::vector<Matrix>, 4> inputs;
  std::array<Eigen::MatrixXd, 4> xtx;
  std::int64_t tokens = 0;

  void on_linear_input(int, LinearInput which, const Matrix& x, BatchShape) override {
    const int i = static_cast<int>(which);
    inputs[i].push_back(x);
    if (xtx[i].size() == 0) xtx[i] = Eigen::MatrixXd::Zero(x.cols(), x.cols());
    Eigen::MatrixXf g(x.cols(), x.cols());
    g.noalias() = x.transpose() * x;
    xtx[i] += g.cast<double>();
    if (which == LinearInput::attn_in) tokens += x.rows();
  }
};

std::int64_t ceil_bits(double b) { return static_cast<std::int64_t>(std::ceil(b - 1e-6)); }

// The measured output MSE runs X ΔWᵀ on at most this many calibration tokens (whole batches from the
// first): at LLaMA-7B shapes and 128 x 2048 tokens it would cost 9-24 TFLOP per linear and
// candidate, more than quantizing; 16384 tokens keep it a sample of a few seconds. tr(ΔW H ΔWᵀ)
// always uses every token (through H).
constexpr std::int64_t kMseTokens = 16384;

}  // namespace

double hessian_weighted_error(const Matrix& w, const Matrix& wq, const Eigen::MatrixXd& h) {
  const Eigen::MatrixXd d = (wq - w).cast<double>();
  Eigen::MatrixXd dh(d.rows(), h.cols());
  dh.noalias() = d * h;
  return std::max(0.0, dh.cwiseProduct(d).sum());
}

AllocationTable measure_allocation_table(const LlamaModel& model, const std::vector<std::vector<int>>& windows,
                                         const AllocationSpec& spec, const std::vector<CandidateComponents>& candidates,
                                         const MeasureOptions& options) {
  if (windows.empty()) throw Error("allocation: measuring needs calibration windows (calibration.nsamples >= 1)");
  const auto& c = model.config;
  const int seq_len = static_cast<int>(windows[0].size());
  const int per_batch = windows_per_batch(seq_len);
  const RopeTable rope(c.head_dim, c.rope_theta, seq_len);
  const std::size_t K = candidates.size();

  AllocationTable t;
  t.units = allocation_units(c, "linear");  // arms sum it into their units
  t.num_layers = c.num_layers;
  for (const auto& cand : spec.candidates) t.candidates.push_back(cand.label);
  const std::size_t U = t.units.size();
  t.bits_allin.assign(U, std::vector<std::int64_t>(K, 0));
  t.bits_paper.assign(U, std::vector<std::int64_t>(K, 0));
  t.loss_hess.assign(U, std::vector<double>(K, 0.0));
  t.loss_mse.assign(U, std::vector<double>(K, 0.0));
  t.seconds.assign(U, std::vector<double>(K, 0.0));
  t.loss_block.assign(static_cast<std::size_t>(c.num_layers), std::vector<double>(K, 0.0));
  // unit_of[layer][linear] -> unit index
  std::vector<std::array<std::size_t, 7>> unit_of(c.num_layers);
  for (std::size_t u = 0; u < U; ++u)
    for (Linear w : t.units[u].linears) unit_of[t.units[u].layer][static_cast<std::size_t>(w)] = u;

  // The FP stream (also handed to decoder-layer candidates as both streams).
  LayerStreams streams;
  for (std::size_t first = 0; first < windows.size(); first += per_batch) {
    const auto n = std::min<std::size_t>(per_batch, windows.size() - first);
    std::vector<int> tokens;
    for (std::size_t i = first; i < first + n; ++i) tokens.insert(tokens.end(), windows[i].begin(), windows[i].end());
    streams.quant.push_back(embed_tokens(model, tokens));
    streams.shapes.push_back(BatchShape{static_cast<int>(n), seq_len});
  }
  bool need_fp = false;
  for (const auto& cand : candidates)
    need_fp = need_fp || (cand.quantizer->granularity() == Quantizer::Granularity::decoder_layer &&
                          cand.quantizer->needs_fp_stream());

  auto stats_of = [&options](int l, Linear which) -> const InputStats& {
    if (options.input_stats == nullptr || options.input_stats->empty())
      throw Error(fmt::format("layer {} {}: input statistics were not collected", l, linear_name(which)));
    return (*options.input_stats)[l][static_cast<int>(input_of(which))];
  };

  const auto t_start = Clock::now();
  const std::size_t steps = static_cast<std::size_t>(c.num_layers) * K;
  for (int l = 0; l < c.num_layers; ++l) {
    const DecoderLayer original = model.layer_copy(l);  // widened while this layer is measured
    CaptureObserver cap;
    // The capture pass's outputs of the first batches (up to kMseTokens tokens) are block_mse's
    // target: the FP layer on the FP inputs.
    std::vector<Matrix> fp_out;
    std::int64_t fp_out_rows = 0;
    for (std::size_t b = 0; b < streams.quant.size(); ++b) {
      Matrix h = streams.quant.get(b);
      decoder_layer_forward(c, original, rope, streams.shapes[b], h, l, &cap);
      if (fp_out_rows < kMseTokens) {
        fp_out_rows += h.rows();
        fp_out.push_back(std::move(h));
      }
    }
    std::array<Eigen::MatrixXd, 4> hess;
    for (int i = 0; i < 4; ++i) hess[i] = cap.xtx[i] * (2.0 / static_cast<double>(cap.tokens));
    auto hessian_of = [&hess](Linear which) -> const Eigen::MatrixXd& { return hess[static_cast<int>(input_of(which))]; };
    if (need_fp) streams.fp = streams.quant;
    // Every candidate sees the same FP Hessians: one inverse factor per input and dampening for all.
    InverseFactorCache factors;

    for (std::size_t k = 0; k < K; ++k) {
      throw_if_stop_requested();
      const std::size_t done = static_cast<std::size_t>(l) * K + k;
      if (options.status) {
        const double elapsed = std::chrono::duration<double>(Clock::now() - t_start).count();
        options.status(fmt::format("allocation table: layer {}/{}, candidate {}/{} ({}) ETA {}", l + 1, c.num_layers,
                                   k + 1, K, spec.candidates[k].label,
                                   done > 0 ? format_duration(elapsed / done * (steps - done)) : std::string("?")));
      }
      const auto& cand = candidates[k];
      DecoderLayer layer = original;
      std::array<BitCount, 7> bits;
      std::array<double, 7> seconds{};
      std::array<SalientMask, 7> masks;
      bool failed = false;
      // No tensor log: the table's trial quantizations are measured, not kept.
      auto linear_context = [&](Linear which) {
        return layer_linear_context(c, l, which, options.seed, nullptr, hessian_of, factors, stats_of);
      };
      try {
        if (cand.mask)
          for (std::size_t i = 0; i < kAllLinears.size(); ++i)
            masks[i] = cand.mask->select(linear_context(kAllLinears[i]), layer.linear(kAllLinears[i]));
        if (cand.quantizer->granularity() == Quantizer::Granularity::decoder_layer) {
          LayerContext ctx;
          ctx.config = &c;
          ctx.layer = l;
          ctx.seed = options.seed;
          ctx.fp_layer = &original;
          ctx.inputs = &streams;
          ctx.rope = &rope;
          ctx.input_stats = [&stats_of, l](Linear which) -> const InputStats& { return stats_of(l, which); };
          ctx.hessian = hessian_of;
          if (cand.mask)
            for (std::size_t i = 0; i < kAllLinears.size(); ++i) ctx.masks[i] = &masks[i];
          ctx.log_prefix = fmt::format("layer{}", l);
          const auto t0 = Clock::now();
          bits = cand.quantizer->quantize_layer(ctx, layer);
          seconds.fill(std::chrono::duration<double>(Clock::now() - t0).count() / 7.0);
        } else {
          for (std::size_t i = 0; i < kAllLinears.size(); ++i) {
            auto ctx = linear_context(kAllLinears[i]);
            if (cand.mask) ctx.mask = &masks[i];
            const auto t0 = Clock::now();
            bits[i] = cand.quantizer->quantize_linear(ctx, layer.linear(kAllLinears[i]));
            seconds[i] = std::chrono::duration<double>(Clock::now() - t0).count();
          }
        }
      } catch (const Error&) {
        failed = true;  // this candidate cannot quantize this layer: it is never chosen here
      }
      for (std::size_t i = 0; i < kAllLinears.size(); ++i) {
        const Linear which = kAllLinears[i];
        const std::size_t u = unit_of[l][i];
        BitCount b = bits[i];
        if (cand.mask) b.masks += masks[i].storage_bits;
        t.bits_allin[u][k] += ceil_bits(b.all_in());
        t.bits_paper[u][k] += ceil_bits(b.paper);
        t.seconds[u][k] += seconds[i];
        const Matrix& w0 = original.linear(which);
        const Matrix& wq = layer.linear(which);
        const auto t_loss = Clock::now();  // the losses are part of the measurement's cost
        if (failed || !wq.allFinite()) {
          t.loss_hess[u][k] = t.loss_mse[u][k] = kNeverLoss;
          continue;
        }
        const double hl = hessian_weighted_error(w0, wq, hessian_of(which));
        // Output MSE measured on the captured inputs: mean over tokens and outputs of (X ΔWᵀ)².
        const Matrix df = wq - w0;
        double sq = 0;
        std::int64_t rows = 0;
        for (const Matrix& x : cap.inputs[static_cast<int>(input_of(which))]) {
          if (rows >= kMseTokens) break;  // whole batches, from the first, up to kMseTokens tokens
          Matrix y(x.rows(), df.rows());
          y.noalias() = x * df.transpose();
          sq += y.cast<double>().squaredNorm();
          rows += x.rows();
        }
        t.loss_hess[u][k] += hl;
        t.loss_mse[u][k] += sq / (static_cast<double>(rows) * static_cast<double>(df.rows()));
        t.seconds[u][k] += std::chrono::duration<double>(Clock::now() - t_loss).count();
      }
      // block_mse: the whole quantized layer against the FP layer, on the same FP inputs.
      const auto t_block = Clock::now();
      bool finite = !failed;
      for (Linear which : kAllLinears) finite = finite && layer.linear(which).allFinite();
      double sq = 0, count = 0;
      for (std::size_t b = 0; finite && b < fp_out.size(); ++b) {
        Matrix y = streams.quant.get(b);
        decoder_layer_forward(c, layer, rope, streams.shapes[b], y);
        sq += (y - fp_out[b]).cast<double>().squaredNorm();
        count += static_cast<double>(y.size());
      }
      t.loss_block[static_cast<std::size_t>(l)][k] = finite && count > 0 && std::isfinite(sq) ? sq / count : kNeverLoss;
      t.seconds[unit_of[l][0]][k] += std::chrono::duration<double>(Clock::now() - t_block).count();
    }
    // The FP layer produces the next layer's inputs.
    for (std::size_t b = 0; b < streams.quant.size(); ++b) {
      Matrix x = streams.quant.take(b);
      decoder_layer_forward(c, original, rope, streams.shapes[b], x);
      streams.quant.put(b, std::move(x));
    }
  }
  return t;
}

}  // namespace ptqlab
