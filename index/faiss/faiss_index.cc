#include "index/faiss/faiss_index.h"

#include <faiss/IndexFlat.h>
#include <faiss/IndexHNSW.h>
#include <faiss/IndexIVFFlat.h>
#include <faiss/impl/AuxIndexStructures.h>
#include <faiss/impl/DistanceComputer.h>
#include <faiss/impl/FaissException.h>
#include <faiss/impl/HNSW.h>
#include <faiss/impl/IDSelector.h>
#include <faiss/impl/io.h>
#include <faiss/index_io.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <thread>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"
#include "index/distance.h"
#include "index/search_input.h"

namespace kvrecall::index {
namespace {

using faiss_idx_t = faiss::Index::idx_t;

// docs/formats/faiss.md
constexpr uint32_t kFaissPayloadVersion = 1;
// Keys per FAISS add() call (progress is reported between calls).
constexpr int64_t kAddBatch = 8192;

// Sets the OpenMP threads of the calling thread for its lifetime.
class ScopedOmpThreads {
 public:
  explicit ScopedOmpThreads(int threads) : saved_(omp_get_max_threads()) {
    omp_set_num_threads(std::max(1, threads));
  }
  ~ScopedOmpThreads() { omp_set_num_threads(saved_); }

 private:
  int saved_;
};

// HNSW minimises a distance; the flat storage of an inner-product index
// returns similarities, so they are negated (as IndexHNSW does internally),
// and every call is counted: the keys scanned.
class CountingNegatedDistance final : public faiss::DistanceComputer {
 public:
  explicit CountingNegatedDistance(faiss::DistanceComputer* base) : base_(base) {}
  void set_query(const float* x) override { base_->set_query(x); }
  float operator()(faiss_idx_t i) override {
    ++count_;
    return -(*base_)(i);
  }
  float symmetric_dis(faiss_idx_t i, faiss_idx_t j) override { return -base_->symmetric_dis(i, j); }
  int64_t count() const { return count_; }

 private:
  std::unique_ptr<faiss::DistanceComputer> base_;
  int64_t count_ = 0;
};

// The positions a search may return.
class IncludedSelector final : public faiss::IDSelector {
 public:
  explicit IncludedSelector(const ExcludeSet* exclude) : exclude_(exclude) {}
  bool is_member(faiss_idx_t id) const override { return !exclude_->Contains(id); }

