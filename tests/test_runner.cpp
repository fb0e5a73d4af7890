// The experiment runner end to end on the real stories260K: parallel arms equal serial ones bit
// for bit, resume skips finished arms (SIGKILLed runs: test_faults.cpp), failures are recorded without
// stopping the other arms, and result files carry what docs/results-schema.md promises.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fcntl.h>

#include <chrono>
#include <fstream>
#include <thread>

#include "ptqlab/engine/experiment.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/engine/runner.hpp"
#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/quant/calibration.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/text_file.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

// The small stories260K experiment (fp, rtn 4/bits2 bits, sign) plus `extra_arms`.
std::string experiment_yaml(const std::string& extra_arms = "", int bits2 = 2) {
  test::SmallExperiment e;
  e.name = "runner-test";
  e.seed = 3;
  e.arms = test::standard_arms(bits2) + extra_arms;
  return e.yaml();
}

struct Workspace {
  test::TempDir dir;
  PluginRegistry registry;
  std::filesystem::path yaml;

  explicit Workspace(const std::string& text) {
    registry.add_search_path(PluginRegistry::default_plugin_dir());
    registry.add_search_path(std::filesystem::path(PTQLAB_TEST_PLUGINS) / "good");
    yaml = dir.path() / "exp.yaml";
    std::ofstream(yaml) << text;
  }
  RunReport run(const std::string& out, int jobs, bool force = false, const std::string& glob = "*") {
    RunOptions o;
    o.out_dir = dir.path() / out;
    o.jobs = jobs;
    o.force = force;
    o.arms_glob = glob;
    return run_experiment(load_experiment(yaml, registry), registry, o);
  }
};

const ArmOutcome& arm(const RunReport& r, const std::string& name) {
  for (const auto& a : r.arms)
    if (a.arm == name) return a;
  throw std::runtime_error("no arm " + name);
}

TEST(Runner, ParallelArmsAreBitIdenticalToSerial) {
  Workspace s(experiment_yaml());
  const auto serial = s.run("serial", 1);
  const auto parallel = s.run("parallel", 2);
  ASSERT_EQ(serial.arms.size(), 4u);
  ASSERT_EQ(parallel.arms.size(), 4u);
  for (std::size_t i = 0; i < serial.arms.size(); ++i) {
    const auto& a = serial.arms[i].result;
    const auto& b = parallel.arms[i].result;
    EXPECT_EQ(serial.arms[i].arm, parallel.arms[i].arm);
    EXPECT_EQ(a.metrics, b.metrics) << serial.arms[i].arm;  // exact doubles
    ASSERT_EQ(a.linears.size(), b.linears.size());
    for (std::size_t l = 0; l < a.linears.size(); ++l) {
      EXPECT_EQ(a.linears[l].weight_error, b.linears[l].weight_error);
      EXPECT_EQ(a.linears[l].output_error, b.linears[l].output_error);
    }
    EXPECT_EQ(a.config_hash, b.config_hash);
    EXPECT_EQ(a.calibration_tokens, b.calibration_tokens);
  }
  // And what is on disk is what was reported.
  const auto from_disk = read_arm_result(s.dir.path() / "parallel" / "rtn-bits2.h5");
  EXPECT_EQ(from_disk.metrics, arm(parallel, "rtn-bits2").result.metrics);
}

