// Checkpoint layouts other than the shipped single float32 file, all built from stories260K in a
// temporary directory: a two-shard checkpoint with model.safetensors.index.json, an F16 copy, a
// mixed-dtype copy and an untied-head copy. Also exact checks of the F16/BF16 widening functions.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "checkpoint_edit.hpp"
#include "ptqlab/model/model.hpp"
#include "ptqlab/model/safetensors.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/nn/forward.hpp"
#include "ptqlab/support/text_file.hpp"
#include "test_support.hpp"

namespace ptqlab {
namespace {

using test::json;
namespace fs = std::filesystem;

constexpr const char* kShard1 = "model-00001-of-00002.safetensors";
constexpr const char* kShard2 = "model-00002-of-00002.safetensors";
constexpr const char* kIndex = "model.safetensors.index.json";

// A real TinyStories window: BOS then the first 127 tokens of valid.txt.
std::vector<int> tinystories_window(int length = 128) {
  const Tokenizer tok(test::model_dir("stories260K") / "tokenizer.model");
  const auto text = read_text_file(test::data_file("tinystories/valid.txt")).substr(0, 4000);
  const auto ids = tok.encode(text);
  EXPECT_GE(static_cast<int>(ids.size()), length - 1);
  std::vector<int> window = {tok.bos_id()};
  window.insert(window.end(), ids.begin(), ids.begin() + (length - 1));
  return window;
}

Matrix logits_of(const LlamaModel& m, const std::vector<int>& tokens) {
  return forward_logits(m, tokens, BatchShape{1, static_cast<int>(tokens.size())});
}

void expect_bit_identical(const Matrix& a, const Matrix& b) {
  ASSERT_EQ(a.rows(), b.rows());
  ASSERT_EQ(a.cols(), b.cols());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), sizeof(float) * a.size()), 0) << "max |diff| " << (a - b).cwiseAbs().maxCoeff();
}

// ---------------------------------------------------------------------------------------------
// Sharded checkpoint.

struct Sharded {
  test::StFile shard1, shard2;
  json index;
};

// stories260K's tensors split in name order: the first half into shard 1, the rest into shard 2,
// each laid out contiguously.
Sharded split_stories260K() {
  const auto src = test::read_st(test::model_dir("stories260K") / "model.safetensors");
  Sharded s;
  s.shard1.header["__metadata__"] = {{"format", "pt"}};
  s.shard2.header["__metadata__"] = {{"format", "pt"}};
  const auto names = test::tensor_names(src);
  json weight_map = json::object();
  for (std::size_t i = 0; i < names.size(); ++i) {
    const auto& n = names[i];
    const auto& h = src.header[n];
    const bool first = i < names.size() / 2;
    test::append_tensor(first ? s.shard1 : s.shard2, n, h["dtype"], h["shape"].get<std::vector<std::int64_t>>(),
                        test::tensor_bytes(src, n));
    weight_map[n] = first ? kShard1 : kShard2;
  }
  s.index = {{"metadata", {{"total_size", s.shard1.data.size() + s.shard2.data.size()}}}, {"weight_map", weight_map}};
  return s;
}

fs::path write_sharded(const fs::path& dir, const Sharded& s) {
  fs::create_directories(dir);
  for (const char* f : {"config.json", "tokenizer.model"}) fs::copy_file(test::model_dir("stories260K") / f, dir / f);
  test::write_st(dir / kShard1, s.shard1);
  test::write_st(dir / kShard2, s.shard2);
  test::write_json(dir / kIndex, s.index);
  return dir;
}

