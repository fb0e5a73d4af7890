#include "ptqlab/model/model.hpp"

#include <random>
#include <set>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include "ptqlab/model/safetensors.hpp"
#include "ptqlab/support/error.hpp"

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

std::string norm_tensor_name(int layer, bool post) {
  return fmt::format("model.layers.{}.{}.weight", layer, post ? "post_attention_layernorm" : "input_layernorm");
}

std::size_t DecoderLayer::bytes() const {
  std::size_t n = static_cast<std::size_t>(input_norm.size() + post_norm.size());
  for (auto w : kAllLinears) n += static_cast<std::size_t>(linear(w).size());
  return n * sizeof(float);
}

// ----------------------------------------------------------------------------------------------
// Stored tensors and float32 views

const float* StoredTensor::f32_in_place() const {
  if (info == nullptr || info->dtype != DType::F32) return nullptr;
  const auto raw = file->raw(*info);
  // A misaligned float pointer would be undefined behaviour: such tensors are copied instead.
  if (reinterpret_cast<std::uintptr_t>(raw.data()) % alignof(float) != 0) return nullptr;
  return reinterpret_cast<const float*>(raw.data());
}

void StoredTensor::widen(std::size_t first, std::size_t n, float* out) const {
  const auto raw = file->raw(*info);
  widen_to_f32(raw.data() + first * dtype_size(info->dtype), info->dtype, n, out);
}

F32Tensor F32Tensor::borrow(const float* data, Eigen::Index rows, Eigen::Index cols) {
  F32Tensor t;
  t.data_ = data;
  t.rows_ = rows;
  t.cols_ = cols;
  return t;
}

F32Tensor F32Tensor::of(const StoredTensor& s, Eigen::Index rows, Eigen::Index cols) {
  if (const float* p = s.f32_in_place()) return borrow(p, rows, cols);
  F32Tensor t;
  t.owned_.resize(static_cast<std::size_t>(rows * cols));
  s.widen(0, t.owned_.size(), t.owned_.data());
  t.data_ = t.owned_.data();
  t.rows_ = rows;
  t.cols_ = cols;
  return t;
}

LayerView LayerView::of(const DecoderLayer& layer) {
  LayerView v;
  v.input_norm = F32Tensor::borrow(layer.input_norm.data(), layer.input_norm.size(), 1);
  v.post_norm = F32Tensor::borrow(layer.post_norm.data(), layer.post_norm.size(), 1);
  for (std::size_t i = 0; i < kAllLinears.size(); ++i) {
    const Matrix& m = layer.linear(kAllLinears[i]);
    v.linears[i] = F32Tensor::borrow(m.data(), m.rows(), m.cols());
  }
  return v;
}

std::size_t LayerView::owned_bytes() const {
  std::size_t n = input_norm.owned_bytes() + post_norm.owned_bytes();
  for (const auto& t : linears) n += t.owned_bytes();
  return n;
}

namespace {

// [rows, cols] of each linear, kAllLinears order.
std::array<std::pair<Eigen::Index, Eigen::Index>, 7> linear_shapes(const LlamaConfig& c) {
  return {{{c.q_dim(), c.hidden_size},
           {c.kv_dim(), c.hidden_size},
           {c.kv_dim(), c.hidden_size},
           {c.hidden_size, c.q_dim()},
           {c.intermediate_size, c.hidden_size},
           {c.intermediate_size, c.hidden_size},
           {c.hidden_size, c.intermediate_size}}};
}

Matrix widen_matrix(const StoredTensor& t, Eigen::Index rows, Eigen::Index cols) {
  Matrix m(rows, cols);
  t.widen(0, static_cast<std::size_t>(m.size()), m.data());
  return m;
}

Vector widen_vector(const StoredTensor& t, Eigen::Index n) {
  Vector v(n);
  t.widen(0, static_cast<std::size_t>(n), v.data());
  return v;
}

}  // namespace

bool LlamaModel::fully_resident() const {
  if (stored_embed.present() || stored_head.present()) return false;
  for (const auto& l : layers)
    if (l.empty()) return false;
  return true;
}

LayerView LlamaModel::layer_view(int l) const {
  if (layer_resident(l)) return LayerView::of(layers[static_cast<std::size_t>(l)]);
  const auto& s = stored_layers.at(static_cast<std::size_t>(l));
  const auto shapes = linear_shapes(config);
  LayerView v;
  v.input_norm = F32Tensor::of(s.input_norm, config.hidden_size, 1);
  v.post_norm = F32Tensor::of(s.post_norm, config.hidden_size, 1);
  for (std::size_t i = 0; i < kAllLinears.size(); ++i)
    v.linears[i] = F32Tensor::of(s.linears[i], shapes[i].first, shapes[i].second);
  return v;
}

