#pragma once
// Reader for the safetensors format (single file or a sharded checkpoint with
// model.safetensors.index.json). Files are memory-mapped; every header field is validated before
// any tensor is touched: header length within the file, well-formed JSON, known dtypes, shapes
// matching byte sizes, offsets inside the data section and non-overlapping.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace ptqlab {

enum class DType { F32, F16, BF16 };

const char* dtype_name(DType dtype);
std::size_t dtype_size(DType dtype);

struct TensorInfo {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::size_t begin = 0;  // byte offsets inside the data section (after the header)
  std::size_t end = 0;

  std::int64_t numel() const;
};

// The parsed and validated header of a safetensors file image: where the data section starts, the
// tensor table (sorted by begin offset) and the metadata. `source` names the file in errors.
// Exposed so that the parser runs on bytes in memory (fuzzing, tests) exactly as on a mapped file.
struct SafetensorsHeader {
  std::size_t data_start = 0;
  std::vector<TensorInfo> tensors;
  std::map<std::string, std::string> metadata;
};
SafetensorsHeader parse_safetensors(std::span<const std::byte> bytes, const std::filesystem::path& source);
// The tensor's values as float32 from its raw bytes (raw.size() == info.end - info.begin);
// throws ptqlab::Error naming `source` and the tensor on NaN/Inf.
std::vector<float> tensor_to_f32(std::span<const std::byte> raw, const TensorInfo& info,
                                 const std::filesystem::path& source);

// Widens `n` stored values of `dtype` at `src` (any alignment) to float32, without checks.
void widen_to_f32(const std::byte* src, DType dtype, std::size_t n, float* out);
// Throws ptqlab::Error naming `source` and the tensor at the first NaN/Inf, reading the raw bytes in
// place (the same message as tensor_to_f32).
void check_finite(std::span<const std::byte> raw, const TensorInfo& info, const std::filesystem::path& source);

// A read-only memory mapping of a whole file.
class MappedFile {
 public:
  explicit MappedFile(const std::filesystem::path& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  std::span<const std::byte> bytes() const { return {data_, size_}; }
  const std::filesystem::path& path() const { return path_; }

 private:
  std::filesystem::path path_;
  const std::byte* data_ = nullptr;
  std::size_t size_ = 0;
};

// One .safetensors file.
class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return file_->path(); }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  std::span<const std::byte> raw(const TensorInfo& info) const;
  std::size_t file_bytes() const { return file_->bytes().size(); }
  // Converts to float32; throws ptqlab::Error naming the file and tensor on NaN/Inf.
  std::vector<float> to_f32(const TensorInfo& info) const;

 private:
  std::shared_ptr<MappedFile> file_;
  std::size_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;  // sorted by begin offset
  std::map<std::string, std::size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a checkpoint directory: model.safetensors, or the shards listed by
// model.safetensors.index.json. Tensor names are unique across shards.
class Checkpoint {
 public:
  explicit Checkpoint(const std::filesystem::path& dir);
  // One safetensors file (an arm's spilled layers, a layer checkpoint).
  static Checkpoint single_file(const std::filesystem::path& file);

  struct Entry {
    std::shared_ptr<const SafetensorsFile> file;  // shared: a model's streamed tensors keep their file mapped
    const TensorInfo* info;
  };
  // nullptr when absent
  const Entry* find(const std::string& name) const;
  const std::map<std::string, Entry>& entries() const { return entries_; }
  const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }

 private:
  Checkpoint() = default;
  void index_tensors();
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, Entry> entries_;
};

// Widening conversions used by the loader (exposed for tests).
float bf16_to_f32(std::uint16_t bits);
float f16_to_f32(std::uint16_t bits);
// Narrowing conversions (round to nearest, ties to even; overflow to F16 gives ±Inf) used by the
// writers: synthetic checkpoints, spilled layers, exports.
std::uint16_t f32_to_bf16(float value);
std::uint16_t f32_to_f16(float value);

// Writes one safetensors file whose tensors are all declared up front, so that the header is known
// before any data and the data can be streamed tensor by tensor (append) without holding them:
// at most one tensor's converted bytes are buffered. The file appears at `path` only on finish()
// (written to a temporary name, fsync'ed, renamed); a writer destroyed before finish() removes it.
// The header is padded with spaces to a multiple of 8 bytes, so F32 data is 4-byte aligned when mapped.
struct TensorSpec {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
};
class SafetensorsWriter {
 public:
  SafetensorsWriter(const std::filesystem::path& path, std::vector<TensorSpec> tensors,
                    const std::map<std::string, std::string>& metadata = {});
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // The next values of the current tensor, in declaration order, converted to its dtype; a call
  // may cover part of a tensor or run across several.
  void append(std::span<const float> values);
  void finish();  // throws ptqlab::Error unless every declared value was appended
  std::size_t data_bytes() const { return data_bytes_; }

 private:
  std::filesystem::path path_, tmp_;
  std::vector<TensorSpec> tensors_;
  std::size_t current_ = 0;       // tensor being written
  std::int64_t written_ = 0;      // values of it written so far
  std::size_t data_bytes_ = 0;
  int fd_ = -1;
  std::vector<std::byte> buffer_;
  void flush();
};

}  // namespace ptqlab
