#include "ptqlab/model/model_config.hpp"

#include <fstream>
#include <sstream>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ptqlab/support/error.hpp"

namespace ptqlab {
namespace {

using json = nlohmann::json;

struct Reader {
  const json& j;
  const std::string& source;

  [[noreturn]] void fail(const std::string& key, const std::string& what) const {
    throw Error(fmt::format("{}: key '{}': {}", source, key, what));
  }
  bool has(const std::string& key) const { return j.contains(key) && !j[key].is_null(); }

  int positive_int(const std::string& key) const {
    if (!has(key)) fail(key, "missing (required)");
    if (!j[key].is_number_integer()) fail(key, fmt::format("must be an integer, got {}", j[key].dump()));
    const auto v = j[key].get<long long>();
    if (v <= 0 || v > (1ll << 30)) fail(key, fmt::format("must be a positive integer, got {}", v));
    return static_cast<int>(v);
  }
  int positive_int_or(const std::string& key, int fallback) const { return has(key) ? positive_int(key) : fallback; }
  int int_or(const std::string& key, int fallback) const {
    if (!has(key)) return fallback;
    if (!j[key].is_number_integer()) fail(key, fmt::format("must be an integer, got {}", j[key].dump()));
    return j[key].get<int>();
  }
  double positive_number_or(const std::string& key, double fallback) const {
    if (!has(key)) return fallback;
    if (!j[key].is_number()) fail(key, fmt::format("must be a number, got {}", j[key].dump()));
    const double v = j[key].get<double>();
    if (!(v > 0)) fail(key, fmt::format("must be positive, got {}", v));
    return v;
  }
  bool bool_or(const std::string& key, bool fallback) const {
    if (!has(key)) return fallback;
    if (!j[key].is_boolean()) fail(key, fmt::format("must be true or false, got {}", j[key].dump()));
    return j[key].get<bool>();
  }
  std::string string_or(const std::string& key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    if (!j[key].is_string()) fail(key, fmt::format("must be a string, got {}", j[key].dump()));
    return j[key].get<std::string>();
  }
};

}  // namespace

LlamaConfig parse_llama_config(const std::string& text, const std::string& source) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::parse_error& e) {
    throw Error(fmt::format("{}: not valid JSON (byte {})", source, e.byte));
  } catch (const json::exception&) {
    // out_of_range 406: a number too large for a double ("1e999"). Bad input like any other.
    throw Error(fmt::format("{}: not valid JSON (a number is out of range)", source));
  }
  if (!j.is_object()) throw Error(fmt::format("{}: not a JSON object", source));
  const Reader r{j, source};

  const auto model_type = r.string_or("model_type", "");
  if (model_type != "llama")
    r.fail("model_type", fmt::format("ptqlab supports 'llama' checkpoints, got '{}'", model_type));

  LlamaConfig c;
  c.hidden_size = r.positive_int("hidden_size");
  c.intermediate_size = r.positive_int("intermediate_size");
  c.num_layers = r.positive_int("num_hidden_layers");
  c.num_heads = r.positive_int("num_attention_heads");
  c.num_kv_heads = r.positive_int_or("num_key_value_heads", c.num_heads);
  c.vocab_size = r.positive_int("vocab_size");
  c.max_position_embeddings = r.positive_int("max_position_embeddings");
  c.rms_norm_eps = r.positive_number_or("rms_norm_eps", 1e-6);
  c.rope_theta = r.positive_number_or("rope_theta", 10000.0);
  c.tie_word_embeddings = r.bool_or("tie_word_embeddings", false);
  c.bos_token_id = r.int_or("bos_token_id", 1);
  // Llama 3 style configs list several end-of-sequence ids; the first one is the canonical EOS.
  if (r.has("eos_token_id") && j["eos_token_id"].is_array() && !j["eos_token_id"].empty() &&
      j["eos_token_id"][0].is_number_integer()) {
    c.eos_token_id = j["eos_token_id"][0].get<int>();
  } else {
    c.eos_token_id = r.int_or("eos_token_id", 2);
  }
  c.torch_dtype = r.string_or("torch_dtype", "");

  if (c.num_heads % c.num_kv_heads != 0)
    r.fail("num_key_value_heads",
           fmt::format("{} does not divide num_attention_heads {}", c.num_kv_heads, c.num_heads));
  if (r.has("head_dim")) {
    c.head_dim = r.positive_int("head_dim");
  } else {
    if (c.hidden_size % c.num_heads != 0)
      r.fail("num_attention_heads", fmt::format("{} does not divide hidden_size {}", c.num_heads, c.hidden_size));
    c.head_dim = c.hidden_size / c.num_heads;
  }
  if (c.head_dim % 2 != 0) r.fail("head_dim", fmt::format("must be even for rotary embeddings, got {}", c.head_dim));

  const auto act = r.string_or("hidden_act", "silu");
  if (act != "silu") r.fail("hidden_act", fmt::format("only 'silu' (SwiGLU) is supported, got '{}'", act));
  if (r.has("rope_scaling")) r.fail("rope_scaling", "RoPE scaling is not supported yet (must be null)");
  if (r.bool_or("attention_bias", false)) r.fail("attention_bias", "biased attention projections are not supported");
  if (r.bool_or("mlp_bias", false)) r.fail("mlp_bias", "biased MLP projections are not supported");
  if (c.bos_token_id < 0 || c.bos_token_id >= c.vocab_size)
    r.fail("bos_token_id", fmt::format("{} is outside the vocabulary [0, {})", c.bos_token_id, c.vocab_size));
  return c;
}

LlamaConfig load_llama_config(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw Error(fmt::format("{}: cannot open (a model directory needs config.json)", path.string()));
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_llama_config(ss.str(), path.string());
}

}  // namespace ptqlab
