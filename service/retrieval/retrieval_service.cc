#include "service/retrieval/retrieval_service.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <optional>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/checksum.h"
#include "common/logging.h"
#include "common/span_hash.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "index/distance.h"
#include "index/index_factory.h"
#include "index/index_format.h"
#include "service/retrieval/retrieval_internal.h"

namespace kvrecall::retrieval {

using internal::CheckDeadline;
using internal::CheckFinite;
using internal::ContextIndexPrefix;
using internal::ContextRecordKey;
using internal::DecodeContextRecord;
using internal::EncodeContextRecord;
using internal::kContextSpace;
using internal::kIndexLatestSpace;
using internal::kIndexSpace;
using internal::MicrosSince;

namespace {
// Idle-closed contexts remembered for their dropped tails (beyond it, some are forgotten).
constexpr size_t kMaxDroppedTails = 1 << 16;
}  // namespace

absl::string_view OperationStateName(OperationState state) {
  switch (state) {
    case OperationState::kPending:
      return "pending";
    case OperationState::kRunning:
      return "running";
    case OperationState::kDone:
      return "done";
    case OperationState::kFailed:
      return "failed";
    case OperationState::kCancelled:
      return "cancelled";
  }
  return "unknown";
}

RetrievalService::RetrievalService(store::TieredStore* store, const RetrievalOptions& options)
    : store_(store), options_(options) {}

absl::StatusOr<std::unique_ptr<RetrievalService>> RetrievalService::Create(
    store::TieredStore* store, const RetrievalOptions& options) {
  if (store == nullptr) return absl::InvalidArgumentError("retrieval service needs a store");
  if (options.concurrent_builds < 1 || options.concurrent_builds > 64) {
    return absl::InvalidArgumentError("concurrent_builds must be in [1, 64]");
  }
  if (options.context_idle_ttl <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("context_idle_ttl must be positive");
  }
  std::unique_ptr<RetrievalService> service(new RetrievalService(store, options));
  for (int i = 0; i < options.concurrent_builds; ++i) {
    service->builders_.emplace_back([s = service.get()] { s->BuilderLoop(); });
  }
  return service;
}

RetrievalService::~RetrievalService() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    for (auto& [id, op] : operations_) op->cancel.store(true);
  }
  for (std::thread& t : builders_) t.join();
  absl::MutexLock lock(&mu_);
  for (auto& [key, entry] : contexts_) {
    for (const auto& span : entry->context->spans()) {
      store_->Unpin(span->key).IgnoreError();  // shutting down: pins are not persistent
    }
  }
}

// ---------------------------------------------------------------- contexts

