#include "ptqlab/engine/artifact_cache.hpp"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <fstream>

#include <fmt/format.h>

#include "ptqlab/engine/experiment.hpp"
#include "ptqlab/eval/perplexity.hpp"
#include "ptqlab/support/sha256.hpp"
#include "ptqlab/support/text_file.hpp"

namespace ptqlab {
namespace {

constexpr char kMagic[8] = {'P', 'T', 'Q', 'C', 'A', 'C', 'H', '1'};

// Entry layout: magic, u64 key length, key bytes, u64 payload bytes, payload.
bool write_entry(const std::filesystem::path& path, const std::string& key, const std::string& payload) {
  static std::atomic<unsigned> counter{0};
  std::error_code dir_error;
  std::filesystem::create_directories(path.parent_path(), dir_error);  // a cache that cannot be written is no cache
  const auto tmp = path.parent_path() / fmt::format(".{}.tmp-{}-{}", path.filename().string(), ::getpid(), counter++);
  {
    std::ofstream out(tmp, std::ios::binary);
    if (!out) return false;
    const std::uint64_t klen = key.size(), plen = payload.size();
    out.write(kMagic, 8);
    out.write(reinterpret_cast<const char*>(&klen), 8);
    out.write(key.data(), static_cast<std::streamsize>(klen));
    out.write(reinterpret_cast<const char*>(&plen), 8);
    out.write(payload.data(), static_cast<std::streamsize>(plen));
    if (!out) {
      std::error_code ec;
      std::filesystem::remove(tmp, ec);
      return false;
    }
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) std::filesystem::remove(tmp, ec);
  return !ec;
}

std::optional<std::string> read_entry(const std::filesystem::path& path, const std::string& key) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  char magic[8];
  std::uint64_t klen = 0, plen = 0;
  if (!in.read(magic, 8) || std::memcmp(magic, kMagic, 8) != 0) return std::nullopt;
  if (!in.read(reinterpret_cast<char*>(&klen), 8) || klen != key.size()) return std::nullopt;
  std::string stored(klen, '\0');
  if (!in.read(stored.data(), static_cast<std::streamsize>(klen)) || stored != key) return std::nullopt;
  if (!in.read(reinterpret_cast<char*>(&plen), 8) || plen > (1ull << 40)) return std::nullopt;
  std::string payload(plen, '\0');
  if (!in.read(payload.data(), static_cast<std::streamsize>(plen))) return std::nullopt;
  return payload;
}

template <class T>
void append(std::string& s, const T* data, std::size_t n) {
  s.append(reinterpret_cast<const char*>(data), n * sizeof(T));
}

template <class T>
bool take(const std::string& s, std::size_t& pos, T* data, std::size_t n) {
  if (pos + n * sizeof(T) > s.size()) return false;
  std::memcpy(data, s.data() + pos, n * sizeof(T));
  pos += n * sizeof(T);
  return true;
}

}  // namespace

// The directory is made by the first store, not here: a run that stops on a bad input before it
// computed anything leaves no directory behind (the default cache lives inside the result directory).
ArtifactCache::ArtifactCache(std::filesystem::path dir) : dir_(std::move(dir)) {}

std::filesystem::path ArtifactCache::path_of(const std::string& key, const char* kind) const {
  return dir_ / fmt::format("{}-{}.bin", kind, sha256_hex(key).substr(0, 32));
}

std::optional<std::string> ArtifactCache::load_text(const std::string& key) const {
  if (!enabled()) return std::nullopt;
  return read_entry(path_of(key, "text"), key);
}

void ArtifactCache::store_text(const std::string& key, const std::string& text) const {
  if (!enabled()) return;
  write_entry(path_of(key, "text"), key, text);
}

std::optional<std::vector<int>> ArtifactCache::load_tokens(const std::string& key) const {
  if (!enabled()) return std::nullopt;
  auto payload = read_entry(path_of(key, "tokens"), key);
  if (!payload || payload->size() % sizeof(int) != 0) return std::nullopt;
  std::vector<int> tokens(payload->size() / sizeof(int));
  std::memcpy(tokens.data(), payload->data(), payload->size());
  return tokens;
}

void ArtifactCache::store_tokens(const std::string& key, const std::vector<int>& tokens) const {
  if (!enabled()) return;
  std::string payload;
  append(payload, tokens.data(), tokens.size());
  write_entry(path_of(key, "tokens"), key, payload);
}

