// HDF5 primitives for result files: lock, errors, checked writing and reading (results_h5_io.hpp;
// the write protocol and thread-safety are described at the top of results_h5.cpp).
#include "results_h5_io.hpp"

#include <algorithm>
#include <limits>

namespace ptqlab::h5io {

// ---------------------------------------------------------------------------------------------
// The process-wide HDF5 lock.

namespace {

std::mutex& hdf5_mutex() {
  static std::mutex m;
  return m;
}

}  // namespace

Hdf5Lock::Hdf5Lock() : lock_(hdf5_mutex()) {
  // Errors are turned into exceptions; the library must not print its stack on stderr.
  H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
}

// ---------------------------------------------------------------------------------------------
// Messages.

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

// ---------------------------------------------------------------------------------------------
// HDF5 errors.

namespace {

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

}  // namespace

void fail_h5(const std::string& what) { throw Failure(what + ": " + hdf5_detail()); }

void check(herr_t rc, const std::string& what) {
  if (rc < 0) fail_h5(what);
}

// ---------------------------------------------------------------------------------------------
// Types and dataspaces.

Id string_type() {
  Id t(H5Tcopy(H5T_C_S1), H5Tclose, "copying the string type");
  check(H5Tset_size(t, H5T_VARIABLE), "making a variable-length string type");
  check(H5Tset_cset(t, H5T_CSET_UTF8), "setting UTF-8 on the string type");
  return t;
}

namespace {

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

}  // namespace

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

Id write_dataset(hid_t loc, const std::string& name, const std::string& full_name, hid_t file_type, hid_t mem_type,
                 const std::vector<hsize_t>& dims, const void* buf, hid_t lcpl) {
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

double attr_double(hid_t loc, const std::string& loc_name, const std::string& name) {
  return read_attr_number<double>(loc, loc_name, name, H5T_NATIVE_DOUBLE);
}
std::int64_t attr_int64(hid_t loc, const std::string& loc_name, const std::string& name) {
  return read_attr_number<std::int64_t>(loc, loc_name, name, H5T_NATIVE_INT64);
}

namespace {

herr_t collect_attr_name(hid_t, const char* name, const H5A_info_t*, void* data) {
  static_cast<std::vector<std::string>*>(data)->emplace_back(name);
  return 0;
}

}  // namespace

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

void require_hard_link(hid_t loc, const std::string& name, const std::string& full_name) {
  H5L_info_t info;
  check(H5Lget_info(loc, name.c_str(), &info, H5P_DEFAULT), "inspecting the link " + full_name);
  if (info.type != H5L_TYPE_HARD) throw Failure(full_name + " is a soft or external link");
}

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

std::vector<std::string> read_string_dataset(hid_t d, const std::string& what, std::vector<hsize_t>& dims) {
  Id type(H5Dget_type(d), H5Tclose, "getting the type of " + what);
  Id space(H5Dget_space(d), H5Sclose, "getting the shape of " + what);
  dims = dataset_dims(d, what);
  return read_strings(type, space, stored_elements(d, type, dims, what), what,
                      [&](hid_t mem, void* buf) { return H5Dread(d, mem, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf); });
}

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

}  // namespace ptqlab::h5io
