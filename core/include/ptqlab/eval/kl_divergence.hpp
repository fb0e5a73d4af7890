#pragma once
// KL divergence of a quantized model against its FP reference, with llama.cpp's statistics
// (docs/kl-divergence.md; research/evaluation.md §5.2). Windows are those of ptqlab-ppl-v1 (BOS
// + the whole text, non-overlapping windows of seq_len, every next-token position scored), so
// PPL(Q) equals the perplexity evaluator's on the same windows.
//
// The reference's logits are streamed, never held whole: the FP model's float32 logits of the
// scored positions are written once to a content-addressed cache file (4 * vocab bytes per
// scored position) and read back one batch of windows at a time by every arm. Without a cache
// directory the FP forward is rerun beside each arm's, batch by batch (no disk, twice the compute).
#include <cstdint>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "ptqlab/model/model.hpp"

namespace ptqlab {

// One scored position: base and quantized logits over the whole vocabulary, the actual next token.
struct KldToken {
  double kld = 0;       // sum_v p_base(v) (log p_base(v) - log p_q(v)) = KL(base || Q), in double
  double dp = 0;        // p_q(target) - p_base(target)
  double nll_q = 0;     // -log p_q(target)
  double nll_base = 0;  // -log p_base(target)
  bool same_top = false;  // argmax (first maximum) of both agree
};
KldToken kld_token(std::span<const float> base_logits, std::span<const float> q_logits, int target);

// llama.cpp's percentile rule: sorted values, position fraction * (n - 1), linear interpolation.
double kld_percentile(const std::vector<double>& sorted, double fraction);

// The statistics llama-perplexity --kl-divergence prints, as metrics: kld_mean(+_unc), kld_max,
// kld_p99.9 ... kld_p0.1, kld_median, kld_min; dp_* (as fractions, not %), dp_rms(+_unc);
// same_top(+_unc); ppl_q, ppl_base (+_unc), ppl_ratio, ln_ppl_ratio, ppl_diff (+_unc), cor_ln_ppl.
std::map<std::string, double> kld_statistics(const std::vector<KldToken>& tokens);

struct KldOptions {
  int seq_len = 0;            // 0: max_position_embeddings
  long long max_windows = 0;  // 0: all windows of the stream
  int batch_windows = 0;      // windows per forward call; 0: about 4096 tokens and 64 MiB of logits
  std::filesystem::path cache_dir;  // empty: no reference file (the FP forward runs beside each arm's)
  std::string reference_key;        // names the reference model's contents (cache key)
  bool show_progress = false;
  std::string label = "kld";
};

struct KldResult {
  std::vector<KldToken> tokens;  // in window order, then position order
  std::map<std::string, double> metrics;
  long long windows = 0;
  int seq_len = 0;
  bool reference_from_cache = false;  // the FP logits were read from an existing cache file
  std::filesystem::path reference_file;
};

// `model` against `reference` on the windows of `stream` (BOS + ids).
KldResult evaluate_kld(const LlamaModel& model, const LlamaModel& reference, std::span<const int> stream,
                       const KldOptions& options);

}  // namespace ptqlab
