// The allocation stage in the engine (docs/allocation.md): validation of allocated arms before
// compute (file:line errors, the reachable range), and real runs on stories260K: one measured table
// shared by every budget and allocator, hess = 2·d_out·out_mse on the same inputs, the ledger never
// above the budget, the plan's bits equal to the table's, the HDF5 round trip and the cache.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>

#include "ptqlab/engine/allocation_stage.hpp"
#include "ptqlab/engine/experiment.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/engine/runner.hpp"
#include "ptqlab/outputs/plot.hpp"
#include "ptqlab/outputs/report.hpp"
#include "ptqlab/outputs/results.hpp"
#include "ptqlab/support/error.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

namespace fs = std::filesystem;

PluginRegistry& registry() {
  static PluginRegistry r;
  static const bool loaded = (r.add_search_path(PluginRegistry::default_plugin_dir()), true);
  (void)loaded;
  return r;
}

struct Files {
  test::TempDir dir;
  fs::path write(const std::string& arms, const std::string& name = "exp.yaml") {
    const auto path = dir.path() / name;
    std::ofstream(path) << "model: " << test::model_dir("stories260K").string() << "\ncalibration:\n  text: "
                        << test::data_file("tinystories/calib.txt").string() << "\n  nsamples: 4\n  seq_len: 64\narms:\n"
                        << arms
                        // after the arms, so that the arms' line numbers stay as written above
                        << "eval:\n  - evaluator: perplexity\n    params: {max_windows: 2, seq_len: 64}\n"
                        << "    datasets: {calib: " << test::data_file("tinystories/calib.txt").string() << "}\n";  // tokenized once
    return path;
  }
};

const char* kGptqCandidates =
    "    candidates:\n"
    "      - {name: g2, quantizer: {name: gptq, params: {bits: 2, group_size: 32}}}\n"
    "      - {name: g3, quantizer: {name: gptq, params: {bits: 3, group_size: 32}}}\n"
    "      - {name: g4, quantizer: {name: gptq, params: {bits: 4, group_size: 32}}}\n";

