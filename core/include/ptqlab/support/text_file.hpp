#pragma once
#include <filesystem>
#include <string>

namespace ptqlab {

// Reads a whole file as bytes; ptqlab::Error naming the file when it cannot.
std::string read_text_file(const std::filesystem::path& path);

}  // namespace ptqlab
