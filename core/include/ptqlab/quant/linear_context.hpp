#pragma once
// The LinearContext a mask or quantizer gets for one linear of a decoder layer, built the same way
// by the calibration pass (quant/calibration.cpp) and the allocation table (engine/
// allocation_measure.cpp): the linear's Hessian, its input's shared inverse factor, its input
// statistics.
#include "ptqlab/support/internal.hpp"  // not part of the plugin SDK
#include <cstdint>

#include <fmt/format.h>

#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/quant/gptq.hpp"

namespace ptqlab {

// hessian_of(which) -> const Eigen::MatrixXd&, stats_of(layer, which) -> const InputStats&. The
// context refers to hessian_of, factors and stats_of: they must outlive it.
template <class HessianOf, class StatsOf>
LinearContext layer_linear_context(const LlamaConfig& config, int layer, Linear which, std::uint64_t seed,
                                   TensorLog* log, const HessianOf& hessian_of, InverseFactorCache& factors,
                                   const StatsOf& stats_of) {
  LinearContext ctx;
  ctx.config = &config;
  ctx.layer = layer;
  ctx.which = which;
  ctx.seed = seed;
  ctx.log = log;
  ctx.log_prefix = fmt::format("layer{}/{}", layer, linear_name(which));
  ctx.hessian = [&hessian_of, which]() -> const Eigen::MatrixXd& { return hessian_of(which); };
  ctx.inverse_factor = [&factors, &hessian_of, which](double percdamp, const std::string& what) {
    return factors.get(static_cast<int>(input_of(which)), hessian_of(which), percdamp, what);
  };
  ctx.input_stats = [&stats_of, layer, which]() -> const InputStats& { return stats_of(layer, which); };
  return ctx;
}

}  // namespace ptqlab
