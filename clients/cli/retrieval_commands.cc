#include "clients/cli/retrieval_commands.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <memory>

#include <CLI/CLI.hpp>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "clients/cli/inputs.h"
#include "clients/cli/output.h"
#include "clients/cpp/kv_store_client.h"
#include "clients/cpp/retrieval_client.h"
#include "clients/cpp/span_keys.h"
#include "common/half.h"
#include "common/npy.h"
#include "common/status_macros.h"
#include "index/index_factory.h"
#include "index/loki/pca_basis.h"

namespace kvrecall::cli {
namespace {


absl::StatusOr<std::vector<int32_t>> ParseIntList(const std::string& text, absl::string_view what) {
  std::vector<int32_t> out;
  for (absl::string_view s : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    int32_t v;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(s), &v)) {
      return absl::InvalidArgumentError(absl::StrCat("--", what, "=", text, ": integers expected"));
    }
    out.push_back(v);
  }
  return out;
}

absl::StatusOr<std::vector<std::pair<int64_t, int64_t>>> ParseRanges(const std::string& text) {
  std::vector<std::pair<int64_t, int64_t>> out;
  for (absl::string_view s : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    std::vector<std::string> be = absl::StrSplit(absl::StripAsciiWhitespace(s), ':');
    int64_t b, e;
    if (be.size() != 2 || !absl::SimpleAtoi(be[0], &b) || !absl::SimpleAtoi(be[1], &e)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--exclude=", text, ": expected BEGIN:END[,BEGIN:END...]"));
    }
    out.emplace_back(b, e);
  }
  return out;
}

// A .npy of f16 or f32 as floats.
absl::StatusOr<std::vector<float>> NpyFloats(const NpyArray& a, const std::string& path) {
  std::vector<float> out(static_cast<size_t>(a.num_elements()));
  if (a.descr == "<f4") {
    std::memcpy(out.data(), a.data.data(), out.size() * 4);
  } else if (a.descr == "<f2") {
    ConvertToFloat(a.data.data(), DType::kF16, out.size(), out.data());
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": dtype ", a.descr, " (need float16 or float32)"));
  }
  return out;
}

absl::StatusOr<Hash128> ContextId(const std::string& hex) {
  if (hex.empty()) return absl::InvalidArgumentError("--context: required (the id `open` printed)");
  return Hash128::FromHex(hex);
}

// The chain of span hashes from --hashes/--hashes_file or --tokens/--text.
absl::StatusOr<std::vector<Hash128>> Chain(const std::string& hashes,
                                           const std::string& hashes_file,
                                           const std::string& tokens, const std::string& text,
                                           const std::string& salt,
                                           const v1::ModelGeometry& model) {
  if (!tokens.empty() || !text.empty()) {
    KVR_ASSIGN_OR_RETURN(std::vector<uint32_t> ids, ReadTokenIds(tokens, text));
    return client::ChainHashes(model.model_id(), salt, ids, model.block_tokens(), true);
  }
  KVR_ASSIGN_OR_RETURN(std::vector<Hash128> out, ReadSpanHashes(hashes, hashes_file));
  if (out.empty()) {
    return absl::InvalidArgumentError(
        "name the context's spans with --hashes, --hashes_file, --tokens or --text");
  }
  return out;
}

// Capture files <dir>/layerLL_<what>.npy by layer number.
absl::StatusOr<std::map<int32_t, std::string>> CaptureFiles(const std::string& dir,
                                                           absl::string_view what) {
  std::map<int32_t, std::string> out;
  std::error_code ec;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    absl::string_view v = name;
    if (!absl::ConsumePrefix(&v, "layer") ||
        !absl::ConsumeSuffix(&v, absl::StrCat("_", what, ".npy"))) {
      continue;
    }
    int32_t layer;
    if (absl::SimpleAtoi(v, &layer)) out[layer] = entry.path().string();
  }
  if (ec) return absl::NotFoundError(absl::StrCat("cannot read ", dir, ": ", ec.message()));
  if (out.empty()) {
    return absl::NotFoundError(absl::StrCat("no layerLL_", what, ".npy captures in ", dir));
  }
  return out;
}

}  // namespace

