// Writing result files: validation, the file built in memory, the atomic write to disk
// (results_h5_parts.hpp; the write protocol and thread-safety are described at the top of
// results_h5.cpp).
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <memory>
#include <set>

#include "ptqlab/support/fault.hpp"
#include "results_h5_parts.hpp"

namespace ptqlab::h5io {
namespace {

namespace fs = std::filesystem;

// A name quoted for a message. (fmt rather than "'" + ... + "'": GCC 12 reports a false -Wrestrict
// on that operator+ once one_line is in another translation unit.)
std::string quote(const std::string& s) { return fmt::format("'{}'", one_line(s)); }

// ---------------------------------------------------------------------------------------------
// Validation before anything is written: everything HDF5 cannot store faithfully or that would
// make an unreadable file is rejected with a message naming the field.

void check_text(const std::string& s, const std::string& what) {
  if (s.find('\0') != std::string::npos) throw Failure(what + " contains a NUL byte");
}

void check_attr_name(const std::string& s, const std::string& what) {
  if (s.empty()) throw Failure(what + " is empty");
  check_text(s, what + " " + quote(s));
}

// One HDF5 link name: no '/', not "." or "..".
void check_link_name(const std::string& s, const std::string& what) {
  check_attr_name(s, what);
  if (s.find('/') != std::string::npos) throw Failure(fmt::format("{} {} contains '/'", what, quote(s)));
  if (s == "." || s == "..") throw Failure(fmt::format("{} {} is not a valid name", what, quote(s)));
}

// A relative path of link names: "a/b/c".
void check_object_path(const std::string& p, const std::string& what) {
  const std::string label = fmt::format("{} {}", what, quote(p));
  if (p.empty()) throw Failure(what + " is empty");
  check_text(p, label);
  if (p.front() == '/') throw Failure(label + " starts with '/' (paths are relative)");
  std::size_t start = 0;
  while (true) {
    const auto slash = p.find('/', start);
    const std::string comp = p.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    if (comp.empty()) throw Failure(label + " has an empty component");
    if (comp == "..") throw Failure(label + " has a '..' component");
    if (comp == ".") throw Failure(label + " has a '.' component");
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
}

// Paths must be unique, and none may be a group on the way to another ("a/b" and "a/b/c").
void check_path_set(const std::vector<std::string>& paths, const std::string& what) {
  std::set<std::string> seen;
  for (const auto& p : paths) {
    check_object_path(p, what);
    if (!seen.insert(p).second) throw Failure(fmt::format("duplicate {} {}", what, quote(p)));
  }
  for (const auto& p : paths) {
    for (auto slash = p.find('/'); slash != std::string::npos; slash = p.find('/', slash + 1)) {
      const std::string prefix = p.substr(0, slash);
      if (seen.count(prefix) != 0) throw Failure(fmt::format("{} {} is inside {} {}", what, quote(p), what, quote(prefix)));
    }
  }
}

void validate(const ArmResult& r) {
  check_text(r.arm, "arm");
  check_text(r.experiment, "experiment");
  check_text(r.status, "status");
  check_text(r.failure, "failure");
  check_text(r.config_yaml, "config_yaml");
  check_text(r.config_hash, "config_hash");
  const auto& p = r.provenance;
  check_text(p.ptqlab_version, "provenance ptqlab_version");
  check_text(p.git_revision, "provenance git_revision");
  check_text(p.host, "provenance host");
  check_text(p.start_time, "provenance start_time");
  check_text(p.end_time, "provenance end_time");
  for (const auto& [name, version] : p.library_versions) {
    check_attr_name(name, "library name");
    check_text(version, fmt::format("version of library {}", quote(name)));
  }
  for (const auto& kv : p.seeds) check_attr_name(kv.first, "seed name");

  if (r.calibration_nsamples < 0 || r.calibration_seq_len < 0) {
    throw Failure(fmt::format("negative calibration shape [{}, {}]", r.calibration_nsamples, r.calibration_seq_len));
  }
  const auto expected = static_cast<std::size_t>(r.calibration_nsamples) * static_cast<std::size_t>(r.calibration_seq_len);
  if (!r.calibration_tokens.empty() && r.calibration_tokens.size() != expected) {
    throw Failure(fmt::format("calibration has {} token ids, not nsamples * seq_len = {} * {}",
                              r.calibration_tokens.size(), r.calibration_nsamples, r.calibration_seq_len));
  }

  for (const auto& [evaluator, datasets] : r.metrics) {
    check_link_name(evaluator, "metrics evaluator name");
    for (const auto& [dataset, values] : datasets) {
      check_link_name(dataset, fmt::format("metrics dataset name (evaluator {})", quote(evaluator)));
      for (const auto& kv : values) {
        check_attr_name(kv.first, fmt::format("metric name of {}", quote(evaluator + "/" + dataset)));
        if (kv.first == "protocol")
          throw Failure(fmt::format("metric name 'protocol' of {} is reserved (the protocol id)", quote(evaluator + "/" + dataset)));
      }
    }
  }
  for (const auto& [evaluator, datasets] : r.protocols)
    for (const auto& [dataset, protocol] : datasets) {
      auto e = r.metrics.find(evaluator);
      if (e == r.metrics.end() || e->second.count(dataset) == 0)
        throw Failure(fmt::format("protocol of {} has no metrics group", quote(evaluator + "/" + dataset)));
      check_text(protocol, fmt::format("protocol of {}", quote(evaluator + "/" + dataset)));
    }
  for (const auto& l : r.linears) check_text(l.linear, fmt::format("linear name of layer {}", l.layer));
  if (const auto& a = r.allocation) {
    const std::size_t U = a->units.size(), K = a->candidates.size();
    for (const auto* v : {&a->units, &a->unit_linears, &a->candidates})
      for (const auto& x : *v) check_text(x, "allocation name");
    for (const auto& kv : a->info) check_attr_name(kv.first, "allocation info name");
    if (a->unit_linears.size() != U || a->unit_layer.size() != U || a->unit_weights.size() != U || a->choice.size() != U ||
        a->bits_allin.size() != U * K || a->bits_paper.size() != U * K || a->loss_hess.size() != U * K ||
        a->loss_mse.size() != U * K || a->seconds.size() != U * K ||
        (!a->loss_block.empty() && a->loss_block.size() != U * K))
      throw Failure("allocation table columns do not match its units and candidates");
  }

  std::vector<std::string> paths;
  for (const auto& t : r.tensors) {
    paths.push_back(t.path);
    std::size_t n = 1;
    for (auto d : t.shape) {
      if (d < 0) throw Failure(fmt::format("tensor {} has a negative dimension", quote(t.path)));
      n *= static_cast<std::size_t>(d);
    }
    if (n != t.data.size()) {
      throw Failure(fmt::format("tensor {} has {} values for a shape of {} elements", quote(t.path), t.data.size(), n));
    }
  }
  check_path_set(paths, "tensor path");
  paths.clear();
  for (const auto& s : r.series) paths.push_back(s.path);
  check_path_set(paths, "series path");
}

// ---------------------------------------------------------------------------------------------
// Writing.

// A group being written, with its full name: the attributes and datasets written in it, and its
// closing, are named by it in messages ("attribute 'host' of /provenance").
class Group {
 public:
  // The root group of an open file (closed with the file, not here).
  explicit Group(hid_t file) : name_("/"), loc_(file) {}
  // Creates the group `name` in `parent`.
  Group(const Group& parent, const std::string& name)
      : name_(parent.path(name)), id_(create_group(parent, name, name_)), loc_(id_.get()) {}
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;

  operator hid_t() const { return loc_; }  // NOLINT: reads like the C API
  // The full name of `name` in this group.
  std::string path(const std::string& name) const { return name_ == "/" ? "/" + name : name_ + "/" + name; }

  void attr_string(const std::string& name, const std::string& v) const { h5io::attr_string(loc_, name_, name, v); }
  void attr_i32(const std::string& name, std::int32_t v) const { h5io::attr_i32(loc_, name_, name, v); }
  void attr_i64(const std::string& name, std::int64_t v) const { h5io::attr_i64(loc_, name_, name, v); }
  void attr_f64(const std::string& name, double v) const { h5io::attr_f64(loc_, name_, name, v); }

  void close() { id_.close("closing " + name_); }

 private:
  std::string name_;
  Id id_;  // empty for the root group
  hid_t loc_;
};

// A dataset `name` of `g` holding `v`, closed at once.
template <class T>
void write_vector(const Group& g, const std::string& name, const std::vector<T>& v, const std::vector<hsize_t>& dims,
                  hid_t file_type, hid_t mem_type) {
  const std::string full = g.path(name);
  Id d = write_dataset(g, name, full, file_type, mem_type, dims, v.data());
  d.close("closing " + full);
}

// A column of /linears: one value per row.
template <class T, class F>
void write_column(const Group& g, const std::string& name, const std::vector<LinearRecord>& rows, hid_t file_type,
                  hid_t mem_type, F get) {
  std::vector<T> v;
  v.reserve(rows.size());
  for (const auto& r : rows) v.push_back(get(r));
  write_vector(g, name, v, {rows.size()}, file_type, mem_type);
}

// A dataset under /tensors or /series; path components become groups (created on the way).
template <class T>
void write_logged(const Group& root, const std::string& path, std::int64_t index, const std::vector<hsize_t>& dims,
                  const std::vector<T>& data, hid_t file_type, hid_t mem_type) {
  Id lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose, "creating a link property list");
  check(H5Pset_create_intermediate_group(lcpl, 1), "setting intermediate group creation");
  const std::string full = root.path(path);
  Id d = write_dataset(root, path, full, file_type, mem_type, dims, data.data(), lcpl);
  attr_i64(d, full, "index", index);
  d.close("closing " + full);
}

// /allocation (docs/results-schema.md): the certificate as attributes, the table as [units,
// candidates] datasets, units and candidates as string columns.
void write_allocation(const Group& root, const AllocationRecord& a) {
  Group g(root, "allocation");
  g.attr_string("allocator", a.allocator);
  g.attr_string("status", a.status);
  g.attr_string("metric", a.metric);
  g.attr_string("unit", a.unit);
  g.attr_string("loss", a.loss);
  g.attr_string("table_key", a.table_key);
  g.attr_i32("table_from_cache", a.table_from_cache ? 1 : 0);
  g.attr_f64("budget", a.budget);
  g.attr_i64("budget_bits", a.budget_bits);
  g.attr_i64("weights", a.weights);
  g.attr_i64("solver_bits", a.solver_bits);
  g.attr_f64("solver_loss", a.solver_loss);
  g.attr_f64("lower_bound", a.lower_bound);
  g.attr_f64("solve_seconds", a.solve_seconds);
  g.attr_f64("measure_seconds", a.measure_seconds);
  g.attr_f64("ledger_allin_bits", a.ledger_allin_bits);
  g.attr_f64("ledger_paper_bits", a.ledger_paper_bits);
  {
    Group info(g, "info");
    for (const auto& [k, v] : a.info) info.attr_f64(k, v);
    info.close();
  }
  auto strings = [&](const char* name, const std::vector<std::string>& v) {
    std::vector<const char*> p;
    for (const auto& x : v) p.push_back(x.c_str());
    write_string_column(g, name, g.path(name), p);
  };
  strings("units", a.units);
  strings("unit_linears", a.unit_linears);
  strings("candidates", a.candidates);
  const hsize_t U = a.units.size(), K = a.candidates.size();
  write_vector(g, "unit_layer", a.unit_layer, {U}, H5T_STD_I32LE, H5T_NATIVE_INT32);
  write_vector(g, "unit_weights", a.unit_weights, {U}, H5T_STD_I64LE, H5T_NATIVE_INT64);
  write_vector(g, "choice", a.choice, {U}, H5T_STD_I32LE, H5T_NATIVE_INT32);
  write_vector(g, "bits_allin", a.bits_allin, {U, K}, H5T_STD_I64LE, H5T_NATIVE_INT64);
  write_vector(g, "bits_paper", a.bits_paper, {U, K}, H5T_STD_I64LE, H5T_NATIVE_INT64);
  write_vector(g, "loss_hess", a.loss_hess, {U, K}, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE);
  write_vector(g, "loss_mse", a.loss_mse, {U, K}, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE);
  write_vector(g, "seconds", a.seconds, {U, K}, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE);
  if (!a.loss_block.empty())  // layer units only
    write_vector(g, "loss_block", a.loss_block, {U, K}, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE);
  g.close();
}

void write_contents(hid_t file, const ArmResult& r) {
  const Group root(file);
  root.attr_i32("schema_version", kResultSchemaVersion);
  root.attr_string("arm", r.arm);
  root.attr_string("experiment", r.experiment);
  root.attr_string("status", r.status);
  root.attr_string("failure", r.failure);
  root.attr_string("config_hash", r.config_hash);
  root.attr_f64("seconds", r.seconds);

  {
    Id t = string_type();
    const char* p = r.config_yaml.c_str();
    Id d = write_dataset(file, "config", "/config", t, t, {}, &p);
    d.close("closing /config");
  }

  {
    const auto& p = r.provenance;
    Group g(root, "provenance");
    g.attr_string("ptqlab_version", p.ptqlab_version);
    g.attr_string("git_revision", p.git_revision);
    g.attr_string("host", p.host);
    g.attr_string("start_time", p.start_time);
    g.attr_string("end_time", p.end_time);
    Group libs(g, "libraries");
    for (const auto& [name, version] : p.library_versions) libs.attr_string(name, version);
    libs.close();
    Group seeds(g, "seeds");
    for (const auto& [name, seed] : p.seeds) seeds.attr_i64(name, seed);
    seeds.close();
    g.close();
  }

  {
    Group g(root, "calibration");
    std::vector<hsize_t> dims{0, 0};
    if (!r.calibration_tokens.empty()) {
      dims = {static_cast<hsize_t>(r.calibration_nsamples), static_cast<hsize_t>(r.calibration_seq_len)};
    }
    const std::string full = g.path("token_ids");
    Id d = write_dataset(g, "token_ids", full, H5T_STD_I32LE, H5T_NATIVE_INT32, dims, r.calibration_tokens.data());
    attr_i32(d, full, "nsamples", r.calibration_nsamples);
    attr_i32(d, full, "seq_len", r.calibration_seq_len);
    d.close("closing " + full);
    g.close();
  }

  {
    Group g(root, "metrics");
    for (const auto& [evaluator, datasets] : r.metrics) {
      Group ge(g, evaluator);
      for (const auto& [dataset, values] : datasets) {
        Group gd(ge, dataset);
        for (const auto& [metric, value] : values) gd.attr_f64(metric, value);
        if (auto pe = r.protocols.find(evaluator); pe != r.protocols.end())
          if (auto pd = pe->second.find(dataset); pd != pe->second.end())
            gd.attr_string("protocol", pd->second);
        gd.close();
      }
      ge.close();
    }
    g.close();
  }

  {
    const auto& rows = r.linears;
    Group g(root, "linears");
    write_column<std::int32_t>(g, "layer", rows, H5T_STD_I32LE, H5T_NATIVE_INT32,
                               [](const LinearRecord& x) { return static_cast<std::int32_t>(x.layer); });
    std::vector<const char*> names;
    names.reserve(rows.size());
    for (const auto& x : rows) names.push_back(x.linear.c_str());
    write_string_column(g, "linear", g.path("linear"), names);
    const hid_t f64 = H5T_IEEE_F64LE, nd = H5T_NATIVE_DOUBLE;
    write_column<double>(g, "weight_error", rows, f64, nd, [](const LinearRecord& x) { return x.weight_error; });
    write_column<double>(g, "output_error", rows, f64, nd, [](const LinearRecord& x) { return x.output_error; });
    write_column<double>(g, "seconds", rows, f64, nd, [](const LinearRecord& x) { return x.seconds; });
    write_column<std::int64_t>(g, "bits_weights", rows, H5T_STD_I64LE, H5T_NATIVE_INT64,
                               [](const LinearRecord& x) { return x.bits.weights; });
    write_column<double>(g, "bits_payload", rows, f64, nd, [](const LinearRecord& x) { return x.bits.payload; });
    write_column<double>(g, "bits_scales", rows, f64, nd, [](const LinearRecord& x) { return x.bits.scales; });
    write_column<double>(g, "bits_zeros", rows, f64, nd, [](const LinearRecord& x) { return x.bits.zeros; });
    write_column<double>(g, "bits_masks", rows, f64, nd, [](const LinearRecord& x) { return x.bits.masks; });
    write_column<double>(g, "bits_paper", rows, f64, nd, [](const LinearRecord& x) { return x.bits.paper; });
    g.close();
  }

  {
    const auto& b = r.total_bits;
    Group g(root, "bits");
    g.attr_i64("weights", b.weights);
    g.attr_f64("payload", b.payload);
    g.attr_f64("scales", b.scales);
    g.attr_f64("zeros", b.zeros);
    g.attr_f64("masks", b.masks);
    g.attr_f64("paper", b.paper);
    g.attr_f64("all_in", b.all_in());
    g.attr_f64("all_in_per_weight", b.all_in_per_weight());
    g.attr_f64("paper_per_weight", b.paper_per_weight());
    g.close();
  }

  if (r.allocation) write_allocation(root, *r.allocation);

  {
    Group g(root, "tensors");
    for (std::size_t i = 0; i < r.tensors.size(); ++i) {
      const auto& t = r.tensors[i];
      std::vector<hsize_t> dims(t.shape.begin(), t.shape.end());
      write_logged(g, t.path, static_cast<std::int64_t>(i), dims, t.data, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT);
    }
    g.close();
  }

  {
    Group g(root, "series");
    for (std::size_t i = 0; i < r.series.size(); ++i) {
      const auto& s = r.series[i];
      write_logged(g, s.path, static_cast<std::int64_t>(i), {s.values.size()}, s.values, H5T_IEEE_F64LE,
                   H5T_NATIVE_DOUBLE);
    }
    g.close();
  }
}

// ---------------------------------------------------------------------------------------------
// The file image and the disk.
//
// HDF5 never writes to the disk itself: the file is built in memory (the "core" driver without a
// backing store) and its image is written here with plain write(2) calls. A disk-full error is then
// an ordinary failed write() of ours, with nothing left half-open inside libhdf5. (With the sec2
// driver, a failed flush makes H5Fclose fail and leaves a zombie file in the library that crashes
// the process at exit.) The cost is transient memory: the image, about the size of the file, exists
// next to the ArmResult while it is written.

struct Image {
  std::unique_ptr<char[]> bytes;
  std::size_t size = 0;
};

// A size hint for the in-memory file, so that its buffer rarely grows.
std::size_t estimated_size(const ArmResult& r) {
  std::size_t n = 1 << 16;
  n += r.config_yaml.size() + r.calibration_tokens.size() * 4 + r.linears.size() * 160;
  for (const auto& t : r.tensors) n += t.data.size() * 4 + 1024;
  for (const auto& s : r.series) n += s.values.size() * 8 + 1024;
  const std::size_t mib = std::size_t{1} << 20;
  return (n + mib - 1) / mib * mib;
}

Image build_image(const ArmResult& r, const std::string& name) {
  Hdf5Lock lock;
  Id fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose, "creating a file access property list");
  check(H5Pset_fapl_core(fapl, estimated_size(r), 0), "selecting the in-memory file driver");
  // SEMI: closing the file fails (instead of silently deferring) if an object were still open.
  check(H5Pset_fclose_degree(fapl, H5F_CLOSE_SEMI), "setting the file close degree");
  Id file(H5Fcreate(name.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl), H5Fclose, "creating the in-memory file");
  write_contents(file, r);
  attr_i32(file, "/", "complete", 1);  // the very last thing written: readers require it
  check(H5Fflush(file, H5F_SCOPE_GLOBAL), "flushing the in-memory file");
  const ssize_t size = H5Fget_file_image(file, nullptr, 0);
  if (size <= 0) fail_h5("getting the size of the file image");
  Image image;
  image.size = static_cast<std::size_t>(size);
  image.bytes.reset(new char[image.size]);  // not zero-filled: every byte is copied next
  if (H5Fget_file_image(file, image.bytes.get(), image.size) != size) fail_h5("copying the file image");
  file.close("closing the in-memory file");
  return image;
}

std::string errno_text(int err) { return std::strerror(err); }

void write_all(int fd, const char* data, std::size_t size, const fs::path& tmp) {
  std::size_t done = 0;
  while (done < size) {
    const std::size_t chunk = std::min<std::size_t>(size - done, std::size_t{1} << 30);
    const ssize_t n = ::write(fd, data + done, chunk);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw Failure(fmt::format("writing {}: {}", tmp.string(), errno_text(errno)));
    if (n == 0) throw Failure(fmt::format("writing {}: no progress", tmp.string()));
    done += static_cast<std::size_t>(n);
  }
}

void fsync_directory(const fs::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) throw Failure(fmt::format("opening directory {} to fsync it: {}", dir.string(), errno_text(errno)));
  if (::fsync(fd) != 0) {
    const int err = errno;
    ::close(fd);
    throw Failure(fmt::format("fsync of directory {}: {}", dir.string(), errno_text(err)));
  }
  ::close(fd);
}

