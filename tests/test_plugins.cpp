// Plugin loading: built-in plugins, a plugin built separately, ABI and build-id mismatches,
// non-plugins, duplicate names, library lifetime, the exact arithmetic of rtn and sign, and the
// plugin SDK (what a plugin may include).
#include <dlfcn.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/sha256.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

std::filesystem::path test_plugins(const std::string& dir) { return std::filesystem::path(PTQLAB_TEST_PLUGINS) / dir; }

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Plugins, BuiltinsLoadFromTheBuildDirectory) {
  PluginRegistry r;
  const auto dir = PluginRegistry::default_plugin_dir();
  ASSERT_FALSE(dir.empty());
  r.add_search_path(dir);
  for (const char* q : {"fp", "rtn", "sign"}) EXPECT_NE(r.find(ComponentKind::quantizer, q), nullptr) << q;
  EXPECT_NE(r.find(ComponentKind::evaluator, "perplexity"), nullptr);
  const auto* rtn = r.find(ComponentKind::quantizer, "rtn");
  ASSERT_NE(rtn->find("bits"), nullptr);
  EXPECT_EQ(std::get<std::int64_t>(rtn->find("bits")->default_value), 4);
  EXPECT_EQ(r.library_of(ComponentKind::quantizer, "rtn").filename(), "quantizer-rtn.so");
}

TEST(Plugins, SeparatelyBuiltPluginIsFoundAndUsed) {
  PluginRegistry r;
  r.add_search_path(test_plugins("good"));
  const auto* schema = r.find(ComponentKind::quantizer, "test-scale");
  ASSERT_NE(schema, nullptr);
  EXPECT_EQ(schema->description, "test: multiplies weights by a factor");
  auto q = r.make_quantizer("test-scale", Params::resolve(*schema, {{"factor", 2.5}}));
  Matrix w = Matrix::Ones(2, 3);
  LinearContext ctx;
  const auto bits = q->quantize_linear(ctx, w);
  EXPECT_FLOAT_EQ(w(1, 2), 2.5f);
  EXPECT_EQ(bits.weights, 6);
  EXPECT_NE(r.find(ComponentKind::evaluator, "test-count"), nullptr);
}

TEST(Plugins, LibraryStaysLoadedWhileAnObjectLives) {
  const auto lib = std::filesystem::canonical(test_plugins("good") / "test_good.so");
  std::shared_ptr<Quantizer> q;
  {
    PluginRegistry r;
    r.add_search_path(test_plugins("good"));
    q = r.make_quantizer("test-scale", Params::resolve(*r.find(ComponentKind::quantizer, "test-scale"), {}));
  }  // the registry is gone; the object must still work
  void* h = ::dlopen(lib.c_str(), RTLD_NOW | RTLD_NOLOAD);
  ASSERT_NE(h, nullptr) << "library unloaded while an object it made is alive";
  auto live = reinterpret_cast<int (*)()>(::dlsym(h, "test_plugin_live_count"));
  ASSERT_NE(live, nullptr);
  EXPECT_EQ(live(), 1);
  Matrix w = Matrix::Ones(1, 1);
  q->quantize_linear(LinearContext{}, w);  // code inside the library still runs
  EXPECT_FLOAT_EQ(w(0, 0), 1.0f);
  ::dlclose(h);
  q.reset();
  EXPECT_EQ(::dlopen(lib.c_str(), RTLD_NOW | RTLD_NOLOAD), nullptr) << "library still loaded after the last object died";
}

// An Error thrown inside a plugin is caught as ptqlab::Error in core, even when the registry (and
// with it the library) is destroyed while the exception is in flight.
TEST(Plugins, ErrorThrownByAPluginOutlivesItsLibrary) {
  try {
    PluginRegistry r;
    r.add_search_path(test_plugins("good"));
    r.make_quantizer("test-refuses", Params{});
    FAIL() << "expected the factory to throw";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "test-refuses: this combination of parameters is not supported");
  }
}

