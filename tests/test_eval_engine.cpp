// The zeroshot and kl-divergence evaluators in real experiments on stories260K: per-item values
// and protocol ids in the result files, the FP reference computed once, KLD ranking of the
// quickstart arms equal to their perplexity ranking, report columns, lm-eval JSON, and refusals
// before any compute.
#include <gtest/gtest.h>

#include <fstream>

#include <nlohmann/json.hpp>

#include "ptqlab/engine/experiment.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/engine/runner.hpp"
#include "ptqlab/outputs/report.hpp"
#include "ptqlab/support/error.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

std::string zeroshot_dir() { return test::data_file("zeroshot").string(); }

std::string experiment(const std::string& eval_extra = "") {
  test::SmallExperiment e;
  e.name = "eval-test";
  e.arms =
      "  - name: fp\n"
      "    quantizer: fp\n"
      "  - name: rtn\n"
      "    quantizer: {name: rtn, params: {group_size: -1}}\n"
      "    sweep:\n"
      "      grid:\n"
      "        quantizer.bits: [4, 3, 2]\n";
  std::string y = e.yaml();
  const std::string evals =
      "  - evaluator: kl-divergence\n"
      "    params: {seq_len: 256, max_windows: 3}\n"
      "    datasets:\n"
      "      tinystories: " + e.valid + "\n"
      "  - evaluator: zeroshot\n"
      "    params: {limit: 5, bootstrap_iters: 100}\n"
      "    datasets:\n"
      "      piqa: " + zeroshot_dir() + "/piqa/valid.jsonl\n"
      "      arc_easy: " + zeroshot_dir() + "/arc_easy/arc_easy.jsonl\n"
      "      lambada_openai: " + zeroshot_dir() + "/lambada_openai/lambada_openai.jsonl\n" + eval_extra;
  y.insert(y.find("arms:\n"), evals);
  return y;
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
  RunReport run() {
    RunOptions o;
    o.out_dir = dir.path() / "out";
    o.cache_dir = dir.path() / "cache";
    o.jobs = 2;
    return run_experiment(load_experiment(yaml, registry), registry, o);
  }
};

const ArmResult& arm(const RunReport& r, const std::string& name) {
  for (const auto& a : r.arms)
    if (a.arm == name) return a.result;
  throw std::runtime_error("no arm " + name);
}

