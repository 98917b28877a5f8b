#include "gpu/worker/policy.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "common/status_macros.h"

namespace kvrecall::worker {
namespace {

using Json = nlohmann::json;

std::string LayerPrefix(int32_t l) { return absl::StrCat("layer ", l, ": "); }

absl::Status LayerError(int32_t l, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat(LayerPrefix(l), message));
}

bool IsLocalKind(absl::string_view kind) {
  for (const char* k : kLocalSelectKinds) {
    if (kind == k) return true;
  }
  return false;
}

bool IsRemoteKind(absl::string_view kind) {
  for (const char* k : kRemoteSelectKinds) {
    if (kind == k) return true;
  }
  return false;
}

std::string KindList(bool remote) {
  std::vector<std::string> names;
  if (remote) {
    for (const char* k : kRemoteSelectKinds) names.emplace_back(k);
  } else {
    for (const char* k : kLocalSelectKinds) names.emplace_back(k);
  }
  return absl::StrJoin(names, ", ");
}

// "key=value,..." as pairs; INVALID_ARGUMENT (without a layer prefix) when
// an entry is not key=value or a key repeats.
absl::StatusOr<std::vector<std::pair<std::string, std::string>>> ParseKnobs(
    absl::string_view knobs) {
  std::vector<std::pair<std::string, std::string>> out;
  std::set<std::string> seen;
  for (absl::string_view entry : absl::StrSplit(knobs, ',', absl::SkipWhitespace())) {
    entry = absl::StripAsciiWhitespace(entry);
    const size_t eq = entry.find('=');
    if (eq == absl::string_view::npos || eq == 0 || eq + 1 == entry.size()) {
      return absl::InvalidArgumentError(
          absl::StrCat("knobs \"", knobs, "\": entry \"", entry, "\" is not key=value"));
    }
    std::string key(absl::StripAsciiWhitespace(entry.substr(0, eq)));
    std::string value(absl::StripAsciiWhitespace(entry.substr(eq + 1)));
    if (!seen.insert(key).second) {
      return absl::InvalidArgumentError(
          absl::StrCat("knobs \"", knobs, "\": key \"", key, "\" repeats"));
    }
    out.emplace_back(std::move(key), std::move(value));
  }
  return out;
}

absl::Status ValidateBudget(const Budget& b, int32_t l, absl::string_view role) {
  if (b.k < 0) return LayerError(l, absl::StrCat("k must be >= 1, got ", b.k));
  if (std::isnan(b.fraction) || b.fraction < 0 || b.fraction > 1) {
    return LayerError(l, absl::StrCat("budget must be a fraction in (0, 1], got ", b.fraction));
  }
  if (b.k > 0 && b.fraction > 0) {
    return LayerError(l, absl::StrCat("a ", role, " layer takes k or budget, not both"));
  }
  return absl::OkStatus();
}

// The knobs a local selection kind understands.
absl::Status ValidateLocalKnobs(const LayerSpec& spec, int32_t l) {
  absl::StatusOr<std::vector<std::pair<std::string, std::string>>> knobs = ParseKnobs(spec.knobs);
  if (!knobs.ok()) return LayerError(l, knobs.status().message());
  for (const auto& [key, value] : *knobs) {
    int64_t v = 0;
    if (spec.kind == "loki" && key == "rank") {
      if (!absl::SimpleAtoi(value, &v) || (v != 16 && v != 32 && v != 64)) {
        return LayerError(l, absl::StrCat("local loki knob rank=", value, ": use 16, 32 or 64"));
      }
    } else if (spec.kind == "quest" && key == "page") {
      if (!absl::SimpleAtoi(value, &v) || v < 1) {
        return LayerError(l, absl::StrCat("local quest knob page=", value,
                                          ": a positive number of tokens per page"));
      }
    } else {
      return LayerError(l, absl::StrCat("local ", spec.kind, " has no knob \"", key, "\"",
                                        spec.kind == "loki"    ? " (it takes rank=R)"
                                        : spec.kind == "quest" ? " (it takes page=P)"
                                                               : " (it takes none)"));
    }
  }
  return absl::OkStatus();
}

// Fields a role does not use must keep their defaults.
absl::Status CheckUnused(const LayerSpec& s, int32_t l, bool where, bool kind, bool budget,
                         bool effort, bool knobs, bool source) {
  const char* role = LayerRoleName(s.role);
  auto unused = [&](absl::string_view field) {
    return LayerError(l, absl::StrCat("a ", role, " layer takes no ", field));
  };
  if (!where && s.where != SelectWhere::kLocal) return unused("where");
  if (!kind && !s.kind.empty()) return unused("kind");
  if (!budget && !s.budget.empty()) return unused("budget (it attends to its source's selection)");
  if (!effort && s.effort != 0) return unused("effort");
  if (!knobs && !s.knobs.empty()) return unused("knobs");
  if (!source && s.source != -1) return unused("source");
  return absl::OkStatus();
}

absl::Status ValidateLayer(const LayerPolicy& p, int32_t l) {
  const LayerSpec& s = p.layers[static_cast<size_t>(l)];
  switch (s.role) {
    case LayerRole::kFull:
      KVR_RETURN_IF_ERROR(CheckUnused(s, l, false, false, true, false, false, false));
      return ValidateBudget(s.budget, l, "full");
    case LayerRole::kSelect: {
      KVR_RETURN_IF_ERROR(CheckUnused(s, l, true, true, true, true, true, false));
      const bool remote = s.where == SelectWhere::kRemote;
      if (s.where != SelectWhere::kLocal && !remote) {
        return LayerError(l, "where must be local or remote");
      }
      if (s.kind.empty()) {
        return LayerError(l, absl::StrCat("a select layer needs a kind (", KindList(remote), ")"));
      }
      if (remote ? !IsRemoteKind(s.kind) : !IsLocalKind(s.kind)) {
        return LayerError(l, absl::StrCat("unknown ", remote ? "remote" : "local", " kind \"",
                                          s.kind, "\" (", KindList(remote), ")"));
      }
      KVR_RETURN_IF_ERROR(ValidateBudget(s.budget, l, "select"));
      if (s.budget.empty()) return LayerError(l, "a select layer needs k or budget");
      if (s.effort < 0) return LayerError(l, absl::StrCat("effort must be >= 0, got ", s.effort));
      if (!remote && s.effort != 0) {
        return LayerError(l, "effort applies to remote selection only (local knobs go in knobs)");
      }
      if (remote) {
        absl::StatusOr<std::vector<std::pair<std::string, std::string>>> knobs =
            ParseKnobs(s.knobs);
        if (!knobs.ok()) return LayerError(l, knobs.status().message());
        return absl::OkStatus();
      }
      return ValidateLocalKnobs(s, l);
    }
    case LayerRole::kReuse: {
      KVR_RETURN_IF_ERROR(CheckUnused(s, l, false, false, false, false, false, true));
      if (s.source < 0 || s.source >= l) {
        return LayerError(l, absl::StrCat("reuse of layer ", s.source,
                                          ", which is not an earlier layer"));
      }
      const LayerSpec& src = p.layers[static_cast<size_t>(s.source)];
      if (src.role == LayerRole::kFull && src.budget.empty()) {
        return LayerError(l, absl::StrCat("reuse of layer ", s.source,
                                          ", which selects nothing (a full layer without a "
                                          "budget)"));
      }
      if (src.role == LayerRole::kReuse) {
        return LayerError(l, absl::StrCat("reuse of layer ", s.source,
                                          ", which selects nothing (it reuses layer ", src.source,
                                          "; name that layer)"));
      }
      return absl::OkStatus();
    }
  }
  return LayerError(l, absl::StrCat("unknown role ", static_cast<int>(s.role)));
}

// --- JSON --------------------------------------------------------------------

std::string TypeName(const Json& j) { return j.type_name(); }

// The value of a JSON number that must be an integer in [lo, hi].
absl::StatusOr<int64_t> IntField(const Json& j, absl::string_view field, absl::string_view prefix,
                                 int64_t lo, int64_t hi) {
  if (!j.is_number_integer()) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, "field '", field,
                                                   "' must be an integer, got ", TypeName(j), " ",
                                                   j.dump()));
  }
  int64_t v;
  if (j.is_number_unsigned()) {
    const uint64_t u = j.get<uint64_t>();
    v = u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())
            ? std::numeric_limits<int64_t>::max()
            : static_cast<int64_t>(u);
  } else {
    v = j.get<int64_t>();
  }
  if (v < lo || v > hi) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, "field '", field, "' must be in [", lo,
                                                   ", ", hi, "], got ", j.dump()));
  }
  return v;
}

