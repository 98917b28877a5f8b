#pragma once

// The fixture of the kvrecall command's tests: a server in this process on a
// loopback port, over the real store in a temporary directory (with the
// Retrieval service when asked), and the command run against it with its
// output captured. Test-only.

#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "clients/cli/cli.h"
#include "clients/cpp/testing/test_store.h"
#include "gtest/gtest.h"
#include "service/rpc/retrieval_rpc_service.h"
#include "service/rpc/server.h"
#include "tests/testing/status_matchers.h"
#include "tests/testing/test_data.h"
#include <google/protobuf/struct.pb.h>
#include <google/protobuf/util/json_util.h>

namespace kvrecall::cli::testing {

class CliFixture : public ::testing::Test {
 protected:
  // Starts the server on a fresh directory named after `name`; with
  // `retrieval`, it serves kvrecall.v1.Retrieval too.
  void StartServer(const std::string& name, bool retrieval) {
    rpc::ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    dir_ = kvrecall::testing::MakeTempDir(name);
    options.store.data_dir = dir_ + "/data";
    options.store.memory_capacity_bytes = 64 << 20;
    std::vector<rpc::ServiceFactory> services;
    if (retrieval) {
      services.push_back(
          rpc::RetrievalServiceFactory(retrieval::RetrievalOptions(), rpc::RetrievalRpcOptions()));
    }
    KVR_ASSERT_OK_AND_ASSIGN(
        server_, rpc::Server::Create(options, client::testing::TestStoreOpener(), services));
  }

  // Runs `kvrecall --target=<server> --progress=<progress> args...`; returns
  // the exit code, with the output in out_ and err_.
  int Run(std::vector<std::string> args, const std::string& progress = "never") {
    args.insert(args.begin(),
                {"kvrecall", "--target=" + server_->address(), "--progress=" + progress});
    std::vector<const char*> argv;
    for (const auto& a : args) argv.push_back(a.c_str());
    out_.str("");
    err_.str("");
    return RunCli(static_cast<int>(argv.size()), argv.data(), out_, err_);
  }

  // The JSON document the last command printed (--json).
  google::protobuf::Struct Json() {
    google::protobuf::Struct s;
    EXPECT_TRUE(google::protobuf::util::JsonStringToMessage(out_.str(), &s).ok()) << out_.str();
    return s;
  }

  std::string dir_;
  std::unique_ptr<rpc::Server> server_;
  std::ostringstream out_, err_;
};

}  // namespace kvrecall::cli::testing
