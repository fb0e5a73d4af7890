// BAQ's closed-form allocation applied across units (docs/allocation.md, research/bit-allocation.md
// §2.4 and §3.2.5). Each unit's loss is modelled from ONE measurement, at the candidate nearest the
// budget's mean rate R̄: ℓ_u(R) = ℓ_u · 2^(−θ (R − r_u)), R in bits per weight. Minimising Σ ℓ_u(R_u)
// subject to Σ n_u R_u = B equalises θ ln2 ℓ_u(R_u) / n_u = μ (the loss per weight), so
//   R_u(μ) = r_u + log2(θ ln2 ℓ_u / (μ n_u)) / θ, clamped to the unit's candidate range,
// and μ is found by bisection (reverse water-filling). Each unit then takes its dearest candidate
// not above R_u, and the slack is filled greedily by the model's predicted losses. The measured
// table is only used at the reference points, as BAQ does.
#include <algorithm>
#include <cmath>

#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/support/error.hpp"

namespace {

using ptqlab::AllocationProblem;

class BaqAllocator : public ptqlab::Allocator {
 public:
  explicit BaqAllocator(const ptqlab::Params& p) : theta_(p.get_real("theta")) {}

  ptqlab::Allocation solve(const AllocationProblem& p) override {
    ptqlab::check_allocation_problem(p);
    const std::size_t U = p.cost.size();
    std::vector<double> n(U), ref_rate(U), ref_loss(U), rmin(U), rmax(U);
    double total_n = 0;
    for (std::size_t u = 0; u < U; ++u) {
      // Weights per unit; without unit descriptions (tests) the cheapest candidate's bits stand in.
      n[u] = u < p.units.size() && p.units[u].weights > 0 ? static_cast<double>(p.units[u].weights)
                                                          : static_cast<double>(std::max<std::int64_t>(
                                                                1, *std::min_element(p.cost[u].begin(), p.cost[u].end())));
      total_n += n[u];
    }
    const double mean_rate = static_cast<double>(p.budget) / total_n;
    for (std::size_t u = 0; u < U; ++u) {
      int ref = -1;
      rmin[u] = ptqlab::kNeverLoss;
      rmax[u] = -ptqlab::kNeverLoss;
      for (std::size_t c = 0; c < p.cost[u].size(); ++c) {
        if (!std::isfinite(p.loss[u][c])) continue;
        const double r = static_cast<double>(p.cost[u][c]) / n[u];
        rmin[u] = std::min(rmin[u], r);
        rmax[u] = std::max(rmax[u], r);
        if (ref < 0 || std::abs(r - mean_rate) < std::abs(ref_rate[u] - mean_rate)) {
          ref = static_cast<int>(c);
          ref_rate[u] = r;
        }
      }
      ref_loss[u] = std::max(p.loss[u][ref], 1e-300);  // a lossless reference: the model says "any rate"
    }
    const double k = theta_ * std::log(2.0);
    auto rate = [&](std::size_t u, double log_mu) {
      const double r = ref_rate[u] + (std::log2(k * ref_loss[u] / n[u]) - log_mu / std::log(2.0)) / theta_;
      return std::clamp(r, rmin[u], rmax[u]);
    };
    auto spent = [&](double log_mu) {
      double s = 0;
      for (std::size_t u = 0; u < U; ++u) s += n[u] * rate(u, log_mu);
      return s;
    };
    // Larger μ -> fewer bits. Bisect log μ so that Σ n R = B (or the ends when out of range).
    double lo = -1500, hi = 1500;
    for (int i = 0; i < 200; ++i) {
      const double mid = (lo + hi) / 2;
      if (spent(mid) > static_cast<double>(p.budget)) lo = mid;
      else hi = mid;
    }
    const double log_mu = hi;
    // Predicted table and the rounded-down choice.
    AllocationProblem model = p;
    ptqlab::Allocation a;
    a.choice.resize(U);
    double predicted_uniform = 0, predicted_closed_form = 0;
    for (std::size_t u = 0; u < U; ++u) {
      const double target = rate(u, log_mu);
      int fit = -1, cheapest = -1;  // the dearest candidate not above the target, else the cheapest
      for (std::size_t c = 0; c < p.cost[u].size(); ++c) {
        if (!std::isfinite(p.loss[u][c])) continue;
        const double r = static_cast<double>(p.cost[u][c]) / n[u];
        model.loss[u][c] = ref_loss[u] * std::exp2(-theta_ * (r - ref_rate[u]));
        if (cheapest < 0 || p.cost[u][c] < p.cost[u][cheapest]) cheapest = static_cast<int>(c);
        if (r <= target * (1 + 1e-12) && (fit < 0 || p.cost[u][c] > p.cost[u][fit])) fit = static_cast<int>(c);
      }
      const int pick = fit >= 0 ? fit : cheapest;
      a.choice[u] = pick;
      predicted_uniform += ref_loss[u] * std::exp2(-theta_ * (mean_rate - ref_rate[u]));
      predicted_closed_form += ref_loss[u] * std::exp2(-theta_ * (target - ref_rate[u]));
    }
    // Rounding down cannot overshoot, but a unit whose cheapest candidate is above its target can;
    // give bits back by downgrading where the model says it costs least.
    while (ptqlab::allocation_bits(p, a.choice) > p.budget) {
      std::size_t bu = U;
      int bc = -1;
      double best = ptqlab::kNeverLoss;
      for (std::size_t u = 0; u < U; ++u)
        for (std::size_t c = 0; c < p.cost[u].size(); ++c) {
          const std::int64_t freed = p.cost[u][a.choice[u]] - p.cost[u][c];
          if (freed <= 0 || !std::isfinite(p.loss[u][c])) continue;
          const double per_bit = (model.loss[u][c] - model.loss[u][a.choice[u]]) / static_cast<double>(freed);
          if (per_bit < best) {
            best = per_bit;
            bu = u;
            bc = static_cast<int>(c);
          }
        }
      if (bu == U) throw std::logic_error("baq: cannot get under the budget");
      a.choice[bu] = bc;
    }
    ptqlab::fill_slack(model, a.choice);
    ptqlab::finish_allocation(p, a);
    a.status = "feasible (closed form)";
    a.info["theta"] = theta_;
    a.info["log_mu"] = log_mu;
    // BAQ's "theoretical gain": the model's loss at the closed-form rates over uniform rates.
    a.info["predicted_gain"] = predicted_uniform > 0 ? predicted_closed_form / predicted_uniform : 1.0;
    a.info["predicted_loss"] = ptqlab::allocation_loss(model, a.choice);
    return a;
  }

 private:
  double theta_;
};

}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema schema;
  schema.name = "baq";
  schema.description =
      "BAQ's closed form: loss modelled as l_u * 2^(-theta (R - r_u)) from one measurement per unit, equal loss per "
      "weight, rates rounded down, slack filled by the model";
  schema.params = {
      {"theta", ptqlab::ParamType::real, 1.95, "rate exponent of the loss model (2 in high-rate theory)", 0.01, 100.0, {}},
  };
  registrar->add_allocator(schema, [](const ptqlab::Params& p) { return std::make_unique<BaqAllocator>(p); });
}
