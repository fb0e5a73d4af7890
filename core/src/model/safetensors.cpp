#include "ptqlab/model/safetensors.hpp"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "ptqlab/support/error.hpp"

namespace ptqlab {
namespace {

using json = nlohmann::json;

// A header larger than this is not a real checkpoint (HF caps headers at 100 MB).
constexpr std::uint64_t kMaxHeaderBytes = 100ull << 20;

[[noreturn]] void fail(const std::filesystem::path& path, const std::string& what) {
  throw Error(fmt::format("{}: {}", path.string(), what));
}

DType parse_dtype(const std::filesystem::path& path, const std::string& tensor, const std::string& s) {
  if (s == "F32") return DType::F32;
  if (s == "F16") return DType::F16;
  if (s == "BF16") return DType::BF16;
  fail(path, fmt::format("tensor '{}': unsupported dtype '{}' (ptqlab reads F32, F16 and BF16)", tensor, s));
}

std::uint64_t read_le_u64(const std::byte* p) {
  std::uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | static_cast<std::uint8_t>(p[i]);
  return v;
}

}  // namespace

const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::F32: return "F32";
    case DType::F16: return "F16";
    case DType::BF16: return "BF16";
  }
  return "?";
}

std::size_t dtype_size(DType dtype) { return dtype == DType::F32 ? 4 : 2; }

