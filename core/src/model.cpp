#include "ptqlab/model.hpp"

#include <random>
#include <set>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "ptqlab/error.hpp"
#include "ptqlab/safetensors.hpp"

namespace ptqlab {

const char* linear_name(Linear which) {
  switch (which) {
    case Linear::q_proj: return "q_proj";
    case Linear::k_proj: return "k_proj";
    case Linear::v_proj: return "v_proj";
    case Linear::o_proj: return "o_proj";
    case Linear::gate_proj: return "gate_proj";
    case Linear::up_proj: return "up_proj";
    case Linear::down_proj: return "down_proj";
  }
  return "?";
}

std::string linear_tensor_name(int layer, Linear which) {
  const bool attn = which == Linear::q_proj || which == Linear::k_proj || which == Linear::v_proj ||
                    which == Linear::o_proj;
  return fmt::format("model.layers.{}.{}.{}.weight", layer, attn ? "self_attn" : "mlp", linear_name(which));
}

Matrix& DecoderLayer::linear(Linear which) {
  switch (which) {
    case Linear::q_proj: return q_proj;
    case Linear::k_proj: return k_proj;
    case Linear::v_proj: return v_proj;
    case Linear::o_proj: return o_proj;
    case Linear::gate_proj: return gate_proj;
    case Linear::up_proj: return up_proj;
    case Linear::down_proj: return down_proj;
  }
  throw std::logic_error("bad Linear");
}

const Matrix& DecoderLayer::linear(Linear which) const { return const_cast<DecoderLayer*>(this)->linear(which); }

long long LlamaModel::parameter_count() const {
  long long n = embed.size() + final_norm.size() + lm_head.size();
  for (const auto& l : layers) {
    n += l.input_norm.size() + l.post_norm.size();
    for (auto w : kAllLinears) n += l.linear(w).size();
  }
  return n;
}

namespace {

class TensorLoader {
 public:
  TensorLoader(const Checkpoint& ckpt, const std::filesystem::path& dir) : ckpt_(ckpt), dir_(dir) {}

  Matrix matrix(const std::string& name, std::int64_t rows, std::int64_t cols) {
    const auto& e = entry(name);
    check_shape(e, {rows, cols});
    auto data = e.file->to_f32(*e.info);
    Matrix m(rows, cols);
    std::copy(data.begin(), data.end(), m.data());
    return m;
  }

  Vector vector(const std::string& name, std::int64_t n) {
    const auto& e = entry(name);
    check_shape(e, {n});
    auto data = e.file->to_f32(*e.info);
    Vector v(n);
    std::copy(data.begin(), data.end(), v.data());
    return v;
  }

  bool has(const std::string& name) const { return ckpt_.find(name) != nullptr; }
  const std::set<std::string>& used() const { return used_; }
  const std::set<std::string>& dtypes() const { return dtypes_; }

 private:
  const Checkpoint::Entry& entry(const std::string& name) {
    const auto* e = ckpt_.find(name);
    if (e == nullptr) {
      // A single file names itself; a sharded checkpoint names its index, which lists the tensors.
      const auto where = ckpt_.files().size() == 1 ? ckpt_.files()[0]->path() : dir_ / "model.safetensors.index.json";
      throw Error(fmt::format("{}: tensor '{}' is missing", where.string(), name));
    }
    used_.insert(name);
    dtypes_.insert(dtype_name(e->info->dtype));
    return *e;
  }

  static void check_shape(const Checkpoint::Entry& e, const std::vector<std::int64_t>& want) {
    if (e.info->shape != want) {
      throw Error(fmt::format("{}: tensor '{}': shape [{}] does not match config.json, which implies [{}]",
                              e.file->path().string(), e.info->name, fmt::join(e.info->shape, ", "),
                              fmt::join(want, ", ")));
    }
  }

