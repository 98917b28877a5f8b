#pragma once

// ParamMap: named parameters of index builds and searches ("M=35,ef=500"),
// the same form on the command line, in the RPC and in the index header.
// Each kind documents its keys and rejects unknown ones (a typo must not be
// silently ignored).

#include <cstdint>
#include <initializer_list>
#include <map>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace kvrecall::index {

// Value type; thread-compatible.
class ParamMap {
 public:
  ParamMap() = default;

  // Parses "key=value,key=value" (whitespace around items ignored; empty text
  // is an empty map). INVALID_ARGUMENT on an item without '=' or a repeated key.
  static absl::StatusOr<ParamMap> Parse(absl::string_view text);

  void Set(absl::string_view key, absl::string_view value);
  void SetInt(absl::string_view key, int64_t value);
  void SetDouble(absl::string_view key, double value);
  bool Has(absl::string_view key) const;
  bool empty() const { return values_.empty(); }

  // Typed reads: the default when absent; INVALID_ARGUMENT naming the key when
  // the text does not parse or lies outside [min, max].
  absl::StatusOr<int64_t> GetInt(absl::string_view key, int64_t default_value,
                                 int64_t min = INT64_MIN, int64_t max = INT64_MAX) const;
  absl::StatusOr<double> GetDouble(absl::string_view key, double default_value,
                                   double min = -1e300, double max = 1e300) const;
  absl::StatusOr<bool> GetBool(absl::string_view key, bool default_value) const;
  std::string GetString(absl::string_view key, absl::string_view default_value) const;

  // INVALID_ARGUMENT naming the first key not in `known` (and listing `known`).
  absl::Status CheckKnown(absl::string_view what,
                          std::initializer_list<absl::string_view> known) const;

  // "key=value,..." in key order; Parse(ToString()) gives an equal map.
  std::string ToString() const;
  const std::map<std::string, std::string, std::less<>>& values() const { return values_; }

  friend bool operator==(const ParamMap& a, const ParamMap& b) { return a.values_ == b.values_; }

 private:
  std::map<std::string, std::string, std::less<>> values_;
};

}  // namespace kvrecall::index
