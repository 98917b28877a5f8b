#include "service/daemon/additional_services.h"

namespace kvrecall::daemon {

std::vector<rpc::ServiceFactory> AdditionalServices(std::vector<std::string>* names) {
  return {};
}

}  // namespace kvrecall::daemon
