// ptqlab sweep --slurm --submit on a real single-node Slurm cluster (scripts/slurm-cluster): a
// reduced quickstart sweep runs as a job array, the afterok report job writes the table, a rerun
// submits nothing; a task stopped with SIGTERM exits 75 and only its arm is resubmitted.
// Skipped (with the reason) when not root or when Slurm cannot be installed or started.
// Labelled "slurm" in ctest (ctest -L slurm / -LE slurm).
#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <regex>
#include <thread>

#include <fmt/format.h>

#include "ptqlab/outputs/results.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

std::string replace_once(std::string s, const std::string& from, const std::string& to) {
  const auto at = s.find(from);
  if (at == std::string::npos) throw std::runtime_error("experiments/quickstart.yaml has no '" + from + "' any more");
  return s.replace(at, from.size(), to);
}

// The Slurm state of a job (array: the first task's line is enough for a single job), "" when
// Slurm no longer knows it.
std::string job_state(const std::string& job) {
  const auto r = test::run_shell("scontrol show job -o " + job);
  std::smatch m;
  if (r.exit_code != 0 || !std::regex_search(r.output, m, std::regex(R"(JobState=(\w+))"))) return "";
  return m[1];
}

// Waits until `job` leaves the queue; returns its final state.
std::string wait_for_job(const std::string& job, int seconds) {
  const auto deadline = Clock::now() + std::chrono::seconds(seconds);
  std::string state;
  while (Clock::now() < deadline) {
    state = job_state(job);
    if (state != "PENDING" && state != "RUNNING" && state != "CONFIGURING" && state != "COMPLETING") return state;
    std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  return "TIMEOUT-IN-TEST (last state " + state + ")";
}

// Starts the cluster for the test suite (skipping the test when that is impossible) and stops it
// afterwards, unless it was already running.
class SlurmCluster : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (::geteuid() != 0) {
      skip_reason_ = "needs root: scripts/slurm-cluster runs munged, slurmctld and slurmd as root";
      return;
    }
    was_running_ = test::run_shell(script() + " status").exit_code == 0;
    const auto start = test::run_shell(script() + " start");
    if (start.exit_code != 0) {
      skip_reason_ = fmt::format("could not install or start Slurm (scripts/slurm-cluster start exited {}): {}",
                                 start.exit_code, start.output);
      return;
    }
    started_ = !was_running_;
    const auto env = test::run_shell(script() + " env");
    const auto conf = env.output.substr(env.output.find('=') + 1);
    ::setenv("SLURM_CONF", conf.substr(0, conf.find('\n')).c_str(), 1);
  }
  static void TearDownTestSuite() {
    if (started_) test::run_shell(script() + " stop");
  }
  void SetUp() override {
    if (!skip_reason_.empty()) GTEST_SKIP() << skip_reason_;
  }
  static std::string script() { return (fs::path(PTQLAB_SOURCE_DIR) / "scripts" / "slurm-cluster").string(); }

  // experiments/quickstart.yaml with fewer calibration windows and eval windows, so the four
  // arms take seconds; `extra_arms` are appended.
  static fs::path quickstart(const fs::path& dir, const std::string& extra_arms = "") {
    std::string text = test::read_file(fs::path(PTQLAB_SOURCE_DIR) / "experiments" / "quickstart.yaml");
    for (std::size_t at; (at = text.find("../../shared")) != std::string::npos;)
      text.replace(at, 12, test::shared_dir().string());
    text = replace_once(text, "nsamples: 128", "nsamples: 16");
    text = replace_once(text, "seq_len: 512", "seq_len: 128");
    text = replace_once(text, "    datasets:", "    params: {max_windows: 4}\n    datasets:");
    const fs::path yaml = dir / "quickstart.yaml";
    std::ofstream(yaml) << text << extra_arms;
    return yaml;
  }

  static inline std::string skip_reason_;
  static inline bool was_running_ = false;
  static inline bool started_ = false;
};