TEST(ShardedCheckpoint, SplitIsReal) {
  const auto s = split_stories260K();
  EXPECT_EQ(test::tensor_names(s.shard1).size() + test::tensor_names(s.shard2).size(), 47u);
  EXPECT_GE(test::tensor_names(s.shard1).size(), 20u);
  EXPECT_GE(test::tensor_names(s.shard2).size(), 20u);
  test::TempDir tmp;
  const auto dir = write_sharded(tmp.path() / "sharded", s);
  EXPECT_FALSE(fs::exists(dir / "model.safetensors"));
  const Checkpoint ckpt(dir);
  ASSERT_EQ(ckpt.files().size(), 2u);
  EXPECT_EQ(ckpt.entries().size(), 47u);
  EXPECT_EQ(ckpt.find("model.embed_tokens.weight")->file->path(), dir / kShard1);
  EXPECT_EQ(ckpt.find("model.norm.weight")->file->path(), dir / kShard2);
}

TEST(ShardedCheckpoint, LoadsWeightsIdenticalToSingleFile) {
  test::TempDir tmp;
  const auto dir = write_sharded(tmp.path() / "sharded", split_stories260K());
  const auto sharded = load_model(dir);
  const auto single = load_model(test::model_dir("stories260K"));
  EXPECT_EQ(sharded.parameter_count(), 260'032);
  EXPECT_EQ(sharded.source_dtype, "F32");
  test::expect_same_weights(single, sharded);
}

TEST(ShardedCheckpoint, LogitsBitIdenticalOnTinyStoriesWindow) {
  test::TempDir tmp;
  const auto dir = write_sharded(tmp.path() / "sharded", split_stories260K());
  const auto sharded = load_model(dir);
  const auto single = load_model(test::model_dir("stories260K"));
  const auto tokens = tinystories_window();
  ASSERT_EQ(tokens.size(), 128u);
  EXPECT_EQ(tokens[0], 1);
  const Matrix a = logits_of(single, tokens), b = logits_of(sharded, tokens);
  ASSERT_EQ(a.rows(), 128);
  ASSERT_EQ(a.cols(), 512);
  EXPECT_TRUE(a.allFinite());
  expect_bit_identical(a, b);
}

TEST(ShardedCheckpoint, IndexNamesMissingShard) {
  test::TempDir tmp;
  auto s = split_stories260K();
  s.index["weight_map"]["model.norm.weight"] = "model-00003-of-00002.safetensors";
  const auto dir = write_sharded(tmp.path() / "sharded", s);
  test::expect_load_error(dir, {(dir / "model-00003-of-00002.safetensors").string(),
                                "shard named in model.safetensors.index.json does not exist"});
}

TEST(ShardedCheckpoint, WeightMapPointsAtShardWithoutTheTensor) {
  test::TempDir tmp;
  auto s = split_stories260K();
  s.index["weight_map"]["model.norm.weight"] = kShard1;  // it is stored in shard 2
  const auto dir = write_sharded(tmp.path() / "sharded", s);
  test::expect_load_error(dir, {(dir / kShard1).string(),
                                "tensor 'model.norm.weight' listed in model.safetensors.index.json is not in this shard"});
}

TEST(ShardedCheckpoint, WeightMapNamesTensorThatNoShardHas) {
  test::TempDir tmp;
  auto s = split_stories260K();
  s.index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = kShard2;
  const auto dir = write_sharded(tmp.path() / "sharded", s);
  test::expect_load_error(dir, {(dir / kShard2).string(), "tensor 'model.layers.9.mlp.up_proj.weight' listed in "
                                                          "model.safetensors.index.json is not in this shard"});
}

TEST(ShardedCheckpoint, SameTensorInBothShards) {
  test::TempDir tmp;
  auto s = split_stories260K();
  const auto bytes = test::tensor_bytes(s.shard2, "model.norm.weight");
  test::append_tensor(s.shard1, "model.norm.weight", "F32", {64}, bytes);
  const auto dir = write_sharded(tmp.path() / "sharded", s);
  test::expect_load_error(dir, {(dir / kShard2).string(), "tensor 'model.norm.weight' also appears in",
                                (dir / kShard1).string()});
}

TEST(ShardedCheckpoint, ShardNameWithPathRejected) {
  for (const std::string bad : {"../stories260K/model.safetensors", "sub/model-00002-of-00002.safetensors",
                                "/etc/passwd", "..", ""}) {
    SCOPED_TRACE(bad);
    test::TempDir tmp;
    auto s = split_stories260K();
    s.index["weight_map"]["model.norm.weight"] = bad;
    const auto dir = write_sharded(tmp.path() / "sharded", s);
    test::expect_load_error(dir, {(dir / kIndex).string(), "weight_map.model.norm.weight: shard '" + bad +
                                                               "' is not a plain file name"});
  }
}

TEST(ShardedCheckpoint, IndexNotJsonOrWithoutWeightMap) {
  test::TempDir tmp;
  const auto dir = write_sharded(tmp.path() / "sharded", split_stories260K());
  test::write_bytes(dir / kIndex, "{\"weight_map\": ");
  test::expect_load_error(dir, {(dir / kIndex).string(), "not valid JSON"});
  test::write_json(dir / kIndex, json{{"metadata", json::object()}});
  test::expect_load_error(dir, {(dir / kIndex).string(), "missing object 'weight_map'"});
}

TEST(ShardedCheckpoint, MissingTensorNamesTheIndex) {
  test::TempDir tmp;
  auto s = split_stories260K();
  test::remove_tensor(s.shard2, "model.layers.4.mlp.gate_proj.weight");
  s.index["weight_map"].erase("model.layers.4.mlp.gate_proj.weight");
  const auto dir = write_sharded(tmp.path() / "sharded", s);
  test::expect_load_error(dir, {(dir / kIndex).string(), "tensor 'model.layers.4.mlp.gate_proj.weight' is missing"});
}

// ---------------------------------------------------------------------------------------------
// Half-precision conversions.

// float32 -> IEEE binary16, round to nearest, ties to even; overflow gives inf. Written here,
// independently of the loader, to build F16 checkpoints.
std::uint16_t f32_to_f16(float f) {
  const std::uint32_t x = test::f32_bits(f);
  const std::uint32_t sign = (x >> 16) & 0x8000u;
  const std::uint32_t a = x & 0x7fffffffu;
  if (a > 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7e00u);  // NaN
  const int e = static_cast<int>(a >> 23) - 127;
  if (e > 15) return static_cast<std::uint16_t>(sign | 0x7c00u);  // inf, or too large
  if (e >= -14) {  // normal half (rounding may carry into the exponent, up to inf)
    const std::uint32_t mant = a & 0x7fffffu;
    std::uint32_t h = (static_cast<std::uint32_t>(e + 15) << 10) | (mant >> 13);
    const std::uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return static_cast<std::uint16_t>(sign | h);
  }
  if (e < -25) return static_cast<std::uint16_t>(sign);  // below half the smallest subnormal
  // Subnormal half: count units of 2^-24. The value is sig * 2^(e-23) = (sig >> shift) units.
  const std::uint32_t sig = (a & 0x7fffffu) | 0x800000u;
  const int shift = -(e + 1);  // 14..24
  std::uint32_t q = sig >> shift;
  const std::uint32_t rem = sig & ((1u << shift) - 1u);
  const std::uint32_t halfway = 1u << (shift - 1);
  if (rem > halfway || (rem == halfway && (q & 1u))) ++q;
  return static_cast<std::uint16_t>(sign | q);
}

TEST(LoaderHalfConversion, F32ToF16HelperSelfCheck) {
  EXPECT_EQ(f32_to_f16(0.0f), 0x0000);
  EXPECT_EQ(f32_to_f16(-0.0f), 0x8000);
  EXPECT_EQ(f32_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(f32_to_f16(-2.0f), 0xc000);
  EXPECT_EQ(f32_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65519.0f), 0x7bff);
  EXPECT_EQ(f32_to_f16(65520.0f), 0x7c00);  // tie between 65504 and 2^16: even, i.e. overflow
  EXPECT_EQ(f32_to_f16(1e10f), 0x7c00);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -14)), 0x0400);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -24)), 0x0001);
  EXPECT_EQ(f32_to_f16(std::ldexp(1.0f, -25)), 0x0000);        // tie: to even (0)
  EXPECT_EQ(f32_to_f16(std::ldexp(3.0f, -25)), 0x0002);        // 1.5 units: tie, to even (2)
  EXPECT_EQ(f32_to_f16(std::ldexp(5.0f, -25)), 0x0002);        // 2.5 units: tie, to even (2)
  EXPECT_EQ(f32_to_f16(std::ldexp(1.5f, -25)), 0x0001);        // 0.75 units: up
  EXPECT_EQ(f32_to_f16(std::ldexp(1023.5f, -24)), 0x0400);     // carry from subnormal to normal
  EXPECT_EQ(f32_to_f16(1.0f + std::ldexp(1.0f, -11)), 0x3c00);  // tie: to even
  EXPECT_EQ(f32_to_f16(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // tie: to even
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::infinity()), 0x7c00);
  EXPECT_EQ(f32_to_f16(std::numeric_limits<float>::denorm_min()), 0x0000);
}

