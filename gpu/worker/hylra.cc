#include "gpu/worker/hylra.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <thread>
#include <utility>

#include <nlohmann/json.hpp>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "common/half.h"
#include "common/npy.h"
#include "common/status_macros.h"
#include "common/thread_pool.h"

namespace kvrecall::worker {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

LayerMatrix NanMatrix(size_t n) { return LayerMatrix(n, std::vector<double>(n, kNaN)); }

// --- capture files --------------------------------------------------------------

std::string CapturePath(const std::string& dir, int32_t layer, absl::string_view what) {
  return absl::StrFormat("%s/layer%02d_%s.npy", dir, layer, what);
}

// A [heads, tokens, dim] array of f16 or f32 as floats.
absl::StatusOr<std::vector<float>> ReadFloat3(const std::string& path, std::vector<int64_t>* shape) {
  KVR_ASSIGN_OR_RETURN(NpyArray a, ReadNpy(path));
  if (a.shape.size() != 3) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": expected 3 dimensions [heads, tokens, head_dim], got ",
                     a.shape.size()));
  }
  std::vector<float> out(static_cast<size_t>(a.num_elements()));
  if (a.descr == "<f4") {
    std::memcpy(out.data(), a.data.data(), out.size() * sizeof(float));
  } else if (a.descr == "<f2") {
    ConvertToFloat(a.data.data(), DType::kF16, out.size(), out.data());
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": dtype ", a.descr, " (need float16 or float32)"));
  }
  *shape = a.shape;
  return out;
}

absl::StatusOr<CaptureLayer> ReadCaptureLayer(const std::string& dir, int32_t layer) {
  CaptureLayer c;
  c.layer = layer;
  std::vector<int64_t> qs, ks, vs;
  for (absl::string_view what : {"q", "k", "v"}) {
    const std::string path = CapturePath(dir, layer, what);
    if (!std::filesystem::exists(path)) {
      return absl::NotFoundError(absl::StrCat(path, " is missing (layer ", layer,
                                              " needs q, k and v captures)"));
    }
  }
  KVR_ASSIGN_OR_RETURN(c.q, ReadFloat3(CapturePath(dir, layer, "q"), &qs));
  KVR_ASSIGN_OR_RETURN(c.k, ReadFloat3(CapturePath(dir, layer, "k"), &ks));
  KVR_ASSIGN_OR_RETURN(c.v, ReadFloat3(CapturePath(dir, layer, "v"), &vs));
  if (ks != vs || qs[1] != ks[1] || qs[2] != ks[2]) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "layer %d in %s: shapes q [%s], k [%s], v [%s] disagree (q [Hq, T, d], k and v "
        "[Hkv, T, d])",
        layer, dir, absl::StrJoin(qs, ", "), absl::StrJoin(ks, ", "), absl::StrJoin(vs, ", ")));
  }
  c.num_q_heads = static_cast<int32_t>(qs[0]);
  c.num_kv_heads = static_cast<int32_t>(ks[0]);
  c.num_tokens = ks[1];
  c.head_dim = static_cast<int32_t>(ks[2]);
  return c;
}

absl::Status CheckLayerShape(const CaptureLayer& c, const std::string& set) {
  auto bad = [&](absl::string_view m) {
    return absl::InvalidArgumentError(absl::StrCat(set, " layer ", c.layer, ": ", m));
  };
  if (c.num_q_heads < 1 || c.num_kv_heads < 1 || c.num_tokens < 1 || c.head_dim < 1) {
    return bad("empty capture");
  }
  if (c.num_q_heads % c.num_kv_heads != 0) {
    return bad(absl::StrCat(c.num_q_heads, " query heads are not a multiple of ", c.num_kv_heads,
                            " KV heads"));
  }
  const size_t qn = static_cast<size_t>(c.num_q_heads) * c.num_tokens * c.head_dim;
  const size_t kn = static_cast<size_t>(c.num_kv_heads) * c.num_tokens * c.head_dim;
  if (c.q.size() != qn || c.k.size() != kn || c.v.size() != kn) {
    return bad("q, k or v size does not match the shape");
  }
  return absl::OkStatus();
}

// --- math -------------------------------------------------------------------------

inline float Dot(const float* a, const float* b, int32_t d) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int32_t i = 0;
  for (; i + 8 <= d; i += 8) {
    for (int u = 0; u < 8; ++u) s[u] += a[i + u] * b[i + u];
  }
  float r = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; i < d; ++i) r += a[i] * b[i];
  return r;
}

double Quantile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return kNaN;
  const double pos = q * static_cast<double>(sorted.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(pos));
  const size_t hi = std::min(sorted.size() - 1, lo + 1);
  return sorted[lo] + (pos - static_cast<double>(lo)) * (sorted[hi] - sorted[lo]);
}

// Mean after clipping to [Q1 - 1.5 IQR, Q3 + 1.5 IQR].
double IqrClippedMean(std::vector<double> v) {
  if (v.empty()) return kNaN;
  std::vector<double> sorted = v;
  std::sort(sorted.begin(), sorted.end());
  const double q1 = Quantile(sorted, 0.25), q3 = Quantile(sorted, 0.75);
  const double lo = q1 - 1.5 * (q3 - q1), hi = q3 + 1.5 * (q3 - q1);
  double sum = 0;
  for (double x : v) sum += std::clamp(x, lo, hi);
  return sum / static_cast<double>(v.size());
}

// --- the per-step work ------------------------------------------------------------

// What one step measured at layer j against layers 0..j (index i), per q head.
struct StepResult {
  std::vector<double> overlap;  // [(j + 1) * Hq]
  std::vector<double> mass;
  std::vector<double> error;
  double ratio90 = 0;
};

