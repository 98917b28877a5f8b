#pragma once

// Maps bearer tokens to tenants. A tenant is an isolated namespace of spans,
// contexts, index builds, indexes and artifacts (docs/security.md).
//
// The tenants file (--tenants_file) has one line per token:
//
//   <tenant_id> <token> [admin] [group=<name>]
//
// Blank lines and lines starting with '#' are ignored. A tenant may have
// several tokens; a token names one tenant. Tenant ids are 1..64 characters
// of [A-Za-z0-9._-]; tokens are 16..512 printable characters without spaces.
// `admin` gives the tenant the admin role (Admin.Stats, Admin.GetConfig's
// options, artifacts in the shared namespace). `group=<name>` (same charset as
// tenant ids) puts the tenant in a trust group: only tenants of one group learn
// that a span they miss exists under another of them (miss reason
// other_namespace); for every other pair the miss says never_stored. Every
// line of a tenant must give the same role and group.
//
// Without a tenants file authentication is off: every call belongs to the
// default tenant "", which is an admin. With one, every call must carry the
// metadata `authorization: Bearer <token>`.
//
// Token lookup compares the presented token with every known token in
// constant time (no early exit, no hash-table probe whose timing depends on
// the token), so response times say nothing about how close a guess was.

#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include <grpcpp/server_context.h>

namespace kvrecall::rpc {

// Who makes a call.
struct Principal {
  std::string tenant;  // "" is the default tenant (authentication off)
  bool admin = false;
  std::string group;   // "" = in no trust group
};

// Thread-safe (immutable after creation).
class TenantAuthenticator {
 public:
  // Authentication off: every call is the default tenant "", an admin.
  static std::unique_ptr<TenantAuthenticator> Disabled();
  // Parses the text of a tenants file. INVALID_ARGUMENT naming the line on a
  // malformed line, a bad tenant id, token or option, a duplicate token,
  // lines of one tenant that disagree on role or group, or no pairs.
  static absl::StatusOr<std::unique_ptr<TenantAuthenticator>> FromText(absl::string_view text);
  // Reads and parses a tenants file. NOT_FOUND when it does not exist.
  static absl::StatusOr<std::unique_ptr<TenantAuthenticator>> FromFile(const std::string& path);

  bool enabled() const { return enabled_; }
  int num_tenants() const { return static_cast<int>(principals_.size()); }

  // The tenant of a bearer token; UNAUTHENTICATED when unknown.
  absl::StatusOr<std::string> TenantForToken(absl::string_view token) const;
  absl::StatusOr<Principal> PrincipalForToken(absl::string_view token) const;
  // The tenant of a call from its `authorization` metadata. UNAUTHENTICATED
  // when authentication is on and the metadata is missing, malformed or names
  // an unknown token.
  absl::StatusOr<std::string> Authenticate(const grpc::ServerContextBase& context) const;
  absl::StatusOr<Principal> AuthenticatePrincipal(const grpc::ServerContextBase& context) const;

  // Whether `a` may learn that `b` holds a span (both in one non-empty trust
  // group, or the same tenant).
  bool ShareNamespace(absl::string_view a, absl::string_view b) const;

 private:
  TenantAuthenticator() = default;

  struct TokenEntry {
    std::string token;
    std::string tenant;
  };

  bool enabled_ = false;
  std::vector<TokenEntry> tokens_;
  absl::flat_hash_map<std::string, Principal> principals_;  // by tenant id
};

}  // namespace kvrecall::rpc