std::int64_t TensorInfo::numel() const {
  std::int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

float bf16_to_f32(std::uint16_t bits) {
  std::uint32_t u = static_cast<std::uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

float f16_to_f32(std::uint16_t h) {
  const std::uint32_t sign = (h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1f;
  std::uint32_t mant = h & 0x3ffu;
  std::uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      u = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

MappedFile::MappedFile(const std::filesystem::path& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, fmt::format("cannot open: {}", std::strerror(errno)));
  struct stat st {};
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file");
  }
  size_ = static_cast<std::size_t>(st.st_size);
  if (size_ > 0) {
    void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      fail(path, fmt::format("cannot mmap: {}", std::strerror(errno)));
    }
    data_ = static_cast<const std::byte*>(p);
  }
  ::close(fd);
}

MappedFile::~MappedFile() {
  if (data_ != nullptr) ::munmap(const_cast<std::byte*>(data_), size_);
}

SafetensorsHeader parse_safetensors(std::span<const std::byte> bytes, const std::filesystem::path& path) {
  SafetensorsHeader out;
  if (bytes.size() < 8) fail(path, fmt::format("truncated: {} bytes, too short for a safetensors header", bytes.size()));
  const std::uint64_t header_len = read_le_u64(bytes.data());
  if (header_len == 0 || header_len > kMaxHeaderBytes)
    fail(path, fmt::format("invalid header length {} (file is {} bytes)", header_len, bytes.size()));
  if (header_len > bytes.size() - 8)
    fail(path, fmt::format("header length {} runs past the end of the file ({} bytes): truncated or corrupt", header_len,
                           bytes.size()));
  out.data_start = 8 + static_cast<std::size_t>(header_len);
  const std::size_t data_size = bytes.size() - out.data_start;

  json header;
  try {
    header = json::parse(reinterpret_cast<const char*>(bytes.data() + 8),
                         reinterpret_cast<const char*>(bytes.data() + out.data_start));
  } catch (const json::parse_error& e) {
    fail(path, fmt::format("header is not valid JSON (byte {})", e.byte));
  } catch (const json::exception&) {
    // out_of_range 406: a number too large for a double ("1e999").
    fail(path, "header is not valid JSON (a number is out of range)");
  }
  if (!header.is_object()) fail(path, "header is not a JSON object");

  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& v = it.value();
    if (name == "__metadata__") {
      if (!v.is_object()) fail(path, "'__metadata__' is not an object");
      for (auto m = v.begin(); m != v.end(); ++m) {
        if (!m.value().is_string()) fail(path, fmt::format("'__metadata__.{}' is not a string", m.key()));
        out.metadata[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    if (!v.is_object()) fail(path, fmt::format("tensor '{}': entry is not an object", name));
    if (!v.contains("dtype") || !v["dtype"].is_string()) fail(path, fmt::format("tensor '{}': missing or non-string 'dtype'", name));
    if (!v.contains("shape") || !v["shape"].is_array()) fail(path, fmt::format("tensor '{}': missing or non-array 'shape'", name));
    if (!v.contains("data_offsets") || !v["data_offsets"].is_array() || v["data_offsets"].size() != 2)
      fail(path, fmt::format("tensor '{}': 'data_offsets' must be an array [begin, end]", name));

    TensorInfo info;
    info.name = name;
    info.dtype = parse_dtype(path, name, v["dtype"].get<std::string>());
    std::uint64_t numel = 1;
    for (const auto& d : v["shape"]) {
      if (!d.is_number_unsigned()) fail(path, fmt::format("tensor '{}': shape entries must be non-negative integers", name));
      const std::uint64_t dim = d.get<std::uint64_t>();
      if (dim != 0 && numel > std::numeric_limits<std::uint64_t>::max() / 8 / dim)
        fail(path, fmt::format("tensor '{}': shape is too large", name));
      numel *= dim;
      info.shape.push_back(static_cast<std::int64_t>(dim));
    }
    const auto& offs = v["data_offsets"];
    if (!offs[0].is_number_unsigned() || !offs[1].is_number_unsigned())
      fail(path, fmt::format("tensor '{}': data_offsets must be non-negative integers", name));
    const std::uint64_t begin = offs[0].get<std::uint64_t>();
    const std::uint64_t end = offs[1].get<std::uint64_t>();
    if (begin > end) fail(path, fmt::format("tensor '{}': data_offsets [{}, {}] are reversed", name, begin, end));
    if (end > data_size)
      fail(path, fmt::format("tensor '{}': data_offsets [{}, {}] run past the end of the data section ({} bytes)", name, begin,
                             end, data_size));
    const std::uint64_t expected = numel * dtype_size(info.dtype);
    if (end - begin != expected)
      fail(path, fmt::format("tensor '{}': {} bytes in data_offsets but shape and dtype {} need {}", name, end - begin,
                             dtype_name(info.dtype), expected));
    info.begin = static_cast<std::size_t>(begin);
    info.end = static_cast<std::size_t>(end);
    out.tensors.push_back(std::move(info));
  }

  std::sort(out.tensors.begin(), out.tensors.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  // Empty tensors cannot overlap anything, and are skipped so that one sorted between two
  // overlapping tensors cannot hide the overlap.
  const TensorInfo* prev = nullptr;  // the previous non-empty tensor
  for (const auto& cur : out.tensors) {
    if (cur.end == cur.begin) continue;
    if (prev != nullptr && cur.begin < prev->end)
      fail(path, fmt::format("tensors '{}' and '{}' overlap (bytes [{}, {}) and [{}, {}))", prev->name, cur.name,
                             prev->begin, prev->end, cur.begin, cur.end));
    prev = &cur;
  }
  return out;
}

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path) : file_(std::make_shared<MappedFile>(path)) {
  SafetensorsHeader header = parse_safetensors(file_->bytes(), path);
  data_start_ = header.data_start;
  tensors_ = std::move(header.tensors);
  metadata_ = std::move(header.metadata);
  for (std::size_t i = 0; i < tensors_.size(); ++i) index_[tensors_[i].name] = i;
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

std::span<const std::byte> SafetensorsFile::raw(const TensorInfo& info) const {
  return file_->bytes().subspan(data_start_ + info.begin, info.end - info.begin);
}

std::vector<float> SafetensorsFile::to_f32(const TensorInfo& info) const { return tensor_to_f32(raw(info), info, path()); }

void widen_to_f32(const std::byte* src, DType dtype, std::size_t n, float* out) {
  switch (dtype) {
    case DType::F32:
      std::memcpy(out, src, n * 4);  // memcpy: the data need not be 4-byte aligned
      return;
    case DType::F16:
    case DType::BF16: {
      const bool bf16 = dtype == DType::BF16;
      for (std::size_t i = 0; i < n; ++i) {
        std::uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        out[i] = bf16 ? bf16_to_f32(h) : f16_to_f32(h);
      }
      return;
    }
  }
}

void check_finite(std::span<const std::byte> raw, const TensorInfo& info, const std::filesystem::path& source) {
  const std::size_t n = static_cast<std::size_t>(info.numel());
  // A value is NaN/Inf exactly when its exponent bits are all ones: test the bits, no conversion.
  auto bad = [&](std::size_t i) {
    switch (info.dtype) {
      case DType::F32: {
        std::uint32_t u;
        std::memcpy(&u, raw.data() + 4 * i, 4);
        return (u & 0x7f800000u) == 0x7f800000u;
      }
      case DType::F16: {
        std::uint16_t h;
        std::memcpy(&h, raw.data() + 2 * i, 2);
        return (h & 0x7c00u) == 0x7c00u;
      }
      case DType::BF16: {
        std::uint16_t h;
        std::memcpy(&h, raw.data() + 2 * i, 2);
        return (h & 0x7f80u) == 0x7f80u;
      }
    }
    return false;
  };
  for (std::size_t i = 0; i < n; ++i) {
    if (bad(i)) {
      float v;
      widen_to_f32(raw.data() + i * dtype_size(info.dtype), info.dtype, 1, &v);
      fail(source, fmt::format("tensor '{}': non-finite value {} at flat index {}", info.name, v, i));
    }
  }
}

std::uint16_t f32_to_bf16(float value) {
  std::uint32_t u;
  std::memcpy(&u, &value, sizeof u);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu) != 0) return static_cast<std::uint16_t>((u >> 16) | 0x40u);
  const std::uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);  // ties to even
  return static_cast<std::uint16_t>((u + rounding) >> 16);
}

std::uint16_t f32_to_f16(float value) {
  std::uint32_t u;
  std::memcpy(&u, &value, sizeof u);
  const std::uint16_t sign = static_cast<std::uint16_t>((u >> 16) & 0x8000u);
  const std::uint32_t abs = u & 0x7fffffffu;
  if (abs >= 0x7f800000u) return static_cast<std::uint16_t>(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u : 0u));
  if (abs >= 0x477ff000u) return static_cast<std::uint16_t>(sign | 0x7c00u);  // rounds past 65504: Inf
  if (abs < 0x38800000u) {  // below the smallest normal F16 (2^-14): subnormal or zero
    if (abs < 0x33000000u) return sign;  // below half the smallest subnormal (2^-25), ties included
    const std::uint32_t exp = abs >> 23;
    const std::uint32_t mant = (abs & 0x7fffffu) | 0x800000u;
    const std::uint32_t shift = 126 - exp;  // value / 2^-24 = mant * 2^(exp - 126)
    const std::uint32_t half = 1u << (shift - 1);
    std::uint32_t q = mant >> shift;
    const std::uint32_t rest = mant & ((1u << shift) - 1);
    if (rest > half || (rest == half && (q & 1u))) ++q;
    return static_cast<std::uint16_t>(sign | q);
  }
  // Normal: rebias the exponent, round the mantissa to 10 bits (ties to even); a carry into the
  // exponent is the correct result.
  const std::uint32_t rebased = abs - (112u << 23);
  const std::uint32_t rounding = 0xfffu + ((rebased >> 13) & 1u);
  return static_cast<std::uint16_t>(sign | ((rebased + rounding) >> 13));
}

