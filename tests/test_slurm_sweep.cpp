// ptqlab sweep --slurm without Slurm: golden array/report scripts and manifest, the frozen
// experiment copy, which arms a rerun submits (after a real partial run, failed and stale results),
// the printed and the submitted sbatch commands (a stand-in sbatch on PATH), and bad options.
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <regex>

#include "ptqlab/engine/experiment.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/engine/runner.hpp"
#include "ptqlab/engine/slurm_sweep.hpp"
#include "ptqlab/outputs/results.hpp"
#include "ptqlab/support/error.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

namespace fs = std::filesystem;

// A small real experiment: 4 arms (fp, rtn-bits4, rtn-bits2, sign), fast to run.
std::string experiment_yaml(const std::string& model, const std::string& calib, const std::string& valid) {
  test::SmallExperiment e;
  e.name = "sweep-test";
  e.model = model;
  e.calib = calib;
  e.valid = valid;
  e.nsamples = 4;
  e.seq_len = 64;
  e.eval_seq_len = 128;
  e.max_windows = 2;
  return e.yaml();
}

std::string replace_all(std::string s, const std::string& from, const std::string& to) {
  for (std::size_t at = 0; (at = s.find(from, at)) != std::string::npos; at += to.size()) s.replace(at, from.size(), to);
  return s;
}

struct Sweep {
  test::TempDir dir;
  PluginRegistry registry;
  fs::path yaml;
  Experiment exp;
  SlurmSweepOptions options;

  Sweep() {
    registry.add_search_path(PluginRegistry::default_plugin_dir());
    yaml = dir.path() / "sweep-test.yaml";
    std::ofstream(yaml) << experiment_yaml(test::model_dir("stories260K").string(),
                                           test::data_file("tinystories/calib.txt").string(),
                                           test::data_file("tinystories/valid.txt").string());
    exp = load_experiment(yaml, registry);
    options.out_dir = dir.path() / "out";
    options.ptqlab_binary = PTQLAB_BINARY;
  }
  // Runs the arms matching `glob` for real, as a Slurm task would.
  RunReport run(const std::string& glob) {
    RunOptions o;
    o.out_dir = options.out_dir;
    o.arms_glob = glob;
    return run_experiment(exp, registry, o);
  }
};

// Machine-specific strings (temp dir, shared data, hashes) become placeholders.
std::string placeholders(std::string text, const Sweep& s, const SlurmSweepPlan& plan) {
  text = replace_all(text, plan.frozen_name, "experiment-@FROZEN@.yaml");
  for (const auto& a : s.exp.arms) text = replace_all(text, a.config_hash, "@HASH-" + a.name + "@");
  text = replace_all(text, s.dir.path().string(), "@TMP@");
  return replace_all(text, test::shared_dir().string(), "@SHARED@");
}

void expect_golden(const std::string& text, const std::string& name) {
  const fs::path file = fs::path(PTQLAB_TEST_DATA) / "slurm" / name;
  if (std::getenv("PTQLAB_UPDATE_GOLDEN") != nullptr) {
    std::ofstream(file, std::ios::binary) << text;
    GTEST_SKIP() << "golden file rewritten";
  }
  EXPECT_EQ(text, test::read_file(file)) << "regenerate with PTQLAB_UPDATE_GOLDEN=1 after checking the new output:\n" << text;
}

TEST(SlurmSweep, CompressIndicesAndTimeLimits) {
  EXPECT_EQ(compress_indices({}), "");
  EXPECT_EQ(compress_indices({3}), "3");
  EXPECT_EQ(compress_indices({0, 1, 2, 4, 6, 7}), "0-2,4,6-7");
  EXPECT_EQ(compress_indices({1, 4, 7}), "1,4,7");
  EXPECT_EQ(parse_slurm_time("90"), 90 * 60);
  EXPECT_EQ(parse_slurm_time("1:30"), 90);
  EXPECT_EQ(parse_slurm_time("2:00:00"), 7200);
  EXPECT_EQ(parse_slurm_time("1-0"), 86400);
  EXPECT_EQ(parse_slurm_time("1-2:3"), 86400 + 2 * 3600 + 3 * 60);
  EXPECT_EQ(parse_slurm_time("1-2:3:4"), 86400 + 2 * 3600 + 3 * 60 + 4);
  for (const char* bad : {"", "1h", "1:2:3:4", "UNLIMITED", "0", "-5", "0:00:00", "1-"})
    EXPECT_THROW(parse_slurm_time(bad), Error) << bad;
  EXPECT_EQ(signal_lead_seconds(3600), 120);
  EXPECT_EQ(signal_lead_seconds(120), 60);
  EXPECT_EQ(shell_quote("it's here"), "'it'\\''s here'");
}

