// Weights stay in the checkpoint (docs/architecture.md, "Model representation"): an opened
// (memory-mapped) model computes exactly what the same model loaded into float32 computes, one
// layer widened at a time; synthetic checkpoints at small shapes; F16/BF16 narrowing against a
// brute-force reference; spilled layer files; the memory model's refusal. Small shapes only: the
// 7B/13B measurements are tests/bench/bench_scale.sh.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <random>
#include <set>

#include <fmt/format.h>

#include "ptqlab/engine/experiment.hpp"
#include "ptqlab/engine/memory_model.hpp"
#include "ptqlab/engine/memory_watch.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/engine/runner.hpp"
#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/model/model.hpp"
#include "ptqlab/model/model_config.hpp"
#include "ptqlab/model/safetensors.hpp"
#include "ptqlab/model/synth_model.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/nn/forward.hpp"
#include "ptqlab/quant/calibration.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/text_file.hpp"
#include "ptqlab/support/utf8.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

namespace fs = std::filesystem;

fs::path synth(const fs::path& out, DType dtype, int shards, std::uint64_t seed = 7, int layers = 2) {
  SynthModelOptions o;
  o.like = "stories260K";
  o.layers = layers;
  o.dtype = dtype;
  o.shards = shards;
  o.seed = seed;
  o.tokenizer = test::model_dir("stories260K") / "tokenizer.model";
  o.out = out;
  write_synthetic_model(o);
  return out;
}

const std::vector<int>& valid_stream() {
  static const std::vector<int> s = [] {
    const Tokenizer tok(test::model_dir("stories260K") / "tokenizer.model");
    return perplexity_stream(tok, read_utf8_text_file(test::data_file("tinystories/valid.txt")), 1);
  }();
  return s;
}

PerplexityOptions quiet(int seq_len, long long windows) {
  PerplexityOptions o;
  o.seq_len = seq_len;
  o.max_windows = windows;
  o.show_progress = false;
  return o;
}

TEST(SynthModel, WritesAShardedCheckpointThatLoads) {
  test::TempDir tmp;
  const auto dir = synth(tmp.path() / "m", DType::F16, 3);
  for (const char* f : {"config.json", "tokenizer.model", "model.safetensors.index.json",
                        "model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors"})
    EXPECT_TRUE(fs::exists(dir / f)) << f;
  const auto m = open_model(dir);
  EXPECT_EQ(m.source_dtype, "F16");
  EXPECT_EQ(m.config.num_layers, 2);
  EXPECT_EQ(m.config.vocab_size, 512);
  const long long per_layer = 2 * 64 + 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 172 * 64;
  EXPECT_EQ(m.parameter_count(), 512 * 64 + 64 + 2 * per_layer);
  // Nothing but the final norm is held in float32.
  EXPECT_EQ(m.resident_bytes(), 64 * sizeof(float));
}

TEST(SynthModel, ValuesDependOnSeedNotOnShards) {
  test::TempDir tmp;
  const auto one = load_model(synth(tmp.path() / "one", DType::F32, 1));
  const auto three = load_model(synth(tmp.path() / "three", DType::F32, 3));
  const auto other = load_model(synth(tmp.path() / "other", DType::F32, 1, 8));
  EXPECT_EQ(one.embed, three.embed);
  EXPECT_EQ(one.layers[1].down_proj, three.layers[1].down_proj);
  EXPECT_NE(one.layers[1].down_proj, other.layers[1].down_proj);
  // N(0, 0.02²) weights, 1 + N(0, 0.1²) norms.
  const Matrix& w = one.layers[0].gate_proj;
  const double mean = w.mean();
  const double sd = std::sqrt((w.array() - mean).square().mean());
  EXPECT_NEAR(mean, 0.0, 0.002);
  EXPECT_NEAR(sd, 0.02, 0.001);
  EXPECT_NEAR(one.layers[0].input_norm.mean(), 1.0, 0.05);
}

