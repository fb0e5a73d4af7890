// The allocation stage's costs (Google Benchmark; docs/benchmarks.md "Bit allocation"):
//
//   build/bin/bench_allocation
//
// BM_HessLoss: the `hess` loss tr(ΔW H ΔWᵀ) of one linear at LLaMA-7B shapes (one double GEMM of
// [out, in] x [in, in]); the measurement stage pays it once per (linear, candidate) on top of the
// candidate's own quantization (bench_quantizers). BM_Solve: each allocator on a LLaMA-7B-sized
// table, 224 per-linear units (32 layers x 7) x 6 candidates (GPTQ-style 2/3/4/8-bit at g64/g128
// all-in costs of the real shapes, random decreasing losses), budget 3 bits per weight.
#include <benchmark/benchmark.h>

#include <cmath>
#include <random>

#include "bench_support.hpp"
#include "ptqlab/engine/allocation_stage.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/quant/allocation.hpp"

namespace ptqlab {
namespace {

PluginRegistry& registry() {
  static PluginRegistry r;
  static bool loaded = (r.add_search_path(PluginRegistry::default_plugin_dir()), true);
  (void)loaded;
  return r;
}

void BM_HessLoss(benchmark::State& state) {
  const auto rows = state.range(0), cols = state.range(1);
  const Matrix w = bench::random_matrix(rows, cols, 0.02f, 1);
  const Matrix wq = w + bench::random_matrix(rows, cols, 0.002f, 2);
  // The cost of the GEMM does not depend on H's values: a dense SPD matrix, cheap to make.
  Eigen::MatrixXd h = Eigen::MatrixXd::Constant(cols, cols, 0.01);
  h.diagonal().array() += 1.0;
  for (auto _ : state) benchmark::DoNotOptimize(hessian_weighted_error(w, wq, h));
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * static_cast<double>(rows) * static_cast<double>(cols) * static_cast<double>(cols) * 1e-9,
                         benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_HessLoss)->Args({4096, 4096})->Args({11008, 4096})->Args({4096, 11008})->Iterations(1)->Unit(benchmark::kSecond)->UseRealTime();

AllocationProblem llama7b_table() {
  const auto c = bench::llama7b_config(32, 32000);
  const auto units = allocation_units(c, "linear");
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> u(0.5, 1.5);
  AllocationProblem p;
  std::int64_t weights = 0;
  for (const auto& unit : units) {
    const auto [rows, cols] = linear_shape(c, unit.linears[0]);
    weights += rows * cols;
    std::vector<std::int64_t> cost;
    std::vector<double> loss;
    const double base = u(rng) * static_cast<double>(rows * cols);
    for (int b : {2, 3, 4, 8})
      for (int g : {64, 128}) {
        if (b == 8 && g == 64) continue;
        if (b == 2 && g == 128) continue;
        cost.push_back(rows * cols * b + rows * ((cols + g - 1) / g) * (16 + b));
        loss.push_back(base * std::exp2(-2.0 * b) * (g == 64 ? 0.9 : 1.0) * u(rng));
      }
    p.cost.push_back(cost);
    p.loss.push_back(loss);
  }
  p.units = units;
  p.num_layers = c.num_layers;
  p.budget = 3 * weights;
  return p;
}

void BM_Solve(benchmark::State& state, const std::string& name) {
  const auto* schema = registry().find(ComponentKind::allocator, name);
  if (schema == nullptr) {
    state.SkipWithError(("allocator '" + name + "' is not built").c_str());
    return;
  }
  const auto solver = registry().make_allocator(name, Params::resolve(*schema, {}));
  const AllocationProblem p = llama7b_table();
  Allocation a;
  for (auto _ : state) a = solver->solve(p);
  state.counters["loss"] = a.loss;
  state.counters["bits_per_weight"] = static_cast<double>(a.bits) / static_cast<double>(p.budget / 3);
}
BENCHMARK_CAPTURE(BM_Solve, dp, std::string("dp"))->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Solve, ilp, std::string("ilp"))->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Solve, lagrange, std::string("lagrange"))->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Solve, greedy, std::string("greedy"))->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Solve, baq, std::string("baq"))->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Solve, rules, std::string("rules"))->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
}  // namespace ptqlab

BENCHMARK_MAIN();
