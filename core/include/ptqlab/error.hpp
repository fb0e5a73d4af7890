#pragma once
// User-facing errors. Anything the user can fix (a bad file, a bad argument) is thrown as
// ptqlab::Error with a one-line message that names the file and the key or tensor; the CLI prints
// it as "ptqlab: error: <message>" and exits with status 2.
#include <stdexcept>
#include <string>

namespace ptqlab {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

inline constexpr int kExitUserError = 2;

}  // namespace ptqlab
