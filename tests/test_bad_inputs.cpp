// The bad-input catalogue (tests/data/bad-inputs/, described in its README.md): every case runs
// the real CLI on one bad input and must exit with status 2, print exactly one error line on stderr
// that names the file and key at fault, and write nothing (no result directory, no cache, no
// changed file). Every case's message is documented in docs/errors.md.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <cstdlib>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "checkpoint_edit.hpp"
#include "ptqlab/support/utf8.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

namespace fs = std::filesystem;
using test::json;

fs::path catalogue_dir() { return fs::path(PTQLAB_TEST_DATA) / "bad-inputs"; }

void replace_all(std::string& s, const std::string& from, const std::string& to) {
  for (std::size_t pos = s.find(from); pos != std::string::npos; pos = s.find(from, pos + to.size()))
    s.replace(pos, from.size(), to);
}

// {work} (the case's scratch copy), {out} ({work}/out), {model} (the shipped stories260K),
// {shared}, {test-plugins} and {source} become real paths.
std::string substitute(std::string s, const fs::path& work) {
  replace_all(s, "{work}", work.string());
  replace_all(s, "{out}", (work / "out").string());
  replace_all(s, "{model}", test::model_dir("stories260K").string());
  replace_all(s, "{shared}", test::shared_dir().string());
  replace_all(s, "{test-plugins}", PTQLAB_TEST_PLUGINS);
  replace_all(s, "{source}", PTQLAB_SOURCE_DIR);
  return s;
}

std::string trim(const std::string& s) {
  const auto b = s.find_first_not_of(" \t\r\n");
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(" \t\r\n") - b + 1);
}

// "\n", "\t", "\\" and "\xNN" in a setup line's text.
std::string unescape(const std::string& s) {
  std::string out;
  for (std::size_t i = 0; i < s.size(); ++i) {
    if (s[i] != '\\' || i + 1 == s.size()) {
      out += s[i];
      continue;
    }
    const char c = s[++i];
    if (c == 'n') out += '\n';
    else if (c == 't') out += '\t';
    else if (c == 'x' && i + 2 < s.size()) {
      out += static_cast<char>(std::stoi(s.substr(i + 1, 2), nullptr, 16));
      i += 2;
    } else out += c;
  }
  return out;
}

// A message template as docs/errors.md writes it, as a regular expression: X (any text), FILE and
// DIR (a path), N, M and L (a number) and "..." (anything) are placeholders, the rest is literal.
std::regex template_regex(const std::string& t) {
  auto word_char = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '_'; };
  std::string re;
  for (std::size_t i = 0; i < t.size();) {
    if (t.compare(i, 3, "...") == 0) {
      re += ".*";
      i += 3;
      continue;
    }
    if (i == 0 || !word_char(t[i - 1])) {
      std::size_t j = i;
      while (j < t.size() && word_char(t[j])) ++j;
      const std::string w = t.substr(i, j - i);
      if (w == "X" || w == "FILE" || w == "DIR") {
        re += ".+?";
        i = j;
        continue;
      }
      if (w == "N" || w == "M" || w == "L") {
        re += "-?[0-9]+(\\.[0-9]+)?";
        i = j;
        continue;
      }
    }
    if (std::strchr("\\^$.|?*+()[]{}", t[i]) != nullptr) re += '\\';
    re += t[i++];
  }
  return std::regex(re);
}

struct Expected {
  std::string what;                 // one sentence: the bad input
  int exit_code = -1;
  std::string error;                // the message template, as docs/errors.md documents it
  std::vector<std::string> names;   // what the message must name: the file (and line:col), the key
};

Expected read_expected(const fs::path& file, const fs::path& work) {
  Expected e;
  std::istringstream in(test::read_bytes(file));
  for (std::string line; std::getline(in, line);) {
    if (trim(line).empty() || line[0] == '#') continue;
    const auto colon = line.find(':');
    if (colon == std::string::npos) throw std::runtime_error(file.string() + ": not 'key: value': " + line);
    const std::string key = line.substr(0, colon), value = trim(line.substr(colon + 1));
    if (key == "what") e.what = value;
    else if (key == "exit") e.exit_code = std::stoi(value);
    else if (key == "error") e.error = value;
    else if (key == "names") e.names.push_back(substitute(value, work));
    else throw std::runtime_error(file.string() + ": unknown key " + key);
  }
  if (e.what.empty() || e.exit_code < 0 || e.error.empty())
    throw std::runtime_error(file.string() + ": needs what, exit and error");
  return e;
}