void RetrievalCommands::Register(CLI::App* app) {
  auto add_chain = [&](CLI::App* cmd) {
    cmd->add_option("--hashes", hashes, "comma-separated span hashes of the prefix, in order");
    cmd->add_option("--hashes_file", hashes_file, "file with one span hash per line, in order");
    cmd->add_option("--tokens", tokens, ".npy of the prefix's token ids");
    cmd->add_option("--text", text, "file whose bytes are the token ids (byte-level models)");
    cmd->add_option("--salt", salt, "salt of the span-hash chain");
  };
  auto add_retrieve = [&](CLI::App* cmd) {
    cmd->add_option("--context", context, "context id (32 hex digits)")->required();
    cmd->add_option("--layer", layer, "layer")->required();
    cmd->add_option("--queries", queries_npy,
                    ".npy queries [q_heads, head_dim], or [q_heads, T, head_dim] with --position")
        ->required();
    cmd->add_option("--position", position, "row of a [q_heads, T, head_dim] queries file");
    cmd->add_option("--k", k, "positions per query head");
    cmd->add_option("--budget", budget, "fraction of the context when --k is 0");
    cmd->add_option("--kind", kind, "index kind, or `all` (no index, exact)")
        ->capture_default_str();
    cmd->add_option("--effort", effort, "the kind's effort knob (roar: ef); 0 = default");
    cmd->add_option("--knobs", knobs, "other search knobs key=value,...");
    cmd->add_option("--build_params", build_params, "which built variant (default: the latest)");
    cmd->add_option("--exclude", exclude, "positions not to return: BEGIN:END[,BEGIN:END...]");
    cmd->add_flag("--union", union_per_group, "GQA: each head gets its group's union");
  };

  auto* open = app->add_subcommand("open", "open the context of a stored prefix; prints its id");
  open->add_option("--model", model, "model id")->required();
  add_chain(open);

  auto* queries = app->add_subcommand("queries", "store prefill queries (training queries of roar)");
  queries->add_option("--context", context, "context id")->required();
  queries->add_option("--layer", layer, "layer")->required();
  queries->add_option("--npy", queries_npy, ".npy queries, f16 or f32")->required();
  queries->add_option("--layout", layout, "nhd: [n, q_heads, d]; hnd: [q_heads, n, d] (captures)")
      ->check(CLI::IsMember({"nhd", "hnd"}))
      ->capture_default_str();
  queries->add_option("--first_position", first_position, "position of the first row");
  queries->add_option("--decode", decode, "leave out the last N positions (kept for evaluation)");

  auto* index = app->add_subcommand("index", "list, build or delete a context's indexes");
  index->require_subcommand(1);
  auto* ls = index->add_subcommand("ls", "list built indexes");
  ls->add_option("--context", context, "context id (default: every context)");
  auto* build = index->add_subcommand("build", "build indexes (a long-running operation)");
  build->add_option("--context", context, "context id")->required();
  build->add_option("--kind", kind, "flat, roar, loki, inverted, quest, faiss_hnsw, faiss_ivf")
      ->capture_default_str();
  build->add_option("--params", params, "build params key=value,...");
  build->add_option("--layers", layers, "comma-separated layers (default all)");
  build->add_option("--kv_heads", kv_heads, "comma-separated KV heads (default all)");
  build->add_flag("--no_wait", no_wait, "print the operation and return");
  build->add_option("--wait_s", wait_s, "longest wait")->capture_default_str();
  auto* rm = index->add_subcommand("rm", "delete indexes");
  rm->add_option("--context", context, "context id")->required();
  rm->add_option("--kind", kind, "kind")->required();
  rm->add_option("--params", params, "only this variant");

  add_retrieve(app->add_subcommand("search", "top-k positions per query head"));
  auto* attend = app->add_subcommand("attend", "partial attention (o, lse) per query head");
  add_retrieve(attend);
  attend->add_option("-o,--out", out_path, "write o [q_heads, head_dim] f32 to this .npy");

  auto* art = app->add_subcommand("artifacts", "per-model artifacts (Loki bases, encoders, policies)");
  art->require_subcommand(1);
  auto* als = art->add_subcommand("ls", "list a model's artifacts");
  als->add_option("--model", model, "model id")->required();
  auto* aget = art->add_subcommand("get", "fetch an artifact");
  aget->add_option("--model", model, "model id")->required();
  aget->add_option("--kind", kind, "artifact kind")->required();
  aget->add_option("--version", version, "version (0 = latest)");
  aget->add_option("-o,--out", out_path, "output file")->required();
  auto* aput = art->add_subcommand("put", "store a new version of an artifact");
  aput->add_option("--model", model, "model id")->required();
  aput->add_option("--kind", kind, "artifact kind")->required();
  aput->add_option("--file", file, "the artifact's bytes")->required();
  aput->add_option("--description", description, "free text");

  auto* fit = app->add_subcommand(
      "fit-loki", "fit Loki PCA bases per (layer, KV head) from captures or a stored context");
  fit->add_option("--model", model, "model id (registered; the artifact belongs to it)")
      ->required();
  fit->add_option("--captures", captures, "directory of layerLL_k.npy captures [kv_heads, T, d]");
  fit->add_flag("--renumber", renumber, "label capture layers 0, 1, ... in file order");
  fit->add_option("--hashes_file", hashes_file, "or: the stored context's span hashes");
  fit->add_option("-o,--out", out_path, "write the loki_basis artifact here");
  fit->add_flag("--upload", upload, "store it as the model's next loki_basis version");

  auto* bi = app->add_subcommand(
      "build-index", "build indexes offline: a stored context (server side) or a capture directory");
  bi->add_option("--context", context, "a stored context: build there and wait");
  bi->add_option("--captures", captures, "or: a directory of layerLL_{q,k}.npy captures");
  bi->add_option("--decode", decode, "captures: leave out the last N positions (evaluation queries)");
  bi->add_option("--kind", kind, "index kind")->capture_default_str();
  bi->add_option("--params", params, "build params key=value,...");
  bi->add_option("--layers", layers, "comma-separated layers (default all)");
  bi->add_option("--kv_heads", kv_heads, "comma-separated KV heads (default all)");
  bi->add_option("-o,--out", out_path, "captures: directory for the serialized indexes");
  bi->add_option("--wait_s", wait_s, "longest wait")->capture_default_str();
}

