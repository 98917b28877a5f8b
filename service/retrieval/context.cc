#include "service/retrieval/context.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"

namespace kvrecall::retrieval {

namespace {

absl::Status QueryBudget(int64_t kept, int64_t more, int64_t max) {
  if (max > 0 && kept + more > max) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "the context keeps ", kept, " bytes of training queries; ", more,
        " more would exceed --max_context_query_bytes=", max,
        " (build the index, or close and reopen the context to start over)"));
  }
  return absl::OkStatus();
}

}  // namespace

Context::Context(std::string tenant, store::ModelGeometry model,
                 std::vector<store::StoredSpanPtr> spans, int64_t max_query_bytes, Hash128 id)
    : tenant_(std::move(tenant)),
      model_(std::move(model)),
      spans_(std::move(spans)),
      id_(!id.IsZero() ? id : spans_.empty() ? Hash128{} : spans_.back()->key.hash),
      max_query_bytes_(max_query_bytes),
      layers_(static_cast<size_t>(model_.num_layers)) {
  for (const auto& s : spans_) prefix_tokens_ += s->meta.num_tokens;
}

std::vector<Hash128> Context::chain() const {
  std::vector<Hash128> out;
  out.reserve(spans_.size());
  for (const auto& s : spans_) out.push_back(s->key.hash);
  return out;
}

int64_t Context::num_tokens(int32_t layer) const {
  absl::MutexLock lock(&mu_);
  return prefix_tokens_ + layers_[layer].appended;
}

LayerKvView Context::KvView(int32_t layer) const {
  LayerKvView view;
  view.dtype = model_.dtype;
  view.num_kv_heads = model_.num_kv_heads;
  view.head_dim = model_.head_dim;
  view.block_tokens = model_.block_tokens;
  view.prefix_tokens = prefix_tokens_;
  view.num_prefix_blocks = static_cast<int32_t>(spans_.size());
  for (const auto& s : spans_) {
    const int64_t n = s->meta.num_tokens;
    const char* base = s->payload.data();
    view.blocks.push_back(KvBlock{base + model_.PayloadOffset(n, layer, 0, 0, 0),
                                  base + model_.PayloadOffset(n, layer, 1, 0, 0),
                                  static_cast<int32_t>(n), static_cast<int32_t>(n)});
  }
  absl::MutexLock lock(&mu_);
  const LayerState& st = layers_[layer];
  int64_t left = st.appended;
  for (const auto& b : st.blocks) {
    const int32_t n = static_cast<int32_t>(std::min<int64_t>(left, model_.block_tokens));
    view.blocks.push_back(KvBlock{b->keys.get(), b->values.get(), n, model_.block_tokens});
    left -= n;
  }
  view.num_tokens = prefix_tokens_ + st.appended;
  return view;
}