std::atomic<std::uint64_t> temp_counter{0};

}  // namespace

void write_result_file(const fs::path& path, const ArmResult& r) {
  validate(r);
  if (!path.has_filename()) throw Failure("the path has no file name");
  const fs::path dir = path.has_parent_path() ? path.parent_path() : fs::path(".");
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw Failure(fmt::format("no such directory {}", dir.string()));

  Image image = build_image(r, path.string());

  // A fresh temporary file (O_EXCL: never someone else's, e.g. a leftover of a killed run).
  fs::path tmp;
  int fd = -1;
  for (int attempt = 0; fd < 0; ++attempt) {
    tmp = dir / fmt::format(".{}.tmp-{}-{}", path.filename().string(), static_cast<long>(::getpid()),
                            temp_counter.fetch_add(1));
    fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd < 0 && (errno != EEXIST || attempt >= 100)) {
      throw Failure(fmt::format("creating temporary file {}: {}", tmp.string(), errno_text(errno)));
    }
  }
  try {
    try {
      write_all(fd, image.bytes.get(), image.size, tmp);
      if (::fsync(fd) != 0) throw Failure(fmt::format("fsync of {}: {}", tmp.string(), errno_text(errno)));
    } catch (...) {
      ::close(fd);
      throw;
    }
    if (::close(fd) != 0) throw Failure(fmt::format("closing {}: {}", tmp.string(), errno_text(errno)));
    image = Image{};  // free the memory before the rename
    fault_point("result-before-rename");
    if (::rename(tmp.c_str(), path.c_str()) != 0) {
      throw Failure(fmt::format("renaming {} to {}: {}", tmp.string(), path.string(), errno_text(errno)));
    }
  } catch (...) {
    ::unlink(tmp.c_str());
    throw;
  }
  try {
    fsync_directory(dir);
  } catch (...) {
    // The rename may not be durable; keep the promise that a failed write leaves nothing.
    ::unlink(path.c_str());
    throw;
  }
}

}  // namespace ptqlab::h5io
