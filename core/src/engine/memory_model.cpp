#include "ptqlab/engine/memory_model.hpp"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <sstream>
#include <thread>

#include <fmt/format.h>

#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/support/error.hpp"

namespace ptqlab {

double MemoryEstimate::Arm::bytes() const {
  double n = 0;
  for (const auto& i : items) n += i.bytes;
  return n;
}

double MemoryEstimate::shared_bytes() const {
  double n = 0;
  for (const auto& i : shared) n += i.bytes;
  return n;
}

double MemoryEstimate::total_bytes() const {
  std::vector<double> peaks;
  for (const auto& a : arms) peaks.push_back(a.bytes());
  std::sort(peaks.begin(), peaks.end(), std::greater<>());
  double n = shared_bytes();
  for (std::size_t i = 0; i < peaks.size() && i < static_cast<std::size_t>(std::max(1, jobs)); ++i) n += peaks[i];
  return n;
}

std::string format_bytes(double bytes) {
  if (bytes >= 1e9) return fmt::format("{:.2f} GB", bytes / 1e9);
  if (bytes >= 1e6) return fmt::format("{:.1f} MB", bytes / 1e6);
  return fmt::format("{:.0f} kB", bytes / 1e3);
}

std::string MemoryEstimate::describe() const {
  auto list = [](const std::vector<MemoryItem>& items) {
    std::string s;
    for (const auto& i : items) {
      if (i.bytes <= 0) continue;
      if (!s.empty()) s += ", ";
      s += fmt::format("{} {}", i.what, format_bytes(i.bytes));
    }
    return s.empty() ? std::string("nothing") : s;
  };
  std::string out = fmt::format("predicted peak memory {} (jobs {}): shared {} ({})", format_bytes(total_bytes()), jobs,
                                format_bytes(shared_bytes()), list(shared));
  for (const auto& a : arms) out += fmt::format("\n  arm {}: {} ({})", a.name, format_bytes(a.bytes()), list(a.items));
  return out;
}

std::vector<MemoryItem> eval_memory(const LlamaModel& model, long long windows, int seq_len, int batch_windows,
                                    std::size_t activation_budget) {
  const auto& c = model.config;
  const int per_call = batch_windows > 0 ? batch_windows : std::max(1, 4096 / seq_len);
  const long long calls = (windows + per_call - 1) / per_call;
  const long long rows_per_call = static_cast<long long>(std::min<long long>(per_call, windows)) * seq_len;
  const long long group = std::min(calls, batches_per_group(c, rows_per_call, activation_budget));
  const double f = sizeof(float);
  // A stored layer that is not F32 is widened while it is computed (mapped F32 is read in place).
  bool widened_layer = false;
  for (int l = 0; l < c.num_layers; ++l) {
    if (model.layer_resident(l)) continue;
    const auto& s = model.stored_layers[static_cast<std::size_t>(l)];
    if (s.linears[0].f32_in_place() == nullptr) widened_layer = true;
  }
  const bool head_resident = model.lm_head.size() > 0 || (c.tie_word_embeddings && model.embed.size() > 0);
  const bool head_in_place = !head_resident && (model.stored_head.present() ? model.stored_head.f32_in_place() != nullptr
                                                                            : model.stored_embed.f32_in_place() != nullptr);
  // Concurrent batches: up to the hardware threads (TBB).
  const double threads = std::max(1u, std::thread::hardware_concurrency());
  const double concurrent = std::min<double>(static_cast<double>(group), threads);
  // The decoder layers and the head are never in float32 at the same time (a layer's widened copy
  // is dropped before the head is made), so the peak is the hidden states plus the larger stage.
  std::vector<MemoryItem> items;
  items.push_back({"eval hidden states", static_cast<double>(group) * rows_per_call * c.hidden_size * f});
  // Inside a layer: normed, q, k, v, attention, projection (hidden or q/kv widths) and gate, up.
  const double layer_tmp = rows_per_call * f *
                           (2.0 * c.hidden_size + c.q_dim() + 2.0 * c.kv_dim() + c.q_dim() + 2.0 * c.intermediate_size);
  const std::vector<MemoryItem> layer_stage = {
      {"one layer widened to f32", widened_layer ? static_cast<double>(model.layer_f32_bytes()) : 0.0},
      {"eval layer temporaries", concurrent * layer_tmp}};
  const std::vector<MemoryItem> head_stage = {
      {"head widened to f32", head_resident || head_in_place ? 0.0 : static_cast<double>(model.head_f32_bytes())},
      {"eval logits", threads * (seq_len - 1) * static_cast<double>(c.vocab_size) * f}};
  auto sum = [](const std::vector<MemoryItem>& v) {
    double n = 0;
    for (const auto& i : v) n += i.bytes;
    return n;
  };
  const auto& stage = sum(layer_stage) >= sum(head_stage) ? layer_stage : head_stage;
  items.insert(items.end(), stage.begin(), stage.end());
  return items;
}

namespace {

double read_number_file(const std::string& path) {
  std::ifstream in(path);
  std::string s;
  if (!(in >> s) || s == "max") return 0;
  try {
    return std::stod(s);
  } catch (...) {
    return 0;
  }
}

}  // namespace

double available_memory_bytes() {
  double avail = 0;
  std::ifstream in("/proc/meminfo");
  std::string key;
  double value = 0;
  std::string unit;
  while (in >> key >> value) {
    std::getline(in, unit);
    if (key == "MemAvailable:") avail = value * 1024.0;
  }
  const double limit = read_number_file("/sys/fs/cgroup/memory.max");
  if (limit > 0) {
    const double used = read_number_file("/sys/fs/cgroup/memory.current");
    const double left = std::max(0.0, limit - used);
    if (avail == 0 || left < avail) avail = left;
  }
  return avail;
}

double parse_memory_size(const std::string& text, const std::string& option) {
  std::size_t pos = 0;
  double v = 0;
  try {
    v = std::stod(text, &pos);
  } catch (...) {
    throw Error(fmt::format("{}: '{}' is not a size (e.g. 6G, 512M)", option, text));
  }
  std::string unit = text.substr(pos);
  for (auto& ch : unit) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  double scale = 1;
  if (unit.empty() || unit == "B") scale = 1;
  else if (unit == "K" || unit == "KB") scale = 1e3;
  else if (unit == "M" || unit == "MB") scale = 1e6;
  else if (unit == "G" || unit == "GB") scale = 1e9;
  else if (unit == "T" || unit == "TB") scale = 1e12;
  else if (unit == "KIB") scale = 1024.0;
  else if (unit == "MIB") scale = 1024.0 * 1024;
  else if (unit == "GIB") scale = 1024.0 * 1024 * 1024;
  else throw Error(fmt::format("{}: '{}' has an unknown unit (B, K, M, G, T, KiB, MiB, GiB)", option, text));
  if (!(v > 0) || !std::isfinite(v)) throw Error(fmt::format("{}: '{}' must be a positive size", option, text));
  return v * scale;
}

}  // namespace ptqlab