absl::StatusOr<int64_t> Context::Append(const AppendBatch& batch, AppendOutcome* outcome) {
  if (outcome != nullptr) *outcome = AppendOutcome::kAppended;
  const int32_t L = model_.num_layers, H = model_.num_kv_heads, d = model_.head_dim;
  if (batch.layer_begin < 0 || batch.layer_end > L || batch.layer_begin >= batch.layer_end) {
    return absl::InvalidArgumentError(absl::StrCat("layer range [", batch.layer_begin, ", ",
                                                   batch.layer_end, ") is not within [0, ", L,
                                                   ")"));
  }
  if (batch.num_tokens <= 0) {
    return absl::InvalidArgumentError("append needs at least one token");
  }
  const int32_t layers = batch.layer_end - batch.layer_begin;
  const size_t elem = DTypeSize(model_.dtype);
  const size_t row_bytes = static_cast<size_t>(d) * elem;
  const size_t want = static_cast<size_t>(layers) * H * batch.num_tokens * row_bytes;
  if (batch.keys.size() != want || batch.values.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat(
        "appended K/V must be [", layers, ", ", H, ", ", batch.num_tokens, ", ", d, "] ",
        DTypeName(model_.dtype), " = ", want, " bytes each; got ", batch.keys.size(), " and ",
        batch.values.size()));
  }
  const size_t q_want = static_cast<size_t>(layers) * batch.num_tokens * model_.num_q_heads * d;
  if (!batch.queries.empty() && batch.queries.size() != q_want) {
    return absl::InvalidArgumentError(absl::StrCat("appended queries must be [", layers, ", ",
                                                   batch.num_tokens, ", ", model_.num_q_heads,
                                                   ", ", d, "] f32"));
  }
  absl::MutexLock lock(&mu_);
  const int64_t query_bytes = static_cast<int64_t>(batch.queries.size() * sizeof(float));
  KVR_RETURN_IF_ERROR(QueryBudget(query_bytes_, query_bytes, max_query_bytes_));
  const int64_t first = layers_[batch.layer_begin].appended;
  for (int32_t l = batch.layer_begin; l < batch.layer_end; ++l) {
    if (layers_[l].appended != first) {
      return absl::FailedPreconditionError(absl::StrCat(
          "layers ", batch.layer_begin, " and ", l, " hold ", first, " and ", layers_[l].appended,
          " appended tokens; append layer ranges in step"));
    }
  }
  if (batch.expected_position >= 0) {
    const int64_t next = prefix_tokens_ + first;
    if (batch.expected_position > next) {
      return absl::FailedPreconditionError(absl::StrCat(
          "expected_position ", batch.expected_position, " is past the next position ", next,
          " of layers [", batch.layer_begin, ", ", batch.layer_end,
          "): tokens before it are missing (were they appended to this context?)"));
    }
    if (batch.expected_position < prefix_tokens_) {
      return absl::FailedPreconditionError(absl::StrCat(
          "expected_position ", batch.expected_position, " is inside the stored prefix of ",
          prefix_tokens_, " tokens; a decode that diverges inside it opens the context of "
          "its own spans"));
    }
    if (batch.expected_position < next) {
      const int64_t at = batch.expected_position - prefix_tokens_;
      if (outcome == nullptr) {
        return absl::FailedPreconditionError(absl::StrCat(
            "position ", batch.expected_position, " is already taken"));
      }
      *outcome = at + batch.num_tokens <= first && SameTokensLocked(batch, at)
                     ? AppendOutcome::kDuplicate
                     : AppendOutcome::kDiverged;
      return batch.expected_position;
    }
  }
  const int32_t bt = model_.block_tokens;
  for (int32_t li = 0; li < layers; ++li) {
    LayerState& st = layers_[batch.layer_begin + li];
    for (int32_t t = 0; t < batch.num_tokens; ++t) {
      const int64_t pos = st.appended + t;
      const size_t b = static_cast<size_t>(pos / bt);
      while (st.blocks.size() <= b) {
        auto block = std::make_unique<AppendedBlock>();
        const size_t bytes = static_cast<size_t>(H) * bt * row_bytes;
        block->keys.reset(new char[bytes]);
        block->values.reset(new char[bytes]);
        st.blocks.push_back(std::move(block));
      }
      const int64_t row = pos % bt;
      for (int32_t h = 0; h < H; ++h) {
        const size_t src = ((static_cast<size_t>(li) * H + h) * batch.num_tokens + t) * row_bytes;
        const size_t dst = (static_cast<size_t>(h) * bt + row) * row_bytes;
        std::memcpy(st.blocks[b]->keys.get() + dst, batch.keys.data() + src, row_bytes);
        std::memcpy(st.blocks[b]->values.get() + dst, batch.values.data() + src, row_bytes);
      }
    }
    if (!batch.queries.empty()) {
      const size_t per_layer = static_cast<size_t>(batch.num_tokens) * model_.num_q_heads * d;
      st.queries.emplace_back(
          prefix_tokens_ + st.appended,
          std::vector<float>(batch.queries.begin() + li * per_layer,
                             batch.queries.begin() + (li + 1) * per_layer));
    }
    st.appended += batch.num_tokens;
  }
  query_bytes_ += query_bytes;
  return prefix_tokens_ + first;
}

bool Context::SameTokensLocked(const AppendBatch& batch, int64_t first) const {
  const int32_t H = model_.num_kv_heads, bt = model_.block_tokens;
  const size_t row_bytes = static_cast<size_t>(model_.head_dim) * DTypeSize(model_.dtype);
  for (int32_t li = 0; li < batch.layer_end - batch.layer_begin; ++li) {
    const LayerState& st = layers_[batch.layer_begin + li];
    for (int32_t t = 0; t < batch.num_tokens; ++t) {
      const int64_t pos = first + t;
      const AppendedBlock& block = *st.blocks[static_cast<size_t>(pos / bt)];
      for (int32_t h = 0; h < H; ++h) {
        const size_t src = ((static_cast<size_t>(li) * H + h) * batch.num_tokens + t) * row_bytes;
        const size_t dst = (static_cast<size_t>(h) * bt + pos % bt) * row_bytes;
        if (std::memcmp(block.keys.get() + dst, batch.keys.data() + src, row_bytes) != 0 ||
            std::memcmp(block.values.get() + dst, batch.values.data() + src, row_bytes) != 0) {
          return false;
        }
      }
    }
  }
  return true;
}

int64_t Context::num_appended(int32_t layer) const {
  absl::MutexLock lock(&mu_);
  return layers_[layer].appended;
}

