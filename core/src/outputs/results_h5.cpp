// HDF5 result files (docs/results-schema.md).
//
// Writing: everything is validated first, then the file is built in memory with every HDF5 return
// code checked and the root attribute complete=1 written last; its image is written to
// ".<name>.tmp-<pid>-<n>" in the target directory, fsync'ed, renamed onto the target, and the
// directory is fsync'ed. Any failure removes the temporary file, so a file at the target path only
// ever exists complete.
//
// libhdf5 as Debian ships it (serial) is not thread-safe: every sequence of HDF5 calls in this file
// runs under one process-wide mutex (Hdf5Lock).
#include "ptqlab/outputs/results.hpp"

#include <fcntl.h>
#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <limits>
#include <mutex>
#include <set>
#include <stdexcept>
#include <thread>
#include <utility>

#include <fmt/format.h>

#include "ptqlab/support/error.hpp"
#include "ptqlab/support/fault.hpp"

namespace ptqlab {
namespace {

namespace fs = std::filesystem;

// ---------------------------------------------------------------------------------------------
// The process-wide HDF5 lock.

std::mutex& hdf5_mutex() {
  static std::mutex m;
  return m;
}

class Hdf5Lock {
 public:
  Hdf5Lock() : lock_(hdf5_mutex()) {
    // Errors are turned into exceptions; the library must not print its stack on stderr.
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }

 private:
  std::unique_lock<std::mutex> lock_;
};

// A failure inside this file; the public functions turn it into a ptqlab::Error naming the file.
class Failure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Error messages are one line: control characters (a NUL or a newline in a name) are escaped.
std::string one_line(const std::string& s) {
  std::string out;
  out.reserve(s.size());
  for (const char c : s) {
    const auto u = static_cast<unsigned char>(c);
    if (u >= 0x20 && u != 0x7f) {
      out.push_back(c);
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\0') {
      out += "\\0";
    } else {
      out += fmt::format("\\x{:02x}", u);
    }
  }
  return out;
}

// A name quoted for a message.
std::string quote(const std::string& s) { return "'" + one_line(s) + "'"; }

// ---------------------------------------------------------------------------------------------
// HDF5 errors.

herr_t collect_error(unsigned, const H5E_error2_t* err, void* data) {
  if (err != nullptr && err->desc != nullptr) static_cast<std::vector<std::string>*>(data)->emplace_back(err->desc);
  return 0;
}

// The most specific message on the HDF5 error stack (then cleared). A failed system call is
// reported by the library as "... errno = 28, error message = 'No space left on device', ...":
// the system's message is what a user needs, so it is extracted.
std::string hdf5_detail() {
  std::vector<std::string> descs;
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, collect_error, &descs);
  H5Eclear2(H5E_DEFAULT);
  for (const auto& d : descs) {
    const std::string key = "error message = '";
    const auto at = d.find(key);
    if (at == std::string::npos) continue;
    const auto end = d.find('\'', at + key.size());
    if (end != std::string::npos && end > at + key.size()) return d.substr(at + key.size(), end - at - key.size());
  }
  if (descs.empty()) return "HDF5 error";
  std::string out = descs.front();
  // Add the outermost (API-level) message when it says something else.
  if (descs.size() > 1 && descs.back() != descs.front()) out += " (" + descs.back() + ")";
  return out;
}

[[noreturn]] void fail_h5(const std::string& what) { throw Failure(what + ": " + hdf5_detail()); }

void check(herr_t rc, const std::string& what) {
  if (rc < 0) fail_h5(what);
}

// An HDF5 identifier closed on destruction, errors ignored (objects opened for reading, and
// unwinding after a failure). Objects that were written are closed with close(), which checks.
class Id {
 public:
  using Closer = herr_t (*)(hid_t);
  Id() = default;
  Id(hid_t id, Closer closer, const std::string& what) : id_(id), closer_(closer) {
    if (id < 0) fail_h5(what);
  }
  Id(Id&& o) noexcept : id_(std::exchange(o.id_, -1)), closer_(o.closer_) {}
  Id& operator=(Id&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = std::exchange(o.id_, -1);
      closer_ = o.closer_;
    }
    return *this;
  }
  Id(const Id&) = delete;
  Id& operator=(const Id&) = delete;
  ~Id() { reset(); }

  hid_t get() const { return id_; }
  operator hid_t() const { return id_; }  // NOLINT: reads like the C API
  void close(const std::string& what) {
    const hid_t id = std::exchange(id_, -1);
    if (id >= 0) check(closer_(id), what);
  }

 private:
  void reset() {
    if (id_ >= 0) closer_(std::exchange(id_, -1));
  }
  hid_t id_ = -1;
  Closer closer_ = nullptr;
};

// ---------------------------------------------------------------------------------------------
// Types and dataspaces.

Id string_type() {
  Id t(H5Tcopy(H5T_C_S1), H5Tclose, "copying the string type");
  check(H5Tset_size(t, H5T_VARIABLE), "making a variable-length string type");
  check(H5Tset_cset(t, H5T_CSET_UTF8), "setting UTF-8 on the string type");
  return t;
}

// Rank 0 is a scalar dataspace.
Id make_space(const std::vector<hsize_t>& dims) {
  if (dims.empty()) return Id(H5Screate(H5S_SCALAR), H5Sclose, "creating a scalar dataspace");
  return Id(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose, "creating a dataspace");
}

hsize_t element_count(const std::vector<hsize_t>& dims) {
  hsize_t n = 1;
  for (auto d : dims) n *= d;
  return n;
}

// ---------------------------------------------------------------------------------------------
// Writing.

