#pragma once
// Zero-shot multiple choice by log-likelihood, scored the way lm-evaluation-harness scores it
// (docs/zeroshot.md; research/evaluation.md §1-4): the task files of shared/data/zeroshot mapped
// onto lm-eval's doc_to_text / choices / target, lm-eval's context/continuation token split and
// left truncation, acc / acc_norm / perplexity and their standard errors.
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "ptqlab/eval/scoring.hpp"
#include "ptqlab/model/model.hpp"
#include "ptqlab/model/tokenizer.hpp"

namespace ptqlab {

// How lm-eval turns (context, continuation) strings into tokens; the rules changed across
// versions (research/evaluation.md §1.2).
struct LmEvalPreset {
  std::string name;   // "lmeval-0.3", "lmeval-0.4", "lmeval-0.4.10"
  bool bos = false;   // prepend BOS to every encoding
  bool joint = true;  // joint split (move trailing context whitespace, encode context+continuation
                      // once, continuation = tokens after len(enc(context))); false: separate encodings
};
// Throws ptqlab::Error for an unknown name (the message lists the known ones).
LmEvalPreset lmeval_preset(const std::string& name);
const std::vector<std::string>& lmeval_preset_names();

enum class ZeroShotKind {
  multiple_choice,  // one context, one continuation per choice (" " + choice)
  multiple_input,   // one context per choice, one shared continuation (WinoGrande)
  loglikelihood,    // one (context, target) pair: perplexity and greedy accuracy (LAMBADA)
};

struct ZeroShotDoc {
  std::vector<std::string> contexts;       // multiple_input: one per choice; otherwise one
  std::vector<std::string> continuations;  // multiple_choice: one per choice, delimiter included
  std::vector<std::string> choices;        // bare choice strings (acc_norm divides by their length in chars)
  int gold = -1;                           // index of the right choice; -1 for loglikelihood
  int line = 0;                            // 1-based line of the data file where the item starts
};

struct ZeroShotTask {
  std::string name;     // lm-eval task name: piqa, arc_easy, ...
  std::string source;   // how exactly the file maps onto lm-eval: "orig", "exact", "no-title", ...
  ZeroShotKind kind = ZeroShotKind::multiple_choice;
  bool acc_norm = false;  // lm-eval reports acc_norm for this task
  double version = 1.0;   // lm-eval task YAML version
  double chance = 0;      // expected accuracy of a uniform guess (0 for loglikelihood)
  std::vector<ZeroShotDoc> docs;
};

// The tasks this evaluator knows, in the papers' column order.
const std::vector<std::string>& zeroshot_task_names();
// The task a dataset name selects: a task name, or "<task>-<anything>" (e.g. piqa-foundry).
// Empty when none.
std::string zeroshot_task_of(const std::string& dataset);
// Reads a task's data file (format detected from the file; research/evaluation.md §3). Every
// problem is a ptqlab::Error "FILE:LINE: what".
ZeroShotTask load_zeroshot_task(const std::string& task, const std::filesystem::path& file);

// One lm-eval request: (context, continuation) strings, tokenized and truncated.
struct ZeroShotRequest {
  int doc = 0;     // index into the task's docs
  int choice = 0;  // index of the choice it scores
  std::vector<int> context_tokens;       // before truncation (BOS included when the preset adds it)
  std::vector<int> continuation_tokens;  // scored
  ScoringRequest scoring;                // model input after left truncation, and the targets
  bool truncated = false;                // context tokens were dropped from the left
  bool continuation_truncated = false;   // the continuation alone is longer than max_length: only
                                         // its last max_length tokens are scored
};

// The context and continuation tokens of one pair under `preset` (research/evaluation.md §1.2).
void encode_pair(const Tokenizer& tokenizer, const LmEvalPreset& preset, int bos_id, int eos_id,
                 const std::string& context, const std::string& continuation, std::vector<int>& context_tokens,
                 std::vector<int>& continuation_tokens);
// lm-eval's left truncation to max_length: input = (C + cont)[-(max_length+1):-1], targets = cont.
// A continuation longer than max_length (lm-eval refuses it; a 512-position model meets such
// answers) keeps the same window: the input is then continuation tokens only and the targets are
// the continuation's last max_length tokens (*continuation_cut is set).
ScoringRequest truncate_request(const std::vector<int>& context_tokens, const std::vector<int>& continuation_tokens,
                                int max_length, bool* continuation_cut = nullptr);
// Every request of the first `limit` docs (0: all), in doc order then choice order.
std::vector<ZeroShotRequest> build_requests(const Tokenizer& tokenizer, const LmEvalPreset& preset, int bos_id,
                                            int eos_id, const ZeroShotTask& task, int max_length, long long limit);

// Per-document multiple-choice metrics from the choices' log-likelihoods.
struct ChoiceMetrics {
  double acc = 0;
  double acc_norm = 0;
};
ChoiceMetrics choice_metrics(const std::vector<double>& lls, const std::vector<std::string>& choices, int gold);
// Unicode code points of a UTF-8 string (Python's len(str)).
std::size_t utf8_length(const std::string& text);

struct ZeroShotOptions {
  LmEvalPreset preset = {"lmeval-0.4.10", true, true};
  int max_length = 0;          // 0: the model's max_position_embeddings
  long long limit = 0;         // first N docs; 0: all
  long long bootstrap_iters = 100000;
  long long batch_tokens = 4096;
  bool show_progress = false;
  std::string label = "zeroshot";
};

struct ZeroShotResult {
  std::string protocol;  // e.g. "lmeval-0.4.10/piqa@orig"
  long long docs = 0;
  std::vector<ZeroShotRequest> requests;
  std::vector<ContinuationScore> scores;  // per request
  std::vector<double> doc_acc, doc_acc_norm, doc_ll;  // per doc (doc_ll: loglikelihood tasks)
  // acc, acc_stderr, [acc_norm, acc_norm_stderr], [ppl, ppl_stderr], docs, requests, tokens,
  // truncated, max_length, version, chance, docs_total
  std::map<std::string, double> metrics;
  double seconds = 0;    // scoring only (forward calls), for throughput
  long long tokens = 0;  // model input tokens scored (sum of request inputs, before prefix sharing)
};

ZeroShotResult evaluate_zeroshot(const LlamaModel& model, const Tokenizer& tokenizer, const ZeroShotTask& task,
                                 const ZeroShotOptions& options);

}  // namespace ptqlab
