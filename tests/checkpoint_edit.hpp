#pragma once
// Helpers for tests that build or damage checkpoint directories: read, edit and write safetensors
// files (8-byte little-endian header length, JSON header padded with spaces to a multiple of 8,
// data section), JSON files, and walk every weight of a loaded model.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "ptqlab/model/model.hpp"
#include "ptqlab/support/error.hpp"
#include "test_support.hpp"

namespace ptqlab::test {

using json = nlohmann::json;
namespace fs = std::filesystem;

inline std::string read_bytes(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("test: cannot read " + path.string());
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

inline void write_bytes(const fs::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error("test: cannot write " + path.string());
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw std::runtime_error("test: short write " + path.string());
}

inline json read_json(const fs::path& path) { return json::parse(read_bytes(path)); }
inline void write_json(const fs::path& path, const json& j) { write_bytes(path, j.dump(2)); }

inline std::string le64(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// A safetensors file taken apart: the parsed header (with "__metadata__" when present) and the
// raw data section. Offsets in the header are relative to the data section.
struct StFile {
  json header;
  std::string data;
};

inline StFile read_st(const fs::path& path) {
  const auto b = read_bytes(path);
  if (b.size() < 8) throw std::runtime_error("test: not a safetensors file " + path.string());
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<std::uint8_t>(b[i]);
  StFile f;
  f.header = json::parse(b.substr(8, n));
  f.data = b.substr(8 + n);
  return f;
}

// Writes `header_text` verbatim (padded with spaces to a multiple of 8) followed by `data`.
inline void write_raw_st(const fs::path& path, std::string header_text, const std::string& data) {
  while (header_text.size() % 8 != 0) header_text.push_back(' ');
  write_bytes(path, le64(header_text.size()) + header_text + data);
}

inline void write_st(const fs::path& path, const StFile& f) { write_raw_st(path, f.header.dump(), f.data); }

inline std::vector<std::string> tensor_names(const StFile& f) {
  std::vector<std::string> names;
  for (auto it = f.header.begin(); it != f.header.end(); ++it)
    if (it.key() != "__metadata__") names.push_back(it.key());
  return names;
}

inline std::pair<std::size_t, std::size_t> offsets(const StFile& f, const std::string& name) {
  const auto& o = f.header.at(name).at("data_offsets");
  return {o[0].get<std::size_t>(), o[1].get<std::size_t>()};
}

inline std::string tensor_bytes(const StFile& f, const std::string& name) {
  const auto [b, e] = offsets(f, name);
  return f.data.substr(b, e - b);
}

// Removes a tensor from the header and its bytes from the data section, shifting the offsets of
// the tensors stored after it, so that the remaining layout stays contiguous and valid.
inline void remove_tensor(StFile& f, const std::string& name) {
  const auto [b, e] = offsets(f, name);
  const std::size_t len = e - b;
  f.data.erase(b, len);
  f.header.erase(name);
  for (const auto& n : tensor_names(f)) {
    auto& o = f.header[n]["data_offsets"];
    if (o[0].get<std::size_t>() >= e) {
      o[0] = o[0].get<std::size_t>() - len;
      o[1] = o[1].get<std::size_t>() - len;
    }
  }
}

// Appends a tensor at the end of the data section.
inline void append_tensor(StFile& f, const std::string& name, const std::string& dtype,
                          const std::vector<std::int64_t>& shape, const std::string& bytes) {
  const std::size_t b = f.data.size();
  f.data += bytes;
  f.header[name] = {{"dtype", dtype}, {"shape", shape}, {"data_offsets", {b, f.data.size()}}};
}

inline void set_f32(StFile& f, const std::string& name, std::size_t index, float value) {
  const auto [b, e] = offsets(f, name);
  ASSERT_EQ(f.header[name]["dtype"], "F32");
  ASSERT_LE(b + 4 * (index + 1), e);
  std::memcpy(f.data.data() + b + 4 * index, &value, 4);
}

// Copies config.json, model.safetensors and tokenizer.model of a shipped model into `dst`.
inline fs::path copy_model(const std::string& name, const fs::path& dst) {
  fs::create_directories(dst);
  for (const char* file : {"config.json", "model.safetensors", "tokenizer.model"})
    fs::copy_file(model_dir(name) / file, dst / file);
  return dst;
}

inline bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

// Loads `dir`, expecting a ptqlab::Error whose message contains every one of `phrases`.
// Returns the message ("" when something else happened, after recording a failure).
template <class F>
std::string expect_error(F&& f, const std::vector<std::string>& phrases) {
  try {
    f();
  } catch (const ptqlab::Error& e) {
    const std::string msg = e.what();
    for (const auto& p : phrases) EXPECT_TRUE(contains(msg, p)) << "missing \"" << p << "\" in: " << msg;
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "message is not one line: " << msg;
    return msg;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected ptqlab::Error, got another exception: " << e.what();
    return "";
  }
  ADD_FAILURE() << "expected ptqlab::Error, nothing was thrown";
  return "";
}

inline std::string expect_load_error(const fs::path& dir, const std::vector<std::string>& phrases) {
  return expect_error([&] { (void)load_model(dir); }, phrases);
}

// Every weight of a loaded model, by checkpoint tensor name, as (name, rows, cols, data).
struct WeightView {
  std::string name;
  Eigen::Index rows, cols;
  const float* data;
  std::size_t size() const { return static_cast<std::size_t>(rows * cols); }
};

inline std::vector<WeightView> all_weights(const LlamaModel& m) {
  std::vector<WeightView> out;
  out.push_back({"model.embed_tokens.weight", m.embed.rows(), m.embed.cols(), m.embed.data()});
  for (std::size_t i = 0; i < m.layers.size(); ++i) {
    const auto& l = m.layers[i];
    const auto p = "model.layers." + std::to_string(i) + ".";
    out.push_back({p + "input_layernorm.weight", l.input_norm.size(), 1, l.input_norm.data()});
    out.push_back({p + "post_attention_layernorm.weight", l.post_norm.size(), 1, l.post_norm.data()});
    for (auto w : kAllLinears) {
      const auto& mat = l.linear(w);
      out.push_back({linear_tensor_name(static_cast<int>(i), w), mat.rows(), mat.cols(), mat.data()});
    }
  }
  out.push_back({"model.norm.weight", m.final_norm.size(), 1, m.final_norm.data()});
  if (m.lm_head.size() > 0) out.push_back({"lm_head.weight", m.lm_head.rows(), m.lm_head.cols(), m.lm_head.data()});
  return out;
}

inline std::uint32_t f32_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float bits_f32(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Asserts that two models hold bit-identical weights (same tensors, same shapes).
inline void expect_same_weights(const LlamaModel& a, const LlamaModel& b) {
  const auto wa = all_weights(a), wb = all_weights(b);
  ASSERT_EQ(wa.size(), wb.size());
  for (std::size_t t = 0; t < wa.size(); ++t) {
    SCOPED_TRACE(wa[t].name);
    ASSERT_EQ(wa[t].name, wb[t].name);
    ASSERT_EQ(wa[t].rows, wb[t].rows);
    ASSERT_EQ(wa[t].cols, wb[t].cols);
    EXPECT_EQ(std::memcmp(wa[t].data, wb[t].data, wa[t].size() * sizeof(float)), 0);
  }
}

}  // namespace ptqlab::test
