#pragma once
// Components and arms as an experiment file writes them (private to core/src/engine/): raw
// components and their merge with `base:`, components resolved against their schemas, and the
// arm drafts with their sweep axes, bit budget and allocation stage, before experiment.cpp expands
// them into ArmSpecs. resolved_yaml (experiment_resolved.cpp) writes an arm's canonical config.
#include <cstddef>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "experiment_yaml.hpp"
#include "ptqlab/engine/experiment.hpp"

namespace ptqlab::experiment_file {

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

std::vector<RawParam> read_params(const Doc& doc, const Entry* e, const std::string& what);

// "rtn" or {name: rtn, params: {...}}.
RawComponent read_component(const Doc& doc, const YAML::Node& node, const YAML::Mark& mark, const std::string& what);

// Deep merge of a base component into an arm's: params merged by key (arm wins). An arm that names
// a different component than base replaces it (base params belong to base's component).
RawComponent merge(const RawComponent& base, const RawComponent& arm);

struct Component {
  ComponentKind kind = ComponentKind::quantizer;
  const ComponentSchema* schema = nullptr;
  std::string name;
  std::map<std::string, ParamValue> given;  // validated values from the file

  std::string label() const { return fmt::format("{} {}", component_kind_name(kind), name); }
  ComponentRef ref() const { return ComponentRef{kind, name, Params::resolve(*schema, given), {}}; }
};

std::vector<std::string> param_names(const ComponentSchema& schema);

// Parses one parameter value and checks it against its spec; errors at the value.
ParamValue param_value(const Doc& doc, const ParamSpec& spec, const YAML::Node& node, const YAML::Mark& mark,
                       const std::string& label, const std::string& suffix = "");

const ParamSpec& find_param(const Doc& doc, const Component& c, const std::string& param, const YAML::Mark& mark,
                            const std::string& prefix);

Component resolve(const Doc& doc, const SchemaSource& schemas, ComponentKind kind, const RawComponent& raw,
                  const std::string& what);

struct RawArmDefaults {  // base:
  std::optional<std::vector<RawComponent>> preprocess;
  std::optional<RawComponent> mask;
  std::optional<RawComponent> quantizer;
};

std::vector<RawComponent> read_preprocess(const Doc& doc, const Entry& e, const std::string& what);

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

Component* axis_component(ArmDraft& arm, const Axis& axis);

void read_axes(const Doc& doc, const Entry& e, bool zip, ArmDraft& arm);

// A number (int or float) from a scalar, finite; `what` names it in errors.
double read_number(const Doc& doc, const YAML::Node& n, const std::string& what);

// sweep.budget: {target_bits: [..], parameter: quantizer.<p> | mask.<p>, range: [lo, hi], step: s}.
void read_budget(const Doc& doc, const Entry& e, ArmDraft& arm);

void read_sweep(const Doc& doc, const Entry& e, ArmDraft& arm);

// Every combination: grid axes as a row-major cartesian product (first axis slowest), each
// combined with every zip position (innermost). Entries are value indices per axis.
std::vector<std::vector<std::size_t>> combinations(const std::vector<Axis>& axes);

// The canonical resolved configuration of one arm (experiment_resolved.cpp): what its config hash
// is taken of and what its result file stores.
std::string resolved_yaml(const Experiment& x, const ArmSpec& arm);

}  // namespace ptqlab::experiment_file