absl::StatusOr<OpenContextReply> RetrievalService::OpenContext(absl::string_view tenant,
                                                               absl::string_view model_id,
                                                               absl::Span<const Hash128> chain,
                                                               absl::Time deadline) {
  CloseIdleContexts();
  if (chain.empty()) return absl::InvalidArgumentError("a context needs at least one span hash");
  {
    absl::MutexLock lock(&mu_);  // opened again on purpose: the caller knows its tail is gone
    dropped_tails_.erase({std::string(tenant), chain.back()});
  }
  KVR_ASSIGN_OR_RETURN(store::ModelGeometry model, store_->GetModel(model_id));
  const Hash128 id = chain.back();
  {
    absl::MutexLock lock(&mu_);
    auto it = contexts_.find({std::string(tenant), id});
    if (it != contexts_.end() && it->second->context->model().model_id == model_id &&
        it->second->context->chain() == std::vector<Hash128>(chain.begin(), chain.end())) {
      it->second->last_used = absl::Now();
      const auto& ctx = it->second->context;
      return OpenContextReply{id, ctx->num_tokens(0), static_cast<int32_t>(chain.size()), false};
    }
  }
  if (options_.tenant_contexts > 0) {
    absl::MutexLock lock(&mu_);
    int64_t open = 0;
    for (const auto& [key, entry] : contexts_) open += key.first == tenant;
    if (open >= options_.tenant_contexts) {
      return absl::ResourceExhaustedError(absl::StrCat(
          "the tenant has ", open, " open contexts, its quota (--tenant_contexts=",
          options_.tenant_contexts, "); close one (CloseContext) or wait for idle ones to close"));
    }
  }
  std::vector<store::StoredSpanPtr> spans;
  std::vector<std::string> missing;
  for (size_t i = 0; i < chain.size(); ++i) {
    KVR_RETURN_IF_ERROR(CheckDeadline(deadline, "while promoting the context's spans"));
    store::GetResult got = store_->Get(store::SpanKey{std::string(tenant), chain[i]}, model_id);
    if (!got.error.ok()) return got.error;
    if (got.span == nullptr) {
      missing.push_back(absl::StrCat(chain[i].ToHex(), " (span ", i, ": ",
                                     store::MissReasonName(got.miss), ")"));
      continue;
    }
    spans.push_back(std::move(got.span));
  }
  if (!missing.empty()) {
    const size_t shown = std::min<size_t>(missing.size(), 8);
    return absl::NotFoundError(absl::StrCat(
        missing.size(), " of ", chain.size(), " spans of the context are not stored: ",
        absl::StrJoin(missing.begin(), missing.begin() + shown, ", "),
        missing.size() > shown ? ", ..." : ""));
  }
  for (size_t i = 0; i < spans.size(); ++i) {
    if (i > 0 && spans[i]->meta.parent != spans[i - 1]->key.hash) {
      return absl::InvalidArgumentError(absl::StrCat("span ", i, " (", chain[i].ToHex(),
                                                     ") is not the child of span ", i - 1,
                                                     ": the chain is not linked"));
    }
    if (i + 1 < spans.size() && spans[i]->meta.num_tokens != model.block_tokens) {
      return absl::InvalidArgumentError(absl::StrCat(
          "span ", i, " holds ", spans[i]->meta.num_tokens, " tokens; only the last span of a "
          "context may hold fewer than ", model.block_tokens));
    }
  }
  // Pin the spans in memory while the context is open.
  for (size_t i = 0; i < spans.size(); ++i) {
    absl::Status pinned = store_->Pin(spans[i]->key, absl::InfiniteDuration());
    if (!pinned.ok()) {
      for (size_t j = 0; j < i; ++j) store_->Unpin(spans[j]->key).IgnoreError();  // undo
      return pinned;
    }
  }
  auto ctx = std::make_shared<Context>(std::string(tenant), model, std::move(spans),
                                       options_.max_context_query_bytes);
  KVR_RETURN_IF_ERROR(store_->CatalogPut(kContextSpace, ContextRecordKey(tenant, id),
                                         EncodeContextRecord(model_id, chain)));
  bool raced = false;
  {
    absl::MutexLock lock(&mu_);
    auto& slot = contexts_[{std::string(tenant), id}];
    if (slot != nullptr) {
      raced = true;
    } else {
      slot = std::make_shared<OpenContextEntry>();
      slot->context = ctx;
      slot->last_used = absl::Now();
    }
  }
  if (raced) {  // another caller opened it meanwhile: drop our pins
    for (const auto& s : ctx->spans()) store_->Unpin(s->key).IgnoreError();  // ours only
    return OpenContextReply{id, ctx->prefix_tokens(), static_cast<int32_t>(chain.size()), false};
  }
  return OpenContextReply{id, ctx->prefix_tokens(), static_cast<int32_t>(chain.size()), true};
}

absl::Status RetrievalService::CloseContext(absl::string_view tenant, const Hash128& context) {
  std::shared_ptr<OpenContextEntry> entry;
  {
    absl::MutexLock lock(&mu_);
    auto it = contexts_.find({std::string(tenant), context});
    if (it == contexts_.end()) {
      return absl::NotFoundError(absl::StrCat("context ", context.ToHex(), " is not open"));
    }
    entry = it->second;
    contexts_.erase(it);
    // Indexes stay persisted; drop the loaded ones of this context.
    const std::string prefix = ContextIndexPrefix(tenant, context);
    for (auto i = indexes_.lower_bound(prefix); i != indexes_.end() && absl::StartsWith(i->first, prefix);) {
      i = indexes_.erase(i);
    }
  }
  for (const auto& s : entry->context->spans()) store_->Unpin(s->key).IgnoreError();  // best effort
  return absl::OkStatus();
}

