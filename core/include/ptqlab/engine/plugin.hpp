#pragma once
// The plugin interfaces and the registry that loads them from shared libraries.
//
// A plugin is a shared library exporting two C symbols (use the PTQLAB_PLUGIN macro):
//   int         ptqlab_plugin_abi_version(void);   must equal PTQLAB_PLUGIN_ABI_VERSION
//   const char* ptqlab_plugin_build_id(void);      must equal ptqlab::plugin_build_id()
//   void        ptqlab_plugin_register(ptqlab::PluginRegistrar*);
// The build id pins what crosses the boundary (compiler C++ ABI, Eigen version), so a plugin built
// against another ptqlab is rejected with a message instead of crashing. Components keep their
// library loaded for as long as any object they made is alive. See docs/plugins.md.
#include <array>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "ptqlab/engine/params.hpp"
#include "ptqlab/model/model.hpp"
#include "ptqlab/nn/forward.hpp"
#include "ptqlab/quant/activation_stream.hpp"
#include "ptqlab/quant/allocation.hpp"
#include "ptqlab/quant/bits.hpp"

#define PTQLAB_PLUGIN_ABI_VERSION 9  // 9: LayerwiseOptions::on_phase; 8: layer folders, the declared plugin SDK

namespace ptqlab {

class Tokenizer;
struct InverseHessianFactor;

// What must match between ptqlab and a plugin, compiled into each side (inline on purpose: the
// plugin's copy reflects the headers and compiler it was built with).
inline std::string plugin_build_id() {
  return "ptqlab-abi-" + std::to_string(PTQLAB_PLUGIN_ABI_VERSION) + "/gxx-abi-" + std::to_string(__GXX_ABI_VERSION) +
         "/eigen-" + std::to_string(EIGEN_WORLD_VERSION) + "." + std::to_string(EIGEN_MAJOR_VERSION) + "." +
         std::to_string(EIGEN_MINOR_VERSION);
}

// ----------------------------------------------------------------------------------------------
// What the engine hands to components.

// Per-input-channel statistics of a linear layer's input over the calibration set.
struct InputStats {
  Eigen::VectorXf max_abs;   // max over tokens of |x[t, c]|
  Eigen::VectorXf mean_abs;  // mean over tokens of |x[t, c]|
  std::int64_t tokens = 0;
};

// Logging sink for tensors and series; the engine stores them in the arm's HDF5 file when the
// experiment sets log_tensors (series are always stored).
class TensorLog {
 public:
  virtual ~TensorLog() = default;
  virtual bool enabled() const = 0;
  virtual void tensor(const std::string& path, const Matrix& value) = 0;
  virtual void series(const std::string& path, std::vector<double> values) = 0;
};

// A salient-weight mask: either whole input channels (columns of [out, in]) or single weights.
struct SalientMask {
  enum class Shape { channels, elements };
  Shape shape = Shape::channels;
  Eigen::Index rows = 0, cols = 0;
  std::vector<std::uint8_t> salient;  // channels: cols entries; elements: rows*cols row-major
  // Bits the mask costs to store (ledger): channel masks 1 bit per column, element masks as the
  // mask plugin says (bitmap, CSR, ...).
  double storage_bits = 0;