TEST(SynthModel, RefusesATokenizerLargerThanTheVocabulary) {
  test::TempDir tmp;
  SynthModelOptions o;
  o.vocab = 100;
  o.tokenizer = test::model_dir("stories260K") / "tokenizer.model";
  o.out = tmp.path() / "m";
  try {
    write_synthetic_model(o);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("512 pieces, more than vocab_size 100"), std::string::npos) << e.what();
  }
  EXPECT_THROW(synth_config("llama-3-8b", 0, 0), Error);
  EXPECT_EQ(synth_config("llama-2-7b", 0, 0).intermediate_size, 11008);
  EXPECT_EQ(synth_config("llama-2-13b", 0, 0).num_layers, 40);
}

// Opened (mapped F32 in place, BF16 and sharded F16 widened layer by layer) equals loaded, bit for bit.
TEST(Streaming, PerplexityEqualsInMemory) {
  test::TempDir tmp;
  const auto f16 = synth(tmp.path() / "f16", DType::F16, 3);
  for (const fs::path dir : {test::model_dir("stories260K"), test::model_dir("stories260K-bf16"), f16}) {
    const auto opened = open_model(dir);
    const auto loaded = load_model(dir);
    const auto a = evaluate_perplexity(opened, valid_stream(), quiet(256, 6));
    const auto b = evaluate_perplexity(loaded, valid_stream(), quiet(256, 6));
    EXPECT_EQ(a.window_nll, b.window_nll) << dir;
    // One batch per group (every layer widened once per batch) changes nothing either.
    auto small = quiet(256, 6);
    small.batch_windows = 2;
    small.activation_budget = 1;
    auto big = small;
    big.activation_budget = 0;
    EXPECT_EQ(evaluate_perplexity(opened, valid_stream(), small).window_nll,
              evaluate_perplexity(opened, valid_stream(), big).window_nll)
        << dir;
    const std::span<const int> window(valid_stream().data(), 64);
    EXPECT_EQ(forward_logits(opened, window, BatchShape{1, 64}), forward_logits(loaded, window, BatchShape{1, 64}));
    EXPECT_EQ(sequence_nll(opened, window, BatchShape{1, 64}), sequence_nll(loaded, window, BatchShape{1, 64}));
  }
}

TEST(Streaming, MappedF32IsUsedInPlace) {
  const auto f32 = open_model(test::model_dir("stories260K"));
  EXPECT_EQ(f32.layer_view(0).owned_bytes(), 0u);
  EXPECT_FALSE(f32.head_view().owns());
  const auto bf16 = open_model(test::model_dir("stories260K-bf16"));
  EXPECT_EQ(bf16.layer_view(0).owned_bytes(), bf16.layer_f32_bytes());
  EXPECT_TRUE(bf16.head_view().owns());
}

std::shared_ptr<Quantizer> make_quantizer(const PluginRegistry& registry, const std::string& name,
                                          const std::map<std::string, ParamValue>& given) {
  const auto* schema = registry.find(ComponentKind::quantizer, name);
  if (schema == nullptr) throw std::runtime_error("no quantizer " + name);
  return registry.make_quantizer(name, Params::resolve(*schema, given));
}

// A GPTQ quantizer at `bits` (group 32) and 4 calibration windows of 64 tokens of stories260K.
struct GptqSetup {
  PluginRegistry registry;
  std::shared_ptr<Quantizer> gptq;
  std::vector<std::vector<int>> windows;
  explicit GptqSetup(int bits) {
    registry.add_search_path(PluginRegistry::default_plugin_dir());
    gptq = make_quantizer(registry, "gptq", {{"bits", std::int64_t{bits}}, {"group_size", std::int64_t{32}}});
    const Tokenizer tok(test::model_dir("stories260K") / "tokenizer.model");
    const auto calib = perplexity_stream(tok, read_utf8_text_file(test::data_file("tinystories/calib.txt")), 1);
    windows = draw_calibration_windows(calib, 4, 64, 5);
  }
};

