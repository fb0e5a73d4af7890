#pragma once
// The engine's allocation stage (docs/allocation.md): measuring the loss[unit][candidate] table
// on the calibration windows, solving it with an allocator plugin under the arm's budget, and the
// per-linear plan the layer-wise pipeline then quantizes with.
//
// Measurement ("fp chain"): the FP model is run layer by layer over the calibration windows; at
// each layer every candidate quantizes a copy of that layer's linears with the FP inputs' Hessian
// H = 2XᵀX/n, and each linear's loss is tr(ΔW H ΔWᵀ) (the Hessian-weighted output error) and the
// measured output MSE mean((X ΔWᵀ)²) on the captured inputs X. Units sum their linears.
#include "ptqlab/support/internal.hpp"  // not part of the plugin SDK
#include <array>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "ptqlab/engine/experiment.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/outputs/results.hpp"
#include "ptqlab/quant/allocation.hpp"
#include "ptqlab/quant/calibration.hpp"

namespace ptqlab {

class ArtifactCache;

// The objects of one candidate (made from its CandidateSpec by the registry).
struct CandidateComponents {
  std::shared_ptr<Quantizer> quantizer;
  std::shared_ptr<Mask> mask;
};
std::vector<CandidateComponents> make_candidates(const PluginRegistry& registry, const AllocationSpec& spec);

struct MeasureOptions {
  const ModelInputStats* input_stats = nullptr;  // FP statistics, when a candidate needs them
  std::uint64_t seed = 0;
  std::function<void(const std::string&)> status;  // progress: "layer 2/5, candidate 3/4 (ETA ...)"
};

// The content key of a table: RunKeys::allocation_table (ptqlab/engine/cache_keys.hpp).

// tr(ΔW H ΔWᵀ) with ΔW = wq - w, in double (the `hess` loss of one linear).
double hessian_weighted_error(const Matrix& w, const Matrix& wq, const Eigen::MatrixXd& h);

// The per-linear table (units "layer<l>/<linear>", layer-major, kAllLinears order: what
// measure_allocation_table makes) summed into `units` (bits, losses and seconds add up).
AllocationTable aggregate_allocation_table(const AllocationTable& per_linear, const std::vector<AllocationUnit>& units);

// Measures the per-linear table (spec.unit is not used: see aggregate_allocation_table).
AllocationTable measure_allocation_table(const LlamaModel& model, const std::vector<std::vector<int>>& windows,
                                         const AllocationSpec& spec, const std::vector<CandidateComponents>& candidates,
                                         const MeasureOptions& options);

// The table through the on-disk cache: loaded when present and complete, else measured and stored.
AllocationTable cached_allocation_table(const ArtifactCache& cache, const std::string& key, const LlamaModel& model,
                                        const std::vector<std::vector<int>>& windows, const AllocationSpec& spec,
                                        const std::vector<CandidateComponents>& candidates,
                                        const MeasureOptions& options, bool* loaded = nullptr);

// JSON text of a table and back (the cache entry format). from_json returns nullopt on any problem.
std::string allocation_table_json(const AllocationTable& table);
std::optional<AllocationTable> allocation_table_from_json(const std::string& text);

// The solver's problem for this arm: costs from the metric's ledger count, the chosen loss.
AllocationProblem allocation_problem(const AllocationTable& table, const AllocationSpec& spec);

// Solves and returns the record (for the result file) and the per-linear plan for quantize_layerwise.
struct AllocationOutcome {
  AllocationRecord record;
  std::vector<std::array<LayerwiseOptions::LinearChoice, 7>> plan;
};
AllocationOutcome solve_allocation(const AllocationTable& table, const AllocationSpec& spec, Allocator& allocator,
                                   const std::vector<CandidateComponents>& candidates);

// After quantization: the ledger's totals (all-in and paper) against the budget. Records them and
// throws ptqlab::Error when the budget was exceeded.
void confirm_allocation_budget(const AllocationSpec& spec, const std::vector<LinearRecord>& linears,
                               AllocationRecord& record);

}  // namespace ptqlab