TEST(Runner, ResultsCarryMetricsBitsCalibrationAndProvenance) {
  Workspace s(experiment_yaml());
  const auto report = s.run("out", 2);
  EXPECT_EQ(report.failed(), 0);
  const auto fp = read_arm_result(s.dir.path() / "out" / "fp.h5");
  const auto rtn4 = read_arm_result(s.dir.path() / "out" / "rtn-bits4.h5");
  const auto rtn2 = read_arm_result(s.dir.path() / "out" / "rtn-bits2.h5");

  // FP perplexity equals the protocol run directly on the unquantized model.
  const auto model = load_model(test::model_dir("stories260K"));
  const Tokenizer tok(test::model_dir("stories260K") / "tokenizer.model");
  const auto stream = perplexity_stream(tok, read_text_file(test::data_file("tinystories/valid.txt")), 1);
  PerplexityOptions po;
  po.seq_len = 256;
  po.max_windows = 3;
  po.show_progress = false;
  EXPECT_DOUBLE_EQ(fp.metrics.at("perplexity").at("tinystories").at("ppl"), evaluate_perplexity(model, stream, po).ppl);
  // Fewer bits, worse perplexity.
  const double p4 = rtn4.metrics.at("perplexity").at("tinystories").at("ppl");
  const double p2 = rtn2.metrics.at("perplexity").at("tinystories").at("ppl");
  EXPECT_LT(fp.metrics.at("perplexity").at("tinystories").at("ppl"), p4);
  EXPECT_LT(p4, p2);

  // Bit ledger: 35 linears; 4-bit per-group-of-32 asymmetric: 4 + (16 + 4) / 32 bits per weight.
  ASSERT_EQ(rtn4.linears.size(), 35u);
  EXPECT_EQ(rtn4.linears[0].linear, "q_proj");
  EXPECT_EQ(rtn4.linears[34].layer, 4);
  EXPECT_EQ(rtn4.total_bits.weights, 5 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 172));
  EXPECT_DOUBLE_EQ(rtn4.total_bits.paper_per_weight(), 4.0);
  // 172 is not a multiple of 32: down_proj rows have 6 groups, the last of 12 columns.
  long long groups = 0;
  for (const auto& l : rtn4.linears) groups += l.bits.scales / 16;
  EXPECT_NEAR(rtn4.total_bits.all_in(), 4.0 * rtn4.total_bits.weights + 20.0 * groups, 1e-6);
  for (const auto& l : fp.linears) {
    EXPECT_EQ(l.weight_error, 0.0);
    EXPECT_EQ(l.output_error, 0.0);
  }
  for (const auto& l : rtn2.linears) {
    EXPECT_GT(l.weight_error, 0.0);
    EXPECT_GT(l.output_error, 0.0);
    EXPECT_LT(l.output_error, 2.0);
  }

  // Calibration: 8 windows of 128 tokens, exactly those drawn from the calibration text.
  EXPECT_EQ(fp.calibration_nsamples, 8);
  EXPECT_EQ(fp.calibration_seq_len, 128);
  const auto calib_stream = perplexity_stream(tok, read_text_file(test::data_file("tinystories/calib.txt")), 1);
  const auto windows = draw_calibration_windows(calib_stream, 8, 128, 3);
  std::vector<std::int32_t> flat;
  for (const auto& w : windows) flat.insert(flat.end(), w.begin(), w.end());
  EXPECT_EQ(fp.calibration_tokens, flat);

  // Provenance and config.
  EXPECT_FALSE(fp.provenance.git_revision.empty());
  EXPECT_TRUE(fp.provenance.library_versions.count("eigen"));
  EXPECT_TRUE(fp.provenance.library_versions.count("hdf5"));
  EXPECT_EQ(fp.provenance.seeds.at("experiment"), 3);
  EXPECT_FALSE(fp.provenance.start_time.empty());
  EXPECT_NE(rtn4.config_yaml.find("bits: 4"), std::string::npos) << rtn4.config_yaml;
  EXPECT_NE(rtn4.config_hash, rtn2.config_hash);
  EXPECT_EQ(rtn4.status, "ok");
}

TEST(Runner, RerunSkipsFinishedArmsAndRefusesChangedConfigs) {
  Workspace s(experiment_yaml());
  s.run("out", 2);
  const auto again = s.run("out", 2);
  for (const auto& a : again.arms) EXPECT_EQ(a.status, ArmOutcome::Status::skipped) << a.arm;
  EXPECT_DOUBLE_EQ(arm(again, "rtn-bits4").result.metrics.at("perplexity").at("tinystories").at("ppl"),
                   read_arm_result(s.dir.path() / "out" / "rtn-bits4.h5").metrics.at("perplexity").at("tinystories").at("ppl"));

  // The same arm names with another configuration: refused unless forced.
  std::string changed = experiment_yaml();
  changed.replace(changed.find("seed: 3"), 7, "seed: 4");
  std::ofstream(s.yaml) << changed;
  try {
    s.run("out", 1);
    FAIL() << "expected a conflict";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("already hold results of a different configuration"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("--force"), std::string::npos);
  }
  const auto forced = s.run("out", 1, /*force=*/true, "fp");
  ASSERT_EQ(forced.arms.size(), 1u);
  EXPECT_EQ(forced.arms[0].status, ArmOutcome::Status::completed);
}

