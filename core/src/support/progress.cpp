#include "ptqlab/support/progress.hpp"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>

#include <fmt/format.h>

namespace ptqlab {

std::string format_duration(double s) {
  if (s < 0 || s != s) return "?";
  const long long t = static_cast<long long>(s + 0.5);
  if (t < 60) return fmt::format("{}s", t);
  if (t < 3600) return fmt::format("{}m{:02}s", t / 60, t % 60);
  return fmt::format("{}h{:02}m", t / 3600, (t % 3600) / 60);
}

bool Progress::interactive() {
  const char* env = std::getenv("PTQLAB_PROGRESS");
  if (env != nullptr) return std::string(env) == "1";
  return ::isatty(STDERR_FILENO) == 1;
}

Progress::Progress(std::string what, long long total, std::string unit)
    : what_(std::move(what)),
      unit_(std::move(unit)),
      total_(total),
      start_(std::chrono::steady_clock::now()),
      last_draw_(start_),
      interactive_(interactive()) {}

Progress::~Progress() { finish(); }

void Progress::advance(long long n) {
  done_ += n;
  if (!interactive_) return;
  std::unique_lock lock(mutex_, std::try_to_lock);
  if (!lock.owns_lock() || finished_) return;
  const auto now = std::chrono::steady_clock::now();
  if (now - last_draw_ < std::chrono::milliseconds(200)) return;
  last_draw_ = now;
  draw(false);
}

void Progress::finish() {
  std::lock_guard lock(mutex_);
  if (finished_) return;
  finished_ = true;
  draw(true);
}

void Progress::draw(bool final) {
  const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const long long done = done_.load();
  const double rate = elapsed > 0 ? done / elapsed : 0.0;
  const double pct = total_ > 0 ? 100.0 * done / total_ : 100.0;
  std::string line;
  if (final) {
    line = fmt::format("{}: {}/{} {} in {} ({:.0f} {}/s)", what_, done, total_, unit_, format_duration(elapsed), rate,
                       unit_);
  } else {
    const double eta = rate > 0 ? (total_ - done) / rate : -1;
    line = fmt::format("{}: {}/{} {} [{:3.0f}%] {:.0f} {}/s ETA {}", what_, done, total_, unit_, pct, rate, unit_,
                       format_duration(eta));
  }
  if (interactive_) {
    std::fprintf(stderr, "\r\033[K%s%s", line.c_str(), final ? "\n" : "");
  } else if (final) {
    std::fprintf(stderr, "%s\n", line.c_str());
  }
  std::fflush(stderr);
}

}  // namespace ptqlab
