#include "block_reconstruction.hpp"

#include <cmath>

#include <fmt/format.h>

#include "ptqlab/nn/backward.hpp"
#include "ptqlab/support/error.hpp"

namespace ptqlab {

using Eigen::Index;

std::vector<double> reconstruct_block(const LlamaConfig& config, const DecoderLayer& fp_layer, const RopeTable& rope,
                                      const LayerStreams& streams, WeightParametrization& param,
                                      const BlockReconstructionOptions& options) {
  if (!options.target_fp && !options.target_fq) throw Error("block reconstruction needs at least one target");
  if (!options.mse && !options.nlc) throw Error("block reconstruction needs at least one loss term");
  if (options.target_fp && streams.fp.size() != streams.quant.size())
    throw Error("block reconstruction: the FP stream was not kept (the quantizer must ask for it)");

  // The calibration windows, one training sample each: (batch, first row, length).
  struct Window {
    std::size_t batch;
    Index row0;
    int seq_len;
  };
  std::vector<Window> windows;
  for (std::size_t b = 0; b < streams.shapes.size(); ++b)
    for (int w = 0; w < streams.shapes[b].batch; ++w)
      windows.push_back({b, static_cast<Index>(w) * streams.shapes[b].seq_len, streams.shapes[b].seq_len});

  // Targets, computed once with the FP layer: on the FP stream and on the quantized stream.
  std::vector<Matrix> target_fp, target_fq;
  for (std::size_t b = 0; b < streams.quant.size(); ++b) {
    if (options.target_fp) {
      Matrix y = streams.fp.get(b);
      decoder_layer_forward(config, fp_layer, rope, streams.shapes[b], y);
      target_fp.push_back(std::move(y));
    }
    if (options.target_fq) {
      Matrix y = streams.quant.get(b);
      decoder_layer_forward(config, fp_layer, rope, streams.shapes[b], y);
      target_fq.push_back(std::move(y));
    }
  }

  auto groups = param.parameter_groups();
  std::vector<std::vector<AdamState>> state(groups.size());
  std::vector<std::vector<Eigen::VectorXf>> grads(groups.size());
  std::vector<Adam> adam(groups.size());
  for (std::size_t g = 0; g < groups.size(); ++g) {
    state[g].resize(groups[g].tensors.size());
    grads[g].resize(groups[g].tensors.size());
    adam[g].lr = groups[g].lr;
    adam[g].beta1 = options.beta1;
    adam[g].beta2 = options.beta2;
    adam[g].eps = options.eps;
  }

  DecoderLayer layer = fp_layer;  // norms stay FP; linears take the effective weights every step
  DecoderLayerTape tape;
  DecoderLayerGrads layer_grads;
  DecoderLayerScratch scratch;
  Matrix y, grad_y;
  std::vector<double> losses;
  for (int epoch = 0; epoch < options.epochs; ++epoch) {
    double total = 0;
    for (const auto& w : windows) {
      const BatchShape shape{1, w.seq_len};
      param.effective_weights(layer);
      const Matrix x = streams.quant.get_rows(w.batch, w.row0, w.seq_len);
      decoder_layer_forward_tape(config, layer, rope, shape, x, y, tape);

      // The losses accumulate their gradient into grad_y (backward.hpp convention).
      double loss = 0;
      grad_y.setZero(y.rows(), y.cols());
      auto add_target = [&](const Matrix& target) {
        if (options.mse) loss += mse_loss(y, target, &grad_y);
        if (options.nlc) loss += nlc_loss(y, target, &grad_y);
      };
      if (options.target_fp) add_target(target_fp[w.batch].middleRows(w.row0, w.seq_len));
      if (options.target_fq) add_target(target_fq[w.batch].middleRows(w.row0, w.seq_len));
      if (!std::isfinite(loss)) throw Error(fmt::format("block reconstruction: the loss became {} in epoch {}", loss, epoch + 1));

      layer_grads.reset(layer);
      decoder_layer_backward(config, layer, rope, shape, tape, grad_y, layer_grads, nullptr, &scratch);
      for (std::size_t gi = 0; gi < groups.size(); ++gi)
        for (std::size_t t = 0; t < groups[gi].tensors.size(); ++t)
          grads[gi][t] = Eigen::VectorXf::Zero(groups[gi].tensors[t]->size());
      param.backward(layer_grads.linear, grads);
      for (std::size_t gi = 0; gi < groups.size(); ++gi)
        for (std::size_t t = 0; t < groups[gi].tensors.size(); ++t)
          adam[gi].step(*groups[gi].tensors[t], grads[gi][t], state[gi][t]);
      total += loss;
    }
    losses.push_back(total / static_cast<double>(windows.size()));
    if (options.on_epoch) options.on_epoch(epoch, options.epochs, losses.back());
  }
  return losses;
}

}  // namespace ptqlab