TEST(Streaming, LayerwiseQuantizationEqualsInMemory) {
  const GptqSetup setup(2);
  const auto& gptq = setup.gptq;
  const auto& windows = setup.windows;
  for (const fs::path dir : {test::model_dir("stories260K"), test::model_dir("stories260K-bf16")}) {
    LlamaModel opened = open_model(dir);
    LlamaModel loaded = load_model(dir);
    EXPECT_EQ(collect_input_stats(opened, windows)[3][2].max_abs, collect_input_stats(loaded, windows)[3][2].max_abs);
    LayerwiseOptions lo;
    lo.quantizer = gptq.get();
    const auto ra = quantize_layerwise(opened, windows, lo);
    const auto rb = quantize_layerwise(loaded, windows, lo);
    ASSERT_EQ(ra.size(), rb.size());
    for (std::size_t i = 0; i < ra.size(); ++i) {
      EXPECT_EQ(ra[i].weight_error, rb[i].weight_error) << i;
      EXPECT_EQ(ra[i].output_error, rb[i].output_error) << i;
    }
    for (int l = 0; l < opened.config.num_layers; ++l) EXPECT_EQ(opened.layers[l].down_proj, loaded.layers[l].down_proj);
    EXPECT_EQ(evaluate_perplexity(opened, valid_stream(), quiet(256, 3)).window_nll,
              evaluate_perplexity(loaded, valid_stream(), quiet(256, 3)).window_nll);
  }
}

// A per-linear quantizer that rounds to a 1/64 grid, declaring (or not) that it reads the Hessian,
// and reading it (or not).
class ProbeQuantizer : public Quantizer {
 public:
  ProbeQuantizer(bool declares, bool reads) : declares_(declares), reads_(reads) {}
  bool needs_hessian() const override { return declares_; }
  BitCount quantize_linear(const LinearContext& ctx, Matrix& w) override {
    if (reads_) {
      EXPECT_GT(ctx.hessian().rows(), 0);
    }
    w = (w.array() * 64.0f).round() / 64.0f;
    BitCount b;
    b.weights = w.size();
    b.payload = b.paper = 8.0 * static_cast<double>(w.size());
    return b;
  }

 private:
  bool declares_, reads_;
};

// Inputs wider than the calibration token count take their records on X; for them a quantizer and
// mask that read no Hessian get none (1.37 GB of float64 per layer at 7B). The records and weights
// are those of the run that computed every Hessian, and a component that reads a Hessian it did not
// declare is caught. At the shipped sizes (inputs <= 256) every Hessian is still computed.
TEST(Streaming, HessianFreeQuantizersGetNoHessianWhereRecordsUseInputs) {
  LlamaConfig c;
  c.hidden_size = 320;
  c.intermediate_size = 384;
  c.num_layers = 2;
  c.num_heads = 4;
  c.num_kv_heads = 4;
  c.head_dim = 80;
  c.vocab_size = 64;
  c.max_position_embeddings = 64;
  c.rms_norm_eps = 1e-5;
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> token(0, c.vocab_size - 1);
  std::vector<std::vector<int>> windows(2, std::vector<int>(64));  // 128 tokens < 320 inputs
  for (auto& w : windows)
    for (auto& t : w) t = token(rng);
  auto run = [&](bool declares, bool reads) {
    LlamaModel m = random_llama(c, 3);
    ProbeQuantizer q(declares, reads);
    LayerwiseOptions lo;
    lo.quantizer = &q;
    auto records = quantize_layerwise(m, windows, lo);
    return std::pair{std::move(records), std::move(m)};
  };
  const auto [skipped, ms] = run(false, false);
  const auto [computed, mc] = run(true, true);
  ASSERT_EQ(skipped.size(), computed.size());
  for (std::size_t i = 0; i < skipped.size(); ++i) {
    EXPECT_EQ(skipped[i].weight_error, computed[i].weight_error) << i;
    EXPECT_EQ(skipped[i].output_error, computed[i].output_error) << i;
    EXPECT_GT(skipped[i].output_error, 0.0) << i;
  }
  for (int l = 0; l < c.num_layers; ++l) EXPECT_EQ(ms.layers[l].down_proj, mc.layers[l].down_proj);
  EXPECT_THROW(run(false, true), std::logic_error);

  // stories260K: 64 x 2 tokens, inputs of 64 and 172 (<= 256): the records use H, so it exists.
  LlamaModel tiny = load_model(test::model_dir("stories260K"));
  ProbeQuantizer undeclared(false, true);
  LayerwiseOptions lo;
  lo.quantizer = &undeclared;
  EXPECT_NO_THROW(quantize_layerwise(tiny, windows, lo));
}