 private:
  const ExcludeSet* exclude_;
};

absl::Status FromFaiss(const std::exception& e, absl::string_view what) {
  return absl::InternalError(absl::StrCat("faiss: ", what, ": ", e.what()));
}

int HardwareThreads() { return static_cast<int>(std::max(1u, std::thread::hardware_concurrency())); }

// Reranks candidate ids by exact score (DotRow), best first; writes k.
// Labels outside [0, n) (which only a corrupt index could return) are skipped.
void Rerank(const faiss_idx_t* labels, int64_t count, int32_t k, const float* query,
            const std::function<const char*(int64_t)>& row, DType dtype, int32_t d, int64_t n,
            int64_t* out_ids, float* out_scores, int64_t* exact) {
  TopK top(k);
  for (int64_t j = 0; j < count; ++j) {
    if (labels[j] < 0 || labels[j] >= n) continue;
    top.Push(DotRow(query, row(labels[j]), dtype, d), labels[j]);
    ++*exact;
  }
  top.Drain(out_ids, out_scores);
}

// FAISS trusts what read_index() gives it: a graph neighbour or an inverted
// list id past ntotal would make a search read outside its storage. Checks
// every id (found by fuzzing the loader, fuzz/index_load_fuzz.cc).
absl::Status ValidateStructure(const faiss::Index& index) {
  const int64_t n = index.ntotal;
  auto bad = [](absl::string_view what) {
    return absl::DataLossError(absl::StrCat("faiss: stored index is inconsistent: ", what));
  };
  if (const auto* hnsw = dynamic_cast<const faiss::IndexHNSW*>(&index); hnsw != nullptr) {
    const faiss::HNSW& h = hnsw->hnsw;
    if (hnsw->storage == nullptr || hnsw->storage->ntotal != n || hnsw->storage->d != index.d) {
      return bad("HNSW storage");
    }
    if (static_cast<int64_t>(h.levels.size()) != n ||
        static_cast<int64_t>(h.offsets.size()) != n + 1 || h.entry_point < -1 ||
        h.entry_point >= n || (n > 0 && h.entry_point < 0) ||
        h.offsets.back() != h.neighbors.size() || h.max_level < -1 ||
        h.max_level >= static_cast<int>(h.cum_nneighbor_per_level.size())) {
      return bad("HNSW levels, offsets or entry point");
    }
    for (int64_t i = 0; i < n; ++i) {
      if (h.offsets[i] > h.offsets[i + 1] || h.levels[i] < 1 ||
          h.levels[i] > static_cast<int>(h.cum_nneighbor_per_level.size()) - 1 ||
          h.levels[i] > h.max_level + 1 ||
          h.offsets[i] + h.cum_nneighbor_per_level[h.levels[i]] > h.offsets[i + 1]) {
        return bad("HNSW node levels");
      }
    }
    for (faiss::HNSW::storage_idx_t id : h.neighbors) {
      if (id < -1 || id >= n) return bad("HNSW neighbour id");
    }
    return absl::OkStatus();
  }
  if (const auto* ivf = dynamic_cast<const faiss::IndexIVF*>(&index); ivf != nullptr) {
    if (ivf->invlists == nullptr || ivf->quantizer == nullptr ||
        ivf->quantizer->ntotal != static_cast<faiss_idx_t>(ivf->nlist) ||
        ivf->invlists->nlist != ivf->nlist || ivf->quantizer->d != index.d) {
      return bad("IVF lists or quantizer");
    }
    int64_t total = 0;
    for (size_t l = 0; l < ivf->nlist; ++l) {
      const size_t size = ivf->invlists->list_size(l);
      total += static_cast<int64_t>(size);
      if (size == 0) continue;
      faiss::InvertedLists::ScopedIds ids(ivf->invlists, l);
      for (size_t j = 0; j < size; ++j) {
        if (ids[j] < 0 || ids[j] >= n) return bad("IVF list id");
      }
    }
    if (total != n) return bad("IVF list sizes");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<FaissOptions> FaissOptions::FromParams(absl::string_view kind,
                                                      const ParamMap& params) {
  FaissOptions o;
  if (kind == "faiss_hnsw") {
    o.kind = FaissKind::kHnsw;
    KVR_RETURN_IF_ERROR(params.CheckKnown("faiss_hnsw build", {"m", "ef_construction"}));
    KVR_ASSIGN_OR_RETURN(int64_t m, params.GetInt("m", o.hnsw_m, 4, 128));
    KVR_ASSIGN_OR_RETURN(int64_t efc, params.GetInt("ef_construction", o.ef_construction, 40, 4096));
    o.hnsw_m = static_cast<int32_t>(m);
    o.ef_construction = static_cast<int32_t>(efc);
  } else if (kind == "faiss_ivf") {
    o.kind = FaissKind::kIvf;
    KVR_RETURN_IF_ERROR(params.CheckKnown("faiss_ivf build", {"nlist", "niter"}));
    KVR_ASSIGN_OR_RETURN(int64_t nlist, params.GetInt("nlist", o.nlist, 0, 1 << 20));
    KVR_ASSIGN_OR_RETURN(int64_t niter, params.GetInt("niter", o.niter, 1, 100));
    o.nlist = static_cast<int32_t>(nlist);
    o.niter = static_cast<int32_t>(niter);
  } else {
    return absl::InvalidArgumentError(absl::StrCat("not a FAISS kind: ", kind));
  }
  return o;
}

ParamMap FaissOptions::ToParams() const {
  ParamMap p;
  if (kind == FaissKind::kHnsw) {
    p.SetInt("m", hnsw_m);
    p.SetInt("ef_construction", ef_construction);
  } else {
    p.SetInt("nlist", nlist);
    p.SetInt("niter", niter);
  }
  return p;
}

FaissIndex::FaissIndex(int32_t dim, DType key_dtype, const FaissOptions& options)
    : dim_(dim),
      key_dtype_(key_dtype),
      row_bytes_(static_cast<size_t>(dim) * DTypeSize(key_dtype)),
      options_(options),
      build_params_(options.ToParams()) {}

FaissIndex::~FaissIndex() = default;

absl::string_view FaissIndex::kind() const {
  return options_.kind == FaissKind::kHnsw ? "faiss_hnsw" : "faiss_ivf";
}

absl::string_view FaissIndex::SearchEffortKnob() const {
  return options_.kind == FaissKind::kHnsw ? "ef" : "nprobe";
}

int64_t FaissIndex::MaxSearchEffort() const {
  if (options_.kind == FaissKind::kHnsw) return std::max<int64_t>(1, size_);
  return static_cast<int64_t>(static_cast<const faiss::IndexIVF*>(index_.get())->nlist);
}

absl::StatusOr<std::unique_ptr<FaissIndex>> FaissIndex::Build(const VectorView& keys,
                                                              const FaissOptions& options) {
  KVR_RETURN_IF_ERROR(ValidateVectors("keys", keys, -1));
  FaissOptions checked = options;
  {
    const absl::string_view kind = options.kind == FaissKind::kHnsw ? "faiss_hnsw" : "faiss_ivf";
    // Range checks only; the callback and threads come from `options`.
    KVR_RETURN_IF_ERROR(FaissOptions::FromParams(kind, options.ToParams()).status());
  }
  if (keys.rows > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("faiss: more than 2^31-1 keys");
  }
  const int64_t n = keys.rows;
  if (options.kind == FaissKind::kIvf) {
    if (n == 0) {
      return absl::InvalidArgumentError("faiss_ivf: needs at least one key to train its lists");
    }
    if (checked.nlist == 0) {
      checked.nlist = static_cast<int32_t>(
          std::clamp<int64_t>(std::llround(4 * std::sqrt(static_cast<double>(n))), 1, n));
    } else if (checked.nlist > n) {
      return absl::InvalidArgumentError(
          absl::StrCat("faiss_ivf: nlist=", checked.nlist, " exceeds the ", n, " keys"));
    }
  }
  std::unique_ptr<FaissIndex> index(new FaissIndex(keys.dim, keys.dtype, checked));
  const int threads = options.num_threads > 0 ? options.num_threads : HardwareThreads();
  ScopedOmpThreads omp_threads(threads);
  try {
    if (checked.kind == FaissKind::kHnsw) {
      auto hnsw = std::make_unique<faiss::IndexHNSWFlat>(keys.dim, checked.hnsw_m,
                                                         faiss::METRIC_INNER_PRODUCT);
      hnsw->hnsw.efConstruction = checked.ef_construction;
      index->index_ = std::move(hnsw);
    } else {
      auto* quantizer = new faiss::IndexFlatIP(keys.dim);
      auto ivf = std::make_unique<faiss::IndexIVFFlat>(quantizer, keys.dim, checked.nlist,
                                                       faiss::METRIC_INNER_PRODUCT);
      ivf->own_fields = true;
      ivf->cp.niter = checked.niter;
      // Short contexts have few keys per list; FAISS only warns about it.
      ivf->cp.min_points_per_centroid = 1;
      const std::vector<float> x = VectorsToF32(keys);
      if (options.progress) {
        Progress p{"train", 0, 1, 0.0};
        if (!options.progress(p)) return absl::CancelledError("faiss build cancelled");
      }
      ivf->train(n, x.data());
      index->index_ = std::move(ivf);
    }
  } catch (const std::exception& e) {
    return FromFaiss(e, "build");
  }
  KVR_RETURN_IF_ERROR(
      index->AddToFaiss(keys, options.progress, checked.kind == FaissKind::kIvf ? 0.5 : 0.0));
  return index;
}

absl::Status FaissIndex::AddToFaiss(const VectorView& keys, const ProgressCallback& progress,
                                    double fraction_begin) {
  std::vector<float> x;
  for (int64_t b = 0; b < keys.rows; b += kAddBatch) {
    VectorView batch = keys;
    batch.data = keys.row(b);
    batch.rows = std::min(kAddBatch, keys.rows - b);
    x = VectorsToF32(batch);
    try {
      index_->add(batch.rows, x.data());
    } catch (const std::exception& e) {
      return FromFaiss(e, "add");
    }
    // Our copy of the keys grows with FAISS's, so both always agree.
    keys_.resize((size_ + batch.rows) * row_bytes_);
    for (int64_t i = 0; i < batch.rows; ++i) {
      std::memcpy(keys_.data() + (size_ + i) * row_bytes_, batch.row(i), row_bytes_);
    }
    size_ += batch.rows;
    if (progress) {
      const int64_t done = b + batch.rows;
      Progress p{"add", done, keys.rows,
                 fraction_begin + (1 - fraction_begin) * static_cast<double>(done) /
                                      static_cast<double>(keys.rows)};
      if (!progress(p)) return absl::CancelledError("faiss build cancelled");
    }
  }
  return absl::OkStatus();
}

absl::Status FaissIndex::Add(const VectorView& keys) {
  KVR_RETURN_IF_ERROR(ValidateAddedKeys(kind(), keys, dim_, key_dtype_));
  if (size_ + keys.rows > std::numeric_limits<int32_t>::max()) {
    return absl::InvalidArgumentError("faiss: more than 2^31-1 keys");
  }
  ScopedOmpThreads omp_threads(HardwareThreads());
  return AddToFaiss(keys, nullptr, 0);
}

absl::StatusOr<SearchResult> FaissIndex::Search(const VectorView& queries, int32_t k,
                                                const SearchParams& params) const {
  KVR_RETURN_IF_ERROR(ValidateVectors("queries", queries, dim_));
  KVR_RETURN_IF_ERROR(ValidateK(k));
  const bool hnsw = options_.kind == FaissKind::kHnsw;
  int64_t effort;
  if (hnsw) {
    KVR_RETURN_IF_ERROR(params.knobs.CheckKnown("faiss_hnsw search", {"ef"}));
    KVR_ASSIGN_OR_RETURN(effort, params.knobs.GetInt("ef", kDefaultEf, 1, INT32_MAX));
  } else {
    KVR_RETURN_IF_ERROR(params.knobs.CheckKnown("faiss_ivf search", {"nprobe"}));
    KVR_ASSIGN_OR_RETURN(effort, params.knobs.GetInt("nprobe", kDefaultNprobe, 1, INT64_MAX));
    effort = std::min(effort, MaxSearchEffort());
  }
  KVR_ASSIGN_OR_RETURN(ExcludeSet exclude, ExcludeSet::Create(params.exclude, size_));
  const int64_t nq = queries.rows, n = size_;
  SearchResult result = SearchResult::Padded(nq, k);
  if (nq == 0 || n == 0) return result;
  const std::vector<float> q = VectorsToF32(queries);
  IncludedSelector selector(&exclude);
  const auto row = [this](int64_t i) { return KeyRow(i); };
  // IVF candidates carry a margin so that FAISS's own rounding cannot push a
  // true top-k key out before the exact rerank.
  const int64_t fetch = hnsw ? std::min<int64_t>(k, n) : std::min<int64_t>(k + 16, n);
  std::vector<int64_t> scanned(nq, 0), exact(nq, 0);
  std::vector<absl::Status> errors(nq);
  // FAISS 1.7.3 sizes HNSW's candidate queue from the index's own efSearch
  // (SearchParametersHNSW::efSearch only bounds the result set), so the
  // field is set for this batch; concurrent batches wait for each other.
  std::unique_ptr<absl::MutexLock> hnsw_lock;
  if (hnsw && effort < n) {
    hnsw_lock = std::make_unique<absl::MutexLock>(&hnsw_mu_);
    static_cast<faiss::IndexHNSW*>(index_.get())->hnsw.efSearch = static_cast<int>(effort);
  }
  ThreadPool::Default()->ParallelFor(
      nq, 1,
      [&](int64_t begin, int64_t end) {
        omp_set_num_threads(1);  // one query per call: no nested OpenMP team
        std::vector<faiss_idx_t> labels(fetch);
        std::vector<float> dist(fetch);
        std::unique_ptr<faiss::VisitedTable> visited;
        try {
          for (int64_t i = begin; i < end; ++i) {
            const float* qi = q.data() + i * dim_;
            int64_t* out_ids = result.ids.data() + i * k;
            float* out_scores = result.scores.data() + i * k;
            if (hnsw && effort >= n) {  // the beam holds every key: scan them all
              TopK top(k);
              for (int64_t p = 0; p < n; ++p) {
                if (!exclude.Contains(p)) top.Push(DotRow(qi, KeyRow(p), key_dtype_, dim_), p);
              }
              top.Drain(out_ids, out_scores);
              scanned[i] = exact[i] = exclude.included();
              continue;
            }
            if (hnsw) {
              const auto* index = static_cast<const faiss::IndexHNSW*>(index_.get());
              if (visited == nullptr) visited = std::make_unique<faiss::VisitedTable>(n);
              CountingNegatedDistance dc(index->storage->get_distance_computer());
              dc.set_query(qi);
              faiss::SearchParametersHNSW sp;
              sp.efSearch = static_cast<int>(effort);
              sp.sel = exclude.empty() ? nullptr : &selector;
              index->hnsw.search(dc, static_cast<int>(fetch), labels.data(), dist.data(),
                                 *visited, &sp);
              visited->advance();
              scanned[i] = dc.count();
            } else {
              const auto* ivf = static_cast<const faiss::IndexIVF*>(index_.get());
              std::vector<faiss_idx_t> assign(effort);
              std::vector<float> centroid_dis(effort);
              ivf->quantizer->search(1, qi, effort, centroid_dis.data(), assign.data());
              faiss::SearchParametersIVF sp;
              sp.nprobe = static_cast<size_t>(effort);
              sp.sel = exclude.empty() ? nullptr : &selector;
              faiss::IndexIVFStats stats;
              ivf->search_preassigned(1, qi, fetch, assign.data(), centroid_dis.data(),
                                      dist.data(), labels.data(), false, &sp, &stats);
              scanned[i] = static_cast<int64_t>(stats.ndis);
            }
            Rerank(labels.data(), fetch, k, qi, row, key_dtype_, dim_, n, out_ids, out_scores,
                   &exact[i]);
          }
        } catch (const std::exception& e) {
          errors[begin] = FromFaiss(e, "search");
        }
      },
      ResolveThreads(params.num_threads));
  for (const absl::Status& s : errors) KVR_RETURN_IF_ERROR(s);
  for (int64_t i = 0; i < nq; ++i) {
    result.stats.keys_scanned += scanned[i];
    result.stats.exact_scores += exact[i];
  }
  return result;
}

int64_t FaissIndex::IndexBytes() const {
  if (options_.kind == FaissKind::kHnsw) {
    const auto* index = static_cast<const faiss::IndexHNSW*>(index_.get());
    const faiss::HNSW& h = index->hnsw;
    return static_cast<int64_t>(size_ * dim_ * sizeof(float) +
                                h.neighbors.size() * sizeof(faiss::HNSW::storage_idx_t) +
                                h.offsets.size() * sizeof(size_t) + h.levels.size() * sizeof(int));
  }
  const auto* ivf = static_cast<const faiss::IndexIVF*>(index_.get());
  return static_cast<int64_t>(size_ * (dim_ * sizeof(float) + sizeof(faiss_idx_t)) +
                              ivf->nlist * dim_ * sizeof(float));
}

absl::StatusOr<std::string> FaissIndex::Serialize() const {
  faiss::VectorIOWriter writer;
  try {
    faiss::write_index(index_.get(), &writer);
  } catch (const std::exception& e) {
    return FromFaiss(e, "write_index");
  }
  std::string payload;
  ByteWriter w(&payload);
  w.Put<uint32_t>(kFaissPayloadVersion);
  w.Put<uint64_t>(writer.data.size());
  w.PutBytes(writer.data.data(), writer.data.size());
  w.PutBytes(keys_.data(), keys_.size());
  return EncodeIndex(IndexHeader{std::string(kind()), dim_, size_, key_dtype_, build_params_}, payload);
}

absl::StatusOr<std::unique_ptr<FaissIndex>> FaissIndex::Load(const IndexHeader& header,
                                                             absl::string_view payload) {
  auto options = FaissOptions::FromParams(header.kind, header.build_params);
  if (!options.ok()) return absl::DataLossError(options.status().message());
  if (header.dim <= 0 || header.size < 0 || header.size > std::numeric_limits<int32_t>::max()) {
    return absl::DataLossError("faiss: bad dim or size");
  }
  std::unique_ptr<FaissIndex> index(new FaissIndex(header.dim, header.key_dtype, *options));
  ByteReader r(payload);
  KVR_ASSIGN_OR_RETURN(uint32_t version, r.Get<uint32_t>());
  if (version != kFaissPayloadVersion) {
    return absl::FailedPreconditionError(
        absl::StrCat("faiss: payload version ", version, " is not supported"));
  }
  KVR_ASSIGN_OR_RETURN(uint64_t faiss_bytes, r.Get<uint64_t>());
  if (faiss_bytes > r.remaining()) return absl::DataLossError("faiss: payload truncated");
  faiss::VectorIOReader reader;
  reader.data.resize(faiss_bytes);
  KVR_RETURN_IF_ERROR(r.GetBytes(reader.data.data(), faiss_bytes));
  try {
    index->index_.reset(faiss::read_index(&reader));
  } catch (const std::exception& e) {
    return absl::DataLossError(absl::StrCat("faiss: read_index: ", e.what()));
  }
  const bool type_ok = options->kind == FaissKind::kHnsw
                           ? dynamic_cast<faiss::IndexHNSWFlat*>(index->index_.get()) != nullptr
                           : dynamic_cast<faiss::IndexIVFFlat*>(index->index_.get()) != nullptr;
  // FAISS reads the metric as raw bytes: compare them as an int, since an
  // enum holding a value it has no enumerator for is not a valid load.
  int metric = 0;
  static_assert(sizeof(metric) == sizeof(faiss::MetricType));
  std::memcpy(&metric, &index->index_->metric_type, sizeof(metric));
  if (!type_ok || index->index_->d != header.dim || index->index_->ntotal != header.size ||
      metric != static_cast<int>(faiss::METRIC_INNER_PRODUCT)) {
    return absl::DataLossError("faiss: stored index does not match the header");
  }
  KVR_RETURN_IF_ERROR(ValidateStructure(*index->index_));
  // Counted by division: the product could wrap to the bytes present.
  if (index->row_bytes_ == 0 || r.remaining() % index->row_bytes_ != 0 ||
      r.remaining() / index->row_bytes_ != static_cast<size_t>(header.size)) {
    return absl::DataLossError("faiss: key bytes do not match");
  }
  const size_t key_bytes = r.remaining();
  index->keys_.resize(key_bytes);
  KVR_RETURN_IF_ERROR(r.GetBytes(index->keys_.data(), key_bytes));
  index->size_ = header.size;
  if (options->kind == FaissKind::kIvf) {
    index->options_.nlist =
        static_cast<int32_t>(static_cast<const faiss::IndexIVF*>(index->index_.get())->nlist);
  }
  return index;
}

}  // namespace kvrecall::index
