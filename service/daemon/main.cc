// kvrecalld: the kvrecall daemon. Serves the span store over gRPC
// (kvrecall.v1.KvStore, kvrecall.v1.Admin, health, reflection) until SIGTERM
// or SIGINT, then shuts down gracefully: stops accepting calls, lets
// in-flight calls finish within --shutdown_grace_ms, syncs the store.
//
//   kvrecalld                                  # 127.0.0.1:7878, data in ./data
//   kvrecalld --flagfile=deploy/kvrecalld.flags
//   kvrecalld --listen=127.0.0.1:0 --port_file=/tmp/port   # tests

#include <malloc.h>
#include <signal.h>

#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "common/logging.h"
#include "service/cluster/cluster_flags.h"
#include "service/cluster/cluster_node.h"
#include "service/daemon/additional_services.h"
#include "service/daemon/server_flags.h"
#include "service/rpc/admin_service.h"
#include "service/rpc/server.h"
#include "service/store/tiered_store.h"

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "kvrecalld: KV-cache span store daemon (gRPC API kvrecall.v1).\n"
      "Usage: kvrecalld [--flagfile=FILE] [--listen=HOST:PORT] [--data_dir=DIR] ...\n"
      "Every flag is documented in docs/config.md; --helpfull lists them.");
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  if (positional.size() > 1) {
    std::fprintf(stderr, "kvrecalld: unexpected argument '%s' (flags are --name=value)\n",
                 positional[1]);
    return 2;
  }
  absl::StatusOr<kvrecall::rpc::ServerOptions> options =
      kvrecall::daemon::ServerOptionsFromFlags();
  if (!options.ok()) {
    std::fprintf(stderr, "kvrecalld: refusing to start: %s\n",
                 std::string(options.status().message()).c_str());
    return 2;
  }
  // A cluster node with --etcd_endpoints (docs/cluster.md).
  absl::StatusOr<std::optional<kvrecall::cluster::ClusterOptions>> cluster_options =
      kvrecall::cluster::ClusterOptionsFromFlags(*options);
  if (!cluster_options.ok()) {
    std::fprintf(stderr, "kvrecalld: refusing to start: %s\n",
                 std::string(cluster_options.status().message()).c_str());
    return 2;
  }

  // Span payloads are large (up to hundreds of MiB) and short-lived in the
  // RPC path. glibc's defaults map and unmap such blocks, or trim freed heap
  // back to the kernel, so every message would fault in fresh zeroed pages;
  // keep them in the heap instead (measured: 4x less server CPU per GiB on
  // 1 MiB gets, README "Store benchmark").
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 512 << 20);

  // Block the shutdown signals in every thread (gRPC's included, which start
  // later and inherit the mask); main() waits for them with sigwait().
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  std::unique_ptr<kvrecall::cluster::ClusterNode> cluster;
  if (cluster_options->has_value()) {
    options->additional_flags = kvrecall::cluster::ClusterFlagsForConfig();
    absl::StatusOr<std::unique_ptr<kvrecall::cluster::ClusterNode>> node =
        kvrecall::cluster::ClusterNode::Create(**cluster_options);
    if (!node.ok()) {
      std::fprintf(stderr, "kvrecalld: refusing to start: %s\n",
                   std::string(node.status().message()).c_str());
      return 2;
    }
    cluster = std::move(*node);
    kvrecall::cluster::ClusterNode* n = cluster.get();
    options->stats_extension = [n](kvrecall::v1::StatsResponse* r) { n->FillStats(r); };
  }

  std::vector<std::string> effective;
  for (const auto& [name, value] : kvrecall::rpc::ServerOptionsToFlags(*options)) {
    effective.push_back(absl::StrCat("--", name, "=", value));
  }
  KVR_LOG(INFO) << "kvrecalld " << kvrecall::rpc::kKvrecallVersion
                << " effective config: " << absl::StrJoin(effective, " ");

  std::vector<std::string> services = {"kvrecall.v1.KvStore", "kvrecall.v1.Admin"};
  std::vector<kvrecall::rpc::ServiceFactory> additional =
      kvrecall::daemon::AdditionalServices(&services);
  kvrecall::rpc::StoreOpener open_store = &kvrecall::store::TieredStore::Open;
  if (cluster != nullptr) {
    open_store = cluster->WrapStoreOpener(open_store);
    additional = cluster->WrapServices(std::move(additional));
    services.push_back("kvrecall.v1.Cluster");
    services.push_back("kvrecall.v1.ClusterPeer");
  }
  absl::StatusOr<std::unique_ptr<kvrecall::rpc::Server>> server =
      kvrecall::rpc::Server::Create(*options, open_store, additional);
  if (!server.ok()) {
    KVR_LOG(ERROR) << "kvrecalld: cannot start: " << server.status();
    return 1;
  }
  if (cluster != nullptr) {
    const absl::Status joined = cluster->Join();
    if (!joined.ok()) {
      KVR_LOG(ERROR) << "kvrecalld: cannot join the cluster: " << joined;
      (*server)->Shutdown(absl::ZeroDuration()).IgnoreError();
      return 1;
    }
  }
  std::printf("kvrecalld listening on %s\n", (*server)->address().c_str());
  std::fflush(stdout);
  KVR_LOG(INFO) << "serving " << absl::StrJoin(services, ", ")
                << ", grpc.health.v1.Health and server reflection";
  if ((*server)->metrics_port() > 0) {
    KVR_LOG(INFO) << "metrics on http://" << options->listen_address.substr(
                         0, options->listen_address.rfind(':'))
                  << ":" << (*server)->metrics_port() << "/metrics";
  }

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  KVR_LOG(INFO) << "received " << (signal_number == SIGTERM ? "SIGTERM" : "SIGINT")
                << ": shutting down (in-flight calls get " << options->shutdown_grace_ms
                << " ms)";
  if (cluster != nullptr) cluster->Leave();  // peers and clients stop routing here
  const absl::Status status =
      (*server)->Shutdown(absl::Milliseconds(options->shutdown_grace_ms));
  if (cluster != nullptr) cluster->Stop();
  server->reset();
  if (!status.ok()) {
    KVR_LOG(ERROR) << "shutdown: syncing the store failed: " << status;
    return 1;
  }
  KVR_LOG(INFO) << "kvrecalld stopped cleanly";
  return 0;
}
