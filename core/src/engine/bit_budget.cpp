// Bit budgets: the model's linear shapes, predicted ledgers from the plugins, and the rule that
// picks a parameter value for a target (docs/experiments.md "Bit budgets").
#include <algorithm>
#include <cmath>

#include <fmt/format.h>

#include "ptqlab/engine/experiment.hpp"
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/model/model_config.hpp"
#include "ptqlab/support/error.hpp"

namespace ptqlab {

std::vector<LinearShape> linear_shapes(const LlamaConfig& c) {
  const std::int64_t h = c.hidden_size, q = c.q_dim(), kv = c.kv_dim(), ff = c.intermediate_size;
  // [out, in] of q, k, v, o, gate, up, down (model.hpp's kAllLinears order).
  const std::vector<std::pair<std::int64_t, std::int64_t>> per_layer = {{q, h}, {kv, h}, {kv, h}, {h, q},
                                                                        {ff, h}, {ff, h}, {h, ff}};
  std::vector<LinearShape> out;
  for (const auto& shape : per_layer) {
    // Not a structured binding: clang before 16 (the fuzz build) cannot capture one in a lambda.
    const std::int64_t rows = shape.first, cols = shape.second;
    auto it = std::find_if(out.begin(), out.end(), [&](const LinearShape& s) { return s.rows == rows && s.cols == cols; });
    if (it == out.end()) it = out.insert(out.end(), LinearShape{rows, cols, 0});
    it->count += c.num_layers;
  }
  return out;
}

BitCount SchemaSource::predict_bits(const ComponentRef& quantizer, const std::optional<ComponentRef>&,
                                    const std::vector<LinearShape>&) const {
  throw Error(fmt::format("quantizer {}: no bit predictions are available here (bit budgets need the plugins)",
                          quantizer.name));
}

BitCount predict_arm_bits(const PluginRegistry& registry, const ComponentRef& quantizer,
                          const std::optional<ComponentRef>& mask, const std::vector<LinearShape>& shapes) {
  const auto q = registry.make_quantizer(quantizer.name, quantizer.params);
  const auto m = mask ? registry.make_mask(mask->name, mask->params) : nullptr;
  BitCount total;
  for (const auto& s : shapes) {
    std::optional<MaskPrediction> mp;
    if (m) {
      mp = m->predict(s.rows, s.cols);
      if (!mp)
        throw Error(fmt::format("mask {} cannot predict its salient count from shapes (it depends on the data)",
                                mask->name));
    }
    auto b = q->predict_bits(s.rows, s.cols, mp ? &*mp : nullptr);
    if (!b)
      throw Error(fmt::format("quantizer {} cannot predict its bits from shapes (they depend on the data{})",
                              quantizer.name, mp && mp->shape == SalientMask::Shape::elements ? ", or the mask" : ""));
    if (mp) b->masks += mp->storage_bits;  // as the engine adds the arm mask's storage
    for (std::int64_t i = 0; i < s.count; ++i) total += *b;
  }
  return total;
}

std::vector<ParamValue> budget_candidates(ParamType type, double lo, double hi, double step) {
  std::vector<ParamValue> out;
  const auto n = static_cast<std::int64_t>(std::floor((hi - lo) / step + 1e-9));
  for (std::int64_t i = 0; i <= n; ++i) {
    const double v = lo + static_cast<double>(i) * step;
    if (type == ParamType::integer)
      out.emplace_back(static_cast<std::int64_t>(std::llround(v)));
    else
      out.emplace_back(std::stod(fmt::format("{:.12g}", v)));
  }
  return out;
}

std::optional<std::size_t> pick_for_budget(double target_bits, const std::vector<double>& bits) {
  std::optional<std::size_t> best;
  for (std::size_t i = 0; i < bits.size(); ++i)
    if (bits[i] <= target_bits * (1 + 1e-12) && (!best || bits[i] >= bits[*best])) best = i;
  return best;
}

}  // namespace ptqlab
