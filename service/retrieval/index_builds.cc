// RetrievalService: index builds (long-running operations), the index
// registry and its persistence in the catalog.
#include "service/retrieval/retrieval_service.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <optional>
#include <random>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/logging.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "index/distance.h"
#include "index/index_factory.h"
#include "index/index_format.h"
#include "service/retrieval/retrieval_internal.h"

namespace kvrecall::retrieval {

using internal::ContextIndexPrefix;
using internal::IndexKey;
using internal::IndexLatestKey;
using internal::kIndexLatestSpace;
using internal::kIndexSpace;

// ---------------------------------------------------------------- index builds

namespace {

// "op-" and 128 random bits from the kernel's generator, in hex: an id no
// other tenant can guess (the ids of earlier builds tell nothing of the next).
std::string NewOperationId() {
  std::random_device rd;
  std::string out = "op-";
  for (int i = 0; i < 4; ++i) absl::StrAppend(&out, absl::Hex(rd(), absl::kZeroPad8));
  return out;
}

}  // namespace

absl::StatusOr<std::string> RetrievalService::BuildIndex(const BuildIndexRequest& request) {
  KVR_ASSIGN_OR_RETURN(std::shared_ptr<Context> ctx,
                       GetContext(request.tenant, request.context, absl::InfiniteFuture()));
  const auto kinds = index::IndexKinds();
  if (std::find(kinds.begin(), kinds.end(), request.kind) == kinds.end()) {
    return absl::InvalidArgumentError(absl::StrCat("unknown index kind '", request.kind,
                                                   "' (known: ", absl::StrJoin(kinds, ", "), ")"));
  }
  KVR_RETURN_IF_ERROR(index::ParamMap::Parse(request.params).status());
  const auto& m = ctx->model();
  for (int32_t l : request.layers) {
    if (l < 0 || l >= m.num_layers) {
      return absl::InvalidArgumentError(
          absl::StrCat("layer ", l, " is not within [0, ", m.num_layers, ")"));
    }
  }
  for (int32_t h : request.kv_heads) {
    if (h < 0 || h >= m.num_kv_heads) {
      return absl::InvalidArgumentError(
          absl::StrCat("KV head ", h, " is not within [0, ", m.num_kv_heads, ")"));
    }
  }
  auto op = std::make_shared<Operation>();
  BuildIndexRequest req = request;
  if (req.layers.empty()) {
    req.layers.resize(m.num_layers);
    std::iota(req.layers.begin(), req.layers.end(), 0);
  }
  if (req.kv_heads.empty()) {
    req.kv_heads.resize(m.num_kv_heads);
    std::iota(req.kv_heads.begin(), req.kv_heads.end(), 0);
  }
  op->tenant = request.tenant;
  absl::MutexLock lock(&mu_);
  if (stopping_) return absl::UnavailableError("the service is shutting down");
  if (static_cast<int64_t>(queue_.size()) >= options_.max_queued_builds) {
    return absl::ResourceExhaustedError(absl::StrCat(
        queue_.size(), " index builds are waiting to run (--max_queued_builds=",
        options_.max_queued_builds, "); retry later"));
  }
  if (options_.tenant_builds > 0) {
    int64_t active = 0;
    for (const auto& [id, o] : operations_) {
      active += o->tenant == request.tenant && (o->info.state == OperationState::kPending ||
                                                o->info.state == OperationState::kRunning);
    }
    if (active >= options_.tenant_builds) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "the tenant has ", active, " index builds queued or running, its quota "
          "(--tenant_builds=", options_.tenant_builds, "); wait for one to finish"));
    }
  }
  do {
    op->info.id = NewOperationId();
  } while (operations_.contains(op->info.id));
  op->info.description = absl::StrCat("build ", req.kind, "(", req.params, ") for context ",
                                      req.context.ToHex(), ": ", req.layers.size(), " layers x ",
                                      req.kv_heads.size(), " KV heads");
  op->info.state = OperationState::kPending;
  op->started = absl::Now();
  operations_[op->info.id] = op;
  queue_.emplace_back(op, std::move(req));
  return op->info.id;
}

