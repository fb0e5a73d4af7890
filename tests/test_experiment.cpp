// YAML experiment files: loading with defaults, base merging, sweep expansion, the canonical
// resolved configuration and its hash, and every validation error with its exact FILE:LINE:COL.
// Component schemas come from a fake SchemaSource modelled on the real plugins, so these tests do
// not depend on plugin libraries.
#include <gtest/gtest.h>

#include <fstream>
#include <limits>
#include <set>

#include <fmt/format.h>

#include "ptqlab/engine/experiment.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/sha256.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// Fake schemas.

ParamSpec int_param(std::string name, std::int64_t def, std::optional<double> lo, std::optional<double> hi) {
  ParamSpec p;
  p.name = std::move(name);
  p.type = ParamType::integer;
  p.default_value = def;
  p.min = lo;
  p.max = hi;
  return p;
}
ParamSpec real_param(std::string name, double def, std::optional<double> lo, std::optional<double> hi) {
  ParamSpec p;
  p.name = std::move(name);
  p.type = ParamType::real;
  p.default_value = def;
  p.min = lo;
  p.max = hi;
  return p;
}
ParamSpec bool_param(std::string name, bool def) {
  ParamSpec p;
  p.name = std::move(name);
  p.type = ParamType::boolean;
  p.default_value = def;
  return p;
}
ParamSpec string_param(std::string name, std::string def, std::vector<std::string> choices = {}) {
  ParamSpec p;
  p.name = std::move(name);
  p.type = ParamType::string;
  p.default_value = std::move(def);
  p.choices = std::move(choices);
  return p;
}

SchemaList fake_schemas() {
  SchemaList s;
  s.add(ComponentKind::quantizer, "fp", {});
  s.add(ComponentKind::quantizer, "rtn",
        {int_param("bits", 4, 1, 16), int_param("group_size", -1, -1, 65536), bool_param("symmetric", false)});
  s.add(ComponentKind::mask, "magnitude", {real_param("ratio", 0.1, 0, 1)});
  s.add(ComponentKind::evaluator, "perplexity",
        {int_param("seq_len", 0, 0, 1048576), int_param("max_windows", 0, 0, std::nullopt)});
  s.add(ComponentKind::preprocessor, "smooth",
        {real_param("alpha", 0.5, 0, 1), int_param("bits", 8, 2, 16), string_param("mode", "channel", {"channel", "tensor"}),
         string_param("tag", "")});
  return s;
}

// ---------------------------------------------------------------------------------------------
// Fixture: experiment files in a temporary directory. {MODEL}, {CALIB}, {VALID} and {WIKI} in the
// text become absolute paths of the shared model and text files.

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  for (std::size_t pos = s.find(from); pos != std::string::npos; pos = s.find(from, pos + to.size()))
    s.replace(pos, from.size(), to);
}

class Experiments : public ::testing::Test {
 protected:
  test::TempDir tmp;
  SchemaList schemas = fake_schemas();

  static fs::path model() { return test::model_dir("stories260K"); }
  static fs::path calib() { return test::data_file("tinystories/calib.txt"); }
  static fs::path valid() { return test::data_file("tinystories/valid.txt"); }
  static fs::path wiki() { return test::data_file("wikitext-2-raw/wiki.test.raw"); }

  fs::path write(const std::string& name, std::string text) {
    replace_all(text, "{MODEL}", model().string());
    replace_all(text, "{CALIB}", calib().string());
    replace_all(text, "{VALID}", valid().string());
    replace_all(text, "{WIKI}", wiki().string());
    const fs::path p = tmp.path() / name;
    fs::create_directories(p.parent_path());
    std::ofstream(p, std::ios::binary) << text;
    return p;
  }
  Experiment load(const std::string& text, const std::string& name = "x.yaml") {
    return load_experiment(write(name, text), schemas);
  }

  // The error message of loading `text`, checked to be one line starting with FILE:LINE:COL.
  void expect_error(const std::string& text, int line, int col, const std::string& phrase) {
    const fs::path p = write("bad.yaml", text);
    const std::string prefix = fmt::format("{}:{}:{}: ", p.string(), line, col);
    try {
      load_experiment(p, schemas);
      ADD_FAILURE() << "no error; expected " << prefix << "..." << phrase;
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_EQ(msg.substr(0, prefix.size()), prefix) << msg;
      EXPECT_NE(msg.find(phrase), std::string::npos) << "message: " << msg << "\nexpected phrase: " << phrase;
      EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
  }
};

const Params& quant_params(const Experiment& x, std::size_t arm) { return x.arms.at(arm).quantizer.params; }

// ---------------------------------------------------------------------------------------------
// Valid experiments.

TEST_F(Experiments, FullExperimentLoads) {
  fs::create_directories(tmp.path() / "exp" / "plugins");
  std::ofstream(tmp.path() / "calib.txt") << "Once upon a time.\n";
  const std::string model_rel = fs::relative(model(), tmp.path() / "exp").string();
  const auto x = load(R"(# A complete experiment.
name: demo
model: )" + model_rel + R"(
seed: 7
log_tensors: true
plugin_paths: [plugins/]
calibration:
  text: ../calib.txt
  nsamples: 16
  seq_len: 256
eval:
  - evaluator: perplexity
    params: {seq_len: 512}
    datasets:
      tinystories: {VALID}
      wikitext2: {WIKI}
base:
  quantizer: {name: rtn, params: {group_size: 128}}
  mask: {name: magnitude, params: {ratio: 0.2}}
arms:
  - name: fp
    quantizer: fp
    inherit_base: false
  - name: fp-masked
    quantizer: fp
  - name: rtn4
    quantizer: {params: {bits: 4}}
  - name: rtn3-sym
    quantizer: {name: rtn, params: {bits: 3, symmetric: true}}
    mask: null
  - name: smooth
    preprocess: [smooth, {name: smooth, params: {alpha: 1, mode: tensor}}]
    quantizer: {name: rtn}
    mask: {params: {ratio: 1}}
)",
                      "exp/demo.yaml");

  EXPECT_EQ(x.file, tmp.path() / "exp" / "demo.yaml");
  EXPECT_TRUE(x.file.is_absolute());
  EXPECT_EQ(x.name, "demo");
  EXPECT_TRUE(x.model_dir.is_absolute());
  EXPECT_EQ(x.model_dir, x.model_dir.lexically_normal());
  EXPECT_TRUE(fs::equivalent(x.model_dir, model()));
  EXPECT_EQ(x.seed, 7u);
  EXPECT_TRUE(x.log_tensors);
  ASSERT_EQ(x.plugin_paths.size(), 1u);
  EXPECT_EQ(x.plugin_paths[0], tmp.path() / "exp" / "plugins");

  EXPECT_EQ(x.calibration.text, tmp.path() / "calib.txt");
  EXPECT_EQ(x.calibration.nsamples, 16);
  EXPECT_EQ(x.calibration.seq_len, 256);
  EXPECT_EQ(x.calibration.seed, 7u);  // defaults to the experiment seed

