// Per-layer quantization time of the Hessian-based quantizers at LLaMA-7B shapes, next to the
// kernels they are built from (Google Benchmark).
//
//   build/bin/bench_quantizers                                   everything (long)
//   build/bin/bench_quantizers --benchmark_filter='Peak|Factor'   SGEMM peak and the factor
//   build/bin/bench_quantizers --benchmark_filter='gptq_w2|Layer' GPTQ per linear, whole layer
//   build/bin/bench_quantizers --benchmark_filter='billm|arbllm'  BiLLM and ARB-LLM per linear
//
// Shapes: 4096x4096 (q/k/v/o), 11008x4096 (gate/up) and 4096x11008 (down). The Hessian is
// H = 2 XᵀX / n of synthetic correlated inputs (each feature plus 0.3 x its neighbour) with
// n = 16384 tokens: the 128 x 2048 tokens would take minutes of GEMM per benchmark setup
// and do not change the quantizers' work (they see only H, whose size is fixed by the shape).
// Each per-linear benchmark includes everything a quantizer does per linear: dampening, Cholesky
// and inverse, the column loop. Every benchmark reports real time and the process's CPU time;
// the /threads:N variants cap TBB at N threads (CPU time flat in N: threads add no work).
// Counters: GFLOP/s (multiply-add = 2 flops; the factor is n³/3 for the Cholesky plus n³/3 for the
// triangular inverse).
#include <benchmark/benchmark.h>

#include <map>
#include <random>

#include <tbb/global_control.h>

#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/nn/forward.hpp"
#include "ptqlab/quant/calibration.hpp"
#include "ptqlab/quant/gptq.hpp"
#include "bench_support.hpp"

