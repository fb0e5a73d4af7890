// Per-layer quantization time of the Hessian-based quantizers at LLaMA-7B shapes (Google Benchmark).
//
//   build/bin/bench_quantizers --benchmark_filter=gptq
//
// Shapes: 4096x4096 (q/k/v/o), 11008x4096 (gate/up) and 4096x11008 (down). The Hessian is
// H = 2 XᵀX / n of synthetic correlated inputs (a random mixing of iid Gaussian features) with
// n = 16384 tokens: the 128 x 2048 tokens would take minutes of GEMM per benchmark setup
// and do not change the quantizers' work (they see only H, whose size is fixed by the shape).
// Each benchmark includes everything a quantizer does per linear: dampening, Cholesky and inverse,
// the column loop.
#include <benchmark/benchmark.h>

#include <map>
#include <random>

#include "ptqlab/plugin.hpp"

namespace ptqlab {
namespace {

const Eigen::MatrixXd& hessian(Eigen::Index cols) {
  static std::map<Eigen::Index, Eigen::MatrixXd> cache;
  auto it = cache.find(cols);
  if (it != cache.end()) return it->second;
  constexpr Eigen::Index kTokens = 16384;
  std::mt19937_64 rng(cols);
  std::normal_distribution<float> d(0.0f, 1.0f);
  Eigen::MatrixXf z(kTokens, cols);
  for (Eigen::Index i = 0; i < z.size(); ++i) z.data()[i] = d(rng);
  // Correlate features: x = z (I + 0.1 B) with B sparse-ish random, cheap to apply.
  Eigen::MatrixXf x = z;
  for (Eigen::Index j = 1; j < cols; ++j) x.col(j) += 0.3f * z.col(j - 1);
  Eigen::MatrixXf xtx(cols, cols);
  xtx.noalias() = x.transpose() * x;
  return cache[cols] = (2.0 * xtx.cast<double>() / static_cast<double>(kTokens));
}

PluginRegistry& registry() {
  static PluginRegistry r;
  static bool loaded = (r.add_search_path(PluginRegistry::default_plugin_dir()), true);
  (void)loaded;
  return r;
}

void BM_Quantize(benchmark::State& state, const std::string& name, std::map<std::string, ParamValue> params) {
  const auto rows = state.range(0), cols = state.range(1);
  const auto* schema = registry().find(ComponentKind::quantizer, name);
  if (schema == nullptr) {
    state.SkipWithError(("quantizer '" + name + "' is not built").c_str());
    return;
  }
  auto q = registry().make_quantizer(name, Params::resolve(*schema, params));
  const Eigen::MatrixXd& H = hessian(cols);
  std::mt19937_64 rng(1);
  std::normal_distribution<float> d(0.0f, 0.02f);
  Matrix w0(rows, cols);
  for (Eigen::Index i = 0; i < w0.size(); ++i) w0.data()[i] = d(rng);
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

void shapes(benchmark::internal::Benchmark* b) {
  b->Args({4096, 4096})->Args({11008, 4096})->Args({4096, 11008});
  b->Unit(benchmark::kSecond)->UseRealTime()->Iterations(1);
}

BENCHMARK_CAPTURE(BM_Quantize, rtn_w2, std::string("rtn"), {{"bits", std::int64_t{2}}})->Apply(shapes);
BENCHMARK_CAPTURE(BM_Quantize, gptq_w2, std::string("gptq"), {{"bits", std::int64_t{2}}})->Apply(shapes);
BENCHMARK_CAPTURE(BM_Quantize, gptq_w3_g128, std::string("gptq"),
                  {{"bits", std::int64_t{3}}, {"group_size", std::int64_t{128}}})->Apply(shapes);
BENCHMARK_CAPTURE(BM_Quantize, pbllm, std::string("pbllm"), {})->Apply(shapes);
BENCHMARK_CAPTURE(BM_Quantize, billm, std::string("billm"), {})->Apply(shapes);

}  // namespace
}  // namespace ptqlab

BENCHMARK_MAIN();
