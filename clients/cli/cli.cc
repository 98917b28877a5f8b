#include "clients/cli/cli.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "clients/cli/inputs.h"
#include "clients/cli/output.h"
#include "clients/cli/cluster_commands.h"
#include "clients/cli/policy_commands.h"
#include "clients/cli/progress_bar.h"
#include "clients/cli/retrieval_commands.h"
#include "clients/cpp/kv_store_client.h"
#include "clients/cpp/span_keys.h"
#include "common/half.h"
#include "common/npy.h"
#include "common/status_macros.h"
#include <google/protobuf/struct.pb.h>

namespace kvrecall::cli {
namespace {

using google::protobuf::Struct;
using google::protobuf::Value;

// Spans per PutSpans stream: bounds memory and keeps retries of UNAVAILABLE small.
constexpr int64_t kPutBatchBytes = int64_t{64} << 20;

// Everything the command line sets.
struct Flags {
  // global
  std::string target = "127.0.0.1:7878";
  std::string token;
  GlobalOptions global;  // its TLS fields
  int64_t deadline_ms = 120000;
  bool json = false;
  std::string progress = "auto";
  // models
  std::string model;
  int32_t layers = 0, q_heads = 0, kv_heads = 0, head_dim = 0, block_tokens = 256;
  std::string dtype = "bf16";
  bool keys_pre_rope = false;
  // spans in
  std::string npy, safetensors, tokens, text, salt;
  int64_t random_spans = 0;
  uint64_t seed = 1;
  bool durable = false;
  bool full_spans_only = false;
  std::string hashes_out;
  // spans out / selection
  std::string hashes, hashes_file, layer_range, out_path;
  bool float32 = false;
  bool allow_missing = false;
  double ttl_s = 0;
  // bench
  std::string bench_name;
};

// --- output helpers ---

Value Str(absl::string_view s) {
  Value v;
  v.set_string_value(std::string(s));
  return v;
}
Value Num(double d) {
  Value v;
  v.set_number_value(d);
  return v;
}
Value Bool(bool b) {
  Value v;
  v.set_bool_value(b);
  return v;
}

bool ProgressEnabled(const Flags& f) {
  if (f.progress == "always") return true;
  if (f.progress == "never") return false;
  return isatty(STDERR_FILENO) == 1;
}

// --- inputs ---

// Hashes from --hashes/--hashes_file, or computed from --tokens/--text.
absl::StatusOr<std::vector<Hash128>> SelectedHashes(const Flags& f,
                                                    const v1::ModelGeometry* model) {
  const bool by_hash = !f.hashes.empty() || !f.hashes_file.empty();
  const bool by_tokens = !f.tokens.empty() || !f.text.empty();
  if (by_hash == by_tokens) {
    return absl::InvalidArgumentError(
        "select spans with --hashes/--hashes_file or with --tokens/--text (one of the two)");
  }
  if (by_hash) return ReadSpanHashes(f.hashes, f.hashes_file);
  if (model == nullptr) return absl::InvalidArgumentError("--tokens/--text need --model");
  KVR_ASSIGN_OR_RETURN(std::vector<uint32_t> ids, ReadTokenIds(f.tokens, f.text));
  return client::ChainHashes(model->model_id(), f.salt, ids, model->block_tokens(),
                             !f.full_spans_only);
}

absl::StatusOr<std::pair<int32_t, int32_t>> ParseLayers(const std::string& text) {
  if (text.empty()) return std::make_pair(0, 0);
  std::vector<std::string> parts = absl::StrSplit(text, ':');
  int32_t b = 0, e = 0;
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &b) || !absl::SimpleAtoi(parts[1], &e)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--layers=", text, ": expected BEGIN:END, e.g. 0:4"));
  }
  return std::make_pair(b, e);
}

absl::StatusOr<v1::DType> ParseProtoDType(const std::string& name) {
  if (name == "f16" || name == "float16") return v1::DTYPE_F16;
  if (name == "bf16" || name == "bfloat16") return v1::DTYPE_BF16;
  if (name == "f32" || name == "float32") return v1::DTYPE_F32;
  return absl::InvalidArgumentError(absl::StrCat("--dtype=", name, ": use f16, bf16 or f32"));
}

