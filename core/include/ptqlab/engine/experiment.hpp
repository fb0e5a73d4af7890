#pragma once
// YAML experiment files: loading, validation and sweep expansion (docs/experiments.md; component
// parameters: docs/config-reference.md).
//
// The whole file is validated before any compute. Every problem is a ptqlab::Error whose message
// starts with "FILE:LINE:COL: " and, for unknown names, ends with "(did you mean 'x'?)" when a
// known name is close.
#include "ptqlab/support/internal.hpp"  // not part of the plugin SDK
#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "ptqlab/engine/params.hpp"
#include "ptqlab/quant/activation_stream.hpp"
#include "ptqlab/quant/bits.hpp"

namespace ptqlab {

class PluginRegistry;

// A component instance in an arm: which plugin component, with resolved parameters (every
// schema parameter present, defaults filled in).
struct ComponentRef {
  ComponentKind kind = ComponentKind::quantizer;
  std::string name;
  Params params;
  // Parameters at their default whose schema says hashed_when_default = false: left out of the
  // resolved configuration.
  std::vector<std::string> unhashed;
};

// A bit budget resolved for one arm (docs/experiments.md "Bit budgets"): the parameter value
// whose predicted all-in bits per weight is the largest not above the target.
struct BudgetSpec {
  double target_bits = 0;     // all-in bits per weight asked for
  std::string parameter;      // "quantizer.ratio", "mask.ratio"
  ParamValue value;           // the chosen value (also in the component's params)
  double predicted_bits = 0;  // predicted all-in bits per weight with it (<= target_bits)
};

// One candidate configuration of an allocated arm (docs/allocation.md).
struct CandidateSpec {
  std::string label;               // "name:" in the file, else made from the components
  std::optional<ComponentRef> mask;
  ComponentRef quantizer;
  bool whole_layer = false;        // the quantizer works per decoder layer (unit must be 'layer')
};

// An arm's allocation stage: measure every (unit, candidate), solve under the budget, quantize.
struct AllocationSpec {
  ComponentRef allocator;          // an allocator plugin component
  double budget = 0;               // target bits per weight over all quantized linears
  std::string metric = "allin";    // allin | paper: which ledger count the budget limits
  std::string unit = "linear";     // linear | tie (q/k/v, gate/up) | layer
  std::string loss = "hess";       // hess | out_mse: which measured loss the allocator minimises
  std::vector<CandidateSpec> candidates;
  // Resolved when loaded: floor(budget * weights), and the reachable range (bits per weight) of the
  // predicted table, [cheapest mix, dearest mix].
  std::int64_t budget_bits = 0;
  std::int64_t weights = 0;
  double min_bits = 0, max_bits = 0;
};

struct ArmSpec {
  std::string name;                         // unique, [A-Za-z0-9._-]+, file name of its result
  std::vector<ComponentRef> preprocessors;  // applied in order
  std::optional<ComponentRef> mask;
  ComponentRef quantizer;
  std::optional<BudgetSpec> budget;  // when a sweep budget chose a parameter
  std::optional<AllocationSpec> allocation;  // allocated arms: quantizer is unused (name empty)
  std::string resolved_yaml;  // the arm's fully resolved configuration, canonical YAML
  std::string config_hash;    // sha256 hex of resolved_yaml: the resume key
};

struct CalibrationSpec {
  std::filesystem::path text;  // absolute
  int nsamples = 128;
  int seq_len = 0;  // 0 in the file: the model's max_position_embeddings (load_experiment resolves it)
  std::uint64_t seed = 0;
  // What the calibration streams are held in between decoder layers: f32 (exact, the default),
  // bf16 or f16 (half the memory; docs/architecture.md, "Calibration streams").
  StreamDType stream_dtype = StreamDType::f32;
};

struct DatasetSpec {
  std::string name;            // e.g. "wikitext2"
  std::filesystem::path file;  // absolute
  int line = 0, column = 0;    // where the dataset is named in the experiment file (1-based)
};

struct EvaluatorSpec {
  ComponentRef evaluator;
  std::vector<DatasetSpec> datasets;
};

struct Experiment {
  std::filesystem::path file;  // the YAML file (absolute)
  std::string name;            // "name:" or the file's stem
  std::filesystem::path model_dir;  // absolute
  std::uint64_t seed = 0;
  CalibrationSpec calibration;
  std::vector<EvaluatorSpec> evaluators;
  std::vector<std::filesystem::path> plugin_paths;  // absolute, in file order
  bool log_tensors = false;
  std::vector<ArmSpec> arms;  // after base merging and sweep expansion, in file order
};

// Reads plugin_paths from the file only (so the caller can load plugins before full validation).
std::vector<std::filesystem::path> experiment_plugin_paths(const std::filesystem::path& yaml_file);

// The quantized linears of a model by shape: [rows, cols] = [out, in] and how many there are.
struct LinearShape {
  std::int64_t rows = 0, cols = 0, count = 0;
};
// q, k, v, o, gate, up, down of every decoder layer, equal shapes merged, in first-seen order.
struct LlamaConfig;
std::vector<LinearShape> linear_shapes(const LlamaConfig& config);

// Where load_experiment looks up component schemas: the PluginRegistry in the engine, a fixed set
// of schemas in tests.
class SchemaSource {
 public:
  virtual ~SchemaSource() = default;
  // nullptr when there is no such component.
  virtual const ComponentSchema* find(ComponentKind kind, const std::string& name) const = 0;
  // Every component name of a kind (for "did you mean" hints and lists of known names).
  virtual std::vector<std::string> names(ComponentKind kind) const = 0;
  // The ledger summed over `shapes` (each counted `count` times) that an arm with this quantizer
  // and mask would record, predicted from shapes and parameters alone (bit budgets). Throws
  // ptqlab::Error saying which component cannot predict (its bits depend on the data). The
  // default: no prediction available.
  virtual BitCount predict_bits(const ComponentRef& quantizer, const std::optional<ComponentRef>& mask,
                                const std::vector<LinearShape>& shapes) const;
  // Whether the quantizer works per decoder layer (block reconstruction); default false.
  virtual bool quantizes_whole_layers(const ComponentRef& /*quantizer*/) const { return false; }
};

// A SchemaSource over a fixed list of schemas, for validating experiments without loading
// plugins (the experiment tests and the fuzz target). Predicts no bits.
class SchemaList final : public SchemaSource {
 public:
  void add(ComponentKind kind, std::string name, std::vector<ParamSpec> params);
  const ComponentSchema* find(ComponentKind kind, const std::string& name) const override;
  std::vector<std::string> names(ComponentKind kind) const override;

