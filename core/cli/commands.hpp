#pragma once
// ptqlab subcommands. Each takes the arguments after its name and returns the exit status.
#include <string>
#include <vector>

namespace ptqlab::cli {

using Args = std::vector<std::string>;

int cmd_ppl(const Args& args);
int cmd_generate(const Args& args);
int cmd_info(const Args& args);
int cmd_run(const Args& args);
int cmd_plugins(const Args& args);
int cmd_report(const Args& args);
int cmd_plot(const Args& args);

}  // namespace ptqlab::cli
