#include "ptqlab/nn/generate.hpp"

#include <algorithm>
#include <cmath>
#include <random>

#include <fmt/format.h>

#include "ptqlab/nn/forward.hpp"
#include "ptqlab/support/error.hpp"

namespace ptqlab {

std::vector<int> generate(const LlamaModel& model, const std::vector<int>& prompt, const GenerateOptions& options) {
  if (prompt.empty()) throw Error("generate: the prompt is empty (it should at least hold BOS)");
  const int max_ctx = model.config.max_position_embeddings;
  std::vector<int> context = prompt;
  std::vector<int> produced;
  std::mt19937_64 rng(options.seed);
  for (int step = 0; step < options.max_new_tokens; ++step) {
    if (static_cast<int>(context.size()) >= max_ctx) break;
    const int n = static_cast<int>(context.size());
    const Matrix logits = forward_logits(model, context, BatchShape{1, n});
    const auto last = logits.row(n - 1);
    int next = 0;
    if (options.temperature <= 0.0f) {
      last.maxCoeff(&next);
    } else {
      std::vector<double> p(last.size());
      const float m = last.maxCoeff();
      for (Eigen::Index i = 0; i < last.size(); ++i) p[i] = std::exp((last(i) - m) / options.temperature);
      std::discrete_distribution<int> dist(p.begin(), p.end());
      next = dist(rng);
    }
    if (std::find(options.stop_ids.begin(), options.stop_ids.end(), next) != options.stop_ids.end()) break;
    context.push_back(next);
    produced.push_back(next);
  }
  return produced;
}

}  // namespace ptqlab