TEST(Plugins, AbiVersionMismatchIsRejected) {
  PluginRegistry r;
  const auto msg = error_of([&] { r.add_search_path(test_plugins("bad-abi")); });
  EXPECT_NE(msg.find("test_bad_abi.so: plugin ABI version " + std::to_string(PTQLAB_PLUGIN_ABI_VERSION + 998) +
                     ", but this ptqlab needs " + std::to_string(PTQLAB_PLUGIN_ABI_VERSION) + ": rebuild the plugin"),
            std::string::npos)
      << msg;
}

TEST(Plugins, BuildIdMismatchIsRejected) {
  PluginRegistry r;
  const auto msg = error_of([&] { r.add_search_path(test_plugins("bad-build")); });
  EXPECT_NE(msg.find("plugin built for 'ptqlab-abi-1/gxx-abi-9999/eigen-2.0.0', but this ptqlab is '" +
                     plugin_build_id() + "'"),
            std::string::npos)
      << msg;
}

TEST(Plugins, OrdinaryLibraryIsNotAPlugin) {
  PluginRegistry r;
  const auto msg = error_of([&] { r.add_search_path(test_plugins("not-a-plugin")); });
  EXPECT_NE(msg.find("test_not_a_plugin.so: not a ptqlab plugin"), std::string::npos) << msg;
}

TEST(Plugins, DuplicateComponentNameIsRejected) {
  PluginRegistry r;
  r.add_search_path(PluginRegistry::default_plugin_dir());
  const auto msg = error_of([&] { r.add_search_path(test_plugins("duplicate")); });
  EXPECT_NE(msg.find("test_duplicate.so: quantizer 'rtn' is already provided by"), std::string::npos) << msg;
  EXPECT_NE(msg.find("quantizer-rtn.so"), std::string::npos) << msg;
}

TEST(Plugins, SearchPathMustBeADirectoryAndNamesMustExist) {
  PluginRegistry r;
  EXPECT_NE(error_of([&] { r.add_search_path("/nonexistent/plugins"); })
                .find("/nonexistent/plugins: plugin path is not a directory"),
            std::string::npos);
  r.add_search_path(PluginRegistry::default_plugin_dir());
  EXPECT_NE(error_of([&] { r.make_quantizer("rnt", Params{}); }).find("unknown quantizer 'rnt'"), std::string::npos);
}

// A plugin directory holding a symbolic link to a library elsewhere: refused before anything is
// dlopen'ed (a library's constructors run on dlopen, so "not a plugin" afterwards is too late).
TEST(Plugins, SymlinkToALibraryOutsideThePluginPathIsRefused) {
  test::TempDir tmp;
  const auto target = std::filesystem::canonical(test_plugins("good") / "test_good.so");
  std::filesystem::create_symlink(target, tmp.path() / "linked.so");
  PluginRegistry r;
  const auto msg = error_of([&] { r.add_search_path(tmp.path()); });
  EXPECT_EQ(msg, (tmp.path() / "linked.so").string() + ": links to " + target.string() + ", outside the plugin path " +
                     std::filesystem::canonical(tmp.path()).string() +
                     ": plugins load only from the plugin directories themselves");
  EXPECT_EQ(::dlopen(target.c_str(), RTLD_NOW | RTLD_NOLOAD), nullptr) << "the library was loaded";
  EXPECT_TRUE(r.list().empty());
}

TEST(Plugins, SameDirectoryTwiceLoadsOnce) {
  PluginRegistry r;
  r.add_search_path(PluginRegistry::default_plugin_dir());
  const auto n = r.list().size();
  r.add_search_path(PluginRegistry::default_plugin_dir());
  EXPECT_EQ(r.list().size(), n);
}

// ---- the built-in quantizers' arithmetic, against hand-computed values -------------------------

std::shared_ptr<Quantizer> builtin_quantizer(const std::string& name, const std::map<std::string, ParamValue>& params) {
  static PluginRegistry r;
  static bool loaded = (r.add_search_path(PluginRegistry::default_plugin_dir()), true);
  (void)loaded;
  return r.make_quantizer(name, Params::resolve(*r.find(ComponentKind::quantizer, name), params));
}