absl::StatusOr<std::string> StringField(const Json& j, absl::string_view field,
                                        absl::string_view prefix) {
  if (!j.is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(prefix, "field '", field,
                                                   "' must be a string, got ", TypeName(j), " ",
                                                   j.dump()));
  }
  return j.get<std::string>();
}

absl::StatusOr<LayerSpec> ParseLayer(const Json& j, int32_t l) {
  const std::string prefix = LayerPrefix(l);
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(prefix, "must be an object, got ", TypeName(j), " ", j.dump()));
  }
  auto it = j.find("role");
  if (it == j.end()) return LayerError(l, "field 'role' is required (full, select or reuse)");
  KVR_ASSIGN_OR_RETURN(std::string role, StringField(*it, "role", prefix));
  LayerSpec spec;
  std::vector<std::string> allowed;
  if (role == "full") {
    spec.role = LayerRole::kFull;
    allowed = {"role", "k", "budget"};
  } else if (role == "select") {
    spec.role = LayerRole::kSelect;
    allowed = {"role", "where", "kind", "k", "budget", "effort", "knobs"};
  } else if (role == "reuse") {
    spec.role = LayerRole::kReuse;
    allowed = {"role", "source"};
  } else {
    return LayerError(l, absl::StrCat("unknown role \"", role, "\" (full, select or reuse)"));
  }
  static const std::set<std::string> kKnown = {"role",   "where", "kind",  "k",
                                               "budget", "effort", "knobs", "source"};
  for (const auto& [key, value] : j.items()) {
    if (kKnown.count(key) == 0) return LayerError(l, absl::StrCat("unknown field '", key, "'"));
    if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) {
      return LayerError(l, absl::StrCat("field '", key, "' does not apply to a ", role, " layer"));
    }
  }
  if (auto f = j.find("where"); f != j.end()) {
    KVR_ASSIGN_OR_RETURN(std::string where, StringField(*f, "where", prefix));
    if (where == "local") {
      spec.where = SelectWhere::kLocal;
    } else if (where == "remote") {
      spec.where = SelectWhere::kRemote;
    } else {
      return LayerError(l, absl::StrCat("field 'where' must be \"local\" or \"remote\", got \"",
                                        where, "\""));
    }
  } else if (spec.role == LayerRole::kSelect) {
    return LayerError(l, "field 'where' is required for a select layer (local or remote)");
  }
  if (auto f = j.find("kind"); f != j.end()) {
    KVR_ASSIGN_OR_RETURN(spec.kind, StringField(*f, "kind", prefix));
  }
  if (auto f = j.find("k"); f != j.end()) {
    KVR_ASSIGN_OR_RETURN(int64_t k, IntField(*f, "k", prefix, 1,
                                             std::numeric_limits<int32_t>::max()));
    spec.budget.k = static_cast<int32_t>(k);
  }
  if (auto f = j.find("budget"); f != j.end()) {
    if (!f->is_number()) {
      return LayerError(l, absl::StrCat("field 'budget' must be a number in (0, 1], got ",
                                        TypeName(*f), " ", f->dump()));
    }
    spec.budget.fraction = f->get<double>();
    if (!(spec.budget.fraction > 0 && spec.budget.fraction <= 1)) {
      return LayerError(l, absl::StrCat("field 'budget' must be a fraction in (0, 1], got ",
                                        f->dump()));
    }
  }
  if (auto f = j.find("effort"); f != j.end()) {
    KVR_ASSIGN_OR_RETURN(spec.effort, IntField(*f, "effort", prefix, 0,
                                               std::numeric_limits<int64_t>::max()));
  }
  if (auto f = j.find("knobs"); f != j.end()) {
    KVR_ASSIGN_OR_RETURN(spec.knobs, StringField(*f, "knobs", prefix));
  }
  if (auto f = j.find("source"); f != j.end()) {
    KVR_ASSIGN_OR_RETURN(int64_t s, IntField(*f, "source", prefix, 0,
                                             std::numeric_limits<int32_t>::max()));
    spec.source = static_cast<int32_t>(s);
  } else if (spec.role == LayerRole::kReuse) {
    return LayerError(l, "field 'source' is required for a reuse layer");
  }
  return spec;
}

