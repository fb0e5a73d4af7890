#include "ptqlab/engine/plugin.hpp"

#include <dlfcn.h>

#include <algorithm>
#include <map>
#include <mutex>

#include <fmt/format.h>

#include "ptqlab/support/error.hpp"

namespace ptqlab {

std::int64_t SalientMask::count() const {
  std::int64_t n = 0;
  for (auto s : salient) n += s != 0;
  return shape == Shape::channels ? n * rows : n;
}

BitCount Quantizer::quantize_linear(const LinearContext&, Matrix&) {
  throw Error("this quantizer works per decoder layer and has no per-linear step");
}

std::array<BitCount, 7> Quantizer::quantize_layer(const LayerContext&, DecoderLayer&) {
  throw Error("this quantizer works per linear layer and has no per-decoder-layer step");
}

namespace {

using AbiVersionFn = int (*)();
using BuildIdFn = const char* (*)();
using RegisterFn = void (*)(PluginRegistrar*);

struct Entry {
  // Declared first so it is destroyed last: the factories below are code inside the library.
  std::shared_ptr<void> library;
  std::filesystem::path path;
  ComponentSchema schema;
  Factory<Quantizer> quantizer;
  Factory<Mask> mask;
  Factory<Preprocessor> preprocessor;
  Factory<Evaluator> evaluator;
  Factory<Allocator> allocator;
};

using Key = std::pair<ComponentKind, std::string>;

}  // namespace

struct PluginRegistry::Impl {
  std::vector<std::filesystem::path> search_paths;
  std::vector<std::filesystem::path> loaded;  // canonical library paths
  std::map<Key, Entry> entries;

  void load_library(const std::filesystem::path& path);

  const Entry& entry(ComponentKind kind, const std::string& name) const {
    auto it = entries.find({kind, name});
    if (it == entries.end())
      throw Error(fmt::format("unknown {} '{}' (see 'ptqlab plugins')", component_kind_name(kind), name));
    return it->second;
  }
};

namespace {

// Collects what one library registers, checking each schema before it is accepted.
class LibraryRegistrar : public PluginRegistrar {
 public:
  LibraryRegistrar(std::shared_ptr<void> library, std::filesystem::path path) : library_(std::move(library)), path_(std::move(path)) {}

  void add_quantizer(ComponentSchema schema, Factory<Quantizer> make) override {
    add(ComponentKind::quantizer, std::move(schema), [&](Entry& e) { e.quantizer = std::move(make); });
  }
  void add_mask(ComponentSchema schema, Factory<Mask> make) override {
    add(ComponentKind::mask, std::move(schema), [&](Entry& e) { e.mask = std::move(make); });
  }
  void add_preprocessor(ComponentSchema schema, Factory<Preprocessor> make) override {
    add(ComponentKind::preprocessor, std::move(schema), [&](Entry& e) { e.preprocessor = std::move(make); });
  }
  void add_evaluator(ComponentSchema schema, Factory<Evaluator> make) override {
    add(ComponentKind::evaluator, std::move(schema), [&](Entry& e) { e.evaluator = std::move(make); });
  }
  void add_allocator(ComponentSchema schema, Factory<Allocator> make) override {
    add(ComponentKind::allocator, std::move(schema), [&](Entry& e) { e.allocator = std::move(make); });
  }

  std::vector<Entry> take() { return std::move(entries_); }

 private:
  template <class SetFactory>
  void add(ComponentKind kind, ComponentSchema schema, SetFactory set) {
    schema.kind = kind;
    if (schema.name.empty()) throw Error(fmt::format("{}: registers a {} without a name", path_.string(), component_kind_name(kind)));
    for (const auto& p : schema.params) {
      if (auto why = check_param(p, p.default_value))
        throw Error(fmt::format("{}: {} '{}': default of param '{}' {}", path_.string(), component_kind_name(kind),
                                schema.name, p.name, *why));
    }
    Entry e;
    e.library = library_;
    e.path = path_;
    e.schema = std::move(schema);
    set(e);
    entries_.push_back(std::move(e));
  }