std::vector<float> tensor_to_f32(std::span<const std::byte> src, const TensorInfo& info,
                                 const std::filesystem::path& source) {
  const std::size_t n = static_cast<std::size_t>(info.numel());
  std::vector<float> out(n);
  switch (info.dtype) {
    case DType::F32:
      std::memcpy(out.data(), src.data(), n * 4);  // memcpy: the data need not be 4-byte aligned
      break;
    case DType::F16:
    case DType::BF16: {
      const bool bf16 = info.dtype == DType::BF16;
      for (std::size_t i = 0; i < n; ++i) {
        std::uint16_t h;
        std::memcpy(&h, src.data() + 2 * i, 2);
        out[i] = bf16 ? bf16_to_f32(h) : f16_to_f32(h);
      }
      break;
    }
  }
  for (std::size_t i = 0; i < n; ++i) {
    if (!std::isfinite(out[i]))
      fail(source, fmt::format("tensor '{}': non-finite value {} at flat index {}", info.name, out[i], i));
  }
  return out;
}

Checkpoint::Checkpoint(const std::filesystem::path& dir) {
  const auto single = dir / "model.safetensors";
  const auto index_path = dir / "model.safetensors.index.json";
  std::vector<std::filesystem::path> shard_paths;
  json weight_map;
  if (std::filesystem::exists(index_path)) {
    std::ifstream in(index_path);
    if (!in) fail(index_path, "cannot open");
    json index;
    try {
      index = json::parse(in);
    } catch (const json::parse_error& e) {
      fail(index_path, fmt::format("not valid JSON (byte {})", e.byte));
    } catch (const json::exception&) {
      fail(index_path, "not valid JSON (a number is out of range)");
    }
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
      fail(index_path, "missing object 'weight_map'");
    weight_map = index["weight_map"];
    std::set<std::string> shard_names;
    for (auto it = weight_map.begin(); it != weight_map.end(); ++it) {
      if (!it.value().is_string()) fail(index_path, fmt::format("weight_map.{}: shard name is not a string", it.key()));
      const auto shard = it.value().get<std::string>();
      // A shard must be a plain file name inside the checkpoint directory (no path traversal).
      if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..")
        fail(index_path, fmt::format("weight_map.{}: shard '{}' is not a plain file name", it.key(), shard));
      shard_names.insert(shard);
    }
    for (const auto& s : shard_names) shard_paths.push_back(dir / s);
  } else if (std::filesystem::exists(single)) {
    shard_paths.push_back(single);
  } else {
    fail(dir, "no model.safetensors or model.safetensors.index.json (ptqlab never loads pickle .bin/.pt files)");
  }

  for (const auto& p : shard_paths) {
    if (!std::filesystem::exists(p)) fail(p, "shard named in model.safetensors.index.json does not exist");
    files_.push_back(std::make_shared<SafetensorsFile>(p));
  }
  index_tensors();
  if (!weight_map.is_null()) {
    for (auto it = weight_map.begin(); it != weight_map.end(); ++it) {
      auto e = entries_.find(it.key());
      const auto shard = dir / it.value().get<std::string>();
      if (e == entries_.end() || e->second.file->path() != shard)
        fail(shard, fmt::format("tensor '{}' listed in model.safetensors.index.json is not in this shard", it.key()));
    }
  }
}