// Positions [0, SinksEnd) and [WindowBegin, n) are always attended at a
// step with n keys; the top-k comes from the candidates between them.
int64_t SinksEnd(const HylraProfileOptions& o, int64_t n) { return std::min<int64_t>(o.sinks, n); }
int64_t WindowBegin(const HylraProfileOptions& o, int64_t n) {
  return std::max<int64_t>(SinksEnd(o, n), n - o.window);
}
int64_t SelectedCount(const HylraProfileOptions& o, int64_t n) {
  return std::min<int64_t>(o.budget.Resolve(n), WindowBegin(o, n) - SinksEnd(o, n));
}

// Selected positions, sorted: sets[layer index][step][q head].
using Selections = std::vector<std::vector<std::vector<std::vector<int32_t>>>>;

struct LayerJob {
  const CaptureLayer* layer;
  int32_t j;  // index of this layer in the profile
  const std::vector<int64_t>* steps;
  const HylraProfileOptions* options;
  Selections* selections;  // [0, j] read, [j] written per step
};

void ProfileStep(const LayerJob& job, size_t s, StepResult* out) {
  const CaptureLayer& c = *job.layer;
  const HylraProfileOptions& o = *job.options;
  const int64_t t = (*job.steps)[s];
  const int64_t n = t + 1;
  const int32_t hq = c.num_q_heads, d = c.head_dim;
  const int32_t group = hq / c.num_kv_heads;
  const int32_t j = job.j;
  const int64_t sinks_end = SinksEnd(o, n);
  const int64_t window_begin = WindowBegin(o, n);
  const int64_t num_candidates = window_begin - sinks_end;
  const int64_t k = SelectedCount(o, n);
  const int64_t num_blocks = (n + o.block_tokens - 1) / o.block_tokens;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));

  out->overlap.assign(static_cast<size_t>((j + 1) * hq), kNaN);
  out->mass.assign(out->overlap.size(), kNaN);
  out->error.assign(out->overlap.size(), kNaN);
  std::vector<float> logits(static_cast<size_t>(n));
  std::vector<double> p(static_cast<size_t>(n));
  std::vector<double> o_full(d), o_fixed(d), o_x(d);
  std::vector<int32_t> order(static_cast<size_t>(num_candidates));
  std::vector<double> block_mass(static_cast<size_t>(num_blocks));
  double ratio_sum = 0;

  for (int32_t h = 0; h < hq; ++h) {
    const int32_t g = h / group;
    const float* q = c.q.data() + (static_cast<int64_t>(h) * c.num_tokens + t) * d;
    const float* keys = c.k.data() + static_cast<int64_t>(g) * c.num_tokens * d;
    const float* values = c.v.data() + static_cast<int64_t>(g) * c.num_tokens * d;
    float max_logit = -std::numeric_limits<float>::infinity();
    for (int64_t pos = 0; pos < n; ++pos) {
      logits[pos] = Dot(q, keys + pos * d, d) * scale;
      max_logit = std::max(max_logit, logits[pos]);
    }
    double z = 0;
    for (int64_t pos = 0; pos < n; ++pos) z += p[pos] = std::exp(double(logits[pos]) - max_logit);
    std::fill(o_full.begin(), o_full.end(), 0.0);
    for (int64_t pos = 0; pos < n; ++pos) {
      p[pos] /= z;
      const double w = p[pos];
      const float* v = values + pos * d;
      for (int32_t x = 0; x < d; ++x) o_full[x] += w * v[x];
    }
    double full_norm = 0;
    for (double x : o_full) full_norm += x * x;
    full_norm = std::sqrt(full_norm);

    // Sinks and window: always attended.
    std::fill(o_fixed.begin(), o_fixed.end(), 0.0);
    double fixed_mass = 0;
    auto add_fixed = [&](int64_t pos) {
      fixed_mass += p[pos];
      const float* v = values + pos * d;
      for (int32_t x = 0; x < d; ++x) o_fixed[x] += p[pos] * v[x];
    };
    for (int64_t pos = 0; pos < sinks_end; ++pos) add_fixed(pos);
    for (int64_t pos = window_begin; pos < n; ++pos) add_fixed(pos);

    // This layer's own top-k of the candidates (ties: the lower position).
    std::iota(order.begin(), order.end(), static_cast<int32_t>(sinks_end));
    auto better = [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    };
    if (k < num_candidates) {
      std::nth_element(order.begin(), order.begin() + k, order.end(), better);
    }
    std::vector<int32_t>& own = (*job.selections)[j][s][h];
    own.assign(order.begin(), order.begin() + k);
    std::sort(own.begin(), own.end());
    double own_mass = 0;
    for (int32_t pos : own) own_mass += p[pos];

    for (int32_t i = 0; i <= j; ++i) {
      const std::vector<int32_t>& sel = (*job.selections)[i][s][h];
      const size_t idx = static_cast<size_t>(i * hq + h);
      size_t common = 0;
      for (size_t a = 0, b = 0; a < sel.size() && b < own.size();) {
        if (sel[a] == own[b]) {
          ++common, ++a, ++b;
        } else if (sel[a] < own[b]) {
          ++a;
        } else {
          ++b;
        }
      }
      out->overlap[idx] = own.empty() ? 1.0 : static_cast<double>(common) / own.size();
      double sel_mass = 0;
      o_x = o_fixed;
      for (int32_t pos : sel) {
        sel_mass += p[pos];
        const float* v = values + static_cast<int64_t>(pos) * d;
        for (int32_t x = 0; x < d; ++x) o_x[x] += p[pos] * v[x];
      }
      out->mass[idx] = own_mass > 0 ? sel_mass / own_mass : 1.0;
      const double attended = fixed_mass + sel_mass;
      double diff = 0;
      for (int32_t x = 0; x < d; ++x) {
        const double e = (attended > 0 ? o_x[x] / attended : 0.0) - o_full[x];
        diff += e * e;
      }
      out->error[idx] = full_norm > 0 ? std::sqrt(diff) / full_norm : 0.0;
    }

    // ratio90 of the KV group: blocks summed over the group's heads.
    if (h % group == 0) std::fill(block_mass.begin(), block_mass.end(), 0.0);
    for (int64_t pos = 0; pos < n; ++pos) block_mass[pos / o.block_tokens] += p[pos];
    if (h % group == group - 1) {
      std::vector<double> sorted = block_mass;
      std::sort(sorted.begin(), sorted.end(), std::greater<double>());
      const double target = o.mass_fraction * group * (1.0 - 1e-12);
      double cum = 0;
      int64_t needed = 0;
      while (needed < num_blocks && cum < target) cum += sorted[needed++];
      ratio_sum += static_cast<double>(needed) / num_blocks;
    }
  }
  out->ratio90 = ratio_sum / c.num_kv_heads;
}

