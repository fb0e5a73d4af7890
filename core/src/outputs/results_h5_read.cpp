// Reading result files, every structure checked before it is trusted (results_h5_parts.hpp; the
// write protocol and thread-safety are described at the top of results_h5.cpp).
#include <algorithm>
#include <cstdint>
#include <system_error>
#include <utility>

#include "results_h5_parts.hpp"

namespace ptqlab::h5io {
namespace {

namespace fs = std::filesystem;

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

}  // namespace

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

}  // namespace ptqlab::h5io
