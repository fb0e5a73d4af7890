#include "ptqlab/model/synth_model.hpp"

#include <cmath>
#include <fstream>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <tbb/parallel_for.h>

#include "ptqlab/model/model.hpp"
#include "ptqlab/model/tokenizer.hpp"
#include "ptqlab/support/error.hpp"

namespace ptqlab {
namespace {

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

std::uint64_t name_hash(const std::string& s) {  // FNV-1a
  std::uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char ch : s) h = (h ^ ch) * 0x100000001b3ull;
  return h;
}

// Approximately standard normal number `i` of the stream `key`: the sum of four 16-bit uniforms
// of one counter-based hash (Irwin-Hall, mean 0, variance 1, bounded at ±3.46), so any element is
// made independently (parallel chunks, no state) at a few ns each: 6.7 billion of them for a 7B
// checkpoint. Random weights only need the right size and scale, not exact Gaussian tails.
float normal_at(std::uint64_t key, std::uint64_t i) {
  const std::uint64_t r = splitmix64(key ^ (i * 0xd1b54a32d192ed03ull));
  const double sum = static_cast<double>(r & 0xffff) + static_cast<double>((r >> 16) & 0xffff) +
                     static_cast<double>((r >> 32) & 0xffff) + static_cast<double>(r >> 48);
  // Each uniform has mean 32767.5 and variance (65536² - 1) / 12.
  constexpr double kMean = 4 * 32767.5;
  constexpr double kInvSd = 1.0 / 37837.22724;  // 1 / sqrt(4 * (65536² - 1) / 12)
  return static_cast<float>((sum - kMean) * kInvSd);
}

struct Planned {
  TensorSpec spec;
  bool norm = false;  // 1 + 0.1 N(0,1) instead of std N(0,1)
  std::size_t bytes() const {
    std::int64_t n = 1;
    for (auto d : spec.shape) n *= d;
    return static_cast<std::size_t>(n) * dtype_size(spec.dtype);
  }
};

}  // namespace

LlamaConfig synth_config(const std::string& like, int layers, int vocab) {
  LlamaConfig c;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  c.bos_token_id = 1;
  c.eos_token_id = 2;
  if (like == "llama-2-7b") {
    c.hidden_size = 4096, c.intermediate_size = 11008, c.num_layers = 32, c.num_heads = 32, c.num_kv_heads = 32;
    c.vocab_size = 32000, c.max_position_embeddings = 4096, c.tie_word_embeddings = false;
  } else if (like == "llama-2-13b") {
    c.hidden_size = 5120, c.intermediate_size = 13824, c.num_layers = 40, c.num_heads = 40, c.num_kv_heads = 40;
    c.vocab_size = 32000, c.max_position_embeddings = 4096, c.tie_word_embeddings = false;
  } else if (like == "stories260K") {
    c.hidden_size = 64, c.intermediate_size = 172, c.num_layers = 5, c.num_heads = 8, c.num_kv_heads = 4;
    c.vocab_size = 512, c.max_position_embeddings = 512, c.tie_word_embeddings = true;
  } else {
    throw Error(fmt::format("--like: unknown model '{}' (llama-2-7b, llama-2-13b, stories260K)", like));
  }
  c.head_dim = c.hidden_size / c.num_heads;
  if (layers < 0) throw Error(fmt::format("--layers must be >= 1, got {}", layers));
  if (layers > 0) c.num_layers = layers;
  if (vocab < 0) throw Error(fmt::format("--vocab must be >= 1, got {}", vocab));
  if (vocab > 0) c.vocab_size = vocab;
  return c;
}