// Random spans of full blocks: random token ids and random finite values.
client::OwnedSpan RandomSpan(const v1::ModelGeometry& model, const Hash128& parent,
                             std::mt19937_64& rng) {
  client::OwnedSpan s;
  s.parent = parent;
  s.token_ids.resize(model.block_tokens());
  for (auto& t : s.token_ids) t = static_cast<uint32_t>(rng() % 128000);
  s.hash = SpanHash(parent, s.token_ids);
  const int64_t bytes = client::SpanPayloadBytes(model, model.block_tokens());
  const int64_t n = bytes / client::DTypeBytes(model.dtype());
  std::vector<float> values(static_cast<size_t>(n));
  std::uniform_real_distribution<float> dist(-4.0f, 4.0f);
  for (float& v : values) v = dist(rng);
  s.payload.resize(static_cast<size_t>(bytes));
  ConvertFromFloat(values.data(), values.size(), ToDType(model.dtype()), s.payload.data());
  return s;
}

// --- commands ---

int CmdRegister(const Flags& f, client::KvStoreClient& c, std::ostream& out, std::ostream& err) {
  absl::StatusOr<v1::DType> dtype = ParseProtoDType(f.dtype);
  if (!dtype.ok()) return Fail(err, dtype.status());
  v1::ModelGeometry g;
  g.set_model_id(f.model);
  g.set_num_layers(f.layers);
  g.set_num_q_heads(f.q_heads);
  g.set_num_kv_heads(f.kv_heads);
  g.set_head_dim(f.head_dim);
  g.set_dtype(*dtype);
  g.set_keys_post_rope(!f.keys_pre_rope);
  g.set_block_tokens(f.block_tokens);
  absl::StatusOr<v1::RegisterModelResponse> r = c.RegisterModel(g);
  if (!r.ok()) return Fail(err, r.status());
  if (f.json) {
    out << ToJson(*r) << "\n";
  } else {
    out << (r->already_registered() ? "already registered: " : "registered: ")
        << r->model().model_id() << " (" << r->model().num_layers() << " layers, "
        << r->model().num_kv_heads() << " kv heads x " << r->model().head_dim() << ", "
        << absl::AsciiStrToLower(v1::DType_Name(r->model().dtype()).substr(6)) << ", "
        << r->model().block_tokens() << " tokens per span, "
        << client::SpanPayloadBytes(r->model(), r->model().block_tokens()) << " bytes per span)\n";
  }
  return kExitOk;
}

int CmdModels(const Flags& f, client::KvStoreClient& c, std::ostream& out, std::ostream& err) {
  absl::StatusOr<std::vector<v1::ModelGeometry>> models = c.ListModels();
  if (!models.ok()) return Fail(err, models.status());
  if (f.json) {
    v1::ListModelsResponse r;
    for (const auto& m : *models) *r.add_models() = m;
    out << ToJson(r) << "\n";
    return kExitOk;
  }
  out << absl::StrFormat("%-32s %6s %7s %8s %8s %5s %6s %9s\n", "model", "layers", "q_heads",
                         "kv_heads", "head_dim", "dtype", "block", "post_rope");
  for (const auto& m : *models) {
    out << absl::StrFormat("%-32s %6d %7d %8d %8d %5s %6d %9s\n", m.model_id(), m.num_layers(),
                           m.num_q_heads(), m.num_kv_heads(), m.head_dim(),
                           absl::AsciiStrToLower(v1::DType_Name(m.dtype()).substr(6)),
                           m.block_tokens(), m.keys_post_rope() ? "yes" : "no");
  }
  return kExitOk;
}

// The spans `put` stores: --random spans, or the sequence of --npy or
// --safetensors cut into spans.
absl::StatusOr<std::vector<client::OwnedSpan>> SpansToPut(const Flags& f,
                                                          const v1::ModelGeometry& model) {
  if (f.random_spans > 0) {
    std::vector<client::OwnedSpan> spans;
    std::mt19937_64 rng(f.seed);
    Hash128 parent = SpanRootHash(model.model_id(), f.salt);
    for (int64_t i = 0; i < f.random_spans; ++i) {
      spans.push_back(RandomSpan(model, parent, rng));
      parent = spans.back().hash;
    }
    return spans;
  }
  KVR_ASSIGN_OR_RETURN(SequenceData data, !f.npy.empty() ? ReadSequenceNpy(f.npy, model)
                                                         : ReadSafetensors(f.safetensors, model));
  if (data.token_ids.empty() || !f.tokens.empty() || !f.text.empty()) {
    KVR_ASSIGN_OR_RETURN(data.token_ids, ReadTokenIds(f.tokens, f.text));
  }
  if (static_cast<int64_t>(data.token_ids.size()) != data.num_tokens) {
    return absl::InvalidArgumentError(absl::StrCat(data.token_ids.size(), " token ids for ",
                                                   data.num_tokens, " tokens of K/V"));
  }
  return client::SequenceToSpans(model, f.salt, data.token_ids, data.kv, !f.full_spans_only);
}

