#pragma once
// Reading experiment files, the layer under experiment.cpp (private to core/src/engine/): the
// document with its error positions (every user error is "FILE:LINE:COL: message"), scalars typed
// as the YAML 1.2 core schema reads them, maps with known keys, and the small value readers.
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include "ptqlab/engine/params.hpp"
#include "ptqlab/support/error.hpp"

namespace ptqlab::experiment_file {

namespace fs = std::filesystem;

inline constexpr std::size_t kMaxNameLength = 100;

inline constexpr std::int64_t kMaxNsamples = 1000000;

// Sweeps multiply: a few short lists (or YAML aliases) could otherwise ask for millions of arms and
// exhaust memory before anything runs. Far above any real study.
inline constexpr std::size_t kMaxArms = 10000;

bool is_alnum(char c);

// ^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$ : arm, experiment and dataset names (they become file names).
bool valid_name(const std::string& s);

std::string sanitize_name(std::string s);

std::string name_rule();

std::string join(const std::vector<std::string>& items, const char* sep = ", ");

// " (did you mean 'x'?)", or a list of what is allowed when nothing is close.
std::string hint(const std::string& word, const std::vector<std::string>& candidates);

fs::path absolute_normal(const fs::path& p);

std::string type_with_article(ParamType t);

std::string describe(const YAML::Node& n);

// Control characters (a tab or newline in a quoted name) shown as escapes: an error stays one line.
std::string printable(const std::string& s);

class Doc {
 public:
  Doc(std::string file, fs::path dir) : file_(std::move(file)), dir_(std::move(dir)) {}

  [[noreturn]] void fail(const YAML::Mark& m, const std::string& message) const {
    const int line = m.is_null() ? 1 : m.line + 1;
    const int col = m.is_null() ? 1 : m.column + 1;
    throw Error(fmt::format("{}:{}:{}: {}", file_, line, col, printable(message)));
  }
  // Relative paths resolve against the directory of the YAML file.
  const fs::path& dir() const { return dir_; }
  fs::path resolve(const std::string& p) const {
    const fs::path path(p);
    return absolute_normal(path.is_absolute() ? path : dir_ / path);
  }

 private:
  std::string file_;
  fs::path dir_;
};

// Reads and parses the file; the root must be a map without duplicate or non-scalar keys anywhere.
YAML::Node load_root(const Doc& doc, const fs::path& file, const std::string& shown);

bool looks_int(const std::string& s);

// A scalar node's typed value. `what` names the value in messages.
ParamValue scalar_value(const Doc& doc, const YAML::Node& n, const YAML::Mark& mark, const std::string& what);

// Emits text as a string that reads back as a string.
void emit_text(YAML::Emitter& out, const std::string& s);

void emit_value(YAML::Emitter& out, const ParamValue& v);

struct Entry {
  std::string key;
  YAML::Node key_node;
  YAML::Node value;
  // Null values ("key:" with nothing) are reported at their key.
  YAML::Mark mark() const { return value.IsNull() ? key_node.Mark() : value.Mark(); }
};

class MapView {
 public:
  // `node` must be a map (else an error at `mark`: "<what> must be a map, got ..."); every key
  // must be in `allowed`.
  MapView(const Doc& doc, const YAML::Node& node, const YAML::Mark& mark, std::string what,
          const std::vector<std::string>& allowed)
      : doc_(doc), node_(node), mark_(mark), what_(std::move(what)) {
    if (!node.IsMap()) doc.fail(mark, fmt::format("{} must be a map, got {}", what_, describe(node)));
    for (auto it = node.begin(); it != node.end(); ++it) {
      Entry e{it->first.Scalar(), it->first, it->second};
      if (std::find(allowed.begin(), allowed.end(), e.key) == allowed.end())
        doc.fail(e.key_node.Mark(), fmt::format("unknown key '{}' in {}{}", e.key, what_, hint(e.key, allowed)));
      entries_.push_back(std::move(e));
    }
  }

  const Entry* get(const std::string& key) const {
    for (const auto& e : entries_)
      if (e.key == key) return &e;
    return nullptr;
  }
  const Entry& require(const std::string& key) const {
    if (const Entry* e = get(key)) return *e;
    doc_.fail(mark_, fmt::format("missing required key '{}' in {}", key, what_));
  }
  const std::vector<Entry>& entries() const { return entries_; }
  const YAML::Mark& mark() const { return mark_; }
  const std::string& what() const { return what_; }

 private:
  const Doc& doc_;
  YAML::Node node_;
  YAML::Mark mark_;
  std::string what_;
  std::vector<Entry> entries_;
};

std::string read_string(const Doc& doc, const Entry& e, const std::string& what);

std::int64_t read_int(const Doc& doc, const Entry& e, const std::string& what, std::int64_t lo, std::int64_t hi);

bool read_bool(const Doc& doc, const Entry& e, const std::string& what);

// A file or directory named by the entry, resolved and checked.
fs::path read_existing(const Doc& doc, const Entry& e, const std::string& what, bool directory);

std::vector<fs::path> read_plugin_paths(const Doc& doc, const Entry* e);

}  // namespace ptqlab::experiment_file
