#pragma once
// Helpers shared by the quantizer tests (GPTQ, PB-LLM, BiLLM): random weights and Hessians, the
// built-in plugins, running a quantizer on a given Hessian, and the Hessian-weighted output error.
#include <array>
#include <cmath>
#include <map>
#include <memory>
#include <random>
#include <string>

#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/nn/forward.hpp"
#include "ptqlab/quant/calibration.hpp"
#include "ptqlab/support/text_file.hpp"
#include "test_support.hpp"

namespace ptqlab::test {

inline Matrix random_weight(Eigen::Index rows, Eigen::Index cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 0.05f);
  Matrix w(rows, cols);
  for (Eigen::Index i = 0; i < w.size(); ++i) w.data()[i] = d(rng);
  return w;
}

// H = 2 XᵀX / n for correlated random inputs (a random mixing of iid features).
inline Eigen::MatrixXd random_hessian(Eigen::Index cols, Eigen::Index tokens, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> d(0.0, 1.0);
  Eigen::MatrixXd z(tokens, cols), mix(cols, cols);
  for (Eigen::Index i = 0; i < z.size(); ++i) z.data()[i] = d(rng);
  for (Eigen::Index i = 0; i < mix.size(); ++i) mix.data()[i] = d(rng) * 0.3;
  mix.diagonal().array() += 1.0;
  const Eigen::MatrixXd x = z * mix;
  return 2.0 * x.transpose() * x / static_cast<double>(tokens);
}

// The plugins of this build (build/lib/plugins), loaded once.
inline PluginRegistry& builtin_registry() {
  static PluginRegistry r;
  static bool loaded = (r.add_search_path(PluginRegistry::default_plugin_dir()), true);
  (void)loaded;
  return r;
}

inline std::shared_ptr<Quantizer> make_quantizer(const std::string& name,
                                                 const std::map<std::string, ParamValue>& params = {}) {
  auto& r = builtin_registry();
  return r.make_quantizer(name, Params::resolve(*r.find(ComponentKind::quantizer, name), params));
}

inline std::shared_ptr<Mask> make_mask(const std::string& name, const std::map<std::string, ParamValue>& params = {}) {
  auto& r = builtin_registry();
  return r.make_mask(name, Params::resolve(*r.find(ComponentKind::mask, name), params));
}

// Quantizes `w` with `q`, given the Hessian of its input.
inline BitCount run_with_hessian(Quantizer& q, Matrix& w, const Eigen::MatrixXd& H, TensorLog* log = nullptr) {
  LinearContext ctx;
  ctx.hessian = [&H]() -> const Eigen::MatrixXd& { return H; };
  ctx.log = log;
  ctx.log_prefix = "lin";
  return q.quantize_linear(ctx, w);
}

// ||X (Wq - W)ᵀ|| / ||X Wᵀ|| through H ∝ XᵀX: sqrt(tr(D H Dᵀ) / tr(W H Wᵀ)).
inline double output_error(const Matrix& w, const Matrix& wq, const Eigen::MatrixXd& H) {
  const Eigen::MatrixXd d = (wq - w).cast<double>(), wd = w.cast<double>();
  return std::sqrt(((d * H).cwiseProduct(d)).sum() / ((wd * H).cwiseProduct(wd)).sum());
}

// Real Hessians: H = 2 XᵀX / n of the four linear inputs of decoder layer `layer` of `model`
// (stories260K in the tests) over 16 TinyStories calibration windows of 256 tokens (seed 0).
inline std::array<Eigen::MatrixXd, 4> real_layer_hessians(const LlamaModel& model, int layer) {
  const Tokenizer tok(model_dir("stories260K") / "tokenizer.model");
  const auto stream = perplexity_stream(tok, read_text_file(data_file("tinystories/calib.txt")), 1);
  const auto windows = draw_calibration_windows(stream, 16, 256, 0);
  class Capture : public ForwardObserver {
   public:
    explicit Capture(int layer) : layer_(layer) {}
    std::array<Eigen::MatrixXd, 4> H;
    Eigen::Index n = 0;
    void on_linear_input(int layer, LinearInput which, const Matrix& x, BatchShape) override {
      if (layer != layer_) return;
      auto& h = H[static_cast<int>(which)];
      if (h.size() == 0) h = Eigen::MatrixXd::Zero(x.cols(), x.cols());
      h += 2.0 * (x.transpose() * x).cast<double>();
      if (which == LinearInput::attn_in) n += x.rows();
    }

   private:
    int layer_;
  } cap(layer);
  std::vector<int> flat;
  for (const auto& w : windows) flat.insert(flat.end(), w.begin(), w.end());
  forward_logits(model, flat, BatchShape{16, 256}, &cap);
  for (auto& h : cap.H) h /= static_cast<double>(cap.n);
  return cap.H;
}

}  // namespace ptqlab::test
