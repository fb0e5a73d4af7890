// Fuzz target: a YAML experiment file through experiment_plugin_paths and load_experiment (parse,
// validation, base merging, sweep expansion, the resolved YAML and its hash).
//
// load_experiment reads a file and resolves the paths in it against the file's directory, so the
// input is written to x.yaml in a scratch directory that also holds what a valid experiment names:
// model/config.json (stories260K's), calib.txt, valid.txt, wiki.raw and an empty plugins/ dir
// (scripts/fuzz rewrites the shipped experiments' paths to these names for the seed corpus).
// Component schemas are a fixed copy (a SchemaList) of the real plugins' main parameters, so that the target
// needs no plugin libraries.
#include <unistd.h>

#include <cctype>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>

#include <yaml-cpp/yaml.h>

#include "fuzz_target.hpp"
#include "ptqlab/engine/experiment.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/sha256.hpp"

namespace {

namespace fs = std::filesystem;
using namespace ptqlab;

ParamSpec param(std::string name, ParamType type, ParamValue def, std::optional<double> lo = std::nullopt,
                std::optional<double> hi = std::nullopt, std::vector<std::string> choices = {}) {
  ParamSpec p;
  p.name = std::move(name);
  p.type = type;
  p.default_value = std::move(def);
  p.min = lo;
  p.max = hi;
  p.choices = std::move(choices);
  return p;
}

// The real plugins' main parameters.
SchemaList make_schemas() {
  SchemaList s;
  using T = ParamType;
  const auto I = [](std::int64_t v) { return ParamValue(v); };
  s.add(ComponentKind::quantizer, "fp", {});
  s.add(ComponentKind::quantizer, "rtn",
      {param("bits", T::integer, I(4), 1, 16), param("group_size", T::integer, I(-1), -1, 1048576),
       param("symmetric", T::boolean, false)});
  s.add(ComponentKind::quantizer, "gptq",
      {param("bits", T::integer, I(4), 1, 16), param("group_size", T::integer, I(-1), -1, 1048576),
       param("act_order", T::boolean, false), param("percdamp", T::real, 0.01, 0, 10)});
  s.add(ComponentKind::quantizer, "pbllm",
      {param("low_frac", T::real, 0.9, 0, 1), param("high_bits", T::integer, I(8), 2, 16),
       param("salient_metric", T::string, std::string("hessian"), std::nullopt, std::nullopt, {"hessian", "magnitude"})});
  s.add(ComponentKind::quantizer, "billm",
      {param("mode", T::string, std::string("faithful"), std::nullopt, std::nullopt, {"faithful", "paper"}),
       param("block_size", T::integer, I(128), 1, 1048576), param("split_min", T::real, 0.1, 0, 1)});
  s.add(ComponentKind::quantizer, "ptq161",
      {param("use_mask", T::boolean, true), param("ratio", T::real, 0.2, 0, 1), param("learn_scales", T::boolean, true),
       param("epochs", T::integer, I(20), 0, 10000), param("lr_s", T::real, 5e-4, 0, 1), param("nlc", T::boolean, true)});
  s.add(ComponentKind::quantizer, "sign", {param("center", T::boolean, false)});
  s.add(ComponentKind::mask, "magnitude", {param("ratio", T::real, 0.1, 0, 1)});
  s.add(ComponentKind::mask, "activation-channels",
      {param("ratio", T::real, 0.2, 0, 1),
       param("statistic", T::string, std::string("max"), std::nullopt, std::nullopt, {"max", "mean"})});
  s.add(ComponentKind::preprocessor, "lora",
      {param("rank", T::integer, I(8), 1, 4096), param("alpha", T::real, 16.0, 0, std::nullopt),
       param("tag", T::string, std::string(""))});
  s.add(ComponentKind::evaluator, "perplexity",
      {param("seq_len", T::integer, I(0), 0, 1048576), param("max_windows", T::integer, I(0), 0, std::nullopt)});
  return s;
}

constexpr const char* kConfig = R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
 "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 5, "num_attention_heads": 8,
 "num_key_value_heads": 4, "vocab_size": 512, "max_position_embeddings": 512, "rms_norm_eps": 1e-05,
 "hidden_act": "silu", "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2})";

// The scratch directory, made once per process and removed at exit.
const fs::path& scratch() {
  static const fs::path dir = [] {
    const fs::path d = fs::temp_directory_path() / ("ptqlab-fuzz-experiment-" + std::to_string(::getpid()));
    fs::create_directories(d / "model");
    fs::create_directories(d / "plugins");
    std::ofstream(d / "model" / "config.json") << kConfig;
    for (const char* f : {"calib.txt", "valid.txt", "wiki.raw"}) std::ofstream(d / f) << "Once upon a time.\n";
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(fs::temp_directory_path() / ("ptqlab-fuzz-experiment-" + std::to_string(::getpid())), ec);
    });
    return d;
  }();
  return dir;
}

bool valid_arm_name(const std::string& s) {
  if (s.empty() || s.size() > 100 || !std::isalnum(static_cast<unsigned char>(s[0]))) return false;
  for (char c : s)
    if (!std::isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') return false;
  return true;
}

}  // namespace

PTQLAB_FUZZ_TARGET(experiment) {
  static const SchemaList schemas = make_schemas();
  const fs::path file = scratch() / "x.yaml";
  {
    std::ofstream out(file, std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  }
  try {
    experiment_plugin_paths(file);
  } catch (const Error&) {
  }
  Experiment x;
  try {
    x = load_experiment(file, schemas);
  } catch (const Error&) {
    return 0;
  }
  // What the engine relies on in an accepted experiment.
  PTQLAB_FUZZ_CHECK(!x.arms.empty());
  PTQLAB_FUZZ_CHECK(x.calibration.seq_len >= 2 && x.calibration.nsamples >= 1);
  std::set<std::string> names;
  for (const auto& arm : x.arms) {
    PTQLAB_FUZZ_CHECK(valid_arm_name(arm.name));
    PTQLAB_FUZZ_CHECK(names.insert(arm.name).second);
    PTQLAB_FUZZ_CHECK(arm.config_hash == sha256_hex(arm.resolved_yaml));
    // The resolved configuration is stored in every result file and must read back.
    YAML::Node resolved;
    try {
      resolved = YAML::Load(arm.resolved_yaml);
    } catch (const YAML::Exception&) {
      ::ptqlab::fuzz::broken("resolved_yaml is not valid YAML");
    }
    PTQLAB_FUZZ_CHECK(resolved.IsMap() && resolved["arm"]["name"].as<std::string>() == arm.name);
  }
  return 0;
}