bool RetrievalCommands::Handles(const std::string& name) const {
  for (const char* n : {"open", "queries", "index", "search", "attend", "artifacts", "fit-loki",
                        "build-index"}) {
    if (name == n) return true;
  }
  return false;
}

namespace {

absl::Status WaitAndReport(client::RetrievalClient& rc, const v1::Operation& started,
                           double wait_s, const GlobalOptions& g, std::ostream& out,
                           std::ostream& err) {
  StageProgress progress(&err, started.id(), g.progress_mode());
  absl::StatusOr<v1::Operation> waited = rc.WaitOperation(
      started.id(), absl::Seconds(wait_s), [&](const Progress& p) { return progress.Update(p); });
  progress.Finish();
  KVR_ASSIGN_OR_RETURN(v1::Operation op, std::move(waited));
  if (g.json) {
    out << ToJson(op) << "\n";
  } else {
    out << absl::StrFormat("%s: %s in %.1f s (%s)\n", op.id(),
                           absl::AsciiStrToLower(v1::OperationState_Name(op.state()).substr(16)),
                           op.elapsed_ms() / 1000.0, op.description());
  }
  if (op.state() == v1::OPERATION_STATE_DONE) return absl::OkStatus();
  if (op.state() == v1::OPERATION_STATE_FAILED || op.state() == v1::OPERATION_STATE_CANCELLED) {
    return absl::Status(static_cast<absl::StatusCode>(op.error_code()), op.error_message());
  }
  return absl::DeadlineExceededError(
      absl::StrCat(op.id(), " still runs after --wait_s=", wait_s, "; follow it with `index ls`"));
}

// Builds one index per (capture layer, KV head) in this process and writes them.
absl::Status BuildFromCaptures(const std::string& dir, const std::string& kind,
                               const std::string& params, int64_t decode,
                               const std::vector<int32_t>& layers_wanted,
                               const std::vector<int32_t>& heads_wanted,
                               const std::string& out_dir, const GlobalOptions& g,
                               std::ostream& out, std::ostream& err) {
  if (out_dir.empty()) return absl::InvalidArgumentError("--captures needs -o DIR");
  KVR_ASSIGN_OR_RETURN(auto key_files, CaptureFiles(dir, "k"));
  KVR_ASSIGN_OR_RETURN(auto query_files, CaptureFiles(dir, "q"));
  KVR_ASSIGN_OR_RETURN(index::ParamMap param_map, index::ParamMap::Parse(params));
  std::error_code ec;
  std::filesystem::create_directories(out_dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", out_dir, ": ", ec.message()));
  for (const auto& [layer, kpath] : key_files) {
    if (!layers_wanted.empty() &&
        std::find(layers_wanted.begin(), layers_wanted.end(), layer) == layers_wanted.end()) {
      continue;
    }
    KVR_ASSIGN_OR_RETURN(NpyArray k, ReadNpy(kpath));
    if (k.shape.size() != 3) return absl::InvalidArgumentError(kpath + ": expected [kv_heads, T, d]");
    const int64_t hkv = k.shape[0], t = k.shape[1], d = k.shape[2];
    const int64_t n = t - decode;
    if (decode < 0 || n < 1) return absl::InvalidArgumentError("--decode leaves no keys");
    KVR_ASSIGN_OR_RETURN(std::vector<float> keys, NpyFloats(k, kpath));
    std::vector<float> q;
    int64_t hq = 0;
    if (auto it = query_files.find(layer); it != query_files.end()) {
      KVR_ASSIGN_OR_RETURN(NpyArray qa, ReadNpy(it->second));
      if (qa.shape.size() != 3 || qa.shape[1] != t || qa.shape[2] != d) {
        return absl::InvalidArgumentError(it->second + ": expected [q_heads, T, d]");
      }
      hq = qa.shape[0];
      KVR_ASSIGN_OR_RETURN(q, NpyFloats(qa, it->second));
    }
    for (int32_t h = 0; h < hkv; ++h) {
      if (!heads_wanted.empty() &&
          std::find(heads_wanted.begin(), heads_wanted.end(), h) == heads_wanted.end()) {
        continue;
      }
      // Training queries: the prefill queries of the group's heads, head-major,
      // positions 0..n-1 in order (never the last `decode` evaluation queries).
      std::vector<float> train;
      const int64_t g_size = hq / hkv;
      for (int64_t j = 0; j < g_size; ++j) {
        const float* src = q.data() + ((h * g_size + j) * t) * d;
        train.insert(train.end(), src, src + n * d);
      }
      index::BuildOptions bo;
      bo.params = param_map;
      StageProgress progress(&err, absl::StrFormat("build %s layer %d head %d", kind, layer, h),
                             g.progress_mode());
      bo.progress = [&](const Progress& p) { return progress.Update(p); };
      const absl::Time start = absl::Now();
      auto built_or =
          index::BuildIndex(kind, index::VectorView::F32(keys.data() + h * t * d, n, d),
                            index::VectorView::F32(train.data(), g_size * n, d), bo);
      progress.Finish();
      KVR_ASSIGN_OR_RETURN(auto built, std::move(built_or));
      const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
      KVR_ASSIGN_OR_RETURN(std::string bytes, built->Serialize());
      const std::string path = absl::StrFormat("%s/L%02d_H%d_%s.kvrindex", out_dir, layer, h, kind);
      KVR_RETURN_IF_ERROR(WriteStringToFileAtomic(path, bytes));
      out << absl::StrFormat("%s: %d keys, %.1f s, %.1f bytes/key of index (+%.1f of keys)\n",
                             path, n, seconds,
                             static_cast<double>(built->IndexBytes()) / n,
                             static_cast<double>(built->KeyBytes()) / n);
    }
  }
  return absl::OkStatus();
}

// The query rows of a search or attend: [q_heads, head_dim] as given, or row
// `position` of [q_heads, T, head_dim].
struct QueryRows {
  int64_t hq = 0, d = 0;
  std::vector<float> q;
};

absl::StatusOr<QueryRows> ReadQueryRows(const std::string& path, int64_t position) {
  KVR_ASSIGN_OR_RETURN(NpyArray a, ReadNpy(path));
  KVR_ASSIGN_OR_RETURN(std::vector<float> v, NpyFloats(a, path));
  QueryRows rows;
  if (a.shape.size() == 2 && position < 0) {
    rows.hq = a.shape[0];
    rows.d = a.shape[1];
    rows.q = std::move(v);
  } else if (a.shape.size() == 3 && position >= 0 && position < a.shape[1]) {
    rows.hq = a.shape[0];
    rows.d = a.shape[2];
    for (int64_t h = 0; h < rows.hq; ++h) {
      const float* src = v.data() + (h * a.shape[1] + position) * rows.d;
      rows.q.insert(rows.q.end(), src, src + rows.d);
    }
  } else {
    return absl::InvalidArgumentError(
        "--queries: [q_heads, head_dim], or [q_heads, T, head_dim] with --position in [0, T)");
  }
  return rows;
}

void PrintSearch(const v1::SearchResponse& r, int64_t hq, std::ostream& out) {
  for (int h = 0; h < r.heads_size(); ++h) {
    out << "head " << h << ":";
    const auto& head = r.heads(h);
    for (int i = 0; i < head.positions_size(); ++i) {
      out << absl::StrFormat(" %d(%.3g)", head.positions(i), head.scores(i));
    }
    out << "\n";
  }
  out << absl::StrFormat("%d keys scanned (%.2f%% of %d per head), search %d us, server %d us\n",
                         r.stats().keys_scanned(),
                         100.0 * r.stats().keys_scanned() /
                             std::max<double>(1, hq * r.stats().context_tokens()),
                         r.stats().context_tokens(), r.stats().search_us(), r.stats().server_us());
}

void PrintAttend(const client::AttendResult& r, int64_t hq, int64_t d, const std::string& out_path,
                 std::ostream& out) {
  for (int64_t h = 0; h < hq; ++h) {
    double norm = 0;
    for (int64_t j = 0; j < d; ++j) norm += double(r.out[h * d + j]) * r.out[h * d + j];
    out << absl::StrFormat("head %d: lse_natural %.6f  |o| %.6f  %d positions\n", h, r.lse[h],
                           std::sqrt(norm),
                           h < static_cast<int64_t>(r.positions.size()) ? r.positions[h].size() : 0);
  }
  out << absl::StrFormat("search %d us, attention %d us, server %d us%s\n", r.stats.search_us(),
                         r.stats.attend_us(), r.stats.server_us(),
                         out_path.empty() ? "" : absl::StrCat("; o written to ", out_path));
}

// The keys Loki bases are fitted to: (layer label, KV head, keys [n, d] f32).
using KeySets = std::vector<std::tuple<int32_t, int32_t, std::vector<float>>>;

// The keys of a capture directory's layerLL_k.npy files; with `renumber`
// the layers are labelled 0, 1, ... in file order.
absl::StatusOr<KeySets> KeySetsFromCaptures(const std::string& dir, int64_t d, bool renumber) {
  KeySets sets;
  KVR_ASSIGN_OR_RETURN(auto files, CaptureFiles(dir, "k"));
  int32_t ordinal = 0;
  for (const auto& [layer_no, path] : files) {
    KVR_ASSIGN_OR_RETURN(NpyArray a, ReadNpy(path));
    if (a.shape.size() != 3 || a.shape[2] != d) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": expected [kv_heads, T, ", d, "]"));
    }
    KVR_ASSIGN_OR_RETURN(std::vector<float> v, NpyFloats(a, path));
    const int64_t t = a.shape[1];
    for (int32_t h = 0; h < a.shape[0]; ++h) {
      sets.emplace_back(renumber ? ordinal : layer_no, h,
                        std::vector<float>(v.begin() + h * t * d, v.begin() + (h + 1) * t * d));
    }
    ++ordinal;
  }
  return sets;
}

