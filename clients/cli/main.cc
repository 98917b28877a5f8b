// kvrecall: command-line client of kvrecalld (docs/cli.md).
//
//   kvrecall models
//   kvrecall put --model=m --random=64
//   kvrecall stats --json

#include <iostream>

#include "clients/cli/cli.h"

int main(int argc, char** argv) { return kvrecall::cli::RunCli(argc, argv, std::cout, std::cerr); }