// What the daemon answered to the spans of `put`.
struct PutTotals {
  int already = 0;           // spans it held before
  std::string durable_tier;  // with --durable: where they are durable
};

// Sends `spans` in streams of about kPutBatchBytes, `bar` counting payload bytes.
absl::StatusOr<PutTotals> SendSpans(const Flags& f, client::KvStoreClient& c,
                                    const std::vector<client::OwnedSpan>& spans, ProgressBar& bar) {
  PutTotals totals;
  int64_t sent_before = 0;
  for (size_t begin = 0; begin < spans.size();) {
    std::vector<client::SpanToPut> batch;
    int64_t batch_bytes = 0;
    size_t end = begin;
    while (end < spans.size() && (batch.empty() || batch_bytes < kPutBatchBytes)) {
      const auto& s = spans[end++];
      batch.push_back(client::SpanToPut{s.hash, s.parent, static_cast<int32_t>(s.token_ids.size()),
                                        s.token_ids, s.payload, f.durable});
      batch_bytes += static_cast<int64_t>(s.payload.size());
    }
    client::PutOptions options;
    options.salt = f.salt;
    options.progress = [&](const Progress& p) {
      bar.Update(sent_before + p.done);
      return true;
    };
    KVR_ASSIGN_OR_RETURN(std::vector<client::PutResult> results,
                         c.PutSpans(f.model, batch, options));
    for (const auto& r : results) {
      totals.already += r.already_present;
      if (r.durable_tier != v1::TIER_UNSPECIFIED) {
        totals.durable_tier = absl::AsciiStrToLower(v1::Tier_Name(r.durable_tier).substr(5));
      }
    }
    sent_before += batch_bytes;
    begin = end;
  }
  return totals;
}

void PrintPut(const Flags& f, const std::vector<client::OwnedSpan>& spans, const PutTotals& totals,
              int64_t bytes, double seconds, std::ostream& out) {
  if (f.json) {
    Struct j;
    (*j.mutable_fields())["model_id"] = Str(f.model);
    (*j.mutable_fields())["spans"] = Num(static_cast<double>(spans.size()));
    (*j.mutable_fields())["already_present"] = Num(totals.already);
    (*j.mutable_fields())["payload_bytes"] = Num(static_cast<double>(bytes));
    (*j.mutable_fields())["seconds"] = Num(seconds);
    (*j.mutable_fields())["durable_tier"] = Str(totals.durable_tier);
    Value hashes;
    for (const auto& s : spans) *hashes.mutable_list_value()->add_values() = Str(s.hash.ToHex());
    (*j.mutable_fields())["hashes"] = hashes;
    out << ToJson(j) << "\n";
    return;
  }
  out << absl::StrFormat("stored %d spans (%d already present), %.1f MiB in %.2f s (%.1f MiB/s)%s\n",
                         spans.size(), totals.already, bytes / 1048576.0, seconds,
                         bytes / 1048576.0 / seconds,
                         f.durable ? absl::StrCat(", durable in ", totals.durable_tier) : "");
  if (!spans.empty()) {
    out << "first span " << spans.front().hash.ToHex() << ", last span "
        << spans.back().hash.ToHex() << "\n";
  }
}

int CmdPut(const Flags& f, client::KvStoreClient& c, std::ostream& out, std::ostream& err) {
  absl::StatusOr<v1::ModelGeometry> model = c.GetModel(f.model);
  if (!model.ok()) return Fail(err, model.status());
  const int sources = !f.npy.empty() + !f.safetensors.empty() + (f.random_spans > 0);
  if (sources != 1) {
    err << "kvrecall put: give exactly one of --npy, --safetensors, --random\n";
    return kExitUsage;
  }
  absl::StatusOr<std::vector<client::OwnedSpan>> spans = SpansToPut(f, *model);
  if (!spans.ok()) return Fail(err, spans.status());
  int64_t total = 0;
  for (const auto& s : *spans) total += static_cast<int64_t>(s.payload.size());
  ProgressBar bar(&err, "put", total, ProgressEnabled(f));
  const absl::Time start = absl::Now();
  absl::StatusOr<PutTotals> totals = SendSpans(f, c, *spans, bar);
  bar.Finish();
  if (!totals.ok()) return Fail(err, totals.status());
  const double seconds = std::max(1e-6, absl::ToDoubleSeconds(absl::Now() - start));
  if (!f.hashes_out.empty()) {
    std::string text;
    for (const auto& s : *spans) absl::StrAppend(&text, s.hash.ToHex(), "\n");
    if (absl::Status w = WriteStringToFileAtomic(f.hashes_out, text); !w.ok()) return Fail(err, w);
  }
  PrintPut(f, *spans, *totals, total, seconds, out);
  return kExitOk;
}