TEST(LoaderHalfConversion, F16ToF32ExactValues) {
  EXPECT_EQ(test::f32_bits(f16_to_f32(0x0000)), 0x00000000u);  // +0
  EXPECT_EQ(test::f32_bits(f16_to_f32(0x8000)), 0x80000000u);  // -0 keeps its sign
  EXPECT_EQ(f16_to_f32(0x3c00), 1.0f);
  EXPECT_EQ(f16_to_f32(0xc000), -2.0f);
  EXPECT_EQ(f16_to_f32(0x3555), 0.333251953125f);
  EXPECT_EQ(f16_to_f32(0x7bff), 65504.0f);
  EXPECT_EQ(f16_to_f32(0x0400), std::ldexp(1.0f, -14));        // smallest normal
  EXPECT_EQ(f16_to_f32(0x0001), std::ldexp(1.0f, -24));        // smallest subnormal
  EXPECT_EQ(f16_to_f32(0x8001), -std::ldexp(1.0f, -24));
  EXPECT_EQ(f16_to_f32(0x03ff), std::ldexp(1023.0f, -24));     // largest subnormal
  EXPECT_EQ(f16_to_f32(0x0200), std::ldexp(1.0f, -15));
  EXPECT_EQ(f16_to_f32(0x7c00), std::numeric_limits<float>::infinity());
  EXPECT_EQ(f16_to_f32(0xfc00), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7e00)));
  EXPECT_TRUE(std::isnan(f16_to_f32(0x7c01)));  // signalling-style NaN stays NaN, not inf
}