double MergeHeads(const std::vector<double>& per_head, bool larger_is_worse, HeadMerge merge) {
  if (merge == HeadMerge::kMean) {
    return std::accumulate(per_head.begin(), per_head.end(), 0.0) / per_head.size();
  }
  return larger_is_worse ? *std::max_element(per_head.begin(), per_head.end())
                         : *std::min_element(per_head.begin(), per_head.end());
}

absl::Status ValidateProfileOptions(const HylraProfileOptions& o) {
  auto bad = [](absl::string_view m) { return absl::InvalidArgumentError(m); };
  if (o.budget.empty()) return bad("profile: a budget (k or a fraction) is required");
  if (o.budget.k < 0 || o.budget.fraction < 0 || o.budget.fraction > 1 ||
      (o.budget.k > 0 && o.budget.fraction > 0)) {
    return bad("profile: the budget is k >= 1 or a fraction in (0, 1], not both");
  }
  if (o.sinks < 0) return bad(absl::StrCat("profile: sinks must be >= 0, got ", o.sinks));
  if (o.window < 1) return bad(absl::StrCat("profile: window must be >= 1, got ", o.window));
  if (o.block_tokens < 1) {
    return bad(absl::StrCat("profile: block_tokens must be >= 1, got ", o.block_tokens));
  }
  if (!(o.mass_fraction > 0 && o.mass_fraction <= 1)) {
    return bad(absl::StrCat("profile: mass_fraction must be in (0, 1], got ", o.mass_fraction));
  }
  if (o.threads < 0) return bad(absl::StrCat("profile: threads must be >= 0, got ", o.threads));
  return absl::OkStatus();
}

// Serialises progress reports so that `fraction` never decreases.
// Thread-safe.
class ProgressReporter {
 public:
  ProgressReporter(const ProgressCallback& callback, int64_t total_units)
      : callback_(callback), total_units_(static_cast<double>(std::max<int64_t>(1, total_units))) {}

  // Adds `units` finished (of total_units) and reports; false when cancelled.
  bool Report(const std::string& stage, int64_t done, int64_t total, double units) {
    absl::MutexLock lock(&mu_);
    units_done_ += units;
    if (cancelled_) return false;
    if (!callback_) return true;
    Progress p;
    p.stage = stage;
    p.done = done;
    p.total = total;
    p.fraction = std::min(1.0, static_cast<double>(units_done_) / total_units_);
    if (!callback_(p)) cancelled_ = true;
    return !cancelled_;
  }
  bool cancelled() {
    absl::MutexLock lock(&mu_);
    return cancelled_;
  }

 private:
  const ProgressCallback& callback_;
  const double total_units_;
  absl::Mutex mu_;
  double units_done_ ABSL_GUARDED_BY(mu_) = 0;
  bool cancelled_ ABSL_GUARDED_BY(mu_) = false;
};