// The keys of the stored spans listed in `hashes_file`, every layer and KV head.
absl::StatusOr<KeySets> KeySetsFromSpans(client::KvStoreClient& kv, const v1::ModelGeometry& m,
                                         const std::string& hashes_file) {
  KVR_ASSIGN_OR_RETURN(auto chain, Chain("", hashes_file, "", "", "", m));
  KVR_ASSIGN_OR_RETURN(auto spans, kv.GetSpans(m.model_id(), chain));
  const int64_t d = m.head_dim();
  const DType dt = ToDType(m.dtype());
  const int64_t elem = client::DTypeBytes(m.dtype());
  KeySets sets;
  for (int32_t l = 0; l < m.num_layers(); ++l) {
    for (int32_t h = 0; h < m.num_kv_heads(); ++h) {
      std::vector<float> keys;
      for (const auto& s : spans) {
        if (!s.found) {
          return absl::NotFoundError(absl::StrCat("span ", s.hash.ToHex(), " is missing: ",
                                                  client::MissReasonName(s.miss_reason)));
        }
        const int64_t n = s.num_tokens;
        const int64_t offset = ((static_cast<int64_t>(l) * 2 * m.num_kv_heads() + h) * n) * d * elem;
        std::vector<float> f(static_cast<size_t>(n * d));
        ConvertToFloat(s.payload.data() + offset, dt, f.size(), f.data());
        keys.insert(keys.end(), f.begin(), f.end());
      }
      sets.emplace_back(l, h, std::move(keys));
    }
  }
  return sets;
}

