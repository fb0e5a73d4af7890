#pragma once
// Helpers shared by the tests: paths to the real shared models and text, temporary directories,
// and running the ptqlab CLI as a user would.
#include <cstdio>
#include <filesystem>
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

// Runs `ptqlab <args>` through the shell, capturing stdout and (unless told not to) stderr.
inline CommandResult run_ptqlab(const std::string& args, bool capture_stderr = true) {
  CommandResult r;
  const std::string cmd = std::string(PTQLAB_BINARY) + " " + args + (capture_stderr ? " 2>&1" : " 2>/dev/null");
  FILE* pipe = ::popen(cmd.c_str(), "r");
  if (pipe == nullptr) return r;
  char buf[4096];
  std::size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, pipe)) > 0) r.output.append(buf, n);
  const int status = ::pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

}  // namespace ptqlab::test
