#include "clients/cli/policy_commands.h"

#include <algorithm>
#include <memory>
#include <vector>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "clients/cli/output.h"
#include "clients/cpp/kv_store_client.h"
#include "clients/cpp/retrieval_client.h"
#include "common/npy.h"
#include "common/progress.h"
#include "common/status_macros.h"
#include "gpu/worker/hylra.h"
#include "gpu/worker/policy.h"

namespace kvrecall::cli {
namespace {

using worker::Budget;
using worker::LayerPolicy;
using worker::LayerSpec;

// "--k N" or "--budget F", exactly one.
absl::StatusOr<Budget> BudgetFlags(int32_t k, double fraction) {
  if ((k > 0) == (fraction > 0)) {
    return absl::InvalidArgumentError("give --k=N (positions per head) or --budget=F (a fraction "
                                      "of the context in (0, 1]), one of the two");
  }
  if (k < 0 || fraction < 0 || fraction > 1) {
    return absl::InvalidArgumentError("--k must be >= 1 and --budget in (0, 1]");
  }
  return Budget{k, fraction};
}

// "local:exact|loki|quest" or "remote:KIND[:effort]".
absl::StatusOr<LayerSpec> ParseSelect(const std::string& text, const std::string& knobs,
                                      const Budget& budget) {
  std::vector<std::string> parts = absl::StrSplit(text, ':');
  LayerSpec s;
  s.role = worker::LayerRole::kSelect;
  s.budget = budget;
  s.knobs = knobs;
  auto bad = [&]() {
    return absl::InvalidArgumentError(absl::StrCat(
        "--select=", text, ": use local:exact, local:loki, local:quest or remote:KIND[:EFFORT] "
                           "(e.g. remote:roar:128)"));
  };
  if (parts.size() < 2) return bad();
  if (parts[0] == "local" && parts.size() == 2) {
    s.where = worker::SelectWhere::kLocal;
  } else if (parts[0] == "remote" && parts.size() <= 3) {
    s.where = worker::SelectWhere::kRemote;
    if (parts.size() == 3 && (!absl::SimpleAtoi(parts[2], &s.effort) || s.effort < 0)) return bad();
  } else {
    return bad();
  }
  s.kind = parts[1];
  LayerPolicy probe;
  probe.layers = {s};
  if (absl::Status v = worker::ValidatePolicy(probe); !v.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--select=", text, ": ", v.message()));
  }
  return s;
}

absl::StatusOr<std::unique_ptr<client::RetrievalClient>> Client(const GlobalOptions& g) {
  return client::RetrievalClient::Create(g.client_options());
}

std::string Description(const LayerPolicy& p) {
  std::string d = absl::StrCat(p.name.empty() ? "layer policy" : p.name, ": ",
                               worker::PolicySummary(p));
  if (d.size() > 480) d = d.substr(0, 477) + "...";
  return d;
}

// The stored version as a policy; FAILED_PRECONDITION when its bytes are not one.
absl::StatusOr<LayerPolicy> StoredPolicy(const v1::ArtifactInfo& info, const std::string& bytes) {
  absl::StatusOr<LayerPolicy> p = worker::ParsePolicyJson(bytes);
  if (!p.ok()) {
    return absl::FailedPreconditionError(absl::StrCat("layer_policy version ", info.version(),
                                                      " of ", info.model_id(),
                                                      " is not a valid policy: ",
                                                      p.status().message()));
  }
  return p;
}

absl::StatusOr<v1::ArtifactInfo> Upload(const GlobalOptions& g, const std::string& model,
                                        LayerPolicy policy, const std::string& description) {
  if (!policy.model_id.empty() && policy.model_id != model) {
    return absl::InvalidArgumentError(absl::StrCat("the policy is for model \"", policy.model_id,
                                                   "\", not --model=", model));
  }
  policy.model_id = model;
  KVR_ASSIGN_OR_RETURN(auto kv, client::KvStoreClient::Create(g.client_options()));
  KVR_ASSIGN_OR_RETURN(v1::ModelGeometry geometry, kv->GetModel(model));
  if (geometry.num_layers() != policy.num_layers()) {
    return absl::InvalidArgumentError(absl::StrCat("the policy has ", policy.num_layers(),
                                                   " layers but model ", model, " has ",
                                                   geometry.num_layers()));
  }
  KVR_ASSIGN_OR_RETURN(auto rc, Client(g));
  return rc->PutArtifact(model, worker::kLayerPolicyArtifactKind, worker::PolicyToJson(policy),
                         description.empty() ? Description(policy) : description);
}

}  // namespace

void PolicyCommands::Register(CLI::App* app) {
  auto* prof = app->add_subcommand(
      "profile-policy",
      "HyLRA: profile attention captures and choose full / select / reuse layers (a role table)");
  prof->add_option("--captures", captures,
                   "capture directories of layerLL_{q,k,v}.npy, comma-separated (several texts "
                   "are profiled jointly)")
      ->required();
  prof->add_option("--model", model, "model id of the policy (and of --upload)")->required();
  prof->add_option("--budget", budget, "selected positions per query head, a fraction of the context");
  prof->add_option("--k", k, "or: selected positions per query head");
  prof->add_option("--max_compute", max_compute,
                   "compute layers (select or full) at most; the others reuse")
      ->required();
  prof->add_option("--n_full", n_full, "the N most sensitive layers attend to everything");
  prof->add_option("--full_threshold", full_threshold,
                   "or: layers whose ratio90 is at least this attend to everything");
  prof->add_option("--select", select,
                   "how compute layers select: local:exact|local:loki|local:quest|"
                   "remote:KIND[:EFFORT]")
      ->capture_default_str();
  prof->add_option("--knobs", knobs, "selection knobs key=value,... (local loki: rank=R)");
  prof->add_option("--sinks", sinks, "positions [0, sinks) always attended")->capture_default_str();
  prof->add_option("--window", window, "the last W positions always attended")
      ->capture_default_str();
  prof->add_option("--steps", steps,
                   "decode steps profiled: last:N, every:S (second half) or P,P,...")
      ->capture_default_str();
  prof->add_option("--score", score, "the DP's score: mass (of the reusing layer) or overlap")
      ->check(CLI::IsMember({"mass", "overlap"}))
      ->capture_default_str();
  prof->add_option("--head_merge", head_merge, "merge query heads: min (conservative) or mean")
      ->check(CLI::IsMember({"min", "mean"}))
      ->capture_default_str();
  prof->add_flag("--renumber", renumber, "policy layers 0, 1, ... for the captured layers in order");
  prof->add_option("--num_layers", num_layers,
                   "layers of the model (default: the last captured + 1); layers not captured "
                   "are full");
  prof->add_flag("--reuse_full", reuse_full,
                 "let later layers reuse a full layer's exact top-k (a full layer with a budget)");
  prof->add_option("--threads", threads, "profiling threads (0: one per hardware thread)")
      ->capture_default_str();
  prof->add_option("--name", name, "policy name (default hylra-c<max_compute>-f<full layers>)");
  prof->add_option("-o,--out", out_path, "write the policy JSON here");
  prof->add_flag("--upload", upload, "store it as the model's next layer_policy version");

  auto* pol = app->add_subcommand("policy", "layer policies (role tables) of a model");
  pol->require_subcommand(1);
  auto* put = pol->add_subcommand("put", "validate a policy file and store it as the next version");
  put->add_option("file", file, "policy JSON")->required();
  put->add_option("--model", model, "model id")->required();
  put->add_option("--description", description, "free text (default: name and summary)");
  auto* get = pol->add_subcommand("get", "fetch a stored policy: summary and JSON");
  get->add_option("--model", model, "model id")->required();
  get->add_option("--version", version, "version (0 = latest)");
  get->add_option("-o,--out", out_path, "write the JSON here instead of stdout");
  auto* ls = pol->add_subcommand("ls", "a model's stored policies with names and summaries");
  ls->add_option("--model", model, "model id")->required();
  auto* tidal = pol->add_subcommand(
      "tidal", "write a TidalDecode preset (full layers, a selection layer, a re-selection layer)");
  tidal->add_option("--num_layers", num_layers, "layers of the model")->required();
  tidal->add_option("--reselect", reselect, "the re-selection layer (-1: none)")->required();
  tidal->add_option("--k", k, "positions selected per query head");
  tidal->add_option("--budget", budget, "or: a fraction of the context");
  tidal->add_option("--num_full", tidal_num_full, "layers [0, N) attend to everything")
      ->capture_default_str();
  tidal->add_option("--select_layer", select_layer, "the selection layer")->capture_default_str();
  tidal->add_option("--sinks", tidal_sinks, "always-attended first positions")->capture_default_str();
  tidal->add_option("--window", tidal_window, "always-attended last positions")
      ->capture_default_str();
  tidal->add_option("--remote", remote,
                    "offloaded: selection layers select remotely with KIND[:EFFORT] instead of "
                    "full attention");
  tidal->add_option("--model", model, "model id written into the policy");
  tidal->add_option("--name", name, "policy name");
  tidal->add_option("-o,--out", out_path, "write the JSON here instead of stdout");
}

bool PolicyCommands::Handles(const std::string& n) const {
  return n == "profile-policy" || n == "policy";
}

int PolicyCommands::Run(CLI::App* cmd, const GlobalOptions& g, std::ostream& out,
                        std::ostream& err) {
  absl::Status s;
  if (cmd->get_name() == "profile-policy") {
    s = ProfilePolicy(g, out, err);
  } else {
    const std::string verb = cmd->get_subcommands().front()->get_name();
    if (verb == "tidal") {
      s = Tidal(g, out);
    } else if (verb == "put") {
      s = Put(g, out);
    } else if (verb == "get") {
      s = Get(g, out);
    } else {
      s = List(g, out);
    }
  }
  return s.ok() ? kExitOk : Fail(err, s);
}

absl::StatusOr<std::vector<worker::HylraProfile>> PolicyCommands::Profile(
    const Budget& b, const worker::StepSelection& step_selection, const GlobalOptions& g,
    std::ostream& err) const {
  std::vector<worker::CaptureSet> sets;
  for (absl::string_view dir : absl::StrSplit(captures, ',', absl::SkipWhitespace())) {
    KVR_ASSIGN_OR_RETURN(worker::CaptureSet set, worker::CaptureSetFromDirectory(std::string(dir)));
    sets.push_back(std::move(set));
  }
  if (sets.empty()) return absl::InvalidArgumentError("--captures: no directory given");
  worker::HylraProfileOptions po;
  po.budget = b;
  po.sinks = sinks;
  po.window = window;
  po.steps = step_selection;
  po.head_merge = head_merge == "mean" ? worker::HeadMerge::kMean : worker::HeadMerge::kMin;
  po.threads = threads;
  StageProgress progress(&err, "profile-policy", g.progress_mode());
  po.progress = [&](const Progress& p) { return progress.Update(p); };
  absl::StatusOr<std::vector<worker::HylraProfile>> profiles = worker::ProfileCaptures(sets, po);
  progress.Finish();
  return profiles;
}

worker::HylraPlanOptions PolicyCommands::PlanOptions(const LayerSpec& sel,
                                                     size_t profiled_layers) const {
  worker::HylraPlanOptions plan_options;
  plan_options.max_compute = max_compute;
  plan_options.n_full = n_full;
  plan_options.full_threshold = full_threshold;
  plan_options.score = score == "overlap" ? worker::HylraScore::kOverlap : worker::HylraScore::kMass;
  plan_options.reuse_full_layers = reuse_full;
  if (renumber) {
    for (size_t i = 0; i < profiled_layers; ++i) {
      plan_options.layer_map.push_back(static_cast<int32_t>(i));
    }
  }
  plan_options.num_layers = num_layers;
  plan_options.select = sel;
  plan_options.sinks = sinks;
  plan_options.window = window;
  plan_options.name = name;
  plan_options.model_id = model;
  return plan_options;
}

absl::Status PolicyCommands::ProfilePolicy(const GlobalOptions& g, std::ostream& out,
                                           std::ostream& err) const {
  KVR_ASSIGN_OR_RETURN(Budget b, BudgetFlags(k, budget));
  KVR_ASSIGN_OR_RETURN(LayerSpec sel, ParseSelect(select, knobs, b));
  KVR_ASSIGN_OR_RETURN(worker::StepSelection step_selection, worker::ParseStepSelection(steps));
  if (n_full > 0 && full_threshold > 0) {
    return absl::InvalidArgumentError("give --n_full or --full_threshold, not both");
  }
  if (upload && model.empty()) return absl::InvalidArgumentError("--upload needs --model");
  KVR_ASSIGN_OR_RETURN(std::vector<worker::HylraProfile> profiles, Profile(b, step_selection, g, err));
  const worker::HylraPlanOptions plan_options = PlanOptions(sel, profiles[0].layers.size());
  KVR_ASSIGN_OR_RETURN(worker::HylraPlan plan, worker::PlanHylraPolicy(profiles, plan_options));
  const std::string policy_json = worker::PolicyToJson(plan.policy);
  if (!out_path.empty()) KVR_RETURN_IF_ERROR(WriteStringToFileAtomic(out_path, policy_json));
  if (g.json) {
    nlohmann::ordered_json report =
        nlohmann::ordered_json::parse(worker::HylraReportJson(profiles, plan));
    if (upload) {
      KVR_ASSIGN_OR_RETURN(v1::ArtifactInfo stored, Upload(g, model, plan.policy, ""));
      report["uploaded_version"] = stored.version();
    }
    out << report.dump(2) << "\n";
    return absl::OkStatus();
  }
  // The report first: a failed upload does not lose the profile.
  out << worker::HylraReportText(profiles, plan, plan_options);
  if (!out_path.empty()) out << "wrote " << out_path << "\n";
  if (out_path.empty() && !upload) out << policy_json;
  if (upload) {
    KVR_ASSIGN_OR_RETURN(v1::ArtifactInfo stored, Upload(g, model, plan.policy, ""));
    out << "stored layer_policy version " << stored.version() << " of " << model << "\n";
  }
  return absl::OkStatus();
}

absl::Status PolicyCommands::Tidal(const GlobalOptions& g, std::ostream& out) const {
  worker::TidalDecodeOptions o;
  o.num_layers = num_layers;
  o.num_full = tidal_num_full;
  o.select_layer = select_layer;
  o.reselect_layer = reselect;
  KVR_ASSIGN_OR_RETURN(o.budget, BudgetFlags(k, budget));
  o.sinks = tidal_sinks;
  o.window = tidal_window;
  if (!remote.empty()) {
    std::vector<std::string> parts = absl::StrSplit(remote, ':');
    o.remote_kind = parts[0];
    if (parts.size() > 2 ||
        (parts.size() == 2 &&
         (!absl::SimpleAtoi(parts[1], &o.remote_effort) || o.remote_effort < 0))) {
      return absl::InvalidArgumentError(
          absl::StrCat("--remote=", remote, ": expected KIND[:EFFORT], e.g. roar:128"));
    }
  }
  KVR_ASSIGN_OR_RETURN(LayerPolicy p, worker::TidalDecodePolicy(o));
  if (!name.empty()) p.name = name;
  p.model_id = model;
  const std::string json = worker::PolicyToJson(p);
  if (!out_path.empty()) {
    KVR_RETURN_IF_ERROR(WriteStringToFileAtomic(out_path, json));
    if (!g.json) out << "wrote " << out_path << ": " << worker::PolicySummary(p) << "\n";
  }
  if (out_path.empty() || g.json) out << json;
  return absl::OkStatus();
}

absl::Status PolicyCommands::Put(const GlobalOptions& g, std::ostream& out) const {
  KVR_ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(file));
  absl::StatusOr<LayerPolicy> p = worker::ParsePolicyJson(bytes);
  if (!p.ok()) return absl::InvalidArgumentError(absl::StrCat(file, ": ", p.status().message()));
  absl::StatusOr<v1::ArtifactInfo> info = Upload(g, model, *p, description);
  if (!info.ok()) {
    return absl::Status(info.status().code(), absl::StrCat(file, ": ", info.status().message()));
  }
  if (g.json) {
    out << ToJson(*info) << "\n";
  } else {
    out << "stored layer_policy version " << info->version() << " of " << model << ": "
        << (p->name.empty() ? "" : p->name + ": ") << worker::PolicySummary(*p) << "\n";
  }
  return absl::OkStatus();
}