  std::shared_ptr<void> library_;
  std::filesystem::path path_;
  std::vector<Entry> entries_;
};

}  // namespace

void PluginRegistry::Impl::load_library(const std::filesystem::path& path) {
  const auto canonical = std::filesystem::canonical(path);
  if (std::find(loaded.begin(), loaded.end(), canonical) != loaded.end()) return;

  void* raw = ::dlopen(canonical.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (raw == nullptr) throw Error(fmt::format("{}: cannot load plugin: {}", path.string(), ::dlerror()));
  std::shared_ptr<void> handle(raw, [](void* h) { ::dlclose(h); });

  auto abi = reinterpret_cast<AbiVersionFn>(::dlsym(raw, "ptqlab_plugin_abi_version"));
  auto build_id = reinterpret_cast<BuildIdFn>(::dlsym(raw, "ptqlab_plugin_build_id"));
  auto reg = reinterpret_cast<RegisterFn>(::dlsym(raw, "ptqlab_plugin_register"));
  if (abi == nullptr || build_id == nullptr || reg == nullptr)
    throw Error(fmt::format("{}: not a ptqlab plugin (no ptqlab_plugin_* entry points; see docs/plugins.md)", path.string()));
  if (abi() != PTQLAB_PLUGIN_ABI_VERSION)
    throw Error(fmt::format("{}: plugin ABI version {}, but this ptqlab needs {}: rebuild the plugin", path.string(),
                            abi(), PTQLAB_PLUGIN_ABI_VERSION));
  if (std::string(build_id()) != plugin_build_id())
    throw Error(fmt::format("{}: plugin built for '{}', but this ptqlab is '{}': rebuild the plugin", path.string(),
                            build_id(), plugin_build_id()));

  LibraryRegistrar registrar(handle, canonical);
  reg(&registrar);
  auto new_entries = registrar.take();
  for (const auto& e : new_entries) {
    auto it = entries.find({e.schema.kind, e.schema.name});
    if (it != entries.end())
      throw Error(fmt::format("{}: {} '{}' is already provided by {}", path.string(), component_kind_name(e.schema.kind),
                              e.schema.name, it->second.path.string()));
  }
  for (auto& e : new_entries) {
    Key key{e.schema.kind, e.schema.name};
    entries.emplace(std::move(key), std::move(e));
  }
  loaded.push_back(canonical);
}

PluginRegistry::PluginRegistry() : impl_(std::make_unique<Impl>()) {}
PluginRegistry::~PluginRegistry() = default;

void PluginRegistry::add_search_path(const std::filesystem::path& dir) {
  if (!std::filesystem::is_directory(dir))
    throw Error(fmt::format("{}: plugin path is not a directory", dir.string()));
  const auto canonical = std::filesystem::canonical(dir);
  if (std::find(impl_->search_paths.begin(), impl_->search_paths.end(), canonical) != impl_->search_paths.end()) return;
  impl_->search_paths.push_back(canonical);
  std::vector<std::filesystem::path> libraries;
  for (const auto& f : std::filesystem::directory_iterator(canonical))
    if (f.is_regular_file() && f.path().extension() == ".so") libraries.push_back(f.path());
  std::sort(libraries.begin(), libraries.end());  // deterministic load order
  // Libraries load only from the search-path directories themselves: a symbolic link to a library
  // elsewhere (say a system library, whose constructors dlopen would run) is refused.
  for (const auto& lib : libraries)
    if (std::filesystem::canonical(lib).parent_path() != canonical)
      throw Error(fmt::format("{}: links to {}, outside the plugin path {}: plugins load only from the plugin "
                              "directories themselves",
                              lib.string(), std::filesystem::canonical(lib).string(), canonical.string()));
  for (const auto& lib : libraries) impl_->load_library(lib);
}

const std::vector<std::filesystem::path>& PluginRegistry::search_paths() const { return impl_->search_paths; }

const ComponentSchema* PluginRegistry::find(ComponentKind kind, const std::string& name) const {
  auto it = impl_->entries.find({kind, name});
  return it == impl_->entries.end() ? nullptr : &it->second.schema;
}

std::vector<const ComponentSchema*> PluginRegistry::list(std::optional<ComponentKind> kind) const {
  std::vector<const ComponentSchema*> out;
  for (const auto& [key, e] : impl_->entries)
    if (!kind || key.first == *kind) out.push_back(&e.schema);
  return out;
}

std::vector<std::string> PluginRegistry::names(ComponentKind kind) const {
  std::vector<std::string> out;
  for (const auto& [key, e] : impl_->entries)
    if (key.first == kind) out.push_back(key.second);
  return out;
}

std::filesystem::path PluginRegistry::library_of(ComponentKind kind, const std::string& name) const {
  return impl_->entry(kind, name).path;
}

namespace {

// Wraps a plugin-made object so that its library stays loaded until the object is deleted.
template <class T>
std::shared_ptr<T> keep_library(std::unique_ptr<T> object, const std::shared_ptr<void>& library,
                                const std::string& what) {
  if (!object) throw Error(fmt::format("{}: factory returned nothing", what));
  return std::shared_ptr<T>(object.release(), [library](T* p) { delete p; });
}

}  // namespace

#define PTQLAB_MAKE(Type, member, kind)                                                           \
  std::shared_ptr<Type> PluginRegistry::make_##member(const std::string& name, const Params& params) const { \
    const auto& e = impl_->entry(kind, name);                                                    \
    if (!e.member) throw Error(fmt::format("{} '{}' has no factory", component_kind_name(kind), name)); \
    return keep_library(e.member(params), e.library, name);                                      \
  }
PTQLAB_MAKE(Quantizer, quantizer, ComponentKind::quantizer)
PTQLAB_MAKE(Mask, mask, ComponentKind::mask)
PTQLAB_MAKE(Preprocessor, preprocessor, ComponentKind::preprocessor)
PTQLAB_MAKE(Evaluator, evaluator, ComponentKind::evaluator)
PTQLAB_MAKE(Allocator, allocator, ComponentKind::allocator)
#undef PTQLAB_MAKE

std::filesystem::path PluginRegistry::default_plugin_dir() {
  Dl_info info{};
  if (::dladdr(reinterpret_cast<void*>(&PluginRegistry::default_plugin_dir), &info) == 0 || info.dli_fname == nullptr)
    return {};
  // build/lib/libptqlab_core.so -> build/lib/plugins
  const auto dir = std::filesystem::path(info.dli_fname).parent_path() / "plugins";
  return std::filesystem::is_directory(dir) ? dir : std::filesystem::path{};
}

}  // namespace ptqlab
