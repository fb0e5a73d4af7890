// Layer-level checkpoints (docs/slurm.md, "Layer-level resume"): an arm killed with SIGKILL right
// after any decoder layer resumes there and ends bit-identical to an uninterrupted run; the
// checkpoint goes once the result is written. And export: an arm's quantized model as a HF
// checkpoint that loads back with the arm's perplexity.
#include <gtest/gtest.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/model/model.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/outputs/export.hpp"
#include "ptqlab/outputs/results.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/text_file.hpp"
#include "ptqlab/support/utf8.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

namespace fs = std::filesystem;

std::string yaml_text() {
  test::SmallExperiment e;
  e.name = "resume-test";
  e.nsamples = 4;
  e.max_windows = 2;
  e.arms = "  - name: gptq\n    quantizer: {name: gptq, params: {bits: 2, group_size: 32}}\n";
  return e.yaml();
}

// The token streams come from one cache next to the experiment (tokenizing is most of a run's time
// here); the arms are always recomputed.
test::CommandResult run(const fs::path& yaml, const fs::path& out, const std::string& fault, const std::string& extra = "") {
  const std::string env = fault.empty() ? "" : "PTQLAB_FAULT=" + fault + " ";
  return test::run_shell(env + PTQLAB_BINARY + " run " + yaml.string() + " --out " + out.string() + " --cache-dir " +
                         (yaml.parent_path() / "cache").string() + " " + extra);
}

void expect_same(const ArmResult& a, const ArmResult& b) {
  EXPECT_EQ(a.metrics, b.metrics);
  ASSERT_EQ(a.linears.size(), b.linears.size());
  for (std::size_t i = 0; i < a.linears.size(); ++i) {
    EXPECT_EQ(a.linears[i].weight_error, b.linears[i].weight_error) << i;
    EXPECT_EQ(a.linears[i].output_error, b.linears[i].output_error) << i;
    EXPECT_EQ(a.linears[i].bits.all_in(), b.linears[i].bits.all_in()) << i;
  }
  EXPECT_EQ(a.series.size(), b.series.size());
}

TEST(LayerResume, KilledAfterEveryLayerResumesThereBitIdentical) {
  test::TempDir dir;
  const auto yaml = dir.path() / "exp.yaml";
  std::ofstream(yaml) << yaml_text();
  ASSERT_EQ(run(yaml, dir.path() / "whole", "").exit_code, 0);
  const auto whole = read_arm_result(dir.path() / "whole" / "gptq.h5");
  for (int k = 1; k <= 4; ++k) {  // stories260K has 5 layers: killed after layer k, resumed at k+1
    const auto out = dir.path() / ("killed" + std::to_string(k));
    const auto killed = run(yaml, out, "layer-checkpoint:" + std::to_string(k));
    EXPECT_NE(killed.exit_code, 0) << killed.output;
    EXPECT_FALSE(fs::exists(out / "gptq.h5"));
    EXPECT_TRUE(fs::exists(out / ".gptq.layers" / "state.bin"));
    const auto resumed = run(yaml, out, "");
    ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
    EXPECT_NE(resumed.output.find("resuming at layer " + std::to_string(k + 1) + "/5"), std::string::npos)
        << resumed.output;
    expect_same(whole, read_arm_result(out / "gptq.h5"));
    EXPECT_FALSE(fs::exists(out / ".gptq.layers"));
  }
}

TEST(LayerResume, F16LayerStoreResumesToo) {
  test::TempDir dir;
  const auto yaml = dir.path() / "exp.yaml";
  std::ofstream(yaml) << yaml_text();
  ASSERT_EQ(run(yaml, dir.path() / "whole", "", "--layer-store f16").exit_code, 0);
  const auto out = dir.path() / "killed";
  EXPECT_NE(run(yaml, out, "layer-checkpoint:3", "--layer-store f16").exit_code, 0);
  // The spilled F16 layer files are the checkpoint: the rerun maps them back and goes on.
  const auto resumed = run(yaml, out, "", "--layer-store f16");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resuming at layer 4/5"), std::string::npos) << resumed.output;
  expect_same(read_arm_result(dir.path() / "whole" / "gptq.h5"), read_arm_result(out / "gptq.h5"));
}