  bool at(Eigen::Index r, Eigen::Index c) const {
    return shape == Shape::channels ? salient[c] != 0 : salient[r * cols + c] != 0;
  }
  std::int64_t count() const;
};

// What a mask would select on an [out, in] weight, predicted from the shape and its parameters
// alone (bit budgets, docs/bit-accounting.md): assumes distinct scores (no ties).
struct MaskPrediction {
  SalientMask::Shape shape = SalientMask::Shape::channels;
  std::int64_t salient = 0;  // channels: salient input columns; elements: salient weights
  double storage_bits = 0;   // what SalientMask::storage_bits would be
};

// Everything a per-linear step may use. Calibration-derived inputs are computed on first use and
// shared across arms (content-addressed cache), so components only pay for what they ask.
struct LinearContext {
  const LlamaConfig* config = nullptr;
  int layer = 0;
  Linear which = Linear::q_proj;
  std::uint64_t seed = 0;
  std::function<const InputStats&()> input_stats;   // statistics of this linear's input
  std::function<const Eigen::MatrixXd&()> hessian;  // H = 2 X Xᵀ / n over calibration tokens, [in, in]
  // The inverse-Hessian factor of this linear's input at a dampening, computed once per input and
  // dampening and shared by the linears (and masks) of the layer that read that input: q/k/v,
  // gate/up. Empty: the engine offers none. Components call inverse_hessian_factor (gptq.hpp),
  // which falls back to computing the factor from `hessian`.
  std::function<std::shared_ptr<const InverseHessianFactor>(double percdamp, const std::string& what)> inverse_factor;
  const SalientMask* mask = nullptr;                // from the arm's mask component, if any
  TensorLog* log = nullptr;
  std::string log_prefix;  // e.g. "layer3/q_proj"
};

// The calibration inputs of one decoder layer, in batches of whole windows: batch b of `fp` is
// what the FP layers 0..l-1 produce on the FP stream, batch b of `quant` what the already-quantized
// layers 0..l-1 produce (the quantized stream). Both are [rows, hidden], read in float32 with
// get(b) whatever they are held in (calibration.stream_dtype); shapes[b] says how rows form windows.
struct LayerStreams {
  ActivationBatches fp;
  ActivationBatches quant;
  std::vector<BatchShape> shapes;
};

// Everything a per-decoder-layer quantizer (block reconstruction: PTQ1.61, OmniQuant-style) may use.
struct LayerContext {
  const LlamaConfig* config = nullptr;
  int layer = 0;
  std::uint64_t seed = 0;
  const DecoderLayer* fp_layer = nullptr;  // the layer's original weights
  const LayerStreams* inputs = nullptr;
  const RopeTable* rope = nullptr;
  std::function<const InputStats&(Linear)> input_stats;   // FP statistics of a linear's input
  std::function<const Eigen::MatrixXd&(Linear)> hessian;  // quantized-stream Hessian of a linear's input
  std::array<const SalientMask*, 7> masks{};              // per linear (kAllLinears order), or nullptr
  TensorLog* log = nullptr;
  std::string log_prefix;  // e.g. "layer3"
};

// ----------------------------------------------------------------------------------------------
// The five kinds of component (Allocator, the fifth, is declared in ptqlab/allocation.hpp).

class Quantizer {
 public:
  enum class Granularity { linear, decoder_layer };
  virtual ~Quantizer() = default;
  // linear: the engine calls quantize_linear for each linear of each layer (GPTQ, PB-LLM, BiLLM, RTN).
  // decoder_layer: the engine calls quantize_layer once per decoder layer with both input streams.
  virtual Granularity granularity() const { return Granularity::linear; }
  // Replaces `weight` ([out, in]) by its dequantized value; returns its bit ledger.
  virtual BitCount quantize_linear(const LinearContext& ctx, Matrix& weight);
  // Replaces every linear of `layer` by its dequantized value; returns the ledger of each linear in
  // kAllLinears order.
  virtual std::array<BitCount, 7> quantize_layer(const LayerContext& ctx, DecoderLayer& layer);
  virtual bool needs_hessian() const { return false; }
  virtual bool needs_input_stats() const { return false; }
  // Decoder-layer quantizers that train against the FP stream ask for it (it costs one more copy of
  // the calibration activations and one more FP pass per layer).
  virtual bool needs_fp_stream() const { return false; }
  // The ledger quantizing an [rows, cols] weight would return, from the shape and the parameters
  // alone, given the arm mask's prediction (nullptr: the arm has no mask). Used by bit budgets to
  // choose a parameter without running anything. nullopt (the default): the bits depend on the
  // data (BiLLM's salient column counts), so budgets cannot be used with this quantizer.
  virtual std::optional<BitCount> predict_bits(Eigen::Index /*rows*/, Eigen::Index /*cols*/,
                                               const MaskPrediction* /*mask*/) const {
    return std::nullopt;
  }
};

class Mask {
 public:
  virtual ~Mask() = default;
  virtual SalientMask select(const LinearContext& ctx, const Matrix& weight) = 0;
  virtual bool needs_hessian() const { return false; }
  virtual bool needs_input_stats() const { return false; }
  // How many weights or channels select() would mark on an [rows, cols] weight and what storing
  // them costs, from the shape and parameters alone; nullopt (the default): it depends on the data.
  virtual std::optional<MaskPrediction> predict(Eigen::Index /*rows*/, Eigen::Index /*cols*/) const {
    return std::nullopt;
  }
};

// Transforms the whole model before quantization. `quantize` runs the arm's mask and quantizer on
// a model in place (restorative LoRA quantizes, trains, merges, and the engine quantizes again).
struct PreprocessContext {
  const Tokenizer* tokenizer = nullptr;
  std::function<void(LlamaModel&)> quantize;
  const std::vector<std::vector<int>>* calibration = nullptr;  // calibration windows (token ids)
  const std::vector<int>* calibration_stream = nullptr;        // the whole calibration text (BOS + ids)
  std::uint64_t seed = 0;
  TensorLog* log = nullptr;
  std::function<void(const std::string&)> status;  // what the step is doing now (redrawn status line)
  std::function<void(const std::string&)> note;    // one line for the run's log
  // The run's artifact cache (empty: none) and a sha256 over everything `quantize` depends on (model,
  // calibration windows, mask and quantizer configuration, seed), for content-addressed results.
  std::filesystem::path cache_dir;
  std::string quantize_key;
};

class Preprocessor {
 public:
  virtual ~Preprocessor() = default;
  virtual void apply(const PreprocessContext& ctx, LlamaModel& model) = 0;
  // Whether the quantization after this step recomputes the FP input statistics (activation masks)
  // on the preprocessed model (true) or keeps those of the original model.
  virtual bool recompute_input_stats() const { return true; }
};

// A dataset as evaluators see it: name, file, and its token stream (BOS + ids), tokenized once
// per process and shared by all arms.
struct EvalContext {
  std::string dataset;
  std::filesystem::path file;
  // BOS + ids of the whole file; empty for evaluators whose needs_token_stream() is false.
  std::function<const std::vector<int>&()> tokens;
  const LlamaModel* reference = nullptr;  // the unquantized model (for KL-style metrics)
  bool show_progress = false;
  std::string progress_label;
  // Since ABI version 6:
  const Tokenizer* tokenizer = nullptr;  // the model's tokenizer
  TensorLog* log = nullptr;              // per-item values as series (always stored in the result)
  std::string log_prefix;                // e.g. "eval/zeroshot/piqa/": prefix for series paths
  std::filesystem::path cache_dir;       // the run's artifact cache (empty: none)
  std::string reference_key;             // sha256 naming the reference model's contents (cache keys)
  std::string* protocol = nullptr;       // out: the protocol id stored beside the metrics
  std::function<void(const std::string&)> note;  // one line for the run's log
};

// What an evaluator can check before any arm runs (ptqlab run refuses the experiment, naming the
// file and line of the dataset): parameters against the model, the dataset file's format.
struct EvalCheckContext {
  std::string dataset;
  std::filesystem::path file;
  const LlamaConfig* config = nullptr;
};

class Evaluator {
 public:
  virtual ~Evaluator() = default;
  // Metric name -> value, e.g. {"ppl": 5.29, "nll": 1.67, "tokens": 316416}.
  virtual std::map<std::string, double> evaluate(const EvalContext& ctx, const LlamaModel& model) = 0;
  // Throws ptqlab::Error (one line, without the experiment's file:line) when this evaluator cannot
  // run on the dataset with this model. Called for every dataset before the arms start.
  virtual void check(const EvalCheckContext& /*ctx*/) const {}
  // Whether the engine should tokenize the dataset file as one text (EvalContext::tokens).
  virtual bool needs_token_stream() const { return true; }
};

// ----------------------------------------------------------------------------------------------
// Registration (called by plugins) and the registry (used by the engine).

template <class T>
using Factory = std::function<std::unique_ptr<T>(const Params&)>;

class PluginRegistrar {
 public:
  virtual ~PluginRegistrar() = default;
  virtual void add_quantizer(ComponentSchema schema, Factory<Quantizer> make) = 0;
  virtual void add_mask(ComponentSchema schema, Factory<Mask> make) = 0;
  virtual void add_preprocessor(ComponentSchema schema, Factory<Preprocessor> make) = 0;
  virtual void add_evaluator(ComponentSchema schema, Factory<Evaluator> make) = 0;
  virtual void add_allocator(ComponentSchema schema, Factory<Allocator> make) = 0;
};

class PluginRegistry {
 public:
  PluginRegistry();
  ~PluginRegistry();
  PluginRegistry(const PluginRegistry&) = delete;
  PluginRegistry& operator=(const PluginRegistry&) = delete;

