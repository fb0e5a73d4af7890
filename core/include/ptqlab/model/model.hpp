#pragma once
// A LLaMA-architecture model, with every weight matrix in PyTorch nn.Linear layout: row-major
// [out_features, in_features] (docs/architecture.md, "Model representation").
//
// Two kinds of storage, per tensor:
//   resident  float32 Eigen matrices owned by the model (load_model, random_llama, a layer an arm
//             quantized and keeps in memory);
//   stored    bytes of a memory-mapped safetensors file in their stored dtype (open_model: the
//             checkpoint; an arm's spilled layers). Mapped pages are file cache, not the process's
//             own memory. A stored layer is widened to float32 only while it is computed or
//             quantized (layer_view, layer_copy); a mapped F32 tensor is read in place.
// Copying a model copies the resident tensors and shares the stored ones, so arms that start from
// an opened checkpoint share its base and own only the layers they change.
#include <array>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "ptqlab/model/model_config.hpp"
#include "ptqlab/model/safetensors.hpp"

namespace ptqlab {

using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using Vector = Eigen::VectorXf;

// The seven linear layers of a decoder layer, in the order HF names them.
enum class Linear { q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj };
inline constexpr std::array<Linear, 7> kAllLinears = {Linear::q_proj,    Linear::k_proj,  Linear::v_proj,
                                                      Linear::o_proj,    Linear::gate_proj, Linear::up_proj,
                                                      Linear::down_proj};
const char* linear_name(Linear which);       // "q_proj", ...
std::string linear_tensor_name(int layer, Linear which);  // "model.layers.3.self_attn.q_proj.weight"
std::string norm_tensor_name(int layer, bool post);       // "model.layers.3.input_layernorm.weight", ...

struct DecoderLayer {
  Vector input_norm;  // input_layernorm.weight [hidden]
  Vector post_norm;   // post_attention_layernorm.weight [hidden]
  Matrix q_proj, k_proj, v_proj, o_proj;
  Matrix gate_proj, up_proj, down_proj;

  Matrix& linear(Linear which);
  const Matrix& linear(Linear which) const;
  bool empty() const { return q_proj.size() == 0; }
  std::size_t bytes() const;  // float32 bytes held
};

// One tensor inside a mapped safetensors file; the pointer keeps the file mapped.
struct StoredTensor {
  std::shared_ptr<const SafetensorsFile> file;
  const TensorInfo* info = nullptr;

  bool present() const { return info != nullptr; }
  std::int64_t numel() const { return info ? info->numel() : 0; }
  // Mapped data as float32 in place: non-null only for a 4-byte-aligned F32 tensor.
  const float* f32_in_place() const;
  // Widens elements [first, first + n) into `out`.
  void widen(std::size_t first, std::size_t n, float* out) const;
};

struct StoredLayer {
  StoredTensor input_norm, post_norm;
  std::array<StoredTensor, 7> linears;  // kAllLinears order
};

// float32 values of one tensor for reading: borrowed (a resident matrix, a mapped F32 tensor) or
// owning a widened copy. Movable; the data pointer survives moves.
class F32Tensor {
 public:
  F32Tensor() = default;
  static F32Tensor borrow(const float* data, Eigen::Index rows, Eigen::Index cols);
  static F32Tensor of(const StoredTensor& t, Eigen::Index rows, Eigen::Index cols);  // in place or widened
  Eigen::Map<const Matrix> matrix() const { return {data_, rows_, cols_}; }
  Eigen::Map<const Vector> vector() const { return {data_, rows_ * cols_}; }
  bool owns() const { return !owned_.empty(); }
  std::size_t owned_bytes() const { return owned_.size() * sizeof(float); }

 private:
  const float* data_ = nullptr;
  Eigen::Index rows_ = 0, cols_ = 0;
  std::vector<float> owned_;
};

// A decoder layer's float32 weights for the forward pass, however they are stored.
struct LayerView {
  F32Tensor input_norm, post_norm;
  std::array<F32Tensor, 7> linears;  // kAllLinears order

