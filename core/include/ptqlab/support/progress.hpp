#pragma once
// Progress display for long jobs: "what: done/total [pct] rate ETA". Drawn on stderr, redrawn in
// place at most five times a second when stderr is a terminal; when it is not (logs, CI, Slurm),
// only the final line is printed so logs stay readable.
#include <atomic>
#include <chrono>
#include <mutex>
#include <string>

namespace ptqlab {

class Progress {
 public:
  Progress(std::string what, long long total, std::string unit);
  ~Progress();
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  void advance(long long n = 1);  // thread-safe
  void finish();                  // prints the final line once

  static bool interactive();  // stderr is a terminal, or PTQLAB_PROGRESS=1

 private:
  void draw(bool final);

  std::string what_, unit_;
  long long total_;
  std::atomic<long long> done_{0};
  std::chrono::steady_clock::time_point start_, last_draw_;
  std::mutex mutex_;
  bool interactive_;
  bool finished_ = false;
};

// Formats seconds as "42s", "3m05s" or "1h02m".
std::string format_duration(double seconds);

}  // namespace ptqlab