  // Adds a directory to the search path and loads every plugin library (*.so) in it. Libraries are
  // only ever loaded from search-path directories.
  void add_search_path(const std::filesystem::path& dir);
  const std::vector<std::filesystem::path>& search_paths() const;

  const ComponentSchema* find(ComponentKind kind, const std::string& name) const;
  std::vector<const ComponentSchema*> list(std::optional<ComponentKind> kind = std::nullopt) const;
  std::vector<std::string> names(ComponentKind kind) const;
  std::filesystem::path library_of(ComponentKind kind, const std::string& name) const;

  // Objects keep their library loaded while alive. Params must be resolved (Params::resolve).
  std::shared_ptr<Quantizer> make_quantizer(const std::string& name, const Params& params) const;
  std::shared_ptr<Mask> make_mask(const std::string& name, const Params& params) const;
  std::shared_ptr<Preprocessor> make_preprocessor(const std::string& name, const Params& params) const;
  std::shared_ptr<Evaluator> make_evaluator(const std::string& name, const Params& params) const;
  std::shared_ptr<Allocator> make_allocator(const std::string& name, const Params& params) const;

  // The plugin directory of this build (next to the ptqlab library), or empty.
  static std::filesystem::path default_plugin_dir();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace ptqlab

// Defines the C entry points of a plugin library. Use once per library:
//   PTQLAB_PLUGIN(registrar) { registrar->add_quantizer(schema, factory); }
#define PTQLAB_PLUGIN(registrar_name)                                                              \
  extern "C" __attribute__((visibility("default"))) int ptqlab_plugin_abi_version() {             \
    return PTQLAB_PLUGIN_ABI_VERSION;                                                             \
  }                                                                                               \
  extern "C" __attribute__((visibility("default"))) const char* ptqlab_plugin_build_id() {        \
    static const std::string id = ptqlab::plugin_build_id();                                      \
    return id.c_str();                                                                            \
  }                                                                                               \
  static void ptqlab_plugin_register_impl(ptqlab::PluginRegistrar* registrar_name);               \
  extern "C" __attribute__((visibility("default"))) void ptqlab_plugin_register(                  \
      ptqlab::PluginRegistrar* registrar) {                                                       \
    ptqlab_plugin_register_impl(registrar);                                                       \
  }                                                                                               \
  static void ptqlab_plugin_register_impl(ptqlab::PluginRegistrar* registrar_name)