TEST(SlurmSweep, GoldenScriptsAndManifest) {
  Sweep s;
  s.options.out_dir = "/cluster/results/sweep-test";
  s.options.ptqlab_binary = "/opt/ptqlab/bin/ptqlab";
  s.options.partition = "gpu";
  s.options.time_limit = "2:00:00";
  s.options.mem = "8G";
  s.options.cpus = 4;
  s.options.throttle = 2;
  s.options.plugin_paths = {"/opt/ptqlab/plugins-extra"};
  const auto plan = plan_slurm_sweep(s.exp, s.options);
  ASSERT_EQ(plan.arms.size(), 4u);
  EXPECT_EQ(plan.pending, (std::vector<int>{0, 1, 2, 3}));
  EXPECT_EQ(plan.array_spec, "0-3%2");
  EXPECT_TRUE(std::regex_match(plan.frozen_name, std::regex(R"(experiment-[0-9a-f]{12}\.yaml)"))) << plan.frozen_name;
  expect_golden(placeholders(plan.array_script, s, plan), "array.sbatch");
  expect_golden(placeholders(plan.report_script, s, plan), "report.sbatch");
  expect_golden(placeholders(plan.manifest, s, plan), "manifest.tsv");
  expect_golden(placeholders(sbatch_array_command(plan, s.options) + "\n" + sbatch_report_command(s.options, "$jobid") +
                                 "\n",
                             s, plan),
                "submit.txt");
  // Every manifest row names the arm's real config hash.
  for (const auto& a : s.exp.arms)
    EXPECT_NE(plan.manifest.find("\t" + a.name + "\t" + a.config_hash + "\t" + a.name + ".h5\n"), std::string::npos)
        << a.name;
}

// The frozen copy: paths absolute, name explicit, same config hashes from another directory, and
// unchanged by later edits of the original.
TEST(SlurmSweep, FrozenCopyReproducesTheExperiment) {
  Sweep s;
  // An experiment with relative paths and no name, as users write them.
  const fs::path sub = s.dir.path() / "exps";
  fs::create_directories(sub);
  const fs::path rel_yaml = sub / "my-sweep.yaml";
  auto rel = [&](const fs::path& p) { return fs::relative(p, sub).string(); };
  std::string text = experiment_yaml(rel(test::model_dir("stories260K")), rel(test::data_file("tinystories/calib.txt")),
                                     rel(test::data_file("tinystories/valid.txt")));
  text = replace_all(text, "name: sweep-test\n", "");
  std::ofstream(rel_yaml) << text;
  const Experiment exp = load_experiment(rel_yaml, s.registry);
  ASSERT_EQ(exp.name, "my-sweep");

  const auto plan = plan_slurm_sweep(exp, s.options);
  write_slurm_sweep(plan, exp, s.options, s.registry);
  const fs::path frozen = s.options.out_dir / "slurm" / plan.frozen_name;
  ASSERT_TRUE(fs::exists(frozen));
  EXPECT_EQ(test::read_file(frozen), plan.frozen_yaml);
  EXPECT_EQ(test::read_file(s.options.out_dir / "slurm" / "array.sbatch"), plan.array_script);
  EXPECT_EQ(test::read_file(s.options.out_dir / "slurm" / "manifest.tsv"), plan.manifest);
  EXPECT_TRUE(fs::is_directory(s.options.out_dir / "slurm" / "logs"));
  EXPECT_NE(plan.array_script.find(frozen.string()), std::string::npos);
  const Experiment copy = load_experiment(frozen, s.registry);
  EXPECT_EQ(copy.name, "my-sweep");
  ASSERT_EQ(copy.arms.size(), exp.arms.size());
  for (std::size_t i = 0; i < exp.arms.size(); ++i) EXPECT_EQ(copy.arms[i].config_hash, exp.arms[i].config_hash);
  // No temporary files are left behind.
  for (const auto& f : fs::directory_iterator(s.options.out_dir / "slurm"))
    EXPECT_NE(f.path().filename().string()[0], '.') << f.path();

  // Editing the original while jobs are queued changes nothing the jobs read.
  const std::string before = test::read_file(frozen);
  std::ofstream(rel_yaml) << replace_all(text, "[4, 2]", "[3]");
  EXPECT_EQ(test::read_file(frozen), before);
  // Sweeping the edited file writes a second frozen copy next to the first.
  const Experiment edited = load_experiment(rel_yaml, s.registry);
  const auto plan2 = plan_slurm_sweep(edited, s.options);
  EXPECT_NE(plan2.frozen_name, plan.frozen_name);
}

