// Model loader: the three shipped checkpoints load with the documented architecture, and damaged
// checkpoints (built by copying stories260K into a temporary directory and editing bytes or JSON)
// are rejected with a specific one-line ptqlab::Error naming the file and the tensor or key.
#include <gtest/gtest.h>

#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>
#include <limits>
#include <map>
#include <set>

#include "checkpoint_edit.hpp"
#include "ptqlab/model/model.hpp"
#include "ptqlab/model/safetensors.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

using test::json;
namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// The shipped models.

void expect_stories_architecture(const LlamaModel& m, int intermediate, int max_positions) {
  const auto& c = m.config;
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.intermediate_size, intermediate);
  EXPECT_EQ(c.num_layers, 5);
  EXPECT_EQ(c.num_heads, 8);
  EXPECT_EQ(c.num_kv_heads, 4);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.q_dim(), 64);
  EXPECT_EQ(c.kv_dim(), 32);
  EXPECT_EQ(c.heads_per_kv(), 2);
  EXPECT_EQ(c.vocab_size, 512);
  EXPECT_EQ(c.max_position_embeddings, max_positions);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_TRUE(c.tie_word_embeddings);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_id, 2);

  // Tied head: no separate matrix, the output head is the embedding itself.
  EXPECT_EQ(m.lm_head.size(), 0);
  EXPECT_EQ(m.output_head().data(), m.embed.data());

  EXPECT_EQ(m.embed.rows(), 512);
  EXPECT_EQ(m.embed.cols(), 64);
  ASSERT_EQ(m.layers.size(), 5u);
  for (const auto& l : m.layers) {
    EXPECT_EQ(l.input_norm.size(), 64);
    EXPECT_EQ(l.post_norm.size(), 64);
    EXPECT_EQ(l.q_proj.rows(), 64);
    EXPECT_EQ(l.q_proj.cols(), 64);
    EXPECT_EQ(l.k_proj.rows(), 32);
    EXPECT_EQ(l.k_proj.cols(), 64);
    EXPECT_EQ(l.v_proj.rows(), 32);
    EXPECT_EQ(l.v_proj.cols(), 64);
    EXPECT_EQ(l.o_proj.rows(), 64);
    EXPECT_EQ(l.o_proj.cols(), 64);
    EXPECT_EQ(l.gate_proj.rows(), intermediate);
    EXPECT_EQ(l.gate_proj.cols(), 64);
    EXPECT_EQ(l.up_proj.rows(), intermediate);
    EXPECT_EQ(l.up_proj.cols(), 64);
    EXPECT_EQ(l.down_proj.rows(), 64);
    EXPECT_EQ(l.down_proj.cols(), intermediate);
  }
  EXPECT_EQ(m.final_norm.size(), 64);
}

