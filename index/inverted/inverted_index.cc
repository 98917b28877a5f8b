#include "index/inverted/inverted_index.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "common/half.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "index/distance.h"
#include "index/search_input.h"

namespace kvrecall::index::inverted {
namespace {

constexpr uint32_t kInvertedPayloadVersion = 1;
constexpr int64_t kMaxWindow = 65536;

void PutVarint(uint64_t v, std::string* out) {
  while (v >= 0x80) {
    out->push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out->push_back(static_cast<char>(v));
}

// Decodes one varint at *p (< end). Returns false on a truncated or overlong varint.
bool GetVarint(const char** p, const char* end, uint64_t* v) {
  uint64_t result = 0;
  for (int shift = 0; shift < 64 && *p < end; shift += 7) {
    const uint8_t byte = static_cast<uint8_t>(**p);
    ++*p;
    result |= static_cast<uint64_t>(byte & 0x7f) << shift;
    if ((byte & 0x80) == 0) {
      *v = result;
      return true;
    }
  }
  return false;
}

enum class QueryMode { kProject, kEncode };

}  // namespace

struct InvertedIndex::QueryKnobs {
  int64_t candidates = 0;
  int32_t query_features = 64;
  QueryMode mode = QueryMode::kProject;
  bool idf = false;
  int64_t window = 8;
};

absl::StatusOr<InvertedOptions> InvertedOptions::FromBuild(
    const ParamMap& params, const std::vector<std::pair<std::string, std::string>>& artifacts) {
  KVR_RETURN_IF_ERROR(params.CheckKnown(
      "inverted", {"layer", "kv_head", "features", "k", "epochs", "batch_size", "learning_rate",
                   "seed", "train_queries"}));
  InvertedOptions options;
  KVR_ASSIGN_OR_RETURN(int64_t layer, params.GetInt("layer", -1, -1, INT32_MAX));
  KVR_ASSIGN_OR_RETURN(int64_t kv_head, params.GetInt("kv_head", -1, -1, INT32_MAX));
  KVR_ASSIGN_OR_RETURN(int64_t features, params.GetInt("features", 0, 0, kMaxEncoderFeatures));
  KVR_ASSIGN_OR_RETURN(int64_t k, params.GetInt("k", 8, 1, kMaxEncoderK));
  KVR_ASSIGN_OR_RETURN(int64_t epochs, params.GetInt("epochs", 10, 1, 10000));
  KVR_ASSIGN_OR_RETURN(int64_t batch, params.GetInt("batch_size", 256, 1, 65536));
  KVR_ASSIGN_OR_RETURN(double lr, params.GetDouble("learning_rate", 1e-3, 1e-9, 1.0));
  KVR_ASSIGN_OR_RETURN(int64_t seed, params.GetInt("seed", 1, 0));
  KVR_ASSIGN_OR_RETURN(bool train_queries, params.GetBool("train_queries", false));
  options.train.num_features = static_cast<int32_t>(features);
  options.train.k = static_cast<int32_t>(k);
  options.train.epochs = static_cast<int32_t>(epochs);
  options.train.batch_size = static_cast<int32_t>(batch);
  options.train.learning_rate = lr;
  options.train.seed = static_cast<uint64_t>(seed);
  options.train.layer = static_cast<int32_t>(layer);
  options.train.kv_head = static_cast<int32_t>(kv_head);
  options.train_on_queries = train_queries;
  for (const auto& [name, bytes] : artifacts) {
    if (name != "sparse_encoder") continue;
    KVR_ASSIGN_OR_RETURN(auto encoders, ParseSparseEncoders(bytes));
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<SparseEncoder> encoder,
                         SelectSparseEncoder(std::move(encoders), static_cast<int32_t>(layer),
                                             static_cast<int32_t>(kv_head)));
    options.encoder = std::move(encoder);
  }
  return options;
}

InvertedIndex::InvertedIndex(std::shared_ptr<const SparseEncoder> encoder, DType dtype,
                             ParamMap build_params)
    : encoder_(std::move(encoder)),
      dtype_(dtype),
      build_params_(std::move(build_params)),
      postings_(static_cast<size_t>(encoder_->num_features())) {}

absl::StatusOr<std::unique_ptr<InvertedIndex>> InvertedIndex::Create(
    const VectorView& keys, const VectorView& training_queries, const InvertedOptions& options) {
  KVR_RETURN_IF_ERROR(ValidateVectors("inverted keys", keys, -1));
  ParamMap params;
  std::shared_ptr<const SparseEncoder> encoder = options.encoder;
  double from = 0;
  if (encoder == nullptr) {
    SparseEncoderTrainOptions train = options.train;
    train.num_threads = options.num_threads;
    if (options.progress) {
      train.progress = [&options](const Progress& p) {
        return options.progress(Progress{"train:" + p.stage, p.done, p.total, 0.7 * p.fraction});
      };
    }
    std::vector<float> data = VectorsToF32(keys);
    int64_t rows = keys.rows;
    if (options.train_on_queries && training_queries.rows > 0) {
      KVR_RETURN_IF_ERROR(ValidateVectors("inverted training queries", training_queries, keys.dim));
      const std::vector<float> q = VectorsToF32(training_queries);
      data.insert(data.end(), q.begin(), q.end());
      rows += training_queries.rows;
    }
    KVR_ASSIGN_OR_RETURN(std::unique_ptr<SparseEncoder> trained,
                         TrainSparseEncoder(VectorView::F32(data.data(), rows, keys.dim), train));
    encoder = std::move(trained);
    params.Set("encoder", "trained");
    params.SetInt("epochs", train.epochs);
    params.SetInt("seed", static_cast<int64_t>(train.seed));
    params.SetInt("train_queries", options.train_on_queries ? 1 : 0);
    from = 0.7;
  } else {
    params.Set("encoder", "artifact");
  }
  if (encoder->dim() != keys.dim) {
    return absl::InvalidArgumentError(absl::StrCat("inverted: the encoder has dimension ",
                                                   encoder->dim(), ", the keys ", keys.dim));
  }
  params.SetInt("features", encoder->num_features());
  params.SetInt("k", encoder->k());
  if (encoder->weights().layer >= 0) params.SetInt("layer", encoder->weights().layer);
  if (encoder->weights().kv_head >= 0) params.SetInt("kv_head", encoder->weights().kv_head);
  std::unique_ptr<InvertedIndex> index(new InvertedIndex(std::move(encoder), keys.dtype, params));
  KVR_RETURN_IF_ERROR(index->AppendRows(keys, options.num_threads, options.progress, from));
  return index;
}

absl::Status InvertedIndex::AppendRows(const VectorView& keys, int num_threads,
                                       const ProgressCallback& progress, double progress_from) {
  const int64_t n = keys.rows;
  if (n == 0) return absl::OkStatus();
  const int32_t d = encoder_->dim();
  const int32_t kk = encoder_->k();
  std::vector<int32_t> ids(static_cast<size_t>(n) * kk);
  std::vector<float> acts(static_cast<size_t>(n) * kk);
  std::vector<int32_t> counts(static_cast<size_t>(n));
  std::atomic<bool> not_finite{false};
  std::atomic<bool> cancelled{false};
  absl::Mutex progress_mu;
  int64_t done = 0;  // guarded by progress_mu
  ThreadPool::Default()->ParallelFor(
      n, 128,
      [&](int64_t begin, int64_t end) {
        if (cancelled.load(std::memory_order_relaxed)) return;
        std::vector<float> x(static_cast<size_t>(d)), scratch(static_cast<size_t>(encoder_->num_features()));
        for (int64_t i = begin; i < end; ++i) {
          ConvertToFloat(keys.row(i), keys.dtype, x.size(), x.data());
          bool finite = true;
          for (float v : x) finite &= std::isfinite(v);
          if (!finite) {
            not_finite.store(true);
            counts[static_cast<size_t>(i)] = 0;
            continue;
          }
          counts[static_cast<size_t>(i)] = encoder_->Encode(
              x.data(), ids.data() + i * kk, acts.data() + i * kk, scratch.data());
        }
        if (progress) {
          absl::MutexLock lock(&progress_mu);
          done += end - begin;
          if (!progress(Progress{"encode", done, n,
                                 progress_from + (1 - progress_from) * done / double(n)})) {
            cancelled.store(true);
          }
        }
      },
      ResolveThreads(num_threads));
  if (not_finite.load()) return absl::InvalidArgumentError("inverted: keys contain NaN or Inf");
  if (cancelled.load()) return absl::CancelledError("inverted index build cancelled");
  const size_t row_bytes = static_cast<size_t>(d) * DTypeSize(dtype_);
  const size_t old_bytes = keys_.size();
  keys_.resize(old_bytes + static_cast<size_t>(n) * row_bytes);
  for (int64_t i = 0; i < n; ++i) {
    std::memcpy(keys_.data() + old_bytes + i * row_bytes, keys.row(i), row_bytes);
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t pos = size_ + i;
    for (int32_t j = 0; j < counts[static_cast<size_t>(i)]; ++j) {
      PostingList& list = postings_[static_cast<size_t>(ids[static_cast<size_t>(i * kk + j)])];
      PutVarint(static_cast<uint64_t>(pos - list.last - 1), &list.deltas);
      list.acts.push_back(FloatToHalf(std::min(acts[static_cast<size_t>(i * kk + j)], 65504.0f)));
      list.last = pos;
      ++posting_entries_;
    }
  }
  size_ += n;
  return absl::OkStatus();
}

absl::Status InvertedIndex::Add(const VectorView& keys) {
  KVR_RETURN_IF_ERROR(ValidateVectors("inverted keys", keys, dim()));
  if (keys.rows > 0 && keys.dtype != dtype_) {
    return absl::InvalidArgumentError(absl::StrCat("inverted: keys are ", DTypeName(keys.dtype),
                                                   ", the index holds ", DTypeName(dtype_)));
  }
  return AppendRows(keys, /*num_threads=*/0, nullptr, 0);
}

absl::StatusOr<InvertedIndex::QueryKnobs> InvertedIndex::ParseQueryKnobs(
    const ParamMap& knobs, std::initializer_list<absl::string_view> known) const {
  KVR_RETURN_IF_ERROR(knobs.CheckKnown("inverted", known));
  QueryKnobs q;
  KVR_ASSIGN_OR_RETURN(int64_t features,
                       knobs.GetInt("query_features", std::min(128, encoder_->num_features()), 1,
                                    encoder_->num_features()));
  q.query_features = static_cast<int32_t>(features);
  const std::string mode = knobs.GetString("query_mode", "project");
  if (mode == "project") {
    q.mode = QueryMode::kProject;
  } else if (mode == "encode") {
    q.mode = QueryMode::kEncode;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("inverted: query_mode '", mode, "' is not project or encode"));
  }
  KVR_ASSIGN_OR_RETURN(q.idf, knobs.GetBool("idf", false));
  KVR_ASSIGN_OR_RETURN(q.window, knobs.GetInt("window", 8, 0, kMaxWindow));
  return q;
}

