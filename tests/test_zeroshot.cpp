// Zero-shot scoring (docs/zeroshot.md; research/evaluation.md §1-3, §8): lm-eval's statistics, its
// tokenization presets and truncation, the task files, and acc / acc_norm checked against an
// independent forward call on a few real items of every task (stories260K).
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <random>

#include "ptqlab/eval/lmeval_stats.hpp"
#include "ptqlab/eval/scoring.hpp"
#include "ptqlab/eval/zeroshot.hpp"
#include "ptqlab/nn/forward.hpp"
#include "ptqlab/support/error.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

struct Fixture {
  LlamaModel model;
  std::unique_ptr<Tokenizer> tok;
};

const Fixture& fixture() {
  static const Fixture f = [] {
    Fixture f;
    const auto dir = test::model_dir("stories260K");
    f.model = load_model(dir);
    f.tok = std::make_unique<Tokenizer>(dir / "tokenizer.model");
    return f;
  }();
  return f;
}

std::filesystem::path task_file(const std::string& task) {
  static const std::map<std::string, std::string> files = {
      {"piqa", "zeroshot/piqa/valid.jsonl"},
      {"arc_easy", "zeroshot/arc_easy/arc_easy.jsonl"},
      {"arc_challenge", "zeroshot/arc_challenge/arc_challenge.jsonl"},
      {"hellaswag", "zeroshot/hellaswag/hellaswag_val_full.txt"},
      {"winogrande", "zeroshot/winogrande/winogrande.jsonl"},
      {"boolq", "zeroshot/boolq/boolq.jsonl"},
      {"openbookqa", "zeroshot/openbookqa/openbook_qa.jsonl"},
      {"lambada_openai", "zeroshot/lambada_openai/lambada_openai.jsonl"}};
  return test::data_file(files.at(task));
}

const ZeroShotTask& task(const std::string& name) {
  static std::map<std::string, ZeroShotTask> cache;
  auto it = cache.find(name);
  if (it == cache.end()) it = cache.emplace(name, load_zeroshot_task(name, task_file(name))).first;
  return it->second;
}

// ---- lm-eval statistics (research/evaluation.md §8.1 E1, E2, E5, E6; §8.4) ----

TEST(LmEvalStats, AccAndAccNormDisagreeOnE1AndTiesGoToTheFirstChoice) {
  const std::vector<std::string> choices = {"yes", "no way", "maybe"};
  auto m = choice_metrics({-4.0, -6.0, -5.5}, choices, 1);
  EXPECT_EQ(m.acc, 0.0);
  EXPECT_EQ(m.acc_norm, 1.0);
  m = choice_metrics({-4.0, -6.0, -5.5}, choices, 0);
  EXPECT_EQ(m.acc, 1.0);
  EXPECT_EQ(m.acc_norm, 0.0);
  m = choice_metrics({-2.0, -2.0}, {"ab", "cd"}, 0);
  EXPECT_EQ(m.acc, 1.0);
  EXPECT_EQ(m.acc_norm, 1.0);
  // The divisor is code points, not bytes: "é" is one character.
  m = choice_metrics({-2.0, -3.0}, {"\xc3\xa9\xc3\xa9", "abc"}, 1);
  EXPECT_EQ(utf8_length("\xc3\xa9\xc3\xa9"), 2u);
  EXPECT_EQ(m.acc_norm, 0.0);  // -1.0 vs -1.0: tie, first wins
}

TEST(LmEvalStats, AccNormEqualsAccWhenChoicesHaveEqualLength) {
  std::mt19937 rng(7);
  std::normal_distribution<double> ll(-20.0, 5.0);
  for (int i = 0; i < 1000; ++i) {
    const int n = 2 + i % 3;
    std::vector<double> lls;
    std::vector<std::string> choices;
    for (int c = 0; c < n; ++c) {
      lls.push_back(ll(rng));
      choices.push_back(std::string(7, static_cast<char>('a' + c)));
    }
    const auto m = choice_metrics(lls, choices, i % n);
    EXPECT_EQ(m.acc, m.acc_norm);
  }
}