// The setup commands (README.md): build the broken input in the scratch directory, mostly by
// damaging a copy of the shipped model.
void run_setup(const fs::path& file, const fs::path& work) {
  std::istringstream in(test::read_bytes(file));
  for (std::string line; std::getline(in, line);) {
    if (trim(line).empty() || line[0] == '#') continue;
    std::istringstream words(substitute(line, work));
    std::string op, a, b, c;
    words >> op >> a;
    const fs::path p = work / a;
    if (op == "copy-model") {
      words >> b;
      test::copy_model(a, work / b);
    } else if (op == "truncate") {
      words >> b;
      fs::resize_file(p, std::stoull(b));
    } else if (op == "write") {
      std::getline(words, b);
      test::write_bytes(p, unescape(b.empty() ? b : b.substr(1)));
    } else if (op == "remove") {
      fs::remove(p);
    } else if (op == "mkdir") {
      fs::create_directories(p);
    } else if (op == "symlink") {  // symlink LINK TARGET
      words >> b;
      fs::create_symlink(b, p);
    } else if (op == "json-set") {  // json-set FILE KEY JSON
      words >> b;
      std::getline(words, c);
      auto j = test::read_json(p);
      j[b] = json::parse(c);
      test::write_json(p, j);
    } else if (op == "json-del") {
      words >> b;
      auto j = test::read_json(p);
      j.erase(b);
      test::write_json(p, j);
    } else if (op == "st-set") {  // st-set FILE TENSOR FIELD JSON: change a tensor's header entry
      std::string field;
      words >> b >> field;
      std::getline(words, c);
      auto st = test::read_st(p);
      st.header.at(b)[field] = json::parse(c);
      test::write_st(p, st);
    } else if (op == "st-nan") {  // st-nan FILE TENSOR INDEX: a NaN into an F32 tensor
      std::size_t index = 0;
      words >> b >> index;
      auto st = test::read_st(p);
      const std::size_t at = st.header.at(b).at("data_offsets")[0].get<std::size_t>() + 4 * index;
      const float nan = std::numeric_limits<float>::quiet_NaN();
      std::memcpy(st.data.data() + at, &nan, 4);
      test::write_st(p, st);
    } else {
      throw std::runtime_error(file.string() + ": unknown setup command " + op);
    }
  }
}

// Every path under `dir` with its size (directories as -1): what "nothing was written" compares.
std::map<std::string, std::intmax_t> snapshot(const fs::path& dir) {
  std::map<std::string, std::intmax_t> out;
  for (auto it = fs::recursive_directory_iterator(dir); it != fs::recursive_directory_iterator(); ++it) {
    const bool is_file = it->is_regular_file() && !it->is_symlink();
    out[fs::relative(it->path(), dir).string()] = is_file ? static_cast<std::intmax_t>(it->file_size()) : -1;
    if (it->is_symlink()) it.disable_recursion_pending();
  }
  return out;
}

std::vector<fs::path> cases() {
  std::vector<fs::path> out;
  for (const auto& d : fs::directory_iterator(catalogue_dir()))
    if (d.is_directory()) out.push_back(d.path());
  std::sort(out.begin(), out.end());
  return out;
}

