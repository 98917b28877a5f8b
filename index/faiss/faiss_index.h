#pragma once

// FaissIndex: the off-the-shelf ANN baselines of RetrievalAttention behind
// KeyIndex, through FAISS 1.7.3 (CPU), inner-product metric:
//
//   faiss_hnsw  IndexHNSWFlat.  Build params: m=32 (links per node, 4..128),
//               ef_construction=200 (40..4096). Knob ef (efSearch, default
//               64); at ef >= size() the search is an exhaustive scan.
//   faiss_ivf   IndexIVFFlat over an inner-product coarse quantizer (k-means
//               of the keys). Build params: nlist=0 (lists; 0 = about
//               4 sqrt(n)), niter=20 (k-means iterations). Knob nprobe
//               (default 8); at nprobe = nlist every list is scanned.
//
// FAISS keeps its own f32 copy of the keys (IndexBytes); the keys in their
// own dtype are kept as well, to rerank candidates with DotRow so that scores
// (and, at the maximum knob, results) are exactly the flat ones.
// keys_scanned counts FAISS's distance computations to keys (HNSW, through a
// counting distance computer; IVF, the entries of the probed lists), not the
// quantizer's centroid scores. Exclusions go to FAISS as an IDSelector.
// FAISS exceptions are caught here and become INTERNAL / INVALID_ARGUMENT.

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "common/progress.h"
#include "index/aligned_vector.h"
#include "index/index_format.h"
#include "index/key_index.h"

namespace faiss {
struct Index;
}  // namespace faiss

namespace kvrecall::index {

enum class FaissKind { kHnsw, kIvf };

struct FaissOptions {
  FaissKind kind = FaissKind::kHnsw;
  // HNSW: neighbours per node on the upper levels (2m on level 0). [4, 128].
  int32_t hnsw_m = 32;
  // HNSW: beam width while building. [40, 4096].
  int32_t ef_construction = 200;
  // IVF: number of lists; 0 chooses round(4 sqrt(n)) clamped to [1, n].
  int32_t nlist = 0;
  // IVF: k-means iterations. [1, 100].
  int32_t niter = 20;
  // Build threads (OpenMP inside FAISS); 0 = all hardware threads.
  int num_threads = 0;
  // Progress: stages "train" (IVF) and "add"; returning false cancels.
  ProgressCallback progress;

  // kind from "faiss_hnsw" / "faiss_ivf"; INVALID_ARGUMENT on unknown keys
  // or out-of-range values.
  static absl::StatusOr<FaissOptions> FromParams(absl::string_view kind, const ParamMap& params);
  ParamMap ToParams() const;
};

// Thread-compatible (see KeyIndex); concurrent faiss_hnsw searches run one
// batch at a time (FAISS 1.7.3 reads efSearch from the index object).
class FaissIndex final : public KeyIndex {
 public:
  static constexpr int32_t kDefaultEf = 64;
  static constexpr int32_t kDefaultNprobe = 8;

  // Builds over keys [n, d]; training queries are not used.
  static absl::StatusOr<std::unique_ptr<FaissIndex>> Build(const VectorView& keys,
                                                           const FaissOptions& options);
  static absl::StatusOr<std::unique_ptr<FaissIndex>> Load(const IndexHeader& header,
                                                          absl::string_view payload);
  ~FaissIndex() override;

  absl::string_view kind() const override;
  int32_t dim() const override { return dim_; }
  int64_t size() const override { return size_; }
  // REQUIRES keys.dtype == the built keys' dtype (else INVALID_ARGUMENT).
  absl::Status Add(const VectorView& keys) override;
  absl::StatusOr<SearchResult> Search(const VectorView& queries, int32_t k,
                                      const SearchParams& params) const override;
  absl::string_view SearchEffortKnob() const override;
  int64_t MaxSearchEffort() const override;
  int64_t IndexBytes() const override;
  int64_t KeyBytes() const override { return static_cast<int64_t>(keys_.size()); }
  const ParamMap& build_params() const override { return build_params_; }
  absl::StatusOr<std::string> Serialize() const override;

 private:
  FaissIndex(int32_t dim, DType key_dtype, const FaissOptions& options);
  absl::Status AddToFaiss(const VectorView& keys, const ProgressCallback& progress,
                          double fraction_begin);
  const char* KeyRow(int64_t i) const { return keys_.data() + i * row_bytes_; }

  int32_t dim_;
  DType key_dtype_;
  size_t row_bytes_;
  FaissOptions options_;
  ParamMap build_params_;
  int64_t size_ = 0;
  AlignedVector<char> keys_;  // [size, dim] of key_dtype_
  std::unique_ptr<faiss::Index> index_;
  // Held by an HNSW search batch while it sets the index's efSearch.
  mutable absl::Mutex hnsw_mu_;
};

}  // namespace kvrecall::index
