#pragma once
// User-facing errors. Anything the user can fix (a bad file, a bad argument) is thrown as
// ptqlab::Error with a one-line message that names the file and the key or tensor; the CLI prints
// it as "ptqlab: error: <message>" and exits with status 2.
#include <stdexcept>
#include <string>

namespace ptqlab {

// The destructor is defined out of line (core/src/support/error.cpp) on purpose: it is the class's key
// function, so its vtable and type_info live in libptqlab_core only. Plugins are built with hidden
// visibility; with an inline vtable each plugin would carry its own copy, an Error thrown by a
// plugin would not be caught as ptqlab::Error in core, and an in-flight exception would crash once
// its plugin is unloaded.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  ~Error() override;
};

inline constexpr int kExitUserError = 2;

}  // namespace ptqlab
