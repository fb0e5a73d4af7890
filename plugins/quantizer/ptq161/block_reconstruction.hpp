#pragma once
// Block reconstruction: train a differentiable parametrization of a decoder layer's weights so the
// quantized layer reproduces the FP layer's outputs (OmniQuant/CBQ-style; PTQ1.61 §5). A plugin
// supplies the parametrization (parameters -> effective weights, dL/dW_eff -> dL/dparameters);
// core runs the forward and hand-written backward pass of the layer, the losses and Adam.
#include <array>
#include <functional>
#include <string>
#include <vector>

#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/nn/forward.hpp"

namespace ptqlab {

// Parameter vectors optimised together with one learning rate (Adam's state is per vector).
struct ParameterGroup {
  std::string name;
  std::vector<Eigen::VectorXf*> tensors;
  double lr = 1e-3;
};

class WeightParametrization {
 public:
  virtual ~WeightParametrization() = default;
  virtual std::vector<ParameterGroup> parameter_groups() = 0;
  // Writes the effective weight of each of the seven linears into `layer` (kAllLinears order).
  virtual void effective_weights(DecoderLayer& layer) const = 0;
  // grads[g][t] += dL/d(parameter_groups()[g].tensors[t]) given dL/dW_eff of each linear.
  virtual void backward(const std::array<Matrix, 7>& grad_weights,
                        std::vector<std::vector<Eigen::VectorXf>>& grads) const = 0;
};

struct BlockReconstructionOptions {
  int epochs = 20;         // passes over the calibration windows, one Adam step per window
  bool mse = true;         // mean squared error term
  bool nlc = true;         // -log |mean_t cos(y_t, target_t)| term ("angular bias")
  bool target_fp = true;   // target 1: FP layer on the FP stream (needs LayerStreams::fp)
  bool target_fq = true;   // target 2: FP layer on the quantized stream
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;  // Adam (AdamW with weight decay 0)
  std::function<void(int epoch, int epochs, double mean_loss)> on_epoch;
};

// Trains `param` in place. Windows are visited in their fixed order every epoch. Returns the mean
// loss of each epoch. Throws ptqlab::Error when the loss becomes non-finite.
std::vector<double> reconstruct_block(const LlamaConfig& config, const DecoderLayer& fp_layer, const RopeTable& rope,
                                      const LayerStreams& streams, WeightParametrization& param,
                                      const BlockReconstructionOptions& options);

}  // namespace ptqlab
