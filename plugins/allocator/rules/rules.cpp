// A llama.cpp-style fixed-rule mix, the zero-measurement baseline (docs/allocation.md,
// research/bit-allocation.md §2.8). Candidates are ranked per unit by bits (level 0 = cheapest).
// Every unit gets a base level k; units holding v_proj or down_proj on the "more bits" layers of
// llama.cpp's use_more_bits (the first n/8, the last n/8 and every third layer in between) get
// level k+1. k is the highest level whose mix fits the budget. The measured losses are ignored
// except that failed (+inf) candidates are never used.
#include <algorithm>
#include <cmath>
#include <numeric>

#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/support/error.hpp"

namespace {

using ptqlab::AllocationProblem;

bool use_more_bits(int layer, int n) { return layer < n / 8 || layer >= 7 * n / 8 || (layer - n / 8) % 3 == 2; }

class RulesAllocator : public ptqlab::Allocator {
 public:
  explicit RulesAllocator(const ptqlab::Params& p) : bump_(static_cast<int>(p.get_int("bump"))) {}

  ptqlab::Allocation solve(const AllocationProblem& p) override {
    ptqlab::check_allocation_problem(p);
    const std::size_t U = p.cost.size();
    std::vector<std::vector<int>> levels(U);  // finite candidates by bits (then index)
    std::vector<bool> favoured(U, false);
    std::size_t max_levels = 0;
    for (std::size_t u = 0; u < U; ++u) {
      for (std::size_t c = 0; c < p.cost[u].size(); ++c)
        if (std::isfinite(p.loss[u][c])) levels[u].push_back(static_cast<int>(c));
      std::stable_sort(levels[u].begin(), levels[u].end(), [&](int a, int b) { return p.cost[u][a] < p.cost[u][b]; });
      max_levels = std::max(max_levels, levels[u].size());
      if (u < p.units.size()) {
        const auto& m = p.units[u].linears;
        const bool sensitive = std::find(m.begin(), m.end(), ptqlab::Linear::v_proj) != m.end() ||
                               std::find(m.begin(), m.end(), ptqlab::Linear::down_proj) != m.end();
        favoured[u] = sensitive && use_more_bits(p.units[u].layer, p.num_layers);
      }
    }
    auto mix = [&](int k, int bump) {
      std::vector<int> choice(U);
      for (std::size_t u = 0; u < U; ++u) {
        const int level = std::min<int>(k + (favoured[u] ? bump : 0), static_cast<int>(levels[u].size()) - 1);
        choice[u] = levels[u][level];
      }
      return choice;
    };
    ptqlab::Allocation a;
    a.choice = mix(0, 0);  // the cheapest mix always fits (checked above)
    int chosen = 0, bumped = 0;
    // The highest base level that fits, with the bump if it fits too.
    for (int k = static_cast<int>(max_levels) - 1; k >= 0; --k) {
      bool done = false;
      for (int b : {bump_, 0}) {
        auto c = mix(k, b);
        if (ptqlab::allocation_bits(p, c) <= p.budget) {
          a.choice = c;
          chosen = k;
          bumped = b;
          done = true;
          break;
        }
      }
      if (done) break;
    }
    ptqlab::finish_allocation(p, a);
    a.status = "rule";
    a.info["base_level"] = chosen;
    a.info["bump"] = bumped;
    return a;
  }

 private:
  int bump_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema schema;
  schema.name = "rules";
  schema.description =
      "llama.cpp-style fixed rules: one base level for all units, v_proj/down_proj on use_more_bits layers one level "
      "up; the highest base level that fits (ignores the measured losses)";
  schema.params = {
      {"bump", ptqlab::ParamType::integer, std::int64_t{1}, "levels added for the favoured units", 0.0, 16.0, {}},
  };
  registrar->add_allocator(schema, [](const ptqlab::Params& p) { return std::make_unique<RulesAllocator>(p); });
}