  ASSERT_EQ(x.evaluators.size(), 1u);
  const auto& ev = x.evaluators[0];
  EXPECT_EQ(ev.evaluator.kind, ComponentKind::evaluator);
  EXPECT_EQ(ev.evaluator.name, "perplexity");
  EXPECT_EQ(ev.evaluator.params.get_int("seq_len"), 512);
  EXPECT_EQ(ev.evaluator.params.get_int("max_windows"), 0);  // default filled in
  ASSERT_EQ(ev.datasets.size(), 2u);
  EXPECT_EQ(ev.datasets[0].name, "tinystories");
  EXPECT_EQ(ev.datasets[0].file, valid());
  EXPECT_EQ(ev.datasets[1].name, "wikitext2");
  EXPECT_EQ(ev.datasets[1].file, wiki());

  ASSERT_EQ(x.arms.size(), 5u);
  // inherit_base: false: nothing from base.
  EXPECT_EQ(x.arms[0].name, "fp");
  EXPECT_EQ(x.arms[0].quantizer.kind, ComponentKind::quantizer);
  EXPECT_EQ(x.arms[0].quantizer.name, "fp");
  EXPECT_TRUE(x.arms[0].quantizer.params.values().empty());
  EXPECT_FALSE(x.arms[0].mask.has_value());
  EXPECT_TRUE(x.arms[0].preprocessors.empty());
  // A different quantizer than base's replaces it (base's rtn params do not apply); the mask is
  // still inherited.
  EXPECT_EQ(x.arms[1].quantizer.name, "fp");
  EXPECT_TRUE(x.arms[1].quantizer.params.values().empty());
  ASSERT_TRUE(x.arms[1].mask.has_value());
  EXPECT_EQ(x.arms[1].mask->name, "magnitude");
  // The quantizer name comes from base, params are merged.
  EXPECT_EQ(x.arms[2].quantizer.name, "rtn");
  EXPECT_EQ(quant_params(x, 2).get_int("bits"), 4);
  EXPECT_EQ(quant_params(x, 2).get_int("group_size"), 128);
  EXPECT_FALSE(quant_params(x, 2).get_bool("symmetric"));
  ASSERT_TRUE(x.arms[2].mask.has_value());
  EXPECT_EQ(x.arms[2].mask->kind, ComponentKind::mask);
  EXPECT_DOUBLE_EQ(x.arms[2].mask->params.get_real("ratio"), 0.2);
  // mask: null drops the inherited mask.
  EXPECT_EQ(quant_params(x, 3).get_int("bits"), 3);
  EXPECT_EQ(quant_params(x, 3).get_int("group_size"), 128);
  EXPECT_TRUE(quant_params(x, 3).get_bool("symmetric"));
  EXPECT_FALSE(x.arms[3].mask.has_value());
  // Preprocess shorthand, defaults, ints for floats; a partial mask merged with base's.
  ASSERT_EQ(x.arms[4].preprocessors.size(), 2u);
  EXPECT_EQ(x.arms[4].preprocessors[0].kind, ComponentKind::preprocessor);
  EXPECT_EQ(x.arms[4].preprocessors[0].name, "smooth");
  EXPECT_DOUBLE_EQ(x.arms[4].preprocessors[0].params.get_real("alpha"), 0.5);
  EXPECT_EQ(x.arms[4].preprocessors[0].params.get_string("mode"), "channel");
  EXPECT_TRUE(std::holds_alternative<double>(x.arms[4].preprocessors[1].params.values().at("alpha")));
  EXPECT_DOUBLE_EQ(x.arms[4].preprocessors[1].params.get_real("alpha"), 1.0);
  EXPECT_EQ(x.arms[4].preprocessors[1].params.get_string("mode"), "tensor");
  EXPECT_EQ(x.arms[4].mask->name, "magnitude");
  EXPECT_DOUBLE_EQ(x.arms[4].mask->params.get_real("ratio"), 1.0);
  EXPECT_EQ(quant_params(x, 4).get_int("bits"), 4);
  EXPECT_EQ(quant_params(x, 4).get_int("group_size"), 128);

  std::set<std::string> hashes;
  for (const auto& arm : x.arms) {
    EXPECT_EQ(arm.config_hash.size(), 64u);
    EXPECT_EQ(arm.config_hash, sha256_hex(arm.resolved_yaml));
    hashes.insert(arm.config_hash);
  }
  EXPECT_EQ(hashes.size(), x.arms.size());
}

TEST_F(Experiments, DefaultsAreFilledIn) {
  const auto x = load(R"(model: {MODEL}
seed: 5
calibration:
  text: {CALIB}
arms:
  - name: rtn
    quantizer: rtn
)",
                      "my-quickstart.yaml");
  EXPECT_EQ(x.name, "my-quickstart");  // the file's stem
  EXPECT_EQ(x.seed, 5u);
  EXPECT_EQ(x.calibration.text, calib());
  EXPECT_EQ(x.calibration.nsamples, 128);
  EXPECT_EQ(x.calibration.seq_len, 512);  // stories260K's max_position_embeddings
  EXPECT_EQ(x.calibration.seed, 5u);
  EXPECT_FALSE(x.log_tensors);
  EXPECT_TRUE(x.plugin_paths.empty());
  EXPECT_TRUE(x.evaluators.empty());
  ASSERT_EQ(x.arms.size(), 1u);
  EXPECT_EQ(quant_params(x, 0).get_int("bits"), 4);
  EXPECT_EQ(quant_params(x, 0).get_int("group_size"), -1);
  EXPECT_FALSE(quant_params(x, 0).get_bool("symmetric"));
  EXPECT_FALSE(x.arms[0].mask.has_value());
}

TEST_F(Experiments, SeqLenZeroAndCalibrationSeed) {
  const auto x = load(R"(model: {MODEL}
calibration: {text: {CALIB}, seq_len: 0, seed: 99, nsamples: 1}
arms: [{name: a, quantizer: fp}]
)");
  EXPECT_EQ(x.calibration.seq_len, 512);
  EXPECT_EQ(x.calibration.seed, 99u);
  EXPECT_EQ(x.calibration.nsamples, 1);
  EXPECT_EQ(x.seed, 0u);
}

TEST_F(Experiments, PluginPathsOnly) {
  fs::create_directories(tmp.path() / "p1");
  fs::create_directories(tmp.path() / "p2");
  // Only plugin_paths is read: the rest may be incomplete.
  const auto p = write("x.yaml", "plugin_paths:\n  - p1\n  - ./p2/\narms: nonsense\n");
  const auto paths = experiment_plugin_paths(p);
  ASSERT_EQ(paths.size(), 2u);
  EXPECT_EQ(paths[0], tmp.path() / "p1");
  EXPECT_EQ(paths[1], tmp.path() / "p2");
  EXPECT_TRUE(experiment_plugin_paths(write("y.yaml", "model: x\n")).empty());
}

TEST_F(Experiments, PluginPathsErrors) {
  const auto p = write("x.yaml", "model: x\nplugin_paths:\n  - missing\n");
  try {
    experiment_plugin_paths(p);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()),
              fmt::format("{}:3:5: plugin path not found: {}", p.string(), (tmp.path() / "missing").string()));
  }
  const auto q = write("y.yaml", "plugin_paths: lib\n");
  try {
    experiment_plugin_paths(q);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), fmt::format("{}:1:15: plugin_paths must be a list of directories, got 'lib'", q.string()));
  }
  const auto r = write("z.yaml", "plugin_paths: [a\n");
  EXPECT_THROW(experiment_plugin_paths(r), Error);
}

