// The allocation stage around the measurement: candidate objects, the table's content key and
// cache entry, the solver call and the plan, and the ledger's confirmation of the budget
// (docs/allocation.md).
#include "ptqlab/engine/allocation_stage.hpp"

#include <chrono>
#include <cmath>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ptqlab/engine/artifact_cache.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/sha256.hpp"

namespace ptqlab {

std::vector<CandidateComponents> make_candidates(const PluginRegistry& registry, const AllocationSpec& spec) {
  std::vector<CandidateComponents> out;
  for (const auto& c : spec.candidates) {
    CandidateComponents cc;
    cc.quantizer = registry.make_quantizer(c.quantizer.name, c.quantizer.params);
    if (c.mask) cc.mask = registry.make_mask(c.mask->name, c.mask->params);
    out.push_back(std::move(cc));
  }
  return out;
}

AllocationTable aggregate_allocation_table(const AllocationTable& per_linear, const std::vector<AllocationUnit>& units) {
  const std::size_t K = per_linear.candidates.size();
  if (per_linear.units.size() != static_cast<std::size_t>(per_linear.num_layers) * kAllLinears.size())
    throw std::logic_error("aggregate_allocation_table: not a per-linear table");
  AllocationTable t;
  t.units = units;
  t.candidates = per_linear.candidates;
  t.num_layers = per_linear.num_layers;
  t.key = per_linear.key;
  t.from_cache = per_linear.from_cache;
  const std::size_t U = units.size();
  t.bits_allin.assign(U, std::vector<std::int64_t>(K, 0));
  t.bits_paper.assign(U, std::vector<std::int64_t>(K, 0));
  t.loss_hess.assign(U, std::vector<double>(K, 0.0));
  t.loss_mse.assign(U, std::vector<double>(K, 0.0));
  t.seconds.assign(U, std::vector<double>(K, 0.0));
  t.loss_block = per_linear.loss_block;  // per layer already
  for (std::size_t u = 0; u < U; ++u)
    for (Linear w : units[u].linears) {
      const std::size_t i = static_cast<std::size_t>(units[u].layer) * kAllLinears.size() + static_cast<std::size_t>(w);
      for (std::size_t k = 0; k < K; ++k) {
        t.bits_allin[u][k] += per_linear.bits_allin[i][k];
        t.bits_paper[u][k] += per_linear.bits_paper[i][k];
        t.loss_hess[u][k] += per_linear.loss_hess[i][k];
        t.loss_mse[u][k] += per_linear.loss_mse[i][k];
        t.seconds[u][k] += per_linear.seconds[i][k];
      }
    }
  return t;
}

std::string allocation_table_json(const AllocationTable& t) {
  nlohmann::json j;
  j["num_layers"] = t.num_layers;
  j["candidates"] = t.candidates;
  j["units"] = nlohmann::json::array();
  for (const auto& u : t.units) {
    std::vector<int> members;
    for (Linear w : u.linears) members.push_back(static_cast<int>(w));
    j["units"].push_back({{"name", u.name}, {"layer", u.layer}, {"linears", members}, {"weights", u.weights}});
  }
  auto losses = [](const std::vector<std::vector<double>>& m) {
    nlohmann::json out = nlohmann::json::array();
    for (const auto& row : m) {
      nlohmann::json r = nlohmann::json::array();
      for (double v : row) r.push_back(std::isfinite(v) ? nlohmann::json(v) : nlohmann::json(nullptr));  // null = +inf
      out.push_back(r);
    }
    return out;
  };
  j["bits_allin"] = t.bits_allin;
  j["bits_paper"] = t.bits_paper;
  j["loss_hess"] = losses(t.loss_hess);
  j["loss_mse"] = losses(t.loss_mse);
  j["loss_block"] = losses(t.loss_block);
  j["seconds"] = t.seconds;
  return j.dump();
}

std::optional<AllocationTable> allocation_table_from_json(const std::string& text) {
  try {
    const auto j = nlohmann::json::parse(text);
    AllocationTable t;
    t.num_layers = j.at("num_layers").get<int>();
    t.candidates = j.at("candidates").get<std::vector<std::string>>();
    for (const auto& u : j.at("units")) {
      AllocationUnit au;
      au.name = u.at("name").get<std::string>();
      au.layer = u.at("layer").get<int>();
      for (int w : u.at("linears").get<std::vector<int>>()) {
        if (w < 0 || w >= 7) return std::nullopt;
        au.linears.push_back(static_cast<Linear>(w));
      }
      au.weights = u.at("weights").get<std::int64_t>();
      t.units.push_back(std::move(au));
    }
    auto losses = [](const nlohmann::json& m) {
      std::vector<std::vector<double>> out;
      for (const auto& row : m) {
        std::vector<double> r;
        for (const auto& v : row) r.push_back(v.is_null() ? kNeverLoss : v.get<double>());
        out.push_back(std::move(r));
      }
      return out;
    };
    t.bits_allin = j.at("bits_allin").get<std::vector<std::vector<std::int64_t>>>();
    t.bits_paper = j.at("bits_paper").get<std::vector<std::vector<std::int64_t>>>();
    t.loss_hess = losses(j.at("loss_hess"));
    t.loss_mse = losses(j.at("loss_mse"));
    t.loss_block = losses(j.at("loss_block"));  // absent in entries from before it: recomputed
    t.seconds = j.at("seconds").get<std::vector<std::vector<double>>>();
    const std::size_t U = t.units.size(), K = t.candidates.size();
    for (const auto* m : {&t.bits_allin, &t.bits_paper})
      if (m->size() != U || (U > 0 && (*m)[0].size() != K)) return std::nullopt;
    for (const auto* m : {&t.loss_hess, &t.loss_mse, &t.seconds})
      if (m->size() != U || (U > 0 && (*m)[0].size() != K)) return std::nullopt;
    if (t.loss_block.size() != static_cast<std::size_t>(t.num_layers)) return std::nullopt;
    for (const auto& row : t.loss_block)
      if (row.size() != K) return std::nullopt;
    return t;
  } catch (const std::exception&) {
    return std::nullopt;  // a corrupt entry is recomputed, never trusted
  }
}

AllocationTable cached_allocation_table(const ArtifactCache& cache, const std::string& key, const LlamaModel& model,
                                        const std::vector<std::vector<int>>& windows, const AllocationSpec& spec,
                                        const std::vector<CandidateComponents>& candidates,
                                        const MeasureOptions& options, bool* loaded) {
  if (loaded != nullptr) *loaded = false;
  const auto lock = cache.lock(key);  // one process measures; the others wait and load
  if (cache.enabled())
    if (auto text = cache.load_text(key))
      if (auto t = allocation_table_from_json(*text); t && t->candidates.size() == spec.candidates.size()) {
        t->key = key;
        t->from_cache = true;
        if (loaded != nullptr) *loaded = true;
        return *t;
      }
  AllocationTable t = measure_allocation_table(model, windows, spec, candidates, options);
  t.key = key;
  cache.store_text(key, allocation_table_json(t));
  return t;
}

AllocationProblem allocation_problem(const AllocationTable& t, const AllocationSpec& spec) {
  AllocationProblem p;
  p.cost = spec.metric == "paper" ? t.bits_paper : t.bits_allin;
  if (spec.loss == "block_mse") {
    // Layer units only (checked when the experiment is read): one row per layer.
    for (const auto& u : t.units) {
      if (u.linears.size() != kAllLinears.size()) throw std::logic_error("allocation: block_mse needs layer units");
      p.loss.push_back(t.loss_block.at(static_cast<std::size_t>(u.layer)));
    }
  } else {
    p.loss = spec.loss == "out_mse" ? t.loss_mse : t.loss_hess;
  }
  p.budget = spec.budget_bits;
  p.units = t.units;
  p.num_layers = t.num_layers;
  return p;
}

AllocationOutcome solve_allocation(const AllocationTable& t, const AllocationSpec& spec, Allocator& allocator,
                                   const std::vector<CandidateComponents>& candidates) {
  const AllocationProblem p = allocation_problem(t, spec);
  const auto t0 = std::chrono::steady_clock::now();
  Allocation a;
  try {
    a = allocator.solve(p);
  } catch (const Error& e) {
    throw Error(fmt::format("allocator {}: {}", spec.allocator.name, e.what()));
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (a.choice.size() != p.cost.size()) throw Error(fmt::format("allocator {} returned no choice for some units", spec.allocator.name));
  for (std::size_t u = 0; u < a.choice.size(); ++u)
    if (a.choice[u] < 0 || a.choice[u] >= static_cast<int>(p.cost[u].size()) || !std::isfinite(p.loss[u][a.choice[u]]))
      throw Error(fmt::format("allocator {} chose an invalid candidate for unit {}", spec.allocator.name, t.units[u].name));
  finish_allocation(p, a);  // never trust the plugin's own totals
  if (a.bits > p.budget)
    throw Error(fmt::format("allocator {} exceeded the budget: {} > {} bits", spec.allocator.name, a.bits, p.budget));

  AllocationOutcome out;
  AllocationRecord& r = out.record;
  r.allocator = spec.allocator.name;
  r.status = a.status;
  r.metric = spec.metric;
  r.unit = spec.unit;
  r.loss = spec.loss;
  r.table_key = t.key;
  r.table_from_cache = t.from_cache;
  r.budget = spec.budget;
  r.budget_bits = spec.budget_bits;
  r.weights = spec.weights;
  r.solver_bits = a.bits;
  r.solver_loss = a.loss;
  r.lower_bound = a.lower_bound ? *a.lower_bound : std::nan("");
  r.solve_seconds = seconds;
  r.info = a.info;
  r.candidates = t.candidates;
  const std::size_t K = t.candidates.size();
  for (std::size_t u = 0; u < t.units.size(); ++u) {
    const auto& unit = t.units[u];
    r.units.push_back(unit.name);
    r.unit_layer.push_back(unit.layer);
    std::string members;
    for (Linear w : unit.linears) {
      if (!members.empty()) members += ',';
      members += linear_name(w);
    }
    r.unit_linears.push_back(members);
    r.unit_weights.push_back(unit.weights);
    r.choice.push_back(a.choice[u]);
    for (std::size_t k = 0; k < K; ++k) {
      r.bits_allin.push_back(t.bits_allin[u][k]);
      r.bits_paper.push_back(t.bits_paper[u][k]);
      r.loss_hess.push_back(t.loss_hess[u][k]);
      r.loss_mse.push_back(t.loss_mse[u][k]);
      if (unit.linears.size() == kAllLinears.size() && !t.loss_block.empty())
        r.loss_block.push_back(t.loss_block[static_cast<std::size_t>(unit.layer)][k]);
      r.seconds.push_back(t.seconds[u][k]);
      r.measure_seconds += t.seconds[u][k];
    }
  }
  out.plan.resize(t.num_layers);
  for (std::size_t u = 0; u < t.units.size(); ++u)
    for (Linear w : t.units[u].linears) {
      const auto& cand = candidates[a.choice[u]];
      out.plan[t.units[u].layer][static_cast<std::size_t>(w)] = {cand.quantizer.get(), cand.mask.get()};
    }
  return out;
}

void confirm_allocation_budget(const AllocationSpec& spec, const std::vector<LinearRecord>& linears,
                               AllocationRecord& record) {
  BitCount total;
  for (const auto& l : linears) total += l.bits;
  record.ledger_allin_bits = total.all_in();
  record.ledger_paper_bits = total.paper;
  const double used = spec.metric == "paper" ? total.paper : total.all_in();
  if (used > static_cast<double>(spec.budget_bits) + 1e-6)
    throw Error(fmt::format("allocation exceeded its budget after quantization: the ledger counts {:.0f} {} bits, the "
                            "budget is {} ({} bits per weight); the table predicted {}",
                            used, spec.metric == "paper" ? "paper" : "all-in", spec.budget_bits,
                            param_value_text(spec.budget), record.solver_bits));
}

}  // namespace ptqlab