void RetrievalService::BuilderLoop() {
  while (true) {
    std::shared_ptr<Operation> op;
    BuildIndexRequest request;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(
          +[](RetrievalService* s) ABSL_EXCLUSIVE_LOCKS_REQUIRED(s->mu_) {
            return s->stopping_ || !s->queue_.empty();
          },
          this));
      if (stopping_) {
        for (auto& [queued, req] : queue_) {
          queued->info.state = OperationState::kCancelled;
          queued->info.error = absl::CancelledError("the service shut down");
        }
        queue_.clear();
        return;
      }
      op = queue_.front().first;
      request = std::move(queue_.front().second);
      queue_.pop_front();
      // Forget old finished operations.
      const absl::Time now = absl::Now();
      for (auto it = operations_.begin(); it != operations_.end();) {
        const auto st = it->second->info.state;
        const bool ended = st == OperationState::kDone || st == OperationState::kFailed ||
                           st == OperationState::kCancelled;
        if (ended && now - it->second->started > options_.operation_retention) {
          it = operations_.erase(it);
        } else {
          ++it;
        }
      }
    }
    RunOperation(op, std::move(request));
  }
}

void RetrievalService::FinishOperation(Operation& op, OperationState state, absl::Status error) {
  absl::MutexLock lock(&mu_);
  op.info.state = state;
  op.info.error = std::move(error);
  op.info.elapsed = absl::Now() - op.started;
  op.info.eta = absl::ZeroDuration();
  if (state == OperationState::kDone) op.info.fraction = 1.0;
}

absl::StatusOr<std::pair<std::string, std::string>> RetrievalService::CalibrationArtifact(
    const BuildIndexRequest& request, const std::string& model_id) {
  std::string name;
  if (request.kind == "loki") name = "loki_basis";
  if (request.kind == "inverted") name = "sparse_encoder";
  if (name.empty()) return std::make_pair(std::string(), std::string());
  // The tenant's own calibration, else the shared one an admin published.
  auto art = GetArtifact(request.tenant, /*shared=*/false, model_id, name, 0);
  if (absl::IsNotFound(art.status())) {
    art = GetArtifact(request.tenant, /*shared=*/true, model_id, name, 0);
  }
  if (absl::IsNotFound(art.status())) return std::make_pair(name, std::string());
  if (!art.ok()) return art.status();
  return std::make_pair(name, std::move(art->second));
}

void RetrievalService::RunOperation(std::shared_ptr<Operation> op, BuildIndexRequest request) {
  auto finish = [&](OperationState state, absl::Status error) {
    FinishOperation(*op, state, std::move(error));
  };
  if (op->cancel.load()) {
    finish(OperationState::kCancelled, absl::CancelledError("cancelled before it started"));
    return;
  }
  auto ctx_or = GetContext(request.tenant, request.context, absl::InfiniteFuture());
  if (!ctx_or.ok()) {
    finish(OperationState::kFailed, ctx_or.status());
    return;
  }
  std::shared_ptr<Context> ctx = *ctx_or;
  const store::ModelGeometry& m = ctx->model();
  auto params = index::ParamMap::Parse(request.params);
  if (!params.ok()) {
    finish(OperationState::kFailed, params.status());
    return;
  }
  auto artifact = CalibrationArtifact(request, m.model_id);
  if (!artifact.ok()) {
    finish(OperationState::kFailed, artifact.status());
    return;
  }
  const auto& [artifact_name, artifact_bytes] = *artifact;

  BuildProgress progress;
  progress.items = static_cast<int64_t>(request.layers.size() * request.kv_heads.size());
  int64_t total_keys = 0;
  for (int32_t l : request.layers) total_keys += ctx->num_tokens(l) * request.kv_heads.size();
  {
    absl::MutexLock lock(&mu_);
    op->info.state = OperationState::kRunning;
    op->info.keys_total = total_keys;
  }
  for (int32_t layer : request.layers) {
    for (int32_t kv_head : request.kv_heads) {
      const int64_t n = ctx->num_tokens(layer);
      auto built = BuildLayerHead(*op, request, *ctx, *params, artifact_name, artifact_bytes,
                                  layer, kv_head, progress);
      if (op->cancel.load()) {
        finish(OperationState::kCancelled, absl::CancelledError("cancelled by request"));
        return;
      }
      if (!built.ok()) {
        finish(absl::IsCancelled(built.status()) ? OperationState::kCancelled
                                                 : OperationState::kFailed,
               absl::Status(built.status().code(),
                            absl::StrCat("layer ", layer, " head ", kv_head, ": ",
                                         built.status().message())));
        return;
      }
      auto li = std::make_shared<LoadedIndex>();
      li->layer = layer;
      li->kv_head = kv_head;
      li->kind = request.kind;
      li->params = params->ToString();
      li->key = IndexKey(request.tenant, request.context, layer, kv_head, li->kind, li->params);
      const absl::Status installed = InstallIndex(request, *ctx, std::move(*built), li);
      if (!installed.ok()) {
        finish(OperationState::kFailed, installed);
        return;
      }
      absl::MutexLock lock(&mu_);
      ++progress.done_items;
      progress.done_keys += n;
      op->info.keys_indexed = progress.done_keys;
      op->info.fraction =
          static_cast<double>(progress.done_items) / static_cast<double>(progress.items);
    }
  }
  finish(OperationState::kDone, absl::OkStatus());
}