absl::StatusOr<HylraProfile> ProfileOne(const CaptureSet& set, const HylraProfileOptions& o,
                                        ThreadPool* pool, int32_t threads,
                                        ProgressReporter& progress) {
  const absl::Time start = absl::Now();
  HylraProfile prof;
  prof.name = set.name;
  prof.layers = set.layers;
  const size_t nl = set.layers.size();
  prof.overlap = NanMatrix(nl);
  prof.mass = NanMatrix(nl);
  prof.error = NanMatrix(nl);
  prof.ratio90.assign(nl, kNaN);
  prof.own_error.assign(nl, kNaN);
  Selections selections(nl);
  for (size_t j = 0; j < nl; ++j) {
    const int32_t layer_no = set.layers[j];
    if (!progress.Report(absl::StrCat("read layer ", layer_no), 0, 0, 0)) {
      return absl::CancelledError("profiling cancelled");
    }
    KVR_ASSIGN_OR_RETURN(CaptureLayer c, set.read(layer_no));
    c.layer = layer_no;
    KVR_RETURN_IF_ERROR(CheckLayerShape(c, set.name));
    if (j == 0) {
      prof.num_q_heads = c.num_q_heads;
      prof.num_kv_heads = c.num_kv_heads;
      prof.head_dim = c.head_dim;
      prof.num_tokens = c.num_tokens;
      KVR_ASSIGN_OR_RETURN(prof.steps, o.steps.Resolve(c.num_tokens));
      prof.k_last_step = SelectedCount(o, prof.steps.back() + 1);
    } else if (c.num_q_heads != prof.num_q_heads || c.num_kv_heads != prof.num_kv_heads ||
               c.head_dim != prof.head_dim || c.num_tokens != prof.num_tokens) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s layer %d: [%d q heads, %d kv heads, %d tokens, d=%d] differs from layer %d's "
          "[%d, %d, %d, %d]",
          set.name, layer_no, c.num_q_heads, c.num_kv_heads, c.num_tokens, c.head_dim,
          set.layers[0], prof.num_q_heads, prof.num_kv_heads, prof.num_tokens, prof.head_dim));
    }
    const size_t ns = prof.steps.size();
    selections[j].assign(ns, std::vector<std::vector<int32_t>>(c.num_q_heads));
    std::vector<StepResult> results(ns);
    LayerJob job{&c, static_cast<int32_t>(j), &prof.steps, &o, &selections};
    std::atomic<int64_t> steps_done{0};
    const std::string stage = absl::StrCat("layer ", layer_no);
    auto run = [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        if (progress.cancelled()) return;
        ProfileStep(job, static_cast<size_t>(s), &results[static_cast<size_t>(s)]);
        const int64_t done = steps_done.fetch_add(1) + 1;
        progress.Report(stage, done, static_cast<int64_t>(ns), 1.0 / static_cast<double>(ns));
      }
    };
    if (pool != nullptr) {
      pool->ParallelFor(static_cast<int64_t>(ns), 1, run, threads);
    } else {
      run(0, static_cast<int64_t>(ns));
    }
    if (progress.cancelled()) return absl::CancelledError("profiling cancelled");

    // Average over steps (in step order: deterministic), merge over heads.
    const int32_t hq = c.num_q_heads;
    const bool conservative = o.head_merge == HeadMerge::kMin;
    for (size_t i = 0; i <= j; ++i) {
      std::vector<double> ov(hq, 0.0), ma(hq, 0.0), er(hq, 0.0);
      for (const StepResult& r : results) {
        for (int32_t h = 0; h < hq; ++h) {
          const size_t idx = i * hq + h;
          ov[h] += r.overlap[idx];
          ma[h] += r.mass[idx];
          er[h] += r.error[idx];
        }
      }
      for (int32_t h = 0; h < hq; ++h) {
        ov[h] /= ns;
        ma[h] /= ns;
        er[h] /= ns;
      }
      prof.overlap[i][j] = MergeHeads(ov, false, o.head_merge);
      prof.mass[i][j] = MergeHeads(ma, false, o.head_merge);
      prof.error[i][j] = MergeHeads(er, conservative, o.head_merge);
    }
    std::vector<double> ratios;
    ratios.reserve(ns);
    for (const StepResult& r : results) ratios.push_back(r.ratio90);
    prof.ratio90[j] = IqrClippedMean(std::move(ratios));
    prof.own_error[j] = prof.error[j][j];
  }
  prof.seconds = absl::ToDoubleSeconds(absl::Now() - start);
  return prof;
}

// --- planning helpers --------------------------------------------------------------

// (worst, total) compared lexicographically.
struct Objective {
  double worst = -std::numeric_limits<double>::infinity();
  double total = -std::numeric_limits<double>::infinity();
  bool valid = false;

  bool BetterThan(const Objective& other) const {
    if (!valid) return false;
    if (!other.valid) return true;
    if (worst != other.worst) return worst > other.worst;
    return total > other.total;
  }
};

std::string RoleWord(const LayerSpec& s) {
  switch (s.role) {
    case LayerRole::kFull:
      return s.budget.empty() ? "full" : "full+topk";
    case LayerRole::kSelect:
      return "select";
    case LayerRole::kReuse:
      return absl::StrCat("reuse(", s.source, ")");
  }
  return "?";
}

nlohmann::ordered_json MatrixJson(const LayerMatrix& m) {
  nlohmann::ordered_json rows = nlohmann::ordered_json::array();
  for (const auto& row : m) {
    nlohmann::ordered_json r = nlohmann::ordered_json::array();
    for (double x : row) {
      if (std::isnan(x)) {
        r.push_back(nullptr);
      } else {
        r.push_back(x);
      }
    }
    rows.push_back(std::move(r));
  }
  return rows;
}

nlohmann::ordered_json VectorJson(const std::vector<double>& v) {
  nlohmann::ordered_json a = nlohmann::ordered_json::array();
  for (double x : v) {
    if (std::isnan(x)) {
      a.push_back(nullptr);
    } else {
      a.push_back(x);
    }
  }
  return a;
}

std::string MatrixText(const LayerMatrix& m, const std::vector<int32_t>& labels) {
  std::string out = absl::StrFormat("  %6s", "i \\ j");
  for (int32_t l : labels) absl::StrAppend(&out, absl::StrFormat(" %7s", absl::StrCat("L", l)));
  absl::StrAppend(&out, "\n");
  for (size_t i = 0; i < m.size(); ++i) {
    absl::StrAppend(&out, absl::StrFormat("  %6s", absl::StrCat("L", labels[i])));
    for (size_t j = 0; j < m[i].size(); ++j) {
      absl::StrAppend(&out, std::isnan(m[i][j]) ? absl::StrFormat(" %7s", "-")
                                                : absl::StrFormat(" %7.3f", m[i][j]));
    }
    absl::StrAppend(&out, "\n");
  }
  return out;
}

}  // namespace

// --- captures and steps --------------------------------------------------------------

absl::StatusOr<CaptureSet> CaptureSetFromDirectory(const std::string& dir) {
  std::error_code ec;
  if (!std::filesystem::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat(dir, " is not a directory"));
  }
  std::vector<int32_t> layers;
  for (const auto& entry : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    absl::string_view v = name;
    int32_t layer;
    if (absl::ConsumePrefix(&v, "layer") && absl::ConsumeSuffix(&v, "_k.npy") &&
        absl::SimpleAtoi(v, &layer) && layer >= 0) {
      layers.push_back(layer);
    }
  }
  if (ec) return absl::NotFoundError(absl::StrCat("cannot read ", dir, ": ", ec.message()));
  if (layers.empty()) {
    return absl::NotFoundError(absl::StrCat("no layerLL_k.npy captures in ", dir));
  }
  std::sort(layers.begin(), layers.end());
  layers.erase(std::unique(layers.begin(), layers.end()), layers.end());
  CaptureSet set;
  set.name = dir;
  set.layers = std::move(layers);
  set.read = [dir](int32_t layer) { return ReadCaptureLayer(dir, layer); };
  return set;
}