int CmdGet(const Flags& f, client::KvStoreClient& c, std::ostream& out, std::ostream& err) {
  absl::StatusOr<v1::ModelGeometry> model = c.GetModel(f.model);
  if (!model.ok()) return Fail(err, model.status());
  absl::StatusOr<std::vector<Hash128>> hashes = SelectedHashes(f, &*model);
  if (!hashes.ok()) return Fail(err, hashes.status());
  absl::StatusOr<std::pair<int32_t, int32_t>> layers = ParseLayers(f.layer_range);
  if (!layers.ok()) return Fail(err, layers.status());
  ProgressBar bar(&err, "get", 0, ProgressEnabled(f));
  int64_t received_before = 0;
  client::GetOptions options;
  options.progress = [&](const Progress& p) {
    bar.Update(received_before + p.done);
    return true;
  };
  std::vector<client::FetchedSpan> spans;
  const absl::Time start = absl::Now();
  absl::Status status = c.GetSpansStreaming(
      f.model, *hashes, {layers->first, layers->second},
      [&](client::FetchedSpan&& s) {
        received_before += static_cast<int64_t>(s.payload.size());
        spans.push_back(std::move(s));
        return absl::OkStatus();
      },
      options);
  bar.Finish();
  if (!status.ok()) return Fail(err, status);
  const double seconds = std::max(1e-6, absl::ToDoubleSeconds(absl::Now() - start));
  int missing = 0;
  std::vector<absl::string_view> payloads;
  std::vector<int32_t> tokens;
  int32_t num_layers = 0;
  int64_t total_tokens = 0;
  for (const auto& s : spans) {
    if (!s.found) {
      ++missing;
      continue;
    }
    payloads.push_back(s.payload);
    tokens.push_back(s.num_tokens);
    total_tokens += s.num_tokens;
    num_layers = s.layers.end - s.layers.begin;
  }
  if (!f.out_path.empty() && (missing == 0 || f.allow_missing) && !payloads.empty()) {
    absl::StatusOr<std::string> seq =
        client::SpansToSequence(*model, num_layers, payloads, tokens);
    if (!seq.ok()) return Fail(err, seq.status());
    absl::StatusOr<NpyArray> npy = SequenceToNpy(*seq, *model, num_layers, total_tokens, f.float32);
    if (!npy.ok()) return Fail(err, npy.status());
    if (absl::Status w = WriteNpy(f.out_path, *npy); !w.ok()) return Fail(err, w);
  }
  if (f.json) {
    Struct j;
    Value list;
    for (const auto& s : spans) {
      Struct e;
      (*e.mutable_fields())["index"] = Num(s.index);
      (*e.mutable_fields())["hash"] = Str(s.hash.ToHex());
      (*e.mutable_fields())["found"] = Bool(s.found);
      (*e.mutable_fields())["miss_reason"] = Str(client::MissReasonName(s.miss_reason));
      if (s.found) {
        (*e.mutable_fields())["tier"] = Str(absl::AsciiStrToLower(v1::Tier_Name(s.tier).substr(5)));
        (*e.mutable_fields())["num_tokens"] = Num(s.num_tokens);
        (*e.mutable_fields())["payload_bytes"] = Num(static_cast<double>(s.payload.size()));
      }
      *list.mutable_list_value()->add_values()->mutable_struct_value() = e;
    }
    (*j.mutable_fields())["spans"] = list;
    (*j.mutable_fields())["missing"] = Num(missing);
    (*j.mutable_fields())["seconds"] = Num(seconds);
    if (!f.out_path.empty()) (*j.mutable_fields())["out"] = Str(f.out_path);
    out << ToJson(j) << "\n";
  } else {
    for (const auto& s : spans) {
      if (s.found) continue;
      out << "span " << s.index << " " << s.hash.ToHex() << ": missing ("
          << client::MissReasonName(s.miss_reason) << ")\n";
    }
    out << absl::StrFormat("fetched %d of %d spans (%d tokens, %.1f MiB) in %.2f s\n",
                           spans.size() - missing, spans.size(), total_tokens,
                           received_before / 1048576.0, seconds);
    if (!f.out_path.empty()) {
      if (missing == 0 || f.allow_missing) {
        out << "wrote " << f.out_path << " [" << num_layers << ", 2, " << model->num_kv_heads()
            << ", " << total_tokens << ", " << model->head_dim() << "]\n";
      } else {
        out << "nothing written: spans are missing (--allow_missing writes the found ones)\n";
      }
    }
  }
  return missing == 0 ? kExitOk : kExitFailed;
}

