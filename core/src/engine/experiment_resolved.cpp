// The canonical resolved configuration of an arm (experiment_arms.hpp): every parameter with its
// resolved value, in schema order, types kept (1.0 stays a float), so that equal configurations
// give equal text and equal config hashes.
#include <algorithm>
#include <cmath>

#include "experiment_arms.hpp"

namespace ptqlab::experiment_file {
namespace {

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

}  // namespace

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

}  // namespace ptqlab::experiment_file