void write_attr(hid_t loc, const std::string& loc_name, const std::string& name, hid_t file_type, hid_t mem_type,
                const void* buf) {
  const std::string what = fmt::format("attribute '{}' of {}", name, loc_name);
  Id space = make_space({});
  Id a(H5Acreate2(loc, name.c_str(), file_type, space, H5P_DEFAULT, H5P_DEFAULT), H5Aclose, "creating " + what);
  check(H5Awrite(a, mem_type, buf), "writing " + what);
  a.close("closing " + what);
}

void attr_string(hid_t loc, const std::string& loc_name, const std::string& name, const std::string& value) {
  Id t = string_type();
  const char* p = value.c_str();
  write_attr(loc, loc_name, name, t, t, &p);
}
void attr_i32(hid_t loc, const std::string& loc_name, const std::string& name, std::int32_t v) {
  write_attr(loc, loc_name, name, H5T_STD_I32LE, H5T_NATIVE_INT32, &v);
}
void attr_i64(hid_t loc, const std::string& loc_name, const std::string& name, std::int64_t v) {
  write_attr(loc, loc_name, name, H5T_STD_I64LE, H5T_NATIVE_INT64, &v);
}
void attr_f64(hid_t loc, const std::string& loc_name, const std::string& name, double v) {
  write_attr(loc, loc_name, name, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &v);
}

Id create_group(hid_t loc, const std::string& name, const std::string& full_name) {
  return Id(H5Gcreate2(loc, name.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), H5Gclose,
            "creating group " + full_name);
}

// Creates and fills a dataset (contiguous layout); returned open so that attributes can be added.
// Zero-element datasets are created but not written.
Id write_dataset(hid_t loc, const std::string& name, const std::string& full_name, hid_t file_type, hid_t mem_type,
                 const std::vector<hsize_t>& dims, const void* buf, hid_t lcpl = H5P_DEFAULT) {
  Id space = make_space(dims);
  Id d(H5Dcreate2(loc, name.c_str(), file_type, space, lcpl, H5P_DEFAULT, H5P_DEFAULT), H5Dclose,
       "creating dataset " + full_name);
  if (element_count(dims) > 0) check(H5Dwrite(d, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf), "writing " + full_name);
  return d;
}

void write_string_column(hid_t loc, const std::string& name, const std::string& full_name,
                         const std::vector<const char*>& values) {
  Id t = string_type();
  Id d = write_dataset(loc, name, full_name, t, t, {values.size()}, values.data());
  d.close("closing " + full_name);
}

template <class T, class F>
void write_column(hid_t loc, const std::string& name, const std::vector<LinearRecord>& rows, hid_t file_type,
                  hid_t mem_type, F get) {
  std::vector<T> v;
  v.reserve(rows.size());
  for (const auto& r : rows) v.push_back(get(r));
  const std::string full = "/linears/" + name;
  Id d = write_dataset(loc, name, full, file_type, mem_type, {rows.size()}, v.data());
  d.close("closing " + full);
}

// A dataset under /tensors or /series; path components become groups (created on the way).
template <class T>
void write_logged(hid_t root, const std::string& root_name, const std::string& path, std::int64_t index,
                  const std::vector<hsize_t>& dims, const std::vector<T>& data, hid_t file_type, hid_t mem_type) {
  Id lcpl(H5Pcreate(H5P_LINK_CREATE), H5Pclose, "creating a link property list");
  check(H5Pset_create_intermediate_group(lcpl, 1), "setting intermediate group creation");
  const std::string full = root_name + "/" + path;
  Id d = write_dataset(root, path, full, file_type, mem_type, dims, data.data(), lcpl);
  attr_i64(d, full, "index", index);
  d.close("closing " + full);
}

// /allocation (docs/results-schema.md): the certificate as attributes, the table as [units,
// candidates] datasets, units and candidates as string columns.
template <class T>
void write_vector(hid_t g, const std::string& name, const std::vector<T>& v, const std::vector<hsize_t>& dims,
                  hid_t file_type, hid_t mem_type) {
  const std::string full = "/allocation/" + name;
  Id d = write_dataset(g, name, full, file_type, mem_type, dims, v.data());
  d.close("closing " + full);
}

