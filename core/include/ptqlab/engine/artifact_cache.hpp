#pragma once
// On-disk, content-addressed cache of artifacts that many arms, runs and Slurm jobs share: token
// streams of text files, FP input statistics, merged models and allocation tables. A key is a sha256 over everything the artifact
// depends on; files are written to a temporary name and renamed, so readers never see a partial
// entry, and a corrupt entry is ignored (recomputed), never trusted.
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "ptqlab/quant/calibration.hpp"

namespace ptqlab {

class ArtifactCache {
 public:
  ArtifactCache() = default;  // disabled
  explicit ArtifactCache(std::filesystem::path dir);
  bool enabled() const { return !dir_.empty(); }
  const std::filesystem::path& dir() const { return dir_; }

  std::optional<std::vector<int>> load_tokens(const std::string& key) const;
  // A text entry (the allocation stage's loss[unit][candidate] table, as JSON).
  std::optional<std::string> load_text(const std::string& key) const;
  void store_text(const std::string& key, const std::string& text) const;
  void store_tokens(const std::string& key, const std::vector<int>& tokens) const;
  std::optional<ModelInputStats> load_stats(const std::string& key) const;
  void store_stats(const std::string& key, const ModelInputStats& stats) const;
  // The decoder-layer linear weights of a model plus a series of numbers (restorative LoRA's merged
  // model and its loss curve; everything else of that model equals the original). load_linears
  // replaces the linears of `model` only when the entry is complete and every shape fits.
  bool load_linears(const std::string& key, LlamaModel& model, std::vector<double>& series) const;
  void store_linears(const std::string& key, const LlamaModel& model, const std::vector<double>& series) const;

  // Holds an exclusive lock on one key, across threads and processes (flock on DIR/lock-<hash>),
  // while one of them computes the entry; the others wait, then find it. Disabled cache: no-op.
  class Lock {
   public:
    Lock() = default;
    explicit Lock(const std::filesystem::path& file);
    ~Lock();
    Lock(Lock&& other) noexcept : fd_(other.fd_) { other.fd_ = -1; }
    Lock& operator=(Lock&&) = delete;

   private:
    int fd_ = -1;
  };
  Lock lock(const std::string& key) const;

  // Where an entry of `kind` lives: DIR/<kind>-<hash of key>.bin. Artifacts too large to load whole
  // (the KL-divergence reference logits) are written and streamed there by their own code, with
  // the same rules: key stored in the file and checked, temporary name then rename.
  std::filesystem::path path_of(const std::string& key, const char* kind) const;

 private:
  std::filesystem::path dir_;
};

// The keys entries are stored under are made in one place: ptqlab/engine/cache_keys.hpp.

}  // namespace ptqlab
