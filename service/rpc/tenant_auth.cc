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

constexpr size_t kMaxTokenBytes = 512;

bool ValidName(absl::string_view id) {
  if (id.empty() || id.size() > 64) return false;
  for (char c : id) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
      return false;
    }
  }
  return true;
}

bool ValidToken(absl::string_view token) {
  if (token.size() < 16 || token.size() > kMaxTokenBytes) return false;
  for (char c : token) {
    if (!absl::ascii_isgraph(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

// Equality of two strings of at most kMaxTokenBytes in time independent of
// where they differ (and of `a`'s contents): every byte position up to the
// maximum length is visited.
bool ConstantTimeEquals(absl::string_view a, absl::string_view b) {
  volatile unsigned char diff = static_cast<unsigned char>(a.size() != b.size());
  for (size_t i = 0; i < kMaxTokenBytes; ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    const unsigned char y = i < b.size() ? static_cast<unsigned char>(b[i]) : 0;
    diff = static_cast<unsigned char>(diff | (x ^ y));
  }
  return diff == 0;
}

}  // namespace

std::unique_ptr<TenantAuthenticator> TenantAuthenticator::Disabled() {
  std::unique_ptr<TenantAuthenticator> auth(new TenantAuthenticator());
  auth->principals_[""] = Principal{"", /*admin=*/true, ""};
  return auth;
}

absl::StatusOr<std::unique_ptr<TenantAuthenticator>> TenantAuthenticator::FromText(
    absl::string_view text) {
  std::unique_ptr<TenantAuthenticator> auth(new TenantAuthenticator());
  auth->enabled_ = true;
  absl::flat_hash_set<std::string> tokens;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    if (fields.size() < 2 || fields.size() > 4) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tenants file line ", line_no,
          ": expected \"<tenant_id> <token> [admin] [group=<name>]\", got ", fields.size(),
          " fields"));
    }
    if (!ValidName(fields[0])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tenants file line ", line_no, ": tenant id must be 1..64 characters of [A-Za-z0-9._-]"));
    }
    if (!ValidToken(fields[1])) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tenants file line ", line_no,
          ": token must be 16..512 printable characters without spaces"));
    }
    Principal p;
    p.tenant = std::string(fields[0]);
    for (size_t i = 2; i < fields.size(); ++i) {
      if (fields[i] == "admin" && !p.admin) {
        p.admin = true;
      } else if (absl::StartsWith(fields[i], "group=") && p.group.empty() &&
                 ValidName(fields[i].substr(6))) {
        p.group = std::string(fields[i].substr(6));
      } else {
        return absl::InvalidArgumentError(absl::StrCat(
            "tenants file line ", line_no, ": unknown option '", fields[i],
            "' (options: admin, group=<name> with a name of [A-Za-z0-9._-])"));
      }
    }
    if (!tokens.insert(std::string(fields[1])).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("tenants file line ", line_no, ": duplicate token"));
    }
    auto [it, inserted] = auth->principals_.emplace(p.tenant, p);
    if (!inserted && (it->second.admin != p.admin || it->second.group != p.group)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tenants file line ", line_no, ": tenant ", p.tenant,
          " has another role or group on an earlier line; give every line of a tenant the same"));
    }
    auth->tokens_.push_back(TokenEntry{std::string(fields[1]), p.tenant});
  }
  if (auth->tokens_.empty()) return absl::InvalidArgumentError("tenants file names no tenant");
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

absl::StatusOr<Principal> TenantAuthenticator::PrincipalForToken(absl::string_view token) const {
  if (!enabled_) return principals_.at("");
  // Every entry is compared, in constant time each: the time taken depends on
  // the number of tokens only.
  const TokenEntry* found = nullptr;
  for (const TokenEntry& e : tokens_) {
    const bool match = ConstantTimeEquals(token, e.token);
    if (match) found = &e;
  }
  if (found == nullptr || token.size() > kMaxTokenBytes) {
    return absl::UnauthenticatedError("unknown bearer token");
  }
  return principals_.at(found->tenant);
}

absl::StatusOr<std::string> TenantAuthenticator::TenantForToken(absl::string_view token) const {
  KVR_ASSIGN_OR_RETURN(Principal p, PrincipalForToken(token));
  return p.tenant;
}

absl::StatusOr<Principal> TenantAuthenticator::AuthenticatePrincipal(
    const grpc::ServerContextBase& context) const {
  if (!enabled_) return principals_.at("");
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
  return PrincipalForToken(absl::StripAsciiWhitespace(value.substr(kBearer.size())));
}

absl::StatusOr<std::string> TenantAuthenticator::Authenticate(
    const grpc::ServerContextBase& context) const {
  KVR_ASSIGN_OR_RETURN(Principal p, AuthenticatePrincipal(context));
  return p.tenant;
}

bool TenantAuthenticator::ShareNamespace(absl::string_view a, absl::string_view b) const {
  if (a == b) return true;
  auto ia = principals_.find(a);
  auto ib = principals_.find(b);
  if (ia == principals_.end() || ib == principals_.end()) return false;
  return !ia->second.group.empty() && ia->second.group == ib->second.group;
}

}  // namespace kvrecall::rpc
