#include "index/params.h"

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"

namespace kvrecall::index {

absl::StatusOr<ParamMap> ParamMap::Parse(absl::string_view text) {
  ParamMap out;
  for (absl::string_view item : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    item = absl::StripAsciiWhitespace(item);
    const size_t eq = item.find('=');
    if (eq == absl::string_view::npos || eq == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("parameter '", item, "' is not of the form key=value"));
    }
    const absl::string_view key = absl::StripAsciiWhitespace(item.substr(0, eq));
    if (out.Has(key)) {
      return absl::InvalidArgumentError(absl::StrCat("parameter '", key, "' given twice"));
    }
    out.Set(key, absl::StripAsciiWhitespace(item.substr(eq + 1)));
  }
  return out;
}

void ParamMap::Set(absl::string_view key, absl::string_view value) {
  values_[std::string(key)] = std::string(value);
}

void ParamMap::SetInt(absl::string_view key, int64_t value) { Set(key, absl::StrCat(value)); }

void ParamMap::SetDouble(absl::string_view key, double value) { Set(key, absl::StrCat(value)); }

bool ParamMap::Has(absl::string_view key) const { return values_.find(key) != values_.end(); }

absl::StatusOr<int64_t> ParamMap::GetInt(absl::string_view key, int64_t default_value,
                                         int64_t min, int64_t max) const {
  auto it = values_.find(key);
  if (it == values_.end()) return default_value;
  int64_t v;
  if (!absl::SimpleAtoi(it->second, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("parameter ", key, "=", it->second, " is not an integer"));
  }
  if (v < min || v > max) {
    return absl::InvalidArgumentError(
        absl::StrCat("parameter ", key, "=", v, " is outside [", min, ", ", max, "]"));
  }
  return v;
}

absl::StatusOr<double> ParamMap::GetDouble(absl::string_view key, double default_value,
                                           double min, double max) const {
  auto it = values_.find(key);
  if (it == values_.end()) return default_value;
  double v;
  if (!absl::SimpleAtod(it->second, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("parameter ", key, "=", it->second, " is not a number"));
  }
  if (!(v >= min && v <= max)) {
    return absl::InvalidArgumentError(
        absl::StrCat("parameter ", key, "=", v, " is outside [", min, ", ", max, "]"));
  }
  return v;
}

absl::StatusOr<bool> ParamMap::GetBool(absl::string_view key, bool default_value) const {
  auto it = values_.find(key);
  if (it == values_.end()) return default_value;
  bool v;
  if (!absl::SimpleAtob(it->second, &v)) {
    return absl::InvalidArgumentError(
        absl::StrCat("parameter ", key, "=", it->second, " is not a boolean"));
  }
  return v;
}

std::string ParamMap::GetString(absl::string_view key, absl::string_view default_value) const {
  auto it = values_.find(key);
  return it == values_.end() ? std::string(default_value) : it->second;
}

absl::Status ParamMap::CheckKnown(absl::string_view what,
                                  std::initializer_list<absl::string_view> known) const {
  for (const auto& [key, value] : values_) {
    bool found = false;
    for (absl::string_view k : known) found = found || k == key;
    if (!found) {
      return absl::InvalidArgumentError(absl::StrCat("unknown ", what, " parameter '", key,
                                                     "' (known: ", absl::StrJoin(known, ", "),
                                                     ")"));
    }
  }
  return absl::OkStatus();
}

std::string ParamMap::ToString() const {
  return absl::StrJoin(values_, ",", absl::PairFormatter("="));
}

}  // namespace kvrecall::index