// One layer as a single-line JSON object, fields in a fixed order.
std::string LayerJson(const LayerSpec& s) {
  std::vector<std::string> fields;
  auto add = [&](absl::string_view key, const Json& value) {
    fields.push_back(absl::StrCat("\"", key, "\": ", value.dump()));
  };
  add("role", LayerRoleName(s.role));
  if (s.role == LayerRole::kSelect) {
    add("where", s.where == SelectWhere::kRemote ? "remote" : "local");
    add("kind", s.kind);
  }
  if (s.role != LayerRole::kReuse) {
    if (s.budget.k > 0) add("k", s.budget.k);
    if (s.budget.fraction > 0) add("budget", s.budget.fraction);
  }
  if (s.role == LayerRole::kSelect) {
    if (s.effort != 0) add("effort", s.effort);
    if (!s.knobs.empty()) add("knobs", s.knobs);
  }
  if (s.role == LayerRole::kReuse) add("source", s.source);
  return absl::StrCat("{", absl::StrJoin(fields, ", "), "}");
}

std::string BudgetText(const Budget& b) {
  if (b.k > 0) return absl::StrCat("k=", b.k);
  if (b.fraction > 0) return absl::StrCat("budget=", b.fraction);
  return "";
}

}  // namespace

const char* LayerRoleName(LayerRole role) {
  switch (role) {
    case LayerRole::kFull:
      return "full";
    case LayerRole::kSelect:
      return "select";
    case LayerRole::kReuse:
      return "reuse";
  }
  return "unknown";
}

