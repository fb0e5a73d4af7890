#include "ptqlab/eval/scoring.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include <fmt/format.h>
#include <tbb/parallel_for.h>

#include "ptqlab/support/error.hpp"
#include "ptqlab/support/stop.hpp"

namespace ptqlab {

using Eigen::Index;

double log_sum_exp(std::span<const float> logits) {
  float m = -std::numeric_limits<float>::infinity();
  for (float v : logits) m = std::max(m, v);
  double s = 0;
  for (float v : logits) s += std::exp(static_cast<double>(v) - m);
  return m + std::log(s);
}

int argmax_first(std::span<const float> logits) {
  int best = 0;
  for (std::size_t i = 1; i < logits.size(); ++i)
    if (logits[i] > logits[best]) best = static_cast<int>(i);
  return best;
}

namespace {

bool is_prefix(const std::vector<int>& a, const std::vector<int>& b) {
  return a.size() <= b.size() && std::equal(a.begin(), a.end(), b.begin());
}

}  // namespace

std::vector<ContinuationScore> score_requests(const LlamaModel& model, std::span<const ScoringRequest> requests,
                                              const ScoringOptions& options) {
  const int max_len = model.config.max_position_embeddings;
  const auto n = static_cast<long long>(requests.size());
  for (long long i = 0; i < n; ++i) {
    const auto& r = requests[i];
    if (r.input.empty() || r.targets.empty() || r.targets.size() > r.input.size())
      throw Error(fmt::format("scoring request {}: {} targets for an input of {} tokens", i, r.targets.size(),
                              r.input.size()));
    if (static_cast<int>(r.input.size()) > max_len)
      throw Error(fmt::format("scoring request {}: input of {} tokens exceeds max_position_embeddings {}", i,
                              r.input.size(), max_len));
  }

  // Lexicographic order puts every input just before the inputs it is a prefix of; walking back
  // from the end, each input is represented by the longest input it leads into.
  std::vector<long long> order(n);
  std::iota(order.begin(), order.end(), 0LL);
  std::stable_sort(order.begin(), order.end(),
                   [&](long long a, long long b) { return requests[a].input < requests[b].input; });
  std::vector<long long> rep(n);
  for (long long k = n - 1; k >= 0; --k) {
    const long long i = order[k];
    rep[i] = (k + 1 < n && is_prefix(requests[i].input, requests[order[k + 1]].input)) ? rep[order[k + 1]] : i;
  }
  std::vector<long long> reps;  // distinct forwards, by length then by first request
  for (long long i = 0; i < n; ++i)
    if (rep[i] == i) reps.push_back(i);
  std::stable_sort(reps.begin(), reps.end(),
                   [&](long long a, long long b) { return requests[a].input.size() < requests[b].input.size(); });
  std::vector<std::vector<long long>> served(n);  // representative -> the requests it scores
  for (long long i = 0; i < n; ++i) served[rep[i]].push_back(i);

  std::vector<ContinuationScore> out(n);
  // The head may stay in the mapped checkpoint (issue 13): borrowed in place or widened once here.
  const F32Tensor head_f32 = model.head_view();
  const Eigen::Map<const Matrix> head = head_f32.matrix();
  long long done = 0;
  std::size_t k = 0;
  while (k < reps.size()) {
    // Sequences sorted by length: the batch's length is its last (longest) member's.
    std::size_t end = k + 1;
    while (end < reps.size() &&
           static_cast<long long>(requests[reps[end]].input.size()) * static_cast<long long>(end - k + 1) <=
               options.max_batch_tokens)
      ++end;
    throw_if_stop_requested();
    const int len = static_cast<int>(requests[reps[end - 1]].input.size());
    const int batch = static_cast<int>(end - k);
    std::vector<int> tokens(static_cast<std::size_t>(batch) * len);
    for (int b = 0; b < batch; ++b) {
      const auto& in = requests[reps[k + b]].input;
      auto* row = tokens.data() + static_cast<std::size_t>(b) * len;
      std::copy(in.begin(), in.end(), row);
      std::fill(row + in.size(), row + len, in.back());  // right padding: after every real token
    }
    const Matrix hidden = final_hidden_states(model, tokens, BatchShape{batch, len});
    std::vector<long long> todo;
    std::vector<int> row_of;
    for (int b = 0; b < batch; ++b)
      for (long long i : served[reps[k + b]]) {
        todo.push_back(i);
        row_of.push_back(b);
      }
    tbb::parallel_for(std::size_t{0}, todo.size(), [&](std::size_t t) {
      const auto& r = requests[todo[t]];
      const Index m = static_cast<Index>(r.targets.size());
      const Index first = static_cast<Index>(row_of[t]) * len + static_cast<Index>(r.input.size()) - m;
      Matrix logits;
      linear_forward(hidden.middleRows(first, m), head, logits);
      ContinuationScore s;
      s.greedy = true;
      for (Index j = 0; j < m; ++j) {
        const std::span<const float> row(logits.row(j).data(), static_cast<std::size_t>(logits.cols()));
        const int target = r.targets[j];
        if (target < 0 || target >= static_cast<int>(row.size()))
          throw Error(fmt::format("scoring: target token {} is outside the vocabulary", target));
        s.logprob += static_cast<double>(row[target]) - log_sum_exp(row);
        if (argmax_first(row) != target) s.greedy = false;
      }
      out[todo[t]] = s;
    });
    done += static_cast<long long>(todo.size());
    if (options.on_progress) options.on_progress(done);
    k = end;
  }
  return out;
}

void for_each_logits(const LlamaModel& model, std::span<const int> tokens, BatchShape shape, int first, int last,
                     const LogitsVisitor& visit) {
  if (first < 0 || last > shape.seq_len || first >= last)
    throw Error(fmt::format("for_each_logits: positions [{}, {}) outside windows of {}", first, last, shape.seq_len));
  const Matrix hidden = final_hidden_states(model, tokens, shape);
  // The head may stay in the mapped checkpoint (issue 13): borrowed in place or widened once here.
  const F32Tensor head_f32 = model.head_view();
  const Eigen::Map<const Matrix> head = head_f32.matrix();
  tbb::parallel_for(0, shape.batch, [&](int w) {
    Matrix logits;
    linear_forward(hidden.middleRows(static_cast<Index>(w) * shape.seq_len + first, last - first), head, logits);
    for (int p = first; p < last; ++p)
      visit(w, p, std::span<const float>(logits.row(p - first).data(), static_cast<std::size_t>(logits.cols())));
  });
}

}  // namespace ptqlab
