#include "service/rpc/tenant_auth.h"

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/npy.h"
#include "common/status_macros.h"

namespace kvrecall::rpc {
namespace {

bool ValidTenantId(absl::string_view id) {
  if (id.empty() || id.size() > 64) return false;
  for (char c : id) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
      return false;
    }
  }
  return true;
}

bool ValidToken(absl::string_view token) {
  if (token.size() < 16 || token.size() > 512) return false;
  for (char c : token) {
    if (!absl::ascii_isgraph(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

}  // namespace

std::unique_ptr<TenantAuthenticator> TenantAuthenticator::Disabled() {
  return std::unique_ptr<TenantAuthenticator>(new TenantAuthenticator());
}

absl::StatusOr<std::unique_ptr<TenantAuthenticator>> TenantAuthenticator::FromText(
    absl::string_view text) {
  std::unique_ptr<TenantAuthenticator> auth(new TenantAuthenticator());
  auth->enabled_ = true;
  absl::flat_hash_set<std::string> tenants;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (fields.size() != 2) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tenants file line ", line_no, ": expected \"<tenant_id> <token>\", got ",
          fields.size(), " fields"));
    }
    if (!ValidTenantId(fields[0])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tenants file line ", line_no, ": tenant id must be 1..64 characters of [A-Za-z0-9._-]"));
    }
    if (!ValidToken(fields[1])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tenants file line ", line_no,
          ": token must be 16..512 printable characters without spaces"));
    }
    if (!auth->tenant_by_token_.emplace(std::string(fields[1]), std::string(fields[0])).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("tenants file line ", line_no, ": duplicate token"));
    }
    tenants.insert(std::string(fields[0]));
  }
  if (auth->tenant_by_token_.empty()) {
    return absl::InvalidArgumentError("tenants file names no tenant");
  }
  auth->num_tenants_ = static_cast<int>(tenants.size());
  return auth;
}

absl::StatusOr<std::unique_ptr<TenantAuthenticator>> TenantAuthenticator::FromFile(
    const std::string& path) {
  KVR_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  auto auth = FromText(text);
  if (!auth.ok()) {
    return absl::Status(auth.status().code(), absl::StrCat(path, ": ", auth.status().message()));
  }
  return auth;
}

absl::StatusOr<std::string> TenantAuthenticator::TenantForToken(absl::string_view token) const {
  if (!enabled_) return std::string();
  auto it = tenant_by_token_.find(token);
  if (it == tenant_by_token_.end()) return absl::UnauthenticatedError("unknown bearer token");
  return it->second;
}

absl::StatusOr<std::string> TenantAuthenticator::Authenticate(
    const grpc::ServerContextBase& context) const {
  if (!enabled_) return std::string();
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) {
    return absl::UnauthenticatedError(
        "missing metadata 'authorization: Bearer <token>' (the daemon runs with a tenants file)");
  }
  absl::string_view value(it->second.data(), it->second.size());
  constexpr absl::string_view kBearer = "Bearer ";
  if (!absl::StartsWithIgnoreCase(value, kBearer)) {
    return absl::UnauthenticatedError("authorization metadata must be 'Bearer <token>'");
  }
  return TenantForToken(absl::StripAsciiWhitespace(value.substr(kBearer.size())));
}

}  // namespace kvrecall::rpc
