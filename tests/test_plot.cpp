// ptqlab plot: the Pareto front against a brute-force oracle, and real gnuplot output (PNG, SVG,
// PDF, data file, script) from the report tests' fixed result files.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <set>

#include "ptqlab/outputs/plot.hpp"
#include "ptqlab/support/error.hpp"
#include "report_fixture.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

// The definition, checked pair by pair: on the front iff finite and no finite other point is <=
// in both coordinates and < in one.
std::set<std::size_t> brute_force_front(const std::vector<PlotPoint>& p) {
  std::set<std::size_t> front;
  auto finite = [&](std::size_t i) { return std::isfinite(p[i].bits) && std::isfinite(p[i].value); };
  for (std::size_t i = 0; i < p.size(); ++i) {
    if (!finite(i)) continue;
    bool dominated = false;
    for (std::size_t j = 0; j < p.size() && !dominated; ++j)
      dominated = j != i && finite(j) && p[j].bits <= p[i].bits && p[j].value <= p[i].value &&
                  (p[j].bits < p[i].bits || p[j].value < p[i].value);
    if (!dominated) front.insert(i);
  }
  return front;
}

TEST(ParetoFront, MatchesBruteForceOnRandomPoints) {
  std::mt19937 rng(1234);
  for (int trial = 0; trial < 2000; ++trial) {
    const int n = std::uniform_int_distribution<int>(0, 30)(rng);
    // Few distinct coordinates so ties and exact duplicates are common; some NaN and inf.
    std::uniform_int_distribution<int> coord(0, trial % 2 == 0 ? 6 : 1000);
    std::vector<PlotPoint> pts(static_cast<std::size_t>(n));
    for (auto& q : pts) {
      q.bits = 1.0 + 0.25 * coord(rng);
      q.value = 3.0 + coord(rng);
      const int odd = std::uniform_int_distribution<int>(0, 19)(rng);
      if (odd == 0) q.value = std::nan("");
      if (odd == 1) q.value = INFINITY;
      if (odd == 2) q.bits = std::nan("");
    }
    const auto front = pareto_front(pts);
    EXPECT_EQ(std::set<std::size_t>(front.begin(), front.end()), brute_force_front(pts)) << "trial " << trial;
    EXPECT_EQ(std::set<std::size_t>(front.begin(), front.end()).size(), front.size());
    for (std::size_t i = 1; i < front.size(); ++i) {
      EXPECT_LE(pts[front[i - 1]].bits, pts[front[i]].bits);
      EXPECT_GE(pts[front[i - 1]].value, pts[front[i]].value);
    }
  }
}

TEST(ParetoFront, KnownExample) {
  // fp (16, 5.3), w3 (3.25, 9.5), w2 (2.24, 42), rtn2 (2.24, 573), billm NaN, worse at 4 bits.
  const std::vector<PlotPoint> p = {{16, 5.3}, {2.24, 573}, {3.25, 9.5}, {2.24, 42}, {1.1, std::nan("")}, {4.0, 10.0}};
  EXPECT_EQ(pareto_front(p), (std::vector<std::size_t>{3, 2, 0}));
  EXPECT_TRUE(pareto_front({}).empty());
}

bool have_gnuplot() { return std::system("gnuplot --version >/dev/null 2>&1") == 0; }

