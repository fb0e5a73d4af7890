// HDF5 result files (docs/results-schema.md): every field round-trips exactly, h5dump reads the
// files, writes are atomic (a file at the target path only ever exists complete, also when the
// disk fills up), damaged or foreign files are rejected, and ResultWriter serialises writes from
// many threads and reports failures through the futures.
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <future>
#include <limits>
#include <regex>
#include <set>
#include <sstream>
#include <thread>
#include <vector>

#include <fmt/format.h>

#include "ptqlab/outputs/results.hpp"
#include "ptqlab/support/error.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

namespace fs = std::filesystem;
using test::TempDir;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr double kInf = std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------------
// Results to write.

LinearRecord linear(int layer, const std::string& name, double werr, double oerr, std::int64_t weights,
                    double payload, double scales, double zeros, double masks, double paper, double seconds) {
  LinearRecord l;
  l.layer = layer;
  l.linear = name;
  l.weight_error = werr;
  l.output_error = oerr;
  l.bits = {weights, payload, scales, zeros, masks, paper};
  l.seconds = seconds;
  return l;
}

// Every field filled, with awkward values: non-ASCII text, NaN, infinities, -0, denormals,
// extreme integers, empty maps and groups, nested and unsorted tensor paths, 0-D and empty tensors.
ArmResult rich_result(const std::string& arm) {
  ArmResult r;
  r.arm = arm;
  r.experiment = "llama-7b sweep «ptq1.61»";
  r.status = "ok";
  r.failure = "";
  r.config_yaml =
      "name: " + arm +
      "\nnote: \"résumé — 量子化 ✓ 🚀\"\nquantizer:\n  name: ptq161\n  params: {bits: 1.61, group: 128}\n"
      "tabs:\t'quoted' \"double\"\n";
  r.config_hash = "9f2c4e1ab07d3c5e8f60a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f6";
  auto& p = r.provenance;
  p.ptqlab_version = "0.1.0";
  p.git_revision = "4513b72abcde";
  p.library_versions = {{"eigen", "3.4.0"},
                        {"hdf5", hdf5_version()},
                        {"compiler", "12.2.0 (Debian «bookworm»)"},
                        {"empty", ""}};
  p.host = "nœud-01.cluster";
  p.start_time = "2024-05-01T12:00:00Z";
  p.end_time = "2024-05-01T13:02:03Z";
  p.seeds = {{"experiment", 42},
             {"calibration", -7},
             {"max", std::numeric_limits<std::int64_t>::max()},
             {"min", std::numeric_limits<std::int64_t>::min()}};
  r.calibration_nsamples = 3;
  r.calibration_seq_len = 5;
  r.calibration_tokens = {1, 2, 3, 4, 5, 0, -1, std::numeric_limits<std::int32_t>::max(),
                          std::numeric_limits<std::int32_t>::min(), 9, 10, 11, 12, 13, 31999};
  r.metrics["perplexity"]["wikitext2"] = {{"ppl", 5.287219384712}, {"nll", 1.6652901}, {"tokens", 315798}};
  r.metrics["perplexity"]["c4"] = {{"ppl", 1e300}, {"nll", kInf}, {"denormal", 5e-324}};
  r.metrics["zeroshot"]["piqa"] = {{"acc", 0.5}, {"acc norm (%)", 51.25}, {"précision", -0.0}};
  r.metrics["zeroshot"]["arc_e"] = {};  // a dataset with no metrics
  r.metrics["no-datasets"] = {};        // an evaluator with no datasets
  r.linears = {
      linear(0, "q_proj", 0.1, 0.2, 4096, 4096.0, 512.0, 0.0, 64.0, 1.0 * 4096, 1.25),
      linear(0, "k_proj", 1.0 / 3.0, kNaN, 2048, 2048.5, 256.0, 16.0, 0.0, 1.61 * 2048, -0.0),
      linear(1, "down_proj", 5e-324, 1e-300, std::int64_t{1} << 40, 1.5e12, 3.0, 2.0, 1.0, 1.7e12, 1e9),
      linear(1, "gate_proj/ü", 0.0, kInf, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
  };
  for (const auto& l : r.linears) r.total_bits += l.bits;
  const float fnan = std::numeric_limits<float>::quiet_NaN();
  const float finf = std::numeric_limits<float>::infinity();
  r.tensors = {
      {"zeta", {5}, {1, 2, 3, 4, 5}},  // written first, sorts last: the order must survive
      {"layer0/q_proj/mask", {3, 4}, {1, 0, 0, 1, 0, 1, 1, 0, 1, 1, 1, 1}},
      {"layer0/q_proj/scales", {3}, {0.125f, -0.0f, 1e-45f}},
      {"layer1/down_proj/deep/nested/w", {2, 2}, {fnan, finf, -finf, 3.4028235e38f}},
      {"empty_rows", {0, 4}, {}},
      {"scalar", {}, {1.5f}},
      {"cube", {2, 1, 3}, {1, 2, 3, 4, 5, 6}},
  };
  r.series = {
      {"layer1/loss", {3.0, 2.5, 2.25, kNaN}},
      {"layer0/loss", {0.1, 0.01}},
      {"lr", {}},
  };
  r.seconds = 3723.0625;
  return r;
}

// The least a result can hold: no calibration, no metrics, no linears, no tensors.
ArmResult minimal_result(const std::string& arm) {
  ArmResult r;
  r.arm = arm;
  r.experiment = "minimal";
  r.config_yaml = "name: " + arm + "\n";
  r.config_hash = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
  return r;
}

// ---------------------------------------------------------------------------------------------
// Comparisons: doubles and floats bit for bit (NaN, -0 and denormals included).

bool same(double a, double b) { return std::bit_cast<std::uint64_t>(a) == std::bit_cast<std::uint64_t>(b); }
bool same(float a, float b) { return std::bit_cast<std::uint32_t>(a) == std::bit_cast<std::uint32_t>(b); }

#define EXPECT_SAME(a, b) EXPECT_TRUE(same((a), (b))) << #a << " = " << (a) << ", " #b << " = " << (b)

void expect_same_bits(const BitCount& a, const BitCount& b, const std::string& where) {
  SCOPED_TRACE(where);
  EXPECT_EQ(a.weights, b.weights);
  EXPECT_SAME(a.payload, b.payload);
  EXPECT_SAME(a.scales, b.scales);
  EXPECT_SAME(a.zeros, b.zeros);
  EXPECT_SAME(a.masks, b.masks);
  EXPECT_SAME(a.paper, b.paper);
}

void expect_equal(const ArmResult& got, const ArmResult& want) {
  EXPECT_EQ(got.arm, want.arm);
  EXPECT_EQ(got.experiment, want.experiment);
  EXPECT_EQ(got.status, want.status);
  EXPECT_EQ(got.failure, want.failure);
  EXPECT_EQ(got.config_yaml, want.config_yaml);
  EXPECT_EQ(got.config_hash, want.config_hash);
  EXPECT_EQ(got.provenance.ptqlab_version, want.provenance.ptqlab_version);
  EXPECT_EQ(got.provenance.git_revision, want.provenance.git_revision);
  EXPECT_EQ(got.provenance.library_versions, want.provenance.library_versions);
  EXPECT_EQ(got.provenance.host, want.provenance.host);
  EXPECT_EQ(got.provenance.start_time, want.provenance.start_time);
  EXPECT_EQ(got.provenance.end_time, want.provenance.end_time);
  EXPECT_EQ(got.provenance.seeds, want.provenance.seeds);
  EXPECT_EQ(got.calibration_tokens, want.calibration_tokens);
  EXPECT_EQ(got.calibration_nsamples, want.calibration_nsamples);
  EXPECT_EQ(got.calibration_seq_len, want.calibration_seq_len);

  // metrics: same keys at every level, values bit for bit.
  ASSERT_EQ(got.metrics.size(), want.metrics.size());
  for (const auto& [evaluator, datasets] : want.metrics) {
    ASSERT_TRUE(got.metrics.count(evaluator)) << evaluator;
    const auto& gd = got.metrics.at(evaluator);
    ASSERT_EQ(gd.size(), datasets.size()) << evaluator;
    for (const auto& [dataset, values] : datasets) {
      ASSERT_TRUE(gd.count(dataset)) << evaluator << "/" << dataset;
      const auto& gv = gd.at(dataset);
      ASSERT_EQ(gv.size(), values.size()) << evaluator << "/" << dataset;
      for (const auto& [name, value] : values) {
        ASSERT_TRUE(gv.count(name)) << evaluator << "/" << dataset << " " << name;
        EXPECT_SAME(gv.at(name), value) << " metric " << evaluator << "/" << dataset << "/" << name;
      }
    }
  }

  ASSERT_EQ(got.linears.size(), want.linears.size());
  for (std::size_t i = 0; i < want.linears.size(); ++i) {
    SCOPED_TRACE("linear " + std::to_string(i));
    const auto& g = got.linears[i];
    const auto& w = want.linears[i];
    EXPECT_EQ(g.layer, w.layer);
    EXPECT_EQ(g.linear, w.linear);
    EXPECT_SAME(g.weight_error, w.weight_error);
    EXPECT_SAME(g.output_error, w.output_error);
    EXPECT_SAME(g.seconds, w.seconds);
    expect_same_bits(g.bits, w.bits, "bits");
  }
  expect_same_bits(got.total_bits, want.total_bits, "total_bits");

  ASSERT_EQ(got.tensors.size(), want.tensors.size());
  for (std::size_t i = 0; i < want.tensors.size(); ++i) {
    SCOPED_TRACE("tensor " + want.tensors[i].path);
    EXPECT_EQ(got.tensors[i].path, want.tensors[i].path);
    EXPECT_EQ(got.tensors[i].shape, want.tensors[i].shape);
    ASSERT_EQ(got.tensors[i].data.size(), want.tensors[i].data.size());
    for (std::size_t j = 0; j < want.tensors[i].data.size(); ++j) EXPECT_SAME(got.tensors[i].data[j], want.tensors[i].data[j]);
  }
  ASSERT_EQ(got.series.size(), want.series.size());
  for (std::size_t i = 0; i < want.series.size(); ++i) {
    SCOPED_TRACE("series " + want.series[i].path);
    EXPECT_EQ(got.series[i].path, want.series[i].path);
    ASSERT_EQ(got.series[i].values.size(), want.series[i].values.size());
    for (std::size_t j = 0; j < want.series[i].values.size(); ++j) EXPECT_SAME(got.series[i].values[j], want.series[i].values[j]);
  }
  EXPECT_SAME(got.seconds, want.seconds);
}

// ---------------------------------------------------------------------------------------------
// Files and commands.

std::set<std::string> dir_entries(const fs::path& dir) {
  std::set<std::string> names;
  for (const auto& e : fs::directory_iterator(dir)) names.insert(e.path().filename().string());
  return names;
}

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

bool have_h5dump() { return test::run_shell("command -v h5dump").exit_code == 0; }

// Overwrites the value of a scalar 4-byte root attribute in place. The files use HDF5's default
// (earliest) format: version-1 object headers without checksums, and version-1 attribute messages
// laid out as version(1) reserved(1) name_size(2) datatype_size(2) dataspace_size(2), then the
// name, the datatype and the dataspace, each padded to 8 bytes, then the value. `new_name`, when
// given, renames the attribute (same length). Returns false when the attribute was not found.
bool patch_attribute(const fs::path& file, const std::string& name, std::int32_t value,
                     const std::string& new_name = "") {
  std::string bytes = test::read_file(file);
  const std::string key(name.c_str(), name.size() + 1);  // with its NUL
  auto pad8 = [](std::size_t n) { return (n + 7) / 8 * 8; };
  auto u16 = [&](std::size_t at) {
    return static_cast<std::size_t>(static_cast<unsigned char>(bytes[at])) |
           static_cast<std::size_t>(static_cast<unsigned char>(bytes[at + 1])) << 8;
  };
  for (auto at = bytes.find(key); at != std::string::npos; at = bytes.find(key, at + 1)) {
    if (at < 8) continue;
    const std::size_t h = at - 8;
    if (bytes[h] != 1 || u16(h + 2) != key.size()) continue;
    const std::size_t value_at = at + pad8(u16(h + 2)) + pad8(u16(h + 4)) + pad8(u16(h + 6));
    if (value_at + 4 > bytes.size()) return false;
    std::memcpy(&bytes[value_at], &value, 4);  // little-endian host, I32LE in the file
    if (!new_name.empty()) {
      if (new_name.size() != name.size()) return false;
      std::memcpy(&bytes[at], new_name.data(), new_name.size());
    }
    write_bytes(file, bytes);
    return true;
  }
  return false;
}

// Expects read_config_hash to say "no" and read_arm_result to throw an Error naming the file and
// containing `why`.
void expect_rejected(const fs::path& file, const std::string& why) {
  SCOPED_TRACE(file.string());
  EXPECT_EQ(read_config_hash(file), std::nullopt);
  try {
    read_arm_result(file);
    ADD_FAILURE() << "read_arm_result accepted " << file;
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(file.string() + ": ", 0), 0u) << msg;
    EXPECT_NE(msg.find(why), std::string::npos) << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  }
}