int64_t Budget::Resolve(int64_t tokens) const {
  if (k > 0) return k;
  if (fraction <= 0) return 0;
  // The small slack keeps products such as 0.02 * 100 (2.0000000000000004 in
  // binary) from rounding up to one more position.
  const double want = std::ceil(fraction * static_cast<double>(tokens) - 1e-9);
  return std::max<int64_t>(1, static_cast<int64_t>(want));
}

bool LayerPolicy::Selects(int32_t l) const {
  if (l < 0 || l >= num_layers()) return false;
  const LayerSpec& s = layers[static_cast<size_t>(l)];
  return s.role == LayerRole::kSelect || (s.role == LayerRole::kFull && !s.budget.empty());
}

bool LayerPolicy::IsReused(int32_t l) const {
  for (int32_t j = l + 1; j < num_layers(); ++j) {
    const LayerSpec& s = layers[static_cast<size_t>(j)];
    if (s.role == LayerRole::kReuse && s.source == l) return true;
  }
  return false;
}

int32_t LayerPolicy::CountRole(LayerRole role) const {
  return static_cast<int32_t>(std::count_if(layers.begin(), layers.end(),
                                            [&](const LayerSpec& s) { return s.role == role; }));
}

absl::Status ValidatePolicy(const LayerPolicy& policy) {
  if (policy.layers.empty()) return absl::InvalidArgumentError("a policy needs at least one layer");
  if (policy.sinks < 0) {
    return absl::InvalidArgumentError(absl::StrCat("sinks must be >= 0, got ", policy.sinks));
  }
  if (policy.window < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("window must be >= 1 (the current token is always attended), got ",
                     policy.window));
  }
  for (int32_t l = 0; l < policy.num_layers(); ++l) KVR_RETURN_IF_ERROR(ValidateLayer(policy, l));
  return absl::OkStatus();
}

