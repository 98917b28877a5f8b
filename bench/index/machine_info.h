#pragma once

// The machine a benchmark ran on, for the header of every benchmark report:
// the CPU model name (lscpu's "Model name", read from /proc/cpuinfo), the
// hardware threads, and the vector path of the score kernels.

#include <string>

namespace kvrecall::bench {

// e.g. "AMD EPYC, 2 hardware threads, score kernel avx512".
std::string MachineDescription();

}  // namespace kvrecall::bench
