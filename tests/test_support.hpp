#pragma once
// Helpers shared by the tests: paths to the real shared models and text, temporary directories,
// and running the ptqlab CLI as a user would.
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>

namespace ptqlab::test {

inline std::filesystem::path shared_dir() { return PTQLAB_SHARED_DIR; }
inline std::filesystem::path model_dir(const std::string& name) { return shared_dir() / "models" / name; }
inline std::filesystem::path data_file(const std::string& rel) { return shared_dir() / "data" / rel; }

// A fresh directory under the system temp dir, removed when the object dies.
class TempDir {
 public:
  TempDir() {
    std::random_device rd;
    path_ = std::filesystem::temp_directory_path() / ("ptqlab-test-" + std::to_string(rd()) + std::to_string(rd()));
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
};

struct CommandResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

// Runs a shell command, capturing its stdout and (unless told not to) its stderr.
inline CommandResult run_shell(const std::string& command, bool capture_stderr = true) {
  CommandResult r;
  const std::string cmd = command + (capture_stderr ? " 2>&1" : " 2>/dev/null");
  FILE* pipe = ::popen(cmd.c_str(), "r");
  if (pipe == nullptr) return r;
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0) r.output.append(buf, n);
  const int status = ::pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// Runs `ptqlab <args>` through the shell, as a user would.
inline CommandResult run_ptqlab(const std::string& args, bool capture_stderr = true) {
  return run_shell(std::string(PTQLAB_BINARY) + " " + args, capture_stderr);
}

// The whole file as bytes ("" when it cannot be read).
inline std::string read_file(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

// The arms most engine tests use: fp, rtn (group 32) swept over 4 and `bits2` bits, sign.
inline std::string standard_arms(int bits2 = 2) {
  return "  - name: fp\n"
         "    quantizer: fp\n"
         "  - name: rtn\n"
         "    quantizer: {name: rtn, params: {group_size: 32}}\n"
         "    sweep:\n"
         "      grid:\n"
         "        quantizer.bits: [4, " + std::to_string(bits2) + "]\n"
         "  - name: sign\n"
         "    quantizer: sign\n";
}

// A small but real experiment on stories260K: calibration windows from TinyStories, perplexity
// on a few TinyStories validation windows. Seconds per arm.
struct SmallExperiment {
  std::string name = "small-test";  // "" writes no name line (the file name is used)
  std::string model = model_dir("stories260K").string();
  std::string calib = data_file("tinystories/calib.txt").string();
  std::string valid = data_file("tinystories/valid.txt").string();
  int seed = -1;  // < 0 writes no seed line (the default seed)
  int nsamples = 8, seq_len = 128;
  int eval_seq_len = 256, max_windows = 3;
  std::string arms = standard_arms();

  std::string yaml() const {
    return (name.empty() ? "" : "name: " + name + "\n") +
           "model: " + model + "\n" +
           (seed < 0 ? "" : "seed: " + std::to_string(seed) + "\n") +
           "calibration:\n"
           "  text: " + calib + "\n"
           "  nsamples: " + std::to_string(nsamples) + "\n"
           "  seq_len: " + std::to_string(seq_len) + "\n"
           "eval:\n"
           "  - evaluator: perplexity\n"
           "    params: {seq_len: " + std::to_string(eval_seq_len) + ", max_windows: " + std::to_string(max_windows) + "}\n"
           "    datasets:\n"
           "      tinystories: " + valid + "\n"
           "arms:\n" + arms;
  }
};

}  // namespace ptqlab::test
