#include "ptqlab/eval/perplexity.hpp"

#include <chrono>
#include <cmath>
#include <optional>

#include <fmt/format.h>
#include <tbb/parallel_for.h>

#include "ptqlab/eval/scoring.hpp"
#include "ptqlab/nn/forward.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/progress.hpp"
#include "ptqlab/support/stop.hpp"
#include "windows.hpp"

namespace ptqlab {

std::vector<int> perplexity_stream(const Tokenizer& tokenizer, const std::string& text, int bos_id) {
  std::vector<int> stream;
  auto ids = tokenizer.encode(text);
  stream.reserve(ids.size() + 1);
  stream.push_back(bos_id);
  stream.insert(stream.end(), ids.begin(), ids.end());
  return stream;
}

long long batches_per_group(const LlamaConfig& config, long long rows, std::size_t budget) {
  if (budget == 0) budget = std::size_t{1} << 30;
  const double per_batch = static_cast<double>(rows) * config.hidden_size * sizeof(float);
  return std::max(1LL, static_cast<long long>(static_cast<double>(budget) / per_batch));
}

PerplexityResult evaluate_perplexity(const LlamaModel& model, std::span<const int> stream,
                                     const PerplexityOptions& options) {
  const WindowPlan plan =
      plan_windows(model.config, stream.size(), options.seq_len, options.max_windows, 2, "--seq-len");
  const int seq_len = plan.seq_len;
  const long long windows = plan.windows;

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
  // Batches go through the decoder in groups, layer by layer (each layer widened once per group);
  // each batch's arithmetic is that of sequence_nll, so the NLLs do not depend on the grouping.
  const long long group = batches_per_group(model.config, static_cast<long long>(per_call) * seq_len,
                                            options.activation_budget);
  for (long long g0 = 0; g0 < calls; g0 += group) {
    const long long g1 = std::min(calls, g0 + group);
    std::vector<Matrix> hidden(static_cast<std::size_t>(g1 - g0));
    std::vector<BatchShape> shapes(hidden.size());
    auto tokens_of = [&](long long call) {
      const long long first = call * per_call;
      const int n = static_cast<int>(std::min<long long>(per_call, windows - first));
      return std::pair{stream.subspan(static_cast<std::size_t>(first) * seq_len, static_cast<std::size_t>(n) * seq_len),
                       BatchShape{n, seq_len}};
    };
    throw_if_stop_requested();
    for (long long call = g0; call < g1; ++call) {
      const auto [tokens, shape] = tokens_of(call);
      hidden[static_cast<std::size_t>(call - g0)] = embed_tokens(model, tokens);
      shapes[static_cast<std::size_t>(call - g0)] = shape;
    }
    decoder_forward_layer_major(model, hidden, shapes, nullptr, [](int) { throw_if_stop_requested(); });
    const F32Tensor head = model.head_view();
    tbb::parallel_for(g0, g1, [&](long long call) {
      const auto [tokens, shape] = tokens_of(call);
      const auto nll = sequence_nll_from_hidden(model, head.matrix(), hidden[static_cast<std::size_t>(call - g0)],
                                                tokens, shape);
      for (int i = 0; i < shape.batch; ++i) result.window_nll[call * per_call + i] = nll[i];
    });
    if (progress) progress->advance(std::min<long long>(windows, g1 * per_call) - g0 * per_call);
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (progress) progress->finish();

  for (double v : result.window_nll) result.total_nll += v;  // in window order: deterministic
  result.mean_nll = result.total_nll / static_cast<double>(result.predicted_tokens);
  result.ppl = std::exp(result.mean_nll);
  result.tokens_per_s = result.seconds > 0 ? result.tokens / result.seconds : 0;
  return result;
}

std::string gptq_wikitext2_text(const std::string& raw) {
  std::string out;
  out.reserve(raw.size() + raw.size() / 8);
  std::size_t pos = 0;
  bool first = true;
  while (pos < raw.size()) {
    std::size_t end = raw.find('\n', pos);
    end = end == std::string::npos ? raw.size() : end + 1;  // the row keeps its newline
    const std::string_view row(raw.data() + pos, end - pos);
    const bool blank = row.find_first_not_of(" \t\r\n\v\f") == std::string_view::npos;
    if (!first) out += "\n\n";
    if (!blank) out += row;
    first = false;
    pos = end;
  }
  return out;
}

PerplexityResult evaluate_perplexity_llamacpp(const LlamaModel& model, std::span<const int> stream,
                                              const PerplexityOptions& options, double* uncertainty) {
  const WindowPlan plan = plan_windows(model.config, stream.size(), options.seq_len, options.max_windows, 4,
                                       "seq_len", " for the llamacpp protocol", "chunk");
  const int n_ctx = plan.seq_len;
  const long long chunks = plan.windows;
  const int first = n_ctx / 2;  // llama.cpp scores logits first .. n_ctx-2
  const int per_call = options.batch_windows > 0 ? options.batch_windows : std::max(1, 4096 / n_ctx);

  PerplexityResult result;
  result.seq_len = n_ctx;
  result.windows = chunks;
  result.tokens = chunks * n_ctx;
  result.predicted_tokens = chunks * (n_ctx - 1 - first);
  result.stream_tokens = static_cast<long long>(stream.size());
  result.window_nll.assign(chunks, 0.0);
  std::vector<double> nll(static_cast<std::size_t>(chunks) * (n_ctx - 1 - first));

  std::optional<Progress> progress;
  if (options.show_progress) progress.emplace(options.label, chunks, "chunks");
  const auto start = std::chrono::steady_clock::now();
  for (long long c0 = 0; c0 < chunks; c0 += per_call) {
    throw_if_stop_requested();
    const int n = static_cast<int>(std::min<long long>(per_call, chunks - c0));
    std::vector<int> tokens(stream.begin() + c0 * n_ctx, stream.begin() + (c0 + n) * n_ctx);
    for (int w = 0; w < n; ++w) tokens[static_cast<std::size_t>(w) * n_ctx] = model.config.bos_token_id;  // replaced, not prepended
    for_each_logits(model, tokens, BatchShape{n, n_ctx}, first, n_ctx - 1, [&](int w, int p, std::span<const float> l) {
      const int target = tokens[static_cast<std::size_t>(w) * n_ctx + p + 1];
      nll[static_cast<std::size_t>(c0 + w) * (n_ctx - 1 - first) + (p - first)] = log_sum_exp(l) - l[target];
    });
    if (progress) progress->advance(n);
  }
  result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  if (progress) progress->finish();
  double sum = 0, sum2 = 0;
  for (std::size_t i = 0; i < nll.size(); ++i) {
    sum += nll[i];
    sum2 += nll[i] * nll[i];
    result.window_nll[i / (n_ctx - 1 - first)] += nll[i];
  }
  const double count = static_cast<double>(nll.size());
  result.total_nll = sum;
  result.mean_nll = sum / count;
  result.ppl = std::exp(result.mean_nll);
  result.tokens_per_s = result.seconds > 0 ? result.tokens / result.seconds : 0;
  if (uncertainty != nullptr) {
    const double var = sum2 / count - result.mean_nll * result.mean_nll;
    *uncertainty = count > 1 && var > 0 ? result.ppl * std::sqrt(var / (count - 1)) : 0.0;
  }
  return result;
}

}  // namespace ptqlab
