#pragma once
// The window plan of the perplexity and KL-divergence evaluations: private to core/src/eval (not
// part of the plugin SDK).
#include <cstddef>
#include <string_view>

#include "ptqlab/model/model_config.hpp"

namespace ptqlab {

// The windows an evaluation reads: `windows` non-overlapping runs of `seq_len` tokens from the
// start of the stream.
struct WindowPlan {
  int seq_len = 0;
  long long windows = 0;
};

// `requested` tokens per window (0: the model's context), checked against [minimum,
// max_position_embeddings]; at most max_windows (> 0) of them, and at least one, else an error.
// `setting` is the window length as the user wrote it ("--seq-len", "seq_len"), `why` what needs
// the minimum (appended to that message), `unit` what a window is called ("window", "chunk").
WindowPlan plan_windows(const LlamaConfig& config, std::size_t stream_tokens, int requested, long long max_windows,
                        int minimum, std::string_view setting, std::string_view why = {},
                        std::string_view unit = "window");

}  // namespace ptqlab
