#pragma once
// The perplexity protocol (docs/protocols.md, "ptqlab-ppl-v1"):
//   1. read the text file whole and tokenize it once;
//   2. put BOS at the very start only;
//   3. cut into non-overlapping windows of seq_len tokens (default max_position_embeddings),
//      dropping the final partial window;
//   4. evaluate each window from position 0 (no context carried across windows);
//   5. PPL = exp(mean next-token NLL over all predicted positions: seq_len - 1 per window),
//      accumulated in double.
#include <span>
#include <string>
#include <vector>

#include "ptqlab/model.hpp"
#include "ptqlab/tokenizer.hpp"

namespace ptqlab {

inline constexpr const char* kPerplexityProtocol = "ptqlab-ppl-v1";

struct PerplexityOptions {
  int seq_len = 0;          // 0: the model's max_position_embeddings
  long long max_windows = 0;  // 0: all windows
  int batch_windows = 0;    // windows per forward call; 0: about 4096 tokens per call
  // Bytes the hidden states of the batches evaluated together may take (they go through the
  // decoder layer by layer, docs/architecture.md "Evaluation streams"); 0: 1 GiB.
  std::size_t activation_budget = 0;
  bool show_progress = true;
  std::string label = "ppl";  // prefix of the progress line
};

struct PerplexityResult {
  double ppl = 0;
  double mean_nll = 0;
  double total_nll = 0;
  long long windows = 0;
  int seq_len = 0;
  long long tokens = 0;            // windows * seq_len: tokens run through the model
  long long predicted_tokens = 0;  // windows * (seq_len - 1): positions scored
  long long stream_tokens = 0;     // BOS + tokenized text
  double seconds = 0;              // forward passes only
  double tokens_per_s = 0;
  std::vector<double> window_nll;  // summed NLL of each window
};

// BOS followed by the tokens of the whole text.
std::vector<int> perplexity_stream(const Tokenizer& tokenizer, const std::string& text, int bos_id);

// How many batches of `rows` tokens go through the layers together within `budget` bytes of
// hidden states (at least 1).
long long batches_per_group(const LlamaConfig& config, long long rows, std::size_t budget);

PerplexityResult evaluate_perplexity(const LlamaModel& model, std::span<const int> stream,
                                     const PerplexityOptions& options);

}  // namespace ptqlab
