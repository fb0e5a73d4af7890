// The allocation problem's shared helpers: totals, the reachable range, convex hulls, greedy
// slack filling and the brute-force reference (docs/allocation.md).
#include "ptqlab/quant/allocation.hpp"

#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "ptqlab/model/model_config.hpp"
#include "ptqlab/support/error.hpp"

namespace ptqlab {

std::pair<std::int64_t, std::int64_t> linear_shape(const LlamaConfig& c, Linear which) {
  const std::int64_t h = c.hidden_size, q = c.q_dim(), kv = c.kv_dim(), ff = c.intermediate_size;
  switch (which) {
    case Linear::q_proj: return {q, h};
    case Linear::k_proj:
    case Linear::v_proj: return {kv, h};
    case Linear::o_proj: return {h, q};
    case Linear::gate_proj:
    case Linear::up_proj: return {ff, h};
    case Linear::down_proj: return {h, ff};
  }
  return {0, 0};
}

std::vector<AllocationUnit> allocation_units(const LlamaConfig& c, const std::string& kind) {
  std::vector<std::pair<std::string, std::vector<Linear>>> groups;
  if (kind == "linear") {
    for (Linear w : kAllLinears) groups.push_back({linear_name(w), {w}});
  } else if (kind == "tie") {
    groups = {{"qkv", {Linear::q_proj, Linear::k_proj, Linear::v_proj}},
              {"o_proj", {Linear::o_proj}},
              {"gate_up", {Linear::gate_proj, Linear::up_proj}},
              {"down_proj", {Linear::down_proj}}};
  } else if (kind == "layer") {
    groups = {{"all", {kAllLinears.begin(), kAllLinears.end()}}};
  } else {
    throw std::logic_error("allocation_units: unknown unit kind " + kind);
  }
  std::vector<AllocationUnit> out;
  for (int l = 0; l < c.num_layers; ++l)
    for (const auto& [name, members] : groups) {
      AllocationUnit u;
      u.name = kind == "layer" ? fmt::format("layer{}", l) : fmt::format("layer{}/{}", l, name);
      u.layer = l;
      u.linears = members;
      for (Linear w : members) {
        const auto [rows, cols] = linear_shape(c, w);
        u.weights += rows * cols;
      }
      out.push_back(std::move(u));
    }
  return out;
}

std::int64_t allocation_bits(const AllocationProblem& p, const std::vector<int>& choice) {
  std::int64_t total = 0;
  for (std::size_t u = 0; u < choice.size(); ++u) total += p.cost[u][choice[u]];
  return total;
}

double allocation_loss(const AllocationProblem& p, const std::vector<int>& choice) {
  double total = 0;
  for (std::size_t u = 0; u < choice.size(); ++u) total += p.loss[u][choice[u]];
  return total;
}

namespace {
template <class Pick>
std::int64_t mix(const AllocationProblem& p, Pick pick) {
  std::int64_t total = 0;
  for (std::size_t u = 0; u < p.cost.size(); ++u) {
    std::optional<std::int64_t> best;
    for (std::size_t c = 0; c < p.cost[u].size(); ++c)
      if (std::isfinite(p.loss[u][c]) && (!best || pick(p.cost[u][c], *best))) best = p.cost[u][c];
    total += best.value_or(0);
  }
  return total;
}
}  // namespace

std::int64_t cheapest_mix(const AllocationProblem& p) {
  return mix(p, [](std::int64_t a, std::int64_t b) { return a < b; });
}
std::int64_t dearest_mix(const AllocationProblem& p) {
  return mix(p, [](std::int64_t a, std::int64_t b) { return a > b; });
}

void check_allocation_problem(const AllocationProblem& p) {
  if (p.cost.size() != p.loss.size()) throw Error("allocation: cost and loss tables have different unit counts");
  if (p.cost.empty()) throw Error("allocation: no units");
  for (std::size_t u = 0; u < p.cost.size(); ++u) {
    if (p.cost[u].size() != p.loss[u].size() || p.cost[u].empty())
      throw Error(fmt::format("allocation: unit {} has no candidates or mismatched rows", u));
    bool any = false;
    for (std::size_t c = 0; c < p.cost[u].size(); ++c) {
      if (p.cost[u][c] < 0) throw Error(fmt::format("allocation: unit {} candidate {} has negative bits", u, c));
      if (std::isnan(p.loss[u][c]) || p.loss[u][c] < 0)
        throw Error(fmt::format("allocation: unit {} candidate {} has loss {}", u, c, p.loss[u][c]));
      any = any || std::isfinite(p.loss[u][c]);
    }
    if (!any) throw Error(fmt::format("allocation: every candidate of unit {} failed (infinite loss)", u));
  }
  const auto lo = cheapest_mix(p);
  if (lo > p.budget)
    throw Error(fmt::format("allocation: budget {} bits is below the cheapest mix ({} bits; reachable range [{}, {}])",
                            p.budget, lo, lo, dearest_mix(p)));
}

void finish_allocation(const AllocationProblem& p, Allocation& a) {
  a.bits = allocation_bits(p, a.choice);
  a.loss = allocation_loss(p, a.choice);
}

std::vector<int> lower_hull(const std::vector<std::int64_t>& cost, const std::vector<double>& loss) {
  std::vector<int> order;
  for (std::size_t c = 0; c < cost.size(); ++c)
    if (std::isfinite(loss[c])) order.push_back(static_cast<int>(c));
  // Cheapest first; equal cost: lower loss first, then lower index.
  std::sort(order.begin(), order.end(), [&](int a, int b) {
    if (cost[a] != cost[b]) return cost[a] < cost[b];
    if (loss[a] != loss[b]) return loss[a] < loss[b];
    return a < b;
  });
  // Pareto front: strictly decreasing loss as cost grows.
  std::vector<int> front;
  for (int c : order)
    if (front.empty() || (cost[c] > cost[front.back()] && loss[c] < loss[front.back()])) front.push_back(c);
  // Lower convex hull of the front (monotone chain).
  std::vector<int> hull;
  for (int c : front) {
    while (hull.size() >= 2) {
      const int a = hull[hull.size() - 2], b = hull.back();
      // b is above the segment a..c (or on it): drop it.
      const double cross = (static_cast<double>(cost[b] - cost[a])) * (loss[c] - loss[a]) -
                           (loss[b] - loss[a]) * static_cast<double>(cost[c] - cost[a]);
      if (cross <= 0) hull.pop_back();
      else break;
    }
    hull.push_back(c);
  }
  return hull;
}

void fill_slack(const AllocationProblem& p, std::vector<int>& choice) {
  std::int64_t slack = p.budget - allocation_bits(p, choice);
  for (;;) {
    int best_u = -1, best_c = -1;
    double best_rate = 0;
    for (std::size_t u = 0; u < choice.size(); ++u) {
      const int cur = choice[u];
      for (std::size_t c = 0; c < p.cost[u].size(); ++c) {
        const std::int64_t extra = p.cost[u][c] - p.cost[u][cur];
        const double gain = p.loss[u][cur] - p.loss[u][c];
        if (!(gain > 0) || extra > slack || !std::isfinite(p.loss[u][c])) continue;
        // Free improvements first (extra <= 0), then the best gain per bit.
        const double rate = extra <= 0 ? std::numeric_limits<double>::infinity() : gain / static_cast<double>(extra);
        if (best_u < 0 || rate > best_rate ||
            (rate == best_rate && gain > p.loss[best_u][choice[best_u]] - p.loss[best_u][best_c])) {
          best_u = static_cast<int>(u);
          best_c = static_cast<int>(c);
          best_rate = rate;
        }
      }
    }
    if (best_u < 0) return;
    slack -= p.cost[best_u][best_c] - p.cost[best_u][choice[best_u]];
    choice[best_u] = best_c;
  }
}

Allocation brute_force_allocation(const AllocationProblem& p) {
  check_allocation_problem(p);
  const std::size_t U = p.cost.size();
  std::vector<int> choice(U, 0), best;
  double best_loss = kNeverLoss;
  std::int64_t best_bits = 0;
  for (;;) {
    const auto bits = allocation_bits(p, choice);
    const double loss = allocation_loss(p, choice);
    if (bits <= p.budget && (loss < best_loss || (loss == best_loss && bits < best_bits) || best.empty())) {
      if (std::isfinite(loss) || best.empty()) {
        best = choice;
        best_loss = loss;
        best_bits = bits;
      }
    }
    std::size_t u = 0;
    while (u < U && ++choice[u] == static_cast<int>(p.cost[u].size())) choice[u++] = 0;
    if (u == U) break;
  }
  Allocation a;
  a.choice = best;
  a.status = "optimal (brute force)";
  finish_allocation(p, a);
  a.lower_bound = a.loss;
  return a;
}

}  // namespace ptqlab
