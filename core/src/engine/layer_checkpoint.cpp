#include "ptqlab/engine/layer_checkpoint.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <type_traits>

#include <fmt/format.h>

#include "ptqlab/support/error.hpp"

namespace ptqlab {
namespace {

constexpr char kMagic[8] = {'P', 'T', 'Q', 'L', 'R', 'E', 'S', '1'};

// Writes straight to a file; the first failure is remembered and reported at the end.
class Out {
 public:
  explicit Out(std::FILE* f) : f_(f) {}
  void raw(const void* p, std::size_t n) {
    if (n > 0 && std::fwrite(p, 1, n, f_) != n) ok_ = false;
  }
  template <class T>
  void pod(const T& v) {
    static_assert(std::is_trivially_copyable_v<T>);
    raw(&v, sizeof v);
  }
  void str(const std::string& s) {
    pod<std::uint64_t>(s.size());
    raw(s.data(), s.size());
  }
  template <class T>
  void vec(const std::vector<T>& v) {
    pod<std::uint64_t>(v.size());
    raw(v.data(), v.size() * sizeof(T));
  }
  void matrix(const Matrix& m) {
    pod<std::int64_t>(m.rows());
    pod<std::int64_t>(m.cols());
    raw(m.data(), static_cast<std::size_t>(m.size()) * sizeof(float));
  }
  bool ok() const { return ok_; }

 private:
  std::FILE* f_;
  bool ok_ = true;
};

class In {
 public:
  explicit In(std::string b) : bytes_(std::move(b)) {}
  template <class T>
  T pod() {
    T v;
    take(&v, sizeof v);
    return v;
  }
  std::string str() {
    const auto n = pod<std::uint64_t>();
    check(n);
    std::string s = bytes_.substr(pos_, n);
    pos_ += n;
    return s;
  }
  template <class T>
  std::vector<T> vec() {
    const auto n = pod<std::uint64_t>();
    check(n * sizeof(T));
    std::vector<T> v(n);
    take(v.data(), n * sizeof(T));
    return v;
  }
  Matrix matrix() {
    const auto rows = pod<std::int64_t>(), cols = pod<std::int64_t>();
    if (rows < 0 || cols < 0) throw std::runtime_error("bad shape");
    check(static_cast<std::uint64_t>(rows) * static_cast<std::uint64_t>(cols) * sizeof(float));
    Matrix m(rows, cols);
    take(m.data(), static_cast<std::size_t>(m.size()) * sizeof(float));
    return m;
  }
  bool at_end() const { return pos_ == bytes_.size(); }