TEST(Runner, ArmsGlobSelects) {
  Workspace s(experiment_yaml());
  const auto r = s.run("out", 1, false, "rtn-*");
  ASSERT_EQ(r.arms.size(), 2u);
  EXPECT_TRUE(std::filesystem::exists(s.dir.path() / "out" / "rtn-bits4.h5"));
  EXPECT_FALSE(std::filesystem::exists(s.dir.path() / "out" / "fp.h5"));
  try {
    s.run("out", 1, false, "gptq*");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--arms 'gptq*' matches no arm"), std::string::npos) << e.what();
  }
}

TEST(Runner, FailedArmIsRecordedAndTheOthersFinish) {
  Workspace s(experiment_yaml("  - name: broken\n    quantizer: test-nan\n"));
  const auto r = s.run("out", 2);
  EXPECT_EQ(r.failed(), 1);
  EXPECT_EQ(arm(r, "broken").status, ArmOutcome::Status::failed);
  EXPECT_NE(arm(r, "broken").message.find("non-finite weights"), std::string::npos) << arm(r, "broken").message;
  const auto broken = read_arm_result(s.dir.path() / "out" / "broken.h5");
  EXPECT_EQ(broken.status, "failed");
  EXPECT_NE(broken.failure.find("layer 0 q_proj"), std::string::npos) << broken.failure;
  EXPECT_EQ(arm(r, "sign").status, ArmOutcome::Status::completed);
  // A failed arm is retried on the next run; finished ones are not.
  const auto again = s.run("out", 1);
  EXPECT_EQ(arm(again, "broken").status, ArmOutcome::Status::failed);
  EXPECT_EQ(arm(again, "fp").status, ArmOutcome::Status::skipped);
}

TEST(Runner, DecoderLayerQuantizerGetsBothStreams) {
  Workspace s(experiment_yaml("  - name: layerwise\n    quantizer: test-layer\n"));
  const auto r = s.run("out", 1, false, "layerwise");
  ASSERT_EQ(r.failed(), 0) << r.arms[0].message;
  const auto result = read_arm_result(s.dir.path() / "out" / "layerwise.h5");
  ASSERT_EQ(result.series.size(), 5u);
  for (int l = 0; l < 5; ++l) {
    EXPECT_EQ(result.series[l].path, "layer" + std::to_string(l) + "/stream_gap");
    if (l == 0)
      EXPECT_EQ(result.series[l].values[0], 0.0);  // both streams start at the embeddings
    else
      EXPECT_GT(result.series[l].values[0], 0.0);  // quantized layers made the streams diverge
  }
  ASSERT_EQ(result.linears.size(), 35u);
  for (const auto& rec : result.linears) {
    EXPECT_GT(rec.weight_error, 0.0);
    EXPECT_DOUBLE_EQ(rec.bits.paper_per_weight(), 8.0);
  }
}

// Kills of real runs (SIGKILL at named points and from outside) and a full disk: test_faults.cpp.

TEST(RunCli, QuickstartStyleRunPrintsTableAndExitCodes) {
  Workspace s(experiment_yaml("  - name: broken\n    quantizer: test-nan\n"));
  const auto plugin_dir = (std::filesystem::path(PTQLAB_TEST_PLUGINS) / "good").string();
  const auto r = test::run_ptqlab("run " + s.yaml.string() + " --out " + (s.dir.path() / "cli").string() +
                                  " --jobs 2 --plugin-path " + plugin_dir);
  EXPECT_EQ(r.exit_code, 1) << r.output;  // one arm failed
  EXPECT_NE(r.output.find("tinystories ppl"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("FAILED"), std::string::npos);
  EXPECT_NE(r.output.find("ptqlab: arm 'broken' failed"), std::string::npos);
  // Not a terminal: one line per finished step, no carriage-return redraws.
  EXPECT_EQ(r.output.find('\r'), std::string::npos);
  EXPECT_NE(r.output.find("[rtn-bits4] done in"), std::string::npos);

  const auto bad = test::run_ptqlab("run " + s.yaml.string() + " --jobs 0");
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.output.find("--jobs must be at least 1"), std::string::npos);
}

}  // namespace
}  // namespace ptqlab