void write_allocation(hid_t file, const AllocationRecord& a) {
  Id g = create_group(file, "allocation", "/allocation");
  const std::string n = "/allocation";
  attr_string(g, n, "allocator", a.allocator);
  attr_string(g, n, "status", a.status);
  attr_string(g, n, "metric", a.metric);
  attr_string(g, n, "unit", a.unit);
  attr_string(g, n, "loss", a.loss);
  attr_string(g, n, "table_key", a.table_key);
  attr_i32(g, n, "table_from_cache", a.table_from_cache ? 1 : 0);
  attr_f64(g, n, "budget", a.budget);
  attr_i64(g, n, "budget_bits", a.budget_bits);
  attr_i64(g, n, "weights", a.weights);
  attr_i64(g, n, "solver_bits", a.solver_bits);
  attr_f64(g, n, "solver_loss", a.solver_loss);
  attr_f64(g, n, "lower_bound", a.lower_bound);
  attr_f64(g, n, "solve_seconds", a.solve_seconds);
  attr_f64(g, n, "measure_seconds", a.measure_seconds);
  attr_f64(g, n, "ledger_allin_bits", a.ledger_allin_bits);
  attr_f64(g, n, "ledger_paper_bits", a.ledger_paper_bits);
  {
    Id info = create_group(g, "info", "/allocation/info");
    for (const auto& [k, v] : a.info) attr_f64(info, "/allocation/info", k, v);
    info.close("closing /allocation/info");
  }
  auto strings = [&](const char* name, const std::vector<std::string>& v) {
    std::vector<const char*> p;
    for (const auto& x : v) p.push_back(x.c_str());
    write_string_column(g, name, n + "/" + name, p);
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
  g.close("closing /allocation");
}

void write_contents(hid_t file, const ArmResult& r) {
  attr_i32(file, "/", "schema_version", kResultSchemaVersion);
  attr_string(file, "/", "arm", r.arm);
  attr_string(file, "/", "experiment", r.experiment);
  attr_string(file, "/", "status", r.status);
  attr_string(file, "/", "failure", r.failure);
  attr_string(file, "/", "config_hash", r.config_hash);
  attr_f64(file, "/", "seconds", r.seconds);

  {
    Id t = string_type();
    const char* p = r.config_yaml.c_str();
    Id d = write_dataset(file, "config", "/config", t, t, {}, &p);
    d.close("closing /config");
  }

  {
    const auto& p = r.provenance;
    Id g = create_group(file, "provenance", "/provenance");
    attr_string(g, "/provenance", "ptqlab_version", p.ptqlab_version);
    attr_string(g, "/provenance", "git_revision", p.git_revision);
    attr_string(g, "/provenance", "host", p.host);
    attr_string(g, "/provenance", "start_time", p.start_time);
    attr_string(g, "/provenance", "end_time", p.end_time);
    Id libs = create_group(g, "libraries", "/provenance/libraries");
    for (const auto& [name, version] : p.library_versions) attr_string(libs, "/provenance/libraries", name, version);
    libs.close("closing /provenance/libraries");
    Id seeds = create_group(g, "seeds", "/provenance/seeds");
    for (const auto& [name, seed] : p.seeds) attr_i64(seeds, "/provenance/seeds", name, seed);
    seeds.close("closing /provenance/seeds");
    g.close("closing /provenance");
  }

  {
    Id g = create_group(file, "calibration", "/calibration");
    std::vector<hsize_t> dims{0, 0};
    if (!r.calibration_tokens.empty()) {
      dims = {static_cast<hsize_t>(r.calibration_nsamples), static_cast<hsize_t>(r.calibration_seq_len)};
    }
    const std::string full = "/calibration/token_ids";
    Id d = write_dataset(g, "token_ids", full, H5T_STD_I32LE, H5T_NATIVE_INT32, dims, r.calibration_tokens.data());
    attr_i32(d, full, "nsamples", r.calibration_nsamples);
    attr_i32(d, full, "seq_len", r.calibration_seq_len);
    d.close("closing " + full);
    g.close("closing /calibration");
  }

  {
    Id g = create_group(file, "metrics", "/metrics");
    for (const auto& [evaluator, datasets] : r.metrics) {
      const std::string eval_name = "/metrics/" + evaluator;
      Id ge = create_group(g, evaluator, eval_name);
      for (const auto& [dataset, values] : datasets) {
        const std::string ds_name = eval_name + "/" + dataset;
        Id gd = create_group(ge, dataset, ds_name);
        for (const auto& [metric, value] : values) attr_f64(gd, ds_name, metric, value);
        if (auto pe = r.protocols.find(evaluator); pe != r.protocols.end())
          if (auto pd = pe->second.find(dataset); pd != pe->second.end())
            attr_string(gd, ds_name, "protocol", pd->second);
        gd.close("closing " + ds_name);
      }
      ge.close("closing " + eval_name);
    }
    g.close("closing /metrics");
  }

  {
    const auto& rows = r.linears;
    Id g = create_group(file, "linears", "/linears");
    write_column<std::int32_t>(g, "layer", rows, H5T_STD_I32LE, H5T_NATIVE_INT32,
                               [](const LinearRecord& x) { return static_cast<std::int32_t>(x.layer); });
    std::vector<const char*> names;
    names.reserve(rows.size());
    for (const auto& x : rows) names.push_back(x.linear.c_str());
    write_string_column(g, "linear", "/linears/linear", names);
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
    g.close("closing /linears");
  }

  {
    const auto& b = r.total_bits;
    Id g = create_group(file, "bits", "/bits");
    attr_i64(g, "/bits", "weights", b.weights);
    attr_f64(g, "/bits", "payload", b.payload);
    attr_f64(g, "/bits", "scales", b.scales);
    attr_f64(g, "/bits", "zeros", b.zeros);
    attr_f64(g, "/bits", "masks", b.masks);
    attr_f64(g, "/bits", "paper", b.paper);
    attr_f64(g, "/bits", "all_in", b.all_in());
    attr_f64(g, "/bits", "all_in_per_weight", b.all_in_per_weight());
    attr_f64(g, "/bits", "paper_per_weight", b.paper_per_weight());
    g.close("closing /bits");
  }

  if (r.allocation) write_allocation(file, *r.allocation);

  {
    Id g = create_group(file, "tensors", "/tensors");
    for (std::size_t i = 0; i < r.tensors.size(); ++i) {
      const auto& t = r.tensors[i];
      std::vector<hsize_t> dims(t.shape.begin(), t.shape.end());
      write_logged(g, "/tensors", t.path, static_cast<std::int64_t>(i), dims, t.data, H5T_IEEE_F32LE, H5T_NATIVE_FLOAT);
    }
    g.close("closing /tensors");
  }

  {
    Id g = create_group(file, "series", "/series");
    for (std::size_t i = 0; i < r.series.size(); ++i) {
      const auto& s = r.series[i];
      write_logged(g, "/series", s.path, static_cast<std::int64_t>(i), {s.values.size()}, s.values, H5T_IEEE_F64LE,
                   H5T_NATIVE_DOUBLE);
    }
    g.close("closing /series");
  }
}

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

void write_impl(const fs::path& path, const ArmResult& r) {
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

// ---------------------------------------------------------------------------------------------
// Reading.

bool has_attr(hid_t loc, const std::string& loc_name, const std::string& name) {
  const htri_t e = H5Aexists(loc, name.c_str());
  if (e < 0) fail_h5(fmt::format("looking up attribute '{}' of {}", name, loc_name));
  return e > 0;
}

Id open_attr(hid_t loc, const std::string& loc_name, const std::string& name) {
  if (!has_attr(loc, loc_name, name)) throw Failure(fmt::format("{} has no attribute '{}'", loc_name, name));
  return Id(H5Aopen(loc, name.c_str(), H5P_DEFAULT), H5Aclose, fmt::format("opening attribute '{}' of {}", name, loc_name));
}

// Reads `n` strings (variable-length or fixed-length) from an attribute or dataset.
template <class ReadFn>
std::vector<std::string> read_strings(hid_t file_type, hid_t space, std::size_t n, const std::string& what,
                                      ReadFn read) {
  if (H5Tget_class(file_type) != H5T_STRING) throw Failure(what + " is not a string");
  std::vector<std::string> out(n);
  const htri_t variable = H5Tis_variable_str(file_type);
  if (variable < 0) fail_h5("inspecting the type of " + what);
  Id mem(H5Tget_native_type(file_type, H5T_DIR_DEFAULT), H5Tclose, "making a memory type for " + what);
  if (n == 0) return out;
  if (variable > 0) {
    std::vector<char*> ptrs(n, nullptr);
    check(read(mem.get(), static_cast<void*>(ptrs.data())), "reading " + what);
    for (std::size_t i = 0; i < n; ++i) {
      if (ptrs[i] != nullptr) out[i] = ptrs[i];
    }
#if H5_VERSION_GE(1, 12, 0)
    check(H5Treclaim(mem, space, H5P_DEFAULT, ptrs.data()), "releasing " + what);
#else
    check(H5Dvlen_reclaim(mem, space, H5P_DEFAULT, ptrs.data()), "releasing " + what);
#endif
  } else {
    const std::size_t size = H5Tget_size(mem);
    if (size == 0) fail_h5("inspecting the size of " + what);
    std::vector<char> buf(size * n);
    check(read(mem.get(), static_cast<void*>(buf.data())), "reading " + what);
    for (std::size_t i = 0; i < n; ++i) {
      const char* s = buf.data() + i * size;
      out[i] = std::string(s, strnlen(s, size));
    }
  }
  return out;
}

void require_scalar(hid_t space, const std::string& what) {
  const hssize_t n = H5Sget_simple_extent_npoints(space);
  if (n < 0) fail_h5("inspecting the shape of " + what);
  if (n != 1) throw Failure(what + " is not a single value");
}

std::string read_attr_string(hid_t loc, const std::string& loc_name, const std::string& name) {
  const std::string what = fmt::format("attribute '{}' of {}", name, loc_name);
  Id a = open_attr(loc, loc_name, name);
  Id type(H5Aget_type(a), H5Tclose, "getting the type of " + what);
  Id space(H5Aget_space(a), H5Sclose, "getting the shape of " + what);
  require_scalar(space, what);
  return read_strings(type, space, 1, what, [&](hid_t mem, void* buf) { return H5Aread(a, mem, buf); }).front();
}

template <class T>
T read_attr_number(hid_t loc, const std::string& loc_name, const std::string& name, hid_t mem_type) {
  const std::string what = fmt::format("attribute '{}' of {}", name, loc_name);
  Id a = open_attr(loc, loc_name, name);
  Id type(H5Aget_type(a), H5Tclose, "getting the type of " + what);
  const H5T_class_t cls = H5Tget_class(type);
  if (cls != H5T_INTEGER && cls != H5T_FLOAT) throw Failure(what + " is not a number");
  Id space(H5Aget_space(a), H5Sclose, "getting the shape of " + what);
  require_scalar(space, what);
  T v{};
  check(H5Aread(a, mem_type, &v), "reading " + what);
  return v;
}
double attr_double(hid_t loc, const std::string& loc_name, const std::string& name) {
  return read_attr_number<double>(loc, loc_name, name, H5T_NATIVE_DOUBLE);
}
std::int64_t attr_int64(hid_t loc, const std::string& loc_name, const std::string& name) {
  return read_attr_number<std::int64_t>(loc, loc_name, name, H5T_NATIVE_INT64);
}

herr_t collect_attr_name(hid_t, const char* name, const H5A_info_t*, void* data) {
  static_cast<std::vector<std::string>*>(data)->emplace_back(name);
  return 0;
}

std::vector<std::string> attr_names(hid_t loc, const std::string& loc_name) {
  std::vector<std::string> names;
  hsize_t idx = 0;
  check(H5Aiterate2(loc, H5_INDEX_NAME, H5_ITER_INC, &idx, collect_attr_name, &names),
        "listing the attributes of " + loc_name);
  return names;
}

std::vector<std::string> link_names(hid_t group, const std::string& group_name) {
  H5G_info_t info;
  check(H5Gget_info(group, &info), "listing " + group_name);
  std::vector<std::string> names;
  for (hsize_t i = 0; i < info.nlinks; ++i) {
    const ssize_t len = H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, nullptr, 0, H5P_DEFAULT);
    if (len < 0) fail_h5("listing " + group_name);
    std::string name(static_cast<std::size_t>(len) + 1, '\0');
    if (H5Lget_name_by_idx(group, ".", H5_INDEX_NAME, H5_ITER_INC, i, name.data(), name.size(), H5P_DEFAULT) < 0) {
      fail_h5("listing " + group_name);
    }
    name.resize(static_cast<std::size_t>(len));
    names.push_back(std::move(name));
  }
  return names;
}

// A result file holds only hard links: a soft or external link could point outside the file (the
// reader would open another file) or make the walk of /tensors cycle.
void require_hard_link(hid_t loc, const std::string& name, const std::string& full_name) {
  H5L_info_t info;
  check(H5Lget_info(loc, name.c_str(), &info, H5P_DEFAULT), "inspecting the link " + full_name);
  if (info.type != H5L_TYPE_HARD) throw Failure(full_name + " is a soft or external link");
}

// An object reachable by two hard links (the writer never makes one) would be read twice, and a
// group linked below itself would make the walk endless.
void require_single_link(hid_t obj, const std::string& full_name) {
#if H5_VERSION_GE(1, 12, 0)
  H5O_info2_t info;
  check(H5Oget_info3(obj, &info, H5O_INFO_BASIC), "inspecting " + full_name);
#else
  H5O_info_t info;
  check(H5Oget_info2(obj, &info, H5O_INFO_BASIC), "inspecting " + full_name);
#endif
  if (info.rc != 1) throw Failure(fmt::format("{} is linked {} times (hard links)", full_name, info.rc));
}

Id open_group(hid_t loc, const std::string& name, const std::string& full_name) {
  const htri_t e = H5Lexists(loc, name.c_str(), H5P_DEFAULT);
  if (e < 0) fail_h5("looking up " + full_name);
  if (e == 0) throw Failure("missing group " + full_name);
  require_hard_link(loc, name, full_name);
  return Id(H5Gopen2(loc, name.c_str(), H5P_DEFAULT), H5Gclose, "opening group " + full_name);
}

Id open_dataset(hid_t loc, const std::string& name, const std::string& full_name) {
  const htri_t e = H5Lexists(loc, name.c_str(), H5P_DEFAULT);
  if (e < 0) fail_h5("looking up " + full_name);
  if (e == 0) throw Failure("missing dataset " + full_name);
  require_hard_link(loc, name, full_name);
  return Id(H5Dopen2(loc, name.c_str(), H5P_DEFAULT), H5Dclose, "opening dataset " + full_name);
}

std::vector<hsize_t> dataset_dims(hid_t d, const std::string& what) {
  Id space(H5Dget_space(d), H5Sclose, "getting the shape of " + what);
  const int rank = H5Sget_simple_extent_ndims(space);
  if (rank < 0) fail_h5("getting the rank of " + what);
  std::vector<hsize_t> dims(static_cast<std::size_t>(rank));
  if (rank > 0 && H5Sget_simple_extent_dims(space, dims.data(), nullptr) < 0) fail_h5("getting the shape of " + what);
  return dims;
}

// How many values a dataset holds, checked against the bytes actually stored for it before
// anything is allocated: a dataspace far larger than its data (never written, or a forged shape of
// 2^50 elements in a small file) is refused instead of exhausting memory. ptqlab writes every
// dataset whole and uncompressed.
std::size_t stored_elements(hid_t d, hid_t file_type, const std::vector<hsize_t>& dims, const std::string& what) {
  hsize_t n = 1;
  for (const hsize_t x : dims) {
    if (x != 0 && n > std::numeric_limits<hsize_t>::max() / x) throw Failure(what + " has an impossible shape");
    n *= x;
  }
  if (n == 0) return 0;
  const hsize_t element = std::max<std::size_t>(1, H5Tget_size(file_type));  // variable-length: its heap reference
  const hsize_t stored = H5Dget_storage_size(d);
  if (n > stored / element) {
    throw Failure(fmt::format("{} declares {} values but stores only {} bytes", what, n, stored));
  }
  return static_cast<std::size_t>(n);
}

template <class T>
std::vector<T> read_numeric(hid_t d, const std::string& what, hid_t mem_type, H5T_class_t expected_class,
                            std::vector<hsize_t>* dims_out = nullptr) {
  Id type(H5Dget_type(d), H5Tclose, "getting the type of " + what);
  if (H5Tget_class(type) != expected_class) {
    throw Failure(fmt::format("{} is not {}", what, expected_class == H5T_FLOAT ? "floating-point" : "integer"));
  }
  const auto dims = dataset_dims(d, what);
  std::vector<T> v(stored_elements(d, type, dims, what));
  if (!v.empty()) check(H5Dread(d, mem_type, H5S_ALL, H5S_ALL, H5P_DEFAULT, v.data()), "reading " + what);
  if (dims_out != nullptr) *dims_out = dims;
  return v;
}

// A 1-D column of /linears; all columns must have the same length.
template <class T>
std::vector<T> read_column(hid_t g, const std::string& name, hid_t mem_type, H5T_class_t cls, std::size_t& n,
                           bool& have_n) {
  const std::string full = "/linears/" + name;
  Id d = open_dataset(g, name, full);
  std::vector<hsize_t> dims;
  auto v = read_numeric<T>(d, full, mem_type, cls, &dims);
  if (dims.size() != 1) throw Failure(full + " is not one-dimensional");
  if (have_n && v.size() != n) throw Failure(fmt::format("{} has {} rows, other columns have {}", full, v.size(), n));
  n = v.size();
  have_n = true;
  return v;
}

std::vector<std::string> read_string_dataset(hid_t d, const std::string& what, std::vector<hsize_t>& dims) {
  Id type(H5Dget_type(d), H5Tclose, "getting the type of " + what);
  Id space(H5Dget_space(d), H5Sclose, "getting the shape of " + what);
  dims = dataset_dims(d, what);
  return read_strings(type, space, stored_elements(d, type, dims, what), what,
                      [&](hid_t mem, void* buf) { return H5Dread(d, mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf); });
}

AllocationRecord read_allocation(hid_t file) {
  AllocationRecord a;
  const std::string n = "/allocation";
  Id g = open_group(file, "allocation", n);
  a.allocator = read_attr_string(g, n, "allocator");
  a.status = read_attr_string(g, n, "status");
  a.metric = read_attr_string(g, n, "metric");
  a.unit = read_attr_string(g, n, "unit");
  a.loss = read_attr_string(g, n, "loss");
  a.table_key = read_attr_string(g, n, "table_key");
  a.table_from_cache = attr_int64(g, n, "table_from_cache") != 0;
  a.budget = attr_double(g, n, "budget");
  a.budget_bits = attr_int64(g, n, "budget_bits");
  a.weights = attr_int64(g, n, "weights");
  a.solver_bits = attr_int64(g, n, "solver_bits");
  a.solver_loss = attr_double(g, n, "solver_loss");
  a.lower_bound = attr_double(g, n, "lower_bound");
  a.solve_seconds = attr_double(g, n, "solve_seconds");
  a.measure_seconds = attr_double(g, n, "measure_seconds");
  a.ledger_allin_bits = attr_double(g, n, "ledger_allin_bits");
  a.ledger_paper_bits = attr_double(g, n, "ledger_paper_bits");
  {
    Id info = open_group(g, "info", n + "/info");
    for (const auto& k : attr_names(info, n + "/info")) a.info[k] = attr_double(info, n + "/info", k);
  }
  auto strings = [&](const char* name) {
    Id d = open_dataset(g, name, n + "/" + name);
    std::vector<hsize_t> dims;
    auto v = read_string_dataset(d, n + "/" + name, dims);
    if (dims.size() != 1) throw Failure(n + "/" + name + " is not one-dimensional");
    return v;
  };
  a.units = strings("units");
  a.unit_linears = strings("unit_linears");
  a.candidates = strings("candidates");
  const std::size_t U = a.units.size(), K = a.candidates.size();
  auto numbers = [&](const char* name, auto tag, hid_t mem, H5T_class_t cls, std::size_t count) {
    using T = decltype(tag);
    Id d = open_dataset(g, name, n + "/" + name);
    auto v = read_numeric<T>(d, n + "/" + name, mem, cls);
    if (v.size() != count) throw Failure(fmt::format("{}/{} has {} values, expected {}", n, name, v.size(), count));
    return v;
  };
  a.unit_layer = numbers("unit_layer", std::int32_t{}, H5T_NATIVE_INT32, H5T_INTEGER, U);
  a.unit_weights = numbers("unit_weights", std::int64_t{}, H5T_NATIVE_INT64, H5T_INTEGER, U);
  a.choice = numbers("choice", std::int32_t{}, H5T_NATIVE_INT32, H5T_INTEGER, U);
  if (a.unit_linears.size() != U) throw Failure(n + "/unit_linears does not match /allocation/units");
  for (auto c : a.choice)
    if (c < 0 || static_cast<std::size_t>(c) >= K) throw Failure(n + "/choice names a candidate that does not exist");
  a.bits_allin = numbers("bits_allin", std::int64_t{}, H5T_NATIVE_INT64, H5T_INTEGER, U * K);
  a.bits_paper = numbers("bits_paper", std::int64_t{}, H5T_NATIVE_INT64, H5T_INTEGER, U * K);
  a.loss_hess = numbers("loss_hess", double{}, H5T_NATIVE_DOUBLE, H5T_FLOAT, U * K);
  a.loss_mse = numbers("loss_mse", double{}, H5T_NATIVE_DOUBLE, H5T_FLOAT, U * K);
  a.seconds = numbers("seconds", double{}, H5T_NATIVE_DOUBLE, H5T_FLOAT, U * K);
  const htri_t block = H5Lexists(g, "loss_block", H5P_DEFAULT);  // layer units; absent in older files
  if (block < 0) fail_h5("looking up " + n + "/loss_block");
  if (block > 0) a.loss_block = numbers("loss_block", double{}, H5T_NATIVE_DOUBLE, H5T_FLOAT, U * K);
  return a;
}

// Every dataset below `group`, with its path relative to the root of the walk.
void visit_datasets(hid_t group, const std::string& group_name, const std::string& prefix,
                    const std::function<void(const std::string& rel, hid_t dataset, const std::string& full)>& fn) {
  for (const auto& name : link_names(group, group_name)) {
    const std::string full = group_name + "/" + name;
    require_hard_link(group, name, full);
    Id obj(H5Oopen(group, name.c_str(), H5P_DEFAULT), H5Oclose, "opening " + full);
    require_single_link(obj, full);
    const H5I_type_t type = H5Iget_type(obj);
    if (type == H5I_GROUP) {
      visit_datasets(obj, full, prefix + name + "/", fn);
    } else if (type == H5I_DATASET) {
      fn(prefix + name, obj, full);
    } else {
      throw Failure(full + " is neither a group nor a dataset");
    }
  }
}

// Logged tensors or series in their written order ("index" attribute; by path when absent).
template <class Item, class Fill>
std::vector<Item> read_logged(hid_t file, const std::string& root, Fill fill) {
  Id g = open_group(file, root.substr(1), root);
  std::vector<std::pair<std::int64_t, Item>> items;
  visit_datasets(g, root, "", [&](const std::string& rel, hid_t d, const std::string& full) {
    const std::int64_t index = has_attr(d, full, "index") ? attr_int64(d, full, "index") : INT64_MAX;
    Item item;
    item.path = rel;
    fill(item, d, full);
    items.emplace_back(index, std::move(item));
  });
  std::stable_sort(items.begin(), items.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<Item> out;
  out.reserve(items.size());
  for (auto& it : items) out.push_back(std::move(it.second));
  return out;
}

// Opens a result file and checks that it is complete and of this schema version. The Failure
// messages here are complete sentences (the caller prefixes the file name).
Id open_result(const fs::path& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw Failure("no such result file");
  if (!fs::is_regular_file(path, ec)) throw Failure("not a regular file");
#if H5_VERSION_GE(1, 12, 0)
  const htri_t is_h5 = H5Fis_accessible(path.c_str(), H5P_DEFAULT);
#else
  const htri_t is_h5 = H5Fis_hdf5(path.c_str());
#endif
  if (is_h5 <= 0) {
    H5Eclear2(H5E_DEFAULT);
    throw Failure("not an HDF5 file");
  }
  Id fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose, "creating a file access property list");
#if H5_VERSION_GE(1, 12, 1) || (H5_VERS_MAJOR == 1 && H5_VERS_MINOR == 10 && H5_VERS_RELEASE >= 7)
  // Result files are immutable once renamed into place: no lock is needed, and cluster file
  // systems without flock() support would otherwise refuse to open them.
  check(H5Pset_file_locking(fapl, false, true), "disabling file locking");
#endif
  Id file(H5Fopen(path.c_str(), H5F_ACC_RDONLY, fapl), H5Fclose, "cannot open HDF5 file");
  if (!has_attr(file, "/", "complete") || read_attr_number<std::int32_t>(file, "/", "complete", H5T_NATIVE_INT32) != 1) {
    throw Failure("incomplete result file (no complete=1 attribute: the write was interrupted, or it is not a ptqlab result)");
  }
  if (!has_attr(file, "/", "schema_version")) throw Failure("not a ptqlab result (no schema_version attribute)");
  const auto version = attr_int64(file, "/", "schema_version");
  if (version != kResultSchemaVersion) {
    throw Failure(fmt::format("result schema_version {}, this build reads version {}", version, kResultSchemaVersion));
  }
  return file;
}

ArmResult read_contents(hid_t file) {
  ArmResult r;
  r.arm = read_attr_string(file, "/", "arm");
  r.experiment = read_attr_string(file, "/", "experiment");
  r.status = read_attr_string(file, "/", "status");
  r.failure = read_attr_string(file, "/", "failure");
  r.config_hash = read_attr_string(file, "/", "config_hash");
  r.seconds = attr_double(file, "/", "seconds");

  {
    Id d = open_dataset(file, "config", "/config");
    std::vector<hsize_t> dims;
    auto v = read_string_dataset(d, "/config", dims);
    if (v.size() != 1) throw Failure("/config is not a single string");
    r.config_yaml = std::move(v.front());
  }

  {
    auto& p = r.provenance;
    Id g = open_group(file, "provenance", "/provenance");
    p.ptqlab_version = read_attr_string(g, "/provenance", "ptqlab_version");
    p.git_revision = read_attr_string(g, "/provenance", "git_revision");
    p.host = read_attr_string(g, "/provenance", "host");
    p.start_time = read_attr_string(g, "/provenance", "start_time");
    p.end_time = read_attr_string(g, "/provenance", "end_time");
    Id libs = open_group(g, "libraries", "/provenance/libraries");
    for (const auto& name : attr_names(libs, "/provenance/libraries")) {
      p.library_versions[name] = read_attr_string(libs, "/provenance/libraries", name);
    }
    Id seeds = open_group(g, "seeds", "/provenance/seeds");
    for (const auto& name : attr_names(seeds, "/provenance/seeds")) {
      p.seeds[name] = attr_int64(seeds, "/provenance/seeds", name);
    }
  }

  {
    const std::string full = "/calibration/token_ids";
    Id g = open_group(file, "calibration", "/calibration");
    Id d = open_dataset(g, "token_ids", full);
    std::vector<hsize_t> dims;
    r.calibration_tokens = read_numeric<std::int32_t>(d, full, H5T_NATIVE_INT32, H5T_INTEGER, &dims);
    const auto nsamples = attr_int64(d, full, "nsamples");
    const auto seq_len = attr_int64(d, full, "seq_len");
    if (nsamples < 0 || seq_len < 0 || nsamples > INT32_MAX || seq_len > INT32_MAX) {
      throw Failure(fmt::format("{} has an invalid shape attribute [{}, {}]", full, nsamples, seq_len));
    }
    r.calibration_nsamples = static_cast<int>(nsamples);
    r.calibration_seq_len = static_cast<int>(seq_len);
    if (dims.size() != 2) throw Failure(full + " is not two-dimensional");
    if (!r.calibration_tokens.empty() &&
        (dims[0] != static_cast<hsize_t>(nsamples) || dims[1] != static_cast<hsize_t>(seq_len))) {
      throw Failure(fmt::format("{} has shape [{}, {}] but attributes nsamples={} seq_len={}", full, dims[0], dims[1],
                                nsamples, seq_len));
    }
  }

  {
    Id g = open_group(file, "metrics", "/metrics");
    for (const auto& evaluator : link_names(g, "/metrics")) {
      const std::string eval_name = "/metrics/" + evaluator;
      Id ge = open_group(g, evaluator, eval_name);
      auto& datasets = r.metrics[evaluator];
      for (const auto& dataset : link_names(ge, eval_name)) {
        const std::string ds_name = eval_name + "/" + dataset;
        Id gd = open_group(ge, dataset, ds_name);
        auto& values = datasets[dataset];
        for (const auto& metric : attr_names(gd, ds_name)) {
          if (metric == "protocol")  // the one string attribute: the evaluation protocol id
            r.protocols[evaluator][dataset] = read_attr_string(gd, ds_name, metric);
          else
            values[metric] = attr_double(gd, ds_name, metric);
        }
      }
    }
  }

  {
    Id g = open_group(file, "linears", "/linears");
    std::size_t n = 0;
    bool have_n = false;
    const hid_t nd = H5T_NATIVE_DOUBLE;
    const auto layer = read_column<std::int32_t>(g, "layer", H5T_NATIVE_INT32, H5T_INTEGER, n, have_n);
    const auto weight_error = read_column<double>(g, "weight_error", nd, H5T_FLOAT, n, have_n);
    const auto output_error = read_column<double>(g, "output_error", nd, H5T_FLOAT, n, have_n);
    const auto seconds = read_column<double>(g, "seconds", nd, H5T_FLOAT, n, have_n);
    const auto bits_weights = read_column<std::int64_t>(g, "bits_weights", H5T_NATIVE_INT64, H5T_INTEGER, n, have_n);
    const auto bits_payload = read_column<double>(g, "bits_payload", nd, H5T_FLOAT, n, have_n);
    const auto bits_scales = read_column<double>(g, "bits_scales", nd, H5T_FLOAT, n, have_n);
    const auto bits_zeros = read_column<double>(g, "bits_zeros", nd, H5T_FLOAT, n, have_n);
    const auto bits_masks = read_column<double>(g, "bits_masks", nd, H5T_FLOAT, n, have_n);
    const auto bits_paper = read_column<double>(g, "bits_paper", nd, H5T_FLOAT, n, have_n);
    Id dn = open_dataset(g, "linear", "/linears/linear");
    std::vector<hsize_t> dims;
    const auto names = read_string_dataset(dn, "/linears/linear", dims);
    if (dims.size() != 1 || names.size() != n) throw Failure(fmt::format("/linears/linear does not have {} rows", n));
    r.linears.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
      auto& l = r.linears[i];
      l.layer = layer[i];
      l.linear = names[i];
      l.weight_error = weight_error[i];
      l.output_error = output_error[i];
      l.seconds = seconds[i];
      l.bits.weights = bits_weights[i];
      l.bits.payload = bits_payload[i];
      l.bits.scales = bits_scales[i];
      l.bits.zeros = bits_zeros[i];
      l.bits.masks = bits_masks[i];
      l.bits.paper = bits_paper[i];
    }
  }

  {
    auto& b = r.total_bits;
    Id g = open_group(file, "bits", "/bits");
    b.weights = attr_int64(g, "/bits", "weights");
    b.payload = attr_double(g, "/bits", "payload");
    b.scales = attr_double(g, "/bits", "scales");
    b.zeros = attr_double(g, "/bits", "zeros");
    b.masks = attr_double(g, "/bits", "masks");
    b.paper = attr_double(g, "/bits", "paper");
  }

  if (const htri_t e = H5Lexists(file, "allocation", H5P_DEFAULT); e > 0) r.allocation = read_allocation(file);

  r.tensors = read_logged<LoggedTensor>(file, "/tensors", [](LoggedTensor& t, hid_t d, const std::string& full) {
    std::vector<hsize_t> dims;
    t.data = read_numeric<float>(d, full, H5T_NATIVE_FLOAT, H5T_FLOAT, &dims);
    t.shape.assign(dims.begin(), dims.end());
  });
  r.series = read_logged<LoggedSeries>(file, "/series", [](LoggedSeries& s, hid_t d, const std::string& full) {
    std::vector<hsize_t> dims;
    s.values = read_numeric<double>(d, full, H5T_NATIVE_DOUBLE, H5T_FLOAT, &dims);
    if (dims.size() != 1) throw Failure(full + " is not one-dimensional");
  });
  return r;
}