// BF16 calibration streams (calibration.stream_dtype): the checkpoint holds them widened, the
// resumed run holds them in BF16 again, and the result equals the uninterrupted BF16 run's.
TEST(LayerResume, Bf16StreamsResumeBitIdentical) {
  test::TempDir dir;
  std::string text = yaml_text();
  const std::string at = "calibration:\n";
  text.replace(text.find(at), at.size(), at + "  stream_dtype: bf16\n");
  const auto yaml = dir.path() / "exp.yaml";
  std::ofstream(yaml) << text;
  ASSERT_EQ(run(yaml, dir.path() / "whole", "").exit_code, 0);
  const auto out = dir.path() / "killed";
  EXPECT_NE(run(yaml, out, "layer-checkpoint:2").exit_code, 0);
  const auto resumed = run(yaml, out, "");
  ASSERT_EQ(resumed.exit_code, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resuming at layer 3/5"), std::string::npos) << resumed.output;
  const auto whole = read_arm_result(dir.path() / "whole" / "gptq.h5");
  expect_same(whole, read_arm_result(out / "gptq.h5"));
  EXPECT_NE(whole.config_hash, "");
}

TEST(Export, RoundTripGivesTheArmsPerplexity) {
  test::TempDir dir;
  const auto yaml = dir.path() / "exp.yaml";
  std::ofstream(yaml) << yaml_text();
  const auto r = run(yaml, dir.path() / "out", "", "--export-dir " + (dir.path() / "f32").string() + " --export-dtype f32");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto arm = read_arm_result(dir.path() / "out" / "gptq.h5");
  const auto exported = open_model(dir.path() / "f32" / "gptq");
  EXPECT_EQ(exported.source_dtype, "F32");
  const Tokenizer tok(dir.path() / "f32" / "gptq" / "tokenizer.model");
  const auto stream = perplexity_stream(tok, read_utf8_text_file(test::data_file("tinystories/valid.txt")), 1);
  PerplexityOptions o;
  o.seq_len = 256;
  o.max_windows = 2;
  o.show_progress = false;
  EXPECT_EQ(evaluate_perplexity(exported, stream, o).ppl, arm.metrics.at("perplexity").at("tinystories").at("ppl"));
  std::ifstream cfg(dir.path() / "f32" / "gptq" / "config.json");
  const auto j = nlohmann::json::parse(cfg);
  const auto& q = j.at("ptqlab_quantization_config");
  EXPECT_EQ(q.at("method"), "gptq");
  EXPECT_EQ(q.at("params").at("bits"), 2);
  EXPECT_EQ(q.at("config_hash"), arm.config_hash);
  EXPECT_DOUBLE_EQ(q.at("bits").at("all_in").get<double>(), arm.total_bits.all_in_per_weight());
  EXPECT_EQ(j.at("torch_dtype"), "float32");

  // F16: the same model rounded to F16 once; its perplexity is that of the rounded weights.
  const auto r16 = run(yaml, dir.path() / "out16", "", "--export-dir " + (dir.path() / "f16").string());
  ASSERT_EQ(r16.exit_code, 0) << r16.output;
  const auto half = open_model(dir.path() / "f16" / "gptq");
  EXPECT_EQ(half.source_dtype, "F16");
  const double p16 = evaluate_perplexity(half, stream, o).ppl;
  const double p32 = arm.metrics.at("perplexity").at("tinystories").at("ppl");
  EXPECT_LT(std::abs(p16 / p32 - 1), 0.01) << p16 << " vs " << p32;
}

}  // namespace
}  // namespace ptqlab