absl::Status PolicyCommands::Get(const GlobalOptions& g, std::ostream& out) const {
  KVR_ASSIGN_OR_RETURN(auto rc, Client(g));
  KVR_ASSIGN_OR_RETURN(auto got, rc->GetArtifact(model, worker::kLayerPolicyArtifactKind, version));
  KVR_ASSIGN_OR_RETURN(LayerPolicy p, StoredPolicy(got.first, got.second));
  const std::string json = worker::PolicyToJson(p);
  if (!out_path.empty()) KVR_RETURN_IF_ERROR(WriteStringToFileAtomic(out_path, json));
  if (g.json) {
    out << json;
    return absl::OkStatus();
  }
  out << "layer_policy version " << got.first.version() << " of " << model
      << (p.name.empty() ? "" : " (" + p.name + ")") << ": " << worker::PolicySummary(p) << "\n";
  if (out_path.empty()) {
    out << json;
  } else {
    out << "wrote " << out_path << "\n";
  }
  return absl::OkStatus();
}

absl::Status PolicyCommands::List(const GlobalOptions& g, std::ostream& out) const {
  KVR_ASSIGN_OR_RETURN(auto rc, Client(g));
  KVR_ASSIGN_OR_RETURN(auto list, rc->ListArtifacts(model));
  nlohmann::ordered_json rows = nlohmann::ordered_json::array();
  if (!g.json) {
    out << absl::StrFormat("%7s  %-19s  %7s  %-24s %s\n", "version", "created (UTC)", "bytes",
                           "name", "summary");
  }
  for (const v1::ArtifactInfo& a : list) {
    if (a.kind() != worker::kLayerPolicyArtifactKind) continue;
    KVR_ASSIGN_OR_RETURN(auto got, rc->GetArtifact(model, a.kind(), a.version()));
    absl::StatusOr<LayerPolicy> p = StoredPolicy(got.first, got.second);
    const std::string created = absl::FormatTime(
        "%Y-%m-%d %H:%M:%S", absl::FromUnixMicros(a.created_unix_us()), absl::UTCTimeZone());
    if (g.json) {
      nlohmann::ordered_json row;
      row["version"] = a.version();
      row["created_unix_us"] = a.created_unix_us();
      row["bytes"] = a.bytes();
      row["description"] = a.description();
      row["valid"] = p.ok();
      if (p.ok()) {
        row["name"] = p->name;
        row["num_layers"] = p->num_layers();
        row["summary"] = worker::PolicySummary(*p);
      } else {
        row["error"] = std::string(p.status().message());
      }
      rows.push_back(std::move(row));
    } else {
      out << absl::StrFormat("%7d  %-19s  %7d  %-24s %s\n", a.version(), created, a.bytes(),
                             p.ok() ? p->name : "(invalid)",
                             p.ok() ? worker::PolicySummary(*p) : std::string(p.status().message()));
    }
  }
  if (g.json) out << rows.dump(2) << "\n";
  return absl::OkStatus();
}

}  // namespace kvrecall::cli