void Checkpoint::index_tensors() {
  for (const auto& f : files_) {
    for (const auto& t : f->tensors()) {
      auto [it, inserted] = entries_.emplace(t.name, Entry{f, &t});
      if (!inserted)
        fail(f->path(), fmt::format("tensor '{}' also appears in {}", t.name, it->second.file->path().string()));
    }
  }
}

Checkpoint Checkpoint::single_file(const std::filesystem::path& file) {
  Checkpoint c;
  c.files_.push_back(std::make_shared<SafetensorsFile>(file));
  c.index_tensors();
  return c;
}

// ----------------------------------------------------------------------------------------------
// Writer

SafetensorsWriter::SafetensorsWriter(const std::filesystem::path& path, std::vector<TensorSpec> tensors,
                                     const std::map<std::string, std::string>& metadata)
    : path_(path), tensors_(std::move(tensors)) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::size_t offset = 0;
  for (const auto& t : tensors_) {
    std::int64_t numel = 1;
    for (auto d : t.shape) numel *= d;
    const std::size_t bytes = static_cast<std::size_t>(numel) * dtype_size(t.dtype);
    header[t.name] = {{"dtype", dtype_name(t.dtype)}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  data_bytes_ = offset;
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');
  tmp_ = path_;
  tmp_ += fmt::format(".tmp-{}", ::getpid());
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail(tmp_, fmt::format("cannot create: {}", std::strerror(errno)));
  const std::uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) buffer_.push_back(static_cast<std::byte>((n >> (8 * i)) & 0xff));
  for (char ch : text) buffer_.push_back(static_cast<std::byte>(ch));
  flush();
}

