// Forward-pass benchmarks (Google Benchmark). Speed is measured here, never in tests.
//
//   build/bin/bench_forward                          all benchmarks
//   build/bin/bench_forward --benchmark_filter=Gemm  the FP32 GEMM peak of this machine
//
// Counters: GFLOP/s for GEMMs and layers (multiply-add = 2 flops), tokens/s for whole-model passes.
#include <benchmark/benchmark.h>

#include <random>

#include <tbb/global_control.h>

#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/model/model.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/nn/forward.hpp"
#include "ptqlab/support/text_file.hpp"
#include "bench_support.hpp"

namespace ptqlab {
namespace {

using bench::random_matrix;

// Flops of one decoder layer over `tokens` tokens of sequences of length T (causal attention
// counted as the half triangle, QKᵀ and PV).
double layer_flops(const LlamaConfig& c, double tokens, double T) {
  const double h = c.hidden_size, i = c.intermediate_size;
  const double linears = 2.0 * tokens * (h * c.q_dim() + 2.0 * h * c.kv_dim() + c.q_dim() * h + 3.0 * h * i);
  const double attention = 2.0 * 2.0 * tokens * ((T + 1) / 2) * c.q_dim();
  return linears + attention;
}

// Plain Eigen single-threaded SGEMM: the machine's FP32 peak that the forward pass is judged by.
void BM_GemmPeak(benchmark::State& state) {
  const auto n = state.range(0);
  tbb::global_control one(tbb::global_control::max_allowed_parallelism, 1);
  const Matrix a = random_matrix(n, n, 1.0f, 1), b = random_matrix(n, n, 1.0f, 2);
  Matrix c(n, n);
  for (auto _ : state) {
    c.noalias() = a * b;
    benchmark::DoNotOptimize(c.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * n * n * n, benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
}
BENCHMARK(BM_GemmPeak)->Arg(1024)->Arg(2048)->Unit(benchmark::kMillisecond);

// The same square GEMM through linear_forward with all cores (TBB tiles): the all-core peak.
void BM_GemmAllCores(benchmark::State& state) {
  const auto n = state.range(0);
  const Matrix a = random_matrix(n, n, 1.0f, 1), b = random_matrix(n, n, 1.0f, 2);
  Matrix c;
  for (auto _ : state) {
    linear_forward(a, b, c);
    benchmark::DoNotOptimize(c.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * n * n * n, benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
}
BENCHMARK(BM_GemmAllCores)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();

// linear_forward at the shapes the models use: (tokens, out, in).
void BM_Linear(benchmark::State& state) {
  const auto n = state.range(0), out = state.range(1), in = state.range(2);
  const Matrix x = random_matrix(n, in, 1.0f, 1), w = random_matrix(out, in, 0.02f, 2);
  Matrix y;
  for (auto _ : state) {
    linear_forward(x, w, y);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * n * out * in, benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
}
BENCHMARK(BM_Linear)
    ->Args({4096, 64, 64})     // stories260K q/o over 8 windows of 512
    ->Args({4096, 172, 64})    // stories260K gate/up
    ->Args({4096, 64, 172})    // stories260K down
    ->Args({4096, 512, 64})    // stories260K lm_head
    ->Args({2048, 4096, 4096})   // LLaMA-7B q/k/v/o at seq 2048
    ->Args({2048, 11008, 4096})  // LLaMA-7B gate/up
    ->Args({2048, 4096, 11008})  // LLaMA-7B down
    ->Unit(benchmark::kMillisecond);

// Causal attention alone: (batch, seq_len, heads, kv_heads, head_dim).
void BM_Attention(benchmark::State& state) {
  const int batch = state.range(0), T = state.range(1), heads = state.range(2), kv = state.range(3),
            hd = state.range(4);
  const BatchShape shape{batch, T};
  const Matrix q = random_matrix(shape.rows(), heads * hd, 1.0f, 1);
  const Matrix k = random_matrix(shape.rows(), kv * hd, 1.0f, 2);
  const Matrix v = random_matrix(shape.rows(), kv * hd, 1.0f, 3);
  Matrix out;
  for (auto _ : state) {
    causal_attention(q, k, v, heads, kv, hd, shape, out);
    benchmark::DoNotOptimize(out.data());
  }
  const double flops = 4.0 * batch * T * ((T + 1) / 2.0) * heads * hd;
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(batch) * T, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Attention)
    ->Args({8, 512, 8, 4, 8})      // stories260K, 8 windows
    ->Args({1, 2048, 32, 32, 128})  // LLaMA-7B
    ->Unit(benchmark::kMillisecond);

// One decoder layer at LLaMA-7B shape (hidden 4096, intermediate 11008, 32 heads), seq 2048.
void BM_DecoderLayer7B(benchmark::State& state) {
  const int T = state.range(0);
  static const LlamaModel model = random_llama(bench::llama7b_config(1, 32000), 1);
  const RopeTable rope(model.config.head_dim, model.config.rope_theta, T);
  const Matrix input = random_matrix(T, 4096, 1.0f, 5);
  Matrix hidden;
  for (auto _ : state) {
    hidden = input;
    decoder_layer_forward(model.config, model.layers[0], rope, BatchShape{1, T}, hidden);
    benchmark::DoNotOptimize(hidden.data());
  }
  state.counters["GFLOP/s"] = benchmark::Counter(layer_flops(model.config, T, T),
                                                 benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
  state.counters["tokens/s"] = benchmark::Counter(T, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_DecoderLayer7B)->Arg(512)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime();

// End to end: a synthetic 2-layer LLaMA-7B-shaped model (embedding, 2 decoder layers, final norm,
// 32000-way lm_head) on one sequence of 2048 tokens, reduced to next-token NLL like perplexity.
void BM_SyntheticLlama7BForward(benchmark::State& state) {
  const int T = state.range(0);
  static const LlamaModel model = random_llama(bench::llama7b_config(2, 32000), 2);
  std::vector<int> tokens(T);
  for (int i = 0; i < T; ++i) tokens[i] = (i * 7919) % 32000;
  for (auto _ : state) {
    auto nll = sequence_nll(model, tokens, BatchShape{1, T});
    benchmark::DoNotOptimize(nll.data());
  }
  const auto& c = model.config;
  const double flops = c.num_layers * layer_flops(c, T, T) + 2.0 * (T - 1) * c.hidden_size * c.vocab_size;
  state.counters["GFLOP/s"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
  state.counters["tokens/s"] = benchmark::Counter(T, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_SyntheticLlama7BForward)->Arg(2048)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(2);

// Whole-model next-token NLL of the real stories260K on 8 TinyStories windows of 512 tokens: the
// inner loop of every perplexity evaluation in a sweep.
void BM_Stories260KWindows(benchmark::State& state) {
  static const LlamaModel model = load_model(std::string(PTQLAB_SHARED_DIR) + "/models/stories260K");
  static const std::vector<int> stream = [] {
    const Tokenizer tok(std::string(PTQLAB_SHARED_DIR) + "/models/stories260K/tokenizer.model");
    return perplexity_stream(tok, read_text_file(std::string(PTQLAB_SHARED_DIR) + "/data/tinystories/valid.txt"), 1);
  }();
  const int batch = state.range(0), T = 512;
  const std::span<const int> tokens(stream.data(), static_cast<std::size_t>(batch) * T);
  for (auto _ : state) {
    auto nll = sequence_nll(model, tokens, BatchShape{batch, T});
    benchmark::DoNotOptimize(nll.data());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(batch) * T, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Stories260KWindows)->Arg(1)->Arg(8)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
}  // namespace ptqlab

BENCHMARK_MAIN();
