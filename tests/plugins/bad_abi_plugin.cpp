// A plugin claiming a future ABI version: the registry must refuse it.
#include "ptqlab/engine/plugin.hpp"

extern "C" __attribute__((visibility("default"))) int ptqlab_plugin_abi_version() { return PTQLAB_PLUGIN_ABI_VERSION + 998; }
extern "C" __attribute__((visibility("default"))) const char* ptqlab_plugin_build_id() {
  static const std::string id = ptqlab::plugin_build_id();
  return id.c_str();
}
extern "C" __attribute__((visibility("default"))) void ptqlab_plugin_register(ptqlab::PluginRegistrar*) {}