CaptureSet CaptureSetFromLayers(std::string name, std::vector<CaptureLayer> layers) {
  auto shared = std::make_shared<const std::vector<CaptureLayer>>(std::move(layers));
  CaptureSet set;
  set.name = std::move(name);
  for (const CaptureLayer& c : *shared) set.layers.push_back(c.layer);
  set.read = [shared](int32_t layer) -> absl::StatusOr<CaptureLayer> {
    for (const CaptureLayer& c : *shared) {
      if (c.layer == layer) return c;
    }
    return absl::NotFoundError(absl::StrCat("layer ", layer, " is not captured"));
  };
  return set;
}

absl::StatusOr<std::vector<int64_t>> StepSelection::Resolve(int64_t num_tokens) const {
  std::vector<int64_t> out;
  if (kind == Kind::kList) {
    if (positions.empty()) return absl::InvalidArgumentError("steps: no positions listed");
    for (int64_t p : positions) {
      if (p < 0 || p >= num_tokens) {
        return absl::InvalidArgumentError(absl::StrCat("steps: position ", p, " is outside [0, ",
                                                       num_tokens, ") of the capture"));
      }
      out.push_back(p);
    }
    std::sort(out.begin(), out.end());
    out.erase(std::unique(out.begin(), out.end()), out.end());
    return out;
  }
  if (count < 1) return absl::InvalidArgumentError(absl::StrCat("steps: count ", count, " < 1"));
  if (kind == Kind::kLast) {
    for (int64_t p = std::max<int64_t>(0, num_tokens - count); p < num_tokens; ++p) {
      out.push_back(p);
    }
    return out;
  }
  const int64_t half = num_tokens / 2;
  for (int64_t p = num_tokens - 1; p >= half; p -= count) out.push_back(p);
  std::reverse(out.begin(), out.end());
  return out;
}

std::string StepSelection::ToString() const {
  switch (kind) {
    case Kind::kLast:
      return absl::StrCat("last:", count);
    case Kind::kEvery:
      return absl::StrCat("every:", count);
    case Kind::kList:
      return absl::StrJoin(positions, ",");
  }
  return "";
}

absl::StatusOr<StepSelection> ParseStepSelection(absl::string_view text) {
  StepSelection s;
  absl::string_view v = absl::StripAsciiWhitespace(text);
  const bool last = absl::ConsumePrefix(&v, "last:");
  const bool every = !last && absl::ConsumePrefix(&v, "every:");
  auto bad = [&]() {
    return absl::InvalidArgumentError(absl::StrCat(
        "steps \"", text, "\": use last:N (the last N positions), every:S (every S-th position "
        "of the second half) or P,P,... (positions)"));
  };
  if (last || every) {
    if (!absl::SimpleAtoi(v, &s.count) || s.count < 1) return bad();
    s.kind = last ? StepSelection::Kind::kLast : StepSelection::Kind::kEvery;
    return s;
  }
  s.kind = StepSelection::Kind::kList;
  for (absl::string_view p : absl::StrSplit(v, ',', absl::SkipWhitespace())) {
    int64_t pos;
    if (!absl::SimpleAtoi(absl::StripAsciiWhitespace(p), &pos) || pos < 0) return bad();
    s.positions.push_back(pos);
  }
  if (s.positions.empty()) return bad();
  return s;
}

// --- profiling ------------------------------------------------------------------------

absl::StatusOr<std::vector<HylraProfile>> ProfileCaptures(const std::vector<CaptureSet>& captures,
                                                          const HylraProfileOptions& options) {
  KVR_RETURN_IF_ERROR(ValidateProfileOptions(options));
  if (captures.empty()) return absl::InvalidArgumentError("profile: no captures given");
  int64_t total_units = 0;
  for (const CaptureSet& set : captures) {
    if (set.layers.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("profile: ", set.name, " has no layers"));
    }
    for (size_t i = 1; i < set.layers.size(); ++i) {
      if (set.layers[i] <= set.layers[i - 1]) {
        return absl::InvalidArgumentError(
            absl::StrCat("profile: ", set.name, ": layers must be strictly increasing"));
      }
    }
    if (!set.read) return absl::InvalidArgumentError(absl::StrCat("profile: ", set.name, ": no reader"));
    total_units += static_cast<int64_t>(set.layers.size());  // one unit per layer profiled
  }
  int32_t threads = options.threads;
  if (threads == 0) threads = static_cast<int32_t>(std::max(1u, std::thread::hardware_concurrency()));
  std::unique_ptr<ThreadPool> pool;
  if (threads > 1) pool = std::make_unique<ThreadPool>(threads - 1);
  ProgressReporter progress(options.progress, total_units);
  std::vector<HylraProfile> out;
  for (const CaptureSet& set : captures) {
    KVR_ASSIGN_OR_RETURN(HylraProfile p, ProfileOne(set, options, pool.get(), threads, progress));
    out.push_back(std::move(p));
  }
  return out;
}

// --- the dynamic program ------------------------------------------------------------

