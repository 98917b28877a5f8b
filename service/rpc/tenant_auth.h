#pragma once

// Maps bearer tokens to tenants. A tenant is an isolated namespace of spans
// (service/store/span.h SpanKey::tenant).
//
// The tenants file (--tenants_file) has one "<tenant_id> <token>" pair per
// line; blank lines and lines starting with '#' are ignored. A tenant may have
// several tokens; a token names one tenant. Tenant ids are 1..64 characters of
// [A-Za-z0-9._-]; tokens are 16..512 printable characters without spaces.
//
// Without a tenants file authentication is off: every call belongs to the
// default tenant "". With one, every call must carry the metadata
// `authorization: Bearer <token>`.

#include <memory>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include <grpcpp/server_context.h>

namespace kvrecall::rpc {

// Thread-safe (immutable after creation).
class TenantAuthenticator {
 public:
  // Authentication off: every call is the default tenant "".
  static std::unique_ptr<TenantAuthenticator> Disabled();
  // Parses the text of a tenants file. INVALID_ARGUMENT naming the line on a
  // malformed line, a bad tenant id or token, a duplicate token, or no pairs.
  static absl::StatusOr<std::unique_ptr<TenantAuthenticator>> FromText(absl::string_view text);
  // Reads and parses a tenants file. NOT_FOUND when it does not exist.
  static absl::StatusOr<std::unique_ptr<TenantAuthenticator>> FromFile(const std::string& path);

  bool enabled() const { return enabled_; }
  int num_tenants() const { return num_tenants_; }

  // The tenant of a bearer token; UNAUTHENTICATED when unknown.
  absl::StatusOr<std::string> TenantForToken(absl::string_view token) const;
  // The tenant of a call from its `authorization` metadata. UNAUTHENTICATED
  // when authentication is on and the metadata is missing, malformed or names
  // an unknown token.
  absl::StatusOr<std::string> Authenticate(const grpc::ServerContextBase& context) const;

 private:
  TenantAuthenticator() = default;

  bool enabled_ = false;
  int num_tenants_ = 0;
  absl::flat_hash_map<std::string, std::string> tenant_by_token_;
};

}  // namespace kvrecall::rpc