int CmdLookup(const Flags& f, client::KvStoreClient& c, std::ostream& out, std::ostream& err) {
  absl::StatusOr<client::LookupResult> r;
  std::vector<Hash128> hashes;
  if (!f.tokens.empty() || !f.text.empty()) {
    absl::StatusOr<std::vector<uint32_t>> ids = ReadTokenIds(f.tokens, f.text);
    if (!ids.ok()) return Fail(err, ids.status());
    r = c.LookupTokens(f.model, *ids, f.salt, !f.full_spans_only);
    if (r.ok()) hashes = r->hashes;
  } else {
    absl::StatusOr<std::vector<Hash128>> parsed = ReadSpanHashes(f.hashes, f.hashes_file);
    if (!parsed.ok()) return Fail(err, parsed.status());
    hashes = *parsed;
    r = c.Lookup(f.model, hashes);
  }
  if (!r.ok()) return Fail(err, r.status());
  if (f.json) {
    Struct j;
    (*j.mutable_fields())["prefix_spans"] = Num(r->prefix_spans);
    (*j.mutable_fields())["prefix_tokens"] = Num(static_cast<double>(r->prefix_tokens));
    (*j.mutable_fields())["chain_spans"] = Num(static_cast<double>(hashes.size()));
    Value missing;
    for (const auto& m : r->missing) {
      Struct e;
      (*e.mutable_fields())["index"] = Num(m.index);
      (*e.mutable_fields())["hash"] = Str(m.hash.ToHex());
      (*e.mutable_fields())["reason"] = Str(client::MissReasonName(m.reason));
      *missing.mutable_list_value()->add_values()->mutable_struct_value() = e;
    }
    (*j.mutable_fields())["missing"] = missing;
    out << ToJson(j) << "\n";
    return kExitOk;
  }
  out << "stored prefix: " << r->prefix_spans << " of " << hashes.size() << " spans ("
      << r->prefix_tokens << " tokens)\n";
  for (const auto& m : r->missing) {
    out << "span " << m.index << " " << m.hash.ToHex() << ": " << client::MissReasonName(m.reason)
        << "\n";
  }
  return kExitOk;
}

int CmdItems(const Flags& f, const std::string& verb, client::KvStoreClient& c,
             std::ostream& out, std::ostream& err) {
  absl::StatusOr<std::vector<Hash128>> hashes = ReadSpanHashes(f.hashes, f.hashes_file);
  if (!hashes.ok()) return Fail(err, hashes.status());
  if (hashes->empty()) {
    err << "kvrecall " << verb << ": no spans given (--hashes or --hashes_file)\n";
    return kExitUsage;
  }
  absl::StatusOr<std::vector<absl::Status>> results;
  if (verb == "rm") {
    results = c.DeleteSpans(*hashes);
  } else if (verb == "pin") {
    results = c.PinSpans(*hashes, f.ttl_s > 0 ? absl::Seconds(f.ttl_s) : absl::InfiniteDuration());
  } else {
    results = c.UnpinSpans(*hashes);
  }
  if (!results.ok()) return Fail(err, results.status());
  int ok = 0;
  Struct j;
  Value list;
  for (size_t i = 0; i < results->size(); ++i) {
    const absl::Status& s = (*results)[i];
    ok += s.ok();
    if (f.json) {
      Struct e;
      (*e.mutable_fields())["hash"] = Str((*hashes)[i].ToHex());
      (*e.mutable_fields())["code"] = Str(absl::StatusCodeToString(s.code()));
      (*e.mutable_fields())["message"] = Str(s.message());
      *list.mutable_list_value()->add_values()->mutable_struct_value() = e;
    } else {
      out << (*hashes)[i].ToHex() << ": "
          << (s.ok() ? "OK" : absl::StrCat(absl::StatusCodeToString(s.code()), ": ", s.message()))
          << "\n";
    }
  }
  if (f.json) {
    (*j.mutable_fields())["results"] = list;
    (*j.mutable_fields())["ok"] = Num(ok);
    out << ToJson(j) << "\n";
  }
  return ok == static_cast<int>(results->size()) ? kExitOk : kExitFailed;
}

