#include "ptqlab/support/utf8.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "ptqlab/support/error.hpp"
#include "ptqlab/support/text_file.hpp"

namespace ptqlab {
namespace {

// Length of the valid UTF-8 sequence at s[i], or 0 (RFC 3629, table 3-7 of the Unicode standard).
std::size_t sequence_length(const std::string& s, std::size_t i) {
  auto at = [&](std::size_t k) { return k < s.size() ? static_cast<unsigned char>(s[k]) : 0u; };
  const unsigned c = at(i);
  if (c < 0x80) return 1;
  auto cont = [](unsigned b, unsigned lo = 0x80, unsigned hi = 0xbf) { return b >= lo && b <= hi; };
  if (c >= 0xc2 && c <= 0xdf) return cont(at(i + 1)) ? 2 : 0;
  if (c >= 0xe0 && c <= 0xef) {
    const unsigned lo = c == 0xe0 ? 0xa0 : 0x80, hi = c == 0xed ? 0x9f : 0xbf;  // no overlongs, no surrogates
    return cont(at(i + 1), lo, hi) && cont(at(i + 2)) ? 3 : 0;
  }
  if (c >= 0xf0 && c <= 0xf4) {
    const unsigned lo = c == 0xf0 ? 0x90 : 0x80, hi = c == 0xf4 ? 0x8f : 0xbf;  // no overlongs, <= U+10FFFF
    return cont(at(i + 1), lo, hi) && cont(at(i + 2)) && cont(at(i + 3)) ? 4 : 0;
  }
  return 0;
}

}  // namespace

void check_utf8(const std::string& text, const std::filesystem::path& file) {
  for (std::size_t i = 0; i < text.size();) {
    const std::size_t n = sequence_length(text, i);
    if (n == 0) {
      const auto line = 1 + std::count(text.begin(), text.begin() + static_cast<std::ptrdiff_t>(i), '\n');
      throw Error(fmt::format("{}: not valid UTF-8 at byte {} (line {}, byte 0x{:02x}); ptqlab tokenizes UTF-8 text: "
                              "convert the file (e.g. iconv -f latin1 -t utf-8)",
                              file.string(), i, line, static_cast<unsigned char>(text[i])));
    }
    i += n;
  }
}

std::string read_utf8_text_file(const std::filesystem::path& path) {
  std::string text = read_text_file(path);
  check_utf8(text, path);
  return text;
}

}  // namespace ptqlab