// A YAML file shared between labs cannot make ptqlab load libraries from outside its own directory:
// absolute paths, '..' and symbolic links that lead out are refused (--plugin-path is the way).
TEST_F(Experiments, PluginPathsStayInsideTheFilesDirectory) {
  fs::create_directories(tmp.path() / "outside");
  fs::create_directories(tmp.path() / "exp" / "inside");
  fs::create_symlink(tmp.path() / "outside", tmp.path() / "exp" / "link-out");
  fs::create_directory_symlink(tmp.path() / "exp" / "inside", tmp.path() / "exp" / "link-in");
  auto error_of = [&](const std::string& entry) {
    const auto p = write("exp/x.yaml", "plugin_paths:\n  - " + entry + "\n");
    try {
      experiment_plugin_paths(p);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::string file = (tmp.path() / "exp" / "x.yaml").string();
  const std::string rule = "must be a relative directory inside the experiment file's directory, without '..' (give "
                           "other plugin directories with --plugin-path)";
  EXPECT_EQ(error_of((tmp.path() / "outside").string()),
            fmt::format("{}:2:5: plugin path '{}' {}", file, (tmp.path() / "outside").string(), rule));
  EXPECT_EQ(error_of("/usr/lib"), fmt::format("{}:2:5: plugin path '/usr/lib' {}", file, rule));
  EXPECT_EQ(error_of("../outside"), fmt::format("{}:2:5: plugin path '../outside' {}", file, rule));
  EXPECT_EQ(error_of("inside/../../outside"), fmt::format("{}:2:5: plugin path 'inside/../../outside' {}", file, rule));
  EXPECT_EQ(error_of("inside/.."), fmt::format("{}:2:5: plugin path 'inside/..' {}", file, rule));
  EXPECT_EQ(error_of("link-out"),
            fmt::format("{}:2:5: plugin path 'link-out' leads outside the experiment file's directory (to {}) through a "
                        "symbolic link (give other plugin directories with --plugin-path)",
                        file, fs::canonical(tmp.path() / "outside").string()));
  // Inside is fine, through a link too, and "." is the file's own directory.
  for (const char* ok : {"inside", "./inside/", "link-in", "."}) {
    const auto p = write("exp/x.yaml", std::string("plugin_paths: [") + ok + "]\n");
    EXPECT_EQ(experiment_plugin_paths(p).size(), 1u) << ok;
  }
}

TEST_F(Experiments, ScalarTypesAndTags) {
  const auto x = load(R"(model: {MODEL}
calibration: {text: {CALIB}}
arms:
  - name: a
    preprocess:
      - name: smooth
        params: {alpha: 1e-1, bits: +12, tag: !!str 12, mode: "tensor"}
    quantizer: {name: rtn, params: {bits: !!int "3", group_size: -1, symmetric: true}}
    mask: {name: magnitude, params: {ratio: 0}}
)");
  const auto& p = x.arms[0].preprocessors[0].params;
  EXPECT_DOUBLE_EQ(p.get_real("alpha"), 0.1);
  EXPECT_EQ(p.get_int("bits"), 12);
  EXPECT_EQ(p.get_string("tag"), "12");
  EXPECT_EQ(p.get_string("mode"), "tensor");
  EXPECT_EQ(quant_params(x, 0).get_int("bits"), 3);
  EXPECT_EQ(quant_params(x, 0).get_int("group_size"), -1);
  EXPECT_TRUE(quant_params(x, 0).get_bool("symmetric"));
  EXPECT_DOUBLE_EQ(x.arms[0].mask->params.get_real("ratio"), 0.0);
}

TEST_F(Experiments, SweepOverridesExplicitParams) {
  const auto x = load(R"(model: {MODEL}
calibration: {text: {CALIB}}
arms:
  - name: a
    quantizer: {name: rtn, params: {bits: 8, group_size: 32}}
    sweep: {grid: {quantizer.bits: [2]}}
)");
  ASSERT_EQ(x.arms.size(), 1u);
  EXPECT_EQ(x.arms[0].name, "a-bits2");
  EXPECT_EQ(quant_params(x, 0).get_int("bits"), 2);
  EXPECT_EQ(quant_params(x, 0).get_int("group_size"), 32);
}

// ---------------------------------------------------------------------------------------------
// Sweeps.

const char* kSweepHead = R"(model: {MODEL}
calibration: {text: {CALIB}}
arms:
)";

std::vector<std::string> arm_names(const Experiment& x) {
  std::vector<std::string> out;
  for (const auto& a : x.arms) out.push_back(a.name);
  return out;
}

TEST_F(Experiments, SweepGridOneAxis) {
  const auto x = load(std::string(kSweepHead) + R"(  - name: fp
    quantizer: fp
  - name: rtn
    quantizer: {name: rtn, params: {group_size: 64}}
    sweep:
      grid:
        quantizer.bits: [4, 3, 2]
  - name: last
    quantizer: fp
)");
  EXPECT_EQ(arm_names(x), (std::vector<std::string>{"fp", "rtn-bits4", "rtn-bits3", "rtn-bits2", "last"}));
  EXPECT_EQ(quant_params(x, 1).get_int("bits"), 4);
  EXPECT_EQ(quant_params(x, 2).get_int("bits"), 3);
  EXPECT_EQ(quant_params(x, 3).get_int("bits"), 2);
  for (int i = 1; i <= 3; ++i) EXPECT_EQ(quant_params(x, i).get_int("group_size"), 64);
}

TEST_F(Experiments, SweepGridTwoAxesRowMajor) {
  const auto x = load(std::string(kSweepHead) + R"(  - name: rtn
    quantizer: rtn
    sweep:
      grid:
        quantizer.bits: [4, 3]
        quantizer.group_size: [64, 128]
)");
  EXPECT_EQ(arm_names(x), (std::vector<std::string>{"rtn-bits4-group_size64", "rtn-bits4-group_size128",
                                                     "rtn-bits3-group_size64", "rtn-bits3-group_size128"}));
  const std::vector<std::pair<int, int>> expected = {{4, 64}, {4, 128}, {3, 64}, {3, 128}};
  for (std::size_t i = 0; i < expected.size(); ++i) {
    EXPECT_EQ(quant_params(x, i).get_int("bits"), expected[i].first);
    EXPECT_EQ(quant_params(x, i).get_int("group_size"), expected[i].second);
  }
}

TEST_F(Experiments, SweepZipPairs) {
  const auto x = load(std::string(kSweepHead) + R"(  - name: rtn
    quantizer: rtn
    mask: magnitude
    sweep:
      zip:
        mask.ratio: [0.1, 0.2]
        quantizer.group_size: [64, 128]
)");
  EXPECT_EQ(arm_names(x), (std::vector<std::string>{"rtn-ratio0.1-group_size64", "rtn-ratio0.2-group_size128"}));
  EXPECT_DOUBLE_EQ(x.arms[0].mask->params.get_real("ratio"), 0.1);
  EXPECT_EQ(quant_params(x, 0).get_int("group_size"), 64);
  EXPECT_DOUBLE_EQ(x.arms[1].mask->params.get_real("ratio"), 0.2);
  EXPECT_EQ(quant_params(x, 1).get_int("group_size"), 128);
}

TEST_F(Experiments, SweepGridTimesZip) {
  const auto x = load(std::string(kSweepHead) + R"(  - name: rtn
    quantizer: rtn
    mask: magnitude
    sweep:
      zip:
        mask.ratio: [0.1, 0.2]
        quantizer.group_size: [64, 128]
      grid:
        quantizer.bits: [4, 3, 2]
)");
  // Grid axes name first and vary slowest; zip positions vary fastest.
  EXPECT_EQ(arm_names(x),
            (std::vector<std::string>{"rtn-bits4-ratio0.1-group_size64", "rtn-bits4-ratio0.2-group_size128",
                                      "rtn-bits3-ratio0.1-group_size64", "rtn-bits3-ratio0.2-group_size128",
                                      "rtn-bits2-ratio0.1-group_size64", "rtn-bits2-ratio0.2-group_size128"}));
  EXPECT_EQ(quant_params(x, 3).get_int("bits"), 3);
  EXPECT_EQ(quant_params(x, 3).get_int("group_size"), 128);
  EXPECT_DOUBLE_EQ(x.arms[3].mask->params.get_real("ratio"), 0.2);
}

TEST_F(Experiments, SweepSameParamNameUsesComponentPrefix) {
  const auto x = load(std::string(kSweepHead) + R"(  - name: s
    preprocess: [smooth]
    quantizer: rtn
    sweep:
      grid:
        quantizer.bits: [4]
        preprocess.0.bits: [8, 16]
        preprocess.0.alpha: [1, 0.25]
)");
  EXPECT_EQ(arm_names(x), (std::vector<std::string>{
                              "s-quantizer.bits4-preprocess.0.bits8-alpha1", "s-quantizer.bits4-preprocess.0.bits8-alpha0.25",
                              "s-quantizer.bits4-preprocess.0.bits16-alpha1", "s-quantizer.bits4-preprocess.0.bits16-alpha0.25"}));
  EXPECT_EQ(x.arms[2].preprocessors[0].params.get_int("bits"), 16);
  EXPECT_DOUBLE_EQ(x.arms[2].preprocessors[0].params.get_real("alpha"), 1.0);
}

TEST_F(Experiments, SweepNamesAreSanitized) {
  const auto x = load(std::string(kSweepHead) + R"(  - name: s
    preprocess: [smooth]
    quantizer: rtn
    sweep:
      grid:
        preprocess.0.tag: ["a b", "c/../d"]
        quantizer.symmetric: [true, false]
        quantizer.group_size: [-1]
)");
  EXPECT_EQ(arm_names(x)[0], "s-taga_b-symmetrictrue-group_size-1");
  EXPECT_EQ(arm_names(x)[1], "s-taga_b-symmetricfalse-group_size-1");
  EXPECT_EQ(arm_names(x)[2], "s-tagc_.._d-symmetrictrue-group_size-1");
  EXPECT_EQ(x.arms[2].preprocessors[0].params.get_string("tag"), "c/../d");
  EXPECT_EQ(x.arms.size(), 4u);
}

TEST_F(Experiments, SweepWithBaseAndInheritance) {
  const auto x = load(std::string(kSweepHead) + R"(  - name: r
    sweep: {grid: {mask.ratio: [0, 1]}}
base:
  quantizer: {name: rtn, params: {bits: 2}}
  mask: magnitude
)");
  EXPECT_EQ(arm_names(x), (std::vector<std::string>{"r-ratio0", "r-ratio1"}));
  EXPECT_EQ(quant_params(x, 0).get_int("bits"), 2);
  EXPECT_DOUBLE_EQ(x.arms[1].mask->params.get_real("ratio"), 1.0);
}

// ---------------------------------------------------------------------------------------------
// The resolved configuration and its hash.

TEST_F(Experiments, ResolvedYamlIsCanonical) {
  const auto x = load(R"(name: q
model: {MODEL}
calibration: {text: {CALIB}, nsamples: 8}
eval:
  - evaluator: perplexity
    datasets: {wikitext2: {WIKI}, tinystories: {VALID}}
arms:
  - name: rtn
    mask: magnitude
    preprocess: [smooth]
    quantizer: {name: rtn, params: {bits: 3}}
)");
  const std::string expected = fmt::format(R"(experiment: q
model: {}
seed: 0
calibration:
  text: {}
  nsamples: 8
  seq_len: 512
  seed: 0
eval:
  - evaluator: perplexity
    params:
      max_windows: 0
      seq_len: 0
    datasets:
      tinystories: {}
      wikitext2: {}
log_tensors: false
arm:
  name: rtn
  preprocess:
    - name: smooth
      params:
        alpha: 0.5
        bits: 8
        mode: channel
        tag: ""
  mask:
    name: magnitude
    params:
      ratio: 0.1
  quantizer:
    name: rtn
    params:
      bits: 3
      group_size: -1
      symmetric: false
)",
                                           model().string(), calib().string(), valid().string(), wiki().string());
  ASSERT_EQ(x.arms.size(), 1u);
  EXPECT_EQ(x.arms[0].resolved_yaml, expected);
  EXPECT_EQ(x.arms[0].config_hash, sha256_hex(expected));
}

