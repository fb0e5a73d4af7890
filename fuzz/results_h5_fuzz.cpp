// Fuzz target: reading a ptqlab HDF5 result file (read_arm_result, read_config_hash).
//
// Structured, not raw bytes: libhdf5's own parser of the container format is not ours to fix (and
// known to crash on corrupt files), while what we own is how our reader copes with a *valid* HDF5
// file whose contents are not what it expects. So the input is a small edit program applied to a
// complete result file written by write_arm_result: each edit deletes or replaces an attribute,
// dataset or group at a path the reader visits (or a new one), with a fuzzed type (integers and
// floats of every size and byte order, fixed and variable strings, compound, enum, array,
// variable-length, opaque, bitfield, reference, half float), dataspace (scalar, null, simple of
// rank 1-3 with small or huge dimensions) and contents, or adds hard, soft and external links
// (cycles included). The edited file is then read; an accepted file must write back and read back
// the same (the reader accepts nothing the writer would refuse).
#include <hdf5.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <vector>

#include "fuzz_target.hpp"
#include "ptqlab/outputs/results.hpp"
#include "ptqlab/support/error.hpp"

namespace {

namespace fs = std::filesystem;
using namespace ptqlab;

// The fuzz input, read front to back; zeros when exhausted.
class Input {
 public:
  Input(const std::uint8_t* data, std::size_t size) : p_(data), end_(data + size) {}
  bool empty() const { return p_ == end_; }
  std::uint8_t u8() { return p_ == end_ ? 0 : *p_++; }
  std::uint64_t u64() {
    std::uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v = (v << 8) | u8();
    return v;
  }
  std::string text(std::size_t max) {
    const std::size_t n = std::min<std::size_t>(u8() % (max + 1), static_cast<std::size_t>(end_ - p_));
    std::string s(reinterpret_cast<const char*>(p_), n);
    p_ += n;
    return s;
  }
  // `n` bytes of contents (the input's next bytes, then zeros).
  std::vector<unsigned char> bytes(std::size_t n) {
    std::vector<unsigned char> out(n, 0);
    const std::size_t k = std::min<std::size_t>(n, static_cast<std::size_t>(end_ - p_));
    if (k > 0) std::memcpy(out.data(), p_, k);
    p_ += k;
    return out;
  }
  template <class T>
  const T& pick(const std::vector<T>& v) {
    return v[u8() % v.size()];
  }

