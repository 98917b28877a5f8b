#pragma once

// The services kvrecalld serves beside KvStore and Admin, chosen at link time:
// additional_services_retrieval.cc (kvrecall.v1.Retrieval, when
// kvrecall::rpc_retrieval is built) or additional_services_none.cc.

#include <string>
#include <vector>

#include "service/rpc/server.h"

namespace kvrecall::daemon {

// Factories of the additional services, and their names for the startup log.
std::vector<rpc::ServiceFactory> AdditionalServices(std::vector<std::string>* names);

}  // namespace kvrecall::daemon
