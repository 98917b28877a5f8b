#include "service/daemon/additional_services.h"
#include "service/rpc/retrieval_rpc_service.h"

namespace kvrecall::daemon {

std::vector<rpc::ServiceFactory> AdditionalServices(std::vector<std::string>* names) {
  names->push_back("kvrecall.v1.Retrieval");
  return {rpc::RetrievalServiceFactory(retrieval::RetrievalOptions(), rpc::RetrievalRpcOptions())};
}

}  // namespace kvrecall::daemon