// Which arms a rerun submits: after a real partial run, only the missing ones; a failed result is
// resubmitted, a garbage file counts as missing, another configuration's result needs --force.
TEST(SlurmSweep, ResubmitsOnlyMissingArms) {
  Sweep s;
  s.options.throttle = 3;
  auto plan = plan_slurm_sweep(s.exp, s.options);
  EXPECT_EQ(plan.array_spec, "0-3%3");

  const auto first = s.run("rtn*");  // what tasks 1 and 2 would have done
  ASSERT_EQ(first.failed(), 0);
  plan = plan_slurm_sweep(s.exp, s.options);
  EXPECT_EQ(plan.pending, (std::vector<int>{0, 3}));
  EXPECT_EQ(plan.array_spec, "0,3%3");
  EXPECT_EQ(plan.arms[1].state, SweepArm::State::done);
  EXPECT_EQ(plan.arms[0].state, SweepArm::State::missing);
  s.options.arms_glob = "f*";  // --arms: only those, done or not
  EXPECT_EQ(plan_slurm_sweep(s.exp, s.options).array_spec, "0%3");
  s.options.arms_glob = "rtn*";
  EXPECT_TRUE(plan_slurm_sweep(s.exp, s.options).pending.empty());
  s.options.arms_glob = "*";

  // A failed result of the same configuration is run again; so is a file that is not a result.
  ArmResult failed;
  failed.arm = "fp";
  failed.experiment = s.exp.name;
  failed.status = "failed";
  failed.failure = "activations became non-finite";
  failed.config_yaml = s.exp.arms[0].resolved_yaml;
  failed.config_hash = s.exp.arms[0].config_hash;
  write_arm_result(s.options.out_dir / "fp.h5", failed);
  std::ofstream(s.options.out_dir / "sign.h5") << "not an HDF5 file";
  plan = plan_slurm_sweep(s.exp, s.options);
  EXPECT_EQ(plan.arms[0].state, SweepArm::State::failed);
  EXPECT_EQ(plan.arms[3].state, SweepArm::State::missing);
  EXPECT_EQ(plan.array_spec, "0,3%3");

  // The runner agrees: running everything recomputes exactly the pending arms.
  const auto second = s.run("*");
  int skipped = 0;
  for (const auto& a : second.arms) skipped += a.status == ArmOutcome::Status::skipped;
  EXPECT_EQ(skipped, 2);
  plan = plan_slurm_sweep(s.exp, s.options);
  EXPECT_TRUE(plan.pending.empty());
  EXPECT_EQ(plan.array_spec, "");

  // A result of another configuration: refused without --force, everything with it.
  ArmResult other = read_arm_result(s.options.out_dir / "sign.h5");
  other.config_hash = std::string(64, 'a');
  write_arm_result(s.options.out_dir / "sign.h5", other);
  try {
    plan_slurm_sweep(s.exp, s.options);
    ADD_FAILURE() << "a result of another configuration was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("sign.h5"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("--force"), std::string::npos) << e.what();
  }
  s.options.force = true;
  plan = plan_slurm_sweep(s.exp, s.options);
  EXPECT_EQ(plan.array_spec, "0-3%3");
  EXPECT_NE(plan.array_script.find(" --force"), std::string::npos);
}

TEST(SweepCli, PrintsCommandsThenNothingToSubmit) {
  Sweep s;
  const auto out = s.options.out_dir;
  auto r = test::run_ptqlab("sweep " + s.yaml.string() + " --slurm --out " + out.string() + " --throttle 2");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("4 to submit"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("jobid=$(sbatch --parsable --array=0-3%2 '" + (out / "slurm" / "array.sbatch").string() + "')"),
            std::string::npos)
      << r.output;
  EXPECT_NE(r.output.find("sbatch --parsable --dependency=afterok:$jobid '" + (out / "slurm" / "report.sbatch").string()),
            std::string::npos)
      << r.output;
  // The script runs this very binary on the frozen copy.
  const std::string script = test::read_file(out / "slurm" / "array.sbatch");
  EXPECT_NE(script.find("exec '" + fs::canonical(PTQLAB_BINARY).string() + "' run '" + (out / "slurm").string()),
            std::string::npos)
      << script;

  s.run("*");
  r = test::run_ptqlab("sweep " + s.yaml.string() + " --slurm --out " + out.string());
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("nothing to submit"), std::string::npos) << r.output;
}