DecoderLayer LlamaModel::layer_copy(int l) const {
  if (layer_resident(l)) return layers[static_cast<std::size_t>(l)];
  const auto& s = stored_layers.at(static_cast<std::size_t>(l));
  const auto shapes = linear_shapes(config);
  DecoderLayer out;
  out.input_norm = widen_vector(s.input_norm, config.hidden_size);
  out.post_norm = widen_vector(s.post_norm, config.hidden_size);
  for (std::size_t i = 0; i < kAllLinears.size(); ++i)
    out.linear(kAllLinears[i]) = widen_matrix(s.linears[i], shapes[i].first, shapes[i].second);
  return out;
}

void LlamaModel::set_layer(int l, DecoderLayer layer) { layers.at(static_cast<std::size_t>(l)) = std::move(layer); }

void LlamaModel::set_stored_layer(int l, StoredLayer stored) {
  if (stored_layers.empty()) stored_layers.resize(layers.size());
  stored_layers.at(static_cast<std::size_t>(l)) = std::move(stored);
  layers.at(static_cast<std::size_t>(l)) = DecoderLayer{};
}

void LlamaModel::make_resident() {
  for (int l = 0; l < static_cast<int>(layers.size()); ++l)
    if (!layer_resident(l)) layers[static_cast<std::size_t>(l)] = layer_copy(l);
  if (stored_embed.present()) embed = widen_matrix(stored_embed, config.vocab_size, config.hidden_size);
  if (stored_head.present()) lm_head = widen_matrix(stored_head, config.vocab_size, config.hidden_size);
  stored_layers.clear();
  stored_embed = {};
  stored_head = {};
}

Matrix LlamaModel::embed_rows(std::span<const int> ids) const {
  const Eigen::Index hidden = config.hidden_size;
  Matrix out(static_cast<Eigen::Index>(ids.size()), hidden);
  const Eigen::Index vocab = stored_embed.present() ? config.vocab_size : embed.rows();
  for (std::size_t i = 0; i < ids.size(); ++i) {
    const int id = ids[i];
    if (id < 0 || id >= vocab)
      throw Error(fmt::format("token id {} at position {} is outside the vocabulary [0, {})", id, i, vocab));
    if (stored_embed.present())
      stored_embed.widen(static_cast<std::size_t>(id) * hidden, static_cast<std::size_t>(hidden),
                         out.row(static_cast<Eigen::Index>(i)).data());
    else
      out.row(static_cast<Eigen::Index>(i)) = embed.row(id);
  }
  return out;
}

F32Tensor LlamaModel::head_view() const {
  if (lm_head.size() > 0) return F32Tensor::borrow(lm_head.data(), lm_head.rows(), lm_head.cols());
  if (stored_head.present()) return F32Tensor::of(stored_head, config.vocab_size, config.hidden_size);
  if (embed.size() > 0) return F32Tensor::borrow(embed.data(), embed.rows(), embed.cols());
  return F32Tensor::of(stored_embed, config.vocab_size, config.hidden_size);
}

const Matrix& LlamaModel::output_head() const {
  if (stored_head.present() || (lm_head.size() == 0 && stored_embed.present()))
    throw std::logic_error("output_head: the head is stored in the checkpoint; call make_resident() first");
  return lm_head.size() > 0 ? lm_head : embed;
}

long long LlamaModel::parameter_count() const {
  const auto& c = config;
  long long per_layer = 2LL * c.hidden_size;
  for (const auto& [r, k] : linear_shapes(c)) per_layer += static_cast<long long>(r) * k;
  const long long head = static_cast<long long>(c.vocab_size) * c.hidden_size;
  return head * (c.tie_word_embeddings ? 1 : 2) + c.hidden_size + per_layer * c.num_layers;
}

std::size_t LlamaModel::resident_bytes() const {
  std::size_t n = static_cast<std::size_t>(embed.size() + final_norm.size() + lm_head.size()) * sizeof(float);
  for (const auto& l : layers) n += l.bytes();
  return n;
}

std::size_t LlamaModel::layer_f32_bytes() const {
  std::size_t n = 2 * static_cast<std::size_t>(config.hidden_size);
  for (const auto& [r, k] : linear_shapes(config)) n += static_cast<std::size_t>(r) * static_cast<std::size_t>(k);
  return n * sizeof(float);
}

std::size_t LlamaModel::head_f32_bytes() const {
  return static_cast<std::size_t>(config.vocab_size) * static_cast<std::size_t>(config.hidden_size) * sizeof(float);
}

namespace {

class TensorOpener {
 public:
  TensorOpener(const Checkpoint& ckpt, const std::filesystem::path& dir) : ckpt_(ckpt), dir_(dir) {}

