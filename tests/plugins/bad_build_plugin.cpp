// A plugin with the right ABI number but built against different headers (another Eigen, another
// compiler ABI): its build id differs and the registry must refuse it.
#include "ptqlab/engine/plugin.hpp"

extern "C" __attribute__((visibility("default"))) int ptqlab_plugin_abi_version() { return PTQLAB_PLUGIN_ABI_VERSION; }
extern "C" __attribute__((visibility("default"))) const char* ptqlab_plugin_build_id() {
  return "ptqlab-abi-1/gxx-abi-9999/eigen-2.0.0";
}
extern "C" __attribute__((visibility("default"))) void ptqlab_plugin_register(ptqlab::PluginRegistrar*) {}
