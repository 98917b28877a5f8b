#pragma once

// The `kvrecall` command (docs/cli.md): talks to kvrecalld through
// kvrecall::client. Separated from main() so tests can run it in-process.

#include <ostream>

namespace kvrecall::cli {

// Runs the command line `argv` (argv[0] is the program name), writing results
// to `out` and errors and progress bars to `err`. Returns the exit code: 0 on
// success, 1 when a call failed, 2 for a usage error. Never throws.
int RunCli(int argc, const char* const* argv, std::ostream& out, std::ostream& err);

}  // namespace kvrecall::cli