std::shared_ptr<Context> Context::Fork(const Hash128& id, int64_t appended) const {
  auto fork = std::make_shared<Context>(tenant_, model_, spans_, max_query_bytes_, id);
  const int32_t H = model_.num_kv_heads, bt = model_.block_tokens;
  const size_t block_bytes =
      static_cast<size_t>(H) * bt * model_.head_dim * DTypeSize(model_.dtype);
  absl::MutexLock mine(&mu_);
  absl::MutexLock theirs(&fork->mu_);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const LayerState& from = layers_[l];
    LayerState& to = fork->layers_[l];
    to.appended = std::min(from.appended, appended);
    const size_t blocks = static_cast<size_t>((to.appended + bt - 1) / bt);
    for (size_t b = 0; b < blocks; ++b) {
      auto block = std::make_unique<AppendedBlock>();
      block->keys.reset(new char[block_bytes]);
      block->values.reset(new char[block_bytes]);
      std::memcpy(block->keys.get(), from.blocks[b]->keys.get(), block_bytes);
      std::memcpy(block->values.get(), from.blocks[b]->values.get(), block_bytes);
      to.blocks.push_back(std::move(block));
    }
    for (const auto& [first, q] : from.queries) {
      if (first < prefix_tokens_ + to.appended) {
        to.queries.emplace_back(first, q);
        fork->query_bytes_ += static_cast<int64_t>(q.size() * sizeof(float));
      }
    }
  }
  return fork;
}

absl::Status Context::AddQueries(int32_t layer, int64_t first_position, int64_t n,
                                 absl::Span<const float> queries) {
  if (layer < 0 || layer >= model_.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("layer ", layer, " is not within [0, ", model_.num_layers, ")"));
  }
  const size_t want = static_cast<size_t>(n) * model_.num_q_heads * model_.head_dim;
  if (n <= 0 || queries.size() != want) {
    return absl::InvalidArgumentError(absl::StrCat("queries must be [", n, ", ",
                                                   model_.num_q_heads, ", ", model_.head_dim,
                                                   "] f32 = ", want, " floats; got ",
                                                   queries.size()));
  }
  absl::MutexLock lock(&mu_);
  const int64_t bytes = static_cast<int64_t>(queries.size() * sizeof(float));
  KVR_RETURN_IF_ERROR(QueryBudget(query_bytes_, bytes, max_query_bytes_));
  layers_[layer].queries.emplace_back(first_position,
                                      std::vector<float>(queries.begin(), queries.end()));
  query_bytes_ += bytes;
  return absl::OkStatus();
}

std::vector<float> Context::TrainingQueries(int32_t layer, int32_t kv_head, int64_t n,
                                            bool* complete) const {
  const int32_t d = model_.head_dim, hq = model_.num_q_heads;
  const int32_t g = hq / model_.num_kv_heads;
  absl::MutexLock lock(&mu_);
  // For each position, the row holding its latest query: (batch, row).
  std::vector<std::pair<int32_t, int64_t>> source(static_cast<size_t>(std::max<int64_t>(n, 0)),
                                                  {-1, 0});
  const auto& batches = layers_[layer].queries;
  for (size_t b = 0; b < batches.size(); ++b) {
    const auto& [first, q] = batches[b];
    const int64_t rows = static_cast<int64_t>(q.size()) / (static_cast<int64_t>(hq) * d);
    for (int64_t t = 0; t < rows; ++t) {
      const int64_t pos = first + t;
      if (pos >= 0 && pos < n) source[pos] = {static_cast<int32_t>(b), t};
    }
  }
  int64_t covered = 0;
  for (const auto& src : source) covered += src.first >= 0;
  *complete = n > 0 && covered == n;
  std::vector<float> out(static_cast<size_t>(g) * covered * d);
  for (int32_t j = 0; j < g; ++j) {
    const int32_t h = kv_head * g + j;
    int64_t row = 0;
    for (int64_t pos = 0; pos < n; ++pos) {
      const auto [b, t] = source[pos];
      if (b < 0) continue;
      const float* src = batches[b].second.data() + (t * hq + h) * d;
      std::copy(src, src + d, out.data() + (static_cast<size_t>(j) * covered + row) * d);
      ++row;
    }
  }
  return out;
}

std::string Context::GatherKeys(int32_t layer, int32_t kv_head, int64_t begin,
                                int64_t end) const {
  const LayerKvView view = KvView(layer);
  const size_t row_bytes = static_cast<size_t>(model_.head_dim) * DTypeSize(model_.dtype);
  end = std::min(end, view.num_tokens);
  begin = std::clamp<int64_t>(begin, 0, end);
  std::string out(static_cast<size_t>(end - begin) * row_bytes, '\0');
  for (int64_t p = begin; p < end; ++p) {
    std::memcpy(out.data() + (p - begin) * row_bytes, view.KeyRow(kv_head, p), row_bytes);
  }
  return out;
}

int64_t Context::OwnedBytes() const {
  const int64_t block_bytes = int64_t{2} * model_.num_kv_heads * model_.block_tokens *
                              model_.head_dim * static_cast<int64_t>(DTypeSize(model_.dtype));
  absl::MutexLock lock(&mu_);
  int64_t total = 0;
  for (const LayerState& st : layers_) {
    total += static_cast<int64_t>(st.blocks.size()) * block_bytes;
    for (const auto& q : st.queries) total += static_cast<int64_t>(q.second.size() * sizeof(float));
  }
  return total;
}

}  // namespace kvrecall::retrieval
