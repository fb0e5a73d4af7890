#pragma once
// The HDF5 primitives under results_h5.cpp (private to core/src/outputs/; the write protocol and
// the thread-safety rules are described at the top of results_h5.cpp): the process-wide lock,
// failures and their messages, identifiers closed on destruction, and checked writing and reading
// of attributes, groups and datasets.
#include <hdf5.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

namespace ptqlab::h5io {

// ---------------------------------------------------------------------------------------------
// The process-wide HDF5 lock.

class Hdf5Lock {
 public:
  Hdf5Lock();

 private:
  std::unique_lock<std::mutex> lock_;
};

// ---------------------------------------------------------------------------------------------
// Failures and their messages.

// A failure inside results_h5*.cpp; the public functions turn it into a ptqlab::Error naming the
// file.
class Failure : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Error messages are one line: control characters (a NUL or a newline in a name) are escaped.
std::string one_line(const std::string& s);

// ---------------------------------------------------------------------------------------------
// HDF5 errors.

// Throws a Failure: `what` and the most specific message on the HDF5 error stack.
[[noreturn]] void fail_h5(const std::string& what);

void check(herr_t rc, const std::string& what);

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
// Types.

Id string_type();

// ---------------------------------------------------------------------------------------------
// Writing.

void attr_string(hid_t loc, const std::string& loc_name, const std::string& name, const std::string& value);
void attr_i32(hid_t loc, const std::string& loc_name, const std::string& name, std::int32_t v);
void attr_i64(hid_t loc, const std::string& loc_name, const std::string& name, std::int64_t v);
void attr_f64(hid_t loc, const std::string& loc_name, const std::string& name, double v);

Id create_group(hid_t loc, const std::string& name, const std::string& full_name);

// Creates and fills a dataset (contiguous layout); returned open so that attributes can be added.
// Zero-element datasets are created but not written.
Id write_dataset(hid_t loc, const std::string& name, const std::string& full_name, hid_t file_type, hid_t mem_type,
                 const std::vector<hsize_t>& dims, const void* buf, hid_t lcpl = H5P_DEFAULT);

void write_string_column(hid_t loc, const std::string& name, const std::string& full_name,
                         const std::vector<const char*>& values);

// ---------------------------------------------------------------------------------------------
// Reading.

bool has_attr(hid_t loc, const std::string& loc_name, const std::string& name);

Id open_attr(hid_t loc, const std::string& loc_name, const std::string& name);

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

void require_scalar(hid_t space, const std::string& what);

std::string read_attr_string(hid_t loc, const std::string& loc_name, const std::string& name);

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
double attr_double(hid_t loc, const std::string& loc_name, const std::string& name);
std::int64_t attr_int64(hid_t loc, const std::string& loc_name, const std::string& name);

std::vector<std::string> attr_names(hid_t loc, const std::string& loc_name);

std::vector<std::string> link_names(hid_t group, const std::string& group_name);

// A result file holds only hard links: a soft or external link could point outside the file (the
// reader would open another file) or make the walk of /tensors cycle.
void require_hard_link(hid_t loc, const std::string& name, const std::string& full_name);

// An object reachable by two hard links (the writer never makes one) would be read twice, and a
// group linked below itself would make the walk endless.
void require_single_link(hid_t obj, const std::string& full_name);

Id open_group(hid_t loc, const std::string& name, const std::string& full_name);

Id open_dataset(hid_t loc, const std::string& name, const std::string& full_name);

std::vector<hsize_t> dataset_dims(hid_t d, const std::string& what);

// How many values a dataset holds, checked against the bytes actually stored for it before
// anything is allocated: a dataspace far larger than its data (never written, or a forged shape of
// 2^50 elements in a small file) is refused instead of exhausting memory. ptqlab writes every
// dataset whole and uncompressed.
std::size_t stored_elements(hid_t d, hid_t file_type, const std::vector<hsize_t>& dims, const std::string& what);

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

std::vector<std::string> read_string_dataset(hid_t d, const std::string& what, std::vector<hsize_t>& dims);

// Every dataset below `group`, with its path relative to the root of the walk.
void visit_datasets(hid_t group, const std::string& group_name, const std::string& prefix,
                    const std::function<void(const std::string& rel, hid_t dataset, const std::string& full)>& fn);

}  // namespace ptqlab::h5io