 private:
  const std::uint8_t* p_;
  const std::uint8_t* end_;
};

ArmResult template_result() {
  ArmResult r;
  r.arm = "rtn-bits2";
  r.experiment = "quickstart";
  r.config_yaml = "name: quickstart\narm: {name: rtn-bits2}\n";
  r.config_hash = std::string(64, 'a');
  r.provenance.ptqlab_version = "0.1.0";
  r.provenance.git_revision = "abc123";
  r.provenance.library_versions = {{"eigen", "3.4.0"}, {"hdf5", "1.10.8"}};
  r.provenance.host = "node";
  r.provenance.start_time = "2026-01-01T00:00:00Z";
  r.provenance.end_time = "2026-01-01T00:01:00Z";
  r.provenance.seeds = {{"experiment", 0}, {"calibration", 7}};
  r.calibration_nsamples = 2;
  r.calibration_seq_len = 3;
  r.calibration_tokens = {1, 2, 3, 4, 5, 6};
  r.metrics["perplexity"]["wikitext2"] = {{"ppl", 5.25}, {"nll", 1.66}};
  r.metrics["perplexity"]["tinystories"] = {{"ppl", 7.5}};
  for (int i = 0; i < 3; ++i) {
    LinearRecord l;
    l.layer = i / 2;
    l.linear = i % 2 ? "k_proj" : "q_proj";
    l.weight_error = 0.1 * i;
    l.output_error = 0.2 * i;
    l.bits = {64, 128.0, 16.0, 0.0, 0.0, 128.0};
    l.seconds = 0.5;
    r.linears.push_back(l);
    r.total_bits += l.bits;
  }
  r.tensors = {{"layer0/q_proj/mask", {2, 2}, {1, 0, 0, 1}}, {"scalar", {}, {1.5f}}};
  r.series = {{"layer0/loss", {3.0, 2.5}}};
  r.seconds = 12.5;
  return r;
}

struct Scratch {
  fs::path dir, file, roundtrip;
  std::vector<char> image;  // the complete template file
};

const Scratch& scratch() {
  static const Scratch s = [] {
    Scratch s;
    s.dir = fs::temp_directory_path() / ("ptqlab-fuzz-results-" + std::to_string(::getpid()));
    fs::create_directories(s.dir);
    s.file = s.dir / "arm.h5";
    s.roundtrip = s.dir / "roundtrip.h5";
    const fs::path t = s.dir / "template.h5";
    write_arm_result(t, template_result());
    std::ifstream in(t, std::ios::binary);
    s.image.assign(std::istreambuf_iterator<char>(in), {});
    std::atexit([] {
      std::error_code ec;
      fs::remove_all(fs::temp_directory_path() / ("ptqlab-fuzz-results-" + std::to_string(::getpid())), ec);
    });
    return s;
  }();
  return s;
}

// Where edits land: the objects and attribute names the reader visits, and a few others.
const std::vector<std::string> kObjects = {
    "/", "/config", "/provenance", "/provenance/libraries", "/provenance/seeds", "/calibration",
    "/calibration/token_ids", "/metrics", "/metrics/perplexity", "/metrics/perplexity/wikitext2",
    "/linears", "/linears/layer", "/linears/linear", "/linears/weight_error", "/linears/output_error",
    "/linears/seconds", "/linears/bits_weights", "/linears/bits_payload", "/linears/bits_scales",
    "/linears/bits_zeros", "/linears/bits_masks", "/linears/bits_paper", "/bits", "/tensors", "/tensors/layer0",
    "/tensors/layer0/q_proj", "/tensors/layer0/q_proj/mask", "/tensors/scalar", "/series", "/series/layer0",
    "/series/layer0/loss", "/tensors/new", "/series/new", "/metrics/new", "/metrics/perplexity/new", "/new"};
const std::vector<std::string> kAttrs = {
    "schema_version", "arm", "experiment", "status", "failure", "config_hash", "seconds", "complete",
    "ptqlab_version", "git_revision", "host", "start_time", "end_time", "eigen", "experiment", "calibration",
    "nsamples", "seq_len", "ppl", "nll", "index", "weights", "payload", "scales", "zeros", "masks", "paper"};

// A fuzzed datatype (caller closes it).
hid_t make_type(Input& in, hid_t file) {
  switch (in.u8() % 23) {
    case 0: return H5Tcopy(H5T_STD_I8LE);
    case 1: return H5Tcopy(H5T_STD_U8LE);
    case 2: return H5Tcopy(H5T_STD_I16BE);
    case 3: return H5Tcopy(H5T_STD_I32LE);
    case 4: return H5Tcopy(H5T_STD_U32BE);
    case 5: return H5Tcopy(H5T_STD_I64LE);
    case 6: return H5Tcopy(H5T_STD_U64BE);
    case 7: return H5Tcopy(H5T_IEEE_F32LE);
    case 8: return H5Tcopy(H5T_IEEE_F64BE);
    case 9: return H5Tcopy(H5T_IEEE_F64LE);
    case 10:
    case 11: {
      const hid_t t = H5Tcopy(H5T_C_S1);
      H5Tset_size(t, H5T_VARIABLE);
      H5Tset_cset(t, in.u8() % 2 ? H5T_CSET_UTF8 : H5T_CSET_ASCII);
      return t;
    }
    case 12:
    case 13: {
      const hid_t t = H5Tcopy(H5T_C_S1);
      H5Tset_size(t, 1 + in.u8() % 64);
      H5Tset_strpad(t, static_cast<H5T_str_t>(in.u8() % 3));
      return t;
    }
    case 14: {
      const hid_t t = H5Tcreate(H5T_COMPOUND, 16);
      H5Tinsert(t, "a", 0, H5T_STD_I32LE);
      H5Tinsert(t, "b", 8, H5T_IEEE_F64LE);
      return t;
    }
    case 15: {
      const hid_t t = H5Tenum_create(H5T_STD_I8LE);
      const std::int8_t a = 0, b = 1;
      H5Tenum_insert(t, "A", &a);
      H5Tenum_insert(t, "B", &b);
      return t;
    }
    case 16: {
      const hsize_t dim = 1 + in.u8() % 4;
      return H5Tarray_create2(H5T_STD_I32LE, 1, &dim);
    }
    case 17: return H5Tvlen_create(H5T_STD_I32LE);
    case 18: {
      const hid_t t = H5Tcreate(H5T_OPAQUE, 1 + in.u8() % 8);
      H5Tset_tag(t, "fuzz");
      return t;
    }
    case 19: return H5Tcopy(H5T_STD_B8LE);
    case 20: return H5Tcopy(H5T_STD_REF_OBJ);
    case 21: {  // IEEE half precision
      const hid_t t = H5Tcopy(H5T_IEEE_F32LE);
      H5Tset_fields(t, 15, 10, 5, 0, 10);
      H5Tset_precision(t, 16);
      H5Tset_size(t, 2);
      H5Tset_ebias(t, 15);
      return t;
    }
    default: {  // an odd-sized integer
      const hid_t t = H5Tcopy(H5T_STD_I64LE);
      H5Tset_precision(t, 1 + in.u8() % 64);
      return t;
    }
  }
  (void)file;
}

// A fuzzed dataspace (caller closes it); `huge` allows dimensions far beyond the file's size.
hid_t make_space(Input& in, bool huge) {
  const int kind = in.u8() % 8;
  if (kind == 0) return H5Screate(H5S_SCALAR);
  if (kind == 1) return H5Screate(H5S_NULL);
  const int rank = 1 + in.u8() % 3;
  hsize_t dims[3];
  for (int i = 0; i < rank; ++i) {
    const std::uint8_t b = in.u8();
    dims[i] = (huge && b >= 240) ? (hsize_t{1} << (b - 200)) : b % 7;
  }
  return H5Screate_simple(rank, dims, nullptr);
}

// Contents for `count` elements of `type` (variable-length strings and sequences point into
// `keep`, which must outlive the write).
std::vector<unsigned char> make_contents(Input& in, hid_t file, hid_t type, std::size_t count,
                                         std::vector<std::string>& keep, std::vector<std::vector<int>>& seqs) {
  const std::size_t size = H5Tget_size(type);
  std::vector<unsigned char> buf;
  if (H5Tis_variable_str(type) > 0) {
    buf.resize(count * sizeof(char*));
    keep.reserve(count);
    for (std::size_t i = 0; i < count; ++i) {
      keep.push_back(in.text(24));
      const char* p = keep.back().c_str();
      std::memcpy(buf.data() + i * sizeof p, &p, sizeof p);
    }
  } else if (H5Tget_class(type) == H5T_VLEN) {
    buf.resize(count * sizeof(hvl_t));
    seqs.reserve(count);
    for (std::size_t i = 0; i < count; ++i) {
      seqs.emplace_back(in.u8() % 4, static_cast<int>(in.u8()));
      hvl_t v{seqs.back().size(), seqs.back().data()};
      std::memcpy(buf.data() + i * sizeof v, &v, sizeof v);
    }
  } else if (H5Tget_class(type) == H5T_REFERENCE) {
    buf.resize(count * sizeof(hobj_ref_t));
    for (std::size_t i = 0; i < count; ++i) {
      hobj_ref_t ref{};
      H5Rcreate(&ref, file, kObjects[in.u8() % kObjects.size()].c_str(), H5R_OBJECT, -1);
      std::memcpy(buf.data() + i * sizeof ref, &ref, sizeof ref);
    }
  } else {
    buf = in.bytes(count * size);
  }
  return buf;
}

hssize_t point_count(hid_t space) {
  if (H5Sget_simple_extent_type(space) == H5S_NULL) return 0;
  return H5Sget_simple_extent_npoints(space);
}

void set_attribute(Input& in, hid_t file) {
  const std::string& obj = in.pick(kObjects);
  const std::string name = in.u8() % 8 ? in.pick(kAttrs) : in.text(12);
  H5Adelete_by_name(file, obj.c_str(), name.c_str(), H5P_DEFAULT);
  const hid_t type = make_type(in, file);
  const hid_t space = make_space(in, false);
  const hid_t a = H5Acreate_by_name(file, obj.c_str(), name.c_str(), type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  if (a >= 0) {
    const hssize_t n = point_count(space);
    if (n > 0 && in.u8() % 4) {
      std::vector<std::string> keep;
      std::vector<std::vector<int>> seqs;
      const auto buf = make_contents(in, file, type, static_cast<std::size_t>(n), keep, seqs);
      H5Awrite(a, type, buf.data());
    }
    H5Aclose(a);
  }
  H5Sclose(space);
  H5Tclose(type);
}

void set_dataset(Input& in, hid_t file) {
  const std::string& path = in.pick(kObjects);
  H5Ldelete(file, path.c_str(), H5P_DEFAULT);
  const hid_t type = make_type(in, file);
  const hid_t space = make_space(in, true);
  const hid_t lcpl = H5Pcreate(H5P_LINK_CREATE);
  H5Pset_create_intermediate_group(lcpl, 1);
  const hid_t d = H5Dcreate2(file, path.c_str(), type, space, lcpl, H5P_DEFAULT, H5P_DEFAULT);
  if (d >= 0) {
    const hssize_t n = point_count(space);
    const std::size_t bytes = static_cast<std::size_t>(std::max<hssize_t>(n, 0)) * H5Tget_size(type);
    if (n > 0 && bytes <= 4096 && in.u8() % 4) {
      std::vector<std::string> keep;
      std::vector<std::vector<int>> seqs;
      const auto buf = make_contents(in, file, type, static_cast<std::size_t>(n), keep, seqs);
      H5Dwrite(d, type, H5S_ALL, H5S_ALL, H5P_DEFAULT, buf.data());
    }
    if (in.u8() % 2) {  // the "index" attribute of logged tensors and series
      const hid_t s = H5Screate(H5S_SCALAR);
      const std::int64_t index = static_cast<std::int64_t>(in.u64());
      const hid_t a = H5Acreate2(d, "index", H5T_STD_I64LE, s, H5P_DEFAULT, H5P_DEFAULT);
      if (a >= 0) {
        H5Awrite(a, H5T_NATIVE_INT64, &index);
        H5Aclose(a);
      }
      H5Sclose(s);
    }
    H5Dclose(d);
  }
  H5Pclose(lcpl);
  H5Sclose(space);
  H5Tclose(type);
}

void apply_edit(Input& in, hid_t file, const fs::path& self) {
  switch (in.u8() % 9) {
    case 0: {
      const std::string& obj = in.pick(kObjects);
      H5Adelete_by_name(file, obj.c_str(), in.pick(kAttrs).c_str(), H5P_DEFAULT);
      break;
    }
    case 1:
    case 2: set_attribute(in, file); break;
    case 3: H5Ldelete(file, in.pick(kObjects).c_str(), H5P_DEFAULT); break;
    case 4:
    case 5: set_dataset(in, file); break;
    case 6: {  // a group where something else was
      const std::string& path = in.pick(kObjects);
      H5Ldelete(file, path.c_str(), H5P_DEFAULT);
      const hid_t g = H5Gcreate2(file, path.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
      if (g >= 0) H5Gclose(g);
      break;
    }
    case 7: {  // a hard link: an object seen twice, or a cycle
      const std::string& from = in.pick(kObjects);
      const std::string& to = in.pick(kObjects);
      H5Ldelete(file, to.c_str(), H5P_DEFAULT);
      H5Lcreate_hard(file, from.c_str(), file, to.c_str(), H5P_DEFAULT, H5P_DEFAULT);
      break;
    }
    default: {  // a soft or external link (dangling, to itself, to another object)
      const std::string& to = in.pick(kObjects);
      H5Ldelete(file, to.c_str(), H5P_DEFAULT);
      const std::string target = in.u8() % 2 ? in.pick(kObjects) : in.text(16);
      if (in.u8() % 2) {
        H5Lcreate_soft(target.c_str(), file, to.c_str(), H5P_DEFAULT, H5P_DEFAULT);
      } else {
        const std::string other = in.u8() % 2 ? self.string() : "missing.h5";
        H5Lcreate_external(other.c_str(), target.c_str(), file, to.c_str(), H5P_DEFAULT, H5P_DEFAULT);
      }
    }
  }
}

bool same_bits(double a, double b) { return std::memcmp(&a, &b, sizeof a) == 0; }

}  // namespace

PTQLAB_FUZZ_TARGET(results_h5) {
  const Scratch& s = scratch();
  {
    std::ofstream out(s.file, std::ios::binary | std::ios::trunc);
    out.write(s.image.data(), static_cast<std::streamsize>(s.image.size()));
  }
  Input in(data, size);
  {
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
    const hid_t file = H5Fopen(s.file.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
    if (file < 0) ::ptqlab::fuzz::broken("cannot open the template copy");
    for (int edits = 0; edits < 12 && !in.empty(); ++edits) apply_edit(in, file, s.file);
    H5Fclose(file);
    H5Eclear2(H5E_DEFAULT);
  }

  (void)read_config_hash(s.file);  // never throws
  ArmResult r;
  try {
    r = read_arm_result(s.file);
  } catch (const Error&) {
    return 0;
  }
  // An accepted file holds a result the writer accepts, and that reads back the same.
  try {
    write_arm_result(s.roundtrip, r);
  } catch (const Error& e) {
    std::fprintf(stderr, "%s\n", e.what());
    ::ptqlab::fuzz::broken("a result that was read cannot be written back");
  }
  const ArmResult back = read_arm_result(s.roundtrip);
  PTQLAB_FUZZ_CHECK(back.arm == r.arm && back.config_hash == r.config_hash && back.config_yaml == r.config_yaml);
  PTQLAB_FUZZ_CHECK(back.calibration_tokens == r.calibration_tokens);
  PTQLAB_FUZZ_CHECK(back.linears.size() == r.linears.size() && back.tensors.size() == r.tensors.size() &&
                    back.series.size() == r.series.size() && back.metrics.size() == r.metrics.size());
  PTQLAB_FUZZ_CHECK(same_bits(back.seconds, r.seconds));
  for (std::size_t i = 0; i < r.tensors.size(); ++i) {
    PTQLAB_FUZZ_CHECK(back.tensors[i].path == r.tensors[i].path && back.tensors[i].shape == r.tensors[i].shape);
  }
  return 0;
}