 private:
  void check(std::uint64_t n) const {
    if (n > bytes_.size() - pos_) throw std::runtime_error("truncated");
  }
  void take(void* out, std::size_t n) {
    check(n);
    std::memcpy(out, bytes_.data() + pos_, n);
    pos_ += n;
  }
  std::string bytes_;
  std::size_t pos_ = 0;
};

}  // namespace

LayerCheckpoint::LayerCheckpoint(std::filesystem::path dir, std::string key) : dir_(std::move(dir)), key_(std::move(key)) {}

std::filesystem::path LayerCheckpoint::layer_file(int l) const {
  return dir_ / fmt::format("layer-{:05d}.safetensors", l);
}

void LayerCheckpoint::save(int next_layer, const std::vector<LinearRecord>& records, const LayerStreams& streams,
                           const std::vector<LoggedSeries>& series, const std::vector<LoggedTensor>& tensors) const {
  std::filesystem::create_directories(dir_);
  const auto path = dir_ / "state.bin";
  auto tmp = path;
  tmp += fmt::format(".tmp-{}", ::getpid());
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (f == nullptr) throw Error(fmt::format("{}: cannot create: {}", tmp.string(), std::strerror(errno)));
  Out o(f);
  o.raw(kMagic, sizeof kMagic);
  o.str(key_);
  o.pod<std::int32_t>(next_layer);
  o.pod<std::uint64_t>(records.size());
  for (const auto& r : records) {
    o.pod<std::int32_t>(r.layer);
    o.str(r.linear);
    o.pod(r.weight_error);
    o.pod(r.output_error);
    o.pod(r.bits.weights);
    o.pod(r.bits.payload);
    o.pod(r.bits.scales);
    o.pod(r.bits.zeros);
    o.pod(r.bits.masks);
    o.pod(r.bits.paper);
    o.pod(r.seconds);
  }
  o.pod<std::uint64_t>(streams.shapes.size());
  for (std::size_t b = 0; b < streams.shapes.size(); ++b) {
    o.pod<std::int32_t>(streams.shapes[b].batch);
    o.pod<std::int32_t>(streams.shapes[b].seq_len);
    o.matrix(streams.quant.get(b));  // widened: BF16/F16 values round-trip exactly
  }
  o.pod<std::uint64_t>(streams.fp.size());
  for (std::size_t b = 0; b < streams.fp.size(); ++b) o.matrix(streams.fp.get(b));
  o.pod<std::uint64_t>(series.size());
  for (const auto& x : series) {
    o.str(x.path);
    o.vec(x.values);
  }
  o.pod<std::uint64_t>(tensors.size());
  for (const auto& t : tensors) {
    o.str(t.path);
    o.vec(t.shape);
    o.vec(t.data);
  }
  const bool written = o.ok() && std::fflush(f) == 0 && ::fsync(::fileno(f)) == 0;
  const int err = errno;
  std::fclose(f);
  if (!written) {
    std::filesystem::remove(tmp);
    throw Error(fmt::format("{}: writing the layer checkpoint failed: {}", tmp.string(), std::strerror(err)));
  }
  std::filesystem::rename(tmp, path);
  const int dfd = ::open(dir_.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

std::optional<LayerCheckpointState> LayerCheckpoint::load() const {
  std::ifstream f(dir_ / "state.bin", std::ios::binary);
  if (!f) return std::nullopt;
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  try {
    if (bytes.size() < sizeof kMagic || std::memcmp(bytes.data(), kMagic, sizeof kMagic) != 0) return std::nullopt;
    In in(bytes.substr(sizeof kMagic));
    if (in.str() != key_) return std::nullopt;
    LayerCheckpointState s;
    s.next_layer = in.pod<std::int32_t>();
    const auto nrec = in.pod<std::uint64_t>();
    for (std::uint64_t i = 0; i < nrec; ++i) {
      LinearRecord r;
      r.layer = in.pod<std::int32_t>();
      r.linear = in.str();
      r.weight_error = in.pod<double>();
      r.output_error = in.pod<double>();
      r.bits.weights = in.pod<std::int64_t>();
      r.bits.payload = in.pod<double>();
      r.bits.scales = in.pod<double>();
      r.bits.zeros = in.pod<double>();
      r.bits.masks = in.pod<double>();
      r.bits.paper = in.pod<double>();
      r.seconds = in.pod<double>();
      s.records.push_back(std::move(r));
    }
    const auto nb = in.pod<std::uint64_t>();
    for (std::uint64_t b = 0; b < nb; ++b) {
      BatchShape shape;
      shape.batch = in.pod<std::int32_t>();
      shape.seq_len = in.pod<std::int32_t>();
      s.shapes.push_back(shape);
      s.quant.push_back(in.matrix());
    }
    const auto nfp = in.pod<std::uint64_t>();
    for (std::uint64_t b = 0; b < nfp; ++b) s.fp.push_back(in.matrix());
    const auto ns = in.pod<std::uint64_t>();
    for (std::uint64_t i = 0; i < ns; ++i) {
      LoggedSeries x;
      x.path = in.str();
      x.values = in.vec<double>();
      s.series.push_back(std::move(x));
    }
    const auto nt = in.pod<std::uint64_t>();
    for (std::uint64_t i = 0; i < nt; ++i) {
      LoggedTensor t;
      t.path = in.str();
      t.shape = in.vec<std::int64_t>();
      t.data = in.vec<float>();
      s.tensors.push_back(std::move(t));
    }
    if (!in.at_end() || s.next_layer < 1) return std::nullopt;
    for (int l = 0; l < s.next_layer; ++l)
      if (!std::filesystem::exists(layer_file(l))) return std::nullopt;
    return s;
  } catch (const std::exception&) {
    return std::nullopt;  // damaged: start over
  }
}

void LayerCheckpoint::remove() const {
  std::error_code ec;
  std::filesystem::remove_all(dir_, ec);
}

}  // namespace ptqlab
