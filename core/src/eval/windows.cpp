#include "windows.hpp"

#include <algorithm>

#include <fmt/format.h>

#include "ptqlab/support/error.hpp"

namespace ptqlab {

WindowPlan plan_windows(const LlamaConfig& config, std::size_t stream_tokens, int requested, long long max_windows,
                        int minimum, std::string_view setting, std::string_view why, std::string_view unit) {
  WindowPlan plan;
  plan.seq_len = requested > 0 ? requested : config.max_position_embeddings;
  if (plan.seq_len < minimum)
    throw Error(fmt::format("{} must be at least {}{}, got {}", setting, minimum, why, plan.seq_len));
  if (plan.seq_len > config.max_position_embeddings)
    throw Error(fmt::format("{} {} exceeds the model's max_position_embeddings {}", setting, plan.seq_len,
                            config.max_position_embeddings));
  plan.windows = static_cast<long long>(stream_tokens) / plan.seq_len;
  if (max_windows > 0) plan.windows = std::min(plan.windows, max_windows);
  if (plan.windows == 0)
    throw Error(fmt::format("the text has {} tokens, fewer than one {} of {}", stream_tokens, unit, plan.seq_len));
  return plan;
}

}  // namespace ptqlab
