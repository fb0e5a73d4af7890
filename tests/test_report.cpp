// ptqlab report: golden Markdown, LaTeX and CSV tables from a fixed set of result files, seeds
// aggregated as mean ± std, best values bold, missing cells "–", failed runs shown as NaN.
#include <gtest/gtest.h>

#include <fstream>

#include "ptqlab/outputs/report.hpp"
#include "ptqlab/outputs/results.hpp"
#include "ptqlab/support/error.hpp"
#include "report_fixture.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

using test::write_fixture;

std::string golden(const std::string& name) {
  return test::read_file(std::filesystem::path(PTQLAB_TEST_DATA) / "report" / name);
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
  const std::string tex = test::read_file(out);
  EXPECT_NE(tex.find("\\toprule"), std::string::npos);
  EXPECT_NE(tex.find("42.00 $\\pm$ 2.83"), std::string::npos) << tex;
  const auto bad = test::run_ptqlab("report " + dir.path().string() + " --layout wide");
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.output.find("--layout 'wide'"), std::string::npos);
}

}  // namespace
}  // namespace ptqlab