// One PCA basis per key set, with progress on `err` and (without --json)
// each basis's explained variance on `out`.
absl::StatusOr<std::vector<index::loki::PcaBasis>> FitBases(KeySets& sets, int64_t d,
                                                            const GlobalOptions& g,
                                                            std::ostream& out, std::ostream& err) {
  std::vector<index::loki::PcaBasis> bases;
  StageProgress progress(&err, "fit-loki", g.progress_mode());
  for (size_t i = 0; i < sets.size(); ++i) {
    auto& [l, h, keys] = sets[i];
    Progress step;
    step.stage = absl::StrFormat("layer %d head %d", l, h);
    step.done = static_cast<int64_t>(i);
    step.total = static_cast<int64_t>(sets.size());
    step.fraction = static_cast<double>(i) / static_cast<double>(sets.size());
    progress.Update(step);
    const int64_t n = static_cast<int64_t>(keys.size()) / d;
    KVR_ASSIGN_OR_RETURN(index::loki::PcaBasis b,
                         index::loki::FitPcaBasis(index::VectorView::F32(keys.data(), n, d),
                                                  index::loki::PcaFitOptions()));
    b.layer = l;
    b.kv_head = h;
    if (!g.json) {
      progress.Clear();
      out << absl::StrFormat("layer %d head %d: %d keys; variance in the first d/8, d/4, d/2 "
                             "axes: %.3f %.3f %.3f\n",
                             l, h, n, b.ExplainedVarianceRatio(static_cast<int32_t>(d / 8)),
                             b.ExplainedVarianceRatio(static_cast<int32_t>(d / 4)),
                             b.ExplainedVarianceRatio(static_cast<int32_t>(d / 2)));
    }
    bases.push_back(std::move(b));
  }
  progress.Finish();
  return bases;
}

}  // namespace