TEST_F(SlurmCluster, QuickstartSweepReportsAndResubmitsNothing) {
  test::TempDir dir;
  const fs::path yaml = quickstart(dir.path());
  const fs::path out = dir.path() / "out";
  const auto t0 = Clock::now();
  const auto r = test::run_ptqlab("sweep " + yaml.string() + " --slurm --submit --out " + out.string() +
                                  " --time 10 --throttle 2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.output, m, std::regex(R"(submitted array job (\d+) \(4 tasks\) and report job (\d+))")))
      << r.output;
  const std::string array_job = m[1], report_job = m[2];
  const std::string state = wait_for_job(report_job, 600);
  const double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  std::string logs;
  if (fs::exists(out / "slurm" / "logs"))
    for (const auto& f : fs::directory_iterator(out / "slurm" / "logs")) logs += f.path().string() + ":\n" + test::read_file(f.path());
  ASSERT_EQ(state, "COMPLETED") << "report job " << report_job << "\n" << logs;
  std::cout << fmt::format("array job {} + report job {}: done in {:.1f}s\n", array_job, report_job, seconds);

  // Every arm: its own complete result file, its own log.
  const std::string report = test::read_file(out / "report.md");
  for (const auto& [i, arm] : std::vector<std::pair<int, std::string>>{{0, "fp"}, {1, "rtn-bits4"}, {2, "rtn-bits3"}, {3, "rtn-bits2"}}) {
    const ArmResult result = read_arm_result(out / (arm + ".h5"));
    EXPECT_EQ(result.status, "ok") << arm;
    const double ppl = result.metrics.at("perplexity").at("tinystories").at("ppl");
    EXPECT_TRUE(std::isfinite(ppl)) << arm;
    EXPECT_NE(test::read_file(out / "slurm" / "logs" / fmt::format("{}_{}.out", array_job, i)).find("arm " + arm + " on "),
              std::string::npos)
        << arm << "\n" << logs;
    // The report's row for the arm shows its perplexity (2 decimals, maybe bold).
    std::smatch row;
    ASSERT_TRUE(std::regex_search(report, row, std::regex("\\| " + std::regex_replace(arm, std::regex("-"), "\\-") + " \\|[^\n]*")))
        << arm << "\n" << report;
    EXPECT_NE(row.str().find(fmt::format("{:.2f}", ppl)), std::string::npos) << row.str();
  }
  EXPECT_NE(test::read_file(out / "report.csv").find("rtn-bits2"), std::string::npos);

  // A rerun finds every result and submits nothing.
  const auto again = test::run_ptqlab("sweep " + yaml.string() + " --slurm --submit --out " + out.string());
  ASSERT_EQ(again.exit_code, 0) << again.output;
  EXPECT_NE(again.output.find("nothing to submit"), std::string::npos) << again.output;
  const std::string submissions = test::read_file(out / "slurm" / "submissions.tsv");
  EXPECT_EQ(std::count(submissions.begin(), submissions.end(), '\n'), 2) << submissions;  // header + one
}

// SIGTERM to a running task's batch shell (as Slurm does before a time limit): ptqlab stops
// cleanly with exit 75, the afterok report job is cancelled, and the rerun submits only that arm.
TEST_F(SlurmCluster, SigtermedTaskIsResubmittedAlone) {
  test::TempDir dir;
  const fs::path marker = dir.path() / "slow-started";
  const fs::path yaml = quickstart(dir.path(), "  - name: slow\n    quantizer: {name: test-slow, params: {ms: 300, marker: " +
                                                   marker.string() + "}}\n");
  const fs::path out = dir.path() / "out";
  const std::string plugins = " --plugin-path " + (fs::path(PTQLAB_TEST_PLUGINS) / "good").string();
  const std::string sweep = "sweep " + yaml.string() + " --slurm --submit --out " + out.string() + plugins;
  auto r = test::run_ptqlab(sweep + " --throttle 1");  // one task at a time: fp, rtn-bits4/3/2, then slow
  ASSERT_EQ(r.exit_code, 0) << r.output;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(r.output, m, std::regex(R"(submitted array job (\d+) \(5 tasks\) and report job (\d+))")))
      << r.output;
  const std::string array_job = m[1], report_job = m[2];
  const auto deadline = Clock::now() + std::chrono::seconds(600);
  while (!fs::exists(marker) && Clock::now() < deadline) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ASSERT_TRUE(fs::exists(marker)) << "the slow arm never started";
  const auto cancel = test::run_shell("scancel --batch --signal=TERM " + array_job + "_4");
  ASSERT_EQ(cancel.exit_code, 0) << cancel.output;
  EXPECT_EQ(wait_for_job(array_job + "_4", 300), "FAILED");
  const std::string task_log = test::read_file(out / "slurm" / "logs" / (array_job + "_4.out"));
  EXPECT_NE(task_log.find("[slow] STOPPED (SIGTERM) during quantize layer"), std::string::npos) << task_log;
  EXPECT_NE(task_log.find("ptqlab: stopped by SIGTERM"), std::string::npos) << task_log;
  EXPECT_NE(test::run_shell("scontrol show job -o " + array_job + "_4").output.find("ExitCode=75:0"), std::string::npos);
  EXPECT_FALSE(fs::exists(out / "slow.h5"));
  const std::string report_state = wait_for_job(report_job, 120);
  EXPECT_TRUE(report_state == "CANCELLED" || report_state.empty()) << report_state;  // --kill-on-invalid-dep
  EXPECT_FALSE(fs::exists(out / "report.md"));

  // The rerun submits the stopped arm alone (task 4) and a new report job.
  fs::remove(marker);
  r = test::run_ptqlab(sweep);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("arms to run (array 4): slow"), std::string::npos) << r.output;
  ASSERT_TRUE(std::regex_search(r.output, m, std::regex(R"(submitted array job (\d+) \(1 tasks\) and report job (\d+))")))
      << r.output;
  EXPECT_EQ(wait_for_job(m[2], 600), "COMPLETED") << test::read_file(out / "slurm" / "logs" / (std::string(m[1]) + "_4.out"));
  EXPECT_EQ(read_arm_result(out / "slow.h5").status, "ok");
  EXPECT_NE(test::read_file(out / "report.md").find("| slow |"), std::string::npos);
}

}  // namespace
}  // namespace ptqlab
