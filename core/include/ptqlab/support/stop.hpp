#pragma once
// Clean stop on SIGTERM (docs/slurm.md, "Signals and resume"). Slurm sends SIGTERM some time before
// a job's time limit; `ptqlab run` installs a handler that only sets a flag, and long computations
// poll it at safe points (between decoder layers, between perplexity batches, between datasets and
// arms). Polling throws ptqlab::Stopped, which the runner catches: an arm that was stopped writes
// no result file, finished arms keep theirs, and a rerun resumes from the finished arms.
#include "ptqlab/support/internal.hpp"  // not part of the plugin SDK
#include <stdexcept>
#include <string>

namespace ptqlab {

// Thrown at a safe point once a stop was requested. Not a ptqlab::Error: nothing is wrong with the
// input. Its destructor is out of line (core/src/support/stop.cpp) for the same reason as Error's: so a
// Stopped thrown through plugin code is caught as ptqlab::Stopped in core.
class Stopped : public std::runtime_error {
 public:
  Stopped();
  ~Stopped() override;
};

// Exit status of `ptqlab run` when it stopped on SIGTERM before every arm was done
// (EX_TEMPFAIL from sysexits.h: "try again later" -- a rerun resumes).
inline constexpr int kExitStopped = 75;

// Installs the SIGTERM handler (async-signal-safe: it only sets the flag).
void install_stop_handler();
// True once SIGTERM arrived (or request_stop() was called).
bool stop_requested();
// Throws Stopped when a stop was requested.
void throw_if_stop_requested();
// For tests and embedders: request a stop, or forget a request.
void request_stop();
void clear_stop_request();

}  // namespace ptqlab