  const Checkpoint& ckpt_;
  std::filesystem::path dir_;
  std::set<std::string> used_;
  std::set<std::string> dtypes_;
};

}  // namespace

LlamaModel load_model(const std::filesystem::path& dir) {
  if (!std::filesystem::is_directory(dir))
    throw Error(fmt::format("{}: not a model directory (expected config.json and model.safetensors)", dir.string()));
  LlamaModel model;
  model.source_dir = dir;
  model.config = load_llama_config(dir / "config.json");
  const auto& c = model.config;
  Checkpoint ckpt(dir);
  TensorLoader load(ckpt, dir);

  model.embed = load.matrix("model.embed_tokens.weight", c.vocab_size, c.hidden_size);
  model.layers.resize(c.num_layers);
  for (int i = 0; i < c.num_layers; ++i) {
    auto& l = model.layers[i];
    const auto prefix = fmt::format("model.layers.{}.", i);
    l.input_norm = load.vector(prefix + "input_layernorm.weight", c.hidden_size);
    l.post_norm = load.vector(prefix + "post_attention_layernorm.weight", c.hidden_size);
    l.q_proj = load.matrix(linear_tensor_name(i, Linear::q_proj), c.q_dim(), c.hidden_size);
    l.k_proj = load.matrix(linear_tensor_name(i, Linear::k_proj), c.kv_dim(), c.hidden_size);
    l.v_proj = load.matrix(linear_tensor_name(i, Linear::v_proj), c.kv_dim(), c.hidden_size);
    l.o_proj = load.matrix(linear_tensor_name(i, Linear::o_proj), c.hidden_size, c.q_dim());
    l.gate_proj = load.matrix(linear_tensor_name(i, Linear::gate_proj), c.intermediate_size, c.hidden_size);
    l.up_proj = load.matrix(linear_tensor_name(i, Linear::up_proj), c.intermediate_size, c.hidden_size);
    l.down_proj = load.matrix(linear_tensor_name(i, Linear::down_proj), c.hidden_size, c.intermediate_size);
  }
  model.final_norm = load.vector("model.norm.weight", c.hidden_size);
  // Tied checkpoints usually omit lm_head.weight (HF save_pretrained does); when one is present
  // anyway the tie wins, as in transformers.
  if (!c.tie_word_embeddings) model.lm_head = load.matrix("lm_head.weight", c.vocab_size, c.hidden_size);

  const auto& dtypes = load.dtypes();
  model.source_dtype = dtypes.size() == 1 ? *dtypes.begin() : "mixed";
  return model;
}

LlamaModel random_llama(const LlamaConfig& c, std::uint64_t seed, float weight_std) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto matrix = [&](int rows, int cols) {
    Matrix m(rows, cols);
    for (Eigen::Index i = 0; i < m.size(); ++i) m.data()[i] = weight_std * normal(rng);
    return m;
  };
  auto norm = [&](int n) {
    Vector v(n);
    for (int i = 0; i < n; ++i) v(i) = 1.0f + 0.1f * normal(rng);
    return v;
  };
  LlamaModel m;
  m.config = c;
  m.source_dtype = "F32";
  m.embed = matrix(c.vocab_size, c.hidden_size);
  for (int i = 0; i < c.num_layers; ++i) {
    DecoderLayer l;
    l.input_norm = norm(c.hidden_size);
    l.post_norm = norm(c.hidden_size);
    l.q_proj = matrix(c.q_dim(), c.hidden_size);
    l.k_proj = matrix(c.kv_dim(), c.hidden_size);
    l.v_proj = matrix(c.kv_dim(), c.hidden_size);
    l.o_proj = matrix(c.hidden_size, c.q_dim());
    l.gate_proj = matrix(c.intermediate_size, c.hidden_size);
    l.up_proj = matrix(c.intermediate_size, c.hidden_size);
    l.down_proj = matrix(c.hidden_size, c.intermediate_size);
    m.layers.push_back(std::move(l));
  }
  m.final_norm = norm(c.hidden_size);
  if (!c.tie_word_embeddings) m.lm_head = matrix(c.vocab_size, c.hidden_size);
  return m;
}

}  // namespace ptqlab