TEST(EvalEngine, ZeroShotAndKldInAnExperiment) {
  Workspace w(experiment());
  const auto report = w.run();
  ASSERT_EQ(report.arms.size(), 4u);
  for (const auto& a : report.arms) ASSERT_EQ(a.status, ArmOutcome::Status::completed) << a.message;

  const auto& fp = arm(report, "fp");
  EXPECT_EQ(fp.metrics.at("kl-divergence").at("tinystories").at("kld_mean"), 0.0);
  EXPECT_EQ(fp.metrics.at("kl-divergence").at("tinystories").at("same_top"), 1.0);
  EXPECT_EQ(fp.protocols.at("zeroshot").at("piqa"), "lmeval-0.4.10/piqa@orig");
  EXPECT_EQ(fp.protocols.at("perplexity").at("tinystories"), "ptqlab-ppl-v1/seq256");
  EXPECT_EQ(fp.metrics.at("zeroshot").at("piqa").at("docs"), 5.0);
  EXPECT_EQ(fp.metrics.at("zeroshot").at("lambada_openai").count("ppl"), 1u);
  bool found = false;
  for (const auto& s : fp.series)
    if (s.path == "eval/zeroshot/piqa/request_ll") {
      found = true;
      EXPECT_EQ(s.values.size(), 10u);  // 5 docs x 2 choices
    }
  EXPECT_TRUE(found);
  // The perplexity evaluator's new `protocol` parameter, at its default, is not in the config
  // (results made before it keep their resume key).
  EXPECT_EQ(fp.config_yaml.find("protocol"), std::string::npos);

  // KLD of the quickstart arms ranks them as perplexity does.
  std::vector<std::pair<double, double>> kld_ppl;
  for (const char* name : {"fp", "rtn-bits4", "rtn-bits3", "rtn-bits2"}) {
    const auto& m = arm(report, name).metrics;
    kld_ppl.emplace_back(m.at("kl-divergence").at("tinystories").at("kld_mean"),
                         m.at("perplexity").at("tinystories").at("ppl"));
  }
  for (std::size_t i = 0; i + 1 < kld_ppl.size(); ++i) {
    EXPECT_LT(kld_ppl[i].first, kld_ppl[i + 1].first) << i;
    EXPECT_LT(kld_ppl[i].second, kld_ppl[i + 1].second) << i;
  }
  // The FP reference was computed once for the whole experiment.
  int references = 0;
  for (const auto& f : std::filesystem::directory_iterator(w.dir.path() / "cache"))
    references += f.path().filename().string().rfind("kld-reference-", 0) == 0;
  EXPECT_EQ(references, 1);

  ReportOptions ro;
  const std::string table = make_report({w.dir.path() / "out"}, ro);
  EXPECT_NE(table.find("stories260K piqa acc"), std::string::npos) << table;
  EXPECT_NE(table.find("stories260K zero-shot avg"), std::string::npos);
  EXPECT_NE(table.find("stories260K tinystories KLD"), std::string::npos);
  EXPECT_NE(table.find("chance level: stories260K arc_easy 25.02; stories260K piqa 50.00."),
            std::string::npos)
      << table;
  EXPECT_NE(table.find("| chance | – | – | – | 50.00 | 25.02 | – | – | – |"), std::string::npos);
  // Column order: perplexity, zero-shot tasks in the papers' order, their average, KLD.
  EXPECT_LT(table.find("| stories260K tinystories |"), table.find("piqa acc"));
  EXPECT_LT(table.find("piqa acc"), table.find("arc_easy acc"));
  EXPECT_LT(table.find("lambada_openai acc"), table.find("zero-shot avg"));
  EXPECT_LT(table.find("zero-shot avg"), table.find("KLD"));

  const auto j = nlohmann::json::parse(lmeval_results_json(w.dir.path() / "out" / "fp.h5"));
  EXPECT_EQ(j["results"]["piqa"]["acc,none"].get<double>(), fp.metrics.at("zeroshot").at("piqa").at("acc"));
  EXPECT_EQ(j["results"]["lambada_openai"]["perplexity,none"].get<double>(),
            fp.metrics.at("zeroshot").at("lambada_openai").at("ppl"));
  EXPECT_EQ(j["n-shot"]["piqa"].get<int>(), 0);
  EXPECT_EQ(j["n-samples"]["piqa"]["effective"].get<double>(), 5.0);
  EXPECT_EQ(j["n-samples"]["piqa"]["original"].get<double>(), 1838.0);
  EXPECT_EQ(j["configs"]["piqa"]["ptqlab_protocol"], "lmeval-0.4.10/piqa@orig");
  EXPECT_TRUE(j["higher_is_better"]["lambada_openai"]["acc"].get<bool>());
}

std::string run_error(const std::string& yaml, const std::filesystem::path& dir) {
  Workspace w(yaml);
  try {
    w.run();
  } catch (const Error& e) {
    EXPECT_FALSE(std::filesystem::exists(w.dir.path() / "out"));    // nothing was computed
    EXPECT_FALSE(std::filesystem::exists(w.dir.path() / "cache"));
    (void)dir;
    return std::string(e.what()).substr(w.yaml.string().size());
  }
  return "no error";
}

TEST(EvalEngine, ModelDependentParametersAndBadTaskDataAreRefusedBeforeCompute) {
  test::TempDir d;
  std::string y = experiment();
  y.replace(y.find("{seq_len: 256, max_windows: 3}"), 30, "{seq_len: 1024, max_windows: 3}");
  EXPECT_EQ(run_error(y, d.path()),
            ":11:7: eval[0] perplexity dataset 'tinystories': seq_len 1024 exceeds the model's "
            "max_position_embeddings 512");

  const auto bad = d.path() / "arc.jsonl";
  std::ofstream(bad) << "{\"query\": \"Question: q\", \"choices\": [\"a\", \"b\"], \"gold\": 0}\n{oops\n";
  EXPECT_EQ(run_error(experiment("      arc_challenge: " + bad.string() + "\n"), d.path()),
            ":22:7: eval[2] zeroshot dataset 'arc_challenge': " + bad.string() +
                ":2: not a JSON object (expected one object per line)");
  EXPECT_EQ(run_error(experiment("      squad: " + bad.string() + "\n"), d.path()).substr(0, 40),
            ":22:7: eval[2] zeroshot dataset 'squad':");
}

}  // namespace
}  // namespace ptqlab
