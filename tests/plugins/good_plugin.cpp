// A plugin built outside plugins/ (tests/plugins), loaded from its own directory by the tests.
// Quantizer "test-scale" multiplies weights by `factor`; it counts live instances so the test can
// check the library stays loaded while an object lives.
#include <chrono>
#include <cmath>
#include <fstream>
#include <limits>
#include <thread>

#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/support/error.hpp"

namespace {

int live = 0;

class ScaleQuantizer : public ptqlab::Quantizer {
 public:
  explicit ScaleQuantizer(const ptqlab::Params& p) : factor_(static_cast<float>(p.get_real("factor"))) { ++live; }
  ~ScaleQuantizer() override { --live; }
  ptqlab::BitCount quantize_linear(const ptqlab::LinearContext&, ptqlab::Matrix& w) override {
    w *= factor_;
    ptqlab::BitCount b;
    b.weights = w.size();
    b.payload = 32.0 * w.size();
    b.paper = b.payload;
    return b;
  }

 private:
  float factor_;
};

// Produces NaN weights: the runner must record the arm as failed and go on with the others.
class NanQuantizer : public ptqlab::Quantizer {
 public:
  ptqlab::BitCount quantize_linear(const ptqlab::LinearContext&, ptqlab::Matrix& w) override {
    w(0, 0) = std::numeric_limits<float>::quiet_NaN();
    return {};
  }
};

// A decoder-layer quantizer: receives both calibration streams, logs their relative gap
// ||X_fp - X_q|| / ||X_fp|| per layer, then rounds every linear of the layer to a 1/8 grid.
class LayerQuantizer : public ptqlab::Quantizer {
 public:
  Granularity granularity() const override { return Granularity::decoder_layer; }
  bool needs_fp_stream() const override { return true; }
  std::array<ptqlab::BitCount, 7> quantize_layer(const ptqlab::LayerContext& ctx, ptqlab::DecoderLayer& layer) override {
    double diff = 0, norm = 0;
    for (std::size_t b = 0; b < ctx.inputs->fp.size(); ++b) {
      diff += (ctx.inputs->fp.get(b) - ctx.inputs->quant.get(b)).squaredNorm();
      norm += ctx.inputs->fp.get(b).squaredNorm();
    }
    ctx.log->series(ctx.log_prefix + "/stream_gap", {std::sqrt(diff / norm)});
    std::array<ptqlab::BitCount, 7> bits;
    for (std::size_t i = 0; i < 7; ++i) {
      auto& w = layer.linear(ptqlab::kAllLinears[i]);
      w = (w.array() * 8.0f).round() / 8.0f;
      bits[i].weights = w.size();
      bits[i].payload = 8.0 * w.size();
      bits[i].paper = bits[i].payload;
    }
    return bits;
  }
};

// Leaves weights alone but takes `ms` milliseconds per linear, and creates the file `marker` when
// it starts: a run that is reliably in the middle of a layer when a test sends SIGTERM.
class SlowQuantizer : public ptqlab::Quantizer {
 public:
  explicit SlowQuantizer(const ptqlab::Params& p) : ms_(p.get_int("ms")), marker_(p.get_string("marker")) {}
  ptqlab::BitCount quantize_linear(const ptqlab::LinearContext&, ptqlab::Matrix& w) override {
    if (!marker_.empty()) std::ofstream(marker_) << "started\n";
    std::this_thread::sleep_for(std::chrono::milliseconds(ms_));
    ptqlab::BitCount b;
    b.weights = w.size();
    b.payload = 32.0 * w.size();
    b.paper = b.payload;
    return b;
  }

 private:
  long long ms_;
  std::string marker_;
};

class ConstantEvaluator : public ptqlab::Evaluator {
 public:
  std::map<std::string, double> evaluate(const ptqlab::EvalContext& ctx, const ptqlab::LlamaModel&) override {
    return {{"tokens", static_cast<double>(ctx.tokens().size())}, {"live_quantizers", static_cast<double>(live)}};
  }
};

}  // namespace

extern "C" __attribute__((visibility("default"))) int test_plugin_live_count() { return live; }

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema q;
  q.name = "test-scale";
  q.description = "test: multiplies weights by a factor";
  q.params = {{"factor", ptqlab::ParamType::real, 1.0, "multiplier", 0.0, 10.0, {}},
              {"mode", ptqlab::ParamType::string, std::string("plain"), "a string choice", {}, {}, {"plain", "fancy"}}};
  registrar->add_quantizer(q, [](const ptqlab::Params& p) { return std::make_unique<ScaleQuantizer>(p); });
  ptqlab::ComponentSchema nan;
  nan.name = "test-nan";
  nan.description = "test: writes a NaN weight";
  registrar->add_quantizer(nan, [](const ptqlab::Params&) { return std::make_unique<NanQuantizer>(); });
  ptqlab::ComponentSchema layer;
  layer.name = "test-layer";
  layer.description = "test: a per-decoder-layer quantizer";
  registrar->add_quantizer(layer, [](const ptqlab::Params&) { return std::make_unique<LayerQuantizer>(); });
  ptqlab::ComponentSchema refuses;
  refuses.name = "test-refuses";
  refuses.description = "test: its factory always throws ptqlab::Error";
  registrar->add_quantizer(refuses, [](const ptqlab::Params&) -> std::unique_ptr<ptqlab::Quantizer> {
    throw ptqlab::Error("test-refuses: this combination of parameters is not supported");
  });
  ptqlab::ComponentSchema slow;
  slow.name = "test-slow";
  slow.description = "test: sleeps per linear, creates a marker file when it starts";
  slow.params = {{"ms", ptqlab::ParamType::integer, std::int64_t{100}, "milliseconds per linear", 0.0, 100000.0, {}},
                 {"marker", ptqlab::ParamType::string, std::string(""), "file created when quantization starts", {}, {}, {}}};
  registrar->add_quantizer(slow, [](const ptqlab::Params& p) { return std::make_unique<SlowQuantizer>(p); });
  ptqlab::ComponentSchema e;
  e.name = "test-count";
  e.description = "test: counts tokens";
  registrar->add_evaluator(e, [](const ptqlab::Params&) { return std::make_unique<ConstantEvaluator>(); });
}
