#include "ptqlab/engine/memory_watch.hpp"

#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>

#include <fmt/format.h>

#include "ptqlab/support/error.hpp"

namespace ptqlab {

double rss_anon_bytes() {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line))
    if (line.rfind("RssAnon:", 0) == 0) return std::strtod(line.c_str() + 8, nullptr) * 1024.0;  // "RssAnon: N kB"
  return 0;
}

MemoryWatch::MemoryWatch(std::function<std::string()> doing, const std::filesystem::path& trace,
                         std::chrono::milliseconds interval)
    : doing_(std::move(doing)), interval_(interval), start_(std::chrono::steady_clock::now()) {
  if (!trace.empty()) {
    trace_ = std::fopen(trace.c_str(), "w");
    if (trace_ == nullptr)
      throw Error(fmt::format("{}: cannot write the memory trace (--memory-trace): {}", trace.string(),
                              std::strerror(errno)));
    std::fputs("seconds\trss_anon_bytes\tdoing\n", trace_);
  }
  sample();
  thread_ = std::thread([this] { run(); });
}

MemoryWatch::~MemoryWatch() { stop(); }

void MemoryWatch::stop() {
  {
    std::lock_guard lock(mutex_);
    if (stopping_) return;
    stopping_ = true;
  }
  wake_.notify_all();
  if (thread_.joinable()) thread_.join();
  sample();
  std::lock_guard lock(mutex_);
  if (trace_ != nullptr) {  // the last sample was written (stopping_), so the trace ends where the run did
    std::fclose(trace_);
    trace_ = nullptr;
  }
}

MemoryWatch::Peak MemoryWatch::peak() const {
  std::lock_guard lock(mutex_);
  return peak_;
}

void MemoryWatch::run() {
  std::unique_lock lock(mutex_);
  while (!stopping_) {
    wake_.wait_for(lock, interval_, [this] { return stopping_; });
    if (stopping_) break;
    lock.unlock();
    sample();
    lock.lock();
  }
}

void MemoryWatch::sample() {
  // All under the lock, so that the timeline's lines are in time order whichever thread samples.
  // `doing_` may take the run monitor's lock; the monitor never calls in here holding it.
  std::lock_guard lock(mutex_);
  const double bytes = rss_anon_bytes();
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  std::string doing = doing_ ? doing_() : std::string();
  for (char& ch : doing)
    if (ch == '\t' || ch == '\n') ch = ' ';  // one TSV field
  if (bytes > peak_.bytes) peak_ = {bytes, seconds, doing};
  if (trace_ == nullptr) return;
  const bool changed = doing != last_written_doing_ || std::abs(bytes - last_written_bytes_) >= 16e6 ||
                       seconds - last_written_seconds_ >= 10.0 || stopping_;
  if (!changed) return;
  std::fprintf(trace_, "%.1f\t%.0f\t%s\n", seconds, bytes, doing.c_str());
  std::fflush(trace_);
  last_written_bytes_ = bytes;
  last_written_seconds_ = seconds;
  last_written_doing_ = std::move(doing);
}

}  // namespace ptqlab