absl::StatusOr<ReusePath> BestPathMinSum(const std::vector<LayerMatrix>& scores,
                                         int32_t max_compute,
                                         const std::vector<bool>& must_compute) {
  const size_t n = must_compute.size();
  if (n == 0) return absl::InvalidArgumentError("reuse DP: no layers");
  if (scores.empty()) return absl::InvalidArgumentError("reuse DP: no score matrices");
  for (const LayerMatrix& m : scores) {
    if (m.size() != n) {
      return absl::InvalidArgumentError(
          absl::StrCat("reuse DP: a score matrix has ", m.size(), " rows for ", n, " layers"));
    }
    for (const auto& row : m) {
      if (row.size() != n) return absl::InvalidArgumentError("reuse DP: score matrices must be square");
    }
  }
  int32_t forced = 0;
  for (size_t j = 0; j < n; ++j) forced += (j == 0 || must_compute[j]) ? 1 : 0;
  if (max_compute < forced) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_compute=", max_compute, " is below the ", forced,
                     " layers that must compute (layer 0 and the full layers)"));
  }
  const int32_t cmax = std::min<int32_t>(max_compute, static_cast<int32_t>(n));
  const double sets = static_cast<double>(scores.size());
  // Edge weights of reuse (i -> j): min and sum over captures.
  LayerMatrix wmin(n, std::vector<double>(n, 1.0)), wsum(n, std::vector<double>(n, sets));
  for (size_t i = 0; i < n; ++i) {
    for (size_t j = i + 1; j < n; ++j) {
      double mn = std::numeric_limits<double>::infinity(), sm = 0;
      for (const LayerMatrix& m : scores) {
        const double a = std::isnan(m[i][j]) ? 0.0 : m[i][j];
        mn = std::min(mn, a);
        sm += a;
      }
      wmin[i][j] = mn;
      wsum[i][j] = sm;
    }
  }
  // dp[j][i][c]: best over layers 0..j with current head i after c starts;
  // start_from[j][c]: the head of layer j-1 on the best path that starts a
  // segment at j with c starts.
  std::vector<std::vector<std::vector<Objective>>> dp(
      n, std::vector<std::vector<Objective>>(n, std::vector<Objective>(cmax + 1)));
  std::vector<std::vector<int32_t>> start_from(n, std::vector<int32_t>(cmax + 1, -1));
  dp[0][0][1] = Objective{1.0, sets, true};
  for (size_t j = 1; j < n; ++j) {
    if (!must_compute[j]) {
      for (size_t i = 0; i < j; ++i) {
        for (int32_t c = 1; c <= cmax; ++c) {
          const Objective& prev = dp[j - 1][i][c];
          if (!prev.valid) continue;
          dp[j][i][c] = Objective{std::min(prev.worst, wmin[i][j]), prev.total + wsum[i][j], true};
        }
      }
    }
    for (int32_t c = 2; c <= cmax; ++c) {
      Objective best;
      int32_t from = -1;
      for (size_t i = 0; i < j; ++i) {
        const Objective& prev = dp[j - 1][i][c - 1];
        if (!prev.valid) continue;
        const Objective cand{std::min(prev.worst, 1.0), prev.total + sets, true};
        if (cand.BetterThan(best)) {
          best = cand;
          from = static_cast<int32_t>(i);
        }
      }
      dp[j][j][c] = best;
      start_from[j][c] = from;
    }
  }
  Objective best;
  int32_t head = -1, used = 0;
  for (int32_t c = 1; c <= cmax; ++c) {  // fewer starts first: ties keep the cheaper path
    for (size_t i = 0; i < n; ++i) {
      if (dp[n - 1][i][c].BetterThan(best)) {
        best = dp[n - 1][i][c];
        head = static_cast<int32_t>(i);
        used = c;
      }
    }
  }
  if (!best.valid) return absl::InternalError("reuse DP: no feasible path");
  ReusePath path;
  path.source.assign(n, 0);
  path.worst = best.worst;
  path.total = best.total;
  path.num_compute = used;
  int32_t c = used;
  for (int32_t j = static_cast<int32_t>(n) - 1; j >= 0; --j) {
    path.source[static_cast<size_t>(j)] = head;
    if (j == head && j > 0) {
      head = start_from[static_cast<size_t>(j)][c];
      --c;
    }
  }
  return path;
}

// --- planning -------------------------------------------------------------------------

