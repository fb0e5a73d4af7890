// ptqlab report: golden Markdown, LaTeX and CSV tables from a fixed set of result files, seeds
// aggregated as mean ± std, best values bold, missing cells "–", failed runs shown as NaN.
#include <gtest/gtest.h>

#include <fstream>

#include "ptqlab/error.hpp"
#include "ptqlab/report.hpp"
#include "ptqlab/results.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

ArmResult arm(const std::string& name, const std::string& model, const std::string& quantizer_yaml, double bits,
              double all_in, std::map<std::string, double> ppl) {
  ArmResult r;
  r.arm = name;
  r.experiment = "golden";
  r.config_yaml = "experiment: golden\nmodel: /models/" + model + "\nseed: 0\narm:\n  name: " + name +
                  "\n  preprocess: []\n  quantizer: " + quantizer_yaml + "\n";
  r.config_hash = "h-" + name + model;
  r.total_bits.weights = 1000;
  r.total_bits.paper = bits * 1000;
  r.total_bits.payload = all_in * 1000;
  for (const auto& [ds, v] : ppl) r.metrics["perplexity"][ds]["ppl"] = v;
  return r;
}

// Two models; fp, gptq (2 bits, two seeds on stories, one on xs), billm failed on xs, rtn missing
// the wikitext2 cell.
void write_fixture(const std::filesystem::path& dir) {
  const std::string fp = "{name: fp}", g2 = "{name: gptq, params: {bits: 2, group_size: -1}}",
                    g3 = "{name: gptq, params: {bits: 3, group_size: -1}}", bi = "{name: billm, params: {mode: faithful}}",
                    rtn = "{name: rtn, params: {bits: 2, group_size: -1}}";
  std::filesystem::create_directories(dir / "s" );
  std::filesystem::create_directories(dir / "x");
  write_arm_result(dir / "s/fp.h5", arm("fp", "stories260K", fp, 16, 16, {{"tinystories", 5.2872}, {"wikitext2", 119.3718}}));
  write_arm_result(dir / "s/gptq-w2-seed0.h5", arm("gptq-w2-seed0", "stories260K", g2, 2, 2.238, {{"tinystories", 40.0}, {"wikitext2", 400.0}}));
  write_arm_result(dir / "s/gptq-w2-seed1.h5", arm("gptq-w2-seed1", "stories260K", g2, 2, 2.238, {{"tinystories", 44.0}, {"wikitext2", 420.0}}));
  write_arm_result(dir / "s/gptq-w3.h5", arm("gptq-w3", "stories260K", g3, 3, 3.252, {{"tinystories", 9.5}, {"wikitext2", 150.25}}));
  write_arm_result(dir / "s/rtn-w2.h5", arm("rtn-w2", "stories260K", rtn, 2, 2.238, {{"tinystories", 573.59}}));
  write_arm_result(dir / "x/fp.h5", arm("fp", "llama2xs-279K", fp, 16, 16, {{"tinystories", 6.5}, {"wikitext2", 250.0}}));
  write_arm_result(dir / "x/gptq-w2-seed0.h5", arm("gptq-w2-seed0", "llama2xs-279K", g2, 2, 2.241, {{"tinystories", 80.0}, {"wikitext2", 1234567.0}}));
  auto failed = arm("billm", "llama2xs-279K", bi, 1.1, 2.9, {});
  failed.status = "failed";
  failed.failure = "layer 3: non-finite activations after quantization";
  write_arm_result(dir / "x/billm.h5", failed);
}

std::string golden(const std::string& name) {
  std::ifstream in(std::string(PTQLAB_TEST_DATA) + "/report/" + name);
  return std::string((std::istreambuf_iterator<char>(in)), {});
}

class ReportGolden : public ::testing::TestWithParam<std::tuple<std::string, std::string, std::string>> {};

TEST_P(ReportGolden, MatchesGoldenFile) {
  const auto& [format, layout, file] = GetParam();
  test::TempDir dir;
  write_fixture(dir.path());
  ReportOptions o;
  o.format = format;
  o.layout = layout;
  const auto text = make_report({dir.path()}, o);
  if (std::getenv("PTQLAB_UPDATE_GOLDEN") != nullptr) {
    std::ofstream(std::string(PTQLAB_TEST_DATA) + "/report/" + file) << text;
    GTEST_SKIP() << "golden file rewritten";
  }
  EXPECT_EQ(text, golden(file)) << "regenerate with PTQLAB_UPDATE_GOLDEN=1 after checking the new output:\n" << text;
}

INSTANTIATE_TEST_SUITE_P(Formats, ReportGolden,
                         ::testing::Values(std::make_tuple("md", "paper", "paper.md"),
                                           std::make_tuple("latex", "paper", "paper.tex"),
                                           std::make_tuple("csv", "paper", "paper.csv"),
                                           std::make_tuple("md", "ablation", "ablation.md"),
                                           std::make_tuple("csv", "long", "long.csv")),
                         [](const auto& info) { return std::get<0>(info.param) + "_" + std::get<1>(info.param); });

TEST(Report, SeedsBoldMissingAndFailedCells) {
  test::TempDir dir;
  write_fixture(dir.path());
  const auto md = make_report({dir.path()}, ReportOptions{});
  EXPECT_NE(md.find("| gptq-w2 | 2.000 | 2.238–2.241 | 80.00 | 1.23e+06 | 42.00 ± 2.83 | 410.00 ± 14.14 |"), std::string::npos) << md;
  EXPECT_NE(md.find("| fp | 16.000 | 16.000 | **6.50** | **250.00** | **5.29** | **119.37** |"), std::string::npos) << md;
  EXPECT_NE(md.find("| billm | 1.100 | 2.900 | NaN | NaN | – | – |"), std::string::npos) << md;
  EXPECT_NE(md.find("| rtn-w2 | 2.000 | 2.238 | – | – | 573.59 | – |"), std::string::npos) << md;
  EXPECT_NE(md.find("mean ± sample standard deviation"), std::string::npos);
}

TEST(Report, Errors) {
  test::TempDir dir;
  EXPECT_THROW(make_report({dir.path() / "missing"}, ReportOptions{}), Error);
  EXPECT_THROW(make_report({dir.path()}, ReportOptions{}), Error);  // no result files
  write_fixture(dir.path());
  ReportOptions bad;
  bad.format = "html";
  EXPECT_THROW(make_report({dir.path()}, bad), Error);
  // A corrupt file among the results is named, not skipped.
  std::ofstream(dir.path() / "s" / "broken.h5") << "not hdf5";
  try {
    make_report({dir.path()}, ReportOptions{});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("broken.h5"), std::string::npos) << e.what();
  }
}

TEST(ReportCli, WritesTheFileAndExitCodes) {
  test::TempDir dir;
  write_fixture(dir.path());
  const auto out = dir.path() / "table.tex";
  const auto r = test::run_ptqlab("report " + (dir.path() / "s").string() + " " + (dir.path() / "x").string() +
                                  " --format latex --out " + out.string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::ifstream in(out);
  const std::string tex((std::istreambuf_iterator<char>(in)), {});
  EXPECT_NE(tex.find("\\toprule"), std::string::npos);
  EXPECT_NE(tex.find("42.00 $\\pm$ 2.83"), std::string::npos) << tex;
  const auto bad = test::run_ptqlab("report " + dir.path().string() + " --layout wide");
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.output.find("--layout 'wide'"), std::string::npos);
}

}  // namespace
}  // namespace ptqlab