TEST(BadInputs, EveryCaseExits2WithOneLineNamingFileAndKeyAndWritesNothing) {
  const auto all = cases();
  ASSERT_GE(all.size(), 30u);
  for (const auto& dir : all) {
    const std::string name = dir.filename().string();
    SCOPED_TRACE("case " + name + " (" + dir.string() + ")");
    test::TempDir tmp;
    const fs::path work = tmp.path() / "work";
    fs::create_directories(work);
    for (const auto& f : fs::directory_iterator(dir)) {
      const auto fname = f.path().filename().string();
      if (fname == "args" || fname == "expected" || fname == "setup") continue;
      test::write_bytes(work / fname, substitute(test::read_bytes(f.path()), work));
    }
    if (fs::exists(dir / "setup")) run_setup(dir / "setup", work);
    const Expected want = read_expected(dir / "expected", work);
    const std::string args = trim(substitute(test::read_bytes(dir / "args"), work));
    const auto before = snapshot(work);

    const fs::path out_file = tmp.path() / "stdout", err_file = tmp.path() / "stderr";
    const std::string cmd = "cd '" + work.string() + "' && " + PTQLAB_BINARY + " " + args + " >'" + out_file.string() +
                            "' 2>'" + err_file.string() + "' </dev/null";
    const int status = std::system(cmd.c_str());
    const int code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    const std::string err = test::read_bytes(err_file);

    EXPECT_EQ(code, want.exit_code) << "stderr: " << err;
    EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << "not one line: " << err;
    EXPECT_TRUE(err.rfind("ptqlab: error: ", 0) == 0 || err.rfind("ptqlab " + args.substr(0, args.find(' ')) + ": error: ", 0) == 0)
        << err;
    EXPECT_TRUE(std::regex_search(err, template_regex(want.error)))
        << "expected a message like \"" << want.error << "\": " << err;
    for (const auto& n : want.names) EXPECT_NE(err.find(n), std::string::npos) << "should name \"" << n << "\": " << err;
    EXPECT_EQ(snapshot(work), before) << "the failed command wrote or changed files: " << err;
  }
}

// docs/errors.md documents every message of the catalogue, so the doc cannot silently go stale.
TEST(BadInputs, EveryCatalogueMessageIsInDocsErrors) {
  const std::string doc = test::read_bytes(fs::path(PTQLAB_SOURCE_DIR) / "docs" / "errors.md");
  std::map<std::string, int> areas;
  for (const auto& dir : cases()) {
    const auto want = read_expected(dir / "expected", "/work");
    EXPECT_NE(doc.find(want.error), std::string::npos)
        << dir.filename().string() << ": docs/errors.md does not mention \"" << want.error << "\"";
    ++areas[dir.filename().string().substr(0, dir.filename().string().find('-'))];
  }
  for (const char* area : {"yaml", "plugin", "path", "model", "tokenizer", "data", "cli"})
    EXPECT_GE(areas[area], 2) << "area " << area << " has fewer than 2 cases";
}

// The UTF-8 check behind "not valid UTF-8": every well-formed sequence passes, every ill-formed
// one (overlong, surrogate, beyond U+10FFFF, cut short, stray continuation byte) is reported at
// its first byte.
TEST(BadInputs, Utf8CheckAcceptsWellFormedAndRejectsIllFormedSequences) {
  for (const std::string& ok : {std::string(""), std::string("plain ASCII\n"), std::string("caf\xc3\xa9"),
                               std::string("\xe2\x82\xac"), std::string("\xef\xbf\xbf"), std::string("\xf0\x9f\x98\x80"),
                               std::string("\xf4\x8f\xbf\xbf"), std::string("\xed\x9f\xbf"), std::string(1, '\0')})
    EXPECT_NO_THROW(check_utf8(ok, "f.txt")) << ok;
  const std::vector<std::pair<std::string, std::size_t>> bad = {
      {"ab\xe9", 2},            {"\xc0\x80", 0},          {"\xc1\xbf", 0},      {"x\xe0\x80\x80", 1},
      {"\xed\xa0\x80", 0},      {"\xf4\x90\x80\x80", 0},  {"\xf5\x80\x80\x80", 0}, {"\xf0\x9f\x98", 0},
      {"ok\n\x80", 3},         {"\xff\xfeO\x00", 0},     {"\xe2\x82", 0}};
  for (const auto& [text, at] : bad) {
    try {
      check_utf8(text, "f.txt");
      ADD_FAILURE() << "accepted byte " << at;
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()).rfind("f.txt: not valid UTF-8 at byte " + std::to_string(at) + " (line ", 0), 0u)
          << e.what();
    }
  }
}

}  // namespace
}  // namespace ptqlab