int CmdStats(const Flags& f, client::KvStoreClient& c, std::ostream& out, std::ostream& err) {
  absl::StatusOr<v1::StatsResponse> s = c.Stats();
  if (!s.ok()) return Fail(err, s.status());
  if (f.json) {
    out << ToJson(*s) << "\n";
    return kExitOk;
  }
  out << absl::StrFormat("uptime %ds, %d models, %d pinned spans\n", s->uptime_s(), s->models(),
                         s->pinned_spans());
  out << absl::StrFormat("%-8s %14s %14s %10s %10s %10s %10s %10s %10s\n", "tier", "capacity",
                         "bytes", "spans", "hits", "misses", "evictions", "promotions",
                         "corrupt");
  for (const auto& t : s->tiers()) {
    out << absl::StrFormat("%-8s %14d %14d %10d %10d %10d %10d %10d %10d\n",
                           absl::AsciiStrToLower(v1::Tier_Name(t.tier()).substr(5)),
                           t.capacity_bytes(), t.bytes(), t.spans(), t.hits(), t.misses(),
                           t.evictions(), t.promotions(), t.checksum_failures());
  }
  out << "misses by reason:";
  for (const auto& m : s->misses_by_reason()) {
    out << " " << client::MissReasonName(m.reason()) << "=" << m.count();
  }
  out << "\n";
  out << absl::StrFormat("%-36s %9s %10s %10s %10s %12s\n", "rpc", "calls", "p50_us", "p99_us",
                         "max_us", "payload_MiB");
  for (const auto& r : s->rpcs()) {
    if (r.count() == 0) continue;
    out << absl::StrFormat("%-36s %9d %10.0f %10.0f %10.0f %12.1f\n", r.method(), r.count(),
                           r.p50_us(), r.p99_us(), r.max_us(), r.payload_bytes() / 1048576.0);
  }
  return kExitOk;
}

int CmdConfig(const Flags& f, client::KvStoreClient& c, std::ostream& out, std::ostream& err) {
  absl::StatusOr<v1::GetConfigResponse> r = c.GetConfig();
  if (!r.ok()) return Fail(err, r.status());
  if (f.json) {
    out << ToJson(*r) << "\n";
    return kExitOk;
  }
  out << "kvrecalld " << r->version() << ", API " << r->api_version() << ", span hash "
      << r->span_hash_version() << "\n";
  for (const auto& o : r->options()) out << "--" << o.name() << "=" << o.value() << "\n";
  return kExitOk;
}