// Expects write_arm_result to throw an Error naming the file and containing `why`, and to leave
// nothing in the directory that was not there before.
void expect_write_rejected(const fs::path& file, const ArmResult& r, const std::string& why) {
  const auto before = dir_entries(file.parent_path());
  try {
    write_arm_result(file, r);
    ADD_FAILURE() << "write_arm_result accepted a result that should fail with: " << why;
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(file.string() + ": cannot write result: ", 0), 0u) << msg;
    EXPECT_NE(msg.find(why), std::string::npos) << msg;
  }
  EXPECT_EQ(dir_entries(file.parent_path()), before);
}

// ---------------------------------------------------------------------------------------------
// Round trips.

TEST(Results, RoundTripsEveryFieldExactly) {
  TempDir dir;
  const fs::path file = dir.path() / "ptq161.h5";
  const ArmResult want = rich_result("ptq161");
  write_arm_result(file, want);
  EXPECT_EQ(dir_entries(dir.path()), std::set<std::string>{"ptq161.h5"});  // no temporary file left

  const ArmResult got = read_arm_result(file);
  expect_equal(got, want);
  ASSERT_EQ(got.linears.size(), 4u);
  EXPECT_TRUE(std::isnan(got.linears[1].output_error));
  EXPECT_EQ(read_config_hash(file), want.config_hash);
}

