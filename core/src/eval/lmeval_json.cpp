// `ptqlab report --format lm-eval-json`: one arm's zero-shot metrics in lm-evaluation-harness's
// results layout (research/evaluation.md §1.7), so lm-eval tooling can read them.
#include <cmath>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <yaml-cpp/yaml.h>

#include "ptqlab/eval/zeroshot.hpp"
#include "ptqlab/outputs/report.hpp"
#include "ptqlab/outputs/results.hpp"
#include "ptqlab/support/error.hpp"

namespace ptqlab {

namespace {

nlohmann::json number_or_na(double v) {
  if (std::isfinite(v)) return v;
  return "N/A";  // lm-eval's value for a stderr it cannot compute
}

}  // namespace

std::string lmeval_results_json(const std::filesystem::path& file) {
  const ArmResult r = read_arm_result(file);
  using nlohmann::json;
  json out;
  out["results"] = json::object();
  out["group_subtasks"] = json::object();
  out["configs"] = json::object();
  out["versions"] = json::object();
  out["n-shot"] = json::object();
  out["higher_is_better"] = json::object();
  out["n-samples"] = json::object();
  std::string preset;
  double limit = 0;
  auto it = r.metrics.find("zeroshot");
  if (it == r.metrics.end())
    throw Error(fmt::format("{}: no zeroshot metrics (the lm-eval-json format holds zero-shot results)", file.string()));
  try {
    const YAML::Node cfg = YAML::Load(r.config_yaml);
    for (const auto& ev : cfg["eval"])
      if (ev["evaluator"].as<std::string>() == "zeroshot") {
        preset = ev["params"]["preset"].as<std::string>();
        limit = ev["params"]["limit"].as<double>();
      }
  } catch (const YAML::Exception&) {
  }
  for (const auto& [dataset, m] : it->second) {
    const std::string task = zeroshot_task_of(dataset).empty() ? dataset : zeroshot_task_of(dataset);
    json res = {{"alias", dataset}};
    json hib = json::object();
    auto put = [&](const std::string& ours, const std::string& theirs, bool higher) {
      auto v = m.find(ours);
      if (v == m.end()) return;
      res[theirs + ",none"] = v->second;
      res[theirs + "_stderr,none"] = number_or_na(m.count(ours + "_stderr") ? m.at(ours + "_stderr") : NAN);
      hib[theirs] = higher;
    };
    if (task == "lambada_openai") put("ppl", "perplexity", false);
    put("acc", "acc", true);
    put("acc_norm", "acc_norm", true);
    out["results"][dataset] = res;
    out["group_subtasks"][dataset] = json::array();
    out["higher_is_better"][dataset] = hib;
    const double version = m.count("version") ? m.at("version") : 1.0;
    out["versions"][dataset] = version;
    out["n-shot"][dataset] = 0;
    out["n-samples"][dataset] = {{"original", m.count("docs_total") ? m.at("docs_total") : NAN},
                                 {"effective", m.count("docs") ? m.at("docs") : NAN}};
    json config = {{"task", task}, {"target_delimiter", " "}, {"fewshot_delimiter", "\n\n"}, {"num_fewshot", 0},
                   {"metadata", {{"version", version}}}};
    if (auto p = r.protocols.find("zeroshot"); p != r.protocols.end() && p->second.count(dataset))
      config["ptqlab_protocol"] = p->second.at(dataset);
    out["configs"][dataset] = config;
  }
  std::string model;
  try {
    model = YAML::Load(r.config_yaml)["model"].as<std::string>();
  } catch (const YAML::Exception&) {
  }
  out["config"] = {{"model", "ptqlab"},
                   {"model_args", fmt::format("pretrained={},arm={}", model, r.arm)},
                   {"batch_size", "auto"},
                   {"bootstrap_iters", 100000},
                   {"limit", limit > 0 ? json(limit) : json(nullptr)},
                   {"random_seed", 0}};
  out["git_hash"] = r.provenance.git_revision;
  out["date"] = r.provenance.end_time;
  out["lm_eval_version"] = preset.empty() ? "ptqlab" : "ptqlab (" + preset + " rules)";
  out["ptqlab"] = {{"arm", r.arm},           {"experiment", r.experiment}, {"config_hash", r.config_hash},
                   {"ptqlab_version", r.provenance.ptqlab_version}, {"preset", preset}};
  return out.dump(2) + "\n";
}

}  // namespace ptqlab