// Calibration streams (docs/architecture.md, "Calibration streams"): float32 is held exactly;
// BF16/F16 hold exactly what the writers' nearest-even narrowing gives, and are read back widened.
TEST(ActivationBatches, F32IsExactAndHalfPrecisionHoldsTheNearestValue) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  Matrix m(6, 5);
  for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = normal(rng);
  for (StreamDType d : {StreamDType::f32, StreamDType::bf16, StreamDType::f16}) {
    auto rounded = [d](float x) {
      return d == StreamDType::f32 ? x : d == StreamDType::bf16 ? bf16_to_f32(f32_to_bf16(x)) : f16_to_f32(f32_to_f16(x));
    };
    ActivationBatches a(d);
    a.push_back(m);
    ASSERT_EQ(a.size(), 1u);
    EXPECT_EQ(a.bytes(), 30u * (d == StreamDType::f32 ? 4u : 2u)) << stream_dtype_name(d);
    const Matrix g = a.get(0);
    ASSERT_EQ(g.rows(), 6);
    for (Eigen::Index i = 0; i < m.size(); ++i) ASSERT_EQ(g.data()[i], rounded(m.data()[i])) << stream_dtype_name(d) << i;
    EXPECT_EQ(a.get_rows(0, 2, 3), g.middleRows(2, 3));
    Matrix t = a.take(0);
    t *= 3.0f;
    EXPECT_TRUE(a.put(0, t));
    EXPECT_EQ(a.get(0)(4, 1), rounded(t(4, 1)));
    EXPECT_THROW((void)a.get_rows(0, 4, 3), std::out_of_range);
  }
  // F16 overflows to Inf beyond 65504: put() says so (the engine names the layer); BF16 does not.
  const Matrix big = Matrix::Constant(2, 2, 1e6f);
  ActivationBatches h(StreamDType::f16), b(StreamDType::bf16);
  h.push_back(Matrix::Zero(2, 2));
  b.push_back(Matrix::Zero(2, 2));
  EXPECT_FALSE(h.put(0, big));
  EXPECT_TRUE(b.put(0, big));
  StreamDType parsed = StreamDType::f32;
  EXPECT_TRUE(parse_stream_dtype("bf16", parsed));
  EXPECT_EQ(parsed, StreamDType::bf16);
  EXPECT_FALSE(parse_stream_dtype("fp16", parsed));
}

