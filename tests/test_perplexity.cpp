// The perplexity protocol (docs/protocols.md) on the real checkpoints and text.
#include <gtest/gtest.h>

#include <cmath>

#include <nlohmann/json.hpp>
#include <tbb/global_control.h>

#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/nn/forward.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/text_file.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

struct Fixture {
  LlamaModel model;
  std::vector<int> tinystories, wiki;
};

const Fixture& fixture() {
  static const Fixture f = [] {
    Fixture f;
    const auto dir = test::model_dir("stories260K");
    f.model = load_model(dir);
    const Tokenizer tok(dir / "tokenizer.model");
    f.tinystories = perplexity_stream(tok, read_text_file(test::data_file("tinystories/valid.txt")), 1);
    f.wiki = perplexity_stream(tok, read_text_file(test::data_file("wikitext-2-raw/wiki.test.raw")), 1);
    return f;
  }();
  return f;
}

PerplexityOptions quiet(int seq_len = 0, long long max_windows = 0) {
  PerplexityOptions o;
  o.seq_len = seq_len;
  o.max_windows = max_windows;
  o.show_progress = false;
  return o;
}

TEST(Perplexity, StreamHasBosOnlyAtTheStart) {
  const auto& s = fixture().tinystories;
  ASSERT_GT(s.size(), 1000u);
  EXPECT_EQ(s[0], 1);
  EXPECT_EQ(std::count(s.begin(), s.end(), 1), 1);
}

TEST(Perplexity, WindowsAreNonOverlappingAndPartialWindowIsDropped) {
  const auto& f = fixture();
  const auto r = evaluate_perplexity(f.model, f.tinystories, quiet());
  EXPECT_EQ(r.seq_len, 512);  // default: max_position_embeddings
  EXPECT_EQ(r.stream_tokens, static_cast<long long>(f.tinystories.size()));
  EXPECT_EQ(r.windows, static_cast<long long>(f.tinystories.size()) / 512);
  EXPECT_EQ(r.tokens, r.windows * 512);
  EXPECT_EQ(r.predicted_tokens, r.windows * 511);
  ASSERT_EQ(r.window_nll.size(), static_cast<std::size_t>(r.windows));

  // Window 5 evaluated on its own, from position 0, gives the same NLL.
  const std::span<const int> w5(f.tinystories.data() + 5 * 512, 512);
  EXPECT_NEAR(sequence_nll(f.model, w5, BatchShape{1, 512})[0], r.window_nll[5], 1e-6 * r.window_nll[5]);
  // PPL = exp(total NLL / predicted positions).
  double total = 0;
  for (double v : r.window_nll) total += v;
  EXPECT_DOUBLE_EQ(r.total_nll, total);
  EXPECT_DOUBLE_EQ(r.ppl, std::exp(total / r.predicted_tokens));
}

TEST(Perplexity, Stories260KGoldenValues) {
  // Regression values of this protocol on the shipped files (docs/protocols.md). The forward pass
  // itself is checked against a double-precision reference in test_forward.
  const auto& f = fixture();
  const auto ts = evaluate_perplexity(f.model, f.tinystories, quiet());
  EXPECT_EQ(ts.windows, 618);
  EXPECT_NEAR(ts.ppl, 5.28720, 5e-4);
  const auto wiki = evaluate_perplexity(f.model, f.wiki, quiet(512, 200));
  EXPECT_EQ(wiki.windows, 200);
  EXPECT_GT(wiki.ppl, 50.0);  // out-of-domain text for a TinyStories model
}

TEST(Perplexity, MaxWindowsAndSeqLen) {
  const auto& f = fixture();
  const auto r = evaluate_perplexity(f.model, f.tinystories, quiet(128, 7));
  EXPECT_EQ(r.windows, 7);
  EXPECT_EQ(r.seq_len, 128);
  EXPECT_EQ(r.predicted_tokens, 7 * 127);
  // Shorter windows have less context, so per-token loss is higher.
  const auto full = evaluate_perplexity(f.model, f.tinystories, quiet(512, 2));
  EXPECT_GT(r.ppl, full.ppl);
}

