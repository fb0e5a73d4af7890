#pragma once
// What built this binary: recorded in every result file for reproducibility.
#include "ptqlab/support/internal.hpp"  // not part of the plugin SDK
#include <map>
#include <string>

namespace ptqlab {

const char* version();
const char* git_revision();
// Library name -> version string (Eigen, TBB, fmt, SentencePiece, ...).
std::map<std::string, std::string> library_versions();

}  // namespace ptqlab
