#pragma once
// Scoring primitives shared by the evaluators (zero-shot log-likelihoods, KL divergence, the
// perplexity protocols). Evaluators call these and sequence_nll, never the decoder layers, so a
// different model representation (memory-mapped weights, layer-by-layer streaming) only has to
// re-implement this file and final_hidden_states (ptqlab/forward.hpp).
#include <functional>
#include <span>
#include <vector>

#include "ptqlab/model/model.hpp"
#include "ptqlab/nn/forward.hpp"

namespace ptqlab {

// One log-likelihood request: the model reads `input` from position 0 and the last
// targets.size() positions of it predict `targets` in order (target j is predicted by the logits
// at position input.size() - targets.size() + j). lm-eval's (context, continuation) pair after
// truncation is input = (C + cont)[-(L+1):-1], targets = cont.
struct ScoringRequest {
  std::vector<int> input;
  std::vector<int> targets;
};

struct ContinuationScore {
  double logprob = 0;   // sum over targets of log softmax(logits)[target], natural log, in double
  bool greedy = false;  // every target is the argmax of its logits (ties: the lowest id)
};

struct ScoringOptions {
  long long max_batch_tokens = 4096;  // tokens (padding included) per forward call, at least one sequence
  // Called after each forward call with the number of requests scored so far (from one thread).
  std::function<void(long long done)> on_progress;
};

// Scores every request (results in request order). Work sharing, none of which changes a result
// mathematically: a request whose input is a prefix of another's (the choices of a question with
// one-token answers, or a shared context) is read off that longer forward (causal attention:
// position p sees tokens 0..p only); the remaining inputs are sorted by length and cut into
// right-padded batches of at most max_batch_tokens (padding follows every real token, so it is
// never seen by a scored position). Batches depend on the requests alone, never on threads, so
// results are deterministic.
std::vector<ContinuationScore> score_requests(const LlamaModel& model, std::span<const ScoringRequest> requests,
                                              const ScoringOptions& options = {});

// Streams the logits of positions [first, last) of every window of `shape` (tokens holds
// shape.batch windows of shape.seq_len): visit(window, position, logits[vocab]) where the logits
// at `position` predict token position+1. Only one window's rows of logits exist at a time per
// thread; visit is called concurrently for different windows (never for the same one), and in
// position order within a window.
using LogitsVisitor = std::function<void(int window, int position, std::span<const float> logits)>;
void for_each_logits(const LlamaModel& model, std::span<const int> tokens, BatchShape shape, int first, int last,
                     const LogitsVisitor& visit);

// log(sum(exp(logits))) in double, and the first index of the maximum.
double log_sum_exp(std::span<const float> logits);
int argmax_first(std::span<const float> logits);

}  // namespace ptqlab
