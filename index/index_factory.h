#pragma once

// Building and loading key indexes by kind name.

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "common/progress.h"
#include "index/key_index.h"
#include "index/params.h"

namespace kvrecall::index {

struct BuildOptions {
  // Kind-specific build parameters (documented per kind in docs/formats/ and
  // the kind's header); unknown keys are INVALID_ARGUMENT.
  ParamMap params;
  // Named calibration artifacts the kind may need, as bytes: "loki_basis"
  // (index/loki/pca_basis.h), "sparse_encoder" (index/inverted/sparse_encoder.h).
  // A kind that needs one and gets none fits it from the keys it indexes.
  std::vector<std::pair<std::string, std::string>> artifacts;
  // Build threads; 0 = the default pool.
  int num_threads = 0;
  // Progress reports; may be empty. Returning false cancels (CANCELLED).
  ProgressCallback progress;
};

// The kinds BuildIndex knows, in a stable order.
std::vector<std::string> IndexKinds();

// Builds an index of `kind` over keys [n, d]. `training_queries` [m, d] are
// queries known to be like the ones that will be searched (prefill queries
// of the context); kinds that do not use them ignore them; may be empty.
// INVALID_ARGUMENT for an unknown kind (listing the known ones) or bad params.
absl::StatusOr<std::unique_ptr<KeyIndex>> BuildIndex(absl::string_view kind,
                                                     const VectorView& keys,
                                                     const VectorView& training_queries,
                                                     const BuildOptions& options);

// Restores an index from KeyIndex::Serialize() bytes. DATA_LOSS on a bad
// magic, checksum or truncated payload; FAILED_PRECONDITION on an
// unsupported format version.
absl::StatusOr<std::unique_ptr<KeyIndex>> LoadIndex(absl::string_view bytes);

}  // namespace kvrecall::index
