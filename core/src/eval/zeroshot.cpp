// lm-eval's log-likelihood requests and metrics (research/evaluation.md §1).
#include "ptqlab/eval/zeroshot.hpp"

#include <chrono>
#include <cmath>
#include <optional>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <tbb/parallel_for.h>

#include "ptqlab/eval/lmeval_stats.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/progress.hpp"

namespace ptqlab {

namespace {

const std::vector<LmEvalPreset>& presets() {
  static const std::vector<LmEvalPreset> p = {
      {"lmeval-0.3", false, false},    // v0.3.x and the copy vendored by PTQ1.61 / OmniQuant repos
      {"lmeval-0.4", false, true},     // v0.4.0 - v0.4.9.1
      {"lmeval-0.4.10", true, true},   // v0.4.9.2 and later (PR #3347): the tokenizer's BOS
  };
  return p;
}

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f'; }

}  // namespace

const std::vector<std::string>& lmeval_preset_names() {
  static const std::vector<std::string> names = [] {
    std::vector<std::string> n;
    for (const auto& p : presets()) n.push_back(p.name);
    return n;
  }();
  return names;
}

LmEvalPreset lmeval_preset(const std::string& name) {
  for (const auto& p : presets())
    if (p.name == name) return p;
  throw Error(fmt::format("unknown lm-eval preset '{}' (known: {})", name, fmt::join(lmeval_preset_names(), ", ")));
}

std::size_t utf8_length(const std::string& text) {
  std::size_t n = 0;
  for (unsigned char c : text)
    if ((c & 0xC0) != 0x80) ++n;
  return n;
}

void encode_pair(const Tokenizer& tokenizer, const LmEvalPreset& preset, int bos_id, int eos_id,
                 const std::string& context, const std::string& continuation, std::vector<int>& context_tokens,
                 std::vector<int>& continuation_tokens) {
  auto encode = [&](const std::string& s) {
    std::vector<int> ids;
    if (preset.bos) ids.push_back(bos_id);
    const auto body = tokenizer.encode(s);
    ids.insert(ids.end(), body.begin(), body.end());
    return ids;
  };
  if (!preset.joint) {  // v0.3: two separate encodings, no whitespace move; empty context -> [EOS]
    context_tokens = context.empty() ? std::vector<int>{eos_id} : encode(context);
    continuation_tokens = tokenizer.encode(continuation);
    return;
  }
  // Trailing whitespace of the context moves to the front of the continuation.
  std::size_t k = context.size();
  while (k > 0 && is_space(context[k - 1])) --k;
  const std::string ctx = context.substr(0, k);
  const std::string cont = context.substr(k) + continuation;
  if (ctx.empty()) {  // lm-eval: the prefix token (BOS from v0.4.3; EOS before)
    context_tokens = {bos_id};
    continuation_tokens = tokenizer.encode(cont);
    return;
  }
  const auto whole = encode(ctx + cont);
  context_tokens = encode(ctx);
  // The continuation is whatever follows len(C) tokens of the joint encoding (no boundary check).
  const std::size_t split = std::min(context_tokens.size(), whole.size());
  continuation_tokens.assign(whole.begin() + static_cast<std::ptrdiff_t>(split), whole.end());
}

ScoringRequest truncate_request(const std::vector<int>& context_tokens, const std::vector<int>& continuation_tokens,
                                int max_length, bool* continuation_cut) {
  if (continuation_tokens.empty()) throw Error("a continuation encodes to no tokens");
  if (max_length < 1) throw Error(fmt::format("max_length must be at least 1, got {}", max_length));
  const bool cut = static_cast<int>(continuation_tokens.size()) > max_length;
  if (continuation_cut != nullptr) *continuation_cut = cut;
  std::vector<int> all(context_tokens);
  all.insert(all.end(), continuation_tokens.begin(), continuation_tokens.end());
  const std::size_t start = all.size() > static_cast<std::size_t>(max_length) + 1 ? all.size() - max_length - 1 : 0;
  ScoringRequest r;
  r.input.assign(all.begin() + static_cast<std::ptrdiff_t>(start), all.end() - 1);
  if (cut)  // the window holds max_length predictions: the continuation's last max_length tokens
    r.targets.assign(continuation_tokens.end() - max_length, continuation_tokens.end());
  else
    r.targets = continuation_tokens;
  return r;
}

std::vector<ZeroShotRequest> build_requests(const Tokenizer& tokenizer, const LmEvalPreset& preset, int bos_id,
                                            int eos_id, const ZeroShotTask& task, int max_length, long long limit) {
  const std::size_t ndocs =
      limit > 0 ? std::min<std::size_t>(task.docs.size(), static_cast<std::size_t>(limit)) : task.docs.size();
  std::vector<std::vector<ZeroShotRequest>> per_doc(ndocs);
  std::vector<std::string> errors(ndocs);
  tbb::parallel_for(std::size_t{0}, ndocs, [&](std::size_t i) {
    const ZeroShotDoc& d = task.docs[i];
    const std::size_t n = std::max(d.contexts.size(), d.continuations.size());
    for (std::size_t c = 0; c < n; ++c) {
      ZeroShotRequest r;
      r.doc = static_cast<int>(i);
      r.choice = static_cast<int>(c);
      const auto& ctx = d.contexts.size() == 1 ? d.contexts[0] : d.contexts[c];
      const auto& cont = d.continuations.size() == 1 ? d.continuations[0] : d.continuations[c];
      encode_pair(tokenizer, preset, bos_id, eos_id, ctx, cont, r.context_tokens, r.continuation_tokens);
      try {
        r.scoring = truncate_request(r.context_tokens, r.continuation_tokens, max_length, &r.continuation_truncated);
      } catch (const Error& e) {
        errors[i] = fmt::format("item at line {}: {}", d.line, e.what());
        return;
      }
      r.truncated = r.context_tokens.size() + r.continuation_tokens.size() > static_cast<std::size_t>(max_length) + 1;
      per_doc[i].push_back(std::move(r));
    }
  });
  for (const auto& e : errors)
    if (!e.empty()) throw Error(e);
  std::vector<ZeroShotRequest> out;
  for (auto& v : per_doc)
    for (auto& r : v) out.push_back(std::move(r));
  return out;
}

ChoiceMetrics choice_metrics(const std::vector<double>& lls, const std::vector<std::string>& choices, int gold) {
  // numpy argmax: the first maximum.
  std::size_t best = 0, best_norm = 0;
  auto norm = [&](std::size_t i) { return lls[i] / static_cast<double>(utf8_length(choices[i])); };
  for (std::size_t i = 1; i < lls.size(); ++i) {
    if (lls[i] > lls[best]) best = i;
    if (norm(i) > norm(best_norm)) best_norm = i;
  }
  return {static_cast<int>(best) == gold ? 1.0 : 0.0, static_cast<int>(best_norm) == gold ? 1.0 : 0.0};
}

ZeroShotResult evaluate_zeroshot(const LlamaModel& model, const Tokenizer& tokenizer, const ZeroShotTask& task,
                                 const ZeroShotOptions& options) {
  const int max_length = options.max_length > 0 ? options.max_length : model.config.max_position_embeddings;
  if (max_length > model.config.max_position_embeddings)
    throw Error(fmt::format("max_length {} exceeds the model's max_position_embeddings {}", max_length,
                            model.config.max_position_embeddings));
  ZeroShotResult res;
  res.protocol = fmt::format("{}/{}@{}", options.preset.name, task.name, task.source);
  res.requests = build_requests(tokenizer, options.preset, model.config.bos_token_id, model.config.eos_token_id, task,
                                max_length, options.limit);
  res.docs = res.requests.empty() ? 0 : res.requests.back().doc + 1;

  std::vector<ScoringRequest> scoring;
  scoring.reserve(res.requests.size());
  long long tokens = 0, truncated = 0, cut = 0;
  for (const auto& r : res.requests) {
    scoring.push_back(r.scoring);
    tokens += static_cast<long long>(r.scoring.input.size());
    truncated += r.truncated ? 1 : 0;
    cut += r.continuation_truncated ? 1 : 0;
  }
  std::optional<Progress> progress;
  if (options.show_progress) progress.emplace(options.label, static_cast<long long>(scoring.size()), "requests");
  ScoringOptions so;
  so.max_batch_tokens = options.batch_tokens;
  long long reported = 0;
  so.on_progress = [&](long long done) {
    if (progress) progress->advance(done - reported);
    reported = done;
  };
  const auto t0 = std::chrono::steady_clock::now();
  res.scores = score_requests(model, scoring, so);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (progress) progress->finish();

  // Per-document metrics, requests being in doc order then choice order.
  std::size_t k = 0;
  for (long long d = 0; d < res.docs; ++d) {
    const ZeroShotDoc& doc = task.docs[d];
    std::vector<double> lls;
    bool greedy = true;
    while (k < res.requests.size() && res.requests[k].doc == d) {
      lls.push_back(res.scores[k].logprob);
      greedy = greedy && res.scores[k].greedy;
      ++k;
    }
    if (task.kind == ZeroShotKind::loglikelihood) {
      res.doc_ll.push_back(lls[0]);
      res.doc_acc.push_back(greedy ? 1.0 : 0.0);
    } else {
      const auto m = choice_metrics(lls, doc.choices, doc.gold);
      res.doc_acc.push_back(m.acc);
      if (task.acc_norm) res.doc_acc_norm.push_back(m.acc_norm);
    }
  }
  auto& m = res.metrics;
  m["acc"] = py_mean(res.doc_acc);
  m["acc_stderr"] = mean_stderr(res.doc_acc);
  if (task.acc_norm) {
    m["acc_norm"] = py_mean(res.doc_acc_norm);
    m["acc_norm_stderr"] = mean_stderr(res.doc_acc_norm);
  }
  if (task.kind == ZeroShotKind::loglikelihood) {
    m["ppl"] = lmeval_perplexity(res.doc_ll);
    m["ppl_stderr"] = bootstrap_perplexity_stderr(res.doc_ll, options.bootstrap_iters);
  }
  m["chance"] = task.chance;
  m["docs"] = static_cast<double>(res.docs);
  m["docs_total"] = static_cast<double>(task.docs.size());
  m["requests"] = static_cast<double>(res.requests.size());
  m["tokens"] = static_cast<double>(tokens);
  m["truncated"] = static_cast<double>(truncated);
  m["continuation_truncated"] = static_cast<double>(cut);
  m["max_length"] = max_length;
  m["version"] = task.version;
  res.seconds = seconds;  // not a metric: results must not depend on the machine's speed
  res.tokens = tokens;
  return res;
}

}  // namespace ptqlab
