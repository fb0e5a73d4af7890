#pragma once
// The measured side of the memory model: a thread that samples the process's anonymous resident
// memory (RssAnon of /proc/self/status, the quantity the memory model predicts) while a run goes
// on, keeps its peak and what the run was doing then, and optionally writes a timeline (TSV:
// seconds, bytes, what each running stage did) so that a peak can be placed in a stage.
#include "ptqlab/support/internal.hpp"  // not part of the plugin SDK
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <filesystem>
#include <functional>
#include <mutex>
#include <string>
#include <thread>

namespace ptqlab {

// RssAnon of this process in bytes; 0 where /proc is not there.
double rss_anon_bytes();

class MemoryWatch {
 public:
  struct Peak {
    double bytes = 0;
    double seconds = 0;   // since the watch started
    std::string doing;    // what the run did at that sample
  };
  // `doing` is called from the sampling thread and must be thread-safe. With a non-empty
  // `trace`, the file is created now (an Error naming it when it cannot be) and written as the
  // run goes: a line when what the run does changes, when RssAnon moved by 16 MB, or every 10 s.
  MemoryWatch(std::function<std::string()> doing, const std::filesystem::path& trace,
              std::chrono::milliseconds interval = std::chrono::milliseconds(200));
  ~MemoryWatch();
  MemoryWatch(const MemoryWatch&) = delete;
  MemoryWatch& operator=(const MemoryWatch&) = delete;

  // Takes a sample now (a stage changed: the timeline gets the new stage even between the
  // periodic samples). Thread-safe.
  void sample();
  // Takes a last sample and stops the thread (idempotent); the trace file is complete after it.
  void stop();
  Peak peak() const;

 private:
  void run();

  std::function<std::string()> doing_;
  std::FILE* trace_ = nullptr;
  std::chrono::milliseconds interval_;
  std::chrono::steady_clock::time_point start_;
  mutable std::mutex mutex_;
  std::condition_variable wake_;
  bool stopping_ = false;
  Peak peak_;
  double last_written_bytes_ = -1;
  double last_written_seconds_ = 0;
  std::string last_written_doing_;
  std::thread thread_;
};

}  // namespace ptqlab
