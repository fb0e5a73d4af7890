// SIGTERM (what Slurm sends before a time limit): a real `ptqlab run` stops at the next safe point,
// writes nothing for the unfinished arm, keeps finished ones, exits 75, and the rerun resumes
// without recomputing finished arms. Plus the in-process safe points (perplexity batches, arms
// not started).
#include <gtest/gtest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <map>
#include <thread>

#include <fmt/format.h>

#include "ptqlab/engine/experiment.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/engine/runner.hpp"
#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/model/model.hpp"
#include "ptqlab/outputs/results.hpp"
#include "ptqlab/support/stop.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

namespace fs = std::filesystem;

// fp, then a slow arm (test-slow: 80 ms per linear, 35 linears), then sign; one arm at a time.
std::string experiment_yaml(const fs::path& marker) {
  test::SmallExperiment e;
  e.name = "sigterm-test";
  e.nsamples = 4;
  e.seq_len = 64;
  e.eval_seq_len = 128;
  e.max_windows = 2;
  e.arms = "  - name: fp\n"
           "    quantizer: fp\n"
           "  - name: slow\n"
           "    quantizer: {name: test-slow, params: {ms: 80, marker: " + marker.string() + "}}\n"
           "  - name: sign\n"
           "    quantizer: sign\n";
  return e.yaml();
}

// Result-looking files (*.h5 not starting with '.') in dir.
std::vector<std::string> result_files(const fs::path& dir) {
  std::vector<std::string> names;
  if (!fs::exists(dir)) return names;
  for (const auto& f : fs::directory_iterator(dir))
    if (f.path().extension() == ".h5" && f.path().filename().string()[0] != '.') names.push_back(f.path().stem());
  std::sort(names.begin(), names.end());
  return names;
}

TEST(Sigterm, RealRunStopsCleanlyAndResumes) {
  test::TempDir dir;
  const fs::path marker = dir.path() / "slow-started";
  const fs::path yaml = dir.path() / "exp.yaml";
  std::ofstream(yaml) << experiment_yaml(marker);
  const fs::path out = dir.path() / "out";
  const fs::path log = dir.path() / "run.log";
  const std::string plugins = (fs::path(PTQLAB_TEST_PLUGINS) / "good").string();

  const pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    const int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    ::execl(PTQLAB_BINARY, PTQLAB_BINARY, "run", yaml.c_str(), "--out", out.c_str(), "--jobs", "1", "--no-cache",
            "--plugin-path", plugins.c_str(), nullptr);
    ::_exit(127);
  }
  // Once the slow arm is inside its first layer, SIGTERM (it has about 2.7 s of work left).
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (!fs::exists(marker) && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  ASSERT_TRUE(fs::exists(marker)) << "the slow arm never started:\n" << test::read_file(log);
  ::kill(pid, SIGTERM);
  int status = 0;
  ::waitpid(pid, &status, 0);
  const std::string output = test::read_file(log);
  ASSERT_TRUE(WIFEXITED(status)) << "killed by signal " << WTERMSIG(status) << "\n" << output;
  EXPECT_EQ(WEXITSTATUS(status), kExitStopped) << output;
  EXPECT_NE(output.find("[slow] STOPPED (SIGTERM) during quantize layer 1/5: no result written"), std::string::npos)
      << output;
  EXPECT_NE(output.find("ptqlab: stopped by SIGTERM:"), std::string::npos) << output;
  EXPECT_NE(output.find("slow (stopped during quantize layer 1/5)"), std::string::npos) << output;
  EXPECT_NE(output.find("rerun the same command to resume"), std::string::npos) << output;

  // Nothing that looks complete for the stopped arm; what is there is complete; no temporaries.
  const auto kept = result_files(out);
  EXPECT_EQ(std::count(kept.begin(), kept.end(), "slow"), 0) << output;
  for (const auto& name : kept) EXPECT_EQ(read_arm_result(out / (name + ".h5")).status, "ok") << name;
  for (const auto& f : fs::directory_iterator(out))
    EXPECT_FALSE(f.is_regular_file() && f.path().filename().string()[0] == '.') << "left behind: " << f.path();
  std::map<std::string, std::string> before;
  for (const auto& name : kept) before[name] = test::read_file(out / (name + ".h5"));

  // The rerun: finished arms cached and untouched, the rest computed.
  fs::remove(marker);
  const auto r = test::run_ptqlab("run " + yaml.string() + " --out " + out.string() + " --jobs 1 --no-cache --plugin-path " +
                                  plugins);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find(fmt::format("3 arms: {} run, {} already done, 0 failed, 0 stopped", 3 - kept.size(), kept.size())),
            std::string::npos)
      << r.output;
  EXPECT_EQ(result_files(out), (std::vector<std::string>{"fp", "sign", "slow"}));
  for (const auto& [name, bytes] : before) EXPECT_EQ(test::read_file(out / (name + ".h5")), bytes) << name << " was recomputed";
  EXPECT_EQ(read_arm_result(out / "slow.h5").status, "ok");
}

// In process: a stop request skips the remaining perplexity batches and throws Stopped; a run that
// is asked to stop before its arms start writes nothing and reports every arm as stopped.
TEST(Sigterm, SafePointsInProcess) {
  const LlamaModel model = load_model(test::model_dir("stories260K"));
  std::vector<int> stream(4096, 5);
  PerplexityOptions po;
  po.seq_len = 128;
  po.show_progress = false;
  EXPECT_NO_THROW(evaluate_perplexity(model, stream, po));
  request_stop();
  EXPECT_THROW(evaluate_perplexity(model, stream, po), Stopped);

  test::TempDir dir;
  const fs::path yaml = dir.path() / "exp.yaml";
  std::ofstream(yaml) << experiment_yaml(dir.path() / "marker");
  PluginRegistry registry;
  registry.add_search_path(PluginRegistry::default_plugin_dir());
  registry.add_search_path(fs::path(PTQLAB_TEST_PLUGINS) / "good");
  RunOptions o;
  o.out_dir = dir.path() / "out";
  const auto report = run_experiment(load_experiment(yaml, registry), registry, o);
  clear_stop_request();
  EXPECT_EQ(report.stopped(), 3);
  for (const auto& a : report.arms) EXPECT_EQ(a.message, "not started") << a.arm;
  EXPECT_TRUE(result_files(o.out_dir).empty());
  EXPECT_NE(format_results_table(report).find("stopped"), std::string::npos);
}

}  // namespace
}  // namespace ptqlab