absl::StatusOr<std::unique_ptr<index::KeyIndex>> RetrievalService::BuildLayerHead(
    Operation& op, const BuildIndexRequest& request, const Context& ctx,
    const index::ParamMap& params, const std::string& artifact_name,
    const std::string& artifact_bytes, int32_t layer, int32_t kv_head,
    const BuildProgress& progress) {
  const store::ModelGeometry& m = ctx.model();
  const int64_t n = ctx.num_tokens(layer);
  const std::string keys = ctx.GatherKeys(layer, kv_head, 0, n);
  bool complete = false;
  const std::vector<float> queries = ctx.TrainingQueries(layer, kv_head, n, &complete);
  index::BuildOptions bo;
  bo.params = params;
  // A causal roar build needs a query for every position; with fewer, the
  // graph trains on the queries there are, unordered.
  if (request.kind == "roar" && !complete && !queries.empty() && !bo.params.Has("causal")) {
    bo.params.Set("causal", "0");
  }
  if (!artifact_bytes.empty()) {
    bo.artifacts.emplace_back(artifact_name, artifact_bytes);
    if (!bo.params.Has("layer")) bo.params.SetInt("layer", layer);
    if (!bo.params.Has("kv_head")) bo.params.SetInt("kv_head", kv_head);
  }
  bo.progress = [&, n](const Progress& p) {
    absl::MutexLock lock(&mu_);
    const double f =
        (static_cast<double>(progress.done_items) + std::clamp(p.fraction, 0.0, 1.0)) /
        static_cast<double>(progress.items);
    op.info.fraction = std::max(op.info.fraction, f);
    op.info.stage = absl::StrCat("layer ", layer, " head ", kv_head, ": ", p.stage);
    op.info.keys_indexed = progress.done_keys + static_cast<int64_t>(p.fraction * n);
    op.info.elapsed = absl::Now() - op.started;
    if (op.info.fraction > 0) {
      op.info.eta = op.info.elapsed * ((1.0 - op.info.fraction) / op.info.fraction);
    }
    return !op.cancel.load();
  };
  index::VectorView key_view{keys.data(), n, m.head_dim, m.dtype, 0};
  index::VectorView query_view = index::VectorView::F32(
      queries.data(), static_cast<int64_t>(queries.size() / m.head_dim), m.head_dim);
  return index::BuildIndex(request.kind, key_view, query_view, bo);
}

absl::Status RetrievalService::InstallIndex(const BuildIndexRequest& request, const Context& ctx,
                                            std::unique_ptr<index::KeyIndex> built,
                                            std::shared_ptr<LoadedIndex> li) {
  {
    absl::MutexLock ilock(&li->mu);
    li->index = std::move(built);
    // Catch up with tokens appended during the build.
    CatchUpIndex(ctx, li->layer, li->kv_head, li->index.get())
        .IgnoreError();  // kinds that cannot grow serve the built prefix
    if (options_.persist_indexes) {
      auto bytes = li->index->Serialize();
      KVR_RETURN_IF_ERROR(bytes.status());
      KVR_RETURN_IF_ERROR(store_->CatalogPut(kIndexSpace, li->key, *bytes));
      KVR_RETURN_IF_ERROR(store_->CatalogPut(
          kIndexLatestSpace,
          IndexLatestKey(request.tenant, request.context, li->layer, li->kv_head, li->kind),
          li->params));
    }
  }
  absl::MutexLock lock(&mu_);
  indexes_[li->key] = std::move(li);
  return absl::OkStatus();
}

absl::StatusOr<OperationInfo> RetrievalService::GetOperation(absl::string_view tenant,
                                                             absl::string_view id) const {
  absl::MutexLock lock(&mu_);
  auto it = operations_.find(std::string(id));
  // Another tenant's operation answers exactly as an unknown id.
  if (it == operations_.end() || it->second->tenant != tenant) {
    return absl::NotFoundError(absl::StrCat("no operation ", id));
  }
  OperationInfo info = it->second->info;
  if (info.state == OperationState::kRunning || info.state == OperationState::kPending) {
    info.elapsed = absl::Now() - it->second->started;
  }
  return info;
}

