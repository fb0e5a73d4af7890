// Fault injection on real `ptqlab run` processes (docs/errors.md, "Fault injection"): SIGKILL at
// named points (PTQLAB_FAULT) and from outside once a result exists, then a rerun that must
// finish with every arm's result file valid (ptqlab and h5dump read it, its config hash is the
// arm's), no arm lost, none computed twice, finished files untouched. And a full disk while
// results are written: a file-size limit and, as root, a tiny tmpfs.
#include <gtest/gtest.h>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

#include "ptqlab/engine/experiment.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/outputs/results.hpp"
#include "ptqlab/support/error.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

namespace fs = std::filesystem;

// Four arms on the real stories260K (5 decoder layers, 7 linears each): fp, rtn at 4 and 2 bits
// from a sweep, sign. Small enough for seconds per arm.
std::string experiment_yaml() {
  test::SmallExperiment e;
  e.name = "fault-test";
  e.seed = 3;
  return e.yaml();
}

struct Workspace {
  test::TempDir dir;
  fs::path yaml = dir.path() / "exp.yaml";
  fs::path out = dir.path() / "out";
  std::map<std::string, std::string> hashes;  // arm -> config hash

  Workspace() {
    std::ofstream(yaml) << experiment_yaml();
    PluginRegistry registry;
    registry.add_search_path(PluginRegistry::default_plugin_dir());
    for (const auto& arm : load_experiment(yaml, registry).arms) hashes[arm.name] = arm.config_hash;
  }
  std::string run_args() const { return "run '" + yaml.string() + "' --out '" + out.string() + "' --jobs "; }

  // The result files that look finished (not dot files), by arm name.
  std::set<std::string> finished(const fs::path& where) const {
    std::set<std::string> arms;
    if (!fs::exists(where)) return arms;
    for (const auto& f : fs::directory_iterator(where)) {
      const auto name = f.path().filename().string();
      if (f.path().extension() == ".h5" && name[0] != '.') arms.insert(f.path().stem().string());
    }
    return arms;
  }

  // Every finished-looking file is a complete result of its arm: ptqlab reads it, h5dump reads
  // it, and both see the arm's config hash.
  void expect_valid(const fs::path& where) const {
    for (const auto& arm : finished(where)) {
      SCOPED_TRACE(arm);
      const fs::path file = where / (arm + ".h5");
      ASSERT_TRUE(hashes.count(arm)) << "a result file of no arm: " << file;
      ArmResult r;
      ASSERT_NO_THROW(r = read_arm_result(file));
      EXPECT_EQ(r.config_hash, hashes.at(arm));
      EXPECT_EQ(r.status, "ok");
      const auto dump = test::run_shell("h5dump -A '" + file.string() + "'");
      EXPECT_EQ(dump.exit_code, 0) << dump.output;
      EXPECT_NE(dump.output.find(hashes.at(arm)), std::string::npos) << dump.output;
    }
  }
};

// Runs `ptqlab run` in a child; returns its pid. `fault` goes into PTQLAB_FAULT when not empty.
pid_t start_run(const Workspace& s, int jobs, const std::string& fault) {
  const std::string jobs_text = std::to_string(jobs);
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int null = ::open("/dev/null", O_WRONLY);
    ::dup2(null, 1);
    ::dup2(null, 2);
    if (!fault.empty()) ::setenv("PTQLAB_FAULT", fault.c_str(), 1);
    ::execl(PTQLAB_BINARY, PTQLAB_BINARY, "run", s.yaml.c_str(), "--out", s.out.c_str(), "--jobs", jobs_text.c_str(),
            nullptr);
    ::_exit(127);
  }
  return pid;
}

// How a run is killed: at a fault point, or from outside once the first result file exists.
struct KillCase {
  const char* name;
  const char* fault;     // PTQLAB_FAULT, or "" for the outside kill
  int jobs;
  int finished_before;   // result files complete when it died (-1: depends on timing)
  bool leaves_temp;      // a complete temporary file is left behind
};

void PrintTo(const KillCase& c, std::ostream* os) { *os << c.name << " (PTQLAB_FAULT=" << c.fault << ")"; }

class KillAndResume : public ::testing::TestWithParam<KillCase> {};

