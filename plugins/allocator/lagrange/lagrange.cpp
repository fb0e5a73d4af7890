// Lagrangian relaxation of the multiple-choice knapsack (docs/allocation.md,
// research/bit-allocation.md §3.2.2): for a price λ per bit every unit independently takes
// argmin loss + λ·bits; bisection finds the smallest λ that fits the budget. The dual value
// Σ_u min_c (loss + λ·bits) − λ·B is a lower bound on the optimum (the certificate's gap). Only
// points on each unit's lower convex hull are reachable by prices, so an optional repair fills the
// remaining slack greedily and tries pairwise swaps (one downgrade funds one upgrade).
#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/support/error.hpp"

namespace {

using ptqlab::AllocationProblem;

// Each unit's argmin of loss + λ·cost (ties: fewer bits, then lower index); returns the dual term.
double price_choice(const AllocationProblem& p, double lambda, std::vector<int>& choice) {
  double dual = 0;
  for (std::size_t u = 0; u < p.cost.size(); ++u) {
    int best = -1;
    double best_v = 0;
    for (std::size_t c = 0; c < p.cost[u].size(); ++c) {
      if (!std::isfinite(p.loss[u][c])) continue;
      const double v = p.loss[u][c] + lambda * static_cast<double>(p.cost[u][c]);
      if (best < 0 || v < best_v || (v == best_v && p.cost[u][c] < p.cost[u][best])) {
        best = static_cast<int>(c);
        best_v = v;
      }
    }
    choice[u] = best;
    dual += best_v;
  }
  return dual;
}

// Up to `rounds` improving pairwise swaps: downgrade unit a, upgrade unit b, net loss lower, fits.
void swap_search(const AllocationProblem& p, std::vector<int>& choice, int rounds) {
  const std::size_t U = choice.size();
  std::int64_t bits = ptqlab::allocation_bits(p, choice);
  for (int r = 0; r < rounds; ++r) {
    double best_gain = 0;
    std::size_t ba = 0, bb = 0;
    int ca = -1, cb = -1;
    for (std::size_t a = 0; a < U; ++a)
      for (std::size_t c1 = 0; c1 < p.cost[a].size(); ++c1) {
        const std::int64_t freed = p.cost[a][choice[a]] - p.cost[a][c1];
        const double lost = p.loss[a][c1] - p.loss[a][choice[a]];
        if (freed <= 0 || !std::isfinite(p.loss[a][c1])) continue;
        for (std::size_t b = 0; b < U; ++b) {
          if (b == a) continue;
          for (std::size_t c2 = 0; c2 < p.cost[b].size(); ++c2) {
            const std::int64_t extra = p.cost[b][c2] - p.cost[b][choice[b]];
            const double gain = p.loss[b][choice[b]] - p.loss[b][c2] - lost;
            if (!std::isfinite(p.loss[b][c2]) || bits - freed + extra > p.budget || gain <= best_gain) continue;
            best_gain = gain;
            ba = a, bb = b, ca = static_cast<int>(c1), cb = static_cast<int>(c2);
          }
        }
      }
    if (ca < 0) return;
    bits += p.cost[ba][ca] - p.cost[ba][choice[ba]] + p.cost[bb][cb] - p.cost[bb][choice[bb]];
    choice[ba] = ca;
    choice[bb] = cb;
    ptqlab::fill_slack(p, choice);
    bits = ptqlab::allocation_bits(p, choice);
  }
}

class LagrangeAllocator : public ptqlab::Allocator {
 public:
  explicit LagrangeAllocator(const ptqlab::Params& p)
      : repair_(p.get_bool("repair")), swap_rounds_(static_cast<int>(p.get_int("swap_rounds"))) {}

  ptqlab::Allocation solve(const AllocationProblem& p) override {
    ptqlab::check_allocation_problem(p);
    const std::size_t U = p.cost.size();
    std::vector<int> choice(U), best;
    double best_dual = -ptqlab::kNeverLoss;
    const double B = static_cast<double>(p.budget);
    auto evaluate = [&](double lambda) {
      const double dual = price_choice(p, lambda, choice) - lambda * B;
      best_dual = std::max(best_dual, dual);
      return ptqlab::allocation_bits(p, choice) <= p.budget;
    };
    int iterations = 0;
    double lambda = 0;
    if (evaluate(0.0)) {
      best = choice;
    } else {
      // Bracket: grow λ until the choice fits, then bisect in log space.
      double lo = 0, hi = 1e-30;
      while (!evaluate(hi)) {
        lo = hi;
        hi *= 4;
        if (++iterations > 400) throw std::logic_error("lagrange: no price fits the budget");
      }
      best = choice;
      for (int i = 0; i < 100; ++i, ++iterations) {
        const double mid = lo > 0 ? std::sqrt(lo * hi) : hi / 2;
        if (evaluate(mid)) {
          hi = mid;
          best = choice;
        } else {
          lo = mid;
        }
        if (hi - lo <= 1e-12 * hi) break;
      }
      lambda = hi;
    }
    ptqlab::Allocation a;
    a.choice = best;
    const double dual_loss = ptqlab::allocation_loss(p, best);
    if (repair_) {
      ptqlab::fill_slack(p, a.choice);
      swap_search(p, a.choice, swap_rounds_);
    }
    ptqlab::finish_allocation(p, a);
    a.lower_bound = std::min(best_dual, a.loss);
    a.status = "feasible";
    a.info["lambda"] = lambda;
    a.info["iterations"] = iterations;
    a.info["dual_bound"] = best_dual;
    a.info["loss_before_repair"] = dual_loss;
    a.info["gap"] = a.loss - *a.lower_bound;
    return a;
  }

 private:
  bool repair_;
  int swap_rounds_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema schema;
  schema.name = "lagrange";
  schema.description =
      "Lagrangian relaxation: bisection on the price per bit, dual lower bound, then greedy slack filling and "
      "pairwise swaps";
  schema.params = {
      {"repair", ptqlab::ParamType::boolean, true, "fill the slack greedily and try pairwise swaps after the price "
                                                    "search (only hull points are reachable without it)", {}, {}, {}},
      {"swap_rounds", ptqlab::ParamType::integer, std::int64_t{200}, "most improving pairwise swaps", 0.0, 1e6, {}},
  };
  registrar->add_allocator(schema, [](const ptqlab::Params& p) { return std::make_unique<LagrangeAllocator>(p); });
}