TEST(Results, RoundTripsEmptyResultAndEmptyCalibration) {
  TempDir dir;
  const fs::path file = dir.path() / "minimal.h5";
  const ArmResult want = minimal_result("minimal");
  write_arm_result(file, want);
  expect_equal(read_arm_result(file), want);

  // A failed arm; calibration shape recorded without the token ids.
  ArmResult failed = minimal_result("failed");
  failed.status = "failed";
  failed.failure = "model.safetensors: tensor 'x': NaN at index 3 — «abandon»";
  failed.calibration_nsamples = 128;
  failed.calibration_seq_len = 2048;
  failed.provenance.seeds = {{"calibration", 0}};
  failed.metrics["perplexity"] = {};
  write_arm_result(file, failed);  // replaces the previous file
  expect_equal(read_arm_result(file), failed);
  EXPECT_EQ(dir_entries(dir.path()), std::set<std::string>{"minimal.h5"});
}

TEST(Results, RelativePathInCurrentDirectory) {
  TempDir dir;
  const fs::path old_cwd = fs::current_path();
  fs::current_path(dir.path());
  const ArmResult want = minimal_result("rel");
  EXPECT_NO_THROW(write_arm_result("rel.h5", want));
  expect_equal(read_arm_result("rel.h5"), want);
  fs::current_path(old_cwd);
  EXPECT_EQ(dir_entries(dir.path()), std::set<std::string>{"rel.h5"});
}

