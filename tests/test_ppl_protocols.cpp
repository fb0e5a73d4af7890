// The perplexity protocols other than ptqlab-ppl-v1 (docs/protocols.md; research/evaluation.md
// §5.1, §6, §8.1 E8/E9, §8.3): each one's defining detail.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/nn/forward.hpp"
#include "ptqlab/support/text_file.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

PerplexityOptions quiet(int seq_len, long long max_windows = 0) {
  PerplexityOptions o;
  o.seq_len = seq_len;
  o.max_windows = max_windows;
  o.show_progress = false;
  return o;
}

TEST(GptqProtocol, RowsAreLinesWithBlankOnesEmptiedJoinedByTwoNewlines) {
  // HF wikitext rows: " \n" -> "", every other line keeps its "\n"; "\n\n".join(rows).
  EXPECT_EQ(gptq_wikitext2_text(" \n = A = \n \n B \n"), "\n\n = A = \n\n\n\n\n B \n");
  EXPECT_EQ(gptq_wikitext2_text("x"), "x");
  EXPECT_EQ(gptq_wikitext2_text(""), "");
}

TEST(GptqProtocol, WikitextStreamHasTheMeasuredLengthAndOneBos) {
  const auto dir = test::model_dir("stories260K");
  const Tokenizer tok(dir / "tokenizer.model");
  const std::string raw = read_text_file(test::data_file("wikitext-2-raw/wiki.test.raw"));
  const auto gptq = perplexity_stream(tok, gptq_wikitext2_text(raw), 1);
  EXPECT_EQ(gptq.size(), 815070u);  // research/evaluation.md §8.3 (809,290 for the raw file)
  EXPECT_EQ(std::count(gptq.begin(), gptq.end(), 1), 1);
  // 809,290 for the raw file (docs/protocols.md): one more token for each of the 5,780 added "\n".
}

TEST(GptqProtocol, WindowsAreNonOverlappingWithoutBosAndTheRemainderIsDropped) {
  // E9: N = 5000, L = 2048 -> 2 windows, 2 * 2047 scored tokens, tokens 4096+ unused.
  LlamaConfig c;
  c.hidden_size = 16;
  c.intermediate_size = 32;
  c.num_layers = 1;
  c.num_heads = 2;
  c.num_kv_heads = 2;
  c.head_dim = 8;
  c.vocab_size = 64;
  c.max_position_embeddings = 2048;
  const auto model = random_llama(c, 5, 0.1f);
  std::vector<int> stream(5000);
  for (int i = 0; i < 5000; ++i) stream[i] = 3 + (i * 7919) % 61;
  stream[0] = 1;
  const auto r = evaluate_perplexity(model, stream, quiet(2048));
  EXPECT_EQ(r.windows, 2);
  EXPECT_EQ(r.predicted_tokens, 4094);
  std::vector<int> changed = stream;
  for (int i = 4096; i < 5000; ++i) changed[i] = 3;
  EXPECT_EQ(evaluate_perplexity(model, changed, quiet(2048)).total_nll, r.total_nll);
  // Window 1 starts with an ordinary token, not BOS: its NLL is that of the bare slice.
  const auto w1 = sequence_nll(model, std::span<const int>(stream.data() + 2048, 2048), BatchShape{1, 2048});
  EXPECT_NEAR(r.window_nll[1], w1[0], 1e-9 * std::abs(w1[0]));
}

TEST(LlamaCppProtocol, BosReplacesEachChunksFirstTokenAndOnlyTheSecondHalfIsScored) {
  // E8: n_ctx 512, N = 2000 -> 3 chunks of 255 scored tokens; tokens 0, 512, 1024 replaced by
  // BOS; tokens 1536+ unused.
  const auto dir = test::model_dir("stories260K");
  const auto model = load_model(dir);
  const Tokenizer tok(dir / "tokenizer.model");
  auto stream = perplexity_stream(tok, read_text_file(test::data_file("tinystories/valid.txt")).substr(0, 20000), 1);
  ASSERT_GT(stream.size(), 2000u);
  stream.resize(2000);
  double unc = 0;
  const auto r = evaluate_perplexity_llamacpp(model, stream, quiet(512), &unc);
  EXPECT_EQ(r.windows, 3);
  EXPECT_EQ(r.predicted_tokens, 765);
  EXPECT_GT(unc, 0.0);

  double total = 0;
  for (int c = 0; c < 3; ++c) {
    std::vector<int> chunk(stream.begin() + c * 512, stream.begin() + (c + 1) * 512);
    chunk[0] = 1;
    const Matrix logits = forward_logits(model, chunk, BatchShape{1, 512});
    for (int j = 256; j <= 510; ++j) {
      const auto row = logits.row(j);
      const double m = row.maxCoeff();
      double s = 0;
      for (Eigen::Index v = 0; v < row.size(); ++v) s += std::exp(row(v) - m);
      total += m + std::log(s) - row(chunk[j + 1]);
    }
  }
  EXPECT_NEAR(r.total_nll, total, 1e-6 * std::abs(total));
  EXPECT_NEAR(r.ppl, std::exp(total / 765), 1e-6 * r.ppl);

  auto changed = stream;
  changed[512] = 5;  // overwritten by BOS anyway
  changed[1024] = 7;
  for (int i = 1536; i < 2000; ++i) changed[i] = 3;
  EXPECT_EQ(evaluate_perplexity_llamacpp(model, changed, quiet(512)).total_nll, r.total_nll);
}

}  // namespace
}  // namespace ptqlab
