#pragma once

// The sparse-feature inverted index of S³-Attention (arXiv 2601.17702): every
// key is encoded by a top-κ sparse encoder (sparse_encoder.h) into at most κ
// (feature, activation) pairs, and each feature keeps a posting list of the
// positions where it fired with their activations. A query picks its
// features F_q with weights w_f, accumulates the co-activation score
//   score(t) = Σ_{f ∈ F_q ∩ F_t} w_f · a_{t,f} · idf(f)
// over the posting lists of F_q, takes the `candidates` best positions and
// reranks them with exact scores q·k (keys kept as given). SearchSpans()
// turns the same scores into spans of positions under a token budget.
//
// Query features (knob query_mode):
//   project  (default) w_f = q·W_dec[f], the contribution per unit activation
//            of feature f to q·x̂ (x̂ the key's reconstruction); F_q = the
//            query_features features with the largest positive w_f. The
//            co-activation score is then a truncation of q·x̂ to F_q: it
//            ranks keys as the reconstructed inner product would.
//   encode   F_q = the encoder's own top-κ code of q with its activations as
//            w_f (the literal "encode the query with the SAE" of S³); meant
//            for encoders trained on keys and queries (train_queries=1).
// idf(f) = ln((1 + n) / (1 + df_f)) + 1 with df_f the posting-list length,
// when the knob idf=1; 1 otherwise (the default: it ranked worse on the
// attn-dev captures, docs/index_lrq.md).
//
// Knobs (SearchParams::knobs):
//   candidates      the effort knob: positions reranked exactly, >= 1,
//                   default 8·k, raised to k. When fewer positions were
//                   touched by the posting lists, the untouched eligible ones
//                   fill up, most recent first. At or above the number of
//                   eligible keys every key is scored exactly (no posting
//                   list is read): the flat result.
//   query_features  |F_q| in project mode, [1, F], default 128 (F if smaller).
//   query_mode      project | encode.
//   idf             0 | 1, default 0.
//   window          SearchSpans only: w of the ±w windows, [0, 65536], default 8.
// Stats, per query: visited += posting entries read; keys_scanned and
// exact_scores += keys scored exactly (the candidates).
//
// Storage: keys as given ([n, d], their dtype) for the rerank; per feature a
// posting list of delta-encoded positions (LEB128 varints of
// position − previous position − 1) and f16 activations; the encoder.
// Build params (BuildIndex): layer, kv_head (pick an encoder from a
// multi-encoder "sparse_encoder" artifact); without an artifact one is
// trained from the keys being indexed (plus the training queries when
// train_queries=1) with features (F, default 8·d), k (κ, default 8), epochs
// (default 10), batch_size (256), learning_rate (1e-3), seed (1).
// Format of Serialize(): docs/formats/inverted.md.

#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/progress.h"
#include "index/index_format.h"
#include "index/inverted/sparse_encoder.h"
#include "index/key_index.h"
#include "index/params.h"

namespace kvrecall::index::inverted {

struct InvertedOptions {
  // The encoder; when null, one is trained with `train` from the keys being
  // indexed (and the training queries when train_on_queries).
  std::shared_ptr<const SparseEncoder> encoder;
  // Training options when `encoder` is null (their num_threads and progress
  // are replaced by the fields below).
  SparseEncoderTrainOptions train;
  // Stack the training queries under the keys as training data. Default false.
  bool train_on_queries = false;
  // Threads for training and encoding; 0 = the default pool, 1 = caller only.
  int num_threads = 0;
  // Progress ("train", "encode"); may be empty; returning false cancels.
  ProgressCallback progress;

  // Options from BuildIndex's build params and artifacts ("sparse_encoder").
  // INVALID_ARGUMENT on unknown or bad params; DATA_LOSS / NOT_FOUND /
  // FAILED_PRECONDITION from parsing and selecting the encoder.
  static absl::StatusOr<InvertedOptions> FromBuild(
      const ParamMap& params, const std::vector<std::pair<std::string, std::string>>& artifacts);
};

// A span of positions [begin, end) and the sum of its positions' scores.
struct Span {
  int64_t begin = 0;
  int64_t end = 0;
  float score = 0;
};

struct SpanResult {
  std::vector<Span> spans;  // disjoint, in position order
  int64_t tokens = 0;       // Σ (end − begin) <= the budget
  SearchStats stats;        // visited = posting entries read
};

// Thread-compatible (see KeyIndex): const methods may run concurrently.
class InvertedIndex final : public KeyIndex {
 public:
  static constexpr absl::string_view kKind = "inverted";

