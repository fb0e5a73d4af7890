#include "ptqlab/engine/params.hpp"

#include <charconv>
#include <stdexcept>

#include <fmt/format.h>
#include <fmt/ranges.h>

namespace ptqlab {

const char* param_type_name(ParamType type) {
  switch (type) {
    case ParamType::boolean: return "bool";
    case ParamType::integer: return "int";
    case ParamType::real: return "float";
    case ParamType::string: return "string";
  }
  return "?";
}

ParamType param_value_type(const ParamValue& v) {
  switch (v.index()) {
    case 0: return ParamType::boolean;
    case 1: return ParamType::integer;
    case 2: return ParamType::real;
    default: return ParamType::string;
  }
}

std::string param_value_text(const ParamValue& v) {
  if (const auto* b = std::get_if<bool>(&v)) return *b ? "true" : "false";
  if (const auto* i = std::get_if<std::int64_t>(&v)) return std::to_string(*i);
  if (const auto* d = std::get_if<double>(&v)) {
    char buf[64];
    auto r = std::to_chars(buf, buf + sizeof buf, *d);  // shortest form that round-trips
    return std::string(buf, r.ptr);
  }
  return std::get<std::string>(v);
}

const char* component_kind_name(ComponentKind kind) {
  switch (kind) {
    case ComponentKind::quantizer: return "quantizer";
    case ComponentKind::mask: return "mask";
    case ComponentKind::preprocessor: return "preprocessor";
    case ComponentKind::evaluator: return "evaluator";
    case ComponentKind::allocator: return "allocator";
  }
  return "?";
}

std::optional<ComponentKind> parse_component_kind(const std::string& text) {
  for (auto k : {ComponentKind::quantizer, ComponentKind::mask, ComponentKind::preprocessor, ComponentKind::evaluator,
                 ComponentKind::allocator})
    if (text == component_kind_name(k)) return k;
  return std::nullopt;
}

const ParamSpec* ComponentSchema::find(const std::string& param) const {
  for (const auto& p : params)
    if (p.name == param) return &p;
  return nullptr;
}

std::optional<std::string> check_param(const ParamSpec& spec, const ParamValue& value) {
  const ParamType got = param_value_type(value);
  const bool type_ok = got == spec.type || (spec.type == ParamType::real && got == ParamType::integer);
  if (!type_ok)
    return fmt::format("must be a {}, got {} '{}'", param_type_name(spec.type), param_type_name(got),
                       param_value_text(value));
  if (spec.type == ParamType::integer || spec.type == ParamType::real) {
    const double x = got == ParamType::integer ? static_cast<double>(std::get<std::int64_t>(value))
                                               : std::get<double>(value);
    if ((spec.min && x < *spec.min) || (spec.max && x > *spec.max)) {
      auto bound = [&](const std::optional<double>& b, const char* inf) {
        return b ? param_value_text(spec.type == ParamType::integer ? ParamValue(static_cast<std::int64_t>(*b))
                                                                    : ParamValue(*b))
                 : std::string(inf);
      };
      return fmt::format("must be in [{}, {}], got {}", bound(spec.min, "-inf"), bound(spec.max, "inf"),
                         param_value_text(value));
    }
  }
  if (spec.type == ParamType::string && !spec.choices.empty()) {
    const auto& s = std::get<std::string>(value);
    bool found = false;
    for (const auto& c : spec.choices) found = found || c == s;
    if (!found) return fmt::format("must be one of {}, got '{}'", fmt::join(spec.choices, ", "), s);
  }
  return std::nullopt;
}

Params Params::resolve(const ComponentSchema& schema, const std::map<std::string, ParamValue>& given) {
  std::map<std::string, ParamValue> values;
  for (const auto& p : schema.params) {
    auto it = given.find(p.name);
    ParamValue v = it != given.end() ? it->second : p.default_value;
    // Normalise ints given for float parameters, so hashes and HDF5 types are stable.
    if (p.type == ParamType::real && std::holds_alternative<std::int64_t>(v))
      v = static_cast<double>(std::get<std::int64_t>(v));
    values[p.name] = v;
  }
  return Params(std::move(values));
}

const ParamValue& Params::at(const std::string& name) const {
  auto it = values_.find(name);
  if (it == values_.end()) throw std::logic_error("component asked for undeclared parameter '" + name + "'");
  return it->second;
}

bool Params::get_bool(const std::string& name) const { return std::get<bool>(at(name)); }
std::int64_t Params::get_int(const std::string& name) const { return std::get<std::int64_t>(at(name)); }
double Params::get_real(const std::string& name) const {
  const auto& v = at(name);
  if (const auto* i = std::get_if<std::int64_t>(&v)) return static_cast<double>(*i);
  return std::get<double>(v);
}
const std::string& Params::get_string(const std::string& name) const { return std::get<std::string>(at(name)); }

}  // namespace ptqlab