std::string load_error(const fs::path& yaml) {
  try {
    load_experiment(yaml, registry());
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Allocation, ValidationErrorsBeforeCompute) {
  Files f;
  auto expect = [&](const std::string& arms, const std::string& where, const std::string& what) {
    const auto e = load_error(f.write(arms));
    EXPECT_NE(e.find(where), std::string::npos) << e;
    EXPECT_NE(e.find(what), std::string::npos) << e;
  };
  const std::string head = "  - name: a\n";
  // Budgets outside [cheapest mix, dearest mix] name the range (2-bit g32: 2 + 18/32 bits per weight, more on down_proj whose 172 inputs make 6 groups: 2.5784; 4-bit: 4.6427).
  expect(head + "    allocator: {name: dp, budget: 2.0}\n" + kGptqCandidates, "exp.yaml:8:",
         "allocation budget 2 bits per weight (all-in) is outside the reachable range [2.5784, 4.6427] of arm 'a'");
  expect(head + "    allocator: {name: dp, budget: 5}\n" + kGptqCandidates, "exp.yaml:8:", "[2.5784, 4.6427]");
  expect(head + "    allocator: {name: dq, budget: 3}\n" + kGptqCandidates, "exp.yaml:8:",
         "unknown allocator 'dq' (did you mean 'dp'?)");
  expect(head + "    allocator: {name: dp, budget: 3, params: {max_state: 3}}\n" + kGptqCandidates, "exp.yaml:8:",
         "allocator dp: unknown param 'max_state' (did you mean 'max_states'?)");
  expect(head + "    allocator: {name: dp, budget: 3, unit: tied}\n" + kGptqCandidates, "exp.yaml:8:",
         "unit must be one of linear, tie, layer, got 'tied'");
  expect(head + "    allocator: {name: dp}\n" + kGptqCandidates, "exp.yaml:8:", "missing required key 'budget'");
  expect(head + "    allocator: {name: dp, budget: 3, loss: block_mse}\n" + kGptqCandidates, "exp.yaml:8:",
         "loss block_mse measures whole decoder layers: it needs unit: layer, got unit: linear");
  expect(head + "    allocator: {name: dp, budget: 3}\n", "exp.yaml:8:", "missing required key 'candidates'");
  expect(head + "    quantizer: rtn\n    candidates: [{quantizer: rtn}]\n", "exp.yaml:9:", "has candidates but no allocator");
  expect(head + "    quantizer: rtn\n    allocator: {name: dp, budget: 3}\n" + kGptqCandidates, "exp.yaml:8:",
         "give its quantizers in 'candidates', not 'quantizer'");
  expect(head + "    allocator: {name: dp, budget: 3}\n    candidates:\n      - {quantizer: {name: gptq, params: {bitz: 2}}}\n",
         "exp.yaml:10:", "quantizer gptq: unknown param 'bitz'");
  expect(head + "    allocator: {name: dp, budget: 3}\n    candidates:\n      - {quantizer: rtn}\n      - {quantizer: rtn}\n",
         "exp.yaml:11:", "candidate 'rtn' is given twice");
  expect(head + "    allocator: {name: dp, budget: 3}\n    candidates:\n      - {quantizer: ptq161}\n      - {quantizer: rtn}\n",
         "exp.yaml:10:", "quantizer ptq161 works on whole decoder layers, so the allocation unit must be 'layer'");
  expect(head + "    allocator: {name: dp, budget: 3}\n    candidates:\n      - {quantizer: billm}\n      - {quantizer: rtn}\n",
         "exp.yaml:10:", "quantizer billm cannot predict its bits from shapes");
  expect(head + "    allocator: {name: dp}\n" + kGptqCandidates + "    sweep:\n      grid: {allocator.budget: [3, 9]}\n",
         "exp.yaml:14:", "allocation budget 9 bits per weight (all-in) is outside the reachable range");
  expect(head + "    allocator: {name: dp, budget: 3}\n" + kGptqCandidates + "    sweep:\n      grid: {quantizer.bits: [3]}\n",
         "exp.yaml:14:", "arm 'a' has an allocator; its quantizers are in 'candidates'");
  expect(head + "    quantizer: rtn\n    sweep:\n      grid: {allocator.budget: [3]}\n", "exp.yaml:10:",
         "sweep axis 'allocator.budget': arm 'a' has no allocator");
}

TEST(Allocation, BudgetAxisExpandsArmsWithTheirBudgets) {
  Files f;
  const auto x = load_experiment(
      f.write(std::string("  - name: a\n    allocator: {name: dp}\n") + kGptqCandidates +
              "    sweep:\n      grid: {allocator.budget: [3, 3.5]}\n"),
      registry());
  ASSERT_EQ(x.arms.size(), 2u);
  EXPECT_EQ(x.arms[0].name, "a-budget3");
  EXPECT_EQ(x.arms[1].name, "a-budget3.5");
  ASSERT_TRUE(x.arms[1].allocation);
  const auto& a = *x.arms[1].allocation;
  EXPECT_EQ(a.weights, 5 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 172));
  EXPECT_EQ(a.budget_bits, static_cast<std::int64_t>(std::floor(3.5 * static_cast<double>(a.weights))));
  EXPECT_NE(x.arms[1].resolved_yaml.find("allocation:"), std::string::npos);
  EXPECT_NE(x.arms[0].config_hash, x.arms[1].config_hash);
}