TEST(RtnQuantizer, TwoBitAsymmetricByHand) {
  // Row [-1, 0.5, 0.25, 2]: range [-1, 2], scale 1, zero round(1) = 1;
  // round(w) + 1 clamped to [0, 3]: 0, 1 (0.5 rounds half to even, to 0), 1, 3 -> [-1, 0, 0, 2].
  Matrix w(1, 4);
  w << -1.0f, 0.5f, 0.25f, 2.0f;
  const auto bits = builtin_quantizer("rtn", {{"bits", std::int64_t{2}}})->quantize_linear(LinearContext{}, w);
  Matrix expected(1, 4);
  expected << -1.0f, 0.0f, 0.0f, 2.0f;
  EXPECT_EQ(w, expected);
  EXPECT_EQ(bits.weights, 4);
  EXPECT_DOUBLE_EQ(bits.payload, 8.0);
  EXPECT_DOUBLE_EQ(bits.scales, 16.0);  // one FP16 scale
  EXPECT_DOUBLE_EQ(bits.zeros, 2.0);    // one 2-bit zero point
  EXPECT_DOUBLE_EQ(bits.paper, 8.0);
}

TEST(RtnQuantizer, RangeAlwaysContainsZeroAndGroupsAreIndependent) {
  // All-positive group [1, 2, 3, 4] at 2 bits: range [0, 4], scale 4/3, zero 0 -> levels 0, 4/3, 8/3, 4.
  // Second group [-8, -8, -8, -8]: range [-8, 0], scale 8/3, zero 3 -> -8 exactly.
  Matrix w(1, 8);
  w << 1, 2, 3, 4, -8, -8, -8, -8;
  const auto bits = builtin_quantizer("rtn", {{"bits", std::int64_t{2}}, {"group_size", std::int64_t{4}}})
                        ->quantize_linear(LinearContext{}, w);
  const float s = 4.0f / 3.0f;
  EXPECT_FLOAT_EQ(w(0, 0), s);
  EXPECT_FLOAT_EQ(w(0, 1), 2 * s);
  EXPECT_FLOAT_EQ(w(0, 2), 2 * s);  // 3 / (4/3) = 2.25 -> 2
  EXPECT_FLOAT_EQ(w(0, 3), 3 * s);
  for (int c = 4; c < 8; ++c) EXPECT_FLOAT_EQ(w(0, c), -8.0f);
  EXPECT_DOUBLE_EQ(bits.scales, 32.0);  // two groups
}

TEST(RtnQuantizer, SymmetricGridAndAllZeroRow) {
  Matrix w(2, 3);
  w << -2, 1, 0.4f, 0, 0, 0;
  builtin_quantizer("rtn", {{"bits", std::int64_t{2}}, {"symmetric", true}})->quantize_linear(LinearContext{}, w);
  // Row 0: range [-2, 2], scale 4/3, zero (3 + 1) / 2 = 2. For -2: round(-1.5) = -2 (half to even),
  // code clamp(-2 + 2) = 0, value (0 - 2) * 4/3 = -8/3: the symmetric grid is not symmetric in value.
  EXPECT_FLOAT_EQ(w(0, 0), -8.0f / 3.0f);
  EXPECT_FLOAT_EQ(w(0, 1), 4.0f / 3.0f);  // round(0.75) = 1
  EXPECT_FLOAT_EQ(w(0, 2), 0.0f);         // round(0.3) = 0
  EXPECT_EQ(w.row(1), Eigen::RowVector3f::Zero().eval());  // [-1, 1] range, zeros stay zero
}

