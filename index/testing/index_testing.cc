#include "index/testing/index_testing.h"

#include <algorithm>
#include <limits>
#include <set>
#include <utility>

#include "common/half.h"
#include "index/distance.h"
#include "index/params.h"

namespace kvrecall::index {

SearchResult BruteForceTopK(const KeyMatrix& keys, const KeyMatrix& queries, int32_t k,
                            const std::vector<PositionRange>& exclude) {
  SearchResult r;
  r.num_queries = queries.rows;
  r.k = k;
  std::vector<float> q(static_cast<size_t>(queries.dim));
  for (int64_t qi = 0; qi < queries.rows; ++qi) {
    ConvertToFloat(queries.view().row(qi), queries.dtype, q.size(), q.data());
    std::vector<std::pair<float, int64_t>> all;
    for (int64_t t = 0; t < keys.rows; ++t) {
      bool excluded = false;
      for (const PositionRange& e : exclude) excluded |= (t >= e.begin && t < e.end);
      if (!excluded) all.emplace_back(DotRow(q.data(), keys.view().row(t), keys.dtype, keys.dim), t);
    }
    std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    for (int32_t j = 0; j < k; ++j) {
      const bool have = j < static_cast<int32_t>(all.size());
      r.ids.push_back(have ? all[j].second : -1);
      r.scores.push_back(have ? all[j].first : -std::numeric_limits<float>::infinity());
    }
  }
  return r;
}

double RecallOf(const SearchResult& got, const SearchResult& want) {
  double hit = 0;
  for (int64_t qi = 0; qi < want.num_queries; ++qi) {
    std::set<int64_t> w(want.ids.begin() + qi * want.k, want.ids.begin() + (qi + 1) * want.k);
    for (int32_t j = 0; j < got.k; ++j) hit += w.count(got.ids[qi * got.k + j]);
  }
  return hit / (want.num_queries * want.k);
}

SearchParams SearchKnobs(const std::string& text) {
  SearchParams p;
  p.knobs = *ParamMap::Parse(text);
  return p;
}

}  // namespace kvrecall::index
