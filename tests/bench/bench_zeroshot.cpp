// Zero-shot throughput (docs/benchmarks.md): lm-eval requests of real task items scored by the
// zeroshot evaluator's core (tokenization, truncation, prefix sharing, batching), in items/s and
// model tokens/s, on the real stories260K and on a synthetic 2-layer LLaMA-7B-shaped model
// (random weights, vocab 32000, in memory: nothing is written to disk).
#include <benchmark/benchmark.h>

#include <memory>

#include "bench_support.hpp"
#include "ptqlab/eval/zeroshot.hpp"
#include "ptqlab/nn/forward.hpp"

namespace ptqlab {
namespace {

const std::string kShared = PTQLAB_SHARED_DIR;

const Tokenizer& tokenizer() {
  static const Tokenizer tok(kShared + "/models/stories260K/tokenizer.model");
  return tok;
}

const ZeroShotTask& task(const std::string& name, const std::string& file) {
  static std::map<std::string, std::unique_ptr<ZeroShotTask>> tasks;
  auto& t = tasks[name];
  if (!t) t = std::make_unique<ZeroShotTask>(load_zeroshot_task(name, kShared + "/data/zeroshot/" + file));
  return *t;
}

void run(benchmark::State& state, const LlamaModel& model, const ZeroShotTask& t, long long docs) {
  ZeroShotOptions o;
  o.limit = docs;
  o.bootstrap_iters = 0;
  long long tokens = 0;
  for (auto _ : state) {
    const auto r = evaluate_zeroshot(model, tokenizer(), t, o);
    tokens = r.tokens;
    benchmark::DoNotOptimize(r.metrics.at("acc"));
  }
  state.counters["items/s"] = benchmark::Counter(static_cast<double>(docs), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsIterationInvariantRate);
}

// stories260K (512 positions), the first 200 items of a task.
void BM_ZeroShotStories260K(benchmark::State& state, const std::string& name, const std::string& file) {
  static const LlamaModel model = load_model(kShared + "/models/stories260K");
  run(state, model, task(name, file), 200);
}
BENCHMARK_CAPTURE(BM_ZeroShotStories260K, piqa, std::string("piqa"), std::string("piqa/valid.jsonl"))
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_ZeroShotStories260K, hellaswag, std::string("hellaswag"),
                  std::string("hellaswag/hellaswag_val_full.txt"))
    ->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_ZeroShotStories260K, boolq, std::string("boolq"), std::string("boolq/boolq.jsonl"))
    ->Unit(benchmark::kMillisecond)->UseRealTime();

// The baseline measured in the same run: plain next-token NLL (the perplexity inner loop) of 8
// stories260K windows of 512 tokens, so zero-shot tokens/s can be read as a fraction of it.
void BM_PerplexityForwardStories260K(benchmark::State& state) {
  static const LlamaModel model = load_model(kShared + "/models/stories260K");
  std::vector<int> tokens(8 * 512);
  for (std::size_t i = 0; i < tokens.size(); ++i) tokens[i] = 3 + static_cast<int>((i * 7919) % 500);
  for (auto _ : state) {
    auto nll = sequence_nll(model, tokens, BatchShape{8, 512});
    benchmark::DoNotOptimize(nll.data());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(tokens.size()), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_PerplexityForwardStories260K)->Unit(benchmark::kMillisecond)->UseRealTime();

// A 2-layer LLaMA-7B-shaped model (hidden 4096, 32 heads of 128, vocab 32000), the first 16
// items; token ids come from the stories260K tokenizer (all below 512, valid in 32000).
const LlamaModel& model7b() {
  static const LlamaModel model = random_llama(bench::llama7b_config(2, 32000), 2);
  return model;
}
void BM_ZeroShot7BShaped2Layers(benchmark::State& state, const std::string& name, const std::string& file) {
  run(state, model7b(), task(name, file), 16);
}
// Its baseline in the same run: next-token NLL of one 512-token sequence.
void BM_PerplexityForward7BShaped2Layers(benchmark::State& state) {
  std::vector<int> tokens(512);
  for (std::size_t i = 0; i < tokens.size(); ++i) tokens[i] = 3 + static_cast<int>((i * 7919) % 500);
  for (auto _ : state) {
    auto nll = sequence_nll(model7b(), tokens, BatchShape{1, 512});
    benchmark::DoNotOptimize(nll.data());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(tokens.size()), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_PerplexityForward7BShaped2Layers)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(2);
BENCHMARK_CAPTURE(BM_ZeroShot7BShaped2Layers, piqa, std::string("piqa"), std::string("piqa/valid.jsonl"))
    ->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(2);
BENCHMARK_CAPTURE(BM_ZeroShot7BShaped2Layers, hellaswag, std::string("hellaswag"),
                  std::string("hellaswag/hellaswag_val_full.txt"))
    ->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(2);

}  // namespace
}  // namespace ptqlab

BENCHMARK_MAIN();
