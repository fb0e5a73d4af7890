// Includes the runner, which is not part of the plugin SDK: building this must stop with the SDK's
// #error (ctest PluginSdk.InternalHeaderStopsThePluginBuild, docs/plugins.md "Plugin SDK").
#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/engine/runner.hpp"

PTQLAB_PLUGIN(registrar) { (void)registrar; }
