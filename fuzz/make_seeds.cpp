// Writes the seed corpora of the fuzz targets from the shipped files (scripts/fuzz runs it):
//   make_seeds SOURCE_DIR SHARED_DIR OUT_DIR  ->  OUT_DIR/{safetensors,config,experiment,results_h5}/
// safetensors: each shared checkpoint's real header verbatim (no data), and a small valid file with
//   the same tensor names, dtypes and metadata, every shape shrunk to at most 2x3 and filled with
//   the tensor's first real bytes (whole checkpoints are too large to fuzz quickly).
// config: each shared model's config.json.
// experiment: experiments/**/*.yaml with model and text paths rewritten to the names the
//   experiment target's scratch directory provides (model, calib.txt, valid.txt, wiki.raw).
// results_h5: the empty edit program (the template result unchanged) and a few short ones.
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <regex>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), {}};
}

void put(const fs::path& p, const std::string& bytes) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary) << bytes;
}

std::string le64(std::uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

void safetensors_seeds(const fs::path& model_dir, const fs::path& out) {
  const std::string file = slurp(model_dir / "model.safetensors");
  if (file.size() < 8) return;
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>(file[i]);
  const std::string header_text = file.substr(8, n);
  const std::string name = model_dir.filename().string();
  put(out / (name + "-header-only"), le64(n) + header_text);

  const json header = json::parse(header_text);
  json small = json::object();
  std::string data;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      small[it.key()] = it.value();
      continue;
    }
    const auto& v = it.value();
    const std::size_t elem = v["dtype"] == "F32" ? 4 : 2;
    std::vector<std::uint64_t> shape;
    std::uint64_t numel = 1;
    for (const auto& d : v["shape"]) {
      shape.push_back(std::min<std::uint64_t>(d.get<std::uint64_t>(), shape.empty() ? 2 : 3));
      numel *= shape.back();
    }
    const std::uint64_t begin = v["data_offsets"][0].get<std::uint64_t>();
    const std::size_t bytes = numel * elem;
    small[it.key()] = {{"dtype", v["dtype"]}, {"shape", shape}, {"data_offsets", {data.size(), data.size() + bytes}}};
    data += file.substr(8 + n + begin, bytes);
  }
  const std::string text = small.dump();
  put(out / (name + "-small"), le64(text.size()) + text + data);
}

void experiment_seeds(const fs::path& source_dir, const fs::path& out) {
  const std::vector<std::pair<std::regex, std::string>> rewrites = {
      {std::regex(R"((\.\./)*shared/models/[A-Za-z0-9._-]+)"), "model"},
      {std::regex(R"((\.\./)*shared/data/[A-Za-z0-9._/-]*calib\.txt)"), "calib.txt"},
      {std::regex(R"((\.\./)*shared/data/[A-Za-z0-9._/-]*valid\.txt)"), "valid.txt"},
      {std::regex(R"((\.\./)*shared/data/[A-Za-z0-9._/-]+\.raw)"), "wiki.raw"},
  };
  for (const auto& e : fs::recursive_directory_iterator(source_dir / "experiments")) {
    if (e.path().extension() != ".yaml") continue;
    std::string text = slurp(e.path());
    for (const auto& [re, to] : rewrites) text = std::regex_replace(text, re, to);
    std::string name = fs::relative(e.path(), source_dir / "experiments").string();
    for (char& c : name)
      if (c == '/') c = '-';
    put(out / name, text);
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::cerr << "usage: make_seeds SOURCE_DIR SHARED_DIR OUT_DIR\n";
    return 2;
  }
  const fs::path source(argv[1]), shared(argv[2]), out(argv[3]);
  for (const auto& e : fs::directory_iterator(shared / "models")) {
    if (!fs::is_directory(e.path())) continue;
    if (fs::exists(e.path() / "model.safetensors")) safetensors_seeds(e.path(), out / "safetensors");
    if (fs::exists(e.path() / "config.json"))
      put(out / "config" / (e.path().filename().string() + ".json"), slurp(e.path() / "config.json"));
  }
  experiment_seeds(source, out / "experiment");
  put(out / "results_h5" / "unchanged", "");
  // Replace /linears/layer by a dataset; add a hard-link cycle under /tensors; drop complete.
  put(out / "results_h5" / "dataset", std::string("\x04\x0b\x03\x02\x05\x05\x05\x01", 8));
  put(out / "results_h5" / "cycle", std::string("\x07\x17\x18", 3));
  put(out / "results_h5" / "no-complete", std::string("\x00\x00\x07", 3));
  return 0;
}