absl::StatusOr<OperationInfo> RetrievalService::WaitOperation(absl::string_view tenant,
                                                              absl::string_view id,
                                                              absl::Time deadline) const {
  absl::MutexLock lock(&mu_);
  auto it = operations_.find(std::string(id));
  if (it == operations_.end() || it->second->tenant != tenant) {
    return absl::NotFoundError(absl::StrCat("no operation ", id));
  }
  // Keep the operation alive while waiting (retention may drop it from the map).
  const std::shared_ptr<Operation> held = it->second;
  const Operation* op = held.get();
  mu_.AwaitWithDeadline(absl::Condition(
                            +[](const Operation* o) {
                              const auto st = o->info.state;
                              return st == OperationState::kDone ||
                                     st == OperationState::kFailed ||
                                     st == OperationState::kCancelled;
                            },
                            op),
                        deadline);
  OperationInfo info = op->info;
  if (info.state == OperationState::kRunning || info.state == OperationState::kPending) {
    info.elapsed = absl::Now() - op->started;
  }
  return info;
}

absl::Status RetrievalService::CancelOperation(absl::string_view tenant, absl::string_view id) {
  absl::MutexLock lock(&mu_);
  auto it = operations_.find(std::string(id));
  if (it == operations_.end() || it->second->tenant != tenant) {
    return absl::NotFoundError(absl::StrCat("no operation ", id));
  }
  Operation* op = it->second.get();
  op->cancel.store(true);
  if (op->info.state == OperationState::kPending) {
    for (auto q = queue_.begin(); q != queue_.end(); ++q) {
      if (q->first.get() == op) {
        queue_.erase(q);
        break;
      }
    }
    op->info.state = OperationState::kCancelled;
    op->info.error = absl::CancelledError("cancelled before it started");
  }
  return absl::OkStatus();
}

std::vector<OperationInfo> RetrievalService::ListOperations(absl::string_view tenant) const {
  absl::MutexLock lock(&mu_);
  std::vector<OperationInfo> out;
  for (const auto& [id, op] : operations_) {
    if (op->tenant == tenant) out.push_back(op->info);
  }
  return out;
}

absl::StatusOr<std::vector<IndexInfo>> RetrievalService::ListIndexes(absl::string_view tenant,
                                                                     const Hash128& context) {
  const std::string prefix = context.IsZero()
                                 ? absl::StrCat(tenant, absl::string_view("\0", 1))
                                 : ContextIndexPrefix(tenant, context);
  KVR_ASSIGN_OR_RETURN(auto persisted, store_->CatalogScan(kIndexSpace, prefix));
  std::map<std::string, IndexInfo> out;
  auto parse_key = [&](const std::string& key, IndexInfo* info) {
    // tenant \0 ctxhex | layer | head | kind | params
    const size_t nul = key.find('\0');
    std::vector<std::string> parts = absl::StrSplit(key.substr(nul + 1), absl::MaxSplits('|', 4));
    if (parts.size() != 5) return false;
    auto h = Hash128::FromHex(parts[0]);
    if (!h.ok()) return false;
    info->context = *h;
    info->layer = std::atoi(parts[1].c_str());
    info->kv_head = std::atoi(parts[2].c_str());
    info->kind = parts[3];
    info->params = parts[4];
    return true;
  };
  for (const auto& [key, bytes] : persisted) {
    IndexInfo info;
    if (!parse_key(key, &info)) continue;
    auto decoded = index::DecodeIndex(bytes);
    if (decoded.ok()) info.num_keys = decoded->first.size;
    info.index_bytes = static_cast<int64_t>(bytes.size());
    out[key] = info;
  }
  absl::MutexLock lock(&mu_);
  for (auto i = indexes_.lower_bound(prefix);
       i != indexes_.end() && absl::StartsWith(i->first, prefix); ++i) {
    IndexInfo& info = out[i->first];
    parse_key(i->first, &info);
    info.loaded = true;
    absl::MutexLock ilock(&i->second->mu);
    info.num_keys = i->second->index->size();
    info.index_bytes = i->second->index->IndexBytes() + i->second->index->KeyBytes();
  }
  std::vector<IndexInfo> list;
  for (auto& [key, info] : out) list.push_back(std::move(info));
  return list;
}