// The parsed subcommand, its client and its streams.
struct RetrievalCommands::Call {
  CLI::App* cmd;
  const GlobalOptions& g;
  client::RetrievalClient& rc;
  std::ostream& out;
  std::ostream& err;
};

int RetrievalCommands::Run(CLI::App* cmd, const GlobalOptions& g, std::ostream& out,
                           std::ostream& err) {
  auto rc_or = client::RetrievalClient::Create(g.client_options());
  if (!rc_or.ok()) return Fail(err, rc_or.status());
  const Call c{cmd, g, **rc_or, out, err};
  const std::string name = cmd->get_name();
  absl::Status s;
  if (name == "open") {
    s = Open(c);
  } else if (name == "queries") {
    s = AddQueries(c);
  } else if (name == "index") {
    s = Index(c);
  } else if (name == "search" || name == "attend") {
    s = SearchOrAttend(c);
  } else if (name == "artifacts") {
    s = Artifacts(c);
  } else if (name == "fit-loki") {
    s = FitLoki(c);
  } else {
    s = BuildIndexOffline(c);
  }
  return s.ok() ? kExitOk : Fail(err, s);
}

absl::Status RetrievalCommands::Open(const Call& c) const {
  KVR_ASSIGN_OR_RETURN(auto kv, client::KvStoreClient::Create(c.g.client_options()));
  KVR_ASSIGN_OR_RETURN(v1::ModelGeometry m, kv->GetModel(model));
  KVR_ASSIGN_OR_RETURN(auto chain, Chain(hashes, hashes_file, tokens, text, salt, m));
  KVR_ASSIGN_OR_RETURN(v1::OpenContextResponse r, c.rc.OpenContext(model, chain));
  KVR_ASSIGN_OR_RETURN(Hash128 id, Hash128::FromBytes(r.context()));
  if (c.g.json) {
    c.out << absl::StrFormat("{\"context\": \"%s\", \"num_tokens\": %d, \"num_spans\": %d}\n",
                             id.ToHex(), r.num_tokens(), r.num_spans());
  } else {
    c.out << id.ToHex() << "  (" << r.num_spans() << " spans, " << r.num_tokens() << " tokens"
          << (r.newly_opened() ? "" : ", already open") << ")\n";
  }
  return absl::OkStatus();
}

absl::Status RetrievalCommands::AddQueries(const Call& c) const {
  KVR_ASSIGN_OR_RETURN(Hash128 id, ContextId(context));
  KVR_ASSIGN_OR_RETURN(NpyArray a, ReadNpy(queries_npy));
  if (a.shape.size() != 3) return absl::InvalidArgumentError("--npy: expected 3 dimensions");
  KVR_ASSIGN_OR_RETURN(std::vector<float> v, NpyFloats(a, queries_npy));
  int64_t n = layout == "nhd" ? a.shape[0] : a.shape[1];
  const int64_t hq = layout == "nhd" ? a.shape[1] : a.shape[0], d = a.shape[2];
  const int64_t keep = n - decode;
  if (decode < 0 || keep < 1) return absl::InvalidArgumentError("--decode leaves no queries");
  std::vector<float> nhd(static_cast<size_t>(keep * hq * d));
  for (int64_t t = 0; t < keep; ++t) {
    for (int64_t h = 0; h < hq; ++h) {
      const float* src = layout == "nhd" ? v.data() + (t * hq + h) * d : v.data() + (h * n + t) * d;
      std::copy(src, src + d, nhd.data() + (t * hq + h) * d);
    }
  }
  KVR_ASSIGN_OR_RETURN(int64_t stored, c.rc.AddQueries(id, layer, first_position,
                                                       static_cast<int32_t>(hq),
                                                       static_cast<int32_t>(d), nhd));
  c.out << "stored " << stored << " query rows of layer " << layer << " (" << hq << " heads)\n";
  return absl::OkStatus();
}