  // Finds, checks the shape and checks every value is finite (in place), in the order tensors are
  // asked for, so that the first problem reported is the first in load order.
  StoredTensor tensor(const std::string& name, const std::vector<std::int64_t>& shape) {
    const auto* e = ckpt_.find(name);
    if (e == nullptr) {
      // A single file names itself; a sharded checkpoint names its index, which lists the tensors.
      const auto where = ckpt_.files().size() == 1 ? ckpt_.files()[0]->path() : dir_ / "model.safetensors.index.json";
      throw Error(fmt::format("{}: tensor '{}' is missing", where.string(), name));
    }
    dtypes_.insert(dtype_name(e->info->dtype));
    if (e->info->shape != shape) {
      throw Error(fmt::format("{}: tensor '{}': shape [{}] does not match config.json, which implies [{}]",
                              e->file->path().string(), e->info->name, fmt::join(e->info->shape, ", "),
                              fmt::join(shape, ", ")));
    }
    check_finite(e->file->raw(*e->info), *e->info, e->file->path());
    return StoredTensor{e->file, e->info};
  }
  const std::set<std::string>& dtypes() const { return dtypes_; }

 private:
  const Checkpoint& ckpt_;
  std::filesystem::path dir_;
  std::set<std::string> dtypes_;
};

}  // namespace

LlamaModel open_model(const std::filesystem::path& dir) {
  if (!std::filesystem::is_directory(dir))
    throw Error(fmt::format("{}: not a model directory (expected config.json and model.safetensors)", dir.string()));
  LlamaModel model;
  model.source_dir = dir;
  model.config = load_llama_config(dir / "config.json");
  const auto& c = model.config;
  const Checkpoint ckpt(dir);
  TensorOpener open(ckpt, dir);
  const std::int64_t hidden = c.hidden_size;

  model.stored_embed = open.tensor("model.embed_tokens.weight", {c.vocab_size, hidden});
  model.layers.resize(static_cast<std::size_t>(c.num_layers));
  model.stored_layers.resize(static_cast<std::size_t>(c.num_layers));
  const auto shapes = linear_shapes(c);
  for (int i = 0; i < c.num_layers; ++i) {
    auto& s = model.stored_layers[static_cast<std::size_t>(i)];
    s.input_norm = open.tensor(norm_tensor_name(i, false), {hidden});
    s.post_norm = open.tensor(norm_tensor_name(i, true), {hidden});
    for (std::size_t k = 0; k < kAllLinears.size(); ++k)
      s.linears[k] = open.tensor(linear_tensor_name(i, kAllLinears[k]), {shapes[k].first, shapes[k].second});
  }
  model.final_norm = widen_vector(open.tensor("model.norm.weight", {hidden}), hidden);
  // Tied checkpoints usually omit lm_head.weight (HF save_pretrained does); when one is present
  // anyway the tie wins, as in transformers.
  if (!c.tie_word_embeddings) model.stored_head = open.tensor("lm_head.weight", {c.vocab_size, hidden});

  const auto& dtypes = open.dtypes();
  model.source_dtype = dtypes.size() == 1 ? *dtypes.begin() : "mixed";
  return model;
}

StoredLayer write_layer_file(const std::filesystem::path& file, const LlamaConfig& c, int l, const DecoderLayer& layer,
                             DType dtype) {
  const auto shapes = linear_shapes(c);
  std::vector<TensorSpec> specs = {{norm_tensor_name(l, false), dtype, {c.hidden_size}},
                                   {norm_tensor_name(l, true), dtype, {c.hidden_size}}};
  for (std::size_t k = 0; k < kAllLinears.size(); ++k)
    specs.push_back({linear_tensor_name(l, kAllLinears[k]), dtype, {shapes[k].first, shapes[k].second}});
  {
    SafetensorsWriter w(file, specs, {{"format", "pt"}});
    w.append({layer.input_norm.data(), static_cast<std::size_t>(layer.input_norm.size())});
    w.append({layer.post_norm.data(), static_cast<std::size_t>(layer.post_norm.size())});
    for (auto which : kAllLinears) {
      const Matrix& m = layer.linear(which);
      w.append({m.data(), static_cast<std::size_t>(m.size())});
    }
    w.finish();
  }
  return open_layer_file(file, c, l);
}

StoredLayer open_layer_file(const std::filesystem::path& file, const LlamaConfig& c, int l) {
  const Checkpoint ckpt = Checkpoint::single_file(file);
  TensorOpener open(ckpt, file.parent_path());
  const auto shapes = linear_shapes(c);
  StoredLayer s;
  s.input_norm = open.tensor(norm_tensor_name(l, false), {c.hidden_size});
  s.post_norm = open.tensor(norm_tensor_name(l, true), {c.hidden_size});
  for (std::size_t k = 0; k < kAllLinears.size(); ++k)
    s.linears[k] = open.tensor(linear_tensor_name(l, kAllLinears[k]), {shapes[k].first, shapes[k].second});
  return s;
}

LlamaModel load_model(const std::filesystem::path& dir) {
  LlamaModel model = open_model(dir);
  model.make_resident();
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