// A small XML well-formedness check (balanced, properly nested elements; quoted attributes;
// comments, processing instructions, DOCTYPE and CDATA skipped). Returns "" when fine, else the
// problem; `text` collects the character data.
std::string check_xml(const std::string& s, std::string& text) {
  std::vector<std::string> stack;
  std::size_t i = 0;
  bool root_seen = false;
  while (i < s.size()) {
    if (s[i] != '<') {
      const auto next = s.find('<', i);
      text += s.substr(i, next - i) + " ";
      i = next == std::string::npos ? s.size() : next;
      continue;
    }
    auto skip = [&](const char* open, const char* close) {
      if (s.compare(i, std::strlen(open), open) != 0) return false;
      const auto end = s.find(close, i);
      i = end == std::string::npos ? std::string::npos : end + std::strlen(close);
      return true;
    };
    if (skip("<!--", "-->") || skip("<?", "?>") || skip("<![CDATA[", "]]>") || skip("<!DOCTYPE", ">")) {
      if (i == std::string::npos) return "unterminated markup";
      continue;
    }
    const bool closing = s[i + 1] == '/';
    std::size_t j = i + (closing ? 2 : 1);
    const std::size_t name_start = j;
    while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == ':' || s[j] == '-' || s[j] == '_'))
      ++j;
    const std::string name = s.substr(name_start, j - name_start);
    if (name.empty()) return "empty tag name at byte " + std::to_string(i);
    char quote = 0;
    while (j < s.size() && (quote != 0 || s[j] != '>')) {
      if (quote == 0 && (s[j] == '"' || s[j] == '\'')) quote = s[j];
      else if (quote != 0 && s[j] == quote) quote = 0;
      ++j;
    }
    if (j >= s.size()) return "unterminated tag <" + name;
    const bool self_closing = s[j - 1] == '/';
    if (closing) {
      if (stack.empty() || stack.back() != name) return "mismatched </" + name + ">";
      stack.pop_back();
    } else if (!self_closing) {
      if (stack.empty() && root_seen) return "a second root element <" + name + ">";
      stack.push_back(name);
      root_seen = true;
    }
    i = j + 1;
  }
  if (!stack.empty()) return "unclosed <" + stack.back() + ">";
  return root_seen ? "" : "no root element";
}

TEST(PlotXmlCheck, RejectsBrokenXml) {
  std::string t;
  EXPECT_EQ(check_xml("<?xml version=\"1.0\"?><svg a=\"x>y\"><g><text>fp</text></g><path/></svg>", t), "");
  EXPECT_NE(t.find("fp"), std::string::npos);
  EXPECT_NE(check_xml("<svg><g></svg>", t), "");
  EXPECT_NE(check_xml("<svg><text>a</svg>", t), "");
  EXPECT_NE(check_xml("<svg>", t), "");
}

TEST(Plot, WritesValidPngSvgPdfDataAndScript) {
  if (!have_gnuplot()) GTEST_SKIP() << "gnuplot is not installed (scripts/setup installs gnuplot-nox): plot output not checked";
  test::TempDir dir;
  test::write_fixture(dir.path() / "results");
  PlotOptions o;
  o.out = dir.path() / "plots";
  o.formats = {"png", "svg", "pdf"};
  const auto plots = make_plots({dir.path() / "results"}, o);
  std::vector<std::string> stems;
  for (const auto& p : plots) stems.push_back(p.stem);
  EXPECT_EQ(stems, (std::vector<std::string>{"llama2xs-279K-tinystories", "llama2xs-279K-wikitext2",
                                             "stories260K-tinystories", "stories260K-wikitext2"}));
  for (const auto& p : plots) {
    ASSERT_EQ(p.files.size(), 5u) << p.stem;  // .dat .gp .png .svg .pdf
    const auto png = test::read_file(o.out / (p.stem + ".png"));
    EXPECT_EQ(png.substr(0, 8), std::string("\x89PNG\r\n\x1a\n", 8)) << p.stem;
    EXPECT_GT(png.size(), 5000u) << p.stem;
    EXPECT_EQ(test::read_file(o.out / (p.stem + ".pdf")).substr(0, 5), "%PDF-") << p.stem;
    std::string text;
    EXPECT_EQ(check_xml(test::read_file(o.out / (p.stem + ".svg")), text), "") << p.stem;
    EXPECT_NE(text.find("gptq-w2"), std::string::npos) << p.stem;
    EXPECT_NE(text.find("fp"), std::string::npos) << p.stem;
    EXPECT_NE(text.find("Pareto front"), std::string::npos) << p.stem;
    EXPECT_NE(test::read_file(o.out / (p.stem + ".gp")).find(p.stem + ".dat"), std::string::npos);
  }
  // stories260K tinystories: gptq-w2 (2 seeds) beats rtn-w2 at the same bits; the front is
  // gptq-w2, gptq-w3, fp by bits, and gptq-w2 carries its two runs and their std.
  const auto dat = test::read_file(o.out / "stories260K-tinystories.dat");
  EXPECT_NE(dat.find("2.238\t42\t"), std::string::npos) << dat;
  EXPECT_NE(dat.find("\t2.8284271247461903\t2\tgptq-w2\t"), std::string::npos) << dat;
  const auto front = dat.substr(dat.find("# block 1"));
  EXPECT_NE(front.find("2.238\t42\tgptq-w2\n3.2519999999999998\t9.5\tgptq-w3\n16\t5.2872000000000003\tfp\n"),
            std::string::npos)
      << front;
  EXPECT_EQ(front.find("rtn-w2"), std::string::npos);
  // The failed billm run is listed in a note, in the data file and on the plot.
  EXPECT_EQ(plots[0].notes, (std::vector<std::string>{"billm (NaN, failed)"}));
  EXPECT_NE(test::read_file(o.out / "llama2xs-279K-tinystories.dat").find("# not plotted (non-finite): billm (NaN, failed)"),
            std::string::npos);
  std::string text;
  check_xml(test::read_file(o.out / "llama2xs-279K-tinystories.svg"), text);
  EXPECT_NE(text.find("billm (NaN, failed)"), std::string::npos);
  // rtn-w2 has no wikitext2 value (not evaluated there): no point, no note.
  EXPECT_EQ(test::read_file(o.out / "stories260K-wikitext2.dat").find("rtn-w2"), std::string::npos);

  // The paper convention on the x axis.
  o.formats = {"svg"};
  o.x = "paper";
  make_plots({dir.path() / "results"}, o);
  const auto paper = test::read_file(o.out / "stories260K-tinystories.dat");
  EXPECT_NE(paper.find("bits per weight (paper convention, log scale)"), std::string::npos);
  EXPECT_NE(paper.find("\n2\t42\t"), std::string::npos) << paper;
}