TEST_F(Experiments, ResolvedYamlWithoutMaskAndFloats) {
  const auto x = load(R"(model: {MODEL}
calibration: {text: {CALIB}}
arms:
  - {name: fp, quantizer: fp}
  - {name: m, quantizer: fp, mask: {name: magnitude, params: {ratio: 1}}}
)");
  EXPECT_NE(x.arms[0].resolved_yaml.find("  preprocess: []\n  mask: ~\n  quantizer:\n    name: fp\n    params: {}\n"),
            std::string::npos)
      << x.arms[0].resolved_yaml;
  EXPECT_NE(x.arms[0].resolved_yaml.find("eval: []\n"), std::string::npos) << x.arms[0].resolved_yaml;
  EXPECT_NE(x.arms[1].resolved_yaml.find("ratio: 1.0\n"), std::string::npos) << x.arms[1].resolved_yaml;
}

TEST_F(Experiments, HashIgnoresCommentsKeyOrderAndStyle) {
  const std::string a = R"(model: {MODEL}
calibration:
  text: {CALIB}
  nsamples: 4
eval:
  - evaluator: perplexity
    params: {seq_len: 128, max_windows: 3}
    datasets: {tinystories: {VALID}, wikitext2: {WIKI}}
arms:
  - name: rtn
    quantizer: {name: rtn, params: {bits: 3, group_size: 64}}
    mask: {name: magnitude, params: {ratio: 0.25}}
)";
  const std::string b = R"(# the same experiment, written differently
arms:
  - mask:
      params:
        ratio: 0.250   # same value
      name: magnitude
    quantizer:
      params: {group_size: 64, bits: 3, symmetric: false}  # explicit default
      name: rtn
    name: rtn
eval:
  - datasets:
      wikitext2: {WIKI}
      tinystories: {VALID}
    params: {max_windows: 3, seq_len: 128}
    evaluator: perplexity