namespace ptqlab {
namespace {

constexpr Eigen::Index kHessianTokens = 16384;

const Eigen::MatrixXd& hessian(Eigen::Index cols) {
  static std::map<Eigen::Index, Eigen::MatrixXd> cache;
  auto it = cache.find(cols);
  if (it != cache.end()) return it->second;
  Matrix x = bench::random_matrix(kHessianTokens, cols, 1.0f, static_cast<std::uint64_t>(cols));
  for (Eigen::Index j = cols - 1; j >= 1; --j) x.col(j) += 0.3f * x.col(j - 1);
  Eigen::MatrixXd h = Eigen::MatrixXd::Zero(cols, cols);
  accumulate_gram(x, h);
  return cache[cols] = (2.0 * h / static_cast<double>(kHessianTokens));
}

PluginRegistry& registry() {
  static PluginRegistry r;
  static bool loaded = (r.add_search_path(PluginRegistry::default_plugin_dir()), true);
  (void)loaded;
  return r;
}

std::shared_ptr<Quantizer> make(const std::string& name, const std::map<std::string, ParamValue>& params) {
  const auto* schema = registry().find(ComponentKind::quantizer, name);
  return schema == nullptr ? nullptr : registry().make_quantizer(name, Params::resolve(*schema, params));
}

// The thread cap of a benchmark: range(2) when given (0 or absent: TBB's default).
std::unique_ptr<tbb::global_control> thread_cap(const benchmark::State& state, int index) {
  if (state.range(index) <= 0) return nullptr;
  return std::make_unique<tbb::global_control>(tbb::global_control::max_allowed_parallelism, state.range(index));
}

// The project's tiled SGEMM (linear_forward) at 4096³: the peak the factor is judged against.
void BM_SgemmPeak(benchmark::State& state) {
  const auto cap = thread_cap(state, 1);
  const auto n = state.range(0);
  const Matrix a = bench::random_matrix(n, n, 1.0f, 1), b = bench::random_matrix(n, n, 1.0f, 2);
  Matrix c;
  linear_forward(a, b, c);  // warm-up
  for (auto _ : state) {
    linear_forward(a, b, c);
    benchmark::DoNotOptimize(c.data());
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * n * n * n * state.iterations() / 1e9, benchmark::Counter::kIsRate);
}

// The inverse-Hessian factor alone (prepare_inverse_hessian), in each precision. `unblocked`: one
// tile as large as H, i.e. Eigen's serial LLT then the chunked parallel triangular inverse: the
// algorithm ptqlab used before the blocked kernels, for a side-by-side baseline.
void BM_Factor(benchmark::State& state, FactorPrecision precision, bool unblocked) {
  const auto cap = thread_cap(state, 1);
  const auto n = state.range(0);
  const Eigen::MatrixXd& H = hessian(n);
  Matrix w(0, n);
  for (auto _ : state) {
    auto f = prepare_inverse_hessian(H, w, 0.01, "bench", 6, {precision, unblocked ? n : kFactorBlock});
    benchmark::DoNotOptimize(f.U.data());
  }
  const double flops = 2.0 * static_cast<double>(n) * n * n / 3.0;
  state.counters["GFLOP/s"] = benchmark::Counter(flops * state.iterations() / 1e9, benchmark::Counter::kIsRate);
}

// The Hessian accumulation of one 4096-token batch (accumulate_gram; syrk flops n² tokens).
void BM_Gram(benchmark::State& state) {
  const auto cap = thread_cap(state, 1);
  const auto n = state.range(0);
  const Matrix x = bench::random_matrix(4096, n, 1.0f, 3);
  Eigen::MatrixXd sum = Eigen::MatrixXd::Zero(n, n);
  for (auto _ : state) {
    accumulate_gram(x, sum);
    benchmark::DoNotOptimize(sum.data());
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(4096.0 * n * n * state.iterations() / 1e9, benchmark::Counter::kIsRate);
}

void BM_Quantize(benchmark::State& state, const std::string& name, std::map<std::string, ParamValue> params) {
  const auto rows = state.range(0), cols = state.range(1);
  const auto cap = thread_cap(state, 2);
  auto q = make(name, params);
  if (q == nullptr) {
    state.SkipWithError(("quantizer '" + name + "' is not built").c_str());
    return;
  }
  const Eigen::MatrixXd& H = hessian(cols);
  const Matrix w0 = bench::random_matrix(rows, cols, 0.02f, 1);
  LinearContext ctx;
  ctx.hessian = [&H]() -> const Eigen::MatrixXd& { return H; };
  for (auto _ : state) {
    state.PauseTiming();
    Matrix w = w0;
    state.ResumeTiming();
    q->quantize_linear(ctx, w);
    benchmark::DoNotOptimize(w.data());
  }
  state.counters["weights"] = static_cast<double>(rows * cols);
}

// One LLaMA-7B decoder layer, its 7 linears quantized with GPTQ w2 as the calibration engine does
// it (Hessians given; one factor per input shared through an InverseFactorCache).
void BM_Layer7B_gptq_w2(benchmark::State& state) {
  const auto cap = thread_cap(state, 0);
  auto q = make("gptq", {{"bits", std::int64_t{2}}});
  const auto c = bench::llama7b_config(1, 32);
  std::array<Matrix, 7> w0;
  for (std::size_t i = 0; i < kAllLinears.size(); ++i) {
    const Linear which = kAllLinears[i];
    const bool down = which == Linear::down_proj, up = which == Linear::gate_proj || which == Linear::up_proj;
    w0[i] = bench::random_matrix(up ? c.intermediate_size : c.hidden_size, down ? c.intermediate_size : c.hidden_size,
                                 0.02f, 10 + i);
  }
  // Distinct inputs get distinct Hessians of their size (attn_in, o_in and mlp_in are 4096-wide).
  auto H_of = [](Linear which) -> const Eigen::MatrixXd& { return hessian(which == Linear::down_proj ? 11008 : 4096); };
  for (auto _ : state) {
    state.PauseTiming();
    std::array<Matrix, 7> w = w0;
    InverseFactorCache factors;
    state.ResumeTiming();
    for (std::size_t i = 0; i < kAllLinears.size(); ++i) {
      const Linear which = kAllLinears[i];
      LinearContext ctx;
      ctx.which = which;
      ctx.hessian = [&H_of, which]() -> const Eigen::MatrixXd& { return H_of(which); };
      ctx.inverse_factor = [&](double percdamp, const std::string& what) {
        return factors.get(static_cast<int>(input_of(which)), H_of(which), percdamp, what);
      };
      q->quantize_linear(ctx, w[i]);
    }
    benchmark::DoNotOptimize(w[0].data());
    state.counters["factorisations"] = static_cast<double>(factors.size());
  }
}

void shapes(benchmark::internal::Benchmark* b) {
  b->Args({4096, 4096, 0})->Args({11008, 4096, 0})->Args({4096, 11008, 0});
  b->Unit(benchmark::kSecond)->UseRealTime()->MeasureProcessCPUTime()->Iterations(1);
}
void per_thread_count(benchmark::internal::Benchmark* b) {
  b->Args({4096, 11008, 1})->Args({4096, 11008, 2});
  b->Unit(benchmark::kSecond)->UseRealTime()->MeasureProcessCPUTime()->Iterations(1);
}
void sizes(benchmark::internal::Benchmark* b) {
  b->Args({4096, 0})->Args({11008, 0})->Args({4096, 1})->Args({4096, 2});
  b->Unit(benchmark::kSecond)->UseRealTime()->MeasureProcessCPUTime()->Iterations(1);
}

BENCHMARK(BM_SgemmPeak)->Args({4096, 0})->Args({4096, 1})->Unit(benchmark::kSecond)->UseRealTime()->MeasureProcessCPUTime()->Iterations(3);
BENCHMARK_CAPTURE(BM_Factor, float32, FactorPrecision::float32, false)->Apply(sizes);
BENCHMARK_CAPTURE(BM_Factor, float64, FactorPrecision::float64, false)->Apply(sizes);
BENCHMARK_CAPTURE(BM_Factor, float64_unblocked_before, FactorPrecision::float64, true)
    ->Args({4096, 0})->Args({11008, 0})->Unit(benchmark::kSecond)->UseRealTime()->MeasureProcessCPUTime()->Iterations(1);
BENCHMARK(BM_Gram)->Args({4096, 0})->Args({11008, 0})->Unit(benchmark::kSecond)->UseRealTime()->MeasureProcessCPUTime()->Iterations(1);
BENCHMARK_CAPTURE(BM_Quantize, rtn_w2, std::string("rtn"), {{"bits", std::int64_t{2}}})->Apply(shapes);
BENCHMARK_CAPTURE(BM_Quantize, gptq_w2, std::string("gptq"), {{"bits", std::int64_t{2}}})->Apply(shapes);
BENCHMARK_CAPTURE(BM_Quantize, gptq_w2_threads, std::string("gptq"), {{"bits", std::int64_t{2}}})->Apply(per_thread_count);
BENCHMARK_CAPTURE(BM_Quantize, gptq_w3_g128, std::string("gptq"),
                  {{"bits", std::int64_t{3}}, {"group_size", std::int64_t{128}}})->Apply(shapes);
BENCHMARK_CAPTURE(BM_Quantize, pbllm, std::string("pbllm"), {})->Apply(shapes);
BENCHMARK_CAPTURE(BM_Quantize, billm, std::string("billm"), {})->Apply(shapes);
// ARB-LLM's headline configurations (docs/methods/arbllm.md): arb-x / arb-rc with the column-group
// bitmap; compare with billm in the same run (--benchmark_filter='billm|arbllm').
BENCHMARK_CAPTURE(BM_Quantize, arbllm_x, std::string("arbllm"),
                  {{"method", std::string("arb-x")}, {"order2_group", true}})->Apply(shapes);
BENCHMARK_CAPTURE(BM_Quantize, arbllm_rc, std::string("arbllm"),
                  {{"method", std::string("arb-rc")}, {"order2_group", true}})->Apply(shapes);
BENCHMARK(BM_Layer7B_gptq_w2)->Arg(0)->Unit(benchmark::kSecond)->UseRealTime()->MeasureProcessCPUTime()->Iterations(1);

}  // namespace
}  // namespace ptqlab

BENCHMARK_MAIN();