int64_t InvertedIndex::Accumulate(const float* q, const QueryKnobs& knobs, float* acc, char* mark,
                                  std::vector<int64_t>* touched,
                                  std::vector<float>* scratch) const {
  const int32_t F = encoder_->num_features();
  scratch->resize(static_cast<size_t>(F));
  std::vector<std::pair<float, int32_t>> features;  // (w_f, f)
  if (knobs.mode == QueryMode::kProject) {
    encoder_->DecoderProjection(q, scratch->data());
    for (int32_t f = 0; f < F; ++f) {
      if ((*scratch)[static_cast<size_t>(f)] > 0) features.emplace_back((*scratch)[static_cast<size_t>(f)], f);
    }
    if (static_cast<int32_t>(features.size()) > knobs.query_features) {
      std::nth_element(features.begin(), features.begin() + (knobs.query_features - 1),
                       features.end(), [](const auto& a, const auto& b) {
                         return a.first > b.first || (a.first == b.first && a.second < b.second);
                       });
      features.resize(static_cast<size_t>(knobs.query_features));
    }
  } else {
    std::vector<int32_t> ids(static_cast<size_t>(encoder_->k()));
    std::vector<float> acts(static_cast<size_t>(encoder_->k()));
    const int32_t count = encoder_->Encode(q, ids.data(), acts.data(), scratch->data());
    for (int32_t i = 0; i < count; ++i) {
      features.emplace_back(acts[static_cast<size_t>(i)], ids[static_cast<size_t>(i)]);
    }
  }
  int64_t entries = 0;
  for (const auto& [weight, f] : features) {
    const PostingList& list = postings_[static_cast<size_t>(f)];
    float w = weight;
    if (knobs.idf) {
      w *= static_cast<float>(std::log((1.0 + size_) / (1.0 + list.acts.size())) + 1.0);
    }
    const char* p = list.deltas.data();
    const char* end = p + list.deltas.size();
    int64_t pos = -1;
    for (uint16_t act : list.acts) {
      uint64_t delta = 0;
      if (!GetVarint(&p, end, &delta)) break;  // cannot happen: lists are validated
      pos += static_cast<int64_t>(delta) + 1;
      acc[pos] += w * HalfToFloat(act);
      if (!mark[pos]) {
        mark[pos] = 1;
        touched->push_back(pos);
      }
    }
    entries += static_cast<int64_t>(list.acts.size());
  }
  return entries;
}

