// The allocator plugins on synthetic tables (docs/allocation.md): the DP equals brute force, the
// GLPK integer program equals the DP, heuristics are feasible and never beat the optimum, bits never
// exceed the budget, the optimum is non-increasing in the budget, greedy is nested, BAQ's closed
// form equalises loss per weight, and the reachable-range error.
#include <gtest/gtest.h>

#include <random>

#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/quant/allocation.hpp"
#include "ptqlab/support/error.hpp"

namespace ptqlab {
namespace {

const PluginRegistry& registry() {
  static PluginRegistry r;
  static const bool loaded = (r.add_search_path(PluginRegistry::default_plugin_dir()), true);
  (void)loaded;
  return r;
}

std::shared_ptr<Allocator> make(const std::string& name, std::map<std::string, ParamValue> given = {}) {
  const auto* schema = registry().find(ComponentKind::allocator, name);
  if (schema == nullptr) throw std::runtime_error("allocator plugin '" + name + "' is not built");
  return registry().make_allocator(name, Params::resolve(*schema, given));
}

// U units x K candidates; bits grow with the candidate index per unit (as bit-widths do) but with
// random steps; losses random and, in `convex == false` tables, often off the hull. Some ties.
AllocationProblem random_problem(std::mt19937_64& rng, int U, int K, bool convex) {
  std::uniform_int_distribution<int> step(1, 40);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  AllocationProblem p;
  p.cost.resize(U);
  p.loss.resize(U);
  for (int u = 0; u < U; ++u) {
    std::int64_t bits = 50 + step(rng);
    double loss = 10 * unit(rng) + 1;
    for (int c = 0; c < K; ++c) {
      p.cost[u].push_back(bits);
      p.loss[u].push_back(loss);
      bits += step(rng);
      loss = convex ? loss * (0.2 + 0.5 * unit(rng)) : loss * unit(rng) * 1.3;  // non-convex: may even rise
      if (unit(rng) < 0.1) loss = p.loss[u].back();                              // equal losses
    }
  }
  const auto lo = cheapest_mix(p), hi = dearest_mix(p);
  p.budget = lo + static_cast<std::int64_t>(unit(rng) * static_cast<double>(hi - lo));
  return p;
}

double tol(double x) { return 1e-9 * std::max(1.0, std::abs(x)); }

TEST(AllocationSolvers, DpEqualsBruteForceOnRandomTables) {
  std::mt19937_64 rng(1);
  for (int trial = 0; trial < 200; ++trial) {
    auto p = random_problem(rng, 6, 3, trial % 2 == 0);
    const auto ref = brute_force_allocation(p);
    const auto dp = make("dp")->solve(p);
    EXPECT_LE(dp.bits, p.budget);
    EXPECT_NEAR(dp.loss, ref.loss, tol(ref.loss)) << "trial " << trial;
    EXPECT_EQ(dp.status, "optimal");
  }
}

TEST(AllocationSolvers, CoarseDpIsFeasibleAndWithinItsBound) {
  std::mt19937_64 rng(2);
  for (int trial = 0; trial < 50; ++trial) {
    auto p = random_problem(rng, 6, 3, false);
    // Force a coarse quantum: few states allowed.
    const auto dp = make("dp", {{"max_states", std::int64_t{5}}, {"epsilon", 0.3}})->solve(p);
    EXPECT_LE(dp.bits, p.budget);
    const auto q = static_cast<std::int64_t>(dp.info.at("quantum_bits"));
    // loss <= OPT(B - U q) whenever that budget is reachable.
    auto smaller = p;
    smaller.budget = p.budget - 6 * q;
    if (smaller.budget >= cheapest_mix(p)) EXPECT_LE(dp.loss, brute_force_allocation(smaller).loss + tol(dp.loss));
    EXPECT_GE(dp.loss, brute_force_allocation(p).loss - tol(dp.loss));
  }
}

TEST(AllocationSolvers, IlpEqualsDp) {
  std::mt19937_64 rng(3);
  const auto ilp = make("ilp");
  for (int trial = 0; trial < 40; ++trial) {
    auto p = random_problem(rng, 6 + trial % 5, 3 + trial % 2, trial % 2 == 0);
    const auto dp = make("dp")->solve(p);
    const auto ip = ilp->solve(p);
    EXPECT_LE(ip.bits, p.budget);
    EXPECT_NEAR(ip.loss, dp.loss, 1e-6 * std::max(1.0, dp.loss)) << "trial " << trial;
    EXPECT_NE(ip.status.find("optimal"), std::string::npos) << ip.status;
    EXPECT_LE(*ip.lower_bound, ip.loss + 1e-9);
  }
}

TEST(AllocationSolvers, HeuristicsAreFeasibleAndNeverBeatTheOptimum) {
  std::mt19937_64 rng(4);
  for (const char* name : {"lagrange", "greedy", "baq", "rules"}) {
    const auto solver = make(name);
    for (int trial = 0; trial < 60; ++trial) {
      auto p = random_problem(rng, 6, 3, trial % 2 == 0);
      const auto opt = brute_force_allocation(p);
      const auto a = solver->solve(p);
      EXPECT_LE(a.bits, p.budget) << name;
      EXPECT_GE(a.loss, opt.loss - tol(opt.loss)) << name;
      if (a.lower_bound) EXPECT_LE(*a.lower_bound, opt.loss + tol(opt.loss)) << name << ": dual bound above OPT";
    }
  }
}

TEST(AllocationSolvers, LagrangeRepairNeverWorsensThePriceSolution) {
  std::mt19937_64 rng(5);
  const auto plain = make("lagrange", {{"repair", false}});
  const auto repaired = make("lagrange");
  for (int trial = 0; trial < 60; ++trial) {
    auto p = random_problem(rng, 6, 4, false);
    const auto a = plain->solve(p), b = repaired->solve(p);
    EXPECT_LE(b.loss, a.loss + tol(a.loss));
    EXPECT_LE(b.bits, p.budget);
  }
}

TEST(AllocationSolvers, OptimumIsNonIncreasingInTheBudgetAndGreedyIsNested) {
  std::mt19937_64 rng(6);
  auto p = random_problem(rng, 8, 4, false);
  const auto lo = cheapest_mix(p), hi = dearest_mix(p);
  const auto dp = make("dp");
  const auto greedy = make("greedy");
  double last = kNeverLoss;
  std::vector<int> last_greedy;
  for (std::int64_t b = lo; b <= hi; b += std::max<std::int64_t>(1, (hi - lo) / 60)) {
    p.budget = b;
    const auto a = dp->solve(p);
    EXPECT_LE(a.bits, b);
    EXPECT_LE(a.loss, last + tol(last));
    last = a.loss;
    const auto g = greedy->solve(p);
    EXPECT_LE(g.bits, b);
    if (!last_greedy.empty())
      for (std::size_t u = 0; u < g.choice.size(); ++u)  // nested: every unit keeps or raises its bits
        EXPECT_GE(p.cost[u][g.choice[u]], p.cost[u][last_greedy[u]]);
    last_greedy = g.choice;
  }
  // At or above the dearest mix every unit gets its least-loss candidate.
  p.budget = hi;
  const auto top = dp->solve(p);
  for (std::size_t u = 0; u < p.cost.size(); ++u)
    EXPECT_EQ(p.loss[u][top.choice[u]], *std::min_element(p.loss[u].begin(), p.loss[u].end()));
}

TEST(AllocationSolvers, HandTableWithKnownOptimum) {
  // Two units, candidates (bits, loss): u0 {(10, 9), (20, 4), (30, 0)}, u1 {(10, 5), (20, 1), (30, 0.5)}.
  AllocationProblem p;
  p.cost = {{10, 20, 30}, {10, 20, 30}};
  p.loss = {{9, 4, 0}, {5, 1, 0.5}};
  p.budget = 40;  // (20,4)+(20,1) = 5 beats (30,0)+(10,5) = 5? tie broken by... both 5: equal loss, equal bits
  for (const char* name : {"dp", "ilp"}) {
    const auto a = make(name)->solve(p);
    EXPECT_DOUBLE_EQ(a.loss, 5.0) << name;
    EXPECT_EQ(a.bits, 40) << name;
  }
  p.budget = 50;  // (30,0) + (20,1) = 1
  const auto a = make("dp")->solve(p);
  EXPECT_EQ(a.choice, (std::vector<int>{2, 1}));
  EXPECT_DOUBLE_EQ(a.loss, 1.0);
}

TEST(AllocationSolvers, InfiniteLossIsNeverChosen) {
  AllocationProblem p;
  p.cost = {{10, 20}, {10, 20}};
  p.loss = {{1, kNeverLoss}, {3, 0}};
  p.budget = 40;
  for (const char* name : {"dp", "ilp", "lagrange", "greedy", "baq", "rules"}) {
    const auto a = make(name)->solve(p);
    EXPECT_EQ(a.choice[0], 0) << name;
    EXPECT_TRUE(std::isfinite(a.loss)) << name;
  }
}

TEST(AllocationSolvers, BudgetBelowTheCheapestMixNamesTheRange) {
  AllocationProblem p;
  p.cost = {{10, 20}, {15, 30}};
  p.loss = {{1, 0}, {1, 0}};
  p.budget = 24;
  try {
    make("dp")->solve(p);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("reachable range [25, 50]"), std::string::npos) << e.what();
  }
}

TEST(AllocationSolvers, LowerHullDropsDominatedAndNonConvexPoints) {
  // (bits, loss): 0:(10,10) 1:(20,9) above the chord 0..2, 2:(30,2), 3:(30,3) dominated, 4:(40,1.9).
  const std::vector<std::int64_t> cost = {10, 20, 30, 30, 40};
  const std::vector<double> loss = {10, 9, 2, 3, 1.9};
  EXPECT_EQ(lower_hull(cost, loss), (std::vector<int>{0, 2, 4}));
}

TEST(AllocationSolvers, BaqClosedFormIsNearOptimalOnItsOwnLossModel) {
  // Candidates at rates 1..8 bits/weight on units of different sizes; the losses follow BAQ's model
  // exactly, so the rounded closed form should match the DP's optimum on the model table closely.
  AllocationProblem p;
  const std::vector<std::int64_t> n = {100, 200, 400};
  const std::vector<double> l4 = {50, 10, 200};  // loss at 4 bits
  for (std::size_t u = 0; u < n.size(); ++u) {
    p.units.push_back({"u" + std::to_string(u), 0, {Linear::q_proj}, n[u]});
    p.cost.emplace_back();
    p.loss.emplace_back();
    for (int r = 1; r <= 8; ++r) {
      p.cost[u].push_back(n[u] * r);
      p.loss[u].push_back(l4[u] * std::exp2(-1.95 * (r - 4)));
    }
  }
  p.budget = 4 * (100 + 200 + 400);
  const auto a = make("baq")->solve(p);
  const auto opt = make("dp")->solve(p);
  EXPECT_LE(a.bits, p.budget);
  EXPECT_LE(a.loss, opt.loss * 1.05);
  EXPECT_LE(a.info.at("predicted_gain"), 1.0 + 1e-12);
  // The lossiest unit per weight (u2) gets more bits than the least lossy (u1).
  EXPECT_GT(p.cost[2][a.choice[2]] / n[2], p.cost[1][a.choice[1]] / n[1]);
}

TEST(AllocationSolvers, RulesFavourValueAndDownProjectionsOnLlamaCppLayers) {
  // 8 layers x {v_proj, q_proj}; candidates 2/3/4 bits per weight on 100 weights.
  AllocationProblem p;
  p.num_layers = 8;
  for (int l = 0; l < 8; ++l)
    for (Linear w : {Linear::v_proj, Linear::q_proj}) {
      p.units.push_back({"u", l, {w}, 100});
      p.cost.push_back({200, 300, 400});
      p.loss.push_back({3, 2, 1});
    }
  p.budget = 16 * 200 + 4 * 100;  // base level 0 plus four bumps: layers 0, 2, 5, 7 have use_more_bits
  const auto a = make("rules")->solve(p);
  EXPECT_LE(a.bits, p.budget);
  for (std::size_t u = 0; u < p.units.size(); ++u) {
    const int l = p.units[u].layer;
    const bool more = (l < 1 || l >= 7 || (l - 1) % 3 == 2) && p.units[u].linears[0] == Linear::v_proj;
    EXPECT_EQ(a.choice[u], more ? 1 : 0) << "layer " << l;
  }
}

}  // namespace
}  // namespace ptqlab
