#pragma once
// ptqlab subcommands. Each takes the arguments after its name and returns the exit status.
#include <optional>
#include <string>
#include <vector>

#include <boost/program_options.hpp>

namespace ptqlab::cli {

using Args = std::vector<std::string>;

// Parses a subcommand's options; prints "usage: ptqlab COMMAND USAGE" and the options and returns
// nullopt for --help (core/cli/engine_commands.cpp).
std::optional<boost::program_options::variables_map> parse_options(const std::string& command, const std::string& usage,
                                                                  boost::program_options::options_description& desc,
                                                                  boost::program_options::positional_options_description* pos,
                                                                  const Args& args);
}  // namespace ptqlab::cli

namespace ptqlab {
class PluginRegistry;
}

namespace ptqlab::cli {

// The build's plugin directory first, then the --plugin-path directories.
void add_plugin_paths(PluginRegistry& registry, const std::vector<std::string>& extra);

int cmd_ppl(const Args& args);
int cmd_generate(const Args& args);
int cmd_info(const Args& args);
int cmd_run(const Args& args);
int cmd_plugins(const Args& args);
int cmd_report(const Args& args);
int cmd_plot(const Args& args);
int cmd_sweep(const Args& args);
int cmd_synth_model(const Args& args);

}  // namespace ptqlab::cli