absl::StatusOr<SearchResult> InvertedIndex::Search(const VectorView& queries, int32_t k,
                                                   const SearchParams& params) const {
  const int32_t d = dim();
  KVR_RETURN_IF_ERROR(ValidateVectors("inverted queries", queries, d));
  KVR_RETURN_IF_ERROR(ValidateK(k));
  KVR_ASSIGN_OR_RETURN(QueryKnobs knobs,
                       ParseQueryKnobs(params.knobs, {"candidates", "query_features", "query_mode", "idf"}));
  KVR_ASSIGN_OR_RETURN(knobs.candidates,
                       params.knobs.GetInt("candidates", 8 * static_cast<int64_t>(k), 1));
  KVR_ASSIGN_OR_RETURN(const ExcludeSet exclude, ExcludeSet::Create(params.exclude, size_));
  const std::vector<PositionRange> runs = exclude.IncludedRuns();
  const int64_t eligible = exclude.included();
  const int64_t k_prime = std::min(std::max<int64_t>(knobs.candidates, k), eligible);
  const bool all_exact = k_prime >= eligible;

  const int64_t m = queries.rows;
  SearchResult result = SearchResult::Padded(m, k);
  if (m == 0) return result;
  const std::vector<float> q32 = VectorsToF32(queries);
  std::vector<int64_t> visited(static_cast<size_t>(m), 0);

  auto search_rows = [&](int64_t begin, int64_t end) {
    std::vector<float> acc(all_exact ? 0 : static_cast<size_t>(size_), 0.0f);
    std::vector<char> mark(all_exact ? 0 : static_cast<size_t>(size_), 0);
    std::vector<int64_t> touched, ids;
    std::vector<float> scratch, exact;
    std::vector<int32_t> order;
    for (int64_t qi = begin; qi < end; ++qi) {
      const float* q = q32.data() + qi * d;
      ids.clear();
      if (all_exact) {
        for (const PositionRange& r : runs) {
          for (int64_t t = r.begin; t < r.end; ++t) ids.push_back(t);
        }
      } else {
        touched.clear();
        visited[static_cast<size_t>(qi)] =
            Accumulate(q, knobs, acc.data(), mark.data(), &touched, &scratch);
        for (int64_t t : touched) {
          if (!exclude.Contains(t)) ids.push_back(t);
        }
        if (static_cast<int64_t>(ids.size()) > k_prime) {
          std::nth_element(ids.begin(), ids.begin() + (k_prime - 1), ids.end(),
                           [&](int64_t a, int64_t b) {
                             const float sa = acc[static_cast<size_t>(a)];
                             const float sb = acc[static_cast<size_t>(b)];
                             return sa > sb || (sa == sb && a < b);
                           });
          ids.resize(static_cast<size_t>(k_prime));
        }
        // Too few touched: the most recent untouched eligible positions.
        for (int64_t t = size_ - 1; t >= 0 && static_cast<int64_t>(ids.size()) < k_prime; --t) {
          if (!mark[static_cast<size_t>(t)] && !exclude.Contains(t)) ids.push_back(t);
        }
        for (int64_t t : touched) {
          acc[static_cast<size_t>(t)] = 0.0f;
          mark[static_cast<size_t>(t)] = 0;
        }
        std::sort(ids.begin(), ids.end());
      }
      exact.resize(ids.size());
      ScoreRowsGather(q, keys_.data(), dtype_, d, d, ids.data(), static_cast<int64_t>(ids.size()),
                      exact.data());
      WriteTopK(exact, ids, k, &order, result.ids.data() + qi * k, result.scores.data() + qi * k);
    }
  };
  // Chunks of several queries share their scratch arrays ([size_] each).
  ParallelForChunks(m, params.num_threads, search_rows);
  for (int64_t v : visited) result.stats.visited += v;
  result.stats.keys_scanned = m * k_prime;
  result.stats.exact_scores = m * k_prime;
  return result;
}