Error write_error(const fs::path& path, const std::string& why) {
  return Error(one_line(fmt::format("{}: cannot write result: {}", path.string(), why)));
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Public functions.

void write_arm_result(const std::filesystem::path& path, const ArmResult& result) {
  try {
    write_impl(path, result);
  } catch (const Failure& f) {
    throw write_error(path, f.what());
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw write_error(path, e.what());
  }
}

ArmResult read_arm_result(const std::filesystem::path& path) {
  Hdf5Lock lock;
  Id file;
  try {
    file = open_result(path);
  } catch (const Failure& f) {
    throw Error(one_line(fmt::format("{}: {}", path.string(), f.what())));
  }
  try {
    return read_contents(file);
  } catch (const Failure& f) {
    throw Error(one_line(fmt::format("{}: cannot read result: {}", path.string(), f.what())));
  } catch (const std::exception& e) {
    throw Error(one_line(fmt::format("{}: cannot read result: {}", path.string(), e.what())));
  }
}

std::optional<std::string> read_config_hash(const std::filesystem::path& path) {
  try {
    Hdf5Lock lock;
    Id file = open_result(path);
    return read_attr_string(file, "/", "config_hash");
  } catch (...) {
    return std::nullopt;
  }
}

std::string hdf5_version() {
  Hdf5Lock lock;
  unsigned major = 0, minor = 0, release = 0;
  if (H5get_libversion(&major, &minor, &release) < 0) {
    H5Eclear2(H5E_DEFAULT);
    return "unknown";
  }
  return fmt::format("{}.{}.{}", major, minor, release);
}

// ---------------------------------------------------------------------------------------------
// ResultWriter: one thread, a FIFO queue.

struct ResultWriter::Impl {
  struct Job {
    std::filesystem::path path;
    ArmResult result;
    std::promise<void> done;
  };

  std::mutex mutex;
  std::condition_variable wake;
  std::deque<Job> queue;
  bool stopping = false;
  std::thread thread;

  void run() {
    for (;;) {
      Job job;
      {
        std::unique_lock lock(mutex);
        wake.wait(lock, [&] { return stopping || !queue.empty(); });
        if (queue.empty()) return;  // stopping and drained
        job = std::move(queue.front());
        queue.pop_front();
      }
      try {
        write_arm_result(job.path, job.result);
        job.done.set_value();
      } catch (...) {
        job.done.set_exception(std::current_exception());
      }
    }
  }
};

ResultWriter::ResultWriter() : impl_(std::make_unique<Impl>()) {
  Impl* impl = impl_.get();
  impl->thread = std::thread([impl] { impl->run(); });
}

ResultWriter::~ResultWriter() {
  {
    std::lock_guard lock(impl_->mutex);
    impl_->stopping = true;
  }
  impl_->wake.notify_all();
  if (impl_->thread.joinable()) impl_->thread.join();
}

std::future<void> ResultWriter::submit(std::filesystem::path path, ArmResult result) {
  Impl::Job job{std::move(path), std::move(result), {}};
  auto future = job.done.get_future();
  {
    std::lock_guard lock(impl_->mutex);
    impl_->queue.push_back(std::move(job));
  }
  impl_->wake.notify_one();
  return future;
}

}  // namespace ptqlab