  // Indexes `keys` [n, d] (f16, bf16 or f32). `training_queries` [m, d] are
  // used only to train an encoder with train_on_queries (may be empty).
  // INVALID_ARGUMENT on an encoder of another dimension, non-finite keys, or
  // no encoder and fewer than 2 training inputs; CANCELLED.
  static absl::StatusOr<std::unique_ptr<InvertedIndex>> Create(const VectorView& keys,
                                                              const VectorView& training_queries,
                                                              const InvertedOptions& options);

  // Restores Serialize() bytes (kind "inverted"). DATA_LOSS on corrupt bytes
  // (including posting lists that are not increasing or out of range);
  // FAILED_PRECONDITION on unsupported versions; INVALID_ARGUMENT for another kind.
  static absl::StatusOr<std::unique_ptr<InvertedIndex>> Load(absl::string_view bytes);
  static absl::StatusOr<std::unique_ptr<InvertedIndex>> Load(const IndexHeader& header,
                                                            absl::string_view payload);

  absl::string_view kind() const override { return kKind; }
  int32_t dim() const override { return encoder_->dim(); }
  int64_t size() const override { return size_; }

  // Encodes and appends to the posting lists. INVALID_ARGUMENT when
  // keys.dim != dim(), the dtype differs, or a key is not finite; the index
  // is unchanged then.
  absl::Status Add(const VectorView& keys) override;

  absl::StatusOr<SearchResult> Search(const VectorView& queries, int32_t k,
                                      const SearchParams& params) const override;

  // Span retrieval: token scores are the co-activation scores summed over the
  // query rows; the window score of t is the sum of token scores over
  // [t − w, t + w]; positions are taken greedily by descending window score,
  // each adding the uncovered eligible positions of its window nearest to it
  // first, until `budget_tokens` positions are covered or no position with a
  // positive score is left. Covered positions are merged into maximal spans
  // (excluded positions split them). Knobs: query_features, query_mode, idf,
  // window. INVALID_ARGUMENT on bad queries or knobs or budget_tokens < 0.
  absl::StatusOr<SpanResult> SearchSpans(const VectorView& queries, int64_t budget_tokens,
                                         const SearchParams& params) const;

  absl::string_view SearchEffortKnob() const override { return "candidates"; }
  // size(): every key is reranked exactly.
  int64_t MaxSearchEffort() const override { return size_; }

  // Posting lists plus the encoder's weights.
  int64_t IndexBytes() const override;
  int64_t KeyBytes() const override { return static_cast<int64_t>(keys_.size()); }
  const ParamMap& build_params() const override { return build_params_; }
  absl::StatusOr<std::string> Serialize() const override;

  const SparseEncoder& encoder() const { return *encoder_; }
  std::shared_ptr<const SparseEncoder> shared_encoder() const { return encoder_; }
  // Posting entries (Σ list lengths) and their bytes (varints + f16).
  int64_t posting_entries() const { return posting_entries_; }
  int64_t PostingBytes() const;
  DType key_dtype() const { return dtype_; }

 private:
  struct PostingList {
    std::string deltas;          // LEB128 varints: position − previous − 1 (previous of the first = −1)
    std::vector<uint16_t> acts;  // f16 activations, one per entry
    int64_t last = -1;           // last position appended
  };
  struct QueryKnobs;

  InvertedIndex(std::shared_ptr<const SparseEncoder> encoder, DType dtype, ParamMap build_params);

  absl::Status AppendRows(const VectorView& keys, int num_threads,
                          const ProgressCallback& progress, double progress_from);
  absl::StatusOr<QueryKnobs> ParseQueryKnobs(const ParamMap& knobs,
                                             std::initializer_list<absl::string_view> extra) const;
  // Co-activation scores of one query into acc (dense [size_]) and the
  // positions touched (flag set in `mark`); returns posting entries read.
  //   q: [dim()] f32; acc: [size_] f32, zero on entry for untouched positions
  int64_t Accumulate(const float* q, const QueryKnobs& knobs, float* acc, char* mark,
                     std::vector<int64_t>* touched, std::vector<float>* scratch) const;

  std::shared_ptr<const SparseEncoder> encoder_;
  DType dtype_;
  ParamMap build_params_;
  int64_t size_ = 0;
  int64_t posting_entries_ = 0;
  std::vector<char> keys_;  // [size_, d] elements of dtype_, row-major
  std::vector<PostingList> postings_;  // [F]
};

}  // namespace kvrecall::index::inverted
