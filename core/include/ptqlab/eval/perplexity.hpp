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

#include "ptqlab/model/model.hpp"
#include "ptqlab/model/tokenizer.hpp"

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

// The other protocols (docs/protocols.md), selected by the perplexity evaluator's `protocol`:
//   gptq-wikitext2: the text as GPTQ-style code builds it from HF wikitext rows (each line of the
//     raw file with its "\n" is a row, a whitespace-only line an empty row; rows joined with
//     "\n\n"), then tokenized once with one BOS and cut into windows exactly as ptqlab-ppl-v1
//     (no BOS per window, every position of every window scored).
//   llamacpp: llama-perplexity's chunks of seq_len over BOS + text, the first token of each chunk
//     overwritten with BOS, only the second half scored (positions seq_len/2 .. seq_len-2 predict
//     the next token); ppl_unc is its "+/-".
inline constexpr const char* kGptqWikitextProtocol = "gptq-wikitext2";
inline constexpr const char* kLlamaCppProtocol = "llamacpp";
std::string gptq_wikitext2_text(const std::string& raw);
// PerplexityResult of llama.cpp's protocol: window_nll per chunk, predicted_tokens the scored
// count; `uncertainty` receives llama.cpp's +/- of the final estimate.
PerplexityResult evaluate_perplexity_llamacpp(const LlamaModel& model, std::span<const int> stream,
                                              const PerplexityOptions& options, double* uncertainty = nullptr);

}  // namespace ptqlab
