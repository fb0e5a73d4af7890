// Restorative-LoRA training throughput (Google Benchmark): one training micro-batch (full-model
// forward with checkpoints, per-layer recomputation and backward into the adapters) against the
// forward pass alone, on the real stories260K and on one layer of LLaMA-7B shape.
//
//   build/bin/bench_lora                                  everything (the 7B case takes ~1 min)
//   build/bin/bench_lora --benchmark_filter=Stories       the small model only
//
// Counters: tokens/s of training; x_forward = time of the training step / time of the
// forward-only loss on the same tokens with the same adapters (best of a few runs just before).
// With the base frozen, the backward of a linear is one GEMM (dX) instead of two, but the
// checkpointed layer is run forward twice, so a step costs about forward + forward + backward.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <random>

#include "lora.hpp"
#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/nn/model_backward.hpp"
#include "ptqlab/support/text_file.hpp"
#include "bench_support.hpp"

namespace ptqlab {
namespace {

using bench::Clock;
using bench::seconds_since;

void run(benchmark::State& state, const LlamaModel& model, const std::vector<int>& tokens, BatchShape shape, int rank) {
  LoraConfig cfg;
  cfg.rank = rank;
  cfg.alpha = rank;
  cfg.dropout = 0.05;
  auto adapters = LoraAdapters::init(model, cfg, 1);
  auto grads = adapters.zeros_like();
  LoraLayerStack stack(model, adapters, &grads, shape.seq_len);

  double forward = 1e30;
  for (int i = 0; i < 3; ++i) {
    stack.set_dropout(false, {});
    const auto t0 = Clock::now();
    benchmark::DoNotOptimize(causal_lm_loss(model, stack, tokens, shape).nll_sum);
    forward = std::min(forward, seconds_since(t0));
  }
  std::uint64_t draw = 0;
  double best_step = 1e30;
  for (auto _ : state) {
    stack.set_dropout(true, {1, draw++});
    const auto t0 = Clock::now();
    benchmark::DoNotOptimize(causal_lm_backward(model, stack, tokens, shape, 1.0 / shape.rows(), nullptr).nll_sum);
    best_step = std::min(best_step, seconds_since(t0));
  }
  state.counters["x_forward"] = best_step / forward;
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(shape.rows()) * state.iterations(),
                                                  benchmark::Counter::kIsRate);
  state.counters["fwd_tokens/s"] = static_cast<double>(shape.rows()) / forward;
  state.counters["forward_ms"] = forward * 1e3;
}

void BM_LoraTrainStepStories260K(benchmark::State& state) {
  const auto dir = std::filesystem::path(PTQLAB_SHARED_DIR) / "models" / "stories260K";
  const auto model = load_model(dir);
  const Tokenizer tok(dir / "tokenizer.model");
  const auto stream =
      perplexity_stream(tok, read_text_file(std::filesystem::path(PTQLAB_SHARED_DIR) / "data/tinystories/valid.txt"), 1);
  const BatchShape shape{static_cast<int>(state.range(0)), 256};
  std::vector<int> tokens(stream.begin(), stream.begin() + shape.rows());
  run(state, model, tokens, shape, 16);
}
BENCHMARK(BM_LoraTrainStepStories260K)->Arg(8)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);

// One decoder layer of LLaMA-7B shape (hidden 4096, intermediate 11008, 32 heads of 128) under a
// 32-token vocabulary head, rank 64 as the paper: the per-layer cost of a training step.
void BM_LoraTrainStepLlama7BLayer(benchmark::State& state) {
  LlamaConfig c = bench::llama7b_config(1, 32);
  c.tie_word_embeddings = true;
  const auto model = random_llama(c, 3, 0.02f);
  const BatchShape shape{1, static_cast<int>(state.range(0))};
  std::mt19937_64 rng(4);
  std::vector<int> tokens(static_cast<std::size_t>(shape.rows()));
  for (auto& t : tokens) t = static_cast<int>(rng() % 32);
  run(state, model, tokens, shape, 64);
}
BENCHMARK(BM_LoraTrainStepLlama7BLayer)->Arg(512)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(3);

}  // namespace
}  // namespace ptqlab

BENCHMARK_MAIN();
