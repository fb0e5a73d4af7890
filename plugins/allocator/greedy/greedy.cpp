// Greedy marginal gain (docs/allocation.md, research/bit-allocation.md §3.2.3): start from every
// unit's cheapest candidate and take upgrades along each unit's lower convex hull in the order of
// their loss drop per extra bit, stopping at the first that does not fit. Without `fill` the
// allocations are nested in the budget (a larger budget only adds upgrades), as in BitStack.
#include <algorithm>
#include <cmath>
#include <queue>

#include "ptqlab/engine/plugin.hpp"

namespace {

using ptqlab::AllocationProblem;

class GreedyAllocator : public ptqlab::Allocator {
 public:
  explicit GreedyAllocator(const ptqlab::Params& p) : fill_(p.get_bool("fill")) {}

  ptqlab::Allocation solve(const AllocationProblem& p) override {
    ptqlab::check_allocation_problem(p);
    const std::size_t U = p.cost.size();
    std::vector<std::vector<int>> hull(U);
    std::vector<std::size_t> at(U, 0);  // position on the hull
    ptqlab::Allocation a;
    a.choice.resize(U);
    for (std::size_t u = 0; u < U; ++u) {
      hull[u] = ptqlab::lower_hull(p.cost[u], p.loss[u]);
      a.choice[u] = hull[u][0];
    }
    struct Step {
      double rate;
      std::size_t unit;
      bool operator<(const Step& o) const { return rate < o.rate || (rate == o.rate && unit > o.unit); }
    };
    auto next_step = [&](std::size_t u) -> std::optional<Step> {
      if (at[u] + 1 >= hull[u].size()) return std::nullopt;
      const int c0 = hull[u][at[u]], c1 = hull[u][at[u] + 1];
      return Step{(p.loss[u][c0] - p.loss[u][c1]) / static_cast<double>(p.cost[u][c1] - p.cost[u][c0]), u};
    };
    std::priority_queue<Step> heap;
    for (std::size_t u = 0; u < U; ++u)
      if (auto s = next_step(u)) heap.push(*s);
    std::int64_t bits = ptqlab::allocation_bits(p, a.choice);
    int steps = 0;
    while (!heap.empty()) {
      const Step s = heap.top();
      const std::size_t u = s.unit;
      const int c1 = hull[u][at[u] + 1];
      const std::int64_t extra = p.cost[u][c1] - p.cost[u][a.choice[u]];
      if (bits + extra > p.budget) break;  // the first upgrade that does not fit ends the walk
      heap.pop();
      bits += extra;
      a.choice[u] = c1;
      ++at[u];
      ++steps;
      if (auto n = next_step(u)) heap.push(*n);
    }
    if (fill_) ptqlab::fill_slack(p, a.choice);
    ptqlab::finish_allocation(p, a);
    a.status = fill_ ? "feasible (greedy + fill)" : "feasible (greedy, nested)";
    a.info["upgrades"] = steps;
    return a;
  }

 private:
  bool fill_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema schema;
  schema.name = "greedy";
  schema.description =
      "greedy marginal gain along each unit's lower convex hull (largest loss drop per bit first); nested in the "
      "budget unless fill";
  schema.params = {
      {"fill", ptqlab::ParamType::boolean, false,
       "after the walk, also take any upgrade that still fits (better loss, no longer nested)", {}, {}, {}},
  };
  registrar->add_allocator(schema, [](const ptqlab::Params& p) { return std::make_unique<GreedyAllocator>(p); });
}
