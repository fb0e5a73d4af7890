// Progress of `ptqlab run` (run_stages.hpp): the status line on a terminal, one line per step
// (and a long arm's stage every 30 s) in a log file.
#include <unistd.h>

#include <cstdio>

#include <fmt/format.h>

#include "ptqlab/support/progress.hpp"
#include "run_stages.hpp"

namespace ptqlab::run_stages {

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

RunMonitor::RunMonitor(int total) : total_(total), start_(Clock::now()), interactive_(::isatty(STDOUT_FILENO) == 1) {}

void RunMonitor::stage(const std::string& arm, std::string what) {
  set_stage(arm, std::move(what));
  if (on_change_) on_change_();
}

void RunMonitor::set_stage(const std::string& arm, std::string what) {
  std::lock_guard lock(mutex_);
  if (!interactive_) {
    // A log file (Slurm, nohup) gets the current stage of an arm at most every 30 s, so that a
    // long arm (a 7B model's layers) shows how far it is without flooding short runs.
    const auto now = Clock::now();
    const auto [it, first] = last_line_.try_emplace(arm, now);
    if (!first && now - it->second >= std::chrono::seconds(30)) {
      it->second = now;
      std::printf("[%s] %s (%s elapsed)\n", arm.c_str(), what.c_str(), format_duration(seconds_since(start_)).c_str());
      std::fflush(stdout);
    }
  }
  stages_[arm] = std::move(what);
  redraw();
}

void RunMonitor::step(const std::string& arm, const std::string& line) {
  std::lock_guard lock(mutex_);
  clear();
  std::printf("[%s] %s\n", arm.c_str(), line.c_str());
  redraw();
  std::fflush(stdout);
}

void RunMonitor::stage_done(const std::string& what) {
  {
    std::lock_guard lock(mutex_);
    stages_.erase(what);
    redraw();
  }
  if (on_change_) on_change_();
}

void RunMonitor::arm_finished(const std::string& arm) {
  {
    std::lock_guard lock(mutex_);
    stages_.erase(arm);
    ++done_;
    redraw();
  }
  if (on_change_) on_change_();
}

void RunMonitor::finish() {
  std::lock_guard lock(mutex_);
  clear();
  std::fflush(stdout);
}

std::string RunMonitor::doing() const {
  std::lock_guard lock(mutex_);
  std::string out;
  for (const auto& [arm, what] : stages_) out += fmt::format("{}{}: {}", out.empty() ? "" : "; ", arm, what);
  return out.empty() ? std::string("-") : out;
}

void RunMonitor::clear() {
  if (interactive_ && drawn_) std::printf("\r\033[K");
  drawn_ = false;
}

void RunMonitor::redraw() {
  if (!interactive_) return;
  const double elapsed = seconds_since(start_);
  const std::string eta = done_ > 0 ? format_duration(elapsed / done_ * (total_ - done_)) : std::string("?");
  std::string line = fmt::format("[{}/{} arms, {} elapsed, ETA {}]", done_, total_, format_duration(elapsed), eta);
  for (const auto& [arm, what] : stages_) line += fmt::format("  {}: {}", arm, what);
  if (line.size() > 200) line = line.substr(0, 197) + "...";
  std::printf("\r\033[K%s", line.c_str());
  std::fflush(stdout);
  drawn_ = true;
}

}  // namespace ptqlab::run_stages