// --submit with stand-in sbatch and squeue commands that log their arguments.
TEST(SweepCli, SubmitsArrayThenReportAfterOk) {
  Sweep s;
  const fs::path bin = s.dir.path() / "bin";
  fs::create_directories(bin);
  const fs::path log = s.dir.path() / "sbatch.log";
  std::ofstream(bin / "sbatch") << "#!/bin/sh\necho \"$@\" >> " << log.string()
                                << "\ncase \"$*\" in *--dependency*) echo 4243;; *) echo '4242;cluster';; esac\n";
  std::ofstream(bin / "squeue") << "#!/bin/sh\nif [ -e " << (s.dir.path() / "queued").string()
                                << " ]; then echo 4242_1; fi\n";
  fs::permissions(bin / "sbatch", fs::perms::owner_all);
  fs::permissions(bin / "squeue", fs::perms::owner_all);
  s.run("sign");
  const std::string cmd = "PATH=" + bin.string() + ":$PATH " + PTQLAB_BINARY + " sweep " + s.yaml.string() +
                          " --slurm --submit --out " + s.options.out_dir.string();
  auto run = [&] { return test::run_shell(cmd); };
  auto r = run();
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("submitted array job 4242 (3 tasks) and report job 4243"), std::string::npos) << r.output;
  const std::string calls = test::read_file(log);
  EXPECT_EQ(calls, "--parsable --array=0-2 " + (s.options.out_dir / "slurm" / "array.sbatch").string() + "\n" +
                       "--parsable --dependency=afterok:4242 " + (s.options.out_dir / "slurm" / "report.sbatch").string() +
                       "\n");
  const std::string submissions = test::read_file(s.options.out_dir / "slurm" / "submissions.tsv");
  EXPECT_NE(submissions.find("\t4242\t0-2\t4243\n"), std::string::npos) << submissions;

  // While the previous array still has tasks in the queue, a resubmission is refused.
  std::ofstream(s.dir.path() / "queued") << "";
  r = run();
  EXPECT_EQ(r.exit_code, 2) << r.output;
  EXPECT_NE(r.output.find("array job 4242 of the previous submission"), std::string::npos) << r.output;
  EXPECT_EQ(test::read_file(log), calls);  // nothing submitted
}

TEST(SweepCli, BadOptionsExit2WithOneLine) {
  Sweep s;
  const fs::path out = s.dir.path() / "bad";
  const std::string base = "sweep " + s.yaml.string() + " --out " + out.string() + " ";
  std::ofstream(s.dir.path() / "a-file") << "x";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {base, "needs --slurm"},
      {base + "--slurm --cpus 0", "--cpus"},
      {base + "--slurm --time 1h", "--time '1h'"},
      {base + "--slurm --time UNLIMITED", "--time 'UNLIMITED'"},
      {base + "--slurm --mem 8GB", "--mem '8GB'"},
      {base + "--slurm --partition 'a b'", "--partition 'a b'"},
      {base + "--slurm --throttle -1", "--throttle"},
      {base + "--slurm --bogus", "bogus"},
      {base + "--slurm --arms 'nothing*'", "--arms 'nothing*' matches no arm"},
      {"sweep " + (s.dir.path() / "missing.yaml").string() + " --slurm", "missing.yaml"},
      {"sweep " + s.yaml.string() + " --slurm --out " + (s.dir.path() / "a-file").string(), "not a directory"},
  };
  for (const auto& [args, expected] : cases) {
    const auto r = test::run_ptqlab(args);
    EXPECT_EQ(r.exit_code, 2) << args << "\n" << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << args << "\n" << r.output;
    EXPECT_EQ(r.output.rfind("ptqlab", 0), 0u) << r.output;
    EXPECT_NE(r.output.find(expected), std::string::npos) << args << "\n" << r.output;
  }
  EXPECT_FALSE(fs::exists(out)) << "a bad option left files behind";
}

}  // namespace
}  // namespace ptqlab