TEST(LmEvalStats, StderrIsTheSampleDeviationOverRootN) {
  const std::vector<double> acc = {1, 0, 1, 1};
  EXPECT_DOUBLE_EQ(py_mean(acc), 0.75);
  EXPECT_DOUBLE_EQ(mean_stderr(acc), 0.25);
  std::vector<double> piqa(1838, 0.0);
  std::fill(piqa.begin(), piqa.begin() + 1435, 1.0);
  const double p = 1435.0 / 1838.0;
  EXPECT_NEAR(mean_stderr(piqa), std::sqrt(p * (1 - p) / 1837.0), 1e-12);
  EXPECT_NEAR(mean_stderr(piqa), 0.0096540, 2e-6);  // E5 (acc 0.7807)
  EXPECT_TRUE(std::isnan(mean_stderr(std::vector<double>{1.0})));
  EXPECT_NEAR(lmeval_perplexity(std::vector<double>{-1.0, -3.0}), 7.389056, 1e-6);  // E6
}

TEST(LmEvalStats, PythonRandomAndTheBootstrapMatchCPython) {
  PyRandom r(0);
  EXPECT_EQ(r.randint(0, 45575), 25247);
  EXPECT_EQ(r.randint(0, 45575), 27562);
  EXPECT_EQ(r.randint(0, 45575), 2653);
  const std::vector<double> xs = {-1.0, -3.0, -2.0, -0.5, -4.0};
  EXPECT_NEAR(lmeval_perplexity(xs), 8.16617, 1e-5);
  std::vector<double> first;
  const double se = bootstrap_perplexity_stderr(xs, 2000, &first);
  ASSERT_EQ(first.size(), 3u);
  EXPECT_NEAR(first[0], 9.97418, 1e-5);
  EXPECT_NEAR(first[1], 6.68589, 1e-5);
  EXPECT_NEAR(first[2], 7.38906, 1e-5);
  EXPECT_NEAR(se, 6.54232, 1e-5);
  EXPECT_TRUE(std::isnan(bootstrap_perplexity_stderr(xs, 0)));
}

// ---- tokenization presets and truncation (E3, E4) ----

TEST(ZeroShotTokens, JointSplitMovesTrailingWhitespaceAndSlicesTheJointEncoding) {
  const auto& f = fixture();
  const auto p = lmeval_preset("lmeval-0.4.10");
  std::vector<int> c1, k1, c2, k2;
  encode_pair(*f.tok, p, 1, 2, "Question: Is it?\nAnswer:", " yes", c1, k1);
  encode_pair(*f.tok, p, 1, 2, "Question: Is it?\nAnswer: ", "yes", c2, k2);
  EXPECT_EQ(c1, c2);
  EXPECT_EQ(k1, k2);
  ASSERT_EQ(c1.front(), 1);  // BOS
  auto whole = f.tok->encode("Question: Is it?\nAnswer: yes");
  whole.insert(whole.begin(), 1);
  std::vector<int> joined(c1);
  joined.insert(joined.end(), k1.begin(), k1.end());
  EXPECT_EQ(joined, whole);  // continuation = W[len(C):]

  std::vector<int> c0, k0;
  encode_pair(*f.tok, lmeval_preset("lmeval-0.4"), 1, 2, "Question: Is it?\nAnswer:", " yes", c0, k0);
  EXPECT_EQ(std::vector<int>(c1.begin() + 1, c1.end()), c0);  // same, without BOS
  EXPECT_EQ(k0, k1);

  std::vector<int> c3, k3;
  encode_pair(*f.tok, lmeval_preset("lmeval-0.3"), 1, 2, "Question: Is it?\nAnswer:", " yes", c3, k3);
  EXPECT_EQ(c3, f.tok->encode("Question: Is it?\nAnswer:"));  // no BOS
  EXPECT_EQ(k3, f.tok->encode(" yes"));                       // separately encoded
  // ... which gains a standalone "▁" piece before "▁yes"-like pieces (research/evaluation.md §1.2).
  ASSERT_EQ(k3.size(), k1.size() + 1);
  EXPECT_EQ(f.tok->piece(k3[0]), "\xe2\x96\x81");
  EXPECT_EQ(std::vector<int>(k3.begin() + 1, k3.end()), k1);
  EXPECT_THROW(lmeval_preset("lmeval-9"), Error);
}