// Runs <bin dir>/<name>_bench with `args`; only returns on failure.
int CmdBench(const std::string& name, const std::vector<std::string>& args, std::ostream& err) {
  std::string dir;
  if (const char* env = std::getenv("KVRECALL_BIN_DIR"); env != nullptr && *env != '\0') {
    dir = env;
  } else {
    std::error_code ec;
    const auto self = std::filesystem::read_symlink("/proc/self/exe", ec);
    if (ec) {
      err << "kvrecall bench: cannot locate this executable: " << ec.message() << "\n";
      return kExitFailed;
    }
    dir = self.parent_path().string();
  }
  const std::string binary = absl::StrCat(name, "_bench");
  const std::string path = absl::StrCat(dir, "/", binary);
  if (access(path.c_str(), X_OK) != 0) {
    err << "kvrecall bench " << name << ": " << path << " is not built (cmake --build <build> "
        << "--target " << binary << "; it lives beside the kvrecall binary)\n";
    return kExitFailed;
  }
  std::vector<char*> argv;
  argv.push_back(const_cast<char*>(path.c_str()));
  for (const std::string& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  execv(path.c_str(), argv.data());
  err << "kvrecall bench: cannot run " << path << ": " << std::strerror(errno) << "\n";
  return kExitFailed;
}


// The options before the command (--target, --token, ...).
void AddGlobalOptions(CLI::App* app, Flags& f) {
  app->require_subcommand(1);
  app->add_option("--target", f.target, "host:port of kvrecalld (env KVRECALL_TARGET)")
      ->capture_default_str();
  app->add_option("--token", f.token,
                  "bearer token when the daemon has a tenants file (env KVRECALL_TOKEN)");
  app->add_flag("--tls", f.global.tls, "dial over TLS (implied by --tls_ca/--tls_cert)");
  app->add_option("--tls_ca", f.global.tls_ca,
                  "PEM CA bundle that signed the daemon's certificate (env KVRECALL_TLS_CA)");
  app->add_option("--tls_cert", f.global.tls_cert,
                  "PEM client certificate, for daemons requiring one (env KVRECALL_TLS_CERT)");
  app->add_option("--tls_key", f.global.tls_key, "PEM key of --tls_cert (env KVRECALL_TLS_KEY)");
  app->add_option("--tls_server_name", f.global.tls_server_name,
                  "name the daemon's certificate carries, when not the target's host");
  app->add_option("--deadline_ms", f.deadline_ms, "deadline of each call, ms")
      ->capture_default_str();
  app->add_flag("--json", f.json, "print machine-readable JSON on stdout");
  app->add_option("--progress", f.progress,
                  "progress bar on stderr: auto (when a terminal), always, never")
      ->check(CLI::IsMember({"auto", "always", "never"}))
      ->capture_default_str();
}

// The store commands: register, models, put, get, lookup, rm, pin, unpin,
// stats, config.
void AddStoreCommands(CLI::App* app, Flags& f) {
  auto* reg = app->add_subcommand("register", "register a model's geometry");
  reg->add_option("--model", f.model, "model id")->required();
  reg->add_option("--layers", f.layers, "layers")->required();
  reg->add_option("--q_heads", f.q_heads, "query heads")->required();
  reg->add_option("--kv_heads", f.kv_heads, "key/value heads")->required();
  reg->add_option("--head_dim", f.head_dim, "head dimension")->required();
  reg->add_option("--dtype", f.dtype, "f16, bf16 or f32")->capture_default_str();
  reg->add_option("--block_tokens", f.block_tokens, "tokens per span")->capture_default_str();
  reg->add_flag("--keys_pre_rope", f.keys_pre_rope, "keys are stored before RoPE");

  app->add_subcommand("models", "list registered models");

  auto add_tokens = [&](CLI::App* cmd) {
    cmd->add_option("--tokens", f.tokens, ".npy of token ids (1-D integers)");
    cmd->add_option("--text", f.text, "file whose bytes are the token ids (byte-level models)");
    cmd->add_option("--salt", f.salt, "salt of the span-hash chain");
    cmd->add_flag("--full_spans_only", f.full_spans_only, "ignore a final partial span");
  };
  auto add_hashes = [&](CLI::App* cmd) {
    cmd->add_option("--hashes", f.hashes, "comma-separated span hashes (32 hex digits)");
    cmd->add_option("--hashes_file", f.hashes_file, "file with one span hash per line");
  };

  auto* put = app->add_subcommand("put", "store spans from .npy/.safetensors or random data");
  put->add_option("--model", f.model, "model id")->required();
  put->add_option("--npy", f.npy, ".npy K/V [layers, 2, kv_heads, tokens, head_dim]");
  put->add_option("--safetensors", f.safetensors,
                  ".safetensors with keys/values [layers, kv_heads, tokens, head_dim]");
  put->add_option("--random", f.random_spans, "store N random full spans (a chain)");
  put->add_option("--seed", f.seed, "seed of --random")->capture_default_str();
  put->add_flag("--durable", f.durable, "sync to a persistent tier before the ack");
  put->add_option("--hashes_out", f.hashes_out, "write the span hashes to this file");
  add_tokens(put);

  auto* get = app->add_subcommand("get", "fetch spans, optionally into a .npy");
  get->add_option("--model", f.model, "model id")->required();
  add_hashes(get);
  add_tokens(get);
  get->add_option("--layers", f.layer_range, "layer range BEGIN:END (default all)");
  get->add_option("-o,--out", f.out_path, "write K/V [layers, 2, kv_heads, tokens, head_dim]");
  get->add_flag("--float32", f.float32, "write float32 instead of the model's dtype");
  get->add_flag("--allow_missing", f.allow_missing, "write the found spans even if some miss");

  auto* lookup = app->add_subcommand("lookup", "longest stored prefix, and why the rest misses");
  lookup->add_option("--model", f.model, "model id")->required();
  add_hashes(lookup);
  add_tokens(lookup);

  auto* rm = app->add_subcommand("rm", "delete spans");
  add_hashes(rm);
  auto* pin = app->add_subcommand("pin", "pin spans in memory");
  add_hashes(pin);
  pin->add_option("--ttl_s", f.ttl_s, "pin lifetime in seconds (0: until unpinned)");
  auto* unpin = app->add_subcommand("unpin", "release pins");
  add_hashes(unpin);

  app->add_subcommand("stats", "per-tier, per-RPC and miss-reason counters");
  app->add_subcommand("config", "the daemon's effective options and versions");
}

// `bench NAME ARGS...`: runs NAME_bench with the remaining arguments.
void AddBenchCommand(CLI::App* app, Flags& f) {
  auto* bench = app->add_subcommand("bench", "run a benchmark binary: store, index, retrieval, gpu");
  bench->add_option("name", f.bench_name, "which benchmark")
      ->required()
      ->check(CLI::IsMember({"store", "index", "retrieval", "gpu"}));
  bench->allow_extras();
  bench->prefix_command();
}

// Runs the parsed store command `name` (flags `f`) against a KvStoreClient of `g`.
int RunStoreCommand(const std::string& name, const Flags& f, const GlobalOptions& g,
                    std::ostream& out, std::ostream& err) {
  absl::StatusOr<std::unique_ptr<client::KvStoreClient>> client =
      client::KvStoreClient::Create(g.client_options());
  if (!client.ok()) return Fail(err, client.status());
  client::KvStoreClient& c = **client;
  if (name == "register") return CmdRegister(f, c, out, err);
  if (name == "models") return CmdModels(f, c, out, err);
  if (name == "put") return CmdPut(f, c, out, err);
  if (name == "get") return CmdGet(f, c, out, err);
  if (name == "lookup") return CmdLookup(f, c, out, err);
  if (name == "rm" || name == "pin" || name == "unpin") return CmdItems(f, name, c, out, err);
  if (name == "stats") return CmdStats(f, c, out, err);
  if (name == "config") return CmdConfig(f, c, out, err);
  err << "kvrecall: unknown command " << name << "\n";
  return kExitUsage;
}

}  // namespace