// Every one of the 65,536 half bit patterns against the textbook formula.
TEST(LoaderHalfConversion, F16ToF32AllBitPatterns) {
  int bad = 0;
  for (std::uint32_t h = 0; h < 0x10000u; ++h) {
    const int exp = (h >> 10) & 0x1f;
    const int mant = h & 0x3ff;
    const double sign = (h & 0x8000u) ? -1.0 : 1.0;
    const float got = f16_to_f32(static_cast<std::uint16_t>(h));
    bool ok;
    if (exp == 31) {
      ok = mant == 0 ? got == static_cast<float>(sign * std::numeric_limits<double>::infinity()) : std::isnan(got);
    } else {
      const double want = exp == 0 ? sign * std::ldexp(mant, -24) : sign * std::ldexp(1024 + mant, exp - 25);
      ok = got == static_cast<float>(want) && std::signbit(got) == (sign < 0);
    }
    if (!ok && bad++ < 5) ADD_FAILURE() << std::hex << "f16 bits 0x" << h << " -> " << got;
  }
  EXPECT_EQ(bad, 0);
}

TEST(LoaderHalfConversion, Bf16ToF32ExactValues) {
  EXPECT_EQ(bf16_to_f32(0x3f80), 1.0f);
  EXPECT_EQ(bf16_to_f32(0xc040), -3.0f);
  EXPECT_EQ(bf16_to_f32(0x3e80), 0.25f);
  EXPECT_EQ(test::f32_bits(bf16_to_f32(0x0000)), 0x00000000u);
  EXPECT_EQ(test::f32_bits(bf16_to_f32(0x8000)), 0x80000000u);
  EXPECT_EQ(bf16_to_f32(0x0001), std::numeric_limits<float>::denorm_min() * 65536.0f);  // subnormal
  EXPECT_EQ(bf16_to_f32(0x0080), std::numeric_limits<float>::min());                     // smallest normal
  EXPECT_EQ(bf16_to_f32(0x7f7f), test::bits_f32(0x7f7f0000u));                           // largest finite
  EXPECT_EQ(bf16_to_f32(0x7f80), std::numeric_limits<float>::infinity());
  EXPECT_EQ(bf16_to_f32(0xff80), -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(bf16_to_f32(0x7fc0)));
}

