// Greedy generation of the real stories260K checkpoint against the public sample in llama2.c's
// doc/stories260K.md.
#include <gtest/gtest.h>

#include "ptqlab/model/model.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/nn/generate.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

TEST(Generate, Stories260KGreedyMatchesPublishedSample) {
  const auto dir = test::model_dir("stories260K");
  const auto model = load_model(dir);
  const Tokenizer tok(dir / "tokenizer.model");
  std::vector<int> prompt = {model.config.bos_token_id};
  const auto ids = tok.encode("Once upon a time");
  prompt.insert(prompt.end(), ids.begin(), ids.end());

  GenerateOptions options;
  options.max_new_tokens = 60;
  options.stop_ids = {model.config.bos_token_id};
  auto out = generate(model, prompt, options);
  std::vector<int> all = ids;
  all.insert(all.end(), out.begin(), out.end());
  const std::string text = tok.decode(all);
  const std::string expected =
      "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, she "
      "saw a big, red ball. She wanted to play with it, but it was too high.";
  ASSERT_GE(text.size(), expected.size()) << text;
  EXPECT_EQ(text.substr(0, expected.size()), expected);
}

TEST(Generate, CliPrintsContinuation) {
  const auto r = test::run_ptqlab("generate --model " + test::model_dir("stories260K").string() +
                                  " --prompt 'Once upon a time' --max-new-tokens 12");
  ASSERT_EQ(r.exit_code, 0) << r.output;
  EXPECT_NE(r.output.find("Once upon a time, there was a little girl named Lily"), std::string::npos) << r.output;
}

}  // namespace
}  // namespace ptqlab
