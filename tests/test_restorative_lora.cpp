// The restorative-lora preprocessor through the real engine on stories260K: stage 1 with the arm's
// quantizer, LoRA training, merge, FP metrics of the merged model, stage 2; the merged model is
// cached and shared by arms (also in parallel) and runs.
#include <gtest/gtest.h>

#include <fstream>
#include <string>

#include "ptqlab/engine/experiment.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/engine/runner.hpp"
#include "ptqlab/outputs/results.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

// Sign binarization (stage 1 and 2, cheap) with a short LoRA run; arms `a` and `b` differ only
// in stage2_stats, which the cache key leaves out, so they share one training run. `plain` is the
// stage-1 model itself (sign, no preprocessing).
std::string experiment_yaml(int steps) {
  return "name: restorative-lora-test\n"
         "model: " + test::model_dir("stories260K").string() + "\n"
         "seed: 3\n"
         "calibration:\n"
         "  text: " + test::data_file("tinystories/calib.txt").string() + "\n"
         "  nsamples: 8\n"
         "  seq_len: 128\n"
         "eval:\n"
         "  - evaluator: perplexity\n"
         "    params: {seq_len: 256, max_windows: 8}\n"
         "    datasets:\n"
         "      tinystories: " + test::data_file("tinystories/valid.txt").string() + "\n"
         "base:\n"
         "  quantizer: {name: ptq161, params: {use_mask: true, learn_scales: true, epochs: 1}}\n"
         "  preprocess:\n"
         "    - {name: restorative-lora, params: {steps: " + std::to_string(steps) +
         ", seq_len: 128, batch: 4, rank: 8, lr: 0.003}}\n"
         "arms:\n"
         "  - name: a\n"
         "  - name: b\n"
         "    preprocess:\n"
         "      - {name: restorative-lora, params: {steps: " + std::to_string(steps) +
         ", seq_len: 128, batch: 4, rank: 8, lr: 0.003, stage2_stats: stage1}}\n"
         "  - name: plain\n"
         "    preprocess: []\n";
}

struct Workspace {
  test::TempDir dir;
  PluginRegistry registry;
  std::filesystem::path yaml;

  explicit Workspace(const std::string& text) {
    registry.add_search_path(PluginRegistry::default_plugin_dir());
    yaml = dir.path() / "exp.yaml";
    std::ofstream(yaml) << text;
  }
  RunReport run(const std::string& out, int jobs, bool force) {
    RunOptions o;
    o.out_dir = dir.path() / out;
    o.cache_dir = dir.path() / "cache";
    o.jobs = jobs;
    o.force = force;
    return run_experiment(load_experiment(yaml, registry), registry, o);
  }
};

const ArmResult& arm(const RunReport& r, const std::string& name) {
  for (const auto& a : r.arms)
    if (a.arm == name) return a.result;
  throw std::runtime_error("no arm " + name);
}

const std::vector<double>* series(const ArmResult& r, const std::string& path) {
  for (const auto& s : r.series)
    if (s.path == path) return &s.values;
  return nullptr;
}

double cache_hit(const ArmResult& r) {
  const auto* s = series(r, "preprocess/restorative-lora/cache_hit");
  return s != nullptr && s->size() == 1 ? s->front() : -1.0;
}