TEST(PlotCli, MissingGnuplotAndBadOptionsExitTwoAndWriteNothing) {
  test::TempDir dir;
  test::write_fixture(dir.path() / "results");
  const std::string results = (dir.path() / "results").string();
  // A gnuplot that is not there: exit 2, a message naming the Debian package, nothing written.
  const std::string cmd = "PTQLAB_GNUPLOT=" + (dir.path() / "no-such-gnuplot").string() + " " +
                          std::string(PTQLAB_BINARY) + " plot " + results + " --out " + (dir.path() / "p1").string();
  const auto [exit_code, output] = test::run_shell(cmd);
  EXPECT_EQ(exit_code, 2) << output;
  EXPECT_NE(output.find("gnuplot not found"), std::string::npos) << output;
  EXPECT_NE(output.find("gnuplot-nox"), std::string::npos) << output;
  EXPECT_FALSE(std::filesystem::exists(dir.path() / "p1"));

  const auto out = dir.path() / "p2";
  const auto r = test::run_ptqlab("plot " + results + " --out " + out.string());
  if (!have_gnuplot()) {
    EXPECT_EQ(r.exit_code, 2) << r.output;
    GTEST_SKIP() << "gnuplot is not installed (scripts/setup installs gnuplot-nox); checked that ptqlab plot says so: "
                 << r.output;
  }
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("not plotted: billm (NaN, failed)"), std::string::npos) << r.output;
  EXPECT_TRUE(std::filesystem::exists(out / "stories260K-tinystories.png"));

  const auto bad = test::run_ptqlab("plot " + results + " --format gif --out " + (dir.path() / "p3").string());
  EXPECT_EQ(bad.exit_code, 2) << bad.output;
  EXPECT_NE(bad.output.find("--format 'gif'"), std::string::npos) << bad.output;
  EXPECT_EQ(test::run_ptqlab("plot " + results + " --x bits --out " + (dir.path() / "p4").string()).exit_code, 2);
  EXPECT_EQ(test::run_ptqlab("plot " + (dir.path() / "missing").string() + " --out " + (dir.path() / "p5").string())
                .exit_code,
            2);
  for (const char* d : {"p3", "p4", "p5"}) EXPECT_FALSE(std::filesystem::exists(dir.path() / d)) << d;
}

}  // namespace
}  // namespace ptqlab