TEST(Results, H5dumpReadsEveryFile) {
  if (!have_h5dump()) FAIL() << "h5dump not found on PATH: install Debian's hdf5-tools (scripts/setup does)";
  TempDir dir;
  const fs::path rich = dir.path() / "rich.h5";
  const fs::path minimal = dir.path() / "minimal.h5";
  write_arm_result(rich, rich_result("rich"));
  write_arm_result(minimal, minimal_result("minimal"));
  for (const auto& [file, hash] : {std::pair{rich, rich_result("rich").config_hash},
                                   std::pair{minimal, minimal_result("minimal").config_hash}}) {
    const auto r = test::run_shell("h5dump '" + file.string() + "'");
    EXPECT_EQ(r.exit_code, 0) << r.output;
    EXPECT_NE(r.output.find(hash), std::string::npos) << r.output;
    EXPECT_NE(r.output.find("ATTRIBUTE \"complete\""), std::string::npos) << r.output;
  }
  const auto r = test::run_shell("h5dump -d /calibration/token_ids '" + rich.string() + "'");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("DATASPACE  SIMPLE { ( 3, 5 ) / ( 3, 5 ) }"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("2147483647"), std::string::npos) << r.output;
}

TEST(Results, Hdf5VersionIsReported) {
  EXPECT_TRUE(std::regex_match(hdf5_version(), std::regex(R"(\d+\.\d+\.\d+)"))) << hdf5_version();
}

