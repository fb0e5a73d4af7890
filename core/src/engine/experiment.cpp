// YAML experiment files (docs/experiments.md): the sections of the file, sweep and budget
// expansion into ArmSpecs, and load_experiment. Below it: experiment_yaml (the document, scalars,
// maps with known keys), experiment_arms (components and arm drafts as written, sweep axes) and
// experiment_resolved (the canonical resolved configuration of every arm).
//
// Every user error is a ptqlab::Error "FILE:LINE:COL: message" pointing at the offending node.
// The YAML tree is only read here; merged components keep the original nodes, so errors in
// values inherited from `base:` point into `base:`.
#include "ptqlab/engine/experiment.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include "experiment_arms.hpp"
#include "experiment_yaml.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/model/model_config.hpp"
#include "ptqlab/quant/allocation.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/sha256.hpp"

namespace ptqlab {
using namespace experiment_file;
namespace {

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
