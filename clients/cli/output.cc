#include "clients/cli/output.h"

#include <google/protobuf/util/json_util.h>

namespace kvrecall::cli {

int Fail(std::ostream& err, const absl::Status& status) {
  err << "kvrecall: " << absl::StatusCodeToString(status.code()) << ": " << status.message()
      << "\n";
  return kExitFailed;
}

std::string ToJson(const google::protobuf::Message& message) {
  std::string json;
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.always_print_primitive_fields = true;
  options.preserve_proto_field_names = true;
  if (!google::protobuf::util::MessageToJsonString(message, &json, options).ok()) return "{}";
  return json;
}

}  // namespace kvrecall::cli