SafetensorsWriter::~SafetensorsWriter() {
  if (fd_ >= 0) {
    ::close(fd_);
    std::error_code ec;
    std::filesystem::remove(tmp_, ec);
  }
}

void SafetensorsWriter::flush() {
  std::size_t done = 0;
  while (done < buffer_.size()) {
    const ssize_t w = ::write(fd_, buffer_.data() + done, buffer_.size() - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      fail(tmp_, fmt::format("write failed: {}", std::strerror(errno)));
    }
    done += static_cast<std::size_t>(w);
  }
  buffer_.clear();
}

void SafetensorsWriter::append(std::span<const float> values) {
  std::size_t pos = 0;
  while (pos < values.size()) {
    if (current_ >= tensors_.size()) fail(path_, "more values appended than the declared tensors hold");
    const auto& t = tensors_[current_];
    std::int64_t numel = 1;
    for (auto d : t.shape) numel *= d;
    const std::size_t take = std::min<std::size_t>(values.size() - pos, static_cast<std::size_t>(numel - written_));
    const std::size_t old = buffer_.size();
    buffer_.resize(old + take * dtype_size(t.dtype));
    std::byte* out = buffer_.data() + old;
    for (std::size_t i = 0; i < take; ++i) {
      const float v = values[pos + i];
      if (t.dtype == DType::F32) {
        std::memcpy(out + 4 * i, &v, 4);
      } else {
        const std::uint16_t h = t.dtype == DType::F16 ? f32_to_f16(v) : f32_to_bf16(v);
        std::memcpy(out + 2 * i, &h, 2);
      }
    }
    pos += take;
    written_ += static_cast<std::int64_t>(take);
    if (written_ == numel) {
      ++current_;
      written_ = 0;
    }
    if (buffer_.size() >= (8u << 20)) flush();
  }
}

void SafetensorsWriter::finish() {
  // Skip trailing empty tensors.
  while (current_ < tensors_.size() && written_ == 0) {
    std::int64_t numel = 1;
    for (auto d : tensors_[current_].shape) numel *= d;
    if (numel != 0) break;
    ++current_;
  }
  if (current_ != tensors_.size())
    fail(path_, fmt::format("tensor '{}' was not written completely", tensors_[current_].name));
  flush();
  if (::fsync(fd_) != 0) fail(tmp_, fmt::format("fsync failed: {}", std::strerror(errno)));
  ::close(fd_);
  fd_ = -1;
  std::error_code ec;
  std::filesystem::rename(tmp_, path_, ec);
  if (ec) {
    std::filesystem::remove(tmp_, ec);
    fail(path_, "cannot rename the finished file into place");
  }
}

const Checkpoint::Entry* Checkpoint::find(const std::string& name) const {
  auto it = entries_.find(name);
  return it == entries_.end() ? nullptr : &it->second;
}

}  // namespace ptqlab
