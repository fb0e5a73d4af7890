// Components and arms as written: reading, merging with base:, resolving against schemas, sweep
// axes and bit budgets (experiment_arms.hpp).
#include "experiment_arms.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include "ptqlab/quant/allocation.hpp"

namespace ptqlab::experiment_file {

// ---------------------------------------------------------------------------------------------
// Components as written (before validation) and as resolved.

std::vector<RawParam> read_params(const Doc& doc, const Entry* e, const std::string& what) {
  std::vector<RawParam> out;
  if (e == nullptr || e->value.IsNull()) return out;
  if (!e->value.IsMap()) doc.fail(e->mark(), fmt::format("{} params must be a map, got {}", what, describe(e->value)));
  for (auto it = e->value.begin(); it != e->value.end(); ++it) out.push_back({it->first.Scalar(), it->first, it->second});
  return out;
}

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

std::vector<std::string> param_names(const ComponentSchema& schema) {
  std::vector<std::string> out;
  for (const auto& p : schema.params) out.push_back(p.name);
  return out;
}

ParamValue param_value(const Doc& doc, const ParamSpec& spec, const YAML::Node& node, const YAML::Mark& mark,
                       const std::string& label, const std::string& suffix) {
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

double read_number(const Doc& doc, const YAML::Node& n, const std::string& what) {
  const ParamValue v = scalar_value(doc, n, n.Mark(), what);
  if (const auto* i = std::get_if<std::int64_t>(&v)) return static_cast<double>(*i);
  if (const auto* d = std::get_if<double>(&v)) return *d;
  doc.fail(n.Mark(), fmt::format("{} must be a number, got {} '{}'", what, param_type_name(param_value_type(v)), n.Scalar()));
}

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

}  // namespace ptqlab::experiment_file