absl::Status RetrievalCommands::Index(const Call& c) const {
  const std::string verb = c.cmd->get_subcommands().front()->get_name();
  Hash128 id;
  if (!context.empty()) {
    KVR_ASSIGN_OR_RETURN(id, ContextId(context));
  }
  if (verb == "ls") {
    KVR_ASSIGN_OR_RETURN(auto list, c.rc.ListIndexes(id));
    if (c.g.json) {
      v1::ListIndexesResponse r;
      for (const auto& i : list) *r.add_indexes() = i;
      c.out << ToJson(r) << "\n";
      return absl::OkStatus();
    }
    c.out << absl::StrFormat("%-32s %5s %4s %-10s %-28s %9s %12s %s\n", "context", "layer", "head",
                             "kind", "params", "keys", "bytes", "loaded");
    for (const auto& i : list) {
      auto h = Hash128::FromBytes(i.context());
      c.out << absl::StrFormat("%-32s %5d %4d %-10s %-28s %9d %12d %s\n", h.ok() ? h->ToHex() : "?",
                               i.layer(), i.kv_head(), i.kind(), i.params(), i.num_keys(), i.bytes(),
                               i.loaded() ? "yes" : "no");
    }
    return absl::OkStatus();
  }
  if (verb == "rm") {
    KVR_RETURN_IF_ERROR(c.rc.DeleteIndex(id, kind, params));
    c.out << "deleted " << kind << " indexes of " << id.ToHex() << "\n";
    return absl::OkStatus();
  }
  KVR_ASSIGN_OR_RETURN(std::vector<int32_t> ls, ParseIntList(layers, "layers"));
  KVR_ASSIGN_OR_RETURN(std::vector<int32_t> hs, ParseIntList(kv_heads, "kv_heads"));
  KVR_ASSIGN_OR_RETURN(v1::Operation op, c.rc.BuildIndex(id, kind, params, ls, hs));
  if (no_wait) {
    c.out << (c.g.json ? ToJson(op) : op.id() + " started: " + op.description()) << "\n";
    return absl::OkStatus();
  }
  return WaitAndReport(c.rc, op, wait_s, c.g, c.out, c.err);
}

absl::Status RetrievalCommands::SearchOrAttend(const Call& c) const {
  KVR_ASSIGN_OR_RETURN(Hash128 id, ContextId(context));
  KVR_ASSIGN_OR_RETURN(QueryRows rows, ReadQueryRows(queries_npy, position));
  client::RetrieveOptions o;
  o.k = k;
  o.budget = budget;
  o.kind = kind;
  o.build_params = build_params;
  o.effort = effort;
  o.knobs = knobs;
  KVR_ASSIGN_OR_RETURN(o.exclude, ParseRanges(exclude));
  o.union_per_group = union_per_group;
  const auto hq = static_cast<int32_t>(rows.hq);
  if (c.cmd->get_name() == "search") {
    KVR_ASSIGN_OR_RETURN(v1::SearchResponse r, c.rc.Search(id, layer, rows.q, hq, o));
    if (c.g.json) {
      c.out << ToJson(r) << "\n";
    } else {
      PrintSearch(r, rows.hq, c.out);
    }
    return absl::OkStatus();
  }
  KVR_ASSIGN_OR_RETURN(client::AttendResult r, c.rc.Attend(id, layer, rows.q, hq, o));
  if (!out_path.empty()) {
    NpyArray o_arr;
    o_arr.descr = "<f4";
    o_arr.shape = {rows.hq, rows.d};
    o_arr.data.assign(reinterpret_cast<const char*>(r.out.data()), r.out.size() * 4);
    KVR_RETURN_IF_ERROR(WriteNpy(out_path, o_arr));
  }
  if (c.g.json) {
    v1::AttendResponse resp;
    resp.mutable_lse_natural()->Add(r.lse.begin(), r.lse.end());
    for (const auto& p : r.positions) resp.add_heads()->mutable_positions()->Add(p.begin(), p.end());
    *resp.mutable_stats() = r.stats;
    c.out << ToJson(resp) << "\n";
  } else {
    PrintAttend(r, rows.hq, rows.d, out_path, c.out);
  }
  return absl::OkStatus();
}