void RetrievalService::CloseIdleContexts() {
  std::vector<std::shared_ptr<OpenContextEntry>> closed;
  {
    absl::MutexLock lock(&mu_);
    const absl::Time now = absl::Now();
    for (auto it = contexts_.begin(); it != contexts_.end();) {
      if (now - it->second->last_used > options_.context_idle_ttl &&
          it->second->context.use_count() == 1) {
        int64_t appended = 0;
        for (int32_t l = 0; l < it->second->context->model().num_layers; ++l) {
          appended = std::max(appended, it->second->context->num_appended(l));
        }
        if (appended > 0) {
          if (dropped_tails_.size() >= kMaxDroppedTails) dropped_tails_.erase(dropped_tails_.begin());
          dropped_tails_[it->first] = {appended, now};
        }
        const std::string prefix = ContextIndexPrefix(it->first.first, it->first.second);
        for (auto i = indexes_.lower_bound(prefix);
             i != indexes_.end() && absl::StartsWith(i->first, prefix);) {
          i = indexes_.erase(i);
        }
        closed.push_back(it->second);
        it = contexts_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (const auto& e : closed) {
    for (const auto& s : e->context->spans()) store_->Unpin(s->key).IgnoreError();  // best effort
  }
}

absl::StatusOr<std::shared_ptr<Context>> RetrievalService::GetContext(absl::string_view tenant,
                                                                      const Hash128& context,
                                                                      absl::Time deadline) {
  {
    absl::MutexLock lock(&mu_);
    auto it = contexts_.find({std::string(tenant), context});
    if (it != contexts_.end()) {
      it->second->last_used = absl::Now();
      return it->second->context;
    }
    auto dropped = dropped_tails_.find({std::string(tenant), context});
    if (dropped != dropped_tails_.end()) {
      return absl::FailedPreconditionError(absl::StrCat(
          "context ", context.ToHex(), " was closed after ",
          absl::FormatDuration(options_.context_idle_ttl), " idle with ",
          dropped->second.first, " appended decode tokens, which are not persisted; open it "
          "again (OpenContext) and append them again"));
    }
  }
  return ReopenContext(tenant, context, deadline);
}

absl::StatusOr<std::shared_ptr<Context>> RetrievalService::ReopenContext(absl::string_view tenant,
                                                                         const Hash128& context,
                                                                         absl::Time deadline) {
  auto record = store_->CatalogGet(kContextSpace, ContextRecordKey(tenant, context));
  if (!record.ok()) {
    if (absl::IsNotFound(record.status())) {
      return absl::NotFoundError(absl::StrCat("unknown context ", context.ToHex(),
                                              ": open it first with OpenContext"));
    }
    return record.status();
  }
  KVR_ASSIGN_OR_RETURN(auto decoded, DecodeContextRecord(*record));
  auto opened = OpenContext(tenant, decoded.first, decoded.second, deadline);
  if (!opened.ok()) {
    if (absl::IsNotFound(opened.status())) {
      // The context's spans are gone: its indexes go with it.
      auto listed = store_->CatalogScan(kIndexSpace, ContextIndexPrefix(tenant, context));
      if (listed.ok()) {
        for (const auto& [key, value] : *listed) {
          store_->CatalogDelete(kIndexSpace, key).IgnoreError();  // garbage collection
        }
      }
      auto latest = store_->CatalogScan(kIndexLatestSpace, ContextIndexPrefix(tenant, context));
      if (latest.ok()) {
        for (const auto& [key, value] : *latest) {
          store_->CatalogDelete(kIndexLatestSpace, key).IgnoreError();  // garbage collection
        }
      }
      store_->CatalogDelete(kContextSpace, ContextRecordKey(tenant, context)).IgnoreError();
      return absl::NotFoundError(absl::StrCat("context ", context.ToHex(),
                                              " is no longer stored (its indexes were removed): ",
                                              opened.status().message()));
    }
    return opened.status();
  }
  absl::MutexLock lock(&mu_);
  auto it = contexts_.find({std::string(tenant), context});
  if (it == contexts_.end()) return absl::InternalError("context closed while reopening");
  return it->second->context;
}

absl::StatusOr<store::ModelGeometry> RetrievalService::ContextModel(absl::string_view tenant,
                                                                    const Hash128& context,
                                                                    absl::Time deadline) {
  KVR_ASSIGN_OR_RETURN(std::shared_ptr<Context> ctx, GetContext(tenant, context, deadline));
  return ctx->model();
}

namespace {

// The id of the fork of `context` whose tokens from `position` on are
// `batch`'s: a span hash over the position and the checksums of the K/V.
Hash128 ForkId(const Hash128& context, const AppendBatch& batch) {
  const uint64_t pos = static_cast<uint64_t>(batch.expected_position);
  const uint64_t k = Checksum64(batch.keys);
  const uint64_t v = Checksum64(batch.values);
  const uint32_t words[] = {static_cast<uint32_t>(pos), static_cast<uint32_t>(pos >> 32),
                            static_cast<uint32_t>(k), static_cast<uint32_t>(k >> 32),
                            static_cast<uint32_t>(v), static_cast<uint32_t>(v >> 32),
                            static_cast<uint32_t>(batch.layer_begin),
                            static_cast<uint32_t>(batch.layer_end)};
  return SpanHash(context, words);
}

}  // namespace

absl::StatusOr<int64_t> RetrievalService::AppendTokens(absl::string_view tenant,
                                                       const Hash128& requested,
                                                       const AppendBatch& batch,
                                                       Hash128* appended_to) {
  KVR_ASSIGN_OR_RETURN(std::shared_ptr<Context> ctx,
                       GetContext(tenant, requested, absl::InfiniteFuture()));
  if (!batch.queries.empty()) KVR_RETURN_IF_ERROR(CheckFinite(batch.queries, "query"));
  AppendOutcome outcome = AppendOutcome::kAppended;
  KVR_ASSIGN_OR_RETURN(int64_t first, ctx->Append(batch, &outcome));
  if (outcome == AppendOutcome::kDiverged) {
    // Copy-on-write: this decode continues in its own context.
    const Hash128 fork_id = ForkId(ctx->id(), batch);
    std::shared_ptr<Context> fork;
    {
      absl::MutexLock lock(&mu_);
      auto it = contexts_.find({std::string(tenant), fork_id});
      if (it != contexts_.end()) fork = it->second->context;
    }
    if (fork == nullptr) {
      std::shared_ptr<Context> copy =
          ctx->Fork(fork_id, batch.expected_position - ctx->prefix_tokens());
      for (size_t i = 0; i < copy->spans().size(); ++i) {
        const absl::Status pinned = store_->Pin(copy->spans()[i]->key, absl::InfiniteDuration());
        if (!pinned.ok()) {
          for (size_t j = 0; j < i; ++j) store_->Unpin(copy->spans()[j]->key).IgnoreError();
          return pinned;
        }
      }
      bool raced = false;
      {
        absl::MutexLock lock(&mu_);
        auto& slot = contexts_[{std::string(tenant), fork_id}];
        if (slot != nullptr) {
          raced = true;
          fork = slot->context;
        } else {
          slot = std::make_shared<OpenContextEntry>();
          slot->context = copy;
          slot->last_used = absl::Now();
          fork = copy;
        }
      }
      if (raced) {
        for (const auto& sp : copy->spans()) store_->Unpin(sp->key).IgnoreError();  // ours
      }
    }
    KVR_ASSIGN_OR_RETURN(first, fork->Append(batch, &outcome));
    if (outcome == AppendOutcome::kDiverged) {
      return absl::AbortedError("the fork of the context changed concurrently; retry");
    }
    ctx = fork;
  }
  const Hash128 context = ctx->id();
  if (appended_to != nullptr) *appended_to = context;
  if (outcome == AppendOutcome::kDuplicate) return first;  // a retry: nothing new to index
  // Add the new keys to every loaded index of those layers.
  std::vector<std::shared_ptr<LoadedIndex>> affected;
  {
    absl::MutexLock lock(&mu_);
    const std::string prefix = ContextIndexPrefix(tenant, context);
    for (auto i = indexes_.lower_bound(prefix);
         i != indexes_.end() && absl::StartsWith(i->first, prefix); ++i) {
      if (i->second->layer >= batch.layer_begin && i->second->layer < batch.layer_end) {
        affected.push_back(i->second);
      }
    }
  }
  for (const auto& li : affected) {
    absl::MutexLock lock(&li->mu);
    const absl::Status added =
        CatchUpIndex(*ctx, li->layer, li->kv_head, li->index.get());
    if (!added.ok()) {
      KVR_LOG(WARNING) << "index " << li->kind << " of layer " << li->layer << " head "
                       << li->kv_head << " could not add appended tokens: " << added;
    }
  }
  return first;
}

absl::Status RetrievalService::AddQueries(absl::string_view tenant, const Hash128& context,
                                          int32_t layer, int64_t first_position, int64_t n,
                                          absl::Span<const float> queries) {
  KVR_ASSIGN_OR_RETURN(std::shared_ptr<Context> ctx,
                       GetContext(tenant, context, absl::InfiniteFuture()));
  KVR_RETURN_IF_ERROR(CheckFinite(queries, "query"));
  return ctx->AddQueries(layer, first_position, n, queries);
}

namespace {

// Positions [0, tokens) outside the (sorted, disjoint) exclude ranges.
std::vector<int64_t> VisiblePositions(int64_t tokens,
                                      const std::vector<index::PositionRange>& exclude) {
  std::vector<int64_t> out;
  out.reserve(tokens);
  size_t e = 0;
  for (int64_t p = 0; p < tokens; ++p) {
    while (e < exclude.size() && exclude[e].end <= p) ++e;
    if (e < exclude.size() && exclude[e].begin <= p) continue;
    out.push_back(p);
  }
  return out;
}

}  // namespace

// Replaces every head's list by the union of its KV group's lists, with that
// head's exact scores, descending.
void RetrievalService::UnionPerGroup(const RetrieveRequest& request, const LayerKvView& view,
                                     SearchReply* reply) {
  const int32_t d = view.head_dim;
  const int32_t hq = static_cast<int32_t>(reply->ids.size());
  const int32_t g = hq / view.num_kv_heads;
  for (int32_t kvh = 0; kvh < view.num_kv_heads; ++kvh) {
    std::vector<int64_t> uni;
    for (int32_t j = 0; j < g; ++j) {
      const auto& ids = reply->ids[kvh * g + j];
      uni.insert(uni.end(), ids.begin(), ids.end());
    }
    std::sort(uni.begin(), uni.end());
    uni.erase(std::unique(uni.begin(), uni.end()), uni.end());
    while (!uni.empty() && uni.front() < 0) uni.erase(uni.begin());
    for (int32_t j = 0; j < g; ++j) {
      const int32_t h = kvh * g + j;
      std::vector<std::pair<float, int64_t>> scored;
      scored.reserve(uni.size());
      for (int64_t id : uni) {
        scored.emplace_back(index::DotRow(request.queries.data() + h * d, view.KeyRow(kvh, id),
                                          view.dtype, d),
                            id);
      }
      std::sort(scored.begin(), scored.end(),
                [](const auto& a, const auto& b) { return a.first > b.first; });
      reply->ids[h].clear();
      reply->scores[h].clear();
      for (const auto& [sc, id] : scored) {
        reply->ids[h].push_back(id);
        reply->scores[h].push_back(sc);
      }
    }
  }
}

absl::StatusOr<SearchReply> RetrievalService::SearchInternal(const RetrieveRequest& request,
                                                             const Context& ctx, int64_t tokens,
                                                             int32_t k, bool need_scores) {
  const auto& m = ctx.model();
  const int32_t d = m.head_dim, hq = m.num_q_heads, hkv = m.num_kv_heads, g = hq / hkv;
  SearchReply reply;
  reply.ids.resize(hq);
  reply.scores.resize(hq);
  reply.stats.context_tokens = tokens;
  const absl::Time start = absl::Now();
  const LayerKvView view = ctx.KvView(request.layer);

  if (request.index.kind == "all") {
    // No index: every non-excluded position; with k > 0, the exact top-k of them.
    std::vector<int64_t> all = VisiblePositions(tokens, request.exclude);
    reply.stats.keys_scanned = static_cast<int64_t>(all.size()) * hq;
    if (k == 0 && !need_scores) {
      for (int32_t h = 0; h < hq; ++h) reply.ids[h] = all;
      reply.stats.search_us = MicrosSince(start);
      return reply;
    }
    auto score_head = [&](int64_t begin, int64_t end) {
      std::vector<float> s(all.size());
      for (int64_t h = begin; h < end; ++h) {
        const float* q = request.queries.data() + h * d;
        for (size_t i = 0; i < all.size(); ++i) {
          s[i] = index::DotRow(q, view.KeyRow(static_cast<int32_t>(h / g), all[i]), m.dtype, d);
        }
        const int32_t kk = k > 0 ? k : static_cast<int32_t>(all.size());
        index::TopK top(kk);
        for (size_t i = 0; i < all.size(); ++i) top.Push(s[i], all[i]);
        std::vector<int64_t> ids(kk);
        std::vector<float> sc(kk);
        top.Drain(ids.data(), sc.data());
        reply.ids[h] = std::move(ids);
        reply.scores[h] = std::move(sc);
      }
    };
    ThreadPool::Default()->ParallelFor(hq, 1, score_head);
    if (request.gqa_mode == GqaMode::kUnion) UnionPerGroup(request, view, &reply);
    reply.stats.search_us = MicrosSince(start);
    return reply;
  }

  // One index search per KV head, in parallel over heads.
  std::vector<std::shared_ptr<LoadedIndex>> found(hkv);
  for (int32_t kvh = 0; kvh < hkv; ++kvh) {
    KVR_ASSIGN_OR_RETURN(found[kvh], FindIndex(ctx, request.layer, kvh, request.index));
  }
  KVR_ASSIGN_OR_RETURN(index::ParamMap knobs, index::ParamMap::Parse(request.index.knobs));
  std::vector<absl::Status> statuses(hkv);
  std::vector<index::SearchResult> results(hkv);
  auto search_head = [&](int64_t begin, int64_t end) {
    for (int64_t kvh = begin; kvh < end; ++kvh) {
      const LoadedIndex& li = *found[kvh];
      absl::ReaderMutexLock lock(&li.mu);
      index::SearchParams sp;
      sp.knobs = knobs;
      sp.num_threads = 1;
      sp.exclude = request.exclude;
      if (li.index->size() > tokens) {  // persisted past what this context holds now
        sp.exclude.push_back(index::PositionRange{tokens, li.index->size()});
      }
      const absl::string_view knob = li.index->SearchEffortKnob();
      if (request.index.effort > 0 && !knob.empty()) {
        sp.knobs.SetInt(knob, std::min(request.index.effort, li.index->MaxSearchEffort()));
      }
      const int32_t kk = static_cast<int32_t>(std::min<int64_t>(k, li.index->size()));
      auto r = li.index->Search(
          index::VectorView::F32(request.queries.data() + kvh * g * d, g, d), kk, sp);
      if (!r.ok()) {
        statuses[kvh] = r.status();
        continue;
      }
      results[kvh] = std::move(*r);
    }
  };
  if (hkv > 1) {
    ThreadPool::Default()->ParallelFor(hkv, 1, search_head);
  } else {
    search_head(0, hkv);
  }
  for (const absl::Status& s : statuses) KVR_RETURN_IF_ERROR(s);

  for (int32_t kvh = 0; kvh < hkv; ++kvh) {
    const index::SearchResult& r = results[kvh];
    reply.stats.keys_scanned += r.stats.keys_scanned;
    const int32_t kk = r.k;
    if (request.gqa_mode == GqaMode::kPerHead) {
      for (int32_t j = 0; j < g; ++j) {
        const int32_t h = kvh * g + j;
        for (int32_t i = 0; i < kk; ++i) {
          const int64_t id = r.ids[static_cast<size_t>(j) * kk + i];
          if (id < 0) break;
          reply.ids[h].push_back(id);
          reply.scores[h].push_back(r.scores[static_cast<size_t>(j) * kk + i]);
        }
      }
    } else {
      // Union mode: every head of the group first gets the group's lists.
      for (int32_t j = 0; j < g; ++j) {
        const int32_t h = kvh * g + j;
        for (int64_t id : r.ids) {
          if (id >= 0) reply.ids[h].push_back(id);
        }
      }
    }
  }
  if (request.gqa_mode == GqaMode::kUnion) UnionPerGroup(request, view, &reply);
  reply.stats.search_us = MicrosSince(start);
  return reply;
}

namespace {

// Validates the shared fields of Search/Attend (the layer is checked before);
// returns k.
absl::StatusOr<int32_t> ValidateRetrieve(const RetrieveRequest& r, const store::ModelGeometry& m,
                                         int64_t tokens) {
  const size_t want = static_cast<size_t>(m.num_q_heads) * m.head_dim;
  if (r.queries.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat(
        "queries must be [", m.num_q_heads, ", ", m.head_dim, "] f32 (", want,
        " values) for model ", m.model_id, "; got ", r.queries.size()));
  }
  KVR_RETURN_IF_ERROR(CheckFinite(r.queries, "query"));
  int64_t excluded = 0;
  for (size_t i = 0; i < r.exclude.size(); ++i) {
    const auto& e = r.exclude[i];
    if (e.begin < 0 || e.end > tokens || e.begin >= e.end) {
      return absl::InvalidArgumentError(absl::StrCat("exclude range [", e.begin, ", ", e.end,
                                                     ") is empty or outside [0, ", tokens, ")"));
    }
    if (i > 0 && e.begin < r.exclude[i - 1].end) {
      return absl::InvalidArgumentError(absl::StrCat(
          "exclude ranges must be sorted and disjoint: [", r.exclude[i - 1].begin, ", ",
          r.exclude[i - 1].end, ") and [", e.begin, ", ", e.end, ")"));
    }
    excluded += e.end - e.begin;
  }
  const int64_t available = tokens - excluded;
  int64_t k = r.k;
  if (k == 0) {
    if (!(r.budget > 0 && r.budget <= 1)) {
      if (r.index.kind == "all") return static_cast<int32_t>(0);
      return absl::InvalidArgumentError("give k > 0 or a budget in (0, 1]");
    }
    k = static_cast<int64_t>(std::ceil(r.budget * static_cast<double>(tokens)));
    k = std::min(k, available);
  }
  if (k < 0) return absl::InvalidArgumentError("k must not be negative");
  if (k > available) {
    return absl::InvalidArgumentError(absl::StrCat("k = ", k, " is larger than the ", available,
                                                   " positions of the context not excluded"));
  }
  if (k > (int64_t{1} << 24)) return absl::InvalidArgumentError("k is too large");
  return static_cast<int32_t>(k);
}

}  // namespace

absl::StatusOr<RetrievalService::Prepared> RetrievalService::Prepare(
    const RetrieveRequest& request, absl::string_view what) {
  KVR_RETURN_IF_ERROR(CheckDeadline(request.deadline, what));
  Prepared p;
  KVR_ASSIGN_OR_RETURN(p.ctx, GetContext(request.tenant, request.context, request.deadline));
  if (request.layer < 0 || request.layer >= p.ctx->model().num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", request.layer, " is not within [0, ",
                                                   p.ctx->model().num_layers, ")"));
  }
  p.tokens = p.ctx->num_tokens(request.layer);
  if (!request.positions.empty()) return p;  // AttendPositions checks the rest
  KVR_ASSIGN_OR_RETURN(p.k, ValidateRetrieve(request, p.ctx->model(), p.tokens));
  if (request.select_k != 0) {
    if (request.index.kind != "all" || p.k != 0) {
      return absl::InvalidArgumentError(
          "select_k needs index kind \"all\" and k = 0 (attention over every position)");
    }
    int64_t excluded = 0;
    for (const auto& e : request.exclude) excluded += e.end - e.begin;
    if (request.select_k < 0 || request.select_k > p.tokens - excluded) {
      return absl::InvalidArgumentError(absl::StrCat("select_k = ", request.select_k,
                                                     " is not within [0, ", p.tokens - excluded,
                                                     "], the positions attended"));
    }
  }
  return p;
}

namespace {

// Checks explicit position lists (one per query head or one per KV head),
// each position distinct and within [0, tokens).
absl::Status ValidatePositionLists(const std::vector<std::vector<int64_t>>& lists,
                                   const store::ModelGeometry& m, int64_t tokens,
                                   bool per_kv_head_only) {
  const size_t n = lists.size();
  if (n != static_cast<size_t>(m.num_kv_heads) &&
      (per_kv_head_only || n != static_cast<size_t>(m.num_q_heads))) {
    return absl::InvalidArgumentError(absl::StrCat(
        n, " position lists; give ",
        per_kv_head_only ? "" : absl::StrCat(m.num_q_heads, " (one per query head) or "),
        m.num_kv_heads, " (one per KV head)"));
  }
  std::vector<int64_t> copy;
  for (size_t i = 0; i < n; ++i) {
    // Lists sent in increasing order (as the decode worker does) are checked
    // in place; others are sorted in a copy.
    const std::vector<int64_t>* list = &lists[i];
    if (!std::is_sorted(list->begin(), list->end())) {
      copy = *list;
      std::sort(copy.begin(), copy.end());
      list = &copy;
    }
    const std::vector<int64_t>& sorted = *list;
    if (!sorted.empty() && (sorted.front() < 0 || sorted.back() >= tokens)) {
      const int64_t bad = sorted.front() < 0 ? sorted.front() : sorted.back();
      return absl::InvalidArgumentError(absl::StrCat("position ", bad, " of list ", i,
                                                     " is outside [0, ", tokens, ")"));
    }
    auto dup = std::adjacent_find(sorted.begin(), sorted.end());
    if (dup != sorted.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("position ", *dup, " appears twice in list ", i));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<AttendReply> RetrievalService::AttendPositions(const RetrieveRequest& request) {
  KVR_ASSIGN_OR_RETURN(Prepared p, Prepare(request, "before the attention started"));
  const auto& m = p.ctx->model();
  if (request.k != 0 || request.budget != 0 || !request.exclude.empty() || request.select_k != 0) {
    return absl::InvalidArgumentError(
        "attend by positions takes no k, budget, exclude or select_k");
  }
  const size_t want = static_cast<size_t>(m.num_q_heads) * m.head_dim;
  if (request.queries.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat("queries must be [", m.num_q_heads, ", ",
                                                   m.head_dim, "] f32; got ",
                                                   request.queries.size(), " values"));
  }
  KVR_RETURN_IF_ERROR(CheckFinite(request.queries, "query"));
  KVR_RETURN_IF_ERROR(ValidatePositionLists(request.positions, m, p.tokens,
                                            /*per_kv_head_only=*/false));
  AttendReply reply;
  reply.ids.resize(m.num_q_heads);
  reply.stats.context_tokens = p.tokens;
  PartialAttentionArgs args;
  args.queries = request.queries.data();
  args.num_q_heads = m.num_q_heads;
  args.group_size = m.num_q_heads / m.num_kv_heads;
  const int32_t heads_per_list =
      request.positions.size() == static_cast<size_t>(m.num_kv_heads) ? args.group_size : 1;
  for (const auto& list : request.positions) {
    args.ids.emplace_back(list);
    reply.stats.keys_scanned += static_cast<int64_t>(list.size()) * heads_per_list;
  }
  const absl::Time start = absl::Now();
  KVR_RETURN_IF_ERROR(ComputePartialAttention(p.ctx->KvView(request.layer), args, &reply.state));
  reply.stats.attend_us = MicrosSince(start);
  return reply;
}

absl::StatusOr<GatherKvReply> RetrievalService::GatherKv(
    absl::string_view tenant, const Hash128& context, int32_t layer,
    const std::vector<std::vector<int64_t>>& kv_head_positions, absl::Time deadline) {
  KVR_RETURN_IF_ERROR(CheckDeadline(deadline, "before the gather started"));
  KVR_ASSIGN_OR_RETURN(std::shared_ptr<Context> ctx, GetContext(tenant, context, deadline));
  const auto& m = ctx->model();
  if (layer < 0 || layer >= m.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " is not within [0, ", m.num_layers, ")"));
  }
  const int64_t tokens = ctx->num_tokens(layer);
  KVR_RETURN_IF_ERROR(ValidatePositionLists(kv_head_positions, m, tokens,
                                            /*per_kv_head_only=*/true));
  const LayerKvView view = ctx->KvView(layer);
  const size_t row_bytes = static_cast<size_t>(m.head_dim) * DTypeSize(m.dtype);
  GatherKvReply reply;
  for (const auto& list : kv_head_positions) reply.rows += static_cast<int64_t>(list.size());
  reply.keys.resize(static_cast<size_t>(reply.rows) * row_bytes);
  reply.values.resize(reply.keys.size());
  size_t offset = 0;
  for (int32_t g = 0; g < m.num_kv_heads; ++g) {
    for (int64_t pos : kv_head_positions[g]) {
      std::memcpy(reply.keys.data() + offset, view.KeyRow(g, pos), row_bytes);
      std::memcpy(reply.values.data() + offset, view.ValueRow(g, pos), row_bytes);
      offset += row_bytes;
    }
  }
  return reply;
}

absl::StatusOr<SearchReply> RetrievalService::Search(const RetrieveRequest& request) {
  KVR_ASSIGN_OR_RETURN(Prepared p, Prepare(request, "before the search started"));
  return SearchInternal(request, *p.ctx, p.tokens, p.k, /*need_scores=*/true);
}

absl::StatusOr<AttendReply> RetrievalService::Attend(const RetrieveRequest& request) {
  if (!request.positions.empty()) return AttendPositions(request);
  KVR_ASSIGN_OR_RETURN(Prepared p, Prepare(request, "before the attention started"));
  const std::shared_ptr<Context>& ctx = p.ctx;
  const int64_t tokens = p.tokens;
  const int32_t k = p.k;
  const auto& m = ctx->model();
  AttendReply reply;
  PartialAttentionArgs args;
  args.queries = request.queries.data();
  args.num_q_heads = m.num_q_heads;
  args.group_size = m.num_q_heads / m.num_kv_heads;
  std::vector<std::vector<int64_t>> sorted_ids;
  const absl::Time search_start = absl::Now();
  if (request.index.kind == "all" && k == 0) {
    // Exact attention over every non-excluded position: one shared list, and
    // no positions in the reply (they are implied).
    std::vector<int64_t> all = VisiblePositions(tokens, request.exclude);
    reply.stats.context_tokens = tokens;
    reply.stats.keys_scanned = static_cast<int64_t>(all.size()) * m.num_q_heads;
    reply.stats.search_us = MicrosSince(search_start);
    sorted_ids.push_back(std::move(all));
    for (int32_t kvh = 0; kvh < m.num_kv_heads; ++kvh) args.ids.emplace_back(sorted_ids[0]);
    reply.ids.resize(m.num_q_heads);
    if (request.select_k > 0) {
      // The exact top select_k of the attended positions, for later layers.
      KVR_ASSIGN_OR_RETURN(SearchReply top, SearchInternal(request, *ctx, tokens, request.select_k,
                                                           /*need_scores=*/true));
      reply.ids = std::move(top.ids);
      reply.stats.search_us = MicrosSince(search_start);
    }
  } else {
    KVR_ASSIGN_OR_RETURN(SearchReply found,
                         SearchInternal(request, *ctx, tokens, k, /*need_scores=*/false));
    KVR_RETURN_IF_ERROR(CheckDeadline(request.deadline, "after the search"));
    if (request.gqa_mode == GqaMode::kUnion) {
      // One list per KV head (the group's lists are equal): each row is read once for the group.
      for (int32_t kvh = 0; kvh < m.num_kv_heads; ++kvh) {
        std::vector<int64_t> ids = found.ids[kvh * args.group_size];
        std::sort(ids.begin(), ids.end());
        sorted_ids.push_back(std::move(ids));
      }
    } else {
      for (int32_t h = 0; h < m.num_q_heads; ++h) {
        std::vector<int64_t> ids = found.ids[h];
        std::sort(ids.begin(), ids.end());  // sequential reads of the KV blocks
        sorted_ids.push_back(std::move(ids));
      }
    }
    for (const auto& ids : sorted_ids) args.ids.emplace_back(ids);
    reply.ids = std::move(found.ids);
    reply.stats = found.stats;
  }
  const absl::Time start = absl::Now();
  const LayerKvView view = ctx->KvView(request.layer);
  KVR_RETURN_IF_ERROR(ComputePartialAttention(view, args, &reply.state));
  reply.stats.attend_us = MicrosSince(start);
  return reply;
}

}  // namespace kvrecall::retrieval