// BF16 streams round only what is held between layers: layer-wise GPTQ on stories260K ends close
// to the float32 run (same decisions mostly, errors within a few percent), not identical.
TEST(Streaming, Bf16CalibrationStreamsStayCloseToFloat32) {
  const GptqSetup setup(4);
  const auto& gptq = setup.gptq;
  const auto& windows = setup.windows;
  const auto fp = load_model(test::model_dir("stories260K"));
  std::map<StreamDType, double> ppl;
  std::map<StreamDType, std::vector<LinearRecord>> records;
  for (StreamDType d : {StreamDType::f32, StreamDType::bf16}) {
    LlamaModel m = fp;
    LayerwiseOptions lo;
    lo.quantizer = gptq.get();
    lo.stream_dtype = d;
    records[d] = quantize_layerwise(m, windows, lo);
    ppl[d] = evaluate_perplexity(m, valid_stream(), quiet(256, 3)).ppl;
  }
  const auto& a = records[StreamDType::f32];
  const auto& b = records[StreamDType::bf16];
  ASSERT_EQ(a.size(), b.size());
  bool any_differs = false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    EXPECT_NEAR(b[i].weight_error, a[i].weight_error, 0.05 * a[i].weight_error) << i;
    any_differs = any_differs || a[i].weight_error != b[i].weight_error;
  }
  EXPECT_TRUE(any_differs);  // the streams really were rounded
  EXPECT_NEAR(ppl[StreamDType::bf16], ppl[StreamDType::f32], 0.01 * ppl[StreamDType::f32]);
}

TEST(LayerFile, F32RoundTripIsExactAndF16Rounds) {
  test::TempDir tmp;
  const auto model = load_model(test::model_dir("stories260K"));
  const auto stored = write_layer_file(tmp.path() / "l.safetensors", model.config, 3, model.layers[3], DType::F32);
  LlamaModel m = model;
  m.set_stored_layer(3, stored);
  EXPECT_FALSE(m.layer_resident(3));
  EXPECT_EQ(m.layer_copy(3).up_proj, model.layers[3].up_proj);
  const auto half = write_layer_file(tmp.path() / "h.safetensors", model.config, 3, model.layers[3], DType::F16);
  m.set_stored_layer(3, half);
  const Matrix back = m.layer_copy(3).up_proj;
  for (Eigen::Index i = 0; i < back.size(); ++i)
    ASSERT_EQ(back.data()[i], f16_to_f32(f32_to_f16(model.layers[3].up_proj.data()[i]))) << i;
  EXPECT_THROW(open_layer_file(tmp.path() / "h.safetensors", model.config, 2), Error);  // names layer 3
}

// Narrowing against a brute-force reference: the nearest representable value, ties to the even code.
template <class Widen, class Narrow>
void check_narrowing(Widen widen, Narrow narrow, std::uint32_t finite_codes_below) {
  for (std::uint32_t h = 0; h < 0x10000; ++h) {  // every finite code survives widen -> narrow
    if ((h & 0x7fffu) >= finite_codes_below) continue;
    ASSERT_EQ(narrow(widen(static_cast<std::uint16_t>(h))), h) << h;
  }
  std::mt19937 rng(11);
  std::uniform_int_distribution<std::uint32_t> code(0, finite_codes_below - 2);
  std::uniform_real_distribution<double> frac(0.0, 1.0);
  for (int i = 0; i < 200000; ++i) {
    const auto lo = static_cast<std::uint16_t>(code(rng));
    const double a = widen(lo), b = widen(static_cast<std::uint16_t>(lo + 1));
    const double t = i % 7 == 0 ? 0.5 : frac(rng);  // exact midpoints too
    const float x = static_cast<float>(a + t * (b - a));
    const std::uint16_t got = narrow(x);
    const double da = std::abs(static_cast<double>(x) - a), db = std::abs(static_cast<double>(x) - b);
    const std::uint16_t want = da < db ? lo : db < da ? static_cast<std::uint16_t>(lo + 1) : (lo % 2 == 0 ? lo : lo + 1);
    ASSERT_EQ(got, want) << x;
    ASSERT_EQ(narrow(-x), want | 0x8000u) << x;
  }
}

TEST(Conversions, F16AndBf16NarrowingIsNearestEven) {
  check_narrowing(f16_to_f32, f32_to_f16, 0x7c00u);
  check_narrowing(bf16_to_f32, f32_to_bf16, 0x7f80u);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00u);  // rounds past the largest F16: Inf
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7bffu);
  EXPECT_EQ(f32_to_f16(1e-9f), 0u);
}