 private:
  std::vector<ComponentSchema> schemas_;
};

// SchemaSource::predict_bits with the registry's plugins: Quantizer::predict_bits on each shape
// with the Mask::predict of the arm mask, plus the mask's storage (as the engine adds it).
BitCount predict_arm_bits(const PluginRegistry& registry, const ComponentRef& quantizer,
                          const std::optional<ComponentRef>& mask, const std::vector<LinearShape>& shapes);

// The candidate values a budget searches: lo, lo + step, ... up to hi (both included; reals
// rounded to 12 significant digits so names stay short), as ints for int parameters.
std::vector<ParamValue> budget_candidates(ParamType type, double lo, double hi, double step);
// The index of the candidate whose bits are the largest not above target (ties: the last, i.e.
// the largest value), or nullopt when every candidate is above it.
std::optional<std::size_t> pick_for_budget(double target_bits, const std::vector<double>& candidate_bits);

// Loads and validates the file against the registry's component schemas. Relative paths in the
// file are resolved against the file's directory. calibration.seq_len comes back resolved (never 0).
Experiment load_experiment(const std::filesystem::path& yaml_file, const PluginRegistry& registry);
Experiment load_experiment(const std::filesystem::path& yaml_file, const SchemaSource& schemas);

// Closest candidate within edit distance 2 (or 1/3 of the length for long names), for "did you
// mean" hints; nullopt when none is close.
std::optional<std::string> closest_match(const std::string& word, const std::vector<std::string>& candidates);

}  // namespace ptqlab