TEST(SignQuantizer, ClosedFormScaleByHand) {
  Matrix w(2, 4);
  w << 1, -3, 2, -2, 0.5f, 0.5f, 0.5f, -0.5f;
  const auto bits = builtin_quantizer("sign", {})->quantize_linear(LinearContext{}, w);
  Matrix expected(2, 4);
  expected << 2, -2, 2, -2, 0.5f, 0.5f, 0.5f, -0.5f;
  EXPECT_EQ(w, expected);
  EXPECT_DOUBLE_EQ(bits.payload, 8.0);
  EXPECT_DOUBLE_EQ(bits.scales, 32.0);
  EXPECT_DOUBLE_EQ(bits.all_in_per_weight(), 5.0);
  EXPECT_DOUBLE_EQ(bits.paper_per_weight(), 1.0);
}

// ---- CLI ------------------------------------------------------------------------------------------

TEST(PluginsCli, JsonListsComponentsWithSchemas) {
  const auto r = test::run_ptqlab("plugins --json --plugin-path " + test_plugins("good").string(), false);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  std::set<std::string> names;
  for (const auto& c : j) names.insert(c["kind"].get<std::string>() + "/" + c["name"].get<std::string>());
  for (const char* n : {"quantizer/fp", "quantizer/rtn", "quantizer/sign", "evaluator/perplexity", "quantizer/test-scale"})
    EXPECT_TRUE(names.count(n)) << n;
  for (const auto& c : j)
    if (c["name"] == "test-scale") {
      EXPECT_EQ(c["params"][1]["choices"], nlohmann::json({"plain", "fancy"}));
      EXPECT_EQ(c["library"], "test_good.so");
    }
}

TEST(PluginsCli, MarkdownReferenceAndFilters) {
  const auto md = test::run_ptqlab("plugins --markdown", false);
  ASSERT_EQ(md.exit_code, 0);
  EXPECT_NE(md.output.find("### `rtn`"), std::string::npos);
  EXPECT_NE(md.output.find("| `bits` | int | `4` | [1, 16] |"), std::string::npos) << md.output;
  const auto one = test::run_ptqlab("plugins rtn", false);
  EXPECT_NE(one.output.find("quantizer rtn:"), std::string::npos);
  EXPECT_EQ(one.output.find("quantizer fp:"), std::string::npos);
  const auto bad = test::run_ptqlab("plugins --kind quantiser");
  EXPECT_EQ(bad.exit_code, 2);
  EXPECT_NE(bad.output.find("--kind 'quantiser'"), std::string::npos);
}

}  // namespace
}  // namespace ptqlab

namespace ptqlab {
namespace {

// docs/config-reference.md is generated; this keeps it true.
TEST(PluginsCli, ConfigReferenceDocIsUpToDate) {
  const auto generated = test::run_ptqlab("plugins --markdown", false);
  ASSERT_EQ(generated.exit_code, 0);
  const std::string on_disk = test::read_file(std::filesystem::path(PTQLAB_SOURCE_DIR) / "docs" / "config-reference.md");
  EXPECT_EQ(on_disk, generated.output)
      << "docs/config-reference.md is stale: regenerate it with build/bin/ptqlab plugins --markdown > docs/config-reference.md";
}

}  // namespace
}  // namespace ptqlab