TEST(RestorativeLora, TrainsOnceSharesTheMergedModelAndImprovesTheStage1Model) {
  Workspace w(experiment_yaml(30));
  const auto r = w.run("out", 2, false);
  for (const auto& a : r.arms) ASSERT_EQ(a.status, ArmOutcome::Status::completed) << a.arm << ": " << a.message;
  const auto& a = arm(r, "a");
  const auto& b = arm(r, "b");
  const auto& plain = arm(r, "plain");

  // Exactly one of the two parallel arms trained; the other waited and loaded its merged model.
  EXPECT_EQ(cache_hit(a) + cache_hit(b), 1.0);
  ASSERT_NE(series(a, "preprocess/restorative-lora/loss"), nullptr);
  EXPECT_EQ(series(a, "preprocess/restorative-lora/loss")->size(), 30u);
  EXPECT_EQ(*series(a, "preprocess/restorative-lora/loss"), *series(b, "preprocess/restorative-lora/loss"));
  EXPECT_EQ(series(plain, "preprocess/restorative-lora/loss"), nullptr);
  // The arm that trained logged its stage-1 quantization apart from its final one (PTQ1.61's
  // per-layer loss curves): both are in its result, under different paths.
  const auto& trained = cache_hit(a) == 0.0 ? a : b;
  EXPECT_NE(series(trained, "preprocess/restorative-lora/stage1/layer0/loss"), nullptr);
  EXPECT_NE(series(trained, "layer0/loss"), nullptr);

  // The merged model's FP perplexity (Table 9 row) is recorded, identical for a and b, and the
  // training restored the stage-1 model on held-out text: it beats the stage-1 model itself.
  const double merged = a.metrics.at("preprocessed:perplexity").at("tinystories").at("ppl");
  EXPECT_EQ(merged, b.metrics.at("preprocessed:perplexity").at("tinystories").at("ppl"));
  const double stage1 = plain.metrics.at("perplexity").at("tinystories").at("ppl");
  std::printf("[restorative-lora] held-out ppl: stage-1 model %.2f, merged model %.2f, after stage 2: %.2f (a), %.2f (b)\n",
              stage1, merged, a.metrics.at("perplexity").at("tinystories").at("ppl"),
              b.metrics.at("perplexity").at("tinystories").at("ppl"));
  EXPECT_LT(merged, 0.9 * stage1);
  EXPECT_EQ(plain.metrics.count("preprocessed:perplexity"), 0u);
  // Stage 2 of a recomputes the masks on the merged model, b keeps the original statistics: with an
  // activation mask the two stage-2 models differ.
  EXPECT_NE(a.metrics.at("perplexity").at("tinystories").at("ppl"), b.metrics.at("perplexity").at("tinystories").at("ppl"));

  // A second run (recomputing every arm) trains nothing: both arms load the cached merged model
  // and get the same numbers.
  const auto again = w.run("out", 1, true);
  EXPECT_EQ(cache_hit(arm(again, "a")), 1.0);
  EXPECT_EQ(cache_hit(arm(again, "b")), 1.0);
  EXPECT_EQ(arm(again, "a").metrics, a.metrics);
  EXPECT_EQ(*series(arm(again, "a"), "preprocess/restorative-lora/loss"), *series(a, "preprocess/restorative-lora/loss"));

  // The loss curve is in the arm's HDF5 file.
  const auto stored = read_arm_result(w.dir.path() / "out" / "a.h5");
  EXPECT_NE(series(stored, "preprocess/restorative-lora/loss"), nullptr);
  EXPECT_EQ(stored.metrics.count("preprocessed:perplexity"), 1u);
}

TEST(RestorativeLora, BadParametersAreRefused) {
  Workspace w("name: bad\n"
              "model: " + test::model_dir("stories260K").string() + "\n"
              "calibration: {text: " + test::data_file("tinystories/calib.txt").string() + ", nsamples: 2, seq_len: 64}\n"
              "eval: []\n"
              "arms:\n"
              "  - name: t\n"
              "    preprocess: [{name: restorative-lora, params: {targets: 'q,x'}}]\n"
              "    quantizer: sign\n"
              "  - name: f\n"
              "    preprocess: [{name: restorative-lora, params: {text: /nonexistent/file.txt}}]\n"
              "    quantizer: sign\n");
  const auto r = w.run("out", 1, false);
  ASSERT_EQ(r.arms.size(), 2u);
  EXPECT_EQ(r.arms[0].status, ArmOutcome::Status::failed);
  EXPECT_NE(r.arms[0].message.find("unknown linear 'x'"), std::string::npos) << r.arms[0].message;
  EXPECT_EQ(r.arms[1].status, ArmOutcome::Status::failed);
  EXPECT_NE(r.arms[1].message.find("/nonexistent/file.txt: preprocessor restorative-lora: parameter 'text'"),
            std::string::npos)
      << r.arms[1].message;
}

}  // namespace
}  // namespace ptqlab
