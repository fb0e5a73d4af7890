#pragma once
// Typed component parameters: each plugin component declares a schema (name, type, default,
// range or choices, doc); experiment files supply values that are validated against it.
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <variant>
#include <vector>

namespace ptqlab {

enum class ParamType { boolean, integer, real, string };
const char* param_type_name(ParamType type);  // "bool", "int", "float", "string"

using ParamValue = std::variant<bool, std::int64_t, double, std::string>;
ParamType param_value_type(const ParamValue& value);
// Canonical text: true/false, 42, 0.1 (shortest round-trip form), text as is.
std::string param_value_text(const ParamValue& value);

struct ParamSpec {
  std::string name;
  ParamType type = ParamType::integer;
  ParamValue default_value;
  std::string doc;
  std::optional<double> min, max;    // inclusive bounds, integer and real only
  std::vector<std::string> choices;  // allowed values, string only (empty: any)
  // false for a parameter added to an existing component: at its default value it is left out of
  // the resolved configuration (and so of the config hash), so results made before it existed
  // keep their resume key. Evaluator parameters only.
  bool hashed_when_default = true;
};

// Which plugin interface a component implements.
enum class ComponentKind { quantizer, mask, preprocessor, evaluator, allocator };
const char* component_kind_name(ComponentKind kind);  // "quantizer", ...
std::optional<ComponentKind> parse_component_kind(const std::string& text);

struct ComponentSchema {
  ComponentKind kind = ComponentKind::quantizer;
  std::string name;         // e.g. "rtn"; unique within a kind
  std::string description;  // one line
  std::vector<ParamSpec> params;

  const ParamSpec* find(const std::string& param) const;
};

// Checks one value against its spec: nullopt when fine, else the reason ("must be an int in
// [1, 8], got 9"). Integers are accepted where reals are expected.
std::optional<std::string> check_param(const ParamSpec& spec, const ParamValue& value);

// Resolved parameter values of one component instance: every schema parameter present.
class Params {
 public:
  Params() = default;
  explicit Params(std::map<std::string, ParamValue> values) : values_(std::move(values)) {}

  // Defaults for every parameter of `schema`, overridden by `given` (already validated).
  static Params resolve(const ComponentSchema& schema, const std::map<std::string, ParamValue>& given);

  bool get_bool(const std::string& name) const;
  std::int64_t get_int(const std::string& name) const;
  double get_real(const std::string& name) const;  // accepts integers
  const std::string& get_string(const std::string& name) const;
  const std::map<std::string, ParamValue>& values() const { return values_; }

 private:
  const ParamValue& at(const std::string& name) const;
  std::map<std::string, ParamValue> values_;
};

}  // namespace ptqlab