absl::StatusOr<HylraPlan> PlanHylraPolicy(const std::vector<HylraProfile>& profiles,
                                          const HylraPlanOptions& o) {
  auto bad = [](absl::string_view m) { return absl::InvalidArgumentError(m); };
  if (profiles.empty()) return bad("plan: no profiles");
  const std::vector<int32_t>& captured = profiles[0].layers;
  const size_t nc = captured.size();
  for (const HylraProfile& p : profiles) {
    if (p.layers != captured) {
      return bad(absl::StrCat("plan: captures of different layers (", p.name, ": ",
                              absl::StrJoin(p.layers, ","), "; ", profiles[0].name, ": ",
                              absl::StrJoin(captured, ","), ")"));
    }
  }
  if (o.max_compute < 1) return bad(absl::StrCat("plan: max_compute must be >= 1, got ", o.max_compute));
  if (o.n_full < 0) return bad(absl::StrCat("plan: n_full must be >= 0, got ", o.n_full));
  if (o.n_full > 0 && o.full_threshold > 0) {
    return bad("plan: give n_full or full_threshold, not both");
  }
  if (o.n_full > static_cast<int32_t>(nc)) {
    return bad(absl::StrCat("plan: n_full=", o.n_full, " exceeds the ", nc, " captured layers"));
  }
  std::vector<int32_t> map = o.layer_map.empty() ? captured : o.layer_map;
  if (map.size() != nc) {
    return bad(absl::StrCat("plan: layer_map has ", map.size(), " entries for ", nc,
                            " captured layers"));
  }
  for (size_t i = 0; i < nc; ++i) {
    if (map[i] < 0 || (i > 0 && map[i] <= map[i - 1])) {
      return bad("plan: layer_map must be strictly increasing and >= 0");
    }
  }
  const int32_t num_layers = o.num_layers > 0 ? o.num_layers : map.back() + 1;
  if (map.back() >= num_layers) {
    return bad(absl::StrCat("plan: captured layer mapped to ", map.back(), " but num_layers is ",
                            num_layers));
  }
  // The SELECT of compute layers, checked as a one-layer policy.
  LayerSpec select = o.select;
  select.role = LayerRole::kSelect;
  select.source = -1;
  {
    LayerPolicy probe;
    probe.sinks = o.sinks;
    probe.window = o.window;
    probe.layers = {select};
    absl::Status s = ValidatePolicy(probe);
    if (!s.ok()) return bad(absl::StrCat("plan: the select spec: ", s.message()));
  }
  const Budget full_budget = o.full_budget.empty() ? select.budget : o.full_budget;

  HylraPlan plan;
  const size_t L = static_cast<size_t>(num_layers);
  std::vector<int32_t> index_of(L, -1);  // policy layer -> captured index
  for (size_t i = 0; i < nc; ++i) index_of[static_cast<size_t>(map[i])] = static_cast<int32_t>(i);

  // Sensitivity: mean ratio90 over captures.
  std::vector<double> ratio(nc, 0.0);
  for (const HylraProfile& p : profiles) {
    for (size_t i = 0; i < nc; ++i) ratio[i] += p.ratio90[i] / profiles.size();
  }
  plan.sensitivity.assign(L, kNaN);
  for (size_t i = 0; i < nc; ++i) plan.sensitivity[static_cast<size_t>(map[i])] = ratio[i];

  std::vector<bool> full(L, false), missing(L, false);
  for (size_t l = 0; l < L; ++l) {
    if (index_of[l] < 0) {
      missing[l] = true;
      full[l] = true;
      plan.missing_layers.push_back(static_cast<int32_t>(l));
    }
  }
  std::vector<size_t> by_sensitivity(nc);
  std::iota(by_sensitivity.begin(), by_sensitivity.end(), 0);
  std::stable_sort(by_sensitivity.begin(), by_sensitivity.end(),
                   [&](size_t a, size_t b) { return ratio[a] > ratio[b]; });
  for (size_t r = 0; r < nc; ++r) {
    const size_t i = by_sensitivity[r];
    const bool chosen = o.full_threshold > 0 ? ratio[i] >= o.full_threshold
                                             : static_cast<int32_t>(r) < o.n_full;
    if (chosen) full[static_cast<size_t>(map[i])] = true;
  }
  for (size_t l = 0; l < L; ++l) {
    if (full[l] && !missing[l]) plan.full_layers.push_back(static_cast<int32_t>(l));
  }

  // Per-capture score matrices in policy layers; full layers' columns (and
  // rows, unless reuse_full_layers) zeroed.
  std::vector<LayerMatrix> scores;
  plan.score = NanMatrix(L);
  for (const HylraProfile& p : profiles) {
    const LayerMatrix& a = o.score == HylraScore::kMass ? p.mass : p.overlap;
    LayerMatrix m = NanMatrix(L);
    for (size_t i = 0; i < L; ++i) {
      m[i][i] = 1.0;
      for (size_t j = i + 1; j < L; ++j) {
        double v = 0.0;
        if (index_of[i] >= 0 && index_of[j] >= 0 && !full[j] &&
            (!full[i] || o.reuse_full_layers)) {
          v = a[static_cast<size_t>(index_of[i])][static_cast<size_t>(index_of[j])];
          if (std::isnan(v)) v = 0.0;
        }
        m[i][j] = v;
      }
    }
    for (size_t i = 0; i < L; ++i) {
      for (size_t j = i; j < L; ++j) {
        plan.score[i][j] = std::isnan(plan.score[i][j]) ? m[i][j] : std::min(plan.score[i][j], m[i][j]);
      }
    }
    scores.push_back(std::move(m));
  }

  int32_t forced = 0;
  for (size_t l = 0; l < L; ++l) forced += (l == 0 || full[l]) ? 1 : 0;
  if (o.max_compute < forced) {
    std::vector<int32_t> names;
    for (size_t l = 0; l < L; ++l) {
      if (l == 0 || full[l]) names.push_back(static_cast<int32_t>(l));
    }
    return bad(absl::StrCat("plan: max_compute=", o.max_compute, " is below the ", forced,
                            " layers that must compute (", absl::StrJoin(names, ", "),
                            ": layer 0, the full layers",
                            plan.missing_layers.empty() ? "" : " and the layers not captured",
                            ")"));
  }
  KVR_ASSIGN_OR_RETURN(plan.path, BestPathMinSum(scores, o.max_compute, full));

  LayerPolicy& policy = plan.policy;
  policy.name = o.name.empty() ? absl::StrCat("hylra-c", o.max_compute, "-f",
                                              plan.full_layers.size())
                               : o.name;
  policy.model_id = o.model_id;
  policy.sinks = o.sinks;
  policy.window = o.window;
  policy.layers.resize(L);
  for (size_t j = 0; j < L; ++j) {
    const int32_t src = plan.path.source[j];
    LayerSpec& s = policy.layers[j];
    if (src != static_cast<int32_t>(j)) {
      s.role = LayerRole::kReuse;
      s.source = src;
    } else if (full[j]) {
      s.role = LayerRole::kFull;
    } else {
      s = select;
    }
  }
  for (size_t j = 0; j < L; ++j) {
    if (full[j] && policy.IsReused(static_cast<int32_t>(j))) policy.layers[j].budget = full_budget;
  }
  KVR_RETURN_IF_ERROR(ValidatePolicy(policy));

  if (!plan.missing_layers.empty()) {
    plan.notes.push_back(absl::StrCat(
        "layers ", absl::StrJoin(plan.missing_layers, ", "),
        " were not captured: FULL (nothing to measure); each starts a segment and counts against "
        "max_compute, and no layer reuses across them"));
  }
  for (size_t j = 0; j < L; ++j) {
    if (full[j] && policy.IsReused(static_cast<int32_t>(j)) && !o.reuse_full_layers) {
      plan.notes.push_back(absl::StrCat(
          "layer ", j, " is FULL and reused (score 0: max_compute left no other choice); it "
          "yields its exact top-k"));
    }
  }
  if (plan.path.worst <= 0) {
    plan.notes.push_back(
        "the worst reuse score is 0: some layer reuses a layer it has no measured score with; "
        "raise max_compute");
  }
  return plan;
}

