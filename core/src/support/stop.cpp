#include "ptqlab/support/stop.hpp"

#include <atomic>
#include <csignal>

namespace ptqlab {
namespace {

// Lock-free, so reading and writing it from a signal handler is safe.
std::atomic<bool> g_stop{false};
static_assert(std::atomic<bool>::is_always_lock_free);

extern "C" void on_sigterm(int) { g_stop.store(true, std::memory_order_relaxed); }

}  // namespace

Stopped::Stopped() : std::runtime_error("stopped on request (SIGTERM)") {}
Stopped::~Stopped() = default;

void install_stop_handler() {
  struct sigaction sa {};
  sa.sa_handler = on_sigterm;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART;  // system calls in progress (file reads) continue
  sigaction(SIGTERM, &sa, nullptr);
}

bool stop_requested() { return g_stop.load(std::memory_order_relaxed); }

void throw_if_stop_requested() {
  if (stop_requested()) throw Stopped();
}

void request_stop() { g_stop.store(true); }
void clear_stop_request() { g_stop.store(false); }

}  // namespace ptqlab