int RunCli(int argc, const char* const* argv, std::ostream& out, std::ostream& err) {
  Flags f;
  RetrievalCommands retrieval;
  PolicyCommands policy;
  ClusterCommands cluster;
  if (const char* t = std::getenv("KVRECALL_TARGET"); t != nullptr && *t != '\0') f.target = t;
  if (const char* t = std::getenv("KVRECALL_TOKEN"); t != nullptr) f.token = t;
  if (const char* t = std::getenv("KVRECALL_TLS_CA"); t != nullptr) f.global.tls_ca = t;
  if (const char* t = std::getenv("KVRECALL_TLS_CERT"); t != nullptr) f.global.tls_cert = t;
  if (const char* t = std::getenv("KVRECALL_TLS_KEY"); t != nullptr) f.global.tls_key = t;
  CLI::App app{"kvrecall: command-line client of kvrecalld (docs/cli.md)", "kvrecall"};
  try {
    AddGlobalOptions(&app, f);
    AddStoreCommands(&app, f);
    retrieval.Register(&app);
    policy.Register(&app);
    cluster.Register(&app);
    AddBenchCommand(&app, f);
    app.parse(argc, argv);

    CLI::App* cmd = app.get_subcommands().front();
    const std::string name = cmd->get_name();
    if (name == "bench") return CmdBench(f.bench_name, cmd->remaining(), err);
    GlobalOptions g = f.global;
    g.target = f.target;
    g.token = f.token;
    g.deadline_ms = f.deadline_ms;
    g.json = f.json;
    g.progress = ProgressEnabled(f);
    g.stage_lines = !g.progress && f.progress == "auto";
    if (retrieval.Handles(name)) return retrieval.Run(cmd, g, out, err);
    if (policy.Handles(name)) return policy.Run(cmd, g, out, err);
    if (cluster.Handles(name)) return cluster.Run(cmd, g, out, err);
    return RunStoreCommand(name, f, g, out, err);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e, out, err);
    return code == 0 ? kExitOk : kExitUsage;
  } catch (const std::exception& e) {
    err << "kvrecall: " << e.what() << "\n";
    return kExitFailed;
  }
}

}  // namespace kvrecall::cli