TEST(LoaderShipped, Stories260K) {
  const auto dir = test::model_dir("stories260K");
  const auto m = load_model(dir);
  expect_stories_architecture(m, 172, 512);
  EXPECT_EQ(m.parameter_count(), 260'032);
  EXPECT_EQ(m.source_dtype, "F32");
  EXPECT_EQ(m.source_dir, dir);
}

TEST(LoaderShipped, Llama2xs279K) {
  const auto m = load_model(test::model_dir("llama2xs-279K"));
  expect_stories_architecture(m, 192, 256);
  EXPECT_EQ(m.parameter_count(), 279'232);
  EXPECT_EQ(m.source_dtype, "F32");
}

TEST(LoaderShipped, Stories260KBf16) {
  const auto m = load_model(test::model_dir("stories260K-bf16"));
  expect_stories_architecture(m, 172, 512);
  EXPECT_EQ(m.parameter_count(), 260'032);
  EXPECT_EQ(m.source_dtype, "BF16");
  EXPECT_EQ(m.config.torch_dtype, "bfloat16");
}

// parameter_count() agrees with the element counts in the file's own header, and every loaded
// weight equals the little-endian float32 bytes of its tensor (row-major [out, in]).
TEST(LoaderShipped, Stories260KWeightsEqualFileBytes) {
  const auto dir = test::model_dir("stories260K");
  const auto m = load_model(dir);
  const auto st = test::read_st(dir / "model.safetensors");
  const auto names = test::tensor_names(st);
  EXPECT_EQ(names.size(), 47u);
  long long numel = 0;
  for (const auto& n : names) {
    long long k = 1;
    for (const auto& d : st.header[n]["shape"]) k *= d.get<long long>();
    numel += k;
  }
  EXPECT_EQ(numel, m.parameter_count());

  const auto weights = test::all_weights(m);
  EXPECT_EQ(weights.size(), 47u);
  for (const auto& w : weights) {
    SCOPED_TRACE(w.name);
    const auto bytes = test::tensor_bytes(st, w.name);
    ASSERT_EQ(bytes.size(), w.size() * 4);
    EXPECT_EQ(std::memcmp(bytes.data(), w.data, bytes.size()), 0);
  }
}

// Round-to-nearest-even float32 -> bfloat16, written independently of the loader.
std::uint16_t f32_to_bf16_rne(float f) {
  const std::uint32_t bits = test::f32_bits(f);
  return static_cast<std::uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

TEST(LoaderShipped, Bf16RoundingHelperSelfCheck) {
  EXPECT_EQ(f32_to_bf16_rne(1.0f), 0x3f80);
  EXPECT_EQ(f32_to_bf16_rne(-2.0f), 0xc000);
  // 1 + 2^-8 is halfway between bf16 1.0 (even) and 1.0078125 (odd): ties to even.
  EXPECT_EQ(f32_to_bf16_rne(test::bits_f32(0x3f808000u)), 0x3f80);
  // 1.0078125 + 2^-8 is halfway between 0x3f81 (odd) and 0x3f82 (even).
  EXPECT_EQ(f32_to_bf16_rne(test::bits_f32(0x3f818000u)), 0x3f82);
  EXPECT_EQ(f32_to_bf16_rne(test::bits_f32(0x3f808001u)), 0x3f81);  // just above half: up
  EXPECT_EQ(f32_to_bf16_rne(test::bits_f32(0x3f807fffu)), 0x3f80);  // just below half: down
}

// stories260K-bf16 holds exactly the float32 weights rounded to bfloat16 (nearest, ties to even),
// for every one of the 47 tensors; per its README, rounding changed all but one value.
TEST(LoaderShipped, Bf16WeightsAreRoundedF32Weights) {
  const auto f32 = load_model(test::model_dir("stories260K"));
  const auto bf16 = load_model(test::model_dir("stories260K-bf16"));
  const auto a = test::all_weights(f32), b = test::all_weights(bf16);
  ASSERT_EQ(a.size(), b.size());
  long long changed = 0, total = 0;
  for (std::size_t t = 0; t < a.size(); ++t) {
    SCOPED_TRACE(a[t].name);
    ASSERT_EQ(a[t].name, b[t].name);
    ASSERT_EQ(a[t].size(), b[t].size());
    int mismatches = 0;
    for (std::size_t i = 0; i < a[t].size(); ++i) {
      const std::uint32_t want = static_cast<std::uint32_t>(f32_to_bf16_rne(a[t].data[i])) << 16;
      const std::uint32_t got = test::f32_bits(b[t].data[i]);
      if (got != want && mismatches++ < 3)
        ADD_FAILURE() << "index " << i << ": f32 " << a[t].data[i] << " -> bf16 bits " << std::hex << want << ", loaded "
                      << got;
      changed += test::f32_bits(a[t].data[i]) != got;
      ++total;
    }
    EXPECT_EQ(mismatches, 0);
  }
  EXPECT_EQ(total, 260'032);
  EXPECT_EQ(changed, 260'031);
}

TEST(LoaderShipped, NotADirectory) {
  const fs::path missing = "/nonexistent/ptqlab/model";
  test::expect_load_error(missing, {missing.string(), "not a model directory"});
  const auto file = test::model_dir("stories260K") / "config.json";
  test::expect_load_error(file, {file.string(), "not a model directory"});
}

// ---------------------------------------------------------------------------------------------
// Damaged checkpoints.

fs::path st_path(const fs::path& dir) { return dir / "model.safetensors"; }
fs::path cfg_path(const fs::path& dir) { return dir / "config.json"; }
std::string fmt_offsets(std::size_t b, std::size_t e) {
  return "data_offsets [" + std::to_string(b) + ", " + std::to_string(e) + "]";
}

// Applies `edit` to the safetensors file of `dir` and writes it back.
void edit_st(const fs::path& dir, const std::function<void(test::StFile&)>& edit) {
  auto st = test::read_st(st_path(dir));
  edit(st);
  test::write_st(st_path(dir), st);
}

void edit_config(const fs::path& dir, const std::function<void(json&)>& edit) {
  auto j = test::read_json(cfg_path(dir));
  edit(j);
  test::write_json(cfg_path(dir), j);
}

using Phrases = std::vector<std::string>;

struct CorruptCase {
  const char* name;
  // Damages the copy of stories260K in `dir`; returns phrases the error message must contain.
  std::function<Phrases(const fs::path& dir)> damage;
};

const std::vector<CorruptCase>& corrupt_cases() {
  static const std::vector<CorruptCase> cases = {
      {"TruncatedDataSection",
       [](const fs::path& d) {
         auto b = test::read_bytes(st_path(d));
         const auto st = test::read_st(st_path(d));
         const auto [begin, end] = test::offsets(st, "model.norm.weight");  // the last tensor
         EXPECT_EQ(end, st.data.size());
         b.resize(b.size() - 100);
         test::write_bytes(st_path(d), b);
         return Phrases{st_path(d).string(), "tensor 'model.norm.weight'",
                        fmt_offsets(begin, end) + " run past the end of the data section (" +
                            std::to_string(st.data.size() - 100) + " bytes)"};
       }},
      {"ShorterThan8Bytes",
       [](const fs::path& d) {
         test::write_bytes(st_path(d), std::string("\x10\0\0\0\0", 5));
         return Phrases{st_path(d).string(), "truncated: 5 bytes, too short for a safetensors header"};
       }},
      {"HeaderLengthZero",
       [](const fs::path& d) {
         auto b = test::read_bytes(st_path(d));
         b.replace(0, 8, test::le64(0));
         test::write_bytes(st_path(d), b);
         return Phrases{st_path(d).string(), "invalid header length 0"};
       }},
      {"HeaderLengthPastEndOfFile",
       [](const fs::path& d) {
         auto b = test::read_bytes(st_path(d));
         b.replace(0, 8, test::le64(b.size()));
         test::write_bytes(st_path(d), b);
         return Phrases{st_path(d).string(), "header length " + std::to_string(b.size()) + " runs past the end of the file"};
       }},
      {"HeaderNotJson",
       [](const fs::path& d) {
         const auto st = test::read_st(st_path(d));
         test::write_raw_st(st_path(d), R"({"model.embed_tokens.weight": {"dtype": "F32", )", st.data);
         return Phrases{st_path(d).string(), "header is not valid JSON"};
       }},
      {"HeaderNumberOverflow",  // found by fuzz_safetensors: used to escape as json::out_of_range
       [](const fs::path& d) {
         const auto st = test::read_st(st_path(d));
         test::write_raw_st(st_path(d), R"({"model.norm.weight": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 4]}})",
                            st.data);
         return Phrases{st_path(d).string(), "header is not valid JSON (a number is out of range)"};
       }},
      {"HeaderNotObject",
       [](const fs::path& d) {
         const auto st = test::read_st(st_path(d));
         test::write_raw_st(st_path(d), "[1, 2, 3]", st.data);
         return Phrases{st_path(d).string(), "header is not a JSON object"};
       }},
      {"TensorEntryNotObject",
       [](const fs::path& d) {
         edit_st(d, [](test::StFile& st) { st.header["model.norm.weight"] = "F32"; });
         return Phrases{st_path(d).string(), "tensor 'model.norm.weight': entry is not an object"};
       }},
      {"OverlappingOffsets",
       [](const fs::path& d) {
         // model.norm.weight (256 bytes) placed inside model.embed_tokens.weight's bytes.
         edit_st(d, [](test::StFile& st) { st.header["model.norm.weight"]["data_offsets"] = {256, 512}; });
         return Phrases{st_path(d).string(), "tensors 'model.embed_tokens.weight' and 'model.norm.weight' overlap"};
       }},
      {"OverlapHiddenBehindEmptyTensor",
       [](const fs::path& d) {
         // An empty tensor sorted between two overlapping ones must not hide the overlap.
         edit_st(d, [](test::StFile& st) {
           st.header["extra.empty"] = {{"dtype", "F32"}, {"shape", {0}}, {"data_offsets", {300, 300}}};
           st.header["model.norm.weight"]["data_offsets"] = {512, 768};
         });
         return Phrases{st_path(d).string(), "tensors 'model.embed_tokens.weight' and 'model.norm.weight' overlap"};
       }},
      {"OffsetsPastEndOfData",
       [](const fs::path& d) {
         std::size_t n = 0;
         edit_st(d, [&](test::StFile& st) {
           n = st.data.size();
           st.header["model.layers.2.self_attn.k_proj.weight"]["data_offsets"] = {n, n + 32 * 64 * 4};
         });
         return Phrases{st_path(d).string(), "tensor 'model.layers.2.self_attn.k_proj.weight'",
                        fmt_offsets(n, n + 32 * 64 * 4) + " run past the end of the data section"};
       }},
      {"ReversedOffsets",
       [](const fs::path& d) {
         edit_st(d, [](test::StFile& st) {
           const auto [b, e] = test::offsets(st, "model.layers.0.input_layernorm.weight");
           st.header["model.layers.0.input_layernorm.weight"]["data_offsets"] = {e, b};
         });
         return Phrases{st_path(d).string(), "tensor 'model.layers.0.input_layernorm.weight'", "are reversed"};
       }},
      {"NegativeOffset",
       [](const fs::path& d) {
         edit_st(d, [](test::StFile& st) { st.header["model.norm.weight"]["data_offsets"] = {-256, 0}; });
         return Phrases{st_path(d).string(), "tensor 'model.norm.weight'", "data_offsets must be non-negative integers"};
       }},
      {"UnsupportedDtypeI8",
       [](const fs::path& d) {
         edit_st(d, [](test::StFile& st) { st.header["model.layers.1.mlp.up_proj.weight"]["dtype"] = "I8"; });
         return Phrases{st_path(d).string(), "tensor 'model.layers.1.mlp.up_proj.weight': unsupported dtype 'I8'"};
       }},
      {"UnsupportedDtypeF64",
       [](const fs::path& d) {
         // Same byte size as a valid F64 tensor of half the elements: only the dtype is wrong.
         edit_st(d, [](test::StFile& st) {
           st.header["model.norm.weight"]["dtype"] = "F64";
           st.header["model.norm.weight"]["shape"] = {32};
         });
         return Phrases{st_path(d).string(), "tensor 'model.norm.weight': unsupported dtype 'F64'"};
       }},
      {"ByteSizeNotShapeTimesDtype",
       [](const fs::path& d) {
         edit_st(d, [](test::StFile& st) { st.header["model.norm.weight"]["shape"] = {63}; });
         return Phrases{st_path(d).string(),
                        "tensor 'model.norm.weight': 256 bytes in data_offsets but shape and dtype F32 need 252"};
       }},
      {"DtypeSizeMismatch",
       [](const fs::path& d) {
         edit_st(d, [](test::StFile& st) { st.header["model.layers.4.post_attention_layernorm.weight"]["dtype"] = "BF16"; });
         return Phrases{st_path(d).string(), "tensor 'model.layers.4.post_attention_layernorm.weight'",
                        "256 bytes in data_offsets but shape and dtype BF16 need 128"};
       }},
      {"NegativeShape",
       [](const fs::path& d) {
         edit_st(d, [](test::StFile& st) { st.header["model.norm.weight"]["shape"] = {-64}; });
         return Phrases{st_path(d).string(), "tensor 'model.norm.weight': shape entries must be non-negative integers"};
       }},
      {"ConfigHiddenSizeDisagreesWithTensors",
       [](const fs::path& d) {
         edit_config(d, [](json& j) { j["hidden_size"] = 32; });
         return Phrases{st_path(d).string(),
                        "tensor 'model.embed_tokens.weight': shape [512, 64] does not match config.json, which "
                        "implies [512, 32]"};
       }},
      {"HeaderShapeDisagreesWithConfig",
       [](const fs::path& d) {
         // Same element count, so the byte size is consistent; only config.json can catch it.
         edit_st(d, [](test::StFile& st) { st.header["model.layers.2.self_attn.q_proj.weight"]["shape"] = {32, 128}; });
         return Phrases{st_path(d).string(),
                        "tensor 'model.layers.2.self_attn.q_proj.weight': shape [32, 128] does not match config.json, "
                        "which implies [64, 64]"};
       }},
      {"MissingTensor",
       [](const fs::path& d) {
         edit_st(d, [](test::StFile& st) { test::remove_tensor(st, "model.layers.3.mlp.up_proj.weight"); });
         return Phrases{st_path(d).string(), "tensor 'model.layers.3.mlp.up_proj.weight' is missing"};
       }},
      {"NanWeight",
       [](const fs::path& d) {
         edit_st(d, [](test::StFile& st) {
           test::set_f32(st, "model.layers.1.mlp.down_proj.weight", 5, std::numeric_limits<float>::quiet_NaN());
         });
         return Phrases{st_path(d).string(), "tensor 'model.layers.1.mlp.down_proj.weight'",
                        "non-finite value nan at flat index 5"};
       }},
      {"InfWeight",
       [](const fs::path& d) {
         edit_st(d, [](test::StFile& st) {
           test::set_f32(st, "model.embed_tokens.weight", 1000, -std::numeric_limits<float>::infinity());
         });
         return Phrases{st_path(d).string(), "tensor 'model.embed_tokens.weight'",
                        "non-finite value -inf at flat index 1000"};
       }},
      {"ConfigMissingKey",
       [](const fs::path& d) {
         edit_config(d, [](json& j) { j.erase("hidden_size"); });
         return Phrases{cfg_path(d).string(), "key 'hidden_size': missing (required)"};
       }},
      {"ConfigNumberOverflow",  // found by fuzz_config: used to escape as json::out_of_range
       [](const fs::path& d) {
         test::write_bytes(cfg_path(d), R"({"model_type": "llama", "max_position_embeddings": 1e308512})");
         return Phrases{cfg_path(d).string(), "not valid JSON (a number is out of range)"};
       }},
      {"ConfigWrongType",
       [](const fs::path& d) {
         edit_config(d, [](json& j) { j["hidden_size"] = "64"; });
         return Phrases{cfg_path(d).string(), "key 'hidden_size': must be an integer, got \"64\""};
       }},
      {"ConfigNotLlama",
       [](const fs::path& d) {
         edit_config(d, [](json& j) { j["model_type"] = "mistral"; });
         return Phrases{cfg_path(d).string(), "key 'model_type': ptqlab supports 'llama' checkpoints, got 'mistral'"};
       }},
      {"ConfigKvHeadsDoNotDivideHeads",
       [](const fs::path& d) {
         edit_config(d, [](json& j) { j["num_key_value_heads"] = 3; });
         return Phrases{cfg_path(d).string(), "key 'num_key_value_heads': 3 does not divide num_attention_heads 8"};
       }},
      {"ConfigNotJson",
       [](const fs::path& d) {
         test::write_bytes(cfg_path(d), "{\"model_type\": \"llama\",");
         return Phrases{cfg_path(d).string(), "not valid JSON"};
       }},
      {"ConfigMissing",
       [](const fs::path& d) {
         fs::remove(cfg_path(d));
         return Phrases{cfg_path(d).string(), "cannot open (a model directory needs config.json)"};
       }},
      {"SafetensorsIsADirectory",
       [](const fs::path& d) {
         fs::remove(st_path(d));
         fs::create_directory(st_path(d));
         return Phrases{st_path(d).string(), "not a regular file"};
       }},
      {"MissingSafetensors",
       [](const fs::path& d) {
         fs::remove(st_path(d));
         return Phrases{d.string(), "no model.safetensors or model.safetensors.index.json"};
       }},
      {"PickleOnly",
       [](const fs::path& d) {
         fs::remove(st_path(d));
         // The first bytes of a torch.save zip archive; the loader must not even try to read it.
         test::write_bytes(d / "pytorch_model.bin", std::string("PK\x03\x04", 4) + std::string(1024, '\x80'));
         return Phrases{d.string(), "ptqlab never loads pickle .bin/.pt files"};
       }},
  };
  return cases;
}

void PrintTo(const CorruptCase& c, std::ostream* os) { *os << c.name; }

class LoaderCorrupt : public ::testing::TestWithParam<CorruptCase> {};

TEST_P(LoaderCorrupt, RejectedWithSpecificError) {
  test::TempDir tmp;
  const auto dir = test::copy_model("stories260K", tmp.path() / "model");
  // The undamaged copy loads: every failure below comes from the damage alone.
  ASSERT_NO_THROW((void)load_model(dir));
  const auto phrases = GetParam().damage(dir);
  ASSERT_FALSE(::testing::Test::HasFailure());
  ASSERT_GE(phrases.size(), 2u);
  test::expect_load_error(dir, phrases);
}

INSTANTIATE_TEST_SUITE_P(Cases, LoaderCorrupt, ::testing::ValuesIn(corrupt_cases()),
                         [](const ::testing::TestParamInfo<CorruptCase>& info) { return std::string(info.param.name); });

// Each kind of damage has its own message. The only shared one is "no model.safetensors" for a
// directory with no safetensors at all, whether or not a pickle file sits there.
TEST(LoaderCorruptMessages, AllDistinct) {
  std::map<std::string, std::string> by_message;
  for (const auto& c : corrupt_cases()) {
    test::TempDir tmp;
    const auto dir = test::copy_model("stories260K", tmp.path() / "model");
    const auto phrases = c.damage(dir);
    auto msg = test::expect_load_error(dir, phrases);
    ASSERT_FALSE(msg.empty()) << c.name;
    for (auto pos = msg.find(dir.string()); pos != std::string::npos; pos = msg.find(dir.string()))
      msg.replace(pos, dir.string().size(), "DIR");
    const std::string name = c.name;
    if (name == "PickleOnly") continue;
    const auto [it, inserted] = by_message.emplace(msg, name);
    EXPECT_TRUE(inserted) << name << " and " << it->second << " share the message: " << msg;
  }
  EXPECT_EQ(by_message.size(), corrupt_cases().size() - 1);
}

// ---------------------------------------------------------------------------------------------
// The CLI: user errors become one line on stderr and exit status 2.

struct CliResult {
  int exit_code = -1;
  std::string out, err;
};

CliResult run_cli(const std::string& args, const fs::path& scratch) {
  const auto out = scratch / "stdout.txt", err = scratch / "stderr.txt";
  const std::string cmd = std::string(PTQLAB_BINARY) + " " + args + " >'" + out.string() + "' 2>'" + err.string() + "'";
  const int status = std::system(cmd.c_str());
  CliResult r;
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  r.out = test::read_bytes(out);
  r.err = test::read_bytes(err);
  return r;
}

const CorruptCase& find_case(const std::string& name) {
  for (const auto& c : corrupt_cases())
    if (name == c.name) return c;
  throw std::logic_error("no case " + name);
}

class LoaderCli : public ::testing::TestWithParam<const char*> {};

TEST_P(LoaderCli, ErrorIsOneLineOnStderrWithExitStatus2) {
  test::TempDir tmp;
  const auto dir = test::copy_model("stories260K", tmp.path() / "model");
  const auto phrases = find_case(GetParam()).damage(dir);
  const auto r = run_cli("info --model '" + dir.string() + "'", tmp.path());
  EXPECT_EQ(r.exit_code, kExitUserError) << r.err;
  EXPECT_EQ(r.out, "");
  ASSERT_FALSE(r.err.empty());
  EXPECT_EQ(r.err.rfind("ptqlab: error: ", 0), 0u) << r.err;
  EXPECT_EQ(r.err.back(), '\n');
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  for (const auto& p : phrases) EXPECT_TRUE(test::contains(r.err, p)) << "missing \"" << p << "\" in: " << r.err;
}

INSTANTIATE_TEST_SUITE_P(Cases, LoaderCli,
                         ::testing::Values("TruncatedDataSection", "ConfigMissingKey", "ConfigNumberOverflow", "NanWeight",
                                           "PickleOnly"),
                         [](const ::testing::TestParamInfo<const char*>& info) { return std::string(info.param); });

TEST(LoaderCliInfo, MissingModelArgumentExits2) {
  test::TempDir tmp;
  const auto r = run_cli("info", tmp.path());
  EXPECT_EQ(r.exit_code, kExitUserError);
  EXPECT_EQ(r.out, "");
  EXPECT_TRUE(test::contains(r.err, "error")) << r.err;
  EXPECT_TRUE(test::contains(r.err, "model")) << r.err;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
}

TEST(LoaderCliInfo, ShippedModelJson) {
  test::TempDir tmp;
  const auto r = run_cli("info --json --model '" + test::model_dir("stories260K-bf16").string() + "'", tmp.path());
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.err, "");
  const auto j = json::parse(r.out);
  EXPECT_EQ(j["parameters"], 260'032);
  EXPECT_EQ(j["dtype"], "BF16");
  EXPECT_EQ(j["intermediate_size"], 172);
  EXPECT_EQ(j["num_kv_heads"], 4);
  EXPECT_EQ(j["tied_lm_head"], true);
}

}  // namespace
}  // namespace ptqlab