// ---------------------------------------------------------------------------------------------
// Invalid results are rejected before anything is written.

TEST(Results, BadTensorAndSeriesPathsAreRejected) {
  TempDir dir;
  const fs::path file = dir.path() / "bad.h5";
  const std::vector<std::pair<std::string, std::string>> bad = {
      {"", "is empty"},
      {"/abs/w", "starts with '/'"},
      {"a//b", "empty component"},
      {"a/b/", "empty component"},
      {"a/../b", "'..' component"},
      {"..", "'..' component"},
      {"../outside", "'..' component"},
      {"a/./b", "'.' component"},
      {std::string("a\0b", 3), "NUL"},
  };
  for (const auto& [path, why] : bad) {
    SCOPED_TRACE("path '" + path + "'");
    ArmResult t = minimal_result("bad");
    t.tensors.push_back({path, {2}, {1, 2}});
    expect_write_rejected(file, t, why);
    ArmResult s = minimal_result("bad");
    s.series.push_back({path, {1.0}});
    expect_write_rejected(file, s, why);
  }
  ArmResult dup = minimal_result("bad");
  dup.tensors = {{"a/w", {1}, {1}}, {"a/w", {1}, {2}}};
  expect_write_rejected(file, dup, "duplicate tensor path 'a/w'");
  ArmResult nested = minimal_result("bad");
  nested.series = {{"a/b", {1}}, {"a/b/c", {2}}};
  expect_write_rejected(file, nested, "series path 'a/b/c' is inside series path 'a/b'");
  EXPECT_TRUE(dir_entries(dir.path()).empty());
}

TEST(Results, InconsistentResultsAreRejected) {
  TempDir dir;
  const fs::path file = dir.path() / "bad.h5";
  ArmResult r = minimal_result("bad");
  r.tensors = {{"w", {2, 3}, {1, 2, 3}}};
  expect_write_rejected(file, r, "tensor 'w' has 3 values for a shape of 6 elements");
  r = minimal_result("bad");
  r.tensors = {{"w", {-1}, {}}};
  expect_write_rejected(file, r, "negative dimension");
  r = minimal_result("bad");
  r.calibration_nsamples = 2;
  r.calibration_seq_len = 3;
  r.calibration_tokens = {1, 2, 3};
  expect_write_rejected(file, r, "calibration has 3 token ids");
  r = minimal_result("bad");
  r.config_yaml = std::string("a: 1\0b: 2", 9);
  expect_write_rejected(file, r, "config_yaml contains a NUL byte");
  r = minimal_result("bad");
  r.metrics["ppl"]["wiki/text"]["ppl"] = 1;
  expect_write_rejected(file, r, "'wiki/text' contains '/'");
  r = minimal_result("bad");
  r.metrics["ppl"]["wiki"][""] = 1;
  expect_write_rejected(file, r, "is empty");
}

// ---------------------------------------------------------------------------------------------
// Atomicity and damaged files.

