#pragma once
// One fuzz target = one function `int ptqlab_fuzz_NAME(const std::uint8_t*, std::size_t)`.
// Built with PTQLAB_LIBFUZZER (scripts/fuzz) it is also libFuzzer's entry point; in every other
// build tests/test_fuzz_regressions.cpp calls the same function on the files of
// tests/data/fuzz-regressions/NAME/, so a fixed crash stays fixed in CI.
//
// A target returns 0. Expected rejections (ptqlab::Error) are swallowed; anything else (another
// exception, a broken invariant, a sanitizer report) is a finding.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#define PTQLAB_FUZZ_DECLARE(name) int ptqlab_fuzz_##name(const std::uint8_t* data, std::size_t size)

#ifdef PTQLAB_LIBFUZZER
#define PTQLAB_FUZZ_TARGET(name)                                                          \
  PTQLAB_FUZZ_DECLARE(name);                                                              \
  extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {     \
    return ptqlab_fuzz_##name(data, size);                                                \
  }                                                                                       \
  PTQLAB_FUZZ_DECLARE(name)
#else
#define PTQLAB_FUZZ_TARGET(name) PTQLAB_FUZZ_DECLARE(name)
#endif

namespace ptqlab::fuzz {

// A broken invariant: print what and abort, so that libFuzzer (or ctest) reports the input.
[[noreturn]] inline void broken(const char* what) {
  std::fprintf(stderr, "fuzz invariant broken: %s\n", what);
  std::abort();
}

}  // namespace ptqlab::fuzz

#define PTQLAB_FUZZ_CHECK(cond) \
  do {                          \
    if (!(cond)) ::ptqlab::fuzz::broken(#cond); \
  } while (0)