absl::StatusOr<LayerPolicy> ParsePolicyJson(absl::string_view text) {
  // Duplicate keys are an error (nlohmann keeps the last one silently); the
  // parser callback sees every key of every object.
  std::vector<std::set<std::string>> keys;
  std::string duplicate;
  Json::parser_callback_t on_event = [&](int depth, Json::parse_event_t event, Json& parsed) {
    if (event == Json::parse_event_t::object_start) {
      keys.emplace_back();
    } else if (event == Json::parse_event_t::object_end) {
      if (!keys.empty()) keys.pop_back();
    } else if (event == Json::parse_event_t::key && !keys.empty() && parsed.is_string()) {
      if (!keys.back().insert(parsed.get<std::string>()).second && duplicate.empty()) {
        duplicate = parsed.get<std::string>();
      }
    }
    return true;
  };
  Json j;
  // nlohmann reports syntax errors (with their line and column) only by
  // exception; it is caught here, in the one place the library is used.
  try {
    j = Json::parse(text.begin(), text.end(), on_event, /*allow_exceptions=*/true,
                    /*ignore_comments=*/false);
  } catch (const Json::exception& e) {
    absl::string_view what = e.what();
    if (const size_t close = what.find("] "); close != absl::string_view::npos) {
      what.remove_prefix(close + 2);
    }
    return absl::InvalidArgumentError(absl::StrCat("layer policy is not valid JSON: ", what));
  }
  if (!duplicate.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("field '", duplicate, "' appears twice"));
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat("a layer policy is a JSON object, got ", TypeName(j)));
  }
  static const std::set<std::string> kTop = {"format", "name",   "model", "num_layers",
                                             "sinks",  "window", "layers"};
  for (const auto& [key, value] : j.items()) {
    if (kTop.count(key) == 0) {
      return absl::InvalidArgumentError(absl::StrCat("unknown field '", key, "'"));
    }
  }
  auto f = j.find("format");
  if (f == j.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("field 'format' is required (\"", kLayerPolicyFormat, "\")"));
  }
  KVR_ASSIGN_OR_RETURN(std::string format, StringField(*f, "format", ""));
  if (format != kLayerPolicyFormat) {
    return absl::InvalidArgumentError(absl::StrCat("unknown format \"", format,
                                                   "\" (this version reads \"",
                                                   kLayerPolicyFormat, "\")"));
  }
  LayerPolicy p;
  if (auto it = j.find("name"); it != j.end()) {
    KVR_ASSIGN_OR_RETURN(p.name, StringField(*it, "name", ""));
  }
  if (auto it = j.find("model"); it != j.end()) {
    KVR_ASSIGN_OR_RETURN(p.model_id, StringField(*it, "model", ""));
  }
  if (auto it = j.find("sinks"); it != j.end()) {
    KVR_ASSIGN_OR_RETURN(int64_t v, IntField(*it, "sinks", "", 0,
                                             std::numeric_limits<int32_t>::max()));
    p.sinks = static_cast<int32_t>(v);
  }
  if (auto it = j.find("window"); it != j.end()) {
    KVR_ASSIGN_OR_RETURN(int64_t v, IntField(*it, "window", "", 1,
                                             std::numeric_limits<int32_t>::max()));
    p.window = static_cast<int32_t>(v);
  }
  auto n = j.find("num_layers");
  if (n == j.end()) return absl::InvalidArgumentError("field 'num_layers' is required");
  KVR_ASSIGN_OR_RETURN(int64_t num_layers, IntField(*n, "num_layers", "", 1, 1 << 20));
  auto layers = j.find("layers");
  if (layers == j.end()) return absl::InvalidArgumentError("field 'layers' is required");
  if (!layers->is_array()) {
    return absl::InvalidArgumentError(
        absl::StrCat("field 'layers' must be an array, got ", TypeName(*layers)));
  }
  if (static_cast<int64_t>(layers->size()) != num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("num_layers is ", num_layers, " but 'layers' has ",
                                                   layers->size(), " entries"));
  }
  for (size_t l = 0; l < layers->size(); ++l) {
    KVR_ASSIGN_OR_RETURN(LayerSpec spec, ParseLayer((*layers)[l], static_cast<int32_t>(l)));
    p.layers.push_back(std::move(spec));
  }
  KVR_RETURN_IF_ERROR(ValidatePolicy(p));
  return p;
}

std::string PolicyToJson(const LayerPolicy& policy) {
  std::string out = "{\n";
  absl::StrAppend(&out, "  \"format\": ", Json(kLayerPolicyFormat).dump(), ",\n");
  absl::StrAppend(&out, "  \"name\": ", Json(policy.name).dump(), ",\n");
  if (!policy.model_id.empty()) {
    absl::StrAppend(&out, "  \"model\": ", Json(policy.model_id).dump(), ",\n");
  }
  absl::StrAppend(&out, "  \"num_layers\": ", policy.num_layers(), ",\n");
  absl::StrAppend(&out, "  \"sinks\": ", policy.sinks, ",\n");
  absl::StrAppend(&out, "  \"window\": ", policy.window, ",\n");
  absl::StrAppend(&out, "  \"layers\": [");
  for (size_t l = 0; l < policy.layers.size(); ++l) {
    absl::StrAppend(&out, l == 0 ? "\n" : ",\n", "    ", LayerJson(policy.layers[l]));
  }
  absl::StrAppend(&out, policy.layers.empty() ? "]\n" : "\n  ]\n", "}\n");
  return out;
}