absl::Status RetrievalService::DeleteIndex(absl::string_view tenant, const Hash128& context,
                                           absl::string_view kind, absl::string_view params) {
  const std::string prefix = ContextIndexPrefix(tenant, context);
  KVR_ASSIGN_OR_RETURN(auto persisted, store_->CatalogScan(kIndexSpace, prefix));
  int64_t removed = 0;
  auto matches = [&](const std::string& key) {
    std::vector<std::string> parts = absl::StrSplit(key.substr(prefix.size()), absl::MaxSplits('|', 3));
    return parts.size() == 4 && parts[2] == kind && (params.empty() || parts[3] == params);
  };
  for (const auto& [key, bytes] : persisted) {
    if (!matches(key)) continue;
    KVR_RETURN_IF_ERROR(store_->CatalogDelete(kIndexSpace, key));
    ++removed;
  }
  KVR_ASSIGN_OR_RETURN(auto latest, store_->CatalogScan(kIndexLatestSpace, prefix));
  for (const auto& [key, value] : latest) {
    std::vector<std::string> parts = absl::StrSplit(key.substr(prefix.size()), absl::MaxSplits('|', 3));
    if (parts.size() == 4 && parts[2] == kind && (params.empty() || value == params)) {
      KVR_RETURN_IF_ERROR(store_->CatalogDelete(kIndexLatestSpace, key));
    }
  }
  absl::MutexLock lock(&mu_);
  for (auto i = indexes_.lower_bound(prefix);
       i != indexes_.end() && absl::StartsWith(i->first, prefix);) {
    if (matches(i->first)) {
      i = indexes_.erase(i);
      ++removed;
    } else {
      ++i;
    }
  }
  if (removed == 0) {
    return absl::NotFoundError(absl::StrCat("no ", kind, " index of context ", context.ToHex()));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<RetrievalService::LoadedIndex>> RetrievalService::FindIndex(
    const Context& ctx, int32_t layer, int32_t kv_head, const IndexSelector& sel) {
  std::string params = sel.build_params;
  if (!params.empty()) {
    KVR_ASSIGN_OR_RETURN(index::ParamMap parsed, index::ParamMap::Parse(params));
    params = parsed.ToString();
  }
  const std::string head_prefix =
      IndexKey(ctx.tenant(), ctx.id(), layer, kv_head, sel.kind, "");
  {
    absl::MutexLock lock(&mu_);
    if (!params.empty()) {
      auto it = indexes_.find(head_prefix + params);
      if (it != indexes_.end()) return it->second;
    } else {
      // The most recently built loaded one: the catalog's "latest" record decides below;
      // with only one loaded variant, use it.
      auto it = indexes_.lower_bound(head_prefix);
      if (it != indexes_.end() && absl::StartsWith(it->first, head_prefix)) {
        auto next = std::next(it);
        if (next == indexes_.end() || !absl::StartsWith(next->first, head_prefix)) {
          return it->second;
        }
      }
    }
  }
  if (params.empty()) {
    auto latest = store_->CatalogGet(
        kIndexLatestSpace, IndexLatestKey(ctx.tenant(), ctx.id(), layer, kv_head, sel.kind));
    if (latest.ok()) params = *latest;
  }
  const std::string key = head_prefix + params;
  {
    absl::MutexLock lock(&mu_);
    auto it = indexes_.find(key);
    if (it != indexes_.end()) return it->second;
  }
  auto bytes = store_->CatalogGet(kIndexSpace, key);
  if (!bytes.ok()) {
    if (absl::IsNotFound(bytes.status())) {
      return absl::FailedPreconditionError(absl::StrCat(
          "no ", sel.kind, " index", sel.build_params.empty() ? "" : " with params ",
          sel.build_params, " for context ", ctx.id().ToHex(), " layer ", layer, " KV head ",
          kv_head, "; build it first: BuildIndex(context, kind=", sel.kind,
          ") or `kvrecall index build --context ", ctx.id().ToHex(), " --kind ", sel.kind, "`"));
    }
    return bytes.status();
  }
  KVR_ASSIGN_OR_RETURN(std::unique_ptr<index::KeyIndex> loaded, index::LoadIndex(*bytes));
  auto li = std::make_shared<LoadedIndex>();
  li->key = key;
  li->layer = layer;
  li->kv_head = kv_head;
  li->kind = sel.kind;
  li->params = params;
  {
    absl::MutexLock ilock(&li->mu);
    li->index = std::move(loaded);
    CatchUpIndex(ctx, layer, kv_head, li->index.get())
        .IgnoreError();  // kinds that cannot grow serve the positions they hold
  }
  absl::MutexLock lock(&mu_);
  auto [it, inserted] = indexes_.emplace(key, li);
  return it->second;
}

}  // namespace kvrecall::retrieval
