// YAML experiment files: parsing, validation against component schemas, base merging, sweep
// expansion and the canonical resolved configuration of every arm (docs/experiments.md).
//
// Every user error is a ptqlab::Error "FILE:LINE:COL: message" pointing at the offending node.
// The YAML tree is only read here; merged components keep the original nodes, so errors in
// values inherited from `base:` point into `base:`.
#include "ptqlab/engine/experiment.hpp"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>
#include <system_error>

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/model/model_config.hpp"
#include "ptqlab/quant/allocation.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/sha256.hpp"

namespace ptqlab {
namespace {

namespace fs = std::filesystem;

constexpr std::size_t kMaxNameLength = 100;
constexpr int kMaxDepth = 64;
constexpr std::int64_t kMaxNsamples = 1000000;
// Sweeps multiply: a few short lists (or YAML aliases) could otherwise ask for millions of arms and
// exhaust memory before anything runs. Far above any real study.
constexpr std::size_t kMaxArms = 10000;

// ---------------------------------------------------------------------------------------------
// Small helpers.

bool is_name_char(char c) {
  return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
         c == '-';
}
bool is_alnum(char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }

// ^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$ : arm, experiment and dataset names (they become file names).
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

std::string join(const std::vector<std::string>& items, const char* sep = ", ") {
  std::string out;
  for (std::size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

// " (did you mean 'x'?)", or a list of what is allowed when nothing is close.
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

// Floats as text that reads back as a float (1.0, not 1), so the resolved YAML keeps types.
std::string real_text(double d) {
  if (std::isnan(d)) return ".nan";
  if (std::isinf(d)) return d > 0 ? ".inf" : "-.inf";
  std::string t = param_value_text(ParamValue(d));
  if (t.find_first_of(".eE") == std::string::npos) t += ".0";
  return t;
}

// ---------------------------------------------------------------------------------------------
// Errors with positions.

// Control characters (a tab or newline in a quoted name) shown as escapes: an error stays one line.
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

// A scalar node's typed value. `what` names the value in messages.
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

// Emits text as a string that reads back as a string.
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

// A file or directory named by the entry, resolved and checked.
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

// ---------------------------------------------------------------------------------------------
// Components as written (before validation) and as resolved.

struct RawParam {
  std::string key;
  YAML::Node key_node;
  YAML::Node value;
};

struct RawComponent {
  std::optional<std::string> name;
  YAML::Mark name_mark;
  YAML::Mark mark;  // the component's node
  std::vector<RawParam> params;
};

std::vector<RawParam> read_params(const Doc& doc, const Entry* e, const std::string& what) {
  std::vector<RawParam> out;
  if (e == nullptr || e->value.IsNull()) return out;
  if (!e->value.IsMap()) doc.fail(e->mark(), fmt::format("{} params must be a map, got {}", what, describe(e->value)));
  for (auto it = e->value.begin(); it != e->value.end(); ++it) out.push_back({it->first.Scalar(), it->first, it->second});
  return out;
}

// "rtn" or {name: rtn, params: {...}}.
RawComponent read_component(const Doc& doc, const YAML::Node& node, const YAML::Mark& mark, const std::string& what) {
  RawComponent c;
  c.mark = mark;
  if (node.IsScalar()) {
    c.name = node.Scalar();
    c.name_mark = node.Mark();
    return c;
  }
  if (!node.IsMap())
    doc.fail(mark, fmt::format("{} must be a component name or a map with 'name' and 'params', got {}", what,
                               describe(node)));
  const MapView m(doc, node, mark, what, {"name", "params"});
  if (const Entry* n = m.get("name")) {
    c.name = read_string(doc, *n, what + " name");
    c.name_mark = n->mark();
  }
  c.params = read_params(doc, m.get("params"), what);
  return c;
}

// Deep merge of a base component into an arm's: params merged by key (arm wins). An arm that names
// a different component than base replaces it (base params belong to base's component).
RawComponent merge(const RawComponent& base, const RawComponent& arm) {
  if (arm.name && base.name && *arm.name != *base.name) return arm;
  RawComponent out = base;
  if (arm.name) {
    out.name = arm.name;
    out.name_mark = arm.name_mark;
  }
  out.mark = arm.mark;
  for (const auto& p : arm.params) {
    auto it = std::find_if(out.params.begin(), out.params.end(), [&](const RawParam& q) { return q.key == p.key; });
    if (it != out.params.end())
      *it = p;
    else
      out.params.push_back(p);
  }
  return out;
}

struct Component {
  ComponentKind kind = ComponentKind::quantizer;
  const ComponentSchema* schema = nullptr;
  std::string name;
  std::map<std::string, ParamValue> given;  // validated values from the file

  std::string label() const { return fmt::format("{} {}", component_kind_name(kind), name); }
  ComponentRef ref() const { return ComponentRef{kind, name, Params::resolve(*schema, given)}; }
};

std::vector<std::string> param_names(const ComponentSchema& schema) {
  std::vector<std::string> out;
  for (const auto& p : schema.params) out.push_back(p.name);
  return out;
}

// Parses one parameter value and checks it against its spec; errors at the value.
ParamValue param_value(const Doc& doc, const ParamSpec& spec, const YAML::Node& node, const YAML::Mark& mark,
                       const std::string& label, const std::string& suffix = "") {
  const std::string what = fmt::format("{}: param '{}'", label, spec.name);
  if (!node.IsScalar())
    doc.fail(mark, fmt::format("{} must be {}, got {}{}", what, type_with_article(spec.type), describe(node), suffix));
  const ParamValue v = scalar_value(doc, node, mark, what);
  const ParamType got = param_value_type(v);
  if (got != spec.type && !(spec.type == ParamType::real && got == ParamType::integer))
    doc.fail(mark, fmt::format("{} must be {}, got {} '{}'{}", what, type_with_article(spec.type), param_type_name(got),
                               node.Scalar(), suffix));
  if (auto why = check_param(spec, v)) doc.fail(mark, fmt::format("{} {}{}", what, *why, suffix));
  return v;
}

const ParamSpec& find_param(const Doc& doc, const Component& c, const std::string& param, const YAML::Mark& mark,
                            const std::string& prefix) {
  if (const ParamSpec* spec = c.schema->find(param)) return *spec;
  const auto names = param_names(*c.schema);
  doc.fail(mark, fmt::format("{}{}: unknown param '{}'{}", prefix, c.label(), param,
                             names.empty() ? std::string(" (it has no params)") : hint(param, names)));
}

Component resolve(const Doc& doc, const SchemaSource& schemas, ComponentKind kind, const RawComponent& raw,
                  const std::string& what) {
  if (!raw.name) doc.fail(raw.mark, fmt::format("{} has no 'name'", what));
  Component c;
  c.kind = kind;
  c.name = *raw.name;
  c.schema = schemas.find(kind, c.name);
  if (c.schema == nullptr)
    doc.fail(raw.name_mark,
             fmt::format("unknown {} '{}'{}", component_kind_name(kind), c.name, hint(c.name, schemas.names(kind))));
  for (const auto& p : raw.params) {
    const ParamSpec& spec = find_param(doc, c, p.key, p.key_node.Mark(), "");
    const Entry e{p.key, p.key_node, p.value};
    c.given[p.key] = param_value(doc, spec, p.value, e.mark(), c.label());
  }
  return c;
}

// ---------------------------------------------------------------------------------------------
// Arms and sweeps.

struct RawArmDefaults {  // base:
  std::optional<std::vector<RawComponent>> preprocess;
  std::optional<RawComponent> mask;
  std::optional<RawComponent> quantizer;
};

std::vector<RawComponent> read_preprocess(const Doc& doc, const Entry& e, const std::string& what) {
  std::vector<RawComponent> out;
  if (e.value.IsNull()) return out;
  if (!e.value.IsSequence())
    doc.fail(e.mark(), fmt::format("{} must be a list of preprocessors, got {}", what, describe(e.value)));
  for (std::size_t i = 0; i < e.value.size(); ++i) {
    const YAML::Node item = e.value[i];
    out.push_back(read_component(doc, item, item.Mark(), fmt::format("{}[{}]", what, i)));
  }
  return out;
}

struct Axis {
  std::string path;
  YAML::Mark mark;  // the axis key
  enum class Target { quantizer, mask, preprocess, allocator } target = Target::quantizer;
  std::size_t index = 0;  // preprocess step
  std::string param;
  std::vector<ParamValue> values;
  bool zip = false;
};

// A sweep's bit budget: the targets and the candidate values of the parameter it adjusts.
struct Budget {
  YAML::Mark mark;            // the budget key
  YAML::Mark parameter_mark;  // the parameter's value
  std::string path;           // "quantizer.ratio"
  Axis::Target target = Axis::Target::quantizer;
  std::string param;
  std::vector<double> targets;
  std::vector<YAML::Mark> target_marks;
  std::vector<ParamValue> candidates;
  double lo = 0, hi = 0;
};

// An allocated arm's stage as read (docs/allocation.md).
struct CandidateDraft {
  std::string label;
  YAML::Mark mark;
  std::optional<Component> mask;
  Component quantizer;
  bool whole_layer = false;
};
struct AllocationDraft {
  Component allocator;
  double budget = 0;
  YAML::Mark budget_mark;  // where the budget in use was given (the key, or a sweep axis)
  bool has_budget = false;
  std::string metric = "allin", unit = "linear", loss = "hess";
  YAML::Mark unit_mark;
  std::vector<CandidateDraft> candidates;
};

// An arm after merging, before sweep expansion.
struct ArmDraft {
  std::string name;
  YAML::Mark name_mark;
  std::vector<Component> preprocess;
  std::optional<Component> mask;
  Component quantizer;
  std::vector<Axis> axes;  // grid axes, then zip axes
  std::optional<Budget> budget;
  std::optional<AllocationDraft> alloc;
};

Component* axis_component(ArmDraft& arm, const Axis& axis) {
  switch (axis.target) {
    case Axis::Target::quantizer: return arm.alloc ? nullptr : &arm.quantizer;
    case Axis::Target::mask: return arm.mask ? &*arm.mask : nullptr;
    case Axis::Target::allocator: return arm.alloc ? &arm.alloc->allocator : nullptr;
    case Axis::Target::preprocess: return axis.index < arm.preprocess.size() ? &arm.preprocess[axis.index] : nullptr;
  }
  return nullptr;
}

void read_axes(const Doc& doc, const Entry& e, bool zip, ArmDraft& arm) {
  const std::string section = zip ? "sweep.zip" : "sweep.grid";
  if (!e.value.IsMap())
    doc.fail(e.mark(), fmt::format("{} must be a map of axis -> list of values, got {}", section, describe(e.value)));
  const std::string expected =
      "expected quantizer.<param>, mask.<param>, preprocess.<index>.<param>, allocator.budget or allocator.<param>";
  std::size_t zip_len = 0;
  std::string zip_first;
  for (auto it = e.value.begin(); it != e.value.end(); ++it) {
    Axis axis;
    axis.path = it->first.Scalar();
    axis.mark = it->first.Mark();
    axis.zip = zip;
    for (const auto& other : arm.axes)
      if (other.path == axis.path)
        doc.fail(axis.mark, fmt::format("sweep axis '{}' appears in both grid and zip", axis.path));

    std::vector<std::string> parts;
    std::string part;
    std::istringstream ss(axis.path);
    while (std::getline(ss, part, '.')) parts.push_back(part);
    if (!axis.path.empty() && axis.path.back() == '.') parts.push_back("");
    const bool prefix_ok = !parts.empty() && (parts[0] == "quantizer" || parts[0] == "mask" ||
                                              parts[0] == "preprocess" || parts[0] == "allocator");
    if (!prefix_ok) {
      const std::string first = parts.empty() ? axis.path : parts[0];
      doc.fail(axis.mark, fmt::format("unknown sweep axis '{}': {}{}", axis.path, expected,
                                      hint(first, {"quantizer", "mask", "preprocess", "allocator"})));
    }
    if (parts[0] == "preprocess") {
      if (parts.size() != 3 || parts[2].empty() || !looks_int(parts[1]) || parts[1][0] == '-' || parts[1][0] == '+' ||
          parts[1].size() > 9)
        doc.fail(axis.mark, fmt::format("unknown sweep axis '{}': {}", axis.path, expected));
      axis.target = Axis::Target::preprocess;
      axis.index = static_cast<std::size_t>(std::stoull(parts[1]));
      axis.param = parts[2];
    } else {
      if (parts.size() != 2 || parts[1].empty())
        doc.fail(axis.mark, fmt::format("unknown sweep axis '{}': {}", axis.path, expected));
      axis.target = parts[0] == "mask"        ? Axis::Target::mask
                    : parts[0] == "allocator" ? Axis::Target::allocator
                                              : Axis::Target::quantizer;
      axis.param = parts[1];
    }

    const Component* c = axis_component(arm, axis);
    if (c == nullptr) {
      if (axis.target == Axis::Target::allocator)
        doc.fail(axis.mark, fmt::format("sweep axis '{}': arm '{}' has no allocator", axis.path, arm.name));
      if (axis.target == Axis::Target::quantizer)
        doc.fail(axis.mark, fmt::format("sweep axis '{}': arm '{}' has an allocator; its quantizers are in "
                                        "'candidates' (sweep allocator.budget or allocator.<param>)",
                                        axis.path, arm.name));
      if (axis.target == Axis::Target::mask)
        doc.fail(axis.mark, fmt::format("sweep axis '{}': arm '{}' has no mask", axis.path, arm.name));
      doc.fail(axis.mark, fmt::format("sweep axis '{}': arm '{}' has no preprocess step {} (it has {})", axis.path,
                                      arm.name, axis.index, arm.preprocess.size()));
    }
    // allocator.budget is the allocation's budget (bits per weight), not a plugin parameter.
    static const ParamSpec kBudgetSpec{"budget", ParamType::real, 1.0, "", 1e-9, 64.0, {}};
    const bool budget_axis = axis.target == Axis::Target::allocator && axis.param == "budget";
    const ParamSpec& spec = budget_axis ? kBudgetSpec
                                        : find_param(doc, *c, axis.param, axis.mark,
                                                     fmt::format("sweep axis '{}': ", axis.path));

    const Entry values{axis.path, it->first, it->second};
    if (!values.value.IsSequence())
      doc.fail(values.mark(), fmt::format("sweep axis '{}' must be a list of values, got {}", axis.path,
                                          describe(values.value)));
    if (values.value.size() == 0) doc.fail(values.mark(), fmt::format("sweep axis '{}' has no values", axis.path));
    for (std::size_t i = 0; i < values.value.size(); ++i) {
      const YAML::Node v = values.value[i];
      axis.values.push_back(param_value(doc, spec, v, v.Mark(), budget_axis ? "allocator" : c->label(),
                                        fmt::format(" (sweep axis '{}')", axis.path)));
      if (budget_axis) axis.values.back() = ParamValue(std::get_if<std::int64_t>(&axis.values.back())
                                                           ? static_cast<double>(std::get<std::int64_t>(axis.values.back()))
                                                           : std::get<double>(axis.values.back()));
    }
    if (zip) {
      if (zip_first.empty()) {
        zip_first = axis.path;
        zip_len = axis.values.size();
      } else if (axis.values.size() != zip_len) {
        doc.fail(axis.mark, fmt::format("zip axis '{}' has {} values but '{}' has {}; zip axes must have equal lengths",
                                        axis.path, axis.values.size(), zip_first, zip_len));
      }
    }
    arm.axes.push_back(std::move(axis));
  }
}

// A number (int or float) from a scalar, finite; `what` names it in errors.
double read_number(const Doc& doc, const YAML::Node& n, const std::string& what) {
  const ParamValue v = scalar_value(doc, n, n.Mark(), what);
  if (const auto* i = std::get_if<std::int64_t>(&v)) return static_cast<double>(*i);
  if (const auto* d = std::get_if<double>(&v)) return *d;
  doc.fail(n.Mark(), fmt::format("{} must be a number, got {} '{}'", what, param_type_name(param_value_type(v)), n.Scalar()));
}

// sweep.budget: {target_bits: [..], parameter: quantizer.<p> | mask.<p>, range: [lo, hi], step: s}.
void read_budget(const Doc& doc, const Entry& e, ArmDraft& arm) {
  const MapView m(doc, e.value, e.mark(), "sweep.budget", {"target_bits", "parameter", "range", "step"});
  if (arm.alloc)
    doc.fail(e.key_node.Mark(), fmt::format("arm '{}' has an allocator: sweep its budget with "
                                            "'grid: {{allocator.budget: [...]}}' instead of sweep.budget",
                                            arm.name));
  Budget b;
  b.mark = e.key_node.Mark();

  const Entry& p = m.require("parameter");
  b.path = read_string(doc, p, "sweep.budget.parameter");
  b.parameter_mark = p.mark();
  const auto dot = b.path.find('.');
  const std::string head = b.path.substr(0, dot);
  if (dot == std::string::npos || (head != "quantizer" && head != "mask") || dot + 1 == b.path.size() ||
      b.path.find('.', dot + 1) != std::string::npos)
    doc.fail(p.mark(), fmt::format("unknown budget parameter '{}': expected quantizer.<param> or mask.<param>{}", b.path,
                                   hint(head, {"quantizer", "mask"})));
  b.target = head == "mask" ? Axis::Target::mask : Axis::Target::quantizer;
  b.param = b.path.substr(dot + 1);
  Axis probe;
  probe.target = b.target;
  const Component* c = axis_component(arm, probe);
  if (c == nullptr) doc.fail(p.mark(), fmt::format("budget parameter '{}': arm '{}' has no mask", b.path, arm.name));
  const ParamSpec& spec = find_param(doc, *c, b.param, p.mark(), fmt::format("budget parameter '{}': ", b.path));
  if (spec.type != ParamType::integer && spec.type != ParamType::real)
    doc.fail(p.mark(), fmt::format("budget parameter '{}' is a {} parameter; a budget adjusts an int or float parameter",
                                   b.path, param_type_name(spec.type)));
  for (const auto& a : arm.axes)
    if (a.path == b.path)
      doc.fail(p.mark(), fmt::format("budget parameter '{}' is also a sweep axis (the budget chooses its value)", b.path));

  const Entry& t = m.require("target_bits");
  if (!t.value.IsSequence())
    doc.fail(t.mark(), fmt::format("sweep.budget.target_bits must be a list of numbers (all-in bits per weight), got {}",
                                   describe(t.value)));
  if (t.value.size() == 0) doc.fail(t.mark(), "sweep.budget.target_bits has no values");
  for (std::size_t i = 0; i < t.value.size(); ++i) {
    const YAML::Node v = t.value[i];
    const double bits = read_number(doc, v, "sweep.budget.target_bits value");
    if (!(bits > 0)) doc.fail(v.Mark(), fmt::format("sweep.budget.target_bits values must be positive, got {}", v.Scalar()));
    if (std::find(b.targets.begin(), b.targets.end(), bits) != b.targets.end())
      doc.fail(v.Mark(), fmt::format("sweep.budget.target_bits: {} is given twice", v.Scalar()));
    b.targets.push_back(bits);
    b.target_marks.push_back(v.Mark());
  }

  // The search range: the parameter's schema bounds unless given.
  if (const Entry* r = m.get("range")) {
    if (!r->value.IsSequence() || r->value.size() != 2)
      doc.fail(r->mark(), fmt::format("sweep.budget.range must be a list [low, high], got {}", describe(r->value)));
    for (std::size_t i = 0; i < 2; ++i) {
      const YAML::Node v = r->value[i];
      param_value(doc, spec, v, v.Mark(), c->label(), " (sweep.budget.range)");
    }
    b.lo = read_number(doc, r->value[0], "sweep.budget.range low");
    b.hi = read_number(doc, r->value[1], "sweep.budget.range high");
    if (b.lo > b.hi)
      doc.fail(r->mark(), fmt::format("sweep.budget.range [{}, {}] is empty (low > high)", r->value[0].Scalar(),
                                      r->value[1].Scalar()));
  } else {
    if (!spec.min || !spec.max)
      doc.fail(p.mark(), fmt::format("budget parameter '{}' has no bounded range in its schema: give sweep.budget.range",
                                     b.path));
    b.lo = *spec.min;
    b.hi = *spec.max;
  }
  double step = spec.type == ParamType::integer ? 1.0 : (b.hi - b.lo) / 1000.0;
  if (const Entry* st = m.get("step")) {
    step = read_number(doc, st->value, "sweep.budget.step");
    if (!(step > 0)) doc.fail(st->mark(), fmt::format("sweep.budget.step must be positive, got {}", st->value.Scalar()));
    if (spec.type == ParamType::integer && step != std::floor(step))
      doc.fail(st->mark(), fmt::format("sweep.budget.step must be a whole number for int parameter '{}'", b.path));
  }
  if (step <= 0) step = 1.0;  // a range of one value
  constexpr double kMaxCandidates = 100000;
  if ((b.hi - b.lo) / step + 1 > kMaxCandidates)
    doc.fail(m.mark(), fmt::format("sweep.budget would try {:.0f} values of '{}' (at most {:.0f}): give a narrower range "
                                   "or a larger step",
                                   std::floor((b.hi - b.lo) / step) + 1, b.path, kMaxCandidates));
  b.candidates = budget_candidates(spec.type, b.lo, b.hi, step);
  arm.budget = std::move(b);
}

void read_sweep(const Doc& doc, const Entry& e, ArmDraft& arm) {
  const MapView sweep(doc, e.value, e.mark(), "sweep", {"grid", "zip", "budget"});
  if (const Entry* g = sweep.get("grid")) read_axes(doc, *g, false, arm);
  if (const Entry* z = sweep.get("zip")) read_axes(doc, *z, true, arm);
  if (const Entry* b = sweep.get("budget")) read_budget(doc, *b, arm);
  if (arm.axes.empty() && !arm.budget) doc.fail(sweep.mark(), "sweep has no axes (give grid, zip and/or budget)");
  std::size_t arms = arm.budget ? arm.budget->targets.size() : 1;  // times grid sizes and the zip length (capped)
  bool zip_counted = false;
  for (const auto& axis : arm.axes) {
    if (axis.zip && zip_counted) continue;
    zip_counted = zip_counted || axis.zip;
    arms = std::min(arms * axis.values.size(), kMaxArms + 1);
  }
  if (arms > kMaxArms)
    doc.fail(sweep.mark(), fmt::format("sweep makes more than {} arms (an experiment has at most {})", kMaxArms, kMaxArms));
}

// Every combination: grid axes as a row-major cartesian product (first axis slowest), each
// combined with every zip position (innermost). Entries are value indices per axis.
std::vector<std::vector<std::size_t>> combinations(const std::vector<Axis>& axes) {
  std::vector<std::size_t> grid;
  std::optional<std::size_t> zip_len;
  for (std::size_t a = 0; a < axes.size(); ++a) {
    if (axes[a].zip)
      zip_len = axes[a].values.size();
    else
      grid.push_back(a);
  }
  std::vector<std::vector<std::size_t>> out(1, std::vector<std::size_t>(axes.size(), 0));
  for (std::size_t a : grid) {
    std::vector<std::vector<std::size_t>> next;
    for (const auto& combo : out)
      for (std::size_t v = 0; v < axes[a].values.size(); ++v) {
        next.push_back(combo);
        next.back()[a] = v;
      }
    out = std::move(next);
  }
  if (zip_len) {
    std::vector<std::vector<std::size_t>> next;
    for (const auto& combo : out)
      for (std::size_t v = 0; v < *zip_len; ++v) {
        next.push_back(combo);
        for (std::size_t a = 0; a < axes.size(); ++a)
          if (axes[a].zip) next.back()[a] = v;
      }
    out = std::move(next);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The canonical resolved configuration.

void emit_params(YAML::Emitter& out, const Params& params, const std::vector<std::string>& skip = {}) {
  std::size_t shown = 0;
  for (const auto& kv : params.values())
    if (std::find(skip.begin(), skip.end(), kv.first) == skip.end()) ++shown;
  if (shown == 0) {
    out << YAML::Flow << YAML::BeginMap << YAML::EndMap;
    return;
  }
  out << YAML::BeginMap;
  for (const auto& [k, v] : params.values()) {
    if (std::find(skip.begin(), skip.end(), k) != skip.end()) continue;
    out << YAML::Key;
    emit_text(out, k);
    out << YAML::Value;
    emit_value(out, v);
  }
  out << YAML::EndMap;
}

void emit_component(YAML::Emitter& out, const ComponentRef& c) {
  out << YAML::BeginMap << YAML::Key << "name" << YAML::Value;
  emit_text(out, c.name);
  out << YAML::Key << "params" << YAML::Value;
  emit_params(out, c.params);
  out << YAML::EndMap;
}

std::string resolved_yaml(const Experiment& x, const ArmSpec& arm) {
  YAML::Emitter out;
  out.SetIndent(2);
  out << YAML::BeginMap;
  out << YAML::Key << "experiment" << YAML::Value;
  emit_text(out, x.name);
  out << YAML::Key << "model" << YAML::Value;
  emit_text(out, x.model_dir.string());
  out << YAML::Key << "seed" << YAML::Value << std::to_string(x.seed);
  out << YAML::Key << "calibration" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "text" << YAML::Value;
  emit_text(out, x.calibration.text.string());
  out << YAML::Key << "nsamples" << YAML::Value << std::to_string(x.calibration.nsamples);
  out << YAML::Key << "seq_len" << YAML::Value << std::to_string(x.calibration.seq_len);
  out << YAML::Key << "seed" << YAML::Value << std::to_string(x.calibration.seed);
  // Only when asked for: results held in float32 keep the config hash they always had.
  if (x.calibration.stream_dtype != StreamDType::f32)
    out << YAML::Key << "stream_dtype" << YAML::Value << stream_dtype_name(x.calibration.stream_dtype);
  out << YAML::EndMap;
  out << YAML::Key << "eval" << YAML::Value;
  if (x.evaluators.empty()) out << YAML::Flow;
  out << YAML::BeginSeq;
  for (const auto& ev : x.evaluators) {
    out << YAML::BeginMap << YAML::Key << "evaluator" << YAML::Value;
    emit_text(out, ev.evaluator.name);
    out << YAML::Key << "params" << YAML::Value;
    emit_params(out, ev.evaluator.params, ev.evaluator.unhashed);
    // Datasets sorted by name: the order of keys in the file does not matter.
    std::map<std::string, std::string> datasets;
    for (const auto& d : ev.datasets) datasets[d.name] = d.file.string();
    out << YAML::Key << "datasets" << YAML::Value << YAML::BeginMap;
    for (const auto& [name, file] : datasets) {
      out << YAML::Key;
      emit_text(out, name);
      out << YAML::Value;
      emit_text(out, file);
    }
    out << YAML::EndMap << YAML::EndMap;
  }
  out << YAML::EndSeq;
  out << YAML::Key << "log_tensors" << YAML::Value << (x.log_tensors ? "true" : "false");
  out << YAML::Key << "arm" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "name" << YAML::Value;
  emit_text(out, arm.name);
  out << YAML::Key << "preprocess" << YAML::Value;
  if (arm.preprocessors.empty()) out << YAML::Flow;
  out << YAML::BeginSeq;
  for (const auto& p : arm.preprocessors) emit_component(out, p);
  out << YAML::EndSeq;
  out << YAML::Key << "mask" << YAML::Value;
  if (arm.mask)
    emit_component(out, *arm.mask);
  else
    out << YAML::Null;
  out << YAML::Key << "quantizer" << YAML::Value;
  if (arm.allocation)
    out << YAML::Null;
  else
    emit_component(out, arm.quantizer);
  if (arm.allocation) {  // only allocated arms have the key, so other arms keep their hashes
    const AllocationSpec& a = *arm.allocation;
    out << YAML::Key << "allocation" << YAML::Value << YAML::BeginMap;
    out << YAML::Key << "allocator" << YAML::Value;
    emit_component(out, a.allocator);
    out << YAML::Key << "budget" << YAML::Value;
    emit_value(out, a.budget);
    out << YAML::Key << "budget_bits" << YAML::Value << std::to_string(a.budget_bits);
    out << YAML::Key << "metric" << YAML::Value << a.metric;
    out << YAML::Key << "unit" << YAML::Value << a.unit;
    out << YAML::Key << "loss" << YAML::Value << a.loss;
    out << YAML::Key << "candidates" << YAML::Value << YAML::BeginSeq;
    for (const auto& c : a.candidates) {
      out << YAML::BeginMap << YAML::Key << "name" << YAML::Value;
      emit_text(out, c.label);
      out << YAML::Key << "mask" << YAML::Value;
      if (c.mask)
        emit_component(out, *c.mask);
      else
        out << YAML::Null;
      out << YAML::Key << "quantizer" << YAML::Value;
      emit_component(out, c.quantizer);
      out << YAML::EndMap;
    }
    out << YAML::EndSeq << YAML::EndMap;
  }
  if (arm.budget) {  // only budget arms have the key, so other arms keep their hashes
    out << YAML::Key << "budget" << YAML::Value << YAML::BeginMap;
    out << YAML::Key << "target_bits" << YAML::Value;
    emit_value(out, arm.budget->target_bits);
    out << YAML::Key << "parameter" << YAML::Value;
    emit_text(out, arm.budget->parameter);
    out << YAML::Key << "value" << YAML::Value;
    emit_value(out, arm.budget->value);
    out << YAML::Key << "predicted_bits" << YAML::Value;
    emit_value(out, arm.budget->predicted_bits);
    out << YAML::EndMap;
  }
  out << YAML::EndMap;
  out << YAML::EndMap;
  if (!out.good()) throw std::logic_error("resolved experiment YAML: " + out.GetLastError());
  return std::string(out.c_str()) + "\n";
}

// ---------------------------------------------------------------------------------------------
// The sections of the file.

const std::vector<std::string> kTopKeys = {"name",        "model", "seed", "plugin_paths", "log_tensors",
                                           "calibration", "eval",  "base", "arms"};

void read_calibration(const Doc& doc, const Entry& e, const LlamaConfig& model, Experiment& x) {
  const MapView m(doc, e.value, e.mark(), "calibration", {"text", "nsamples", "seq_len", "seed", "stream_dtype"});
  x.calibration.text = read_existing(doc, m.require("text"), "calibration text", false);
  if (const Entry* n = m.get("nsamples"))
    x.calibration.nsamples = static_cast<int>(read_int(doc, *n, "calibration.nsamples", 1, kMaxNsamples));
  const int max_pos = model.max_position_embeddings;
  x.calibration.seq_len = max_pos;
  if (const Entry* s = m.get("seq_len")) {
    const auto v = read_int(doc, *s, "calibration.seq_len", 0, std::numeric_limits<std::int64_t>::max());
    if (v == 1)
      doc.fail(s->mark(), "calibration.seq_len must be >= 2 (or 0 for the model's max_position_embeddings), got 1");
    if (v > max_pos)
      doc.fail(s->mark(), fmt::format("calibration.seq_len {} exceeds the model's max_position_embeddings ({})", v,
                                      max_pos));
    if (v != 0) x.calibration.seq_len = static_cast<int>(v);
  }
  if (const Entry* d = m.get("stream_dtype")) {
    const std::string v = d->value.IsScalar() ? d->value.Scalar() : std::string();
    if (!parse_stream_dtype(v, x.calibration.stream_dtype))
      doc.fail(d->mark(), fmt::format("calibration.stream_dtype must be f32, bf16 or f16, got {}", describe(d->value)));
  }
  x.calibration.seed = x.seed;
  if (const Entry* s = m.get("seed"))
    x.calibration.seed = static_cast<std::uint64_t>(
        read_int(doc, *s, "calibration.seed", 0, std::numeric_limits<std::int64_t>::max()));
}

void read_eval(const Doc& doc, const SchemaSource& schemas, const Entry& e, Experiment& x) {
  if (e.value.IsNull()) return;
  if (!e.value.IsSequence()) doc.fail(e.mark(), fmt::format("eval must be a list of evaluators, got {}", describe(e.value)));
  // (evaluator, dataset) -> line of its first appearance: results are stored under both names.
  std::map<std::pair<std::string, std::string>, int> seen;
  for (std::size_t i = 0; i < e.value.size(); ++i) {
    const YAML::Node node = e.value[i];
    const std::string what = fmt::format("eval[{}]", i);
    const MapView m(doc, node, node.Mark(), what, {"evaluator", "params", "datasets"});
    const Entry& ev = m.require("evaluator");
    RawComponent raw;
    raw.name = read_string(doc, ev, what + " evaluator");
    raw.name_mark = ev.mark();
    raw.mark = node.Mark();
    raw.params = read_params(doc, m.get("params"), what);
    EvaluatorSpec spec;
    const Component c = resolve(doc, schemas, ComponentKind::evaluator, raw, what);
    spec.evaluator = c.ref();
    if (const ComponentSchema* schema = schemas.find(ComponentKind::evaluator, spec.evaluator.name))
      for (const auto& p : schema->params)
        if (!p.hashed_when_default && spec.evaluator.params.values().count(p.name) != 0 &&
            spec.evaluator.params.values().at(p.name) == p.default_value)
          spec.evaluator.unhashed.push_back(p.name);

    const Entry& ds = m.require("datasets");
    if (!ds.value.IsMap())
      doc.fail(ds.mark(), fmt::format("{} datasets must be a map of name -> text file, got {}", what, describe(ds.value)));
    if (ds.value.size() == 0) doc.fail(ds.mark(), fmt::format("{} datasets is empty", what));
    for (auto it = ds.value.begin(); it != ds.value.end(); ++it) {
      const Entry d{it->first.Scalar(), it->first, it->second};
      if (!valid_name(d.key))
        doc.fail(d.key_node.Mark(), fmt::format("invalid dataset name '{}': {}", d.key, name_rule()));
      auto [pos, inserted] = seen.emplace(std::make_pair(c.name, d.key), d.key_node.Mark().line + 1);
      if (!inserted)
        doc.fail(d.key_node.Mark(), fmt::format("dataset '{}' is evaluated by {} twice (first at line {})", d.key,
                                                c.name, pos->second));
      spec.datasets.push_back({d.key, read_existing(doc, d, fmt::format("dataset '{}' file", d.key), false),
                               d.key_node.Mark().line + 1, d.key_node.Mark().column + 1});
    }
    x.evaluators.push_back(std::move(spec));
  }
}

RawArmDefaults read_base(const Doc& doc, const SchemaSource& schemas, const Entry& e) {
  RawArmDefaults base;
  if (e.value.IsNull()) return base;
  const MapView m(doc, e.value, e.mark(), "base", {"preprocess", "mask", "quantizer"});
  if (const Entry* p = m.get("preprocess")) base.preprocess = read_preprocess(doc, *p, "base preprocess");
  if (const Entry* k = m.get("mask"); k && !k->value.IsNull()) base.mask = read_component(doc, k->value, k->mark(), "base mask");
  if (const Entry* q = m.get("quantizer")) base.quantizer = read_component(doc, q->value, q->mark(), "base quantizer");
  // Complete base components are validated on their own, so mistakes are reported in base even
  // when every arm overrides them.
  if (base.preprocess)
    for (std::size_t i = 0; i < base.preprocess->size(); ++i)
      resolve(doc, schemas, ComponentKind::preprocessor, (*base.preprocess)[i], fmt::format("base preprocess[{}]", i));
  if (base.mask && base.mask->name) resolve(doc, schemas, ComponentKind::mask, *base.mask, "base mask");
  if (base.quantizer && base.quantizer->name) resolve(doc, schemas, ComponentKind::quantizer, *base.quantizer, "base quantizer");
  return base;
}

// A candidate's default label: the quantizer and the parameters given in the file, then the mask's.
std::string candidate_label(const Component& q, const std::optional<Component>& mask) {
  auto part = [](const Component& c) {
    std::string text = c.name;
    for (const auto& [k, v] : c.given) text += "-" + k + param_value_text(v);
    return text;
  };
  return mask ? part(q) + "+" + part(*mask) : part(q);
}

// allocator: {name, params, budget, metric, unit, loss} and candidates: [{name, quantizer, mask}].
AllocationDraft read_allocation(const Doc& doc, const SchemaSource& schemas, const Entry& e, const Entry* candidates,
                                const std::string& label) {
  AllocationDraft a;
  const std::string what = label + " allocator";
  if (e.value.IsScalar()) doc.fail(e.mark(), fmt::format("{} must be a map with 'name' and 'budget', got {}", what,
                                                         describe(e.value)));
  const MapView m(doc, e.value, e.mark(), what, {"name", "params", "budget", "metric", "unit", "loss"});
  RawComponent raw;
  raw.mark = e.mark();
  if (const Entry* n = m.get("name")) {
    raw.name = read_string(doc, *n, what + " name");
    raw.name_mark = n->mark();
  }
  raw.params = read_params(doc, m.get("params"), what);
  a.allocator = resolve(doc, schemas, ComponentKind::allocator, raw, what);
  if (const Entry* b = m.get("budget")) {
    a.budget = read_number(doc, b->value, what + " budget");
    if (!(a.budget > 0)) doc.fail(b->mark(), fmt::format("{} budget must be positive bits per weight, got {}", what,
                                                         b->value.Scalar()));
    a.budget_mark = b->mark();
    a.has_budget = true;
  } else {
    a.budget_mark = m.mark();
  }
  auto choice = [&](const char* key, std::string& out, const std::vector<std::string>& allowed) {
    if (const Entry* x = m.get(key)) {
      out = read_string(doc, *x, fmt::format("{} {}", what, key));
      if (std::find(allowed.begin(), allowed.end(), out) == allowed.end())
        doc.fail(x->mark(), fmt::format("{} {} must be one of {}, got '{}'{}", what, key, join(allowed), out,
                                        hint(out, allowed)));
      if (std::string(key) == "unit") a.unit_mark = x->mark();
    } else if (std::string(key) == "unit") {
      a.unit_mark = m.mark();
    }
  };
  choice("metric", a.metric, {"allin", "paper"});
  choice("unit", a.unit, {"linear", "tie", "layer"});
  choice("loss", a.loss, {"hess", "out_mse", "block_mse"});
  if (a.loss == "block_mse" && a.unit != "layer")
    doc.fail(m.get("loss")->mark(), fmt::format("{} loss block_mse measures whole decoder layers: it needs unit: layer, "
                                                "got unit: {}", what, a.unit));

  if (candidates == nullptr)
    doc.fail(m.mark(), fmt::format("missing required key 'candidates' in {} (an allocator chooses among candidates)",
                                   label));
  if (!candidates->value.IsSequence() || candidates->value.size() == 0)
    doc.fail(candidates->mark(), fmt::format("{} candidates must be a non-empty list of {{quantizer, mask}} maps, got {}",
                                             label, describe(candidates->value)));
  std::set<std::string> labels;
  for (std::size_t i = 0; i < candidates->value.size(); ++i) {
    const YAML::Node node = candidates->value[i];
    const std::string cw = fmt::format("{} candidates[{}]", label, i);
    const MapView cm(doc, node, node.Mark(), cw, {"name", "quantizer", "mask"});
    CandidateDraft c;
    c.mark = node.Mark();
    const Entry& q = cm.require("quantizer");
    c.quantizer = resolve(doc, schemas, ComponentKind::quantizer, read_component(doc, q.value, q.mark(), cw + " quantizer"),
                          cw + " quantizer");
    if (const Entry* k = cm.get("mask"); k && !k->value.IsNull())
      c.mask = resolve(doc, schemas, ComponentKind::mask, read_component(doc, k->value, k->mark(), cw + " mask"),
                       cw + " mask");
    c.label = candidate_label(c.quantizer, c.mask);
    if (const Entry* n = cm.get("name")) {
      c.label = read_string(doc, *n, cw + " name");
      if (!valid_name(c.label)) doc.fail(n->mark(), fmt::format("invalid candidate name '{}': {}", c.label, name_rule()));
    }
    if (!labels.insert(c.label).second)
      doc.fail(c.mark, fmt::format("{}: candidate '{}' is given twice", cw, c.label));
    c.whole_layer = schemas.quantizes_whole_layers(c.quantizer.ref());
    if (c.whole_layer && a.unit != "layer")
      doc.fail(c.mark, fmt::format("{}: quantizer {} works on whole decoder layers, so the allocation unit must be "
                                   "'layer' (set unit: layer in the allocator; it is '{}')",
                                   cw, c.quantizer.name, a.unit));
    a.candidates.push_back(std::move(c));
  }
  return a;
}

ArmDraft read_arm(const Doc& doc, const SchemaSource& schemas, const YAML::Node& node, std::size_t index,
                  const RawArmDefaults& base) {
  const std::string what = fmt::format("arms[{}]", index);
  const MapView m(doc, node, node.Mark(), what,
                  {"name", "inherit_base", "preprocess", "mask", "quantizer", "sweep", "allocator", "candidates"});
  ArmDraft arm;
  const Entry& name = m.require("name");
  arm.name = read_string(doc, name, "arm name");
  arm.name_mark = name.mark();
  if (!valid_name(arm.name)) doc.fail(name.mark(), fmt::format("invalid arm name '{}': {}", arm.name, name_rule()));
  const std::string label = fmt::format("arm '{}'", arm.name);
  const bool inherit = m.get("inherit_base") ? read_bool(doc, *m.get("inherit_base"), "inherit_base") : true;

  std::vector<RawComponent> preprocess;
  if (const Entry* p = m.get("preprocess"))
    preprocess = read_preprocess(doc, *p, label + " preprocess");
  else if (inherit && base.preprocess)
    preprocess = *base.preprocess;

  // An allocated arm takes its quantizers and masks from its candidates (never from base).
  if (const Entry* al = m.get("allocator")) {
    for (const char* key : {"quantizer", "mask"})
      if (const Entry* x = m.get(key))
        doc.fail(x->key_node.Mark(), fmt::format("{} has an allocator: give its {}s in 'candidates', not '{}'", label,
                                                 key, key));
    arm.alloc = read_allocation(doc, schemas, *al, m.get("candidates"), label);
    for (std::size_t i = 0; i < preprocess.size(); ++i)
      arm.preprocess.push_back(
          resolve(doc, schemas, ComponentKind::preprocessor, preprocess[i], fmt::format("{} preprocess[{}]", label, i)));
    if (!arm.preprocess.empty())
      doc.fail(al->key_node.Mark(), fmt::format("{} has an allocator and preprocess steps; allocation with "
                                                "preprocessing is not supported yet (give preprocess: [])",
                                                label));
    if (const Entry* s = m.get("sweep")) read_sweep(doc, *s, arm);
    if (!arm.alloc->has_budget) {
      bool swept = false;
      for (const auto& a : arm.axes) swept = swept || (a.target == Axis::Target::allocator && a.param == "budget");
      if (!swept)
        doc.fail(arm.alloc->budget_mark, fmt::format("missing required key 'budget' in {} allocator (bits per weight; "
                                                     "or sweep allocator.budget)",
                                                     label));
    }
    return arm;
  }
  if (const Entry* c = m.get("candidates"))
    doc.fail(c->key_node.Mark(), fmt::format("{} has candidates but no allocator", label));

  std::optional<RawComponent> mask;
  if (const Entry* k = m.get("mask")) {
    if (!k->value.IsNull()) {  // "mask: null" drops an inherited mask
      mask = read_component(doc, k->value, k->mark(), label + " mask");
      if (inherit && base.mask) mask = merge(*base.mask, *mask);
    }
  } else if (inherit && base.mask) {
    mask = base.mask;
  }

  std::optional<RawComponent> quantizer;
  if (const Entry* q = m.get("quantizer")) {
    quantizer = read_component(doc, q->value, q->mark(), label + " quantizer");
    if (inherit && base.quantizer) quantizer = merge(*base.quantizer, *quantizer);
  } else if (inherit && base.quantizer) {
    quantizer = base.quantizer;
  }
  if (!quantizer)
    doc.fail(m.mark(), fmt::format("missing required key 'quantizer' in {} (give it in the arm or in base)", label));

  for (std::size_t i = 0; i < preprocess.size(); ++i)
    arm.preprocess.push_back(
        resolve(doc, schemas, ComponentKind::preprocessor, preprocess[i], fmt::format("{} preprocess[{}]", label, i)));
  if (mask) arm.mask = resolve(doc, schemas, ComponentKind::mask, *mask, label + " mask");
  arm.quantizer = resolve(doc, schemas, ComponentKind::quantizer, *quantizer, label + " quantizer");

  if (const Entry* s = m.get("sweep")) read_sweep(doc, *s, arm);
  return arm;
}

ArmSpec make_spec(const Doc& doc, const ArmDraft& arm, std::string name) {
  name = sanitize_name(name);
  if (name.size() > kMaxNameLength)
    doc.fail(arm.name_mark, fmt::format("sweep arm name '{}' is longer than {} characters", name, kMaxNameLength));
  ArmSpec spec;
  spec.name = name;
  for (const auto& p : arm.preprocess) spec.preprocessors.push_back(p.ref());
  if (arm.mask) spec.mask = arm.mask->ref();
  if (!arm.alloc) spec.quantizer = arm.quantizer.ref();  // allocated arms: the candidates' quantizers
  return spec;
}

// One arm per budget target: the candidate whose predicted all-in bits per weight on the model's
// shapes is the largest not above the target (ties: the largest value).
void expand_budget(const Doc& doc, const SchemaSource& schemas, const std::vector<LinearShape>& shapes,
                   const ArmDraft& arm, const std::string& name, std::vector<ArmSpec>& out) {
  const Budget& b = *arm.budget;
  Axis probe;
  probe.target = b.target;
  std::vector<double> bits(b.candidates.size());
  for (std::size_t i = 0; i < b.candidates.size(); ++i) {
    ArmDraft a = arm;
    axis_component(a, probe)->given[b.param] = b.candidates[i];
    const std::optional<ComponentRef> mask = a.mask ? std::optional<ComponentRef>(a.mask->ref()) : std::nullopt;
    try {
      bits[i] = schemas.predict_bits(a.quantizer.ref(), mask, shapes).all_in_per_weight();
    } catch (const Error& e) {
      doc.fail(b.mark, fmt::format("bit budget of arm '{}': {}; a budget needs bits that follow from the shapes", name,
                                   e.what()));
    }
  }
  const auto [lo, hi] = std::minmax_element(bits.begin(), bits.end());
  if (*lo == *hi)
    doc.fail(b.parameter_mark, fmt::format("budget parameter '{}' does not change the predicted bits of arm '{}' "
                                           "(always {:.4f} all-in bits per weight)",
                                           b.path, name, *lo));
  for (std::size_t t = 0; t < b.targets.size(); ++t) {
    const auto pick = pick_for_budget(b.targets[t], bits);
    if (!pick)
      doc.fail(b.target_marks[t], fmt::format("bit budget {} is unreachable for arm '{}' on this model: {} in [{}, {}] "
                                              "gives {:.4f} to {:.4f} all-in bits per weight",
                                              param_value_text(b.targets[t]), name, b.path, param_value_text(b.lo),
                                              param_value_text(b.hi), *lo, *hi));
    ArmDraft a = arm;
    axis_component(a, probe)->given[b.param] = b.candidates[*pick];
    ArmSpec spec = make_spec(doc, a, name + "-budget" + param_value_text(b.targets[t]));
    spec.budget = BudgetSpec{b.targets[t], b.path, b.candidates[*pick], bits[*pick]};
    out.push_back(std::move(spec));
  }
}

// An allocated arm: the predicted bits of every (unit, candidate) from the shapes, the budget
// checked against the reachable range [cheapest mix, dearest mix] (docs/allocation.md).
void expand_allocation(const Doc& doc, const SchemaSource& schemas, const LlamaConfig& config, const ArmDraft& arm,
                       const std::string& name, std::vector<ArmSpec>& out) {
  const AllocationDraft& a = *arm.alloc;
  const auto units = allocation_units(config, a.unit);
  // Bits of each candidate on each linear shape (7 per layer, the same in every layer).
  std::vector<std::array<std::int64_t, 7>> bits(a.candidates.size());
  for (std::size_t c = 0; c < a.candidates.size(); ++c) {
    const auto& cand = a.candidates[c];
    const std::optional<ComponentRef> mask = cand.mask ? std::optional<ComponentRef>(cand.mask->ref()) : std::nullopt;
    for (std::size_t i = 0; i < kAllLinears.size(); ++i) {
      const auto [rows, cols] = linear_shape(config, kAllLinears[i]);
      try {
        const BitCount b = schemas.predict_bits(cand.quantizer.ref(), mask, {LinearShape{rows, cols, 1}});
        bits[c][i] = static_cast<std::int64_t>(std::ceil((a.metric == "paper" ? b.paper : b.all_in()) - 1e-6));
      } catch (const Error& e) {
        doc.fail(cand.mark, fmt::format("allocation candidate '{}' of arm '{}': {}; an allocation needs bits that "
                                        "follow from the shapes",
                                        cand.label, name, e.what()));
      }
    }
  }
  AllocationProblem p;
  std::int64_t weights = 0;
  for (const auto& u : units) {
    weights += u.weights;
    std::vector<std::int64_t> row;
    for (std::size_t c = 0; c < a.candidates.size(); ++c) {
      std::int64_t total = 0;
      for (Linear w : u.linears) total += bits[c][static_cast<std::size_t>(w)];
      row.push_back(total);
    }
    p.cost.push_back(row);
    p.loss.push_back(std::vector<double>(row.size(), 0.0));
  }
  const double lo = static_cast<double>(cheapest_mix(p)) / static_cast<double>(weights);
  const double hi = static_cast<double>(dearest_mix(p)) / static_cast<double>(weights);
  const auto budget_bits = static_cast<std::int64_t>(std::floor(a.budget * static_cast<double>(weights) + 1e-9));
  if (budget_bits < cheapest_mix(p) || a.budget > hi * (1 + 1e-12))
    doc.fail(a.budget_mark, fmt::format("allocation budget {} bits per weight ({}) is outside the reachable range "
                                        "[{:.4f}, {:.4f}] of arm '{}' on this model (cheapest mix, dearest mix of its "
                                        "candidates)",
                                        param_value_text(a.budget), a.metric == "paper" ? "paper" : "all-in", lo, hi,
                                        name));
  ArmSpec spec = make_spec(doc, arm, name);
  AllocationSpec as;
  as.allocator = a.allocator.ref();
  as.budget = a.budget;
  as.metric = a.metric;
  as.unit = a.unit;
  as.loss = a.loss;
  for (const auto& c : a.candidates) {
    CandidateSpec cs;
    cs.label = c.label;
    if (c.mask) cs.mask = c.mask->ref();
    cs.quantizer = c.quantizer.ref();
    cs.whole_layer = c.whole_layer;
    as.candidates.push_back(std::move(cs));
  }
  as.budget_bits = budget_bits;
  as.weights = weights;
  as.min_bits = lo;
  as.max_bits = hi;
  spec.allocation = std::move(as);
  out.push_back(std::move(spec));
}

// Expands one arm's sweep into final arms (just the arm when it has no sweep).
std::vector<ArmSpec> expand(const Doc& doc, const SchemaSource& schemas, const LlamaConfig& config,
                            const std::vector<LinearShape>& shapes, const ArmDraft& draft) {
  std::map<std::string, int> param_uses;
  for (const auto& a : draft.axes) ++param_uses[a.param];
  std::vector<ArmSpec> out;
  for (const auto& combo : combinations(draft.axes)) {
    ArmDraft arm = draft;
    std::string name = draft.name;
    for (std::size_t a = 0; a < draft.axes.size(); ++a) {
      const Axis& axis = draft.axes[a];
      const ParamValue& v = axis.values[combo[a]];
      if (axis.target == Axis::Target::allocator && axis.param == "budget") {
        arm.alloc->budget = std::get<double>(v);
        arm.alloc->budget_mark = axis.mark;
      } else {
        axis_component(arm, axis)->given[axis.param] = v;
      }
      name += "-" + (param_uses[axis.param] > 1 ? axis.path : axis.param) + param_value_text(v);
    }
    if (arm.alloc)
      expand_allocation(doc, schemas, config, arm, name, out);
    else if (arm.budget)
      expand_budget(doc, schemas, shapes, arm, name, out);
    else
      out.push_back(make_spec(doc, arm, name));
  }
  return out;
}

// The engine's schemas: the plugin registry.
class RegistrySchemas final : public SchemaSource {
 public:
  explicit RegistrySchemas(const PluginRegistry& registry) : registry_(registry) {}
  const ComponentSchema* find(ComponentKind kind, const std::string& name) const override {
    return registry_.find(kind, name);
  }
  std::vector<std::string> names(ComponentKind kind) const override { return registry_.names(kind); }
  BitCount predict_bits(const ComponentRef& quantizer, const std::optional<ComponentRef>& mask,
                        const std::vector<LinearShape>& shapes) const override {
    return predict_arm_bits(registry_, quantizer, mask, shapes);
  }
  bool quantizes_whole_layers(const ComponentRef& quantizer) const override {
    return registry_.make_quantizer(quantizer.name, quantizer.params)->granularity() ==
           Quantizer::Granularity::decoder_layer;
  }

 private:
  const PluginRegistry& registry_;
};

}  // namespace

// ---------------------------------------------------------------------------------------------

void SchemaList::add(ComponentKind kind, std::string name, std::vector<ParamSpec> params) {
  ComponentSchema s;
  s.kind = kind;
  s.name = std::move(name);
  s.params = std::move(params);
  schemas_.push_back(std::move(s));
}

const ComponentSchema* SchemaList::find(ComponentKind kind, const std::string& name) const {
  for (const auto& s : schemas_)
    if (s.kind == kind && s.name == name) return &s;
  return nullptr;
}

std::vector<std::string> SchemaList::names(ComponentKind kind) const {
  std::vector<std::string> out;
  for (const auto& s : schemas_)
    if (s.kind == kind) out.push_back(s.name);
  return out;
}

std::optional<std::string> closest_match(const std::string& word, const std::vector<std::string>& candidates) {
  const std::size_t limit = std::max<std::size_t>(2, word.size() / 3);
  std::optional<std::string> best;
  std::size_t best_distance = std::numeric_limits<std::size_t>::max();
  std::vector<std::size_t> row;
  for (const auto& c : candidates) {
    // Levenshtein distance, one row at a time.
    row.resize(c.size() + 1);
    for (std::size_t j = 0; j <= c.size(); ++j) row[j] = j;
    for (std::size_t i = 1; i <= word.size(); ++i) {
      std::size_t diag = row[0];
      row[0] = i;
      for (std::size_t j = 1; j <= c.size(); ++j) {
        const std::size_t up = row[j];
        row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (word[i - 1] == c[j - 1] ? 0 : 1)});
        diag = up;
      }
    }
    const std::size_t d = row[c.size()];
    if (d <= limit && d < best_distance) {  // strict: the first of equally close candidates wins
      best = c;
      best_distance = d;
    }
  }
  return best;
}

std::vector<fs::path> experiment_plugin_paths(const fs::path& yaml_file) {
  const Doc doc(yaml_file.string(), absolute_normal(yaml_file).parent_path());
  const YAML::Node root = load_root(doc, yaml_file, yaml_file.string());
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (it->first.Scalar() != "plugin_paths") continue;
    const Entry e{"plugin_paths", it->first, it->second};
    return read_plugin_paths(doc, &e);
  }
  return {};
}

Experiment load_experiment(const fs::path& yaml_file, const SchemaSource& schemas) {
  Experiment x;
  x.file = absolute_normal(yaml_file);
  const Doc doc(yaml_file.string(), x.file.parent_path());
  const YAML::Node root = load_root(doc, yaml_file, yaml_file.string());
  const MapView top(doc, root, root.Mark(), "the experiment", kTopKeys);

  if (const Entry* n = top.get("name")) {
    x.name = read_string(doc, *n, "name");
    if (!valid_name(x.name)) doc.fail(n->mark(), fmt::format("invalid experiment name '{}': {}", x.name, name_rule()));
  } else {
    x.name = sanitize_name(x.file.stem().string());
    if (x.name.empty() || !is_alnum(x.name[0])) x.name = "x" + x.name;
    if (x.name.size() > kMaxNameLength) x.name.resize(kMaxNameLength);
  }
  if (const Entry* s = top.get("seed"))
    x.seed = static_cast<std::uint64_t>(read_int(doc, *s, "seed", 0, std::numeric_limits<std::int64_t>::max()));
  if (const Entry* l = top.get("log_tensors")) x.log_tensors = read_bool(doc, *l, "log_tensors");
  x.plugin_paths = read_plugin_paths(doc, top.get("plugin_paths"));

  // The model: a directory with a valid config.json.
  const Entry& model = top.require("model");
  x.model_dir = read_existing(doc, model, "model", true);
  const fs::path config_json = x.model_dir / "config.json";
  std::error_code ec;
  if (!fs::is_regular_file(config_json, ec))
    doc.fail(model.mark(), fmt::format("model directory has no config.json: {}", config_json.string()));
  LlamaConfig config;
  try {
    config = load_llama_config(config_json);
  } catch (const Error& err) {
    doc.fail(model.mark(), fmt::format("model: {}", err.what()));
  }

  read_calibration(doc, top.require("calibration"), config, x);
  if (const Entry* e = top.get("eval")) read_eval(doc, schemas, *e, x);

  RawArmDefaults base;
  if (const Entry* b = top.get("base")) base = read_base(doc, schemas, *b);

  const Entry& arms = top.require("arms");
  if (!arms.value.IsSequence()) doc.fail(arms.mark(), fmt::format("arms must be a list of arms, got {}", describe(arms.value)));
  if (arms.value.size() == 0) doc.fail(arms.mark(), "arms is empty (an experiment needs at least one arm)");
  const auto shapes = linear_shapes(config);
  std::map<std::string, int> names;  // name -> line of the arm that made it
  for (std::size_t i = 0; i < arms.value.size(); ++i) {
    const ArmDraft draft = read_arm(doc, schemas, arms.value[i], i, base);
    for (auto& arm : expand(doc, schemas, config, shapes, draft)) {
      auto [pos, inserted] = names.emplace(arm.name, draft.name_mark.line + 1);
      if (!inserted)
        doc.fail(draft.name_mark, fmt::format("duplicate arm name '{}'{} (first made at line {})", arm.name,
                                              draft.axes.empty() && !draft.budget ? "" : " from this arm's sweep",
                                              pos->second));
      x.arms.push_back(std::move(arm));
    }
    if (x.arms.size() > kMaxArms)
      doc.fail(draft.name_mark, fmt::format("the experiment has more than {} arms", kMaxArms));
  }
  for (auto& arm : x.arms) {
    arm.resolved_yaml = resolved_yaml(x, arm);
    arm.config_hash = sha256_hex(arm.resolved_yaml);
  }
  return x;
}

Experiment load_experiment(const fs::path& yaml_file, const PluginRegistry& registry) {
  return load_experiment(yaml_file, RegistrySchemas(registry));
}

}  // namespace ptqlab
