#include "index/index_factory.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "common/status_macros.h"
#include "index/faiss/faiss_index.h"
#include "index/flat/flat_index.h"
#include "index/index_format.h"
#include "index/inverted/inverted_index.h"
#include "index/loki/loki_index.h"
#include "index/quest/quest_index.h"
#include "index/roar/roar_index.h"

namespace kvrecall::index {
namespace {

template <typename T>
absl::StatusOr<std::unique_ptr<KeyIndex>> AsKeyIndex(absl::StatusOr<std::unique_ptr<T>> index) {
  if (!index.ok()) return std::move(index).status();
  return std::unique_ptr<KeyIndex>(std::move(index).value());
}

}  // namespace

// Adding a kind: one entry here, one branch in BuildIndex and one in
// LoadIndex.
std::vector<std::string> IndexKinds() {
  return {"flat", "roar", "faiss_hnsw", "faiss_ivf", "loki", "quest", "inverted"};
}

absl::StatusOr<std::unique_ptr<KeyIndex>> BuildIndex(absl::string_view kind,
                                                     const VectorView& keys,
                                                     const VectorView& training_queries,
                                                     const BuildOptions& options) {
  if (kind == "flat") {
    KVR_ASSIGN_OR_RETURN(FlatOptions o, FlatOptions::FromParams(options.params));
    return AsKeyIndex(FlatIndex::Build(keys, o));
  }
  if (kind == "roar") {
    KVR_ASSIGN_OR_RETURN(RoarOptions o, RoarOptions::FromParams(options.params));
    o.num_threads = options.num_threads;
    o.progress = options.progress;
    return AsKeyIndex(RoarIndex::Build(keys, training_queries, o));
  }
  if (kind == "faiss_hnsw" || kind == "faiss_ivf") {
    KVR_ASSIGN_OR_RETURN(FaissOptions o, FaissOptions::FromParams(kind, options.params));
    o.num_threads = options.num_threads;
    o.progress = options.progress;
    return AsKeyIndex(FaissIndex::Build(keys, o));
  }
  if (kind == "loki") {
    KVR_ASSIGN_OR_RETURN(loki::LokiOptions o,
                         loki::LokiOptions::FromBuild(options.params, options.artifacts));
    o.num_threads = options.num_threads;
    o.progress = options.progress;
    return AsKeyIndex(loki::LokiIndex::Create(keys, o));
  }
  if (kind == "quest") {
    KVR_ASSIGN_OR_RETURN(quest::QuestOptions o, quest::QuestOptions::FromBuild(options.params));
    o.num_threads = options.num_threads;
    o.progress = options.progress;
    return AsKeyIndex(quest::QuestIndex::Create(keys, o));
  }
  if (kind == "inverted") {
    KVR_ASSIGN_OR_RETURN(inverted::InvertedOptions o,
                         inverted::InvertedOptions::FromBuild(options.params, options.artifacts));
    o.num_threads = options.num_threads;
    o.progress = options.progress;
    return AsKeyIndex(inverted::InvertedIndex::Create(keys, training_queries, o));
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown index kind '", kind,
                                                 "'; known kinds: ",
                                                 absl::StrJoin(IndexKinds(), ", ")));
}

absl::StatusOr<std::unique_ptr<KeyIndex>> LoadIndex(absl::string_view bytes) {
  KVR_ASSIGN_OR_RETURN(auto decoded, DecodeIndex(bytes));
  const IndexHeader& header = decoded.first;
  const absl::string_view payload = decoded.second;
  if (header.kind == "flat") return AsKeyIndex(FlatIndex::Load(header, payload));
  if (header.kind == "roar") return AsKeyIndex(RoarIndex::Load(header, payload));
  if (header.kind == "faiss_hnsw" || header.kind == "faiss_ivf") {
    return AsKeyIndex(FaissIndex::Load(header, payload));
  }
  if (header.kind == "loki") return AsKeyIndex(loki::LokiIndex::Load(header, payload));
  if (header.kind == "quest") return AsKeyIndex(quest::QuestIndex::Load(header, payload));
  if (header.kind == "inverted") return AsKeyIndex(inverted::InvertedIndex::Load(header, payload));
  return absl::FailedPreconditionError(absl::StrCat(
      "index kind '", header.kind, "' is not supported by this build; known kinds: ",
      absl::StrJoin(IndexKinds(), ", ")));
}

}  // namespace kvrecall::index