calibration: {nsamples: 4, text: {CALIB}, seq_len: 0}
model: {MODEL}/
seed: 0
)";
  const auto xa = load(a, "e.yaml");
  const auto xb = load(b, "sub/e.yaml");  // another directory, same name
  EXPECT_EQ(xa.arms[0].resolved_yaml, xb.arms[0].resolved_yaml);
  EXPECT_EQ(xa.arms[0].config_hash, xb.arms[0].config_hash);

  // Any change of a resolved value changes the hash.
  const std::vector<std::pair<std::string, std::string>> edits = {
      {"bits: 3, group_size: 64", "bits: 2, group_size: 64"},
      {"bits: 3, group_size: 64", "bits: 3, group_size: 128"},
      {"bits: 3, group_size: 64", "bits: 3, group_size: 64, symmetric: true"},
      {"ratio: 0.25", "ratio: 0.5"},
      {"seq_len: 128", "seq_len: 64"},
      {"max_windows: 3", "max_windows: 4"},
      {"nsamples: 4", "nsamples: 5"},
      {"  nsamples: 4", "  nsamples: 4\n  seq_len: 256"},
      {"  nsamples: 4", "  nsamples: 4\n  seed: 1"},
      {"model: {MODEL}", "model: {MODEL}\nseed: 3"},
      {"model: {MODEL}", "model: {MODEL}\nlog_tensors: true"},
      {"model: {MODEL}", "model: {MODEL}\nname: other"},
      {"- name: rtn", "- name: rtn2"},
      {"wikitext2: {WIKI}", "wikitext2: {VALID}"},
      {"{tinystories: {VALID}, wikitext2: {WIKI}}", "{tinystories: {VALID}}"},
      {"text: {CALIB}", "text: {VALID}"},
      {"mask: {name: magnitude, params: {ratio: 0.25}}", "preprocess: [smooth]\n    mask: {name: magnitude, params: {ratio: 0.25}}"},
  };
  std::set<std::string> hashes = {xa.arms[0].config_hash};
  for (const auto& [from, to] : edits) {
    std::string text = a;
    ASSERT_NE(text.find(from), std::string::npos) << from;
    text.replace(text.find(from), from.size(), to);
    const auto x = load(text, "e.yaml");
    EXPECT_NE(x.arms[0].config_hash, xa.arms[0].config_hash) << "edit: " << to;
    hashes.insert(x.arms[0].config_hash);
  }
  EXPECT_EQ(hashes.size(), edits.size() + 1);
}

// ---------------------------------------------------------------------------------------------
// Errors: each names FILE:LINE:COL of the offending node.

TEST_F(Experiments, ErrorMalformedYaml) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms: [{name: a, quantizer: fp}
)",
               5, 1, "invalid YAML: ");
}

TEST_F(Experiments, ErrorEmptyFile) { expect_error("# nothing here\n", 1, 1, "empty experiment file"); }

TEST_F(Experiments, ErrorNotAMap) { expect_error("- a\n- b\n", 1, 1, "an experiment must be a map of keys, got a list"); }

TEST_F(Experiments, ErrorUnknownTopLevelKey) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arm:
  - name: a
    quantizer: fp
)",
               4, 1, "unknown key 'arm' in the experiment (did you mean 'arms'?)");
}

TEST_F(Experiments, ErrorUnknownKeyWithoutSuggestion) {
  expect_error(R"(model: {MODEL}
zzzzzzzz: 1
)",
               2, 1, "unknown key 'zzzzzzzz' in the experiment (expected one of: name, model, seed,");
}

TEST_F(Experiments, ErrorUnknownCalibrationKey) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
  nsample: 4
)",
               4, 3, "unknown key 'nsample' in calibration (did you mean 'nsamples'?)");
}

TEST_F(Experiments, ErrorUnknownArmKey) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantiser: fp
)",
               6, 5, "unknown key 'quantiser' in arms[0] (did you mean 'quantizer'?)");
}

TEST_F(Experiments, ErrorUnknownComponentKey) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: {name: rtn, parms: {bits: 3}}
)",
               6, 28, "unknown key 'parms' in arm 'a' quantizer (did you mean 'params'?)");
}

TEST_F(Experiments, ErrorUnknownSweepKey) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: rtn
    sweep:
      gird: {quantizer.bits: [2]}
)",
               8, 7, "unknown key 'gird' in sweep (did you mean 'grid'?)");
}

TEST_F(Experiments, ErrorUnknownEvalKey) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
eval:
  - evaluator: perplexity
    dataset: {wikitext2: {WIKI}}
)",
               6, 5, "unknown key 'dataset' in eval[0] (did you mean 'datasets'?)");
}

TEST_F(Experiments, ErrorMissingModel) {
  expect_error(R"(# no model
calibration:
  text: {CALIB}
arms: [{name: a, quantizer: fp}]
)",
               2, 1, "missing required key 'model' in the experiment");
}

TEST_F(Experiments, ErrorMissingCalibration) {
  expect_error(R"(model: {MODEL}
arms: [{name: a, quantizer: fp}]
)",
               1, 1, "missing required key 'calibration' in the experiment");
}

TEST_F(Experiments, ErrorMissingCalibrationText) {
  expect_error(R"(model: {MODEL}
calibration: {nsamples: 4}
arms: [{name: a, quantizer: fp}]
)",
               2, 14, "missing required key 'text' in calibration");
}

TEST_F(Experiments, ErrorMissingArms) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
)",
               1, 1, "missing required key 'arms' in the experiment");
}

TEST_F(Experiments, ErrorEmptyArms) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms: []
)",
               4, 7, "arms is empty");
}

TEST_F(Experiments, ErrorMissingQuantizer) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
base:
  mask: magnitude
arms:
  - name: a
    quantizer: fp
  - name: b
    mask: magnitude
)",
               9, 5, "missing required key 'quantizer' in arm 'b'");
}

TEST_F(Experiments, ErrorMissingQuantizerWithoutInheritance) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
base:
  quantizer: rtn
arms:
  - name: a
    inherit_base: false
)",
               7, 5, "missing required key 'quantizer' in arm 'a'");
}

TEST_F(Experiments, ErrorQuantizerWithoutName) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: {params: {bits: 2}}
)",
               6, 16, "arm 'a' quantizer has no 'name'");
}

TEST_F(Experiments, ErrorMissingEvaluator) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
eval:
  - params: {seq_len: 64}
    datasets: {wikitext2: {WIKI}}
arms: [{name: a, quantizer: fp}]
)",
               5, 5, "missing required key 'evaluator' in eval[0]");
}

TEST_F(Experiments, ErrorMissingDatasets) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
eval:
  - evaluator: perplexity
    datasets: {wikitext2: {WIKI}}
  - evaluator: perplexity
    params: {seq_len: 64}
arms: [{name: a, quantizer: fp}]
)",
               7, 5, "missing required key 'datasets' in eval[1]");
}

TEST_F(Experiments, ErrorEmptyDatasets) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
eval:
  - evaluator: perplexity
    datasets: {}
)",
               6, 15, "eval[0] datasets is empty");
}

TEST_F(Experiments, ErrorDuplicateDataset) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
eval:
  - evaluator: perplexity
    datasets: {wikitext2: {WIKI}}
  - evaluator: perplexity
    params: {seq_len: 64}
    datasets:
      wikitext2: {WIKI}
)",
               10, 7, "dataset 'wikitext2' is evaluated by perplexity twice (first at line 6)");
}