TEST(ResultsAtomicity, MissingDirectoryThrowsAndLeavesNothing) {
  TempDir dir;
  const fs::path file = dir.path() / "no" / "such" / "dir" / "arm.h5";
  try {
    write_arm_result(file, rich_result("arm"));
    FAIL() << "no error";
  } catch (const Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.rfind(file.string() + ": cannot write result: ", 0), 0u) << msg;
    EXPECT_NE(msg.find("no such directory"), std::string::npos) << msg;
  }
  EXPECT_TRUE(dir_entries(dir.path()).empty());
  EXPECT_FALSE(fs::exists(file));
}

TEST(ResultsAtomicity, MissingGarbageEmptyAndTruncatedFilesAreRejected) {
  TempDir dir;
  expect_rejected(dir.path() / "absent.h5", "no such result file");

  const fs::path garbage = dir.path() / "garbage.h5";
  std::string junk;
  for (int i = 0; i < 5000; ++i) junk.push_back(static_cast<char>((i * 7919 + 13) % 251));
  write_bytes(garbage, junk);
  expect_rejected(garbage, "not an HDF5 file");

  const fs::path empty = dir.path() / "empty.h5";
  write_bytes(empty, "");
  expect_rejected(empty, "not an HDF5 file");

  expect_rejected(dir.path(), "not a regular file");

  const fs::path good = dir.path() / "good.h5";
  write_arm_result(good, rich_result("good"));
  const std::string bytes = test::read_file(good);
  ASSERT_GT(bytes.size(), 1000u);
  const fs::path half = dir.path() / "half.h5";
  write_bytes(half, bytes.substr(0, bytes.size() / 2));
  expect_rejected(half, "");

  // A valid HDF5 signature followed by garbage.
  const fs::path head = dir.path() / "head.h5";
  write_bytes(head, bytes.substr(0, 8) + junk);
  expect_rejected(head, "");

  // The damaged files did not disturb the good one.
  EXPECT_EQ(read_config_hash(good), rich_result("good").config_hash);
}

TEST(ResultsAtomicity, IncompleteFilesAndOtherSchemaVersionsAreRejected) {
  TempDir dir;
  const ArmResult r = minimal_result("arm");  // no text containing "complete" or "schema_version"

  const fs::path zero = dir.path() / "zero.h5";
  write_arm_result(zero, r);
  ASSERT_TRUE(patch_attribute(zero, "complete", 0));
  expect_rejected(zero, "incomplete result file");

  const fs::path missing = dir.path() / "missing.h5";
  write_arm_result(missing, r);
  ASSERT_TRUE(patch_attribute(missing, "complete", 1, "xomplete"));
  expect_rejected(missing, "incomplete result file");

  const fs::path v2 = dir.path() / "v2.h5";
  write_arm_result(v2, r);
  ASSERT_TRUE(patch_attribute(v2, "schema_version", kResultSchemaVersion + 1));
  expect_rejected(v2, "schema_version " + std::to_string(kResultSchemaVersion + 1));

  // The patching itself leaves a readable file when the value is right.
  const fs::path same_file = dir.path() / "same.h5";
  write_arm_result(same_file, r);
  ASSERT_TRUE(patch_attribute(same_file, "complete", 1));
  expect_equal(read_arm_result(same_file), r);
}

