#pragma once
// Mixed-precision bit allocation (docs/allocation.md): the measured table of every unit's bits and
// loss under every candidate configuration, the problem an allocator plugin solves (a
// multiple-choice knapsack: one candidate per unit, total bits <= budget, minimal total loss), and
// the solvers' shared helpers.
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "ptqlab/model/model.hpp"

namespace ptqlab {

// One decision: linears of one decoder layer that always get the same candidate (a single linear,
// a tie group such as q/k/v, or the whole layer).
struct AllocationUnit {
  std::string name;             // "layer3/q_proj", "layer3/qkv", "layer3"
  int layer = 0;
  std::vector<Linear> linears;  // members, kAllLinears order
  std::int64_t weights = 0;
};

// loss[u][c] and bits[u][c] for every unit and candidate, measured once and shared by every arm and
// budget with the same model, calibration windows, units and candidates (content-addressed).
struct AllocationTable {
  std::vector<AllocationUnit> units;
  std::vector<std::string> candidates;                 // labels, in the arm's order
  std::vector<std::vector<std::int64_t>> bits_allin;   // [unit][candidate] ledger all-in bits
  std::vector<std::vector<std::int64_t>> bits_paper;   // [unit][candidate] paper-convention bits (rounded up)
  std::vector<std::vector<double>> loss_hess;          // tr(ΔW H ΔWᵀ), H = 2XᵀX/n, summed over the unit
  std::vector<std::vector<double>> loss_mse;           // mean over tokens and outputs of (X ΔWᵀ)², summed
  std::vector<std::vector<double>> seconds;            // measurement time per (unit, candidate)
  // [layer][candidate]: mean over tokens and hidden units of the squared difference between the
  // decoder layer's output with the candidate's quantized layer and with the FP layer, both on the
  // FP inputs (loss: block_mse; per layer whatever the units, so only layer units use it).
  std::vector<std::vector<double>> loss_block;
  int num_layers = 0;
  std::string key;  // the content hash it is cached under
  bool from_cache = false;  // loaded from the artifact cache rather than measured in this run
};

// What an allocator solves: pick one candidate per unit with Σ cost <= budget minimising Σ loss.
// Costs are integer bits >= 0; a loss of +inf marks a candidate that must never be chosen.
struct AllocationProblem {
  std::vector<std::vector<std::int64_t>> cost;  // [unit][candidate]
  std::vector<std::vector<double>> loss;        // [unit][candidate]
  std::int64_t budget = 0;
  // Where each unit sits (rule-based allocators read layer and linears; may be empty in tests).
  std::vector<AllocationUnit> units;
  int num_layers = 0;
};

// A solver's answer and its certificate.
struct Allocation {
  std::vector<int> choice;  // candidate index per unit
  double loss = 0;          // Σ loss of the choice
  std::int64_t bits = 0;    // Σ cost of the choice (<= budget)
  std::string status;       // "optimal", "feasible", "optimal (GLPK)", ...
  std::optional<double> lower_bound;    // proven lower bound on the optimal loss, when the solver has one
  std::map<std::string, double> info;   // solver details (states, iterations, gap, lambda, ...)
};

class Allocator {
 public:
  virtual ~Allocator() = default;
  // Throws ptqlab::Error when the problem has no feasible assignment.
  virtual Allocation solve(const AllocationProblem& problem) = 0;
};

// The decision units of a model: "linear" (each linear of each layer), "tie" (q/k/v, o, gate/up,
// down per layer: fused kernels need one format) or "layer" (all seven linears of a layer).
std::vector<AllocationUnit> allocation_units(const LlamaConfig& config, const std::string& kind);
// [out, in] of one linear.
std::pair<std::int64_t, std::int64_t> linear_shape(const LlamaConfig& config, Linear which);

// ---------------------------------------------------------------------------------------------
// Helpers shared by the allocator plugins.

inline constexpr double kNeverLoss = std::numeric_limits<double>::infinity();

// Σ cost / Σ loss of an assignment.
std::int64_t allocation_bits(const AllocationProblem& p, const std::vector<int>& choice);
double allocation_loss(const AllocationProblem& p, const std::vector<int>& choice);
// Σ_u min_c cost and Σ_u max_c cost over finite-loss candidates: the reachable budget range.
std::int64_t cheapest_mix(const AllocationProblem& p);
std::int64_t dearest_mix(const AllocationProblem& p);
// Checks shapes (every unit has >= 1 candidate with finite loss, costs >= 0, equal row lengths)
// and that the cheapest mix fits the budget; throws ptqlab::Error naming the reachable range.
void check_allocation_problem(const AllocationProblem& p);
// Fills loss and bits of `a` from its choice.
void finish_allocation(const AllocationProblem& p, Allocation& a);
// Lower convex hull of one unit's (cost, loss) points, cheapest first: candidate indices whose
// successive slopes (loss drop per extra bit) decrease. Dominated and +inf candidates are dropped.
std::vector<int> lower_hull(const std::vector<std::int64_t>& cost, const std::vector<double>& loss);
// Greedy repair: while some single-unit upgrade fits the slack, take the one with the best loss
// decrease per extra bit (any candidate, not only hull points). Never increases the loss.
void fill_slack(const AllocationProblem& p, std::vector<int>& choice);

// Exhaustive search (tests; at most ~10^6 assignments).
Allocation brute_force_allocation(const AllocationProblem& p);

}  // namespace ptqlab
