#pragma once
// Text for tokenization must be UTF-8: SentencePiece silently maps invalid bytes to byte or unknown
// tokens, so a Latin-1 or UTF-16 file would give a perplexity that means nothing.
#include <filesystem>
#include <string>

namespace ptqlab {

// Throws ptqlab::Error "FILE: not valid UTF-8 at byte N (line L) ..." at the first invalid sequence
// (overlong forms, surrogates and code points above U+10FFFF included).
void check_utf8(const std::string& text, const std::filesystem::path& file);

// read_text_file + check_utf8.
std::string read_utf8_text_file(const std::filesystem::path& path);

}  // namespace ptqlab