absl::Status RetrievalCommands::Artifacts(const Call& c) const {
  const std::string verb = c.cmd->get_subcommands().front()->get_name();
  if (verb == "ls") {
    KVR_ASSIGN_OR_RETURN(auto list, c.rc.ListArtifacts(model));
    if (c.g.json) {
      v1::ListArtifactsResponse r;
      for (const auto& a : list) *r.add_artifacts() = a;
      c.out << ToJson(r) << "\n";
      return absl::OkStatus();
    }
    c.out << absl::StrFormat("%-16s %7s %12s %-20s %s\n", "kind", "version", "bytes", "created",
                             "description");
    for (const auto& a : list) {
      c.out << absl::StrFormat("%-16s %7d %12d %-20s %s\n", a.kind(), a.version(), a.bytes(),
                               absl::FormatTime("%Y-%m-%d %H:%M:%S",
                                                absl::FromUnixMicros(a.created_unix_us()),
                                                absl::UTCTimeZone()),
                               a.description());
    }
    return absl::OkStatus();
  }
  if (verb == "get") {
    KVR_ASSIGN_OR_RETURN(auto got, c.rc.GetArtifact(model, kind, version));
    KVR_RETURN_IF_ERROR(WriteStringToFileAtomic(out_path, got.second));
    c.out << "wrote " << out_path << ": " << kind << " version " << got.first.version() << ", "
          << got.second.size() << " bytes\n";
    return absl::OkStatus();
  }
  KVR_ASSIGN_OR_RETURN(std::string bytes, ReadFileToString(file));
  KVR_ASSIGN_OR_RETURN(v1::ArtifactInfo info, c.rc.PutArtifact(model, kind, bytes, description));
  c.out << (c.g.json ? ToJson(info)
                     : absl::StrCat("stored ", kind, " version ", info.version(), " of ", model,
                                    " (", info.bytes(), " bytes)"))
        << "\n";
  return absl::OkStatus();
}

absl::Status RetrievalCommands::FitLoki(const Call& c) const {
  if (captures.empty() == hashes_file.empty()) {
    return absl::InvalidArgumentError("fit-loki needs --captures DIR or --hashes_file F");
  }
  if (out_path.empty() && !upload) {
    return absl::InvalidArgumentError("fit-loki: give -o FILE and/or --upload");
  }
  KVR_ASSIGN_OR_RETURN(auto kv, client::KvStoreClient::Create(c.g.client_options()));
  KVR_ASSIGN_OR_RETURN(v1::ModelGeometry m, kv->GetModel(model));
  const int64_t d = m.head_dim();
  KVR_ASSIGN_OR_RETURN(KeySets sets, !captures.empty()
                                         ? KeySetsFromCaptures(captures, d, renumber)
                                         : KeySetsFromSpans(*kv, m, hashes_file));
  KVR_ASSIGN_OR_RETURN(std::vector<index::loki::PcaBasis> bases, FitBases(sets, d, c.g, c.out, c.err));
  const std::string bytes = index::loki::SerializePcaBases(bases);
  if (!out_path.empty()) KVR_RETURN_IF_ERROR(WriteStringToFileAtomic(out_path, bytes));
  if (upload) {
    KVR_ASSIGN_OR_RETURN(v1::ArtifactInfo info,
                         c.rc.PutArtifact(model, "loki_basis", bytes,
                                          absl::StrCat("fit-loki over ", bases.size(),
                                                       " (layer, KV head) sets")));
    c.out << "stored loki_basis version " << info.version() << " of " << model << "\n";
  }
  return absl::OkStatus();
}

absl::Status RetrievalCommands::BuildIndexOffline(const Call& c) const {
  KVR_ASSIGN_OR_RETURN(std::vector<int32_t> ls, ParseIntList(layers, "layers"));
  KVR_ASSIGN_OR_RETURN(std::vector<int32_t> hs, ParseIntList(kv_heads, "kv_heads"));
  if (context.empty() == captures.empty()) {
    return absl::InvalidArgumentError("build-index needs --context ID or --captures DIR");
  }
  if (!captures.empty()) {
    return BuildFromCaptures(captures, kind, params, decode, ls, hs, out_path, c.g, c.out, c.err);
  }
  KVR_ASSIGN_OR_RETURN(Hash128 id, ContextId(context));
  KVR_ASSIGN_OR_RETURN(v1::Operation op, c.rc.BuildIndex(id, kind, params, ls, hs));
  return WaitAndReport(c.rc, op, wait_s, c.g, c.out, c.err);
}

}  // namespace kvrecall::cli