// --- reports --------------------------------------------------------------------------

std::string HylraReportJson(const std::vector<HylraProfile>& profiles, const HylraPlan& plan) {
  using Json = nlohmann::ordered_json;
  Json root;
  Json caps = Json::array();
  for (const HylraProfile& p : profiles) {
    Json c;
    c["name"] = p.name;
    c["layers"] = p.layers;
    c["num_q_heads"] = p.num_q_heads;
    c["num_kv_heads"] = p.num_kv_heads;
    c["head_dim"] = p.head_dim;
    c["num_tokens"] = p.num_tokens;
    c["num_steps"] = p.steps.size();
    c["first_step"] = p.steps.empty() ? -1 : p.steps.front();
    c["last_step"] = p.steps.empty() ? -1 : p.steps.back();
    c["k_last_step"] = p.k_last_step;
    c["seconds"] = p.seconds;
    c["ratio90"] = VectorJson(p.ratio90);
    c["own_error"] = VectorJson(p.own_error);
    c["overlap"] = MatrixJson(p.overlap);
    c["mass"] = MatrixJson(p.mass);
    c["error"] = MatrixJson(p.error);
    caps.push_back(std::move(c));
  }
  root["captures"] = std::move(caps);
  root["sensitivity"] = VectorJson(plan.sensitivity);
  root["full_layers"] = plan.full_layers;
  root["missing_layers"] = plan.missing_layers;
  root["score"] = MatrixJson(plan.score);
  Json path;
  path["source"] = plan.path.source;
  path["worst"] = plan.path.worst;
  path["total"] = plan.path.total;
  path["num_compute"] = plan.path.num_compute;
  root["path"] = std::move(path);
  root["notes"] = plan.notes;
  root["summary"] = PolicySummary(plan.policy);
  root["policy"] = Json::parse(PolicyToJson(plan.policy));
  return root.dump(2);
}

std::string HylraReportText(const std::vector<HylraProfile>& profiles, const HylraPlan& plan,
                            const HylraPlanOptions& options) {
  std::string out;
  for (const HylraProfile& p : profiles) {
    absl::StrAppend(
        &out,
        absl::StrFormat("capture %s: layers %s, %d tokens, %d q / %d kv heads, d=%d; %d steps "
                        "(positions %d..%d), k=%d at the last step; %.1f s\n",
                        p.name, absl::StrJoin(p.layers, ","), p.num_tokens, p.num_q_heads,
                        p.num_kv_heads, p.head_dim, p.steps.size(),
                        p.steps.empty() ? -1 : p.steps.front(),
                        p.steps.empty() ? -1 : p.steps.back(), p.k_last_step, p.seconds));
    absl::StrAppend(&out, "  sensitivity: ratio90 (share of blocks holding 90% of the mass), "
                          "own top-k output error\n");
    for (size_t i = 0; i < p.layers.size(); ++i) {
      absl::StrAppend(&out, absl::StrFormat("    L%-3d ratio90 %.3f  own error %.3f\n",
                                            p.layers[i], p.ratio90[i], p.own_error[i]));
    }
    absl::StrAppend(&out, "  mass of layer j captured by layer i's top-k / by its own:\n",
                    MatrixText(p.mass, p.layers));
    absl::StrAppend(&out, "  top-k overlap |T_i ∩ T_j| / |T_j|:\n", MatrixText(p.overlap, p.layers));
    absl::StrAppend(&out, "  output error of layer j over layer i's top-k (diagonal: its own):\n",
                    MatrixText(p.error, p.layers));
  }
  std::vector<int32_t> all(plan.policy.layers.size());
  std::iota(all.begin(), all.end(), 0);
  absl::StrAppend(&out,
                  absl::StrFormat("DP score (%s, min over captures; full layers zeroed%s), "
                                  "policy layers:\n",
                                  options.score == HylraScore::kMass ? "mass" : "overlap",
                                  options.reuse_full_layers ? " as targets only" : ""),
                  MatrixText(plan.score, all));
  absl::StrAppend(&out, absl::StrFormat(
                            "full layers: %s%s; max_compute %d: %d compute layers, worst score "
                            "%.3f, mean %.3f\n",
                            plan.full_layers.empty() ? "none" : absl::StrJoin(plan.full_layers, ","),
                            plan.missing_layers.empty()
                                ? ""
                                : absl::StrCat(" (+ not captured: ",
                                               absl::StrJoin(plan.missing_layers, ","), ")"),
                            options.max_compute, plan.path.num_compute, plan.path.worst,
                            plan.path.total / (profiles.size() * plan.policy.layers.size())));
  std::vector<std::string> roles;
  for (size_t l = 0; l < plan.policy.layers.size(); ++l) {
    roles.push_back(absl::StrCat("L", l, " ", RoleWord(plan.policy.layers[l])));
  }
  absl::StrAppend(&out, "roles: ", absl::StrJoin(roles, " | "), "\n");
  for (const std::string& note : plan.notes) absl::StrAppend(&out, "note: ", note, "\n");
  absl::StrAppend(&out, "policy ", plan.policy.name, ": ", PolicySummary(plan.policy), "\n");
  return out;
}

}  // namespace kvrecall::worker