std::optional<ModelInputStats> ArtifactCache::load_stats(const std::string& key) const {
  if (!enabled()) return std::nullopt;
  auto payload = read_entry(path_of(key, "stats"), key);
  if (!payload) return std::nullopt;
  std::size_t pos = 0;
  std::uint64_t layers = 0;
  if (!take(*payload, pos, &layers, 1) || layers > 100000) return std::nullopt;
  ModelInputStats stats(layers);
  for (auto& layer : stats)
    for (auto& s : layer) {
      std::uint64_t n = 0;
      if (!take(*payload, pos, &n, 1) || n > (1u << 24) || !take(*payload, pos, &s.tokens, 1)) return std::nullopt;
      s.max_abs.resize(static_cast<Eigen::Index>(n));
      s.mean_abs.resize(static_cast<Eigen::Index>(n));
      if (!take(*payload, pos, s.max_abs.data(), n) || !take(*payload, pos, s.mean_abs.data(), n)) return std::nullopt;
    }
  if (pos != payload->size()) return std::nullopt;
  return stats;
}

void ArtifactCache::store_stats(const std::string& key, const ModelInputStats& stats) const {
  if (!enabled()) return;
  std::string payload;
  const std::uint64_t layers = stats.size();
  append(payload, &layers, 1);
  for (const auto& layer : stats)
    for (const auto& s : layer) {
      const std::uint64_t n = static_cast<std::uint64_t>(s.max_abs.size());
      append(payload, &n, 1);
      append(payload, &s.tokens, 1);
      append(payload, s.max_abs.data(), n);
      append(payload, s.mean_abs.data(), n);
    }
  write_entry(path_of(key, "stats"), key, payload);
}

bool ArtifactCache::load_linears(const std::string& key, LlamaModel& model, std::vector<double>& series) const {
  if (!enabled()) return false;
  auto payload = read_entry(path_of(key, "linears"), key);
  if (!payload) return false;
  std::size_t pos = 0;
  std::uint64_t n = 0, layers = 0;
  if (!take(*payload, pos, &n, 1) || n > (1u << 24)) return false;
  std::vector<double> values(n);
  if (!take(*payload, pos, values.data(), n) || !take(*payload, pos, &layers, 1) || layers != model.layers.size())
    return false;
  std::vector<Matrix> weights;
  for (const auto& layer : model.layers)
    for (Linear which : kAllLinears) {
      const Matrix& w = layer.linear(which);
      std::uint64_t shape[2] = {0, 0};
      if (!take(*payload, pos, shape, 2) || shape[0] != static_cast<std::uint64_t>(w.rows()) ||
          shape[1] != static_cast<std::uint64_t>(w.cols()))
        return false;
      Matrix m(w.rows(), w.cols());
      if (!take(*payload, pos, m.data(), static_cast<std::size_t>(m.size()))) return false;
      weights.push_back(std::move(m));
    }
  if (pos != payload->size()) return false;
  std::size_t i = 0;
  for (auto& layer : model.layers)
    for (Linear which : kAllLinears) layer.linear(which) = std::move(weights[i++]);
  series = std::move(values);
  return true;
}

void ArtifactCache::store_linears(const std::string& key, const LlamaModel& model, const std::vector<double>& series) const {
  if (!enabled()) return;
  std::string payload;
  const std::uint64_t n = series.size(), layers = model.layers.size();
  append(payload, &n, 1);
  append(payload, series.data(), series.size());
  append(payload, &layers, 1);
  for (const auto& layer : model.layers)
    for (Linear which : kAllLinears) {
      const Matrix& w = layer.linear(which);
      const std::uint64_t shape[2] = {static_cast<std::uint64_t>(w.rows()), static_cast<std::uint64_t>(w.cols())};
      append(payload, shape, 2);
      append(payload, w.data(), static_cast<std::size_t>(w.size()));
    }
  write_entry(path_of(key, "linears"), key, payload);
}

ArtifactCache::Lock::Lock(const std::filesystem::path& file) {
  fd_ = ::open(file.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd_ < 0) return;  // no lock possible (read-only cache): compute without one
  while (::flock(fd_, LOCK_EX) != 0 && errno == EINTR) {
  }
}

ArtifactCache::Lock::~Lock() {
  if (fd_ >= 0) ::close(fd_);  // closing releases the flock
}

ArtifactCache::Lock ArtifactCache::lock(const std::string& key) const {
  if (!enabled()) return Lock();
  return Lock(path_of(key, "lock"));
}

}  // namespace ptqlab