TEST_F(Experiments, ErrorCalibrationNotAMap) {
  expect_error(R"(model: {MODEL}
calibration: [{CALIB}]
)",
               2, 14, "calibration must be a map, got a list");
}

TEST_F(Experiments, ErrorArmsNotAList) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  a: {quantizer: fp}
)",
               5, 3, "arms must be a list of arms, got a map");
}

TEST_F(Experiments, ErrorArmNotAMap) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - rtn
)",
               5, 5, "arms[0] must be a map, got 'rtn'");
}

TEST_F(Experiments, ErrorQuotedIntParam) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer:
      name: rtn
      params:
        bits: "4"
)",
               9, 15, "quantizer rtn: param 'bits' must be an int, got string '4'");
}

TEST_F(Experiments, ErrorFloatForIntParam) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: {name: rtn, params: {bits: 3.5}}
)",
               6, 43, "quantizer rtn: param 'bits' must be an int, got float '3.5'");
}

TEST_F(Experiments, ErrorBoolParamIsTrueOrFalseOnly) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: {name: rtn, params: {symmetric: yes}}
)",
               6, 48, "quantizer rtn: param 'symmetric' must be a bool, got string 'yes'");
}

TEST_F(Experiments, ErrorParamNotAScalar) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: {name: rtn, params: {bits: [4]}}
)",
               6, 43, "quantizer rtn: param 'bits' must be an int, got a list");
}

TEST_F(Experiments, ErrorParamOutOfRange) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer:
      name: rtn
      params: {bits: 32}
)",
               8, 22, "quantizer rtn: param 'bits' must be in [1, 16], got 32");
}

TEST_F(Experiments, ErrorParamNotInChoices) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    preprocess:
      - {name: smooth, params: {mode: row}}
    quantizer: fp
)",
               7, 39, "preprocessor smooth: param 'mode' must be one of channel, tensor, got 'row'");
}

TEST_F(Experiments, ErrorNonFiniteFloat) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: fp
    mask: {name: magnitude, params: {ratio: .nan}}
)",
               7, 45, "mask magnitude: param 'ratio' must be a finite number, got .nan");
}

TEST_F(Experiments, ErrorUnknownQuantizer) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: rnt
)",
               6, 16, "unknown quantizer 'rnt' (did you mean 'rtn'?)");
}

TEST_F(Experiments, ErrorUnknownMaskListsKnownNames) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: fp
    mask: {name: hessian-saliency}
)",
               7, 18, "unknown mask 'hessian-saliency' (expected one of: magnitude)");
}

TEST_F(Experiments, ErrorUnknownEvaluator) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
eval:
  - evaluator: perplexty
    datasets: {wikitext2: {WIKI}}
)",
               5, 16, "unknown evaluator 'perplexty' (did you mean 'perplexity'?)");
}

TEST_F(Experiments, ErrorUnknownParam) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer:
      name: rtn
      params:
        bitz: 3
)",
               9, 9, "quantizer rtn: unknown param 'bitz' (did you mean 'bits'?)");
}

TEST_F(Experiments, ErrorParamOfComponentWithoutParams) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: {name: fp, params: {bits: 3}}
)",
               6, 36, "quantizer fp: unknown param 'bits' (it has no params)");
}

TEST_F(Experiments, ErrorInBaseIsReportedInBase) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
base:
  quantizer: {name: rtn, params: {group_siz: 64}}
arms:
  - name: a
    quantizer: {params: {bits: 3}}
)",
               5, 35, "quantizer rtn: unknown param 'group_siz' (did you mean 'group_size'?)");
}

TEST_F(Experiments, ErrorInheritedValueIsReportedWhereWritten) {
  // base has no name, so it is only checked once merged into the arm: the error points into base.
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
base:
  quantizer: {params: {bits: 0}}
arms:
  - name: a
    quantizer: rtn
)",
               5, 30, "quantizer rtn: param 'bits' must be in [1, 16], got 0");
}

TEST_F(Experiments, ErrorDuplicateArmNames) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: fp
  - name: b
    quantizer: fp
  - name: a
    quantizer: rtn
)",
               9, 11, "duplicate arm name 'a' (first made at line 5)");
}

TEST_F(Experiments, ErrorDuplicateArmNamesAfterSweep) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: rtn-bits3
    quantizer: {name: rtn, params: {bits: 3}}
  - name: rtn
    quantizer: rtn
    sweep: {grid: {quantizer.bits: [4, 3]}}
)",
               7, 11, "duplicate arm name 'rtn-bits3' from this arm's sweep (first made at line 5)");
}

TEST_F(Experiments, ErrorInvalidArmName) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: ../../etc/x
    quantizer: fp
)",
               5, 11, "invalid arm name '../../etc/x'");
}

// Arm names become file names in the result directory: nothing that could lead out of it, or hide
// in it, gets through; the message stays one line even for control characters.
TEST_F(Experiments, ErrorArmNamesThatCouldEscapeTheResultDirectory) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"\"/tmp/x\"", "'/tmp/x'"},          {"\"a/b\"", "'a/b'"},       {"\"..\"", "'..'"},
      {"\"../x\"", "'../x'"},              {"\".hidden\"", "'.hidden'"}, {"\"a\\\\b\"", "'a\\b'"},
      {"\"a\\tb\"", "'a\\tb'"},            {"\"a\\nb\"", "'a\\nb'"},    {"\"a\\x01b\"", "'a\\x01b'"},
      {"\"a\\x7fb\"", "'a\\x7fb'"},        {"\"\"", "''"},             {"\"~\"", "'~'"},
      {"\"C:x\"", "'C:x'"}};
  for (const auto& [yaml, shown] : cases) {
    SCOPED_TRACE(yaml);
    expect_error("model: {MODEL}\ncalibration:\n  text: {CALIB}\narms:\n  - name: " + yaml + "\n    quantizer: fp\n", 5, 11,
                 "invalid arm name " + shown + ": names must match");
  }
}

// Sweep-made names are the arm name plus parameter values; any value turns into name characters.
TEST_F(Experiments, SweepNamesCannotEscapeTheResultDirectory) {
  const auto x = load(std::string(kSweepHead) + R"(  - name: s
    preprocess: [smooth]
    quantizer: fp
    sweep:
      grid:
        preprocess.0.tag: ["/etc/passwd", "..", "a\tb\nc", "x\\y"]
)");
  EXPECT_EQ(arm_names(x), (std::vector<std::string>{"s-tag_etc_passwd", "s-tag..", "s-taga_b_c", "s-tagx_y"}));
}

TEST_F(Experiments, ErrorInvalidExperimentName) {
  expect_error(R"(name: my experiment
model: {MODEL}
)",
               1, 7, "invalid experiment name 'my experiment'");
}

TEST_F(Experiments, ErrorDuplicateKey) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
  nsamples: 4
  nsamples: 8
arms: [{name: a, quantizer: fp}]
)",
               5, 3, "duplicate key 'nsamples' (first at line 4)");
}

TEST_F(Experiments, ErrorDuplicateKeyInParams) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms: [{name: a, quantizer: {name: rtn, params: {bits: 2, bits: 3}}}]
)",
               4, 59, "duplicate key 'bits' (first at line 4)");
}

TEST_F(Experiments, ErrorModelDirectoryMissing) {
  expect_error(R"(calibration:
  text: {CALIB}
model: no/such/model
)",
               3, 8, fmt::format("model not found: {}", (tmp.path() / "no/such/model").string()));
}

