#pragma once
// Marks the core header that includes it as internal: not part of the plugin SDK (docs/plugins.md,
// "Plugin SDK"). Plugins are compiled with PTQLAB_PLUGIN_SDK_ONLY (plugins/CMakeLists.txt), so a
// plugin that includes an internal header, directly or through another, fails to build here
// instead of depending on something that may change without an ABI version bump.
#if defined(PTQLAB_PLUGIN_SDK_ONLY)
#error "this ptqlab header is not part of the plugin SDK (docs/plugins.md, \"Plugin SDK\"); the include stack above names it"
#endif
