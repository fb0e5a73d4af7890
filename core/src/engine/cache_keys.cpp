#include "ptqlab/engine/cache_keys.hpp"

#include <algorithm>
#include <cstdint>
#include <fstream>

#include <fmt/format.h>

#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/support/sha256.hpp"
#include "ptqlab/support/text_file.hpp"

namespace ptqlab {

KeyMaterial& KeyMaterial::field(std::string_view name, std::string_view value) {
  text_ += "|";
  text_ += name;
  text_ += ":";
  text_ += value;
  return *this;
}

KeyMaterial& KeyMaterial::component(std::string_view role, const ComponentRef& c) {
  field(role, c.name);
  for (const auto& [name, value] : c.params.values()) text_ += "|" + name + "=" + param_value_text(value);
  return *this;
}

KeyMaterial& KeyMaterial::append(std::string_view text) {
  text_ += text;
  return *this;
}

std::string KeyMaterial::digest() const { return sha256_hex(text_); }

std::string token_digest(const std::vector<int>& ids) {
  static_assert(sizeof(int) == sizeof(std::int32_t));
  return sha256_hex(std::string(reinterpret_cast<const char*>(ids.data()), ids.size() * sizeof(std::int32_t)));
}

std::string token_stream_key(const std::filesystem::path& tokenizer_model, const std::filesystem::path& text) {
  return fmt::format("tokens/{}/bos-stream/tokenizer:{}/text:{}", kPerplexityProtocol,
                     sha256_hex(read_text_file(tokenizer_model)), sha256_hex(read_text_file(text)));
}

std::string model_key(const std::filesystem::path& dir) {
  std::string material = read_text_file(dir / "config.json");
  std::vector<std::filesystem::path> files;
  for (const auto& f : std::filesystem::directory_iterator(dir))
    if (f.path().extension() == ".safetensors" || f.path().filename() == "model.safetensors.index.json")
      files.push_back(f.path());
  std::sort(files.begin(), files.end());
  for (const auto& f : files) {
    std::ifstream in(f, std::ios::binary);
    std::uint64_t header_len = 0;
    in.read(reinterpret_cast<char*>(&header_len), 8);
    std::string header(std::min<std::uint64_t>(header_len, 100ull << 20), '\0');
    in.read(header.data(), static_cast<std::streamsize>(header.size()));
    material += fmt::format("|{}|{}|", f.filename().string(), std::filesystem::file_size(f)) + header;
  }
  return sha256_hex(material);
}

RunKeys::RunKeys(const std::filesystem::path& model_dir, const std::vector<int>& calibration_tokens, std::uint64_t seed)
    : model_(model_key(model_dir)), calibration_digest_(token_digest(calibration_tokens)) {
  // Model and calibration windows, then the experiment seed: what stage-1 quantizations and
  // allocation tables share.
  stage1_ = KeyMaterial(model_).field("calibration", calibration_digest_).field("seed", std::to_string(seed)).text();
}

std::string RunKeys::input_stats(const std::vector<std::vector<int>>& calibration) const {
  KeyMaterial m(model_);
  for (const auto& w : calibration) m.append(token_digest(w));
  return "input-stats/v1/" + m.digest();
}

std::string RunKeys::allocation_table(const AllocationSpec& spec) const {
  KeyMaterial m(stage1_);
  m.append("|allocation-table/v3/fp-chain/per-linear/mse-16384");
  for (const auto& c : spec.candidates) {
    m.field("candidate", c.label).component("quantizer", c.quantizer);
    if (c.mask) m.component("mask", *c.mask);
  }
  return "allocation-table/v3/" + m.digest();
}

std::string RunKeys::quantize(const ArmSpec& arm, std::size_t step) const {
  KeyMaterial m(stage1_);
  m.component("quantizer", arm.quantizer);
  if (arm.mask) m.component("mask", *arm.mask);
  for (std::size_t i = 0; i < step; ++i) m.component("preprocess", arm.preprocessors[i]);
  return m.digest();
}

std::string RunKeys::layer_checkpoint(const ArmSpec& arm, const std::string& layer_store,
                                      const std::filesystem::path& model_dir) const {
  return sha256_hex(arm.config_hash + "|" + layer_store + "|" + model_dir.string() + "|" + calibration_digest_);
}

}  // namespace ptqlab