std::string PolicySummary(const LayerPolicy& policy) {
  std::vector<std::string> parts;
  for (int32_t l = 0; l < policy.num_layers(); ++l) {
    const LayerSpec& s = policy.layers[static_cast<size_t>(l)];
    std::string text = absl::StrCat("L", l, " ");
    switch (s.role) {
      case LayerRole::kFull:
        absl::StrAppend(&text, "full");
        if (!s.budget.empty()) absl::StrAppend(&text, " ", BudgetText(s.budget));
        break;
      case LayerRole::kSelect:
        absl::StrAppend(&text, "select ", s.where == SelectWhere::kRemote ? "remote:" : "local:",
                        s.kind, " ", BudgetText(s.budget));
        if (s.effort != 0) absl::StrAppend(&text, " effort=", s.effort);
        if (!s.knobs.empty()) absl::StrAppend(&text, " ", s.knobs);
        break;
      case LayerRole::kReuse:
        absl::StrAppend(&text, "reuse(", s.source, ")");
        break;
    }
    parts.push_back(std::move(text));
  }
  return absl::StrCat(absl::StrJoin(parts, " | "), " ; sinks=", policy.sinks,
                      " window=", policy.window);
}

absl::StatusOr<LayerPolicy> TidalDecodePolicy(const TidalDecodeOptions& o) {
  auto bad = [](absl::string_view m) {
    return absl::InvalidArgumentError(absl::StrCat("TidalDecode preset: ", m));
  };
  if (o.num_layers < 1) return bad(absl::StrCat("num_layers must be >= 1, got ", o.num_layers));
  if (o.num_full < 0 || o.num_full > o.select_layer) {
    return bad(absl::StrCat("num_full must be in [0, select_layer=", o.select_layer, "], got ",
                            o.num_full));
  }
  if (o.select_layer < 0 || o.select_layer >= o.num_layers) {
    return bad(absl::StrCat("select_layer must be in [0, num_layers=", o.num_layers, "), got ",
                            o.select_layer));
  }
  if (o.reselect_layer >= 0 &&
      (o.reselect_layer <= o.select_layer || o.reselect_layer >= o.num_layers)) {
    return bad(absl::StrCat("reselect_layer must be in (select_layer=", o.select_layer,
                            ", num_layers=", o.num_layers, "), or < 0 for none; got ",
                            o.reselect_layer));
  }
  if (o.budget.empty()) return bad("a budget (k or fraction) is required");
  LayerPolicy p;
  p.name = o.reselect_layer >= 0
               ? absl::StrCat("tidal-s", o.select_layer, "-r", o.reselect_layer, "-",
                              BudgetText(o.budget))
               : absl::StrCat("tidal-s", o.select_layer, "-", BudgetText(o.budget));
  p.sinks = o.sinks;
  p.window = o.window;
  auto selection = [&]() {
    LayerSpec s;
    s.budget = o.budget;
    if (o.remote_kind.empty()) {
      s.role = LayerRole::kFull;
    } else {
      s.role = LayerRole::kSelect;
      s.where = SelectWhere::kRemote;
      s.kind = o.remote_kind;
      s.effort = o.remote_effort;
    }
    return s;
  };
  int32_t source = -1;
  for (int32_t l = 0; l < o.num_layers; ++l) {
    LayerSpec s;
    if (l < o.select_layer) {
      s.role = LayerRole::kFull;  // [0, num_full) and up to the selection layer
    } else if (l == o.select_layer || l == o.reselect_layer) {
      s = selection();
      source = l;
    } else {
      s.role = LayerRole::kReuse;
      s.source = source;
    }
    p.layers.push_back(std::move(s));
  }
  absl::Status valid = ValidatePolicy(p);
  if (!valid.ok()) return bad(valid.message());
  return p;
}

absl::StatusOr<LayerPolicy> UniformSelectPolicy(int32_t num_layers, const LayerSpec& select,
                                                int32_t num_full, int32_t sinks, int32_t window) {
  if (num_layers < 1) {
    return absl::InvalidArgumentError(absl::StrCat("num_layers must be >= 1, got ", num_layers));
  }
  if (num_full < 0 || num_full > num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_full must be in [0, ", num_layers, "], got ", num_full));
  }
  LayerPolicy p;
  p.sinks = sinks;
  p.window = window;
  LayerSpec s = select;
  s.role = LayerRole::kSelect;
  s.source = -1;
  p.name = absl::StrCat("uniform-", s.where == SelectWhere::kRemote ? "remote-" : "local-", s.kind,
                        num_full > 0 ? absl::StrCat("-f", num_full) : "");
  for (int32_t l = 0; l < num_layers; ++l) {
    if (l < num_full) {
      p.layers.emplace_back();
    } else {
      p.layers.push_back(s);
    }
  }
  KVR_RETURN_IF_ERROR(ValidatePolicy(p));
  return p;
}

}  // namespace kvrecall::worker