TEST(ResultsAtomicity, DiskFullLeavesNothingBehind) {
  TempDir dir;
  const fs::path previous = dir.path() / "previous.h5";
  write_arm_result(previous, rich_result("previous"));
  const fs::path target = dir.path() / "big.h5";
  ArmResult big = minimal_result("big");
  big.tensors.push_back({"layer0/q_proj/w", {1024, 1024}, std::vector<float>(1 << 20, 0.25f)});

  int fds[2];
  ASSERT_EQ(::pipe(fds), 0);
  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    // The child: files may not grow past 64 KiB; writing past it fails with EFBIG instead of
    // killing the process.
    ::close(fds[0]);
    ::signal(SIGXFSZ, SIG_IGN);
    const rlimit limit{64 * 1024, 64 * 1024};
    if (::setrlimit(RLIMIT_FSIZE, &limit) != 0) ::_exit(10);
    int code = 0;
    std::string msg = "no error";
    try {
      write_arm_result(target, big);
    } catch (const Error& e) {
      msg = e.what();
      code = 3;
    } catch (const std::exception& e) {
      msg = std::string("not a ptqlab::Error: ") + e.what();
      code = 4;
    }
    if (::write(fds[1], msg.data(), msg.size()) < 0) code = 11;
    ::_exit(code);
  }
  ::close(fds[1]);
  std::string msg;
  char buf[1024];
  ssize_t n;
  while ((n = ::read(fds[0], buf, sizeof buf)) > 0) msg.append(buf, static_cast<std::size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status)) << "child died: status " << status;
  EXPECT_EQ(WEXITSTATUS(status), 3) << msg;
  EXPECT_EQ(msg.rfind(target.string() + ": cannot write result: ", 0), 0u) << msg;
  EXPECT_NE(msg.find("File too large"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(target));
  EXPECT_EQ(dir_entries(dir.path()), std::set<std::string>{"previous.h5"});  // no temporary file
  expect_equal(read_arm_result(previous), rich_result("previous"));

  // Without the limit the same result is written and read back.
  write_arm_result(target, big);
  expect_equal(read_arm_result(target), big);
}

// ---------------------------------------------------------------------------------------------
// ResultWriter.

TEST(ResultsWriter, ConcurrentSubmitsFromFourThreadsAllLand) {
  TempDir dir;
  auto file = [&](int k) { return dir.path() / ("arm" + std::to_string(k) + ".h5"); };
  auto result = [](int k) {
    ArmResult r = rich_result("arm" + std::to_string(k));
    r.seconds = k;
    r.config_hash = "hash-" + std::to_string(k);
    return r;
  };
  std::vector<std::future<void>> futures(20);
  {
    ResultWriter writer;
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&, t] {
        for (int i = 0; i < 5; ++i) futures[t * 5 + i] = writer.submit(file(t * 5 + i), result(t * 5 + i));
      });
    }
    // Meanwhile another thread reads whatever has landed (the HDF5 lock keeps this safe).
    std::thread reader([&] {
      for (int round = 0; round < 50; ++round) {
        for (int k = 0; k < 20; ++k) {
          const auto h = read_config_hash(file(k));
          if (h) {
            EXPECT_EQ(*h, "hash-" + std::to_string(k));
          }
        }
      }
    });
    for (auto& t : threads) t.join();
    reader.join();
    for (auto& f : futures) EXPECT_NO_THROW(f.get());
  }
  for (int k = 0; k < 20; ++k) expect_equal(read_arm_result(file(k)), result(k));
  EXPECT_EQ(dir_entries(dir.path()).size(), 20u);
}

TEST(ResultsWriter, FailureArrivesThroughTheFutureAndLaterWritesWork) {
  TempDir dir;
  ResultWriter writer;
  const fs::path bad = dir.path() / "missing-dir" / "a.h5";
  auto f_bad = writer.submit(bad, minimal_result("a"));
  auto f_good = writer.submit(dir.path() / "b.h5", minimal_result("b"));
  try {
    f_bad.get();
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(bad.string()), std::string::npos) << e.what();
  }
  EXPECT_NO_THROW(f_good.get());
  EXPECT_NO_THROW(writer.submit(dir.path() / "c.h5", minimal_result("c")).get());
  expect_equal(read_arm_result(dir.path() / "b.h5"), minimal_result("b"));
  expect_equal(read_arm_result(dir.path() / "c.h5"), minimal_result("c"));
  EXPECT_EQ(dir_entries(dir.path()), (std::set<std::string>{"b.h5", "c.h5"}));
}

TEST(ResultsWriter, DestructorDrainsTheQueue) {
  TempDir dir;
  auto file = [&](int k) { return dir.path() / fmt::format("q{}.h5", k); };
  {
    ResultWriter writer;
    for (int k = 0; k < 8; ++k) writer.submit(file(k), rich_result("q"));
  }
  for (int k = 0; k < 8; ++k) expect_equal(read_arm_result(file(k)), rich_result("q"));
}

}  // namespace
}  // namespace ptqlab