TEST_P(KillAndResume, RerunCompletesEveryArmOnceAndKeepsFinishedFiles) {
  const KillCase& c = GetParam();
  Workspace s;
  const pid_t pid = start_run(s, c.jobs, c.fault);
  ASSERT_GT(pid, 0);
  if (std::string(c.fault).empty()) {
    // From outside, as a scheduler would: as soon as one result is there.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(300);
    while (s.finished(s.out).empty() && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    ASSERT_FALSE(s.finished(s.out).empty()) << "no result appeared";
    ::kill(pid, SIGKILL);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << "the run was not killed: status " << status;

  // What the killed run left: complete results only (and, killed just before a rename, a
  // temporary file nobody reads).
  const auto done = s.finished(s.out);
  if (c.finished_before >= 0) EXPECT_EQ(static_cast<int>(done.size()), c.finished_before);
  EXPECT_LT(done.size(), s.hashes.size());
  s.expect_valid(s.out);
  int temps = 0;
  if (fs::exists(s.out))
    for (const auto& f : fs::directory_iterator(s.out)) temps += f.path().filename().string().find(".h5.tmp-") != std::string::npos;
  if (c.leaves_temp) EXPECT_EQ(temps, 1);
  else EXPECT_EQ(temps, 0);
  std::map<std::string, std::string> before;
  for (const auto& arm : done) before[arm] = test::read_file(s.out / (arm + ".h5"));

  // The same command again finishes the rest.
  const auto r = test::run_ptqlab(s.run_args() + std::to_string(c.jobs));
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(s.finished(s.out).size(), s.hashes.size()) << r.output;
  for (const auto& [arm, hash] : s.hashes) {
    // Each arm once in the table: "cached" when it had finished before the kill, else "done".
    const std::regex row("\n" + arm + " +(cached|done) ");
    std::smatch m;
    const auto n = std::distance(std::sregex_iterator(r.output.begin(), r.output.end(), row), std::sregex_iterator());
    EXPECT_EQ(n, 1) << arm << "\n" << r.output;
    if (std::regex_search(r.output, m, row)) EXPECT_EQ(m[1] == "cached", done.count(arm) == 1) << arm << "\n" << r.output;
  }
  s.expect_valid(s.out);
  for (const auto& [arm, bytes] : before) EXPECT_EQ(test::read_file(s.out / (arm + ".h5")), bytes) << arm << " was rewritten";
}

INSTANTIATE_TEST_SUITE_P(
    Points, KillAndResume,
    ::testing::Values(
        // --jobs 1 runs the arms in file order: fp, rtn-bits4, rtn-bits2, sign.
        KillCase{"CalibrationOfTheFirstArm", "calibration:1", 1, 0, false},
        KillCase{"CalibrationOfTheSecondArm", "calibration:8", 1, 1, false},
        KillCase{"QuantizerInTheFirstArm", "quantizer:3", 1, 0, false},
        KillCase{"QuantizerInTheThirdArm", "quantizer:80", 1, 2, false},
        KillCase{"WritingTheFirstResult", "result-before-rename:1", 1, 0, true},
        KillCase{"WritingTheThirdResult", "result-before-rename:3", 1, 2, true},
        // Two arms at a time: which ones finished depends on timing, the guarantees do not.
        KillCase{"QuantizerWithTwoJobs", "quantizer:60", 2, -1, false},
        KillCase{"FromOutsideOnceAResultExists", "", 1, -1, false}),
    [](const ::testing::TestParamInfo<KillCase>& info) { return std::string(info.param.name); });

// A process killed at a fault point is SIGKILLed, whatever else is going on; without the variable
// (or with a malformed one) nothing happens.
TEST(FaultInjection, MalformedSettingIsIgnored) {
  Workspace s;
  const auto r = test::run_shell("PTQLAB_FAULT=quantizer '" + std::string(PTQLAB_BINARY) + "' " + s.run_args() + "1 --arms fp");
  EXPECT_EQ(r.exit_code, 0) << r.output;
  EXPECT_EQ(s.finished(s.out), std::set<std::string>{"fp"});
}

// The disk fills while results are written (a file-size limit: writes past it fail with EFBIG).
// The arms that cannot be written fail with a message naming the file and the reason, no file that
// looks complete and no temporary file is left, the earlier result is untouched, and a rerun with
// room finishes only the missing arms.
TEST(DiskFull, FileSizeLimitDuringARun) {
  Workspace s;
  const auto first = test::run_ptqlab(s.run_args() + "1 --arms fp");
  ASSERT_EQ(first.exit_code, 0) << first.output;
  const auto fp_bytes = test::read_file(s.out / "fp.h5");
  ASSERT_GT(fp_bytes.size(), 8u * 1024u) << "the limit below must be smaller than a result file";

  // bash counts ulimit -f in KiB. The cache (token streams) is larger than the limit too: a cache
  // that cannot be written is no error.
  const auto r = test::run_shell("bash -c \"ulimit -f 8; exec '" + std::string(PTQLAB_BINARY) + "' " + s.run_args() +
                       "2 --cache-dir '" + (s.dir.path() / "cache").string() + "'\"");
  EXPECT_EQ(r.exit_code, 1) << r.output;
  for (const char* arm : {"rtn-bits4", "rtn-bits2", "sign"}) {
    const std::string file = (s.out / (std::string(arm) + ".h5")).string();
    EXPECT_NE(r.output.find("ptqlab: arm '" + std::string(arm) + "' failed: " + file + ": cannot write result: "),
              std::string::npos)
        << r.output;
  }
  EXPECT_NE(r.output.find("File too large"), std::string::npos) << r.output;
  EXPECT_EQ(s.finished(s.out), std::set<std::string>{"fp"});
  for (const auto& f : fs::directory_iterator(s.out))
    EXPECT_TRUE(f.path().filename() == "fp.h5" || f.path().filename() == ".cache") << "left behind: " << f.path();
  EXPECT_EQ(test::read_file(s.out / "fp.h5"), fp_bytes);

  const auto again = test::run_ptqlab(s.run_args() + "2");
  EXPECT_EQ(again.exit_code, 0) << again.output;
  EXPECT_NE(again.output.find("1 already done"), std::string::npos) << again.output;
  EXPECT_EQ(s.finished(s.out).size(), 4u);
  s.expect_valid(s.out);
  EXPECT_EQ(test::read_file(s.out / "fp.h5"), fp_bytes);
}

// The same on a real full file system: a 256 KiB tmpfs in a private mount namespace (root only).
// The script runs fp alone, fills the rest of the tmpfs, runs everything (no result fits), copies
// what the tmpfs holds out, frees the space and runs again.
TEST(DiskFull, TinyTmpfsDuringARun) {
  if (::geteuid() != 0) GTEST_SKIP() << "mounting a tmpfs needs root";
  if (test::run_shell("unshare -m true").exit_code != 0) GTEST_SKIP() << "no private mount namespace (unshare -m) here";
  Workspace s;
  const fs::path full = s.dir.path() / "when-full", after = s.dir.path() / "after";
  fs::create_directories(s.out);
  fs::create_directories(full);
  fs::create_directories(after);
  const std::string run = "'" + std::string(PTQLAB_BINARY) + "' " + s.run_args() + "1 --no-cache";
  const std::string out = "'" + s.out.string() + "'";
  const fs::path script = s.dir.path() / "full-disk.sh";
  std::ofstream(script) << "mount -t tmpfs -o size=256k tmpfs " << out << " || exit 90\n"
                        << run << " --arms fp >/dev/null 2>&1 || exit 91\n"
                        << "dd if=/dev/zero of=" << out << "/filler bs=4k >/dev/null 2>&1\n"
                        << run << "\necho \"exit=$?\"\n"
                        << "cp -a " << out << "/. '" << full.string() << "/'\n"
                        << "rm " << out << "/filler\n"
                        << run << " >/dev/null 2>&1\necho \"rerun exit=$?\"\n"
                        << "cp -a " << out << "/. '" << after.string() << "/'\n";
  const auto r = test::run_shell("unshare -m bash '" + script.string() + "'");
  if (r.exit_code == 90) GTEST_SKIP() << "cannot mount a tmpfs here: " << r.output;
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("exit=1\n"), std::string::npos) << r.output;
  for (const char* arm : {"rtn-bits4", "rtn-bits2", "sign"})
    EXPECT_NE(r.output.find("ptqlab: arm '" + std::string(arm) + "' failed: " + (s.out / arm).string() +
                            ".h5: cannot write result: "),
              std::string::npos)
        << arm << "\n" << r.output;
  EXPECT_NE(r.output.find("No space left on device"), std::string::npos) << r.output;
  // The full file system held fp (complete) and the filler: no partial result, no temporary file.
  std::set<std::string> entries;
  for (const auto& f : fs::directory_iterator(full)) entries.insert(f.path().filename().string());
  EXPECT_EQ(entries, (std::set<std::string>{"filler", "fp.h5"})) << r.output;
  s.expect_valid(full);
  // With space again, the same command completes the other arms and leaves fp as it was.
  EXPECT_NE(r.output.find("rerun exit=0"), std::string::npos) << r.output;
  EXPECT_EQ(s.finished(after).size(), 4u);
  s.expect_valid(after);
  EXPECT_EQ(test::read_file(after / "fp.h5"), test::read_file(full / "fp.h5"));
}

}  // namespace
}  // namespace ptqlab
