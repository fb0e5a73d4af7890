#include "ptqlab/perplexity.hpp"

#include <atomic>
#include <chrono>
#include <cmath>
#include <optional>

#include <fmt/format.h>
#include <tbb/parallel_for.h>

#include "ptqlab/error.hpp"
#include "ptqlab/forward.hpp"
#include "ptqlab/progress.hpp"
#include "ptqlab/stop.hpp"

namespace ptqlab {

std::vector<int> perplexity_stream(const Tokenizer& tokenizer, const std::string& text, int bos_id) {
  std::vector<int> stream;
  auto ids = tokenizer.encode(text);
  stream.reserve(ids.size() + 1);
  stream.push_back(bos_id);
  stream.insert(stream.end(), ids.begin(), ids.end());
  return stream;
}

PerplexityResult evaluate_perplexity(const LlamaModel& model, std::span<const int> stream,
                                     const PerplexityOptions& options) {
  const int seq_len = options.seq_len > 0 ? options.seq_len : model.config.max_position_embeddings;
  if (seq_len < 2) throw Error(fmt::format("--seq-len must be at least 2, got {}", seq_len));
  if (seq_len > model.config.max_position_embeddings)
    throw Error(fmt::format("--seq-len {} exceeds the model's max_position_embeddings {}", seq_len,
                            model.config.max_position_embeddings));
  long long windows = static_cast<long long>(stream.size()) / seq_len;
  if (options.max_windows > 0) windows = std::min(windows, options.max_windows);
  if (windows == 0)
    throw Error(fmt::format("the text has {} tokens, fewer than one window of {}", stream.size(), seq_len));

  const int per_call = options.batch_windows > 0 ? options.batch_windows : std::max(1, 4096 / seq_len);
  const long long calls = (windows + per_call - 1) / per_call;

  PerplexityResult result;
  result.seq_len = seq_len;
  result.windows = windows;
  result.tokens = windows * seq_len;
  result.predicted_tokens = windows * (seq_len - 1);
  result.stream_tokens = static_cast<long long>(stream.size());
  result.window_nll.assign(windows, 0.0);

  std::optional<Progress> progress;
  if (options.show_progress) progress.emplace(options.label, windows, "windows");
  const auto start = std::chrono::steady_clock::now();
  // Batches are fixed by (windows, per_call) alone, so the result does not depend on threads.
  // After SIGTERM the remaining batches are skipped and Stopped is thrown (docs/slurm.md).
  std::atomic<bool> skipped{false};
  tbb::parallel_for(0LL, calls, [&](long long call) {
    if (stop_requested()) {
      skipped = true;
      return;
    }
    const long long first = call * per_call;
    const int n = static_cast<int>(std::min<long long>(per_call, windows - first));
    const auto tokens = stream.subspan(static_cast<std::size_t>(first) * seq_len, static_cast<std::size_t>(n) * seq_len);
    const auto nll = sequence_nll(model, tokens, BatchShape{n, seq_len});
    for (int i = 0; i < n; ++i) result.window_nll[first + i] = nll[i];
    if (progress) progress->advance(n);
  });
  if (skipped) throw Stopped();
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (progress) progress->finish();

  for (double v : result.window_nll) result.total_nll += v;  // in window order: deterministic
  result.mean_nll = result.total_nll / static_cast<double>(result.predicted_tokens);
  result.ppl = std::exp(result.mean_nll);
  result.tokens_per_s = result.seconds > 0 ? result.tokens / result.seconds : 0;
  return result;
}

}  // namespace ptqlab