  static LayerView of(const DecoderLayer& layer);  // borrows: no copy
  Eigen::Map<const Matrix> linear(Linear which) const { return linears[static_cast<int>(which)].matrix(); }
  std::size_t owned_bytes() const;
};

struct LlamaModel {
  LlamaConfig config;
  Matrix embed;  // [vocab, hidden]; empty when stored (stored_embed)
  // Resident layers; layers[l].empty() means layer l is read from stored_layers[l].
  std::vector<DecoderLayer> layers;
  Vector final_norm;  // [hidden], always resident
  Matrix lm_head;     // [vocab, hidden]; empty when tied to embed or stored (stored_head)
  std::filesystem::path source_dir;
  std::string source_dtype;  // dtype of the checkpoint's tensors ("F32", "BF16", "mixed", ...)

  std::vector<StoredLayer> stored_layers;  // empty, or one per layer
  StoredTensor stored_embed, stored_head;

  bool layer_resident(int l) const { return !layers[static_cast<std::size_t>(l)].empty(); }
  bool fully_resident() const;
  // Layer l as float32 for reading: borrowed when resident or mapped F32, widened otherwise.
  LayerView layer_view(int l) const;
  // Layer l as an owned float32 copy (for quantizing it).
  DecoderLayer layer_copy(int l) const;
  // Makes `layer` the resident layer l (an arm's quantized layer kept in memory).
  void set_layer(int l, DecoderLayer layer);
  // Layer l is read from `stored` from now on; its resident copy is dropped.
  void set_stored_layer(int l, StoredLayer stored);
  // Widens every stored tensor into resident float32 (whole-model training needs it).
  void make_resident();

  // Rows `ids` of the embedding as float32 [ids.size(), hidden] (token ids checked).
  Matrix embed_rows(std::span<const int> ids) const;
  // lm_head (or the tied embedding) as float32: borrowed or widened.
  F32Tensor head_view() const;
  // Resident only (training code): the head matrix. Throws std::logic_error on a stored head.
  const Matrix& output_head() const;

  long long parameter_count() const;  // from the shapes, as stored in the checkpoint (tied head counted once)
  std::size_t resident_bytes() const;  // float32 bytes the model itself holds
  std::size_t layer_f32_bytes() const;  // one decoder layer in float32
  std::size_t head_f32_bytes() const;   // lm_head (or the tied embedding) in float32
};

// Opens config.json and model.safetensors (or a sharded checkpoint) of a HF model directory with
// every tensor left in the mapped file (stored). Checks names, shapes and that every value is
// finite (in place, no widening) before returning. Every failure is a ptqlab::Error naming the
// file and the tensor or key.
LlamaModel open_model(const std::filesystem::path& dir);
// open_model, then make_resident: every weight in float32 memory (tests, training, small models).
LlamaModel load_model(const std::filesystem::path& dir);

// One decoder layer as its own safetensors file (HF tensor names "model.layers.<l>...."), in
// `dtype`: an arm's quantized layer spilled to disk (--layer-store), a layer checkpoint. Written
// durably (temporary file, fsync, rename); returns the layer as stored in the new, mapped file.
StoredLayer write_layer_file(const std::filesystem::path& file, const LlamaConfig& config, int l,
                             const DecoderLayer& layer, DType dtype);
// Opens such a file, checking names and shapes against `config`.
StoredLayer open_layer_file(const std::filesystem::path& file, const LlamaConfig& config, int l);

// A model with the given architecture and random weights (normal, std `weight_std`; norm weights
// 1 + N(0, 0.1)), for tests and benchmarks at shapes no shipped checkpoint has.
LlamaModel random_llama(const LlamaConfig& config, std::uint64_t seed, float weight_std = 0.02f);

}  // namespace ptqlab