TEST(Perplexity, BatchSizeAndThreadsDoNotChangeTheResult) {
  const auto& f = fixture();
  auto o = quiet(512, 24);
  o.batch_windows = 8;
  const auto a = evaluate_perplexity(f.model, f.tinystories, o);
  {
    tbb::global_control one(tbb::global_control::max_allowed_parallelism, 1);
    const auto b = evaluate_perplexity(f.model, f.tinystories, o);
    EXPECT_EQ(a.window_nll, b.window_nll);
  }
  o.batch_windows = 1;
  const auto c = evaluate_perplexity(f.model, f.tinystories, o);
  EXPECT_NEAR(a.ppl, c.ppl, 1e-5 * a.ppl);
}

TEST(Perplexity, Bf16CheckpointWithinOnePercentOfF32) {
  const auto& f = fixture();
  const auto bf16 = load_model(test::model_dir("stories260K-bf16"));
  EXPECT_EQ(bf16.source_dtype, "BF16");
  const auto a = evaluate_perplexity(f.model, f.tinystories, quiet());
  const auto b = evaluate_perplexity(bf16, f.tinystories, quiet());
  EXPECT_NE(a.ppl, b.ppl);  // the weights really differ
  EXPECT_LT(std::abs(b.ppl / a.ppl - 1.0), 0.01) << a.ppl << " vs " << b.ppl;
}

TEST(Perplexity, ErrorsNameTheProblem) {
  const auto& f = fixture();
  auto expect_error = [&](std::span<const int> stream, PerplexityOptions o, const std::string& phrase) {
    try {
      evaluate_perplexity(f.model, stream, o);
      ADD_FAILURE() << "expected an error containing: " << phrase;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(phrase), std::string::npos) << e.what();
    }
  };
  expect_error(f.tinystories, quiet(1024), "--seq-len 1024 exceeds the model's max_position_embeddings 512");
  expect_error(f.tinystories, quiet(1), "--seq-len must be at least 2");
  expect_error(std::span<const int>(f.tinystories.data(), 100), quiet(), "fewer than one window of 512");
}

TEST(PerplexityCli, JsonHasTheDocumentedKeys) {
  const auto r = test::run_ptqlab("ppl --model " + test::model_dir("stories260K").string() + " --text " +
                                  test::data_file("tinystories/valid.txt").string() +
                                  " --max-windows 4 --seq-len 256 --json",
                                  /*capture_stderr=*/false);
  ASSERT_EQ(r.exit_code, 0) << r.output;
  const auto j = nlohmann::json::parse(r.output);
  for (const char* key : {"ppl", "nll", "tokens", "windows", "seq_len", "tokens_per_s"})
    EXPECT_TRUE(j.contains(key)) << key;
  EXPECT_EQ(j["windows"], 4);
  EXPECT_EQ(j["seq_len"], 256);
  EXPECT_EQ(j["tokens"], 1024);
  EXPECT_NEAR(j["ppl"].get<double>(), std::exp(j["nll"].get<double>()), 1e-9);
}

TEST(PerplexityCli, UserErrorsExitWithTwoAndOneLine) {
  const auto model = test::model_dir("stories260K").string();
  struct Case {
    std::string args, phrase;
  };
  const Case cases[] = {
      {"ppl --model " + model + " --text /nonexistent/file.txt", "/nonexistent/file.txt: no such text file"},
      {"ppl --model /nonexistent/model --text x", "/nonexistent/model: not a model directory"},
      {"ppl --model " + model, "the option '--text' is required"},
      {"ppl --model " + model + " --text " + test::data_file("tinystories/valid.txt").string() + " --seq-len abc",
       "invalid"},
      {"ppl --model " + model + " --bogus 1", "unrecognised option '--bogus'"},
      {"frobnicate", "unknown command 'frobnicate'"},
  };
  for (const auto& c : cases) {
    const auto r = test::run_ptqlab(c.args);
    EXPECT_EQ(r.exit_code, 2) << c.args << "\n" << r.output;
    EXPECT_NE(r.output.find(c.phrase), std::string::npos) << c.args << "\n" << r.output;
    EXPECT_EQ(std::count(r.output.begin(), r.output.end(), '\n'), 1) << c.args << "\n" << r.output;
  }
}

}  // namespace
}  // namespace ptqlab
