// Exact multiple-choice knapsack by dynamic programming over a discretised budget
// (docs/allocation.md, research/bit-allocation.md §3.2.1).
//
// Costs are taken above each unit's cheapest candidate and divided by a quantum q. With q = the gcd
// of all those extra costs the DP is exact for the table. When that would need more than
// max_states budget states, q = ceil(epsilon * B' / U) and costs are rounded UP, so every solution
// the DP finds is feasible in true bits; it is then optimal for the rounded problem and its loss is
// <= OPT(B - U*q).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>

#include <fmt/format.h>

#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/support/error.hpp"

namespace {

using ptqlab::AllocationProblem;

class DpAllocator : public ptqlab::Allocator {
 public:
  explicit DpAllocator(const ptqlab::Params& p)
      : max_states_(p.get_int("max_states")), epsilon_(p.get_real("epsilon")) {}

  ptqlab::Allocation solve(const AllocationProblem& p) override {
    ptqlab::check_allocation_problem(p);
    const std::size_t U = p.cost.size();
    std::vector<std::int64_t> base(U);
    for (std::size_t u = 0; u < U; ++u) {
      std::int64_t lo = std::numeric_limits<std::int64_t>::max();
      for (std::size_t c = 0; c < p.cost[u].size(); ++c)
        if (std::isfinite(p.loss[u][c])) lo = std::min(lo, p.cost[u][c]);
      base[u] = lo;
    }
    const std::int64_t slack = p.budget - std::accumulate(base.begin(), base.end(), std::int64_t{0});

    // The quantum: exact (gcd) when the state count allows it.
    std::int64_t g = 0;
    for (std::size_t u = 0; u < U; ++u)
      for (std::size_t c = 0; c < p.cost[u].size(); ++c)
        if (std::isfinite(p.loss[u][c]) && p.cost[u][c] > base[u]) g = std::gcd(g, p.cost[u][c] - base[u]);
    bool exact = true;
    std::int64_t q = g > 0 ? g : 1;
    if (slack / q > max_states_) {
      exact = false;
      q = std::max<std::int64_t>(q, static_cast<std::int64_t>(std::ceil(epsilon_ * static_cast<double>(slack) /
                                                                         static_cast<double>(U))));
      while (slack / q > max_states_) q *= 2;
    }
    const std::int64_t S = slack / q;  // budget states 0..S

    // dp[s]: least loss of units 0..u-1 with rounded extra cost <= s (so dp is non-increasing in s).
    const double inf = ptqlab::kNeverLoss;
    std::vector<double> dp(S + 1, 0.0), next(S + 1);
    std::vector<std::vector<std::uint16_t>> pick(U, std::vector<std::uint16_t>(S + 1, 0));
    for (std::size_t u = 0; u < U; ++u) {
      std::fill(next.begin(), next.end(), inf);
      for (std::size_t c = 0; c < p.cost[u].size(); ++c) {
        if (!std::isfinite(p.loss[u][c])) continue;
        const std::int64_t extra = p.cost[u][c] - base[u];
        const std::int64_t w = exact ? extra / q : (extra + q - 1) / q;  // rounded up
        const double l = p.loss[u][c];
        for (std::int64_t s = w; s <= S; ++s) {
          const double v = dp[s - w] + l;
          if (v < next[s]) {  // strict: the lower candidate index wins ties
            next[s] = v;
            pick[u][s] = static_cast<std::uint16_t>(c);
          }
        }
      }
      dp.swap(next);
    }
    // Fewest bits among the least-loss states.
    std::int64_t s = S;
    while (s > 0 && dp[s - 1] == dp[S]) --s;
    ptqlab::Allocation a;
    a.choice.assign(U, 0);
    for (std::size_t u = U; u-- > 0;) {
      const int c = pick[u][s];
      a.choice[u] = c;
      const std::int64_t extra = p.cost[u][c] - base[u];
      s -= exact ? extra / q : (extra + q - 1) / q;
    }
    ptqlab::finish_allocation(p, a);
    if (a.bits > p.budget) throw std::logic_error("dp allocator exceeded the budget");
    a.status = exact ? "optimal" : fmt::format("optimal for costs rounded up to {} bits", q);
    if (exact) a.lower_bound = a.loss;
    a.info["quantum_bits"] = static_cast<double>(q);
    a.info["states"] = static_cast<double>(S + 1);
    a.info["exact"] = exact ? 1.0 : 0.0;
    return a;
  }

 private:
  std::int64_t max_states_;
  double epsilon_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema schema;
  schema.name = "dp";
  schema.description =
      "exact multiple-choice knapsack by dynamic programming over the budget (exact for the table when the gcd "
      "quantum fits max_states; else costs rounded up, never over budget)";
  schema.params = {
      {"max_states", ptqlab::ParamType::integer, std::int64_t{500000},
       "most budget states per unit before the budget is discretised more coarsely", 1.0, 1e9, {}},
      {"epsilon", ptqlab::ParamType::real, 1e-4,
       "coarse quantum = epsilon * free budget / units (only when the exact quantum needs too many states)", 1e-9,
       1.0, {}},
  };
  registrar->add_allocator(schema, [](const ptqlab::Params& p) { return std::make_unique<DpAllocator>(p); });
}