TEST(ZeroShotTokens, TruncationDropsContextFromTheLeftAndKeepsTheContinuation) {
  std::vector<int> ctx, cont = {110, 111, 112};
  for (int i = 0; i < 10; ++i) ctx.push_back(100 + i);
  const auto r = truncate_request(ctx, cont, 8);
  // T = ctx + cont (13 tokens); input = T[4:12]; the 3 targets are predicted at positions 5..7.
  EXPECT_EQ(r.input, (std::vector<int>{104, 105, 106, 107, 108, 109, 110, 111}));
  EXPECT_EQ(r.targets, cont);
  const auto untruncated = truncate_request(ctx, cont, 100);
  EXPECT_EQ(untruncated.input.size(), 12u);
  // A continuation longer than the window: the same window, scoring its last max_length tokens.
  bool cut = false;
  const auto longer = truncate_request(ctx, cont, 2, &cut);
  EXPECT_TRUE(cut);
  EXPECT_EQ(longer.input, (std::vector<int>{110, 111}));
  EXPECT_EQ(longer.targets, (std::vector<int>{111, 112}));
  truncate_request(ctx, cont, 8, &cut);
  EXPECT_FALSE(cut);

  // The score of the truncated request is that of an independent forward on T[4:12].
  const auto& f = fixture();
  const auto s = score_requests(f.model, std::vector<ScoringRequest>{r});
  const Matrix logits = forward_logits(f.model, r.input, BatchShape{1, 8});
  double want = 0;
  for (int j = 0; j < 3; ++j) {
    const auto row = logits.row(5 + j);
    const double m = row.maxCoeff();
    want += row(cont[j]) - (m + std::log((row.array() - static_cast<float>(m)).exp().cast<double>().sum()));
  }
  EXPECT_NEAR(s[0].logprob, want, 1e-4);
}

TEST(ZeroShotTokens, BatchingAndPrefixSharingDoNotChangeScores) {
  const auto& f = fixture();
  const auto& t = task("boolq");  // one-token answers: both choices share one forward
  const auto reqs = build_requests(*f.tok, lmeval_preset("lmeval-0.4.10"), 1, 2, t, 512, 2);
  std::vector<ScoringRequest> s;
  for (const auto& r : reqs) s.push_back(r.scoring);
  const auto batched = score_requests(f.model, s);
  for (std::size_t i = 0; i < s.size(); ++i) {
    const auto alone = score_requests(f.model, std::span<const ScoringRequest>(&s[i], 1));
    EXPECT_NEAR(batched[i].logprob, alone[0].logprob, 1e-5) << i;
    EXPECT_EQ(batched[i].greedy, alone[0].greedy);
  }
}

// ---- the task files (research/evaluation.md §3, §8.2 document counts) ----

TEST(ZeroShotTasks, EveryTaskLoadsWithLmEvalsPromptsAndDocumentCounts) {
  const std::map<std::string, std::size_t> counts = {{"piqa", 1838},      {"arc_easy", 2376},   {"arc_challenge", 1172},
                                                      {"hellaswag", 10042}, {"winogrande", 1267}, {"boolq", 3270},
                                                      {"openbookqa", 500},  {"lambada_openai", 5153}};
  for (const auto& name : zeroshot_task_names()) EXPECT_EQ(task(name).docs.size(), counts.at(name)) << name;

  const auto& piqa = task("piqa").docs[0];
  EXPECT_EQ(piqa.contexts[0], "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:");
  EXPECT_EQ(piqa.gold, 0);
  EXPECT_EQ(task("piqa").docs[1].choices[0], "replace drawer with bobby pin ");  // verbatim, trailing space kept
  EXPECT_EQ(task("piqa").source, "orig");
  EXPECT_EQ(task("hellaswag").docs[0].contexts[0], "Roof shingle removal: A man is sitting on a roof. He");
  EXPECT_EQ(task("hellaswag").docs[0].gold, 3);
  EXPECT_EQ(task("hellaswag").docs[0].continuations[3], " starts pulling up roofing on a roof.");
  const auto& boolq = task("boolq").docs[0];
  EXPECT_EQ(boolq.contexts[0].rfind("All biomass goes through", 0), 0u);
  EXPECT_NE(boolq.contexts[0].find("\nQuestion: does ethanol take more energy make that produces?\nAnswer:"),
            std::string::npos);
  EXPECT_EQ(boolq.continuations, (std::vector<std::string>{" no", " yes"}));
  const auto& wino = task("winogrande").docs[0];
  EXPECT_EQ(wino.contexts[1], "Sarah was a much better surgeon than Maria so Maria");
  EXPECT_EQ(wino.continuations[0], " always got the easier cases.");
  EXPECT_EQ(wino.gold, 1);
  // ARC-Easy line 94 lists "decrease" twice: the later copy is dropped.
  const auto& arc = task("arc_easy").docs[93];
  EXPECT_EQ(arc.choices, (std::vector<std::string>{"decrease", "increase", "remain the same"}));
  EXPECT_EQ(arc.contexts[0].substr(arc.contexts[0].size() - 8), "\nAnswer:");
  EXPECT_NEAR(task("arc_easy").chance, 0.2502, 1e-4);
  EXPECT_EQ(task("lambada_openai").docs[0].continuations[0], " signs");
  EXPECT_EQ(task("openbookqa").docs[0].contexts[0].rfind("A person wants to start saving money", 0), 0u);
}