TEST_F(Experiments, ErrorModelWithoutConfig) {
  fs::create_directories(tmp.path() / "empty-model");
  expect_error(R"(model: empty-model
)",
               1, 8, fmt::format("model directory has no config.json: {}",
                                  (tmp.path() / "empty-model" / "config.json").string()));
}

TEST_F(Experiments, ErrorModelIsAFile) {
  expect_error(R"(model: {CALIB}
)",
               1, 8, "model is not a directory: ");
}

TEST_F(Experiments, ErrorModelConfigInvalid) {
  fs::create_directories(tmp.path() / "gpt");
  std::ofstream(tmp.path() / "gpt" / "config.json") << R"({"model_type": "gpt2"})";
  expect_error(R"(seed: 1
model: gpt
)",
               2, 8, fmt::format("model: {}: key 'model_type': ptqlab supports 'llama' checkpoints, got 'gpt2'",
                                  (tmp.path() / "gpt" / "config.json").string()));
}

TEST_F(Experiments, ErrorCalibrationTextMissing) {
  expect_error(R"(model: {MODEL}
calibration:
  text: calib.txt
)",
               3, 9, fmt::format("calibration text not found: {}", (tmp.path() / "calib.txt").string()));
}

TEST_F(Experiments, ErrorDatasetFileMissing) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
eval:
  - evaluator: perplexity
    datasets:
      tinystories: {VALID}
      wikitext2: ../wiki.raw
)",
               8, 18, fmt::format("dataset 'wikitext2' file not found: {}", (tmp.path().parent_path() / "wiki.raw").string()));
}

TEST_F(Experiments, ErrorInvalidDatasetName) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
eval:
  - evaluator: perplexity
    datasets:
      wiki/2: {WIKI}
)",
               7, 7, "invalid dataset name 'wiki/2'");
}

TEST_F(Experiments, ErrorPluginPathMissing) {
  expect_error(R"(model: {MODEL}
plugin_paths: [plugins]
)",
               2, 16, fmt::format("plugin path not found: {}", (tmp.path() / "plugins").string()));
}

TEST_F(Experiments, ErrorSeqLenAboveModel) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
  seq_len: 1024
)",
               4, 12, "calibration.seq_len 1024 exceeds the model's max_position_embeddings (512)");
}

TEST_F(Experiments, ErrorSeqLenTooShort) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
  seq_len: 1
)",
               4, 12, "calibration.seq_len must be >= 2");
}

TEST_F(Experiments, ErrorNsamplesOutOfRange) {
  expect_error(R"(model: {MODEL}
calibration: {text: {CALIB}, nsamples: 0}
)",
               2, 33 + static_cast<int>(calib().string().size()),
               "calibration.nsamples must be in [1, 1000000], got 0");
}

TEST_F(Experiments, ErrorStreamDtype) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
  stream_dtype: fp16
)",
               4, 17, "calibration.stream_dtype must be f32, bf16 or f16, got 'fp16'");
}

// f32 streams are the default and leave the config hash as it always was; bf16 is a new config.
TEST_F(Experiments, StreamDtypeF32KeepsTheHashAndBf16ChangesIt) {
  const std::string base = "model: {MODEL}\ncalibration:\n  text: {CALIB}\n";
  const std::string arms = "arms:\n  - name: a\n    quantizer: fp\n";
  const auto none = load(base + arms, "a.yaml");
  const auto f32 = load(base + "  stream_dtype: f32\n" + arms, "a.yaml");
  const auto bf16 = load(base + "  stream_dtype: bf16\n" + arms, "a.yaml");
  EXPECT_EQ(none.calibration.stream_dtype, StreamDType::f32);
  EXPECT_EQ(bf16.calibration.stream_dtype, StreamDType::bf16);
  EXPECT_EQ(none.arms[0].config_hash, f32.arms[0].config_hash);
  EXPECT_EQ(none.arms[0].resolved_yaml.find("stream_dtype"), std::string::npos);
  EXPECT_NE(none.arms[0].config_hash, bf16.arms[0].config_hash);
  EXPECT_NE(bf16.arms[0].resolved_yaml.find("stream_dtype: bf16"), std::string::npos);
}

TEST_F(Experiments, ErrorNegativeSeed) {
  expect_error(R"(model: {MODEL}
seed: -1
)",
               2, 7, "seed must be in [0, inf], got -1");
}

TEST_F(Experiments, ErrorSeedNotAnInt) {
  expect_error(R"(seed: "12"
)",
               1, 7, "seed must be an int, got string '12'");
  expect_error(R"(seed: 1.0
)",
               1, 7, "seed must be an int, got float '1.0'");
}

TEST_F(Experiments, ErrorTypeMessagesQuoteTheFile) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: {name: rtn, params: {bits: 4.0}}
)",
               6, 43, "quantizer rtn: param 'bits' must be an int, got float '4.0'");
}

TEST_F(Experiments, ErrorLogTensorsNotBool) {
  expect_error(R"(log_tensors: 1
)",
               1, 14, "log_tensors must be true or false, got '1'");
}

TEST_F(Experiments, ErrorNullValueReportedAtKey) {
  expect_error(R"(model:
calibration: {text: {CALIB}}
)",
               1, 1, "model must be a string, got null");
}

TEST_F(Experiments, ErrorSweepUnknownAxis) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: rtn
    sweep:
      grid:
        quantiser.bits: [2, 3]
)",
               9, 9, "unknown sweep axis 'quantiser.bits': expected quantizer.<param>, mask.<param>, "
                     "preprocess.<index>.<param>, allocator.budget or allocator.<param> (did you mean 'quantizer'?)");
}

TEST_F(Experiments, ErrorSweepMalformedAxis) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: rtn
    sweep:
      grid:
        preprocess.bits: [2, 3]
)",
               9, 9, "unknown sweep axis 'preprocess.bits'");
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    preprocess: [smooth]
    quantizer: rtn
    sweep: {zip: {preprocess.99999999999999999999.alpha: [0.5]}}
)",
               8, 19, "unknown sweep axis 'preprocess.99999999999999999999.alpha'");
}

TEST_F(Experiments, ErrorStringParamGivenANumber) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    preprocess: [{name: smooth, params: {tag: 12}}]
    quantizer: rtn
)",
               6, 47, "preprocessor smooth: param 'tag' must be a string, got int '12'");
}

TEST_F(Experiments, ErrorUnsupportedTag) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: {name: rtn, params: {bits: !custom 3}}
)",
               6, 43, "unsupported YAML tag '!custom'");
}

TEST_F(Experiments, ErrorSweepUnknownParam) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: rtn
    sweep:
      grid:
        quantizer.bitz: [2, 3]
)",
               9, 9, "sweep axis 'quantizer.bitz': quantizer rtn: unknown param 'bitz' (did you mean 'bits'?)");
}

TEST_F(Experiments, ErrorSweepAxisNotAList) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: rtn
    sweep:
      grid:
        quantizer.bits: 4
)",
               9, 25, "sweep axis 'quantizer.bits' must be a list of values, got '4'");
}

TEST_F(Experiments, ErrorSweepAxisEmpty) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: rtn
    sweep:
      grid:
        quantizer.bits: []
)",
               9, 25, "sweep axis 'quantizer.bits' has no values");
}

