#pragma once

// Test helpers shared by the key-index tests: an owned matrix of keys or
// queries in any dtype, the brute-force top-k that defines "exact", recall
// against it, and search knobs from text.

#include <cstdint>
#include <string>
#include <vector>

#include "common/types.h"
#include "index/key_index.h"

namespace kvrecall::index {

// Rows of `dim` elements of `dtype`, owned. Value type.
struct KeyMatrix {
  std::vector<char> bytes;  // [rows, dim] of dtype
  int64_t rows = 0;
  int32_t dim = 0;
  DType dtype = DType::kF32;
  VectorView view() const { return VectorView{bytes.data(), rows, dim, dtype, 0}; }
  VectorView slice(int64_t begin, int64_t end) const {
    return VectorView{bytes.data() + begin * dim * DTypeSize(dtype), end - begin, dim, dtype, 0};
  }
};

// Every eligible key scored with DotRow, sorted by (score desc, position
// asc), the first k; -1 / -inf padding. The definition of the exact result.
SearchResult BruteForceTopK(const KeyMatrix& keys, const KeyMatrix& queries, int32_t k,
                            const std::vector<PositionRange>& exclude);

// Share of `want`'s ids that `got` returns, over all queries.
double RecallOf(const SearchResult& got, const SearchResult& want);

// SearchParams whose knobs are `text` ("key=value,..."). REQUIRES: parses.
SearchParams SearchKnobs(const std::string& text);

}  // namespace kvrecall::index
