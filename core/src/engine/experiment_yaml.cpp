// Reading experiment files: documents, scalars, maps with known keys (experiment_yaml.hpp).
#include "experiment_yaml.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <system_error>

#include "ptqlab/engine/experiment.hpp"

namespace ptqlab::experiment_file {

// ---------------------------------------------------------------------------------------------
// Small helpers.

namespace {

bool is_name_char(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
         c == '-';
}

}  // namespace

bool is_alnum(char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }

bool valid_name(const std::string& s) {
  if (s.empty() || s.size() > kMaxNameLength || !is_alnum(s[0])) return false;
  return std::all_of(s.begin(), s.end(), is_name_char);
}

std::string sanitize_name(std::string s) {
  for (char& c : s)
    if (!is_name_char(c)) c = '_';
  return s;
}

std::string name_rule() {
  return "names must match [A-Za-z0-9][A-Za-z0-9._-]* and have at most 100 characters";
}

std::string join(const std::vector<std::string>& items, const char* sep) {
  std::string out;
  for (std::size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

std::string hint(const std::string& word, const std::vector<std::string>& candidates) {
  if (auto m = closest_match(word, candidates)) return fmt::format(" (did you mean '{}'?)", *m);
  if (candidates.empty()) return "";
  return fmt::format(" (expected one of: {})", join(candidates));
}

fs::path absolute_normal(const fs::path& p) {
  fs::path a = fs::absolute(p).lexically_normal();
  if (!a.has_filename() && a.has_parent_path() && a != a.root_path()) a = a.parent_path();  // "dir/" -> "dir"
  return a;
}

std::string type_with_article(ParamType t) {
  return fmt::format("{} {}", t == ParamType::integer ? "an" : "a", param_type_name(t));
}

std::string describe(const YAML::Node& n) {
  switch (n.Type()) {
    case YAML::NodeType::Null: return "null";
    case YAML::NodeType::Scalar: return fmt::format("'{}'", n.Scalar());
    case YAML::NodeType::Sequence: return "a list";
    case YAML::NodeType::Map: return "a map";
    default: return "nothing";
  }
}

namespace {

// Floats as text that reads back as a float (1.0, not 1), so the resolved YAML keeps types.
std::string real_text(double d) {
  if (std::isnan(d)) return ".nan";
  if (std::isinf(d)) return d > 0 ? ".inf" : "-.inf";
  std::string t = param_value_text(ParamValue(d));
  if (t.find_first_of(".eE") == std::string::npos) t += ".0";
  return t;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Errors with positions.

std::string printable(const std::string& s) {
  std::string out;
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    if (c == '\t') out += "\\t";
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c < 0x20 || c == 0x7f) out += fmt::format("\\x{:02x}", c);
    else out += ch;
  }
  return out;
}

namespace {

constexpr int kMaxDepth = 64;

// Reads and parses the file; the root must be a map. Duplicate keys (which yaml-cpp keeps
// silently) and non-scalar keys are rejected anywhere in the tree. A node reached again through a
// YAML alias is checked once (`visited`: collections by their position in the text), so that nested
// aliases ("billion laughs") cannot make the walk exponential.
void check_structure(const Doc& doc, const YAML::Node& node, int depth, std::set<int>& visited) {
  if (depth > kMaxDepth) doc.fail(node.Mark(), fmt::format("nesting deeper than {} levels", kMaxDepth));
  if ((node.IsSequence() || node.IsMap()) && !visited.insert(node.Mark().pos).second) return;
  if (node.IsSequence()) {
    for (const auto& child : node) check_structure(doc, child, depth + 1, visited);
  } else if (node.IsMap()) {
    std::map<std::string, YAML::Mark> seen;
    for (auto it = node.begin(); it != node.end(); ++it) {
      const YAML::Node key = it->first;
      if (!key.IsScalar()) doc.fail(key.Mark(), fmt::format("keys must be plain names, got {}", describe(key)));
      auto [pos, inserted] = seen.emplace(key.Scalar(), key.Mark());
      if (!inserted)
        doc.fail(key.Mark(), fmt::format("duplicate key '{}' (first at line {})", key.Scalar(), pos->second.line + 1));
      check_structure(doc, it->second, depth + 1, visited);
    }
  }
}

}  // namespace

YAML::Node load_root(const Doc& doc, const fs::path& file, const std::string& shown) {
  std::error_code ec;
  if (!fs::exists(file, ec)) throw Error(fmt::format("{}: experiment file not found", shown));
  if (!fs::is_regular_file(file, ec)) throw Error(fmt::format("{}: not a regular file (expected a YAML experiment)", shown));
  std::ifstream in(file, std::ios::binary);
  if (!in) throw Error(fmt::format("{}: cannot open experiment file", shown));
  std::stringstream buf;
  buf << in.rdbuf();
  YAML::Node root;
  try {
    root = YAML::Load(buf.str());
  } catch (const YAML::Exception& e) {
    doc.fail(e.mark, fmt::format("invalid YAML: {}", e.msg));
  }
  if (!root.IsDefined() || root.IsNull())
    doc.fail(YAML::Mark(), "empty experiment file (expected a map with at least 'model', 'calibration' and 'arms')");
  if (!root.IsMap()) doc.fail(root.Mark(), fmt::format("an experiment must be a map of keys, got {}", describe(root)));
  std::set<int> visited;
  check_structure(doc, root, 0, visited);
  return root;
}

// ---------------------------------------------------------------------------------------------
// Scalars. Quoted scalars ("!" tag, or !!str) are strings; plain ones ("?" tag) are resolved as
// in the YAML 1.2 core schema, except that only true/false are booleans.

bool looks_int(const std::string& s) {
  std::size_t i = (!s.empty() && (s[0] == '+' || s[0] == '-')) ? 1 : 0;
  if (i == s.size()) return false;
  for (; i < s.size(); ++i)
    if (s[i] < '0' || s[i] > '9') return false;
  return true;
}

namespace {

bool looks_float(const std::string& s) {
  std::size_t i = (!s.empty() && (s[0] == '+' || s[0] == '-')) ? 1 : 0;
  const std::string rest = s.substr(i);
  if (rest == ".inf" || rest == ".Inf" || rest == ".INF") return true;
  if (i == 0 && (rest == ".nan" || rest == ".NaN" || rest == ".NAN")) return true;
  std::size_t digits = 0;
  while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i, ++digits;
  if (i < s.size() && s[i] == '.') {
    ++i;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i, ++digits;
  }
  if (digits == 0) return false;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
    std::size_t exp_digits = 0;
    while (i < s.size() && s[i] >= '0' && s[i] <= '9') ++i, ++exp_digits;
    if (exp_digits == 0) return false;
  }
  return i == s.size();
}

// The value of a plain scalar text, as the core schema reads it.
std::optional<ParamValue> plain_value(const std::string& s, std::string* why_not) {
  if (s == "true") return ParamValue(true);
  if (s == "false") return ParamValue(false);
  if (looks_int(s)) {
    std::int64_t v = 0;
    const char* b = s.data() + (s[0] == '+' ? 1 : 0);
    auto r = std::from_chars(b, s.data() + s.size(), v);
    if (r.ec != std::errc() || r.ptr != s.data() + s.size()) {
      if (why_not) *why_not = fmt::format("integer '{}' is out of range", s);
      return std::nullopt;
    }
    return ParamValue(v);
  }
  if (looks_float(s)) {
    const std::size_t sign = (s[0] == '+' || s[0] == '-') ? 1 : 0;
    const std::string rest = s.substr(sign);
    double v = 0;
    if (rest.size() == 4 && rest[0] == '.' && (rest[1] == 'i' || rest[1] == 'I')) {
      v = std::numeric_limits<double>::infinity();
    } else if (rest.size() == 4 && rest[0] == '.') {
      v = std::numeric_limits<double>::quiet_NaN();
    } else {
      auto r = std::from_chars(rest.data(), rest.data() + rest.size(), v);
      if (r.ec != std::errc() || r.ptr != rest.data() + rest.size()) {
        if (why_not) *why_not = fmt::format("number '{}' is out of range", s);
        return std::nullopt;
      }
    }
    if (s[0] == '-') v = -v;
    return ParamValue(v);
  }
  return ParamValue(s);
}

}  // namespace

ParamValue scalar_value(const Doc& doc, const YAML::Node& n, const YAML::Mark& mark, const std::string& what) {
  if (!n.IsScalar()) doc.fail(mark, fmt::format("{} must be a single value, got {}", what, describe(n)));
  const std::string& tag = n.Tag();
  if (tag == "!" || tag == "tag:yaml.org,2002:str") return ParamValue(n.Scalar());
  if (tag != "?" && tag != "tag:yaml.org,2002:int" && tag != "tag:yaml.org,2002:float" &&
      tag != "tag:yaml.org,2002:bool")
    doc.fail(mark, fmt::format("{}: unsupported YAML tag '{}'", what, tag));
  std::string why;
  auto v = plain_value(n.Scalar(), &why);
  if (!v) doc.fail(mark, fmt::format("{}: {}", what, why));
  if (const auto* d = std::get_if<double>(&*v); d && !std::isfinite(*d))
    doc.fail(mark, fmt::format("{} must be a finite number, got {}", what, n.Scalar()));
  return *v;
}

void emit_text(YAML::Emitter& out, const std::string& s) {
  const auto v = plain_value(s, nullptr);
  const bool plain_ok = !s.empty() && v && std::holds_alternative<std::string>(*v) && s != "~" && s != "null" &&
                        s != "Null" && s != "NULL" && s != "True" && s != "TRUE" && s != "False" && s != "FALSE";
  if (!plain_ok) out << YAML::DoubleQuoted;
  out << s;
}

void emit_value(YAML::Emitter& out, const ParamValue& v) {
  if (const auto* b = std::get_if<bool>(&v)) {
    out << (*b ? "true" : "false");
  } else if (const auto* i = std::get_if<std::int64_t>(&v)) {
    out << std::to_string(*i);
  } else if (const auto* d = std::get_if<double>(&v)) {
    out << real_text(*d);
  } else {
    emit_text(out, std::get<std::string>(v));
  }
}

// ---------------------------------------------------------------------------------------------
// Maps with known keys.

std::string read_string(const Doc& doc, const Entry& e, const std::string& what) {
  if (!e.value.IsScalar()) doc.fail(e.mark(), fmt::format("{} must be a string, got {}", what, describe(e.value)));
  return e.value.Scalar();
}

std::int64_t read_int(const Doc& doc, const Entry& e, const std::string& what, std::int64_t lo, std::int64_t hi) {
  const ParamValue v = scalar_value(doc, e.value, e.mark(), what);
  const auto* i = std::get_if<std::int64_t>(&v);
  if (i == nullptr)
    doc.fail(e.mark(), fmt::format("{} must be an int, got {} '{}'", what, param_type_name(param_value_type(v)),
                                   e.value.Scalar()));
  if (*i < lo || *i > hi) {
    const std::string upper = hi == std::numeric_limits<std::int64_t>::max() ? "inf" : std::to_string(hi);
    doc.fail(e.mark(), fmt::format("{} must be in [{}, {}], got {}", what, lo, upper, *i));
  }
  return *i;
}

bool read_bool(const Doc& doc, const Entry& e, const std::string& what) {
  const ParamValue v = scalar_value(doc, e.value, e.mark(), what);
  const auto* b = std::get_if<bool>(&v);
  if (b == nullptr) doc.fail(e.mark(), fmt::format("{} must be true or false, got '{}'", what, e.value.Scalar()));
  return *b;
}

fs::path read_existing(const Doc& doc, const Entry& e, const std::string& what, bool directory) {
  const std::string text = read_string(doc, e, what);
  if (text.empty()) doc.fail(e.mark(), fmt::format("{} must not be empty", what));
  const fs::path p = doc.resolve(text);
  std::error_code ec;
  if (!fs::exists(p, ec)) doc.fail(e.mark(), fmt::format("{} not found: {}", what, p.string()));
  if (directory && !fs::is_directory(p, ec)) doc.fail(e.mark(), fmt::format("{} is not a directory: {}", what, p.string()));
  if (!directory && !fs::is_regular_file(p, ec)) doc.fail(e.mark(), fmt::format("{} is not a file: {}", what, p.string()));
  if (!directory && fs::file_size(p, ec) == 0) doc.fail(e.mark(), fmt::format("{} is empty: {}", what, p.string()));
  return p;
}

std::vector<fs::path> read_plugin_paths(const Doc& doc, const Entry* e) {
  std::vector<fs::path> out;
  if (e == nullptr || e->value.IsNull()) return out;
  if (!e->value.IsSequence())
    doc.fail(e->mark(), fmt::format("plugin_paths must be a list of directories, got {}", describe(e->value)));
  for (std::size_t i = 0; i < e->value.size(); ++i) {
    const Entry item{"", e->key_node, e->value[i]};
    // A shared YAML file must not make ptqlab dlopen libraries from anywhere it likes: its plugin
    // directories lie inside the directory of the file itself (symbolic links resolved). Other
    // directories are given on the command line (--plugin-path).
    const std::string text = item.value.IsScalar() ? item.value.Scalar() : std::string();
    const fs::path given(text);
    const bool escapes = given.is_absolute() || std::any_of(given.begin(), given.end(), [](const fs::path& c) { return c == ".."; });
    if (escapes)
      doc.fail(item.mark(), fmt::format("plugin path '{}' must be a relative directory inside the experiment file's "
                                        "directory, without '..' (give other plugin directories with --plugin-path)",
                                        text));
    const fs::path dir = read_existing(doc, item, "plugin path", true);
    std::error_code ec1, ec2;
    const fs::path real = fs::canonical(dir, ec1), home = fs::canonical(doc.dir(), ec2);
    const auto rel = real.lexically_relative(home);
    if (ec1 || ec2 || rel.empty() || *rel.begin() == "..")
      doc.fail(item.mark(), fmt::format("plugin path '{}' leads outside the experiment file's directory (to {}) "
                                        "through a symbolic link (give other plugin directories with --plugin-path)",
                                        text, real.string()));
    out.push_back(dir);
  }
  return out;
}

}  // namespace ptqlab::experiment_file