// One arm on the shipped model (test::SmallExperiment) in a temporary directory, run with the
// installed plugins.
struct OneArmExperiment {
  test::TempDir dir;
  PluginRegistry registry;
  explicit OneArmExperiment(const std::string& arm_yaml) {
    test::SmallExperiment e;
    e.arms = arm_yaml;
    std::ofstream(file()) << e.yaml();
    registry.add_search_path(PluginRegistry::default_plugin_dir());
  }
  fs::path file() const { return dir.path() / "exp.yaml"; }
  RunReport run(const RunOptions& o) { return run_experiment(load_experiment(file(), registry), registry, o); }
};

const char* const kRtnArm = "  - name: rtn\n    quantizer: {name: rtn, params: {bits: 4, group_size: 32}}\n";

TEST(MemoryModel, RunOverTheLimitIsRefusedBeforeAnyArm) {
  OneArmExperiment x(kRtnArm);
  RunOptions o;
  o.out_dir = x.dir.path() / "out";
  o.memory_limit = 100e3;
  o.print_memory = false;
  try {
    x.run(o);
    FAIL() << "expected a refusal";
  } catch (const Error& err) {
    const std::string m = err.what();
    for (const char* p : {"exp.yaml", "predicted peak memory", "exceeds the 100 kB available", "--jobs", "nsamples",
                          "calibration.stream_dtype: bf16", "--layer-store"})
      EXPECT_NE(m.find(p), std::string::npos) << p << " in " << m;
  }
  EXPECT_FALSE(fs::exists(o.out_dir));
  o.memory_limit = 10e9;
  EXPECT_EQ(x.run(o).failed(), 0);
}

TEST(MemoryModel, PplOverTheLimitExitsWithTwo) {
  const auto r = test::run_ptqlab("ppl --model " + test::model_dir("stories260K").string() + " --text " +
                                  test::data_file("tinystories/valid.txt").string() + " --max-windows 2 --memory-limit 1K");
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("ptqlab: error: "), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("predicted peak memory"), std::string::npos) << r.output;
  EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << r.output;
  EXPECT_DOUBLE_EQ(parse_memory_size("1.5GiB", "--memory-limit"), 1.5 * 1024 * 1024 * 1024);
  EXPECT_THROW(parse_memory_size("6Q", "--memory-limit"), Error);
}

TEST(MemoryWatch, PeakHoldsTheLargestSampleAndWhatWasDoneThen) {
  test::TempDir dir;
  std::string doing = "before";
  std::mutex m;
  auto now = [&] {
    std::lock_guard lock(m);
    return doing;
  };
  const double base = rss_anon_bytes();
  ASSERT_GT(base, 0);
  {
    MemoryWatch watch(now, dir.path() / "trace.tsv", std::chrono::milliseconds(5000));
    std::vector<char> big;
    {
      std::lock_guard lock(m);
      doing = "a: holding 256 MB";
    }
    big.assign(256u << 20, 1);  // touched: resident
    watch.sample();
    big.clear();
    big.shrink_to_fit();
    {
      std::lock_guard lock(m);
      doing = "a: freed";
    }
    watch.sample();
    watch.stop();
    const auto peak = watch.peak();
    EXPECT_GE(peak.bytes, base + 250e6) << base;
    EXPECT_EQ(peak.doing, "a: holding 256 MB");
  }
  std::ifstream in(dir.path() / "trace.tsv");
  std::string line;
  std::vector<std::string> lines;
  while (std::getline(in, line)) lines.push_back(line);
  ASSERT_EQ(lines.size(), 5u);  // header, the first sample, the two stage changes, the last sample (stop)
  EXPECT_EQ(lines[0], "seconds\trss_anon_bytes\tdoing");
  EXPECT_NE(lines[1].find("\tbefore"), std::string::npos) << lines[1];
  EXPECT_NE(lines[2].find("\ta: holding 256 MB"), std::string::npos) << lines[2];
  EXPECT_NE(lines[3].find("\ta: freed"), std::string::npos) << lines[3];
  EXPECT_NE(lines[4].find("\ta: freed"), std::string::npos) << lines[4];
}