TEST(Allocation, RealRunSharesOneTableAndMeetsEveryBudget) {
  Files f;
  const auto yaml = f.write(std::string("  - name: dp\n    allocator: {name: dp}\n") + kGptqCandidates +
                            "    sweep:\n      grid: {allocator.budget: [2.8, 3.4, 4.0]}\n"
                            "  - name: ilp\n    allocator: {name: ilp, budget: 3.4}\n" + kGptqCandidates +
                            "  - name: mse\n    allocator: {name: greedy, budget: 3.4, loss: out_mse}\n" + kGptqCandidates +
                            "  - name: tie\n    allocator: {name: dp, budget: 3.4, unit: tie}\n" + kGptqCandidates +
                            "  - name: blk\n    allocator: {name: dp, budget: 3.4, unit: layer, loss: block_mse}\n" +
                            kGptqCandidates +
                            "  - name: g3\n    quantizer: {name: gptq, params: {bits: 3, group_size: 32}}\n");
  const auto x = load_experiment(yaml, registry());
  RunOptions o;
  o.out_dir = f.dir.path() / "out";
  o.cache_dir = f.dir.path() / "cache";
  o.jobs = 1;
  const auto report = run_experiment(x, registry(), o);
  ASSERT_EQ(report.failed(), 0) << report.arms[0].message;

  std::map<std::string, ArmResult> r;
  for (const auto& arm : x.arms) r[arm.name] = read_arm_result(o.out_dir / (arm.name + ".h5"));
  const auto& a34 = *r["dp-budget3.4"].allocation;
  const std::size_t K = 3, U = a34.units.size();
  ASSERT_EQ(U, 35u);
  double last_loss = kNeverLoss;
  for (const std::string arm : {"dp-budget2.8", "dp-budget3.4", "dp-budget4", "ilp", "mse"}) {
    ASSERT_TRUE(r[arm].allocation) << arm;
    const auto& a = *r[arm].allocation;
    // One table for every arm (same content key; the same numbers).
    EXPECT_EQ(a.table_key, a34.table_key);
    EXPECT_EQ(a.loss_hess, a34.loss_hess);
    // The ledger never exceeds the budget, and equals the table's bits of the choice.
    EXPECT_LE(r[arm].total_bits.all_in(), static_cast<double>(a.budget_bits)) << arm;
    EXPECT_DOUBLE_EQ(r[arm].total_bits.all_in(), static_cast<double>(a.solver_bits)) << arm;
    EXPECT_DOUBLE_EQ(a.ledger_allin_bits, r[arm].total_bits.all_in());
    // Every linear got the bits of its unit's chosen candidate.
    for (const auto& l : r[arm].linears) {
      const std::string unit = "layer" + std::to_string(l.layer) + "/" + l.linear;
      const auto u = static_cast<std::size_t>(std::find(a.units.begin(), a.units.end(), unit) - a.units.begin());
      ASSERT_LT(u, U);
      EXPECT_DOUBLE_EQ(std::ceil(l.bits.all_in() - 1e-6), static_cast<double>(a.bits_allin[u * K + a.choice[u]]));
    }
    if (arm.rfind("dp-", 0) == 0) {  // loss non-increasing in the budget
      EXPECT_LE(a.solver_loss, last_loss);
      last_loss = a.solver_loss;
      EXPECT_EQ(a.status, "optimal");
    }
  }
  // Tied units (q/k/v, o, gate/up, down) sum the same per-linear table: no second measurement.
  const auto& tie = *r["tie"].allocation;
  EXPECT_EQ(tie.table_key, a34.table_key);
  ASSERT_EQ(tie.units.size(), 20u);
  EXPECT_EQ(tie.units[0], "layer0/qkv");
  EXPECT_EQ(tie.unit_linears[0], "q_proj,k_proj,v_proj");
  for (std::size_t k = 0; k < K; ++k)
    EXPECT_NEAR(tie.loss_hess[k], a34.loss_hess[k] + a34.loss_hess[K + k] + a34.loss_hess[2 * K + k],
                1e-12 * tie.loss_hess[k]);
  EXPECT_LE(r["tie"].total_bits.all_in(), static_cast<double>(tie.budget_bits));
  EXPECT_GE(tie.solver_loss, a34.solver_loss);  // a tie is a constraint: never better than free linears

  // block_mse (layer units): one measured value per layer and candidate, from the same table;
  // fewer bits give a larger error of the layer's output on every layer, and the choice is the
  // DP's optimum of that loss within the budget.
  const auto& blk = *r["blk"].allocation;
  EXPECT_EQ(blk.table_key, a34.table_key);
  ASSERT_EQ(blk.units.size(), 5u);
  ASSERT_EQ(blk.loss_block.size(), 5u * K);
  EXPECT_TRUE(a34.loss_block.empty());  // linear units have none
  double chosen = 0;
  for (std::size_t u = 0; u < 5; ++u) {
    EXPECT_GT(blk.loss_block[u * K + 0], blk.loss_block[u * K + 1]) << u;
    EXPECT_GT(blk.loss_block[u * K + 1], blk.loss_block[u * K + 2]) << u;
    EXPECT_GT(blk.loss_block[u * K + 2], 0.0) << u;
    chosen += blk.loss_block[u * K + blk.choice[u]];
  }
  EXPECT_NEAR(blk.solver_loss, chosen, 1e-12 * chosen);
  EXPECT_LE(r["blk"].total_bits.all_in(), static_cast<double>(blk.budget_bits));

  // The integer program finds the DP's optimum at the same budget.
  EXPECT_NEAR(r["ilp"].allocation->solver_loss, a34.solver_loss, 1e-6 * a34.solver_loss);
  EXPECT_NE(r["ilp"].allocation->status.find("GLPK"), std::string::npos);
  // tr(ΔW H ΔWᵀ) with H = 2XᵀX/n equals 2·d_out·mean((XΔWᵀ)²) on the same inputs.
  for (std::size_t u = 0; u < U; ++u) {
    const std::string lin = a34.unit_linears[u];
    const double rows = lin == "k_proj" || lin == "v_proj" ? 32 : (lin == "gate_proj" || lin == "up_proj" ? 172 : 64);
    for (std::size_t k = 0; k < K; ++k)
      EXPECT_NEAR(a34.loss_hess[u * K + k], 2 * rows * a34.loss_mse[u * K + k], 1e-3 * a34.loss_hess[u * K + k]);
  }
  // At 4 bits per weight the DP does at least as well on the table as uniform 3-bit (which fits).
  const auto& a4 = *r["dp-budget4"].allocation;
  double uniform3 = 0;
  for (std::size_t u = 0; u < U; ++u) uniform3 += a4.loss_hess[u * K + 1];
  EXPECT_LE(a4.solver_loss, uniform3);

  // ptqlab plot: uniform and allocated arms get a front each; one heatmap per allocated result,
  // one cell per (layer, linear) with the chosen candidate's bits.
  PlotOptions po;
  po.out = f.dir.path() / "plots";
  const auto plots = make_plots({o.out_dir}, po);
  ASSERT_FALSE(plots.empty());
  const auto dat = test::read_file(po.out / (plots[0].stem + ".dat"));
  EXPECT_NE(dat.find("# block 2: the Pareto front of the allocated"), std::string::npos) << dat;
  const auto maps = make_allocation_heatmaps({o.out_dir}, po);
  ASSERT_EQ(maps.size(), 7u);  // dp x 3 budgets, ilp, mse, tie, blk; not the uniform g3
  const auto cells = test::read_file(po.out / "stories260K-dp-budget3.4-allocation.dat");
  EXPECT_EQ(std::count(cells.begin(), cells.end(), '\n'), 2 + 35);
  EXPECT_NE(cells.find("4\t6\t"), std::string::npos);  // layer 4, down_proj
  EXPECT_GT(fs::file_size(po.out / "stories260K-dp-budget3.4-allocation.png"), 1000u);

  // ptqlab report: allocated arms show their budget as the target, and the fronts are listed.
  const auto md = make_report({o.out_dir}, ReportOptions{});
  EXPECT_NE(md.find("| target bits |"), std::string::npos) << md;
  EXPECT_NE(md.find("| 3.400 |"), std::string::npos) << md;
  EXPECT_NE(md.find("Pareto fronts over all-in bits, stories260K calib: uniform g3 ("), std::string::npos) << md;

  // A second run with the same cache loads the table instead of measuring it.
  RunOptions o2 = o;
  o2.out_dir = f.dir.path() / "out2";
  o2.arms_glob = "dp-budget3.4";
  ASSERT_EQ(run_experiment(x, registry(), o2).failed(), 0);
  const auto again = read_arm_result(o2.out_dir / "dp-budget3.4.h5");
  EXPECT_TRUE(again.allocation->table_from_cache);
  EXPECT_EQ(again.allocation->loss_hess, a34.loss_hess);
  EXPECT_EQ(again.allocation->choice, a34.choice);
}

}  // namespace
}  // namespace ptqlab