std::size_t write_synthetic_model(const SynthModelOptions& o,
                                  const std::function<void(std::size_t, std::size_t)>& progress) {
  const LlamaConfig c = synth_config(o.like, o.layers, o.vocab);
  if (o.shards < 1) throw Error(fmt::format("--shards must be >= 1, got {}", o.shards));
  if (o.out.empty()) throw Error("--out: no directory given");
  if (!std::filesystem::exists(o.tokenizer))
    throw Error(fmt::format("{}: tokenizer.model not found (--tokenizer)", o.tokenizer.string()));
  {
    const Tokenizer tok(o.tokenizer);
    if (tok.vocab_size() > c.vocab_size)
      throw Error(fmt::format("{}: the tokenizer has {} pieces, more than vocab_size {}: its ids would not fit (--vocab)",
                              o.tokenizer.string(), tok.vocab_size(), c.vocab_size));
  }
  if (std::filesystem::exists(o.out / "config.json"))
    throw Error(fmt::format("{}: already holds a checkpoint (config.json); choose another --out", o.out.string()));
  std::filesystem::create_directories(o.out);

  // Tensors in HF order: embedding, layers, final norm, head.
  std::vector<Planned> plan;
  const std::int64_t h = c.hidden_size;
  plan.push_back({{"model.embed_tokens.weight", o.dtype, {c.vocab_size, h}}, false});
  const std::array<std::pair<std::int64_t, std::int64_t>, 7> shapes = {{{c.q_dim(), h},
                                                                         {c.kv_dim(), h},
                                                                         {c.kv_dim(), h},
                                                                         {h, c.q_dim()},
                                                                         {c.intermediate_size, h},
                                                                         {c.intermediate_size, h},
                                                                         {h, c.intermediate_size}}};
  for (int l = 0; l < c.num_layers; ++l) {
    plan.push_back({{norm_tensor_name(l, false), o.dtype, {h}}, true});
    plan.push_back({{norm_tensor_name(l, true), o.dtype, {h}}, true});
    for (std::size_t k = 0; k < kAllLinears.size(); ++k)
      plan.push_back({{linear_tensor_name(l, kAllLinears[k]), o.dtype, {shapes[k].first, shapes[k].second}}, false});
  }
  plan.push_back({{"model.norm.weight", o.dtype, {h}}, true});
  if (!c.tie_word_embeddings) plan.push_back({{"lm_head.weight", o.dtype, {c.vocab_size, h}}, false});

  std::size_t total = 0;
  for (const auto& p : plan) total += p.bytes();
  // Shards: consecutive tensors, a new shard once the current one reaches total / K.
  const int shards = std::min<int>(o.shards, static_cast<int>(plan.size()));
  std::vector<std::vector<std::size_t>> shard_tensors(1);
  std::size_t in_shard = 0;
  for (std::size_t i = 0; i < plan.size(); ++i) {
    if (in_shard >= total / static_cast<std::size_t>(shards) && static_cast<int>(shard_tensors.size()) < shards &&
        !shard_tensors.back().empty()) {
      shard_tensors.emplace_back();
      in_shard = 0;
    }
    shard_tensors.back().push_back(i);
    in_shard += plan[i].bytes();
  }
  const int n_shards = static_cast<int>(shard_tensors.size());
  auto shard_name = [&](int s) {
    return n_shards == 1 ? std::string("model.safetensors")
                         : fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, n_shards);
  };

  std::size_t written = 0;
  nlohmann::json weight_map = nlohmann::json::object();
  constexpr std::size_t kChunk = std::size_t{1} << 22;  // values generated at a time (16 MB of float32)
  std::vector<float> chunk;
  for (int s = 0; s < n_shards; ++s) {
    std::vector<TensorSpec> specs;
    for (auto i : shard_tensors[static_cast<std::size_t>(s)]) specs.push_back(plan[i].spec);
    SafetensorsWriter writer(o.out / shard_name(s), specs, {{"format", "pt"}, {"ptqlab", "synth-model"}});
    for (auto i : shard_tensors[static_cast<std::size_t>(s)]) {
      const auto& p = plan[i];
      weight_map[p.spec.name] = shard_name(s);
      const std::uint64_t key = splitmix64(o.seed) ^ name_hash(p.spec.name);
      std::int64_t n = 1;
      for (auto d : p.spec.shape) n *= d;
      for (std::int64_t first = 0; first < n; first += static_cast<std::int64_t>(kChunk)) {
        const std::size_t len = static_cast<std::size_t>(std::min<std::int64_t>(kChunk, n - first));
        chunk.resize(len);
        tbb::parallel_for(std::size_t{0}, len, std::size_t{4096}, [&](std::size_t j0) {
          for (std::size_t j = j0; j < std::min(len, j0 + 4096); ++j) {
            const float z = normal_at(key, static_cast<std::uint64_t>(first) + j);
            chunk[j] = p.norm ? 1.0f + 0.1f * z : o.weight_std * z;
          }
        });
        writer.append(chunk);
        written += len * dtype_size(p.spec.dtype);
        if (progress) progress(written, total);
      }
    }
    writer.finish();
  }
  if (n_shards > 1) {
    nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    std::ofstream(o.out / "model.safetensors.index.json") << index.dump(2) << "\n";
  }

  const char* torch_dtype = o.dtype == DType::F32 ? "float32" : o.dtype == DType::F16 ? "float16" : "bfloat16";
  nlohmann::json config = {
      {"architectures", {"LlamaForCausalLM"}},
      {"model_type", "llama"},
      {"hidden_size", c.hidden_size},
      {"intermediate_size", c.intermediate_size},
      {"num_hidden_layers", c.num_layers},
      {"num_attention_heads", c.num_heads},
      {"num_key_value_heads", c.num_kv_heads},
      {"head_dim", c.head_dim},
      {"vocab_size", c.vocab_size},
      {"max_position_embeddings", c.max_position_embeddings},
      {"rms_norm_eps", c.rms_norm_eps},
      {"rope_theta", c.rope_theta},
      {"rope_scaling", nullptr},
      {"hidden_act", "silu"},
      {"attention_bias", false},
      {"mlp_bias", false},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"bos_token_id", c.bos_token_id},
      {"eos_token_id", c.eos_token_id},
      {"torch_dtype", torch_dtype},
      {"ptqlab_synthetic", {{"like", o.like}, {"seed", o.seed}, {"weight_std", o.weight_std}}},
  };
  std::ofstream(o.out / "config.json") << config.dump(2) << "\n";
  std::filesystem::copy_file(o.tokenizer, o.out / "tokenizer.model", std::filesystem::copy_options::overwrite_existing);
  return total;
}

}  // namespace ptqlab