TEST(MemoryWatch, RunReportsMeasuredPeakAndTracesEachArmsStages) {
  OneArmExperiment x(kRtnArm);
  RunOptions o;
  o.out_dir = x.dir.path() / "out";
  o.print_memory = false;
  o.memory_trace = x.dir.path() / "no-such-dir" / "trace.tsv";
  try {  // a trace that cannot be written is refused before anything is computed or written
    x.run(o);
    FAIL() << "expected a refusal";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("no-such-dir/trace.tsv: cannot write the memory trace (--memory-trace)"),
              std::string::npos)
        << err.what();
  }
  EXPECT_FALSE(fs::exists(o.out_dir));
  o.memory_trace = x.dir.path() / "trace.tsv";
  const auto report = x.run(o);
  ASSERT_EQ(report.failed(), 0);
  EXPECT_GT(report.predicted_peak_bytes, 0);
  EXPECT_GT(report.measured_peak_bytes, 0);
  std::ifstream in(o.memory_trace);
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, "seconds\trss_anon_bytes\tdoing");
  double last_seconds = 0;
  std::set<std::string> seen;
  while (std::getline(in, line)) {
    const auto t1 = line.find('\t'), t2 = line.find('\t', t1 + 1);
    ASSERT_NE(t2, std::string::npos) << line;
    const double seconds = std::stod(line.substr(0, t1));
    const double bytes = std::stod(line.substr(t1 + 1, t2 - t1 - 1));
    EXPECT_GE(seconds, last_seconds);
    EXPECT_GT(bytes, 0);
    EXPECT_LE(bytes, report.measured_peak_bytes);
    last_seconds = seconds;
    seen.insert(line.substr(t2 + 1));
  }
  // Every phase of the first layer is in the timeline (each stage change is sampled).
  const int layers = load_llama_config(test::model_dir("stories260K") / "config.json").num_layers;
  for (const std::string phase : {"Hessians, ", "quantize q_proj, ", "record down_proj, ", "forward, ", "checkpoint, "}) {
    bool found = false;
    for (const auto& d : seen) found = found || d.rfind(fmt::format("rtn: quantize layer 1/{}, {}", layers, phase), 0) == 0;
    EXPECT_TRUE(found) << phase;
  }
  EXPECT_TRUE(seen.count("rtn: perplexity tinystories")) << "evaluation";
  EXPECT_TRUE(seen.count("rtn: writing results"));
}

TEST(LayerStore, SpilledArmsEqualResidentOnesAndLeaveNothing) {
  OneArmExperiment x("  - name: gptq\n    quantizer: {name: gptq, params: {bits: 2, group_size: 32}}\n");
  auto run = [&](const std::string& store) {
    RunOptions o;
    o.out_dir = x.dir.path() / store;
    o.layer_store = store;
    o.print_memory = false;
    const auto r = x.run(o);
    EXPECT_FALSE(fs::exists(o.out_dir / ".gptq.layers")) << store;
    return r.arms.at(0).result;
  };
  const auto mem = run("memory");
  const auto f32 = run("f32");
  const auto f16 = run("f16");
  EXPECT_EQ(mem.metrics, f32.metrics);
  ASSERT_EQ(mem.linears.size(), f32.linears.size());
  for (std::size_t i = 0; i < mem.linears.size(); ++i) EXPECT_EQ(mem.linears[i].output_error, f32.linears[i].output_error);
  const double a = mem.metrics.at("perplexity").at("tinystories").at("ppl");
  const double b = f16.metrics.at("perplexity").at("tinystories").at("ppl");
  EXPECT_NE(a, b);  // F16 storage rounds the dequantized weights
  EXPECT_LT(std::abs(b / a - 1), 0.01) << a << " vs " << b;
}

}  // namespace
}  // namespace ptqlab