TEST_F(Experiments, ErrorSweepZipLengths) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: rtn
    sweep:
      zip:
        quantizer.bits: [2, 3]
        quantizer.group_size: [64, 128, 256]
)",
               10, 9, "zip axis 'quantizer.group_size' has 3 values but 'quantizer.bits' has 2");
}

TEST_F(Experiments, ErrorSweepValueFailsCheck) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: rtn
    sweep:
      grid:
        quantizer.bits: [4, 3,
                         32]
)",
               10, 26, "quantizer rtn: param 'bits' must be in [1, 16], got 32 (sweep axis 'quantizer.bits')");
}

TEST_F(Experiments, ErrorSweepValueWrongType) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: rtn
    sweep:
      grid:
        quantizer.symmetric:
          - true
          - "false"
)",
               11, 13, "quantizer rtn: param 'symmetric' must be a bool, got string 'false'");
}

TEST_F(Experiments, ErrorSweepWithoutMask) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: rtn
    sweep:
      zip:
        mask.ratio: [0.1]
)",
               9, 9, "sweep axis 'mask.ratio': arm 'a' has no mask");
}

TEST_F(Experiments, ErrorSweepPreprocessIndexOutOfRange) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    preprocess: [smooth]
    quantizer: rtn
    sweep:
      grid:
        preprocess.1.alpha: [0.1]
)",
               10, 9, "sweep axis 'preprocess.1.alpha': arm 'a' has no preprocess step 1 (it has 1)");
}

TEST_F(Experiments, ErrorSweepAxisInGridAndZip) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: rtn
    sweep:
      grid: {quantizer.bits: [2]}
      zip: {quantizer.bits: [3]}
)",
               9, 13, "sweep axis 'quantizer.bits' appears in both grid and zip");
}

// Found by reasoning alongside fuzz_experiment: 16 x 2 x 320 values in three short lists used to
// expand into 10240 arms (and bigger grids into millions, exhausting memory before any check).
TEST_F(Experiments, ErrorSweepWithTooManyArms) {
  std::string sizes;
  for (int g = 1; g <= 320; ++g) sizes += (g > 1 ? ", " : "") + std::to_string(g);
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: rtn
    sweep:
      grid:
        quantizer.bits: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
        quantizer.symmetric: [true, false]
        quantizer.group_size: [)" + sizes + R"(]
)",
               8, 7, "sweep makes more than 10000 arms");
}

// Nested aliases ("billion laughs": 10^9 nodes from ten short lines) are walked once each: the
// structure check used to follow every alias and never finished.
TEST_F(Experiments, NestedAliasesAreCheckedOnce) {
  std::string text = "a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n";
  for (int i = 1; i < 9; ++i) {
    text += fmt::format("a{}: &a{} [", i, i);
    for (int k = 0; k < 10; ++k) text += fmt::format("{}*a{}", k ? ", " : "", i - 1);
    text += "]\n";
  }
  expect_error(text + "model: {MODEL}\n", 1, 1, "unknown key 'a0'");
}

TEST_F(Experiments, ErrorSweepWithoutAxes) {
  expect_error(R"(model: {MODEL}
calibration:
  text: {CALIB}
arms:
  - name: a
    quantizer: rtn
    sweep: {}
)",
               7, 12, "sweep has no axes");
}

TEST_F(Experiments, ErrorMissingFileNamesTheFile) {
  const fs::path p = tmp.path() / "absent.yaml";
  try {
    load_experiment(p, schemas);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), p.string() + ": experiment file not found");
  }
}

// ---------------------------------------------------------------------------------------------
// closest_match and sha256.

TEST(ClosestMatch, Suggestions) {
  const std::vector<std::string> keys = {"name", "model", "seed", "calibration", "eval", "arms"};
  EXPECT_EQ(closest_match("arm", keys), "arms");
  EXPECT_EQ(closest_match("calibraton", keys), "calibration");
  EXPECT_EQ(closest_match("modle", keys), "model");  // a transposition costs 2
  EXPECT_EQ(closest_match("seed", keys), "seed");    // exact
  EXPECT_EQ(closest_match("rnt", {"fp", "rtn"}), "rtn");
  EXPECT_EQ(closest_match("xyzzy", keys), std::nullopt);
  EXPECT_EQ(closest_match("arms", {}), std::nullopt);
}

TEST(ClosestMatch, ThresholdGrowsWithLength) {
  // Short words: at most 2 edits.
  EXPECT_EQ(closest_match("abc", {"xyc"}), "xyc");
  EXPECT_EQ(closest_match("abc", {"xyz"}), std::nullopt);
  // 12 letters: up to 12/3 = 4 edits.
  EXPECT_EQ(closest_match("abcdefghijkl", {"abcdefghWXYZ"}), "abcdefghWXYZ");
  EXPECT_EQ(closest_match("abcdefghijkl", {"abcdefgVWXYZ"}), std::nullopt);
  // 9 letters: 3 edits.
  EXPECT_EQ(closest_match("abcdefghi", {"abcdefXYZ"}), "abcdefXYZ");
  EXPECT_EQ(closest_match("abcdefghi", {"abcdeWXYZ"}), std::nullopt);
}

TEST(ClosestMatch, BestAndDeterministicTieBreak) {
  EXPECT_EQ(closest_match("bits", {"bitz_long", "bit", "bats"}), "bit");   // both at 1: first wins
  EXPECT_EQ(closest_match("bits", {"bats", "bit"}), "bats");
  EXPECT_EQ(closest_match("group_siz", {"groups", "group_size"}), "group_size");  // 1 beats 3
  EXPECT_EQ(closest_match("aa", {"ab", "ba"}), "ab");
  EXPECT_EQ(closest_match("aa", {"ba", "ab"}), "ba");
}

TEST(Sha256, StandardVectors) {
  EXPECT_EQ(sha256_hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
  EXPECT_EQ(sha256_hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(sha256_hex("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
  EXPECT_EQ(sha256_hex(std::string(1000000, 'a')), "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256, PaddingBoundaries) {
  // Lengths around the 55/56-byte padding split and block boundaries (reference: Python hashlib).
  EXPECT_EQ(sha256_hex(std::string(55, 'a')), "9f4390f8d30c2dd92ec9f095b65e2b9ae9b0a925a5258e241c9f1e910f734318");
  EXPECT_EQ(sha256_hex(std::string(56, 'a')), "b35439a4ac6f0948b6d6f9e3c6af0f5f590ce20f1bde7090ef7970686ec6738a");
  EXPECT_EQ(sha256_hex(std::string(63, 'a')), "7d3e74a05d7db15bce4ad9ec0658ea98e3f06eeecf16b4c6fff2da457ddc2f34");
  EXPECT_EQ(sha256_hex(std::string(64, 'a')), "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb");
  EXPECT_EQ(sha256_hex(std::string(119, 'a')), "31eba51c313a5c08226adf18d4a359cfdfd8d2e816b13f4af952f7ea6584dcfb");
  EXPECT_EQ(sha256_hex(std::string(120, 'a')), "2f3d335432c70b580af0e8e1b3674a7c020d683aa5f73aaaedfdc55af904c21c");
}

}  // namespace
}  // namespace ptqlab
