// Replays every input under tests/data/fuzz-regressions/TARGET/ through the fuzz target's entry
// point (fuzz/TARGET_fuzz.cpp), in the ordinary build: each file once crashed a fuzzer, hung it or
// broke an invariant (docs/testing.md). A target that crashes fails the test process; a target
// returns 0 for every input it survives.
#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <vector>

#include "fuzz_target.hpp"

PTQLAB_FUZZ_DECLARE(safetensors);
PTQLAB_FUZZ_DECLARE(config);
PTQLAB_FUZZ_DECLARE(experiment);
PTQLAB_FUZZ_DECLARE(results_h5);

namespace {

namespace fs = std::filesystem;
using Target = int (*)(const std::uint8_t*, std::size_t);

// Runs every file of the target's directory; returns how many there were.
int replay(const std::string& name, Target target) {
  const fs::path dir = fs::path(PTQLAB_TEST_DATA) / "fuzz-regressions" / name;
  std::vector<fs::path> files;
  if (fs::is_directory(dir))
    for (const auto& e : fs::directory_iterator(dir))
      if (e.is_regular_file() && e.path().filename().string().front() != '.') files.push_back(e.path());
  std::sort(files.begin(), files.end());
  for (const auto& f : files) {
    SCOPED_TRACE(f.string());
    std::ifstream in(f, std::ios::binary);
    const std::vector<char> bytes{std::istreambuf_iterator<char>(in), {}};
    EXPECT_EQ(target(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size()), 0);
  }
  return static_cast<int>(files.size());
}

TEST(FuzzRegressions, Safetensors) { replay("safetensors", ptqlab_fuzz_safetensors); }
TEST(FuzzRegressions, Config) { replay("config", ptqlab_fuzz_config); }
TEST(FuzzRegressions, Experiment) { replay("experiment", ptqlab_fuzz_experiment); }
TEST(FuzzRegressions, ResultsH5) { replay("results_h5", ptqlab_fuzz_results_h5); }

// The targets accept what they should: an empty input is handled, and the unedited result file
// (the results target's empty edit program) reads back.
TEST(FuzzRegressions, TargetsRunOnTrivialInputs) {
  const std::uint8_t none = 0;
  EXPECT_EQ(ptqlab_fuzz_safetensors(&none, 0), 0);
  EXPECT_EQ(ptqlab_fuzz_config(&none, 0), 0);
  EXPECT_EQ(ptqlab_fuzz_experiment(&none, 0), 0);
  EXPECT_EQ(ptqlab_fuzz_results_h5(&none, 0), 0);
}

}  // namespace