absl::StatusOr<SpanResult> InvertedIndex::SearchSpans(const VectorView& queries,
                                                      int64_t budget_tokens,
                                                      const SearchParams& params) const {
  const int32_t d = dim();
  KVR_RETURN_IF_ERROR(ValidateVectors("inverted queries", queries, d));
  if (budget_tokens < 0) {
    return absl::InvalidArgumentError(absl::StrCat("inverted: budget_tokens = ", budget_tokens, " < 0"));
  }
  KVR_ASSIGN_OR_RETURN(const QueryKnobs knobs,
                       ParseQueryKnobs(params.knobs, {"query_features", "query_mode", "idf", "window"}));
  KVR_ASSIGN_OR_RETURN(const ExcludeSet exclude, ExcludeSet::Create(params.exclude, size_));
  SpanResult result;
  if (queries.rows == 0 || size_ == 0 || budget_tokens == 0) return result;
  const std::vector<float> q32 = VectorsToF32(queries);

  // Token scores summed over the query rows (eligible positions only).
  std::vector<double> token(static_cast<size_t>(size_), 0.0);
  {
    std::vector<float> acc(static_cast<size_t>(size_), 0.0f), scratch;
    std::vector<char> mark(static_cast<size_t>(size_), 0);
    std::vector<int64_t> touched;
    for (int64_t qi = 0; qi < queries.rows; ++qi) {
      touched.clear();
      result.stats.visited +=
          Accumulate(q32.data() + qi * d, knobs, acc.data(), mark.data(), &touched, &scratch);
      for (int64_t t : touched) {
        if (!exclude.Contains(t)) token[static_cast<size_t>(t)] += acc[static_cast<size_t>(t)];
        acc[static_cast<size_t>(t)] = 0.0f;
        mark[static_cast<size_t>(t)] = 0;
      }
    }
  }
  // Window scores W[t] = Σ token[t - w .. t + w] through prefix sums.
  const int64_t w = knobs.window;
  std::vector<double> prefix(static_cast<size_t>(size_) + 1, 0.0);
  for (int64_t t = 0; t < size_; ++t) prefix[static_cast<size_t>(t) + 1] = prefix[static_cast<size_t>(t)] + token[static_cast<size_t>(t)];
  std::vector<std::pair<double, int64_t>> seeds;
  for (int64_t t = 0; t < size_; ++t) {
    const double ws = prefix[static_cast<size_t>(std::min(size_, t + w + 1))] -
                      prefix[static_cast<size_t>(std::max<int64_t>(0, t - w))];
    if (ws > 0 && !exclude.Contains(t)) seeds.emplace_back(ws, t);
  }
  std::sort(seeds.begin(), seeds.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
  std::vector<char> covered(static_cast<size_t>(size_), 0);
  int64_t remaining = budget_tokens;
  for (const auto& [score, t] : seeds) {
    if (remaining == 0) break;
    if (covered[static_cast<size_t>(t)]) continue;
    // Outward from t: t, t-1, t+1, t-2, t+2, ... within [t - w, t + w].
    auto cover = [&](int64_t pos) {
      if (remaining == 0 || pos < 0 || pos >= size_ || covered[static_cast<size_t>(pos)] ||
          exclude.Contains(pos)) {
        return;
      }
      covered[static_cast<size_t>(pos)] = 1;
      --remaining;
    };
    cover(t);
    for (int64_t off = 1; off <= w && remaining > 0; ++off) {
      cover(t - off);
      cover(t + off);
    }
  }
  for (int64_t t = 0; t < size_;) {
    if (!covered[static_cast<size_t>(t)]) {
      ++t;
      continue;
    }
    Span span{t, t, 0.0f};
    double sum = 0;
    while (t < size_ && covered[static_cast<size_t>(t)]) sum += token[static_cast<size_t>(t++)];
    span.end = t;
    span.score = static_cast<float>(sum);
    result.tokens += span.end - span.begin;
    result.spans.push_back(span);
  }
  return result;
}

int64_t InvertedIndex::PostingBytes() const {
  int64_t bytes = 0;
  for (const PostingList& list : postings_) {
    bytes += static_cast<int64_t>(list.deltas.size() + list.acts.size() * sizeof(uint16_t));
  }
  return bytes;
}

int64_t InvertedIndex::IndexBytes() const {
  const SparseEncoderWeights& w = encoder_->weights();
  return PostingBytes() +
         static_cast<int64_t>((w.w_enc.size() + w.w_dec.size() + w.b_enc.size() + w.b_dec.size()) *
                              sizeof(float));
}

absl::StatusOr<std::string> InvertedIndex::Serialize() const {
  std::string payload;
  ByteWriter w(&payload);
  w.Put<uint32_t>(kInvertedPayloadVersion);
  w.PutString(SerializeSparseEncoders({encoder_.get()}));
  w.Put<uint64_t>(static_cast<uint64_t>(size_));
  w.PutBytes(keys_.data(), keys_.size());
  w.Put<uint64_t>(static_cast<uint64_t>(posting_entries_));
  for (const PostingList& list : postings_) {
    w.Put<uint64_t>(list.acts.size());
    w.Put<uint64_t>(list.deltas.size());
    w.PutBytes(list.deltas.data(), list.deltas.size());
    w.PutBytes(list.acts.data(), list.acts.size() * sizeof(uint16_t));
  }
  return EncodeIndex(IndexHeader{std::string(kKind), dim(), size_, dtype_, build_params_}, payload);
}

absl::StatusOr<std::unique_ptr<InvertedIndex>> InvertedIndex::Load(absl::string_view bytes) {
  KVR_ASSIGN_OR_RETURN(auto decoded, DecodeIndex(bytes));
  return Load(decoded.first, decoded.second);
}

absl::StatusOr<std::unique_ptr<InvertedIndex>> InvertedIndex::Load(const IndexHeader& header,
                                                                  absl::string_view payload) {
  ByteReader r(payload);
  KVR_RETURN_IF_ERROR(ReadPayloadVersion(header, kKind, kInvertedPayloadVersion, &r));
  KVR_ASSIGN_OR_RETURN(std::string encoder_bytes, r.GetString());
  KVR_ASSIGN_OR_RETURN(auto encoders, ParseSparseEncoders(encoder_bytes));
  if (encoders.size() != 1) return absl::DataLossError("inverted payload must hold one encoder");
  std::shared_ptr<const SparseEncoder> encoder = std::move(encoders[0]);
  KVR_ASSIGN_OR_RETURN(uint64_t n, r.Get<uint64_t>());
  if (encoder->dim() != header.dim || static_cast<int64_t>(n) != header.size) {
    return absl::DataLossError("inverted payload does not match its header");
  }
  const size_t row_bytes = static_cast<size_t>(header.dim) * DTypeSize(header.key_dtype);
  if (n > r.remaining() / row_bytes) return absl::DataLossError("inverted payload is truncated");
  std::unique_ptr<InvertedIndex> index(
      new InvertedIndex(std::move(encoder), header.key_dtype, header.build_params));
  index->size_ = static_cast<int64_t>(n);
  index->keys_.resize(n * row_bytes);
  KVR_RETURN_IF_ERROR(r.GetBytes(index->keys_.data(), index->keys_.size()));
  KVR_ASSIGN_OR_RETURN(uint64_t total, r.Get<uint64_t>());
  uint64_t seen = 0;
  for (PostingList& list : index->postings_) {
    KVR_ASSIGN_OR_RETURN(uint64_t count, r.Get<uint64_t>());
    KVR_ASSIGN_OR_RETURN(uint64_t nbytes, r.Get<uint64_t>());
    if (count > n || nbytes > r.remaining() || count * 2 > r.remaining() - nbytes) {
      return absl::DataLossError("inverted posting list is truncated");
    }
    list.deltas.resize(nbytes);
    list.acts.resize(count);
    KVR_RETURN_IF_ERROR(r.GetBytes(list.deltas.data(), nbytes));
    KVR_RETURN_IF_ERROR(r.GetBytes(list.acts.data(), count * sizeof(uint16_t)));
    const char* p = list.deltas.data();
    const char* end = p + nbytes;
    int64_t pos = -1;
    for (uint64_t i = 0; i < count; ++i) {
      uint64_t delta;
      if (!GetVarint(&p, end, &delta) || delta >= n || pos + 1 + static_cast<int64_t>(delta) >= static_cast<int64_t>(n)) {
        return absl::DataLossError("inverted posting list has a bad position");
      }
      pos += static_cast<int64_t>(delta) + 1;
      if (!std::isfinite(HalfToFloat(list.acts[i]))) {
        return absl::DataLossError("inverted posting list has a non-finite activation");
      }
    }
    if (p != end) return absl::DataLossError("inverted posting list has trailing bytes");
    list.last = pos;
    seen += count;
  }
  if (seen != total) return absl::DataLossError("inverted posting entries do not add up");
  if (r.remaining() != 0) return absl::DataLossError("inverted payload has trailing bytes");
  index->posting_entries_ = static_cast<int64_t>(total);
  return index;
}

}  // namespace kvrecall::index::inverted