TEST(ZeroShotTasks, MalformedFilesAreRefusedWithFileAndLine) {
  test::TempDir dir;
  auto write = [&](const std::string& name, const std::string& text) {
    std::ofstream(dir.path() / name) << text;
    return dir.path() / name;
  };
  auto message = [](const std::string& t, const std::filesystem::path& p) {
    try {
      load_zeroshot_task(t, p);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const auto arc = write("arc.jsonl", "{\"query\": \"Question: q\", \"choices\": [\"a\", \"b\"], \"gold\": 0}\nnot json\n");
  EXPECT_EQ(message("arc_easy", arc), arc.string() + ":2: not a JSON object (expected one object per line)");
  const auto gold = write("g.jsonl", "{\"query\": \"q\", \"choices\": [\"a\", \"b\"], \"gold\": 2}\n");
  EXPECT_EQ(message("openbookqa", gold), gold.string() + ":1: gold 2 is not a choice index (0..1)");
  const auto hs = write("h.txt", "ctx\n7\na\nb\nc\nd\n");
  EXPECT_EQ(message("hellaswag", hs), hs.string() + ":2: label line must be a single digit 0-3 (klosax HellaSwag format)");
  const auto piqa = write("valid.jsonl", "{\"goal\": \"g\", \"sol1\": \"a\", \"sol2\": \"b\"}\n");
  EXPECT_NE(message("piqa", piqa).find("labels file"), std::string::npos);
  EXPECT_NE(message("boolq", gold).find(":1: query must read 'Passage: <p>\\nQuestion: <q>'"), std::string::npos);
}

// ---- acc / acc_norm against an independent forward on real items of every task ----

// ll of `cont` after `ctx`, from one forward over the untruncated joint encoding (BOS + enc(ctx +
// cont)), without the evaluator's batching, padding, sharing or truncation code.
std::pair<double, bool> independent_ll(const LlamaModel& m, const Tokenizer& tok, const std::string& ctx,
                                       const std::string& cont) {
  std::string c = ctx, k = cont;
  while (!c.empty() && c.back() == ' ') {
    k.insert(k.begin(), ' ');
    c.pop_back();
  }
  std::vector<int> all = {1}, head = {1};
  for (int id : tok.encode(c + k)) all.push_back(id);
  for (int id : tok.encode(c)) head.push_back(id);
  // Longer than the model: keep the last max_position_embeddings + 1 tokens (lm-eval's rule).
  const int max_len = m.config.max_position_embeddings;
  if (static_cast<int>(all.size()) > max_len + 1) {
    const std::size_t drop = all.size() - (max_len + 1);
    all.erase(all.begin(), all.begin() + static_cast<std::ptrdiff_t>(drop));
    head.resize(head.size() - drop);
  }
  const int n = static_cast<int>(all.size());
  const Matrix logits = forward_logits(m, std::span<const int>(all.data(), n - 1), BatchShape{1, n - 1});
  double ll = 0;
  bool greedy = true;
  for (int p = static_cast<int>(head.size()); p < n; ++p) {
    const auto row = logits.row(p - 1);
    Eigen::Index best;
    row.maxCoeff(&best);
    greedy = greedy && best == all[p];
    double s = 0;
    for (Eigen::Index v = 0; v < row.size(); ++v) s += std::exp(static_cast<double>(row(v)) - row(best));
    ll += row(all[p]) - (row(best) + std::log(s));
  }
  return {ll, greedy};
}

TEST(ZeroShotScoring, AccAndAccNormOfEveryTaskMatchAnIndependentForward) {
  const auto& f = fixture();
  for (const auto& name : zeroshot_task_names()) {
    const auto& t = task(name);
    ZeroShotOptions o;
    o.limit = name == "boolq" ? 2 : 4;  // BoolQ passages are long
    o.bootstrap_iters = 100;
    const auto r = evaluate_zeroshot(f.model, *f.tok, t, o);
    ASSERT_EQ(r.docs, o.limit) << name;
    EXPECT_EQ(r.protocol, "lmeval-0.4.10/" + name + "@" + t.source);
    std::size_t k = 0;
    double acc = 0, acc_norm = 0;
    for (long long d = 0; d < r.docs; ++d) {
      const auto& doc = t.docs[d];
      std::vector<double> lls;
      bool greedy = true;
      const std::size_t n = std::max(doc.contexts.size(), doc.continuations.size());
      for (std::size_t c = 0; c < n; ++c, ++k) {
        const auto [ll, g] = independent_ll(f.model, *f.tok, doc.contexts.size() == 1 ? doc.contexts[0] : doc.contexts[c],
                                            doc.continuations.size() == 1 ? doc.continuations[0] : doc.continuations[c]);
        ASSERT_LT(k, r.scores.size());
        EXPECT_NEAR(r.scores[k].logprob, ll, 1e-3) << name << " doc " << d << " choice " << c;
        lls.push_back(ll);
        greedy = greedy && g;
      }
      if (t.kind == ZeroShotKind::loglikelihood) {
        EXPECT_EQ(r.doc_acc[d], greedy ? 1.0 : 0.0);
        EXPECT_NEAR(r.doc_ll[d], lls[0], 1e-3);
        acc += greedy ? 1 : 0;
        continue;
      }
      // argmax by hand, first maximum on ties
      std::size_t best = 0, best_norm = 0;
      for (std::size_t c = 1; c < lls.size(); ++c) {
        if (lls[c] > lls[best]) best = c;
        if (lls[c] / utf8_length(doc.choices[c]) > lls[best_norm] / utf8_length(doc.choices[best_norm])) best_norm = c;
      }
      EXPECT_EQ(r.doc_acc[d], static_cast<int>(best) == doc.gold ? 1.0 : 0.0) << name << " doc " << d;
      acc += static_cast<int>(best) == doc.gold ? 1 : 0;
      if (t.acc_norm) {
        EXPECT_EQ(r.doc_acc_norm[d], static_cast<int>(best_norm) == doc.gold ? 1.0 : 0.0) << name << " doc " << d;
        acc_norm += static_cast<int>(best_norm) == doc.gold ? 1 : 0;
      }
    }
    EXPECT_EQ(k, r.requests.size());
    EXPECT_DOUBLE_EQ(r.metrics.at("acc"), acc / r.docs) << name;
    if (t.acc_norm) EXPECT_DOUBLE_EQ(r.metrics.at("acc_norm"), acc_norm / r.docs) << name;
    EXPECT_EQ(r.metrics.count("acc_norm"), t.acc_norm ? 1u : 0u) << name;
    if (t.kind == ZeroShotKind::loglikelihood) EXPECT_GE(r.metrics.at("ppl"), 1.0);
  }
}

TEST(ZeroShotScoring, LongContextsAreTruncatedAndStillScoreTheWholeContinuation) {
  const auto& f = fixture();
  ZeroShotOptions o;
  o.limit = 3;
  o.max_length = 32;  // BoolQ passages are far longer
  const auto r = evaluate_zeroshot(f.model, *f.tok, task("boolq"), o);
  ASSERT_EQ(r.requests.size(), 6u);
  for (const auto& q : r.requests) {
    EXPECT_TRUE(q.truncated);
    EXPECT_EQ(q.scoring.input.size(), 32u);
    EXPECT_EQ(q.scoring.targets, q.continuation_tokens);
    EXPECT_NE(q.scoring.input.front(), 1);  // the BOS went with the left part
    // The input ends just before the last continuation token of C + cont.
    std::vector<int> all(q.context_tokens);
    all.insert(all.end(), q.continuation_tokens.begin(), q.continuation_tokens.end());
    EXPECT_TRUE(std::equal(q.scoring.input.begin(), q.scoring.input.end(), all.end() - 33));
  }
  EXPECT_EQ(r.metrics.at("truncated"), 6.0);
}

}  // namespace
}  // namespace ptqlab