// The plugin SDK (docs/plugins.md, "Plugin SDK").
namespace ptqlab {
namespace {

namespace fs = std::filesystem;

const fs::path kIncludeRoot = fs::path(PTQLAB_SOURCE_DIR) / "core" / "include";
const std::string kInternalMarker = "#include \"ptqlab/support/internal.hpp\"";

// The core headers without the internal marker, as "ptqlab/<layer>/<name>.hpp", sorted.
std::vector<std::string> sdk_headers() {
  std::vector<std::string> out;
  for (const auto& e : fs::recursive_directory_iterator(kIncludeRoot / "ptqlab")) {
    if (!e.is_regular_file() || e.path().extension() != ".hpp") continue;
    const std::string rel = fs::relative(e.path(), kIncludeRoot).generic_string();
    if (rel == "ptqlab/support/internal.hpp") continue;
    if (test::read_file(e.path()).find(kInternalMarker) == std::string::npos) out.push_back(rel);
  }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<std::string> ptqlab_includes(const std::string& text) {
  std::vector<std::string> out;
  const std::string key = "#include \"ptqlab/";
  for (std::size_t at = text.find(key); at != std::string::npos; at = text.find(key, at + 1)) {
    const auto begin = at + 10, end = text.find('"', begin);
    out.push_back(text.substr(begin, end - begin));
  }
  return out;
}

TEST(PluginSdk, DocsListExactlyTheSdk) {
  const std::string doc = test::read_file(fs::path(PTQLAB_SOURCE_DIR) / "docs" / "plugins.md");
  const auto begin = doc.find("## Plugin SDK");
  ASSERT_NE(begin, std::string::npos);
  const auto end = doc.find("\nEvery other core header", begin);
  ASSERT_NE(end, std::string::npos);
  std::vector<std::string> listed;
  const std::string section = doc.substr(begin, end - begin);
  for (std::size_t at = section.find("`ptqlab/"); at != std::string::npos; at = section.find("`ptqlab/", at + 1)) {
    const auto close = section.find('`', at + 1);
    listed.push_back(section.substr(at + 1, close - at - 1));
  }
  std::sort(listed.begin(), listed.end());
  EXPECT_EQ(listed, sdk_headers());
  EXPECT_GE(listed.size(), 20u);
}

TEST(PluginSdk, SdkIsClosedUnderIncludes) {
  const auto sdk = sdk_headers();
  for (const auto& h : sdk)
    for (const auto& inc : ptqlab_includes(test::read_file(kIncludeRoot / h)))
      EXPECT_TRUE(std::binary_search(sdk.begin(), sdk.end(), inc)) << h << " includes " << inc << ", not in the SDK";
  // and the built-in plugins use nothing else (they are compiled with the check too)
  for (const auto& e : fs::recursive_directory_iterator(fs::path(PTQLAB_SOURCE_DIR) / "plugins")) {
    const auto ext = e.path().extension();
    if (!e.is_regular_file() || (ext != ".cpp" && ext != ".hpp")) continue;
    for (const auto& inc : ptqlab_includes(test::read_file(e.path())))
      EXPECT_TRUE(std::binary_search(sdk.begin(), sdk.end(), inc)) << e.path() << " includes " << inc;
  }
}

// sha256 of the SDK headers' code: each file's path and its lines without // comments, trailing
// blanks or empty lines, so that comment edits need no ABI bump.
std::string sdk_code_hash() {
  std::string all;
  for (const auto& h : sdk_headers()) {
    all += "== " + h + "\n";
    std::istringstream in(test::read_file(kIncludeRoot / h));
    for (std::string line; std::getline(in, line);) {
      const auto comment = line.find("//");
      if (comment != std::string::npos) line.erase(comment);
      while (!line.empty() && std::isspace(static_cast<unsigned char>(line.back()))) line.pop_back();
      if (!line.empty()) all += line + "\n";
    }
  }
  return sha256_hex(all);
}

TEST(PluginSdk, AbiVersionCoversTheSdk) {
  const std::string want = fmt::format("abi {} sdk {}", PTQLAB_PLUGIN_ABI_VERSION, sdk_code_hash());
  std::string recorded = test::read_file(fs::path(PTQLAB_SOURCE_DIR) / "tests" / "data" / "plugin-sdk.txt");
  while (!recorded.empty() && std::isspace(static_cast<unsigned char>(recorded.back()))) recorded.pop_back();
  EXPECT_EQ(recorded, want)
      << "the plugin SDK's code changed: if the change crosses the plugin boundary, raise PTQLAB_PLUGIN_ABI_VERSION "
         "(ptqlab/engine/plugin.hpp); then write this line to tests/data/plugin-sdk.txt:\n"
      << want;
  // An ABI version recorded with another SDK means the SDK changed without a bump.
  EXPECT_EQ(recorded.substr(0, recorded.find(" sdk ")), fmt::format("abi {}", PTQLAB_PLUGIN_ABI_VERSION));
}

}  // namespace
}  // namespace ptqlab
