// The SentencePiece tokenizer shipped with the stories models (tokenizer.model, 512 pieces):
// special ids, lossless round trips on the real evaluation text, and load errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <random>

#include "checkpoint_edit.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/support/error.hpp"
#include "ptqlab/support/text_file.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

namespace fs = std::filesystem;

fs::path tokenizer_path() { return test::model_dir("stories260K") / "tokenizer.model"; }

TEST(Tokenizer, LoadsWithSpecialIds) {
  const Tokenizer tok(tokenizer_path());
  EXPECT_EQ(tok.vocab_size(), 512);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_EQ(tok.piece(0), "<unk>");
  EXPECT_EQ(tok.piece(1), "<s>");
  EXPECT_EQ(tok.piece(2), "</s>");
  EXPECT_EQ(tok.piece(3), "<0x00>");
  EXPECT_EQ(tok.piece(258), "<0xFF>");
}

TEST(Tokenizer, SameFileInAllThreeModels) {
  const auto a = test::read_bytes(tokenizer_path());
  EXPECT_EQ(test::read_bytes(test::model_dir("llama2xs-279K") / "tokenizer.model"), a);
  EXPECT_EQ(test::read_bytes(test::model_dir("stories260K-bf16") / "tokenizer.model"), a);
}

TEST(Tokenizer, OnceUponATimeRoundTrips) {
  const Tokenizer tok(tokenizer_path());
  const auto ids = tok.encode("Once upon a time");
  ASSERT_FALSE(ids.empty());
  EXPECT_LT(ids.size(), 16u);  // merges happen: fewer tokens than characters
  for (int id : ids) {
    EXPECT_GT(id, 2);
    EXPECT_LT(id, 512);
  }
  EXPECT_EQ(tok.decode(ids), "Once upon a time");
  EXPECT_NE(ids.front(), tok.bos_id());
}

// Characters outside the vocabulary fall back to bytes, so id 0 never appears and the text
// survives exactly; whitespace runs and leading spaces survive too (remove_extra_whitespaces off).
TEST(Tokenizer, ByteFallbackAndWhitespaceRoundTrip) {
  const Tokenizer tok(tokenizer_path());
  for (const std::string text : {"  two leading spaces", "tabs\tand\n\nnewlines  ", "caf\xc3\xa9 \xe2\x82\xac 42 \xf0\x9f\x98\x80",
                                 "123456789", " "}) {
    SCOPED_TRACE(text);
    const auto ids = tok.encode(text);
    EXPECT_EQ(std::count(ids.begin(), ids.end(), 0), 0);
    EXPECT_EQ(tok.decode(ids), text);
  }
  // U+65E5 is not a piece: after the dummy-prefix "\u2581" it is encoded as its three UTF-8 bytes,
  // <0xE6> <0x97> <0xA5> (byte b is id 3 + b).
  const auto ids = tok.encode("\xe6\x97\xa5");
  ASSERT_EQ(ids.size(), 4u);
  EXPECT_EQ(tok.piece(ids[0]), "\xe2\x96\x81");
  EXPECT_EQ(std::vector<int>(ids.begin() + 1, ids.end()), (std::vector<int>{3 + 0xe6, 3 + 0x97, 3 + 0xa5}));
  EXPECT_EQ(tok.piece(3 + 0xe6), "<0xE6>");
}

void expect_lossless(const fs::path& file) {
  const Tokenizer tok(tokenizer_path());
  const auto text = read_text_file(file);
  ASSERT_GT(text.size(), 500'000u);
  const auto ids = tok.encode(text);
  EXPECT_GT(ids.size(), text.size() / 8);
  EXPECT_LT(ids.size(), text.size());
  EXPECT_EQ(std::count(ids.begin(), ids.end(), 0), 0) << "id 0 (<unk>) produced";
  const auto [lo, hi] = std::minmax_element(ids.begin(), ids.end());
  EXPECT_GE(*lo, 3);  // no <s>, </s> or <unk>
  EXPECT_LT(*hi, 512);
  const auto back = tok.decode(ids);
  ASSERT_EQ(back.size(), text.size());
  EXPECT_TRUE(back == text) << "decode(encode(x)) != x";
}

TEST(Tokenizer, WikiText2TestRoundTripsExactly) { expect_lossless(test::data_file("wikitext-2-raw/wiki.test.raw")); }

TEST(Tokenizer, TinyStoriesValidRoundTripsExactly) { expect_lossless(test::data_file("tinystories/valid.txt")); }

// wiki.test.raw starts with " \n = Robert Boulter = \n": the leading space is kept (it would be
// stripped with remove_extra_whitespaces), so the first ids decode to the file's first bytes.
TEST(Tokenizer, WikiTextFirstIdsDecodeToFilePrefix) {
  const Tokenizer tok(tokenizer_path());
  const auto text = read_text_file(test::data_file("wikitext-2-raw/wiki.test.raw"));
  ASSERT_EQ(text.substr(0, 22), " \n = Robert Boulter = ");
  const auto ids = tok.encode(text);
  ASSERT_GE(ids.size(), 20u);
  // The dummy prefix "\u2581", the file's own leading space "\u2581", then "\n" and "=" by byte
  // fallback (neither is a piece of this 512-token vocabulary), with "\u2581" between.
  const std::string space = "\xe2\x96\x81";
  EXPECT_EQ(tok.piece(ids[0]), space);
  EXPECT_EQ(tok.piece(ids[1]), space);
  EXPECT_EQ(tok.piece(ids[2]), "<0x0A>");
  EXPECT_EQ(tok.piece(ids[3]), space);
  EXPECT_EQ(tok.piece(ids[4]), "<0x3D>");
  EXPECT_EQ(tok.piece(ids[5]), space);
  const std::string head = tok.decode(std::vector<int>(ids.begin(), ids.begin() + 6));
  EXPECT_EQ(head, " \n = ");
  EXPECT_EQ(head, text.substr(0, head.size()));
  // Every prefix of the ids decodes to a prefix of the file; 20 ids reach the end of the title.
  for (std::size_t k = 1; k <= 20; ++k) {
    const auto d = tok.decode(std::vector<int>(ids.begin(), ids.begin() + k));
    EXPECT_EQ(d, text.substr(0, d.size())) << k << " ids";
  }
  EXPECT_EQ(tok.decode(std::vector<int>(ids.begin(), ids.begin() + 20)), " \n = Robert Boulter = \n");
}

TEST(Tokenizer, MissingFileNamesThePath) {
  const fs::path missing = "/nonexistent/ptqlab/tokenizer.model";
  test::expect_error([&] { Tokenizer t(missing); }, {missing.string(), "tokenizer model not found"});
  // A directory is not a tokenizer file either.
  const auto dir = test::model_dir("stories260K");
  test::expect_error([&] { Tokenizer t(dir); }, {dir.string(), "tokenizer model not found"});
}

TEST(Tokenizer, CorruptFileNamesThePath) {
  test::TempDir tmp;
  const auto path = tmp.path() / "tokenizer.model";
  std::mt19937 rng(1234);
  std::string junk(4096, '\0');
  for (auto& c : junk) c = static_cast<char>(rng() & 0xff);
  test::write_bytes(path, junk);
  test::expect_error([&] { Tokenizer t(path); }, {path.string(), "not a valid SentencePiece model"});

  // The real file cut in half is also rejected.
  const auto real = test::read_bytes(tokenizer_path());
  test::write_bytes(path, real.substr(0, real.size() / 2));
  test::expect_error([&] { Tokenizer t(path); }, {path.string(), "not a valid SentencePiece model"});
}

}  // namespace
}  // namespace ptqlab
