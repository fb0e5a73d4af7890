#pragma once
// Calibration data and the sequential layer-by-layer quantization pipeline (GPTQ/BiLLM/PB-LLM,
// research/baselines.md §1.6):
//
//   inputs <- hidden states entering layer 0 for every calibration window
//   for each decoder layer l:
//     run the still-FP layer l on inputs; every linear accumulates H = 2 X Xᵀ / n from the input
//       it actually sees (quantized stream: layers < l are already quantized)
//     quantize each linear of layer l (mask, then quantizer), record errors and bits
//     run the quantized layer l on inputs -> inputs of layer l+1
#include <array>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/model/model.hpp"
#include "ptqlab/outputs/results.hpp"

namespace ptqlab {

// `nsamples` windows of `seq_len` consecutive tokens, each starting at a uniform random offset in
// [0, stream.size() - seq_len] drawn with std::mt19937_64(seed) (documented in docs/protocols.md).
std::vector<std::vector<int>> draw_calibration_windows(const std::vector<int>& stream, int nsamples, int seq_len,
                                                       std::uint64_t seed);

// Per-channel statistics of every linear input of the FP model over the calibration windows:
// stats[layer][LinearInput] (attn_in, o_in, mlp_in, down_in).
using ModelInputStats = std::vector<std::array<InputStats, 4>>;
ModelInputStats collect_input_stats(const LlamaModel& fp_model, const std::vector<std::vector<int>>& windows);

// sum += xᵀx for x = [tokens, n] (float products, double accumulation): the Hessian accumulation.
// Up to 256 inputs one Eigen GEMM; above, the lower triangle in fixed 256 x 256 tiles run in
// parallel (symmetric rank-k updates on the diagonal tiles, half the flops of a general GEMM),
// mirrored to the upper triangle. The tiling never depends on the thread count.
void accumulate_gram(const Matrix& x, Eigen::MatrixXd& sum);

// A linear's record of its output error, ||X (W_q - W)ᵀ||_F / ||X Wᵀ||_F computed from the
// Hessian: double GEMMs up to 256 inputs, float32 products in parallel row blocks above.
double relative_output_error(const Matrix& w, const Matrix& wq, const Eigen::MatrixXd& h);
// The same from the inputs X themselves (batches of [tokens, in]): cheaper when there are fewer
// calibration tokens than inputs; the engine uses it then (above 256 inputs).
double relative_output_error_on_inputs(const Matrix& w, const Matrix& wq, const std::vector<Matrix>& xs);

struct LayerwiseOptions {
  Quantizer* quantizer = nullptr;
  Mask* mask = nullptr;                            // optional
  // Mixed precision (the allocation stage, docs/allocation.md): the quantizer and mask of each
  // linear, plan[layer][kAllLinears index]; empty: `quantizer` and `mask` everywhere. A
  // decoder-layer quantizer must be the choice of all seven linears of its layer.
  struct LinearChoice {
    Quantizer* quantizer = nullptr;
    Mask* mask = nullptr;
  };
  std::vector<std::array<LinearChoice, 7>> plan;
  const ModelInputStats* input_stats = nullptr;    // FP statistics, when a component needs them
  // What the calibration streams are held in between layers (calibration.stream_dtype).
  StreamDType stream_dtype = StreamDType::f32;
  TensorLog* log = nullptr;
  std::uint64_t seed = 0;
  // Called before each layer (layer index, number of layers): progress display.
  std::function<void(int, int)> on_layer;
  // Called as a layer goes through its phases ("Hessians", "quantize q_proj", "records",
  // "forward"): progress display and the memory watch's timeline.
  std::function<void(const std::string&)> on_phase;
  // Where the quantized layer l goes (default: LlamaModel::set_layer, resident float32). An arm
  // of a large model spills it to its own file instead (runner, --layer-store).
  std::function<void(LlamaModel&, int, DecoderLayer)> keep_layer;
  // Called after layer l is kept, with the records so far.
  std::function<void(int, const std::vector<LinearRecord>&)> after_layer;
};

// Quantizes every linear of every decoder layer of `model` in place, sequentially. Only the layer
// being quantized is in float32 (twice: the copy the quantizer changes and the original); stored
// layers of an opened checkpoint are widened one at a time. Throws
// ptqlab::Error when activations become non-finite. Returns one record per linear, in order.
std::vector<LinearRecord> quantize_layerwise(LlamaModel& model, const std::vector<std::vector<int>>& windows,
                                             const LayerwiseOptions& options);

}  // namespace ptqlab
