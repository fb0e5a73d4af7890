// Backward-pass benchmarks (Google Benchmark): forward + backward of one decoder layer against the
// plain forward pass, at LLaMA-7B shape and at stories260K shape.
//
//   build/bin/bench_backward                                   everything (the 7B cases take ~1 min)
//   build/bin/bench_backward --benchmark_filter=Stories        the small model only
//
// Counters: tokens/s; x_forward = time of taped forward + backward / time of decoder_layer_forward
// on the same input (best of a few runs in the same process just before); bwd_x_forward = the
// backward part alone / that forward; bwd_x_tape_fwd = backward / taped forward, both inside the
// timed loop (the taped forward reuses its buffers, so this ratio has no page-fault noise);
// GFLOP/s of forward + backward (see forward_backward_flops). Backward needs two GEMMs per linear
// where forward needs one, so about 2x.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <random>

#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/model/model.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/nn/backward.hpp"
#include "ptqlab/nn/forward.hpp"
#include "ptqlab/support/text_file.hpp"
#include "bench_support.hpp"

namespace ptqlab {
namespace {

using bench::Clock;
using bench::random_matrix;
using bench::seconds_since;

// Best of `runs` plain forward passes of the layer on `input`.
double forward_seconds(const LlamaConfig& c, const DecoderLayer& layer, const RopeTable& rope, BatchShape shape,
                       const Matrix& input, int runs) {
  double best = 1e30;
  Matrix hidden;
  for (int i = 0; i < runs; ++i) {
    hidden = input;
    const auto t0 = Clock::now();
    decoder_layer_forward(c, layer, rope, shape, hidden);
    best = std::min(best, seconds_since(t0));
    benchmark::DoNotOptimize(hidden.data());
  }
  return best;
}

// Multiply-adds count 2 flops. Linears: forward x Wᵀ, backward dY W and dYᵀ X (3 GEMMs of equal
// size). Causal attention (half triangle): forward QKᵀ and PV, backward recomputes QKᵀ and does
// dV, dP, dQ, dK, so 7 products of rows x (T+1)/2 x q_dim.
double forward_backward_flops(const LlamaConfig& c, BatchShape shape) {
  const double n = static_cast<double>(shape.rows()), h = c.hidden_size, i = c.intermediate_size;
  const double linear = 2.0 * n * (h * c.q_dim() + 2.0 * h * c.kv_dim() + c.q_dim() * h + 3.0 * h * i);
  const double attention = 2.0 * n * ((shape.seq_len + 1) / 2.0) * c.q_dim();
  return 3.0 * linear + 7.0 * attention;
}

// The plain forward pass (the baseline).
void run_forward(benchmark::State& state, const LlamaConfig& c, const DecoderLayer& layer, BatchShape shape,
                 const Matrix& input) {
  const RopeTable rope(c.head_dim, c.rope_theta, shape.seq_len);
  Matrix hidden;
  for (auto _ : state) {
    hidden = input;
    decoder_layer_forward(c, layer, rope, shape, hidden);
    benchmark::DoNotOptimize(hidden.data());
  }
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(shape.rows()), benchmark::Counter::kIsIterationInvariantRate);
}

// Taped forward + backward (weight gradients; the input gradient too when `with_input_grad`).
void run_forward_backward(benchmark::State& state, const LlamaConfig& c, const DecoderLayer& layer,
                          BatchShape shape, const Matrix& input, bool with_input_grad, int forward_runs) {
  const RopeTable rope(c.head_dim, c.rope_theta, shape.seq_len);
  const double fwd = forward_seconds(c, layer, rope, shape, input, forward_runs);
  const Matrix grad_output = random_matrix(input.rows(), input.cols(), 1e-3f, 7);
  DecoderLayerTape tape;
  DecoderLayerGrads grads;
  DecoderLayerScratch scratch;
  grads.reset(layer);
  Matrix output, grad_input;
  double tape_s = 0, backward_s = 0, total_s = 0;
  for (auto _ : state) {
    const auto t0 = Clock::now();
    decoder_layer_forward_tape(c, layer, rope, shape, input, output, tape);
    const auto t1 = Clock::now();
    tape_s += std::chrono::duration<double>(t1 - t0).count();
    decoder_layer_backward(c, layer, rope, shape, tape, grad_output, grads, with_input_grad ? &grad_input : nullptr,
                           &scratch);
    backward_s += seconds_since(t1);
    total_s += seconds_since(t0);
    benchmark::DoNotOptimize(grads.linear[0].data());
  }
  const double iters = static_cast<double>(state.iterations());
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(shape.rows()), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["x_forward"] = total_s / iters / fwd;
  state.counters["bwd_x_forward"] = backward_s / iters / fwd;
  state.counters["bwd_x_tape_fwd"] = backward_s / tape_s;
  state.counters["tape_MB"] = static_cast<double>(tape.bytes()) / 1e6;
  state.counters["GFLOP/s"] = benchmark::Counter(forward_backward_flops(c, shape),
                                                 benchmark::Counter::kIsIterationInvariantRate,
                                                 benchmark::Counter::kIs1000);
}

const LlamaModel& llama7b() {
  static const LlamaModel model = random_llama(bench::llama7b_config(1, 32), 1);
  return model;
}

void BM_Llama7BLayerForward(benchmark::State& state) {
  const BatchShape shape{1, static_cast<int>(state.range(0))};
  const Matrix input = random_matrix(shape.rows(), 4096, 1.0f, 5);
  run_forward(state, llama7b().config, llama7b().layers[0], shape, input);
}
BENCHMARK(BM_Llama7BLayerForward)->Arg(512)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(3);

void BM_Llama7BLayerForwardBackward(benchmark::State& state) {
  const BatchShape shape{1, static_cast<int>(state.range(0))};
  const Matrix input = random_matrix(shape.rows(), 4096, 1.0f, 5);
  run_forward_backward(state, llama7b().config, llama7b().layers[0], shape, input, state.range(1) != 0, 2);
}
// Args: seq_len, input gradient (0: weights only, as block-wise PTQ needs; 1: also dL/dx).
BENCHMARK(BM_Llama7BLayerForwardBackward)
    ->Args({512, 0})
    ->Args({512, 1})
    ->Args({2048, 0})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Iterations(3);

// stories260K layer 0 (hidden 64, 8 heads of 8, GQA 2:1) on 8 TinyStories windows of 512.
struct Stories {
  LlamaModel model;
  Matrix input;
  BatchShape shape{8, 512};
};

const Stories& stories() {
  static const Stories s = [] {
    Stories s;
    s.model = load_model(std::string(PTQLAB_SHARED_DIR) + "/models/stories260K");
    const Tokenizer tok(std::string(PTQLAB_SHARED_DIR) + "/models/stories260K/tokenizer.model");
    auto stream =
        perplexity_stream(tok, read_text_file(std::string(PTQLAB_SHARED_DIR) + "/data/tinystories/valid.txt"), 1);
    stream.resize(static_cast<std::size_t>(s.shape.rows()));
    s.input = embed_tokens(s.model, stream);
    return s;
  }();
  return s;
}

void BM_Stories260KLayerForward(benchmark::State& state) {
  const auto& s = stories();
  run_forward(state, s.model.config, s.model.layers[0], s.shape, s.input);
}
BENCHMARK(BM_Stories260KLayerForward)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_Stories260KLayerForwardBackward(benchmark::State& state) {
  const auto& s = stories();
  run_forward_backward(state, s.model.config, s.model.layers[0], s.shape, s.input, state.range(0) != 0, 20);
}
BENCHMARK(BM_Stories260KLayerForwardBackward)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace
}  // namespace ptqlab

BENCHMARK_MAIN();
