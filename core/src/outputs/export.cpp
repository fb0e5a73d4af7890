#include "ptqlab/outputs/export.hpp"

#include <fstream>
#include <optional>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ptqlab/support/error.hpp"

namespace ptqlab {
namespace {

// One tensor of the export: which part of the model it is (layer -1: outside the layers; part:
// 0..6 a linear in kAllLinears order, 7 input norm, 8 post norm, 9 embedding, 10 final norm, 11 head).
struct Item {
  TensorSpec spec;
  int layer = -1;
  int part = 0;
  std::size_t bytes() const {
    std::int64_t n = 1;
    for (auto d : spec.shape) n *= d;
    return static_cast<std::size_t>(n) * dtype_size(spec.dtype);
  }
};

}  // namespace

void export_checkpoint(const LlamaModel& model, const std::filesystem::path& out, const ExportOptions& options) {
  const auto& c = model.config;
  if (std::filesystem::exists(out / "config.json"))
    throw Error(fmt::format("{}: already holds a checkpoint (config.json); choose another export directory", out.string()));
  std::filesystem::create_directories(out);
  const std::int64_t h = c.hidden_size;
  const DType dt = options.dtype;
  std::vector<Item> items;
  items.push_back({{"model.embed_tokens.weight", dt, {c.vocab_size, h}}, -1, 9});
  const std::array<std::pair<std::int64_t, std::int64_t>, 7> shapes = {
      {{c.q_dim(), h}, {c.kv_dim(), h}, {c.kv_dim(), h}, {h, c.q_dim()}, {c.intermediate_size, h},
       {c.intermediate_size, h}, {h, c.intermediate_size}}};
  for (int l = 0; l < c.num_layers; ++l) {
    items.push_back({{norm_tensor_name(l, false), dt, {h}}, l, 7});
    items.push_back({{norm_tensor_name(l, true), dt, {h}}, l, 8});
    for (int k = 0; k < 7; ++k)
      items.push_back({{linear_tensor_name(l, kAllLinears[static_cast<std::size_t>(k)]), dt,
                        {shapes[static_cast<std::size_t>(k)].first, shapes[static_cast<std::size_t>(k)].second}},
                       l, k});
  }
  items.push_back({{"model.norm.weight", dt, {h}}, -1, 10});
  if (!c.tie_word_embeddings) items.push_back({{"lm_head.weight", dt, {c.vocab_size, h}}, -1, 11});

  // At most one decoder layer is widened at a time: tensors are written in model order.
  std::optional<LayerView> view;
  int view_layer = -1;
  auto write_item = [&](const Item& it, SafetensorsWriter& w) {
    auto append = [&w](const Eigen::Map<const Matrix>& m) { w.append({m.data(), static_cast<std::size_t>(m.size())}); };
    if (it.layer >= 0) {
      if (view_layer != it.layer) {
        view.reset();
        view = model.layer_view(it.layer);
        view_layer = it.layer;
      }
      const F32Tensor& t = it.part == 7 ? view->input_norm : it.part == 8 ? view->post_norm
                                                                           : view->linears[static_cast<std::size_t>(it.part)];
      append(t.matrix());
      return;
    }
    view.reset();
    view_layer = -1;
    if (it.part == 10) {
      append(Eigen::Map<const Matrix>(model.final_norm.data(), h, 1));
    } else if (it.part == 9) {
      const F32Tensor t = model.embed.size() > 0 ? F32Tensor::borrow(model.embed.data(), c.vocab_size, h)
                                                 : F32Tensor::of(model.stored_embed, c.vocab_size, h);
      append(t.matrix());
    } else {
      const F32Tensor t = model.head_view();
      append(t.matrix());
    }
  };

  // Shards of consecutive tensors up to max_shard_bytes.
  std::vector<std::vector<std::size_t>> shards(1);
  std::size_t in_shard = 0, total = 0;
  for (std::size_t i = 0; i < items.size(); ++i) {
    if (!shards.back().empty() && in_shard + items[i].bytes() > options.max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(i);
    in_shard += items[i].bytes();
    total += items[i].bytes();
  }
  const int n = static_cast<int>(shards.size());
  auto shard_name = [n](int s) {
    return n == 1 ? std::string("model.safetensors") : fmt::format("model-{:05d}-of-{:05d}.safetensors", s + 1, n);
  };
  nlohmann::json weight_map = nlohmann::json::object();
  for (int s = 0; s < n; ++s) {
    std::vector<TensorSpec> specs;
    for (auto i : shards[static_cast<std::size_t>(s)]) specs.push_back(items[i].spec);
    SafetensorsWriter w(out / shard_name(s), specs, {{"format", "pt"}});
    for (auto i : shards[static_cast<std::size_t>(s)]) {
      write_item(items[i], w);
      weight_map[items[i].spec.name] = shard_name(s);
    }
    w.finish();
  }
  if (n > 1) {
    std::ofstream(out / "model.safetensors.index.json")
        << nlohmann::json{{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}}.dump(2) << "\n";
  }

  nlohmann::json config;
  {
    std::ifstream in(model.source_dir / "config.json");
    config = nlohmann::json::parse(in);
  }
  config["torch_dtype"] = dt == DType::F32 ? "float32" : dt == DType::F16 ? "float16" : "bfloat16";
  // Not "quantization_config": transformers reads that key as a quantizer to apply on loading
  // (quant_method); these weights are already dequantized (docs/model-format.md).
  config["ptqlab_quantization_config"] = nlohmann::json::parse(options.quantization_config_json);
  std::ofstream(out / "config.json") << config.dump(2) << "\n";
  std::filesystem::copy_file(model.source_dir / "tokenizer.model", out / "tokenizer.model",
                             std::filesystem::copy_options::overwrite_existing);
}

}  // namespace ptqlab
