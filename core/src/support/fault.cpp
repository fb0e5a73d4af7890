#include "ptqlab/support/fault.hpp"

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

namespace ptqlab {
namespace {

struct FaultSpec {
  std::string point;  // empty: no fault injection
  long hit = 0;       // raise SIGKILL on this hit
};

// Parsed once; a malformed value disables injection rather than changing what a run computes.
const FaultSpec& spec() {
  static const FaultSpec s = [] {
    FaultSpec f;
    const char* env = std::getenv("PTQLAB_FAULT");
    if (env == nullptr) return f;
    const char* colon = std::strrchr(env, ':');
    if (colon == nullptr || colon == env) return f;
    char* end = nullptr;
    const long n = std::strtol(colon + 1, &end, 10);
    if (end == colon + 1 || *end != '\0' || n < 1) return f;
    f.point.assign(env, colon);
    f.hit = n;
    return f;
  }();
  return s;
}

}  // namespace

void fault_point(const char* point) {
  const FaultSpec& s = spec();
  if (s.point.empty() || s.point != point) return;
  static std::atomic<long> hits{0};
  if (hits.fetch_add(1) + 1 == s.hit) ::kill(::getpid(), SIGKILL);
}

}  // namespace ptqlab
