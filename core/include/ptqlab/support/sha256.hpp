#pragma once
// SHA-256 (FIPS 180-4): config hashes of experiment arms (the resume key) and the content keys of
// the artifact cache.
#include <string>

namespace ptqlab {

// sha256 of a byte string, lower-case hex.
std::string sha256_hex(const std::string& data);

}  // namespace ptqlab