// stories260K rewritten with every tensor (or only some) as F16.
fs::path write_f16_copy(const fs::path& dir, bool only_layer_tensors = false) {
  test::copy_model("stories260K", dir);
  const auto src = test::read_st(dir / "model.safetensors");
  test::StFile out;
  out.header["__metadata__"] = {{"format", "pt"}};
  for (const auto& n : test::tensor_names(src)) {
    const auto shape = src.header[n]["shape"].get<std::vector<std::int64_t>>();
    const auto bytes = test::tensor_bytes(src, n);
    if (only_layer_tensors && n.rfind("model.layers.", 0) != 0) {
      test::append_tensor(out, n, "F32", shape, bytes);
      continue;
    }
    std::string half(bytes.size() / 2, '\0');
    for (std::size_t i = 0; i < bytes.size() / 4; ++i) {
      float f;
      std::memcpy(&f, bytes.data() + 4 * i, 4);
      const std::uint16_t h = f32_to_f16(f);
      std::memcpy(half.data() + 2 * i, &h, 2);
    }
    test::append_tensor(out, n, "F16", shape, half);
  }
  test::write_st(dir / "model.safetensors", out);
  return dir;
}

TEST(LoaderF16, Stories260KF16WithinHalfPrecision) {
  test::TempDir tmp;
  const auto dir = write_f16_copy(tmp.path() / "f16");
  const auto f16 = load_model(dir);
  const auto f32 = load_model(test::model_dir("stories260K"));
  EXPECT_EQ(f16.source_dtype, "F16");
  EXPECT_EQ(f16.parameter_count(), 260'032);
  const auto a = test::all_weights(f32), b = test::all_weights(f16);
  ASSERT_EQ(a.size(), b.size());
  const double unit = std::ldexp(1.0, -11);  // half the spacing of half-precision significands
  double max_rel = 0;
  long long changed = 0;
  for (std::size_t t = 0; t < a.size(); ++t) {
    SCOPED_TRACE(a[t].name);
    ASSERT_EQ(a[t].size(), b[t].size());
    int bad = 0;
    for (std::size_t i = 0; i < a[t].size(); ++i) {
      const double x = a[t].data[i], y = b[t].data[i];
      const double err = std::abs(x - y);
      // Normal range: relative error at most 2^-11; subnormal range: absolute error at most 2^-25.
      const bool ok = std::abs(x) >= std::ldexp(1.0, -14) ? err <= unit * std::abs(x) : err <= std::ldexp(1.0, -25);
      if (!ok && bad++ < 3) ADD_FAILURE() << "index " << i << ": " << x << " loaded as " << y;
      if (std::abs(x) >= std::ldexp(1.0, -14)) max_rel = std::max(max_rel, err / std::abs(x));
      changed += x != y;
    }
    EXPECT_EQ(bad, 0);
  }
  EXPECT_GT(changed, 200'000);  // really rounded, not a float32 copy
  EXPECT_GT(max_rel, unit / 2);  // some value needed nearly the full half-unit of rounding
  EXPECT_LE(max_rel, unit);
}

TEST(LoaderF16, MixedDtypesReportMixed) {
  test::TempDir tmp;
  const auto dir = write_f16_copy(tmp.path() / "mixed", /*only_layer_tensors=*/true);
  const auto m = load_model(dir);
  EXPECT_EQ(m.source_dtype, "mixed");
  const auto f32 = load_model(test::model_dir("stories260K"));
  // Non-layer tensors stayed float32 and are exact.
  EXPECT_EQ(std::memcmp(m.embed.data(), f32.embed.data(), sizeof(float) * f32.embed.size()), 0);
  EXPECT_EQ(std::memcmp(m.final_norm.data(), f32.final_norm.data(), sizeof(float) * f32.final_norm.size()), 0);
  EXPECT_FALSE(m.layers[0].q_proj == f32.layers[0].q_proj);
}

// ---------------------------------------------------------------------------------------------
// Untied lm_head.

fs::path write_untied_copy(const fs::path& dir, bool with_lm_head) {
  test::copy_model("stories260K", dir);
  auto cfg = test::read_json(dir / "config.json");
  cfg["tie_word_embeddings"] = false;
  test::write_json(dir / "config.json", cfg);
  if (with_lm_head) {
    auto st = test::read_st(dir / "model.safetensors");
    test::append_tensor(st, "lm_head.weight", "F32", {512, 64}, test::tensor_bytes(st, "model.embed_tokens.weight"));
    test::write_st(dir / "model.safetensors", st);
  }
  return dir;
}

TEST(LoaderUntiedHead, ExplicitCopyOfEmbeddingGivesIdenticalLogits) {
  test::TempDir tmp;
  const auto dir = write_untied_copy(tmp.path() / "untied", true);
  const auto untied = load_model(dir);
  const auto tied = load_model(test::model_dir("stories260K"));
  EXPECT_FALSE(untied.config.tie_word_embeddings);
  ASSERT_EQ(untied.lm_head.rows(), 512);
  ASSERT_EQ(untied.lm_head.cols(), 64);
  EXPECT_EQ(untied.output_head().data(), untied.lm_head.data());
  EXPECT_NE(untied.output_head().data(), untied.embed.data());
  EXPECT_EQ(untied.parameter_count(), 260'032 + 512 * 64);
  EXPECT_TRUE(untied.lm_head == tied.embed);
  const auto tokens = tinystories_window();
  expect_bit_identical(logits_of(tied, tokens), logits_of(untied, tokens));
}

// The separate head is really the one used: changing one of its rows changes only that column.
TEST(LoaderUntiedHead, SeparateHeadIsUsed) {
  test::TempDir tmp;
  const auto dir = write_untied_copy(tmp.path() / "untied", false);
  auto st = test::read_st(dir / "model.safetensors");
  auto head = test::tensor_bytes(st, "model.embed_tokens.weight");
  for (int c = 0; c < 64; ++c) {  // row 300 := 2 * row 300
    float f;
    std::memcpy(&f, head.data() + 4 * (300 * 64 + c), 4);
    f *= 2;
    std::memcpy(head.data() + 4 * (300 * 64 + c), &f, 4);
  }
  test::append_tensor(st, "lm_head.weight", "F32", {512, 64}, head);
  test::write_st(dir / "model.safetensors", st);
  const auto untied = load_model(dir);
  const auto tied = load_model(test::model_dir("stories260K"));
  const auto tokens = tinystories_window(16);
  const Matrix a = logits_of(tied, tokens), b = logits_of(untied, tokens);
  for (int v = 0; v < 512; ++v) {
    if (v == 300) {
      EXPECT_FALSE(a.col(v) == b.col(v));
    } else {
      EXPECT_TRUE(a.col(v) == b.col(v)) << "column " << v;
    }
  }
}

TEST(LoaderUntiedHead, MissingLmHeadIsAnError) {
  test::TempDir tmp;
  const auto dir = write_untied_copy(tmp.path() / "untied", false);
  test::expect_load_error(dir, {(dir / "model.safetensors").string(), "tensor 'lm_head.weight' is missing"});
}

}  // namespace
}  // namespace ptqlab
