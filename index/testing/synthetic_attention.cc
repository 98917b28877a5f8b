#include "index/testing/synthetic_attention.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "absl/strings/str_cat.h"

namespace kvrecall::index {
namespace {

// Student-t sample scaled to unit variance.
double UnitT(std::mt19937_64& rng, double dof) {
  std::student_t_distribution<double> t(dof);
  return t(rng) * std::sqrt((dof - 2) / dof);
}

// A random unit vector; with `slow_only`, supported on the slowest quarter
// of the RoPE pairs (dims [3d/8, d/2) and [7d/8, d)), where real models keep
// their large mean components, so that the mean survives the rotation.
void RandomUnit(std::mt19937_64& rng, std::vector<double>* v, bool slow_only = false) {
  std::normal_distribution<double> n;
  const size_t d = v->size(), half = d / 2;
  double norm = 0;
  for (size_t j = 0; j < d; ++j) {
    const size_t pair = j % half;
    double& x = (*v)[j];
    x = (!slow_only || pair >= half * 3 / 4) ? n(rng) : 0.0;
    norm += x * x;
  }
  norm = std::sqrt(norm);
  for (double& x : *v) x /= norm;
}

// Rotary embedding at position pos ("rotate_half": dim i pairs with i+d/2).
void ApplyRope(double theta, int64_t pos, int32_t d, float* x) {
  const int32_t half = d / 2;
  for (int32_t i = 0; i < half; ++i) {
    const double freq = std::pow(theta, -2.0 * i / d);
    const double a = static_cast<double>(pos) * freq;
    const double c = std::cos(a), s = std::sin(a);
    const double x0 = x[i], x1 = x[i + half];
    x[i] = static_cast<float>(x0 * c - x1 * s);
    x[i + half] = static_cast<float>(x1 * c + x0 * s);
  }
}

// The random source of one context. One normal distribution throughout, as
// it keeps the second value of each pair it draws.
struct Random {
  explicit Random(uint64_t seed) : engine(seed) {}
  double Normal() { return normal(engine); }
  std::mt19937_64 engine;
  std::normal_distribution<double> normal;
};

// The latent model of one context (synthetic_attention.h): its directions,
// maps and states.
struct Model {
  int32_t d = 0, r = 0, rn = 0;
  int64_t n = 0;
  std::vector<double> uk, uq;  // unit directions of mu_k and mu_q
  double mean_k = 0;           // |mu_k|
  double var_k = 0;            // the key variance around mu_k
  std::vector<double> a;       // A: [d, r]
  std::vector<double> un;      // U: [d, rn]
  double key_noise = 0;        // per-dimension noise of a key
  std::vector<std::vector<double>> w;  // W_g: [r, r] per query head
  std::vector<double> cmat;            // C: [d, r]
  std::vector<double> h;               // content states: [n, r]
  std::vector<double> u;               // nuisance states: [n, rn]
};

absl::Status CheckOptions(const SyntheticAttentionOptions& o) {
  if (o.num_keys < 1 || o.dim < 2 || o.dim % 2 != 0 || o.num_query_heads < 1 ||
      o.num_decode_queries < 0 || o.latent_rank < 1 || o.latent_rank > o.dim ||
      !(o.temporal_correlation >= 0 && o.temporal_correlation < 1) || !(o.student_t_dof > 2) ||
      !(o.key_mean_fraction >= 0 && o.key_mean_fraction < 1) ||
      !(o.query_mean_cos >= -1 && o.query_mean_cos <= 1) || !(o.key_norm > 0) ||
      !(o.query_norm > 0) || !(o.rope_theta > 1) || !(o.query_mean_fraction >= 0 && o.query_mean_fraction < 1) ||
      !(o.query_focus > 0) || !(o.recent_fraction >= 0 && o.recent_fraction <= 1) || o.recent_window < 1) {
    return absl::InvalidArgumentError("synthetic attention: option out of range");
  }
  if (o.nuisance_rank < 0 || o.latent_rank + o.nuisance_rank > o.dim || !(o.content_share > 0) ||
      !(o.nuisance_share >= 0) || o.content_share + o.nuisance_share > 1 ||
      !(o.nuisance_correlation >= 0 && o.nuisance_correlation < 1) || o.num_topics < 1 ||
      !(o.segment_length >= 1) || !(o.topic_noise >= 0) || !(o.head_mixing >= 0) ||
      !(o.target_noise >= 0)) {
    return absl::InvalidArgumentError("synthetic attention: option out of range");
  }
  return absl::OkStatus();
}

// Directions: mu_k, and mu_q at the requested angle to it.
void MeanDirections(const SyntheticAttentionOptions& o, Random& rng, Model* m) {
  const int32_t d = m->d;
  std::vector<double> other(d);
  m->uk.resize(d);
  RandomUnit(rng.engine, &m->uk, /*slow_only=*/true);
  RandomUnit(rng.engine, &other, /*slow_only=*/true);
  double dot = 0;
  for (int32_t j = 0; j < d; ++j) dot += other[j] * m->uk[j];
  double onorm = 0;
  for (int32_t j = 0; j < d; ++j) {
    other[j] -= dot * m->uk[j];
    onorm += other[j] * other[j];
  }
  onorm = std::sqrt(onorm);
  const double cq = o.query_mean_cos, sq = std::sqrt(std::max(0.0, 1 - cq * cq));
  m->uq.resize(d);
  for (int32_t j = 0; j < d; ++j) m->uq[j] = cq * m->uk[j] + sq * other[j] / onorm;
}

// `count` orthonormal random directions (Gram-Schmidt), avoiding the slow
// RoPE pairs that carry the means.
std::vector<std::vector<double>> OrthonormalDirections(int32_t count, int32_t d, Random& rng) {
  std::vector<std::vector<double>> basis;
  while (static_cast<int32_t>(basis.size()) < count) {
    std::vector<double> v(d);
    RandomUnit(rng.engine, &v);
    for (const auto& b : basis) {
      double p = 0;
      for (int32_t j = 0; j < d; ++j) p += v[j] * b[j];
      for (int32_t j = 0; j < d; ++j) v[j] -= p * b[j];
    }
    double norm = 0;
    for (double x : v) norm += x * x;
    norm = std::sqrt(norm);
    if (norm < 1e-6) continue;
    for (double& x : v) x /= norm;
    basis.push_back(std::move(v));
  }
  return basis;
}

// Share of component c of a 1/(1+c) spectrum over `count` components.
double Spectrum(int32_t count, int32_t c) {
  double total = 0;
  for (int32_t i = 0; i < count; ++i) total += 1.0 / (1.0 + i);
  return (1.0 / (1.0 + c)) / total;
}

// Key energy: a fraction f of |k|^2 in the mean; the rest split between a
// nuisance part (U u_t, what keys mostly differ by), the content part
// (A h_t, what queries look for) and isotropic noise. U and A span
// orthogonal subspaces, so keys alike in the key space (nuisance) are not
// the keys a query scores high (content): queries are out of distribution.
void KeyMaps(const SyntheticAttentionOptions& o, Random& rng, Model* m) {
  const int32_t d = m->d, r = m->r, rn = m->rn;
  const double f = o.key_mean_fraction;
  m->mean_k = f * o.key_norm;
  m->var_k = o.key_norm * o.key_norm * (1 - f * f);
  const std::vector<std::vector<double>> basis = OrthonormalDirections(rn + r, d, rng);
  m->a.resize(static_cast<size_t>(d) * r);
  m->un.resize(static_cast<size_t>(d) * rn);
  for (int32_t c = 0; c < r; ++c) {
    const double scale = std::sqrt(m->var_k * o.content_share * Spectrum(r, c));
    for (int32_t j = 0; j < d; ++j) m->a[j * r + c] = basis[rn + c][j] * scale;
  }
  for (int32_t c = 0; c < rn; ++c) {
    const double scale = std::sqrt(m->var_k * o.nuisance_share * Spectrum(rn, c));
    for (int32_t j = 0; j < d; ++j) m->un[j * rn + c] = basis[c][j] * scale;
  }
  m->key_noise =
      std::sqrt(m->var_k * std::max(0.0, 1 - o.content_share - o.nuisance_share) / d);
}

// Head mixings W_g (r x r, orthogonal-ish random) and the value map C.
void HeadAndValueMaps(const SyntheticAttentionOptions& o, Random& rng, Model* m) {
  const int32_t d = m->d, r = m->r;
  m->w.assign(o.num_query_heads, std::vector<double>(r * r));
  for (auto& wg : m->w) {
    for (int32_t i = 0; i < r; ++i) {
      for (int32_t j = 0; j < r; ++j) wg[i * r + j] = (i == j ? 1.0 : 0.0) + o.head_mixing * rng.Normal() / std::sqrt(r);
    }
  }
  m->cmat.resize(static_cast<size_t>(d) * r);
  for (double& x : m->cmat) x = rng.Normal() / std::sqrt(r);
}

// Nuisance states u_t: a fast AR(1) of Student-t innovations.
void NuisanceStates(const SyntheticAttentionOptions& o, Random& rng, Model* m) {
  const int64_t n = m->n;
  const int32_t rn = m->rn;
  m->u.resize(static_cast<size_t>(n) * rn);
  const double rho_u = o.nuisance_correlation, innov_u = std::sqrt(1 - rho_u * rho_u);
  for (int64_t t = 0; t < n; ++t) {
    for (int32_t c = 0; c < rn; ++c) {
      const double e = UnitT(rng.engine, o.student_t_dof);
      m->u[t * rn + c] = t > 0 ? rho_u * m->u[(t - 1) * rn + c] + innov_u * e : e;
    }
  }
}

// Content states h_t: the context is a sequence of segments (mean length
// segment_length), each about one of num_topics topics (unit-variance
// Student-t vectors); within a segment the state wanders around its topic
// with an AR(1) of amplitude topic_noise.
void ContentStates(const SyntheticAttentionOptions& o, Random& rng, Model* m) {
  const int64_t n = m->n;
  const int32_t r = m->r;
  m->h.resize(static_cast<size_t>(n) * r);
  std::vector<double> topics(static_cast<size_t>(o.num_topics) * r);
  for (double& x : topics) x = UnitT(rng.engine, o.student_t_dof);
  std::geometric_distribution<int64_t> length(1.0 / o.segment_length);
  std::uniform_int_distribution<int32_t> pick(0, o.num_topics - 1);
  const double rho = o.temporal_correlation, innov = std::sqrt(1 - rho * rho);
  std::vector<double> wander(r, 0.0);
  int64_t left = 0;
  int32_t topic = 0;
  for (int64_t t = 0; t < n; ++t) {
    if (left-- <= 0) {
      left = 1 + length(rng.engine);
      topic = pick(rng.engine);
    }
    for (int32_t c = 0; c < r; ++c) {
      wander[c] = rho * wander[c] + innov * UnitT(rng.engine, o.student_t_dof);
      m->h[t * r + c] = topics[static_cast<size_t>(topic) * r + c] + o.topic_noise * wander[c];
    }
  }
}

// k_t = RoPE_t(mu_k + U u_t + A h_t + noise) and v_t = C h_t + noise.
void WriteKeysAndValues(const SyntheticAttentionOptions& o, const Model& m, Random& rng,
                        SyntheticAttention* out) {
  const int32_t d = m.d, r = m.r, rn = m.rn;
  out->keys.resize(m.n * d);
  out->values.resize(m.n * d);
  for (int64_t t = 0; t < m.n; ++t) {
    float* k = out->keys.data() + t * d;
    float* v = out->values.data() + t * d;
    for (int32_t j = 0; j < d; ++j) {
      double kv = m.mean_k * m.uk[j] + m.key_noise * rng.Normal(), vv = 0.3 * rng.Normal();
      for (int32_t c = 0; c < r; ++c) {
        kv += m.a[j * r + c] * m.h[t * r + c];
        vv += m.cmat[j * r + c] * m.h[t * r + c];
      }
      for (int32_t c = 0; c < rn; ++c) kv += m.un[j * rn + c] * m.u[t * rn + c];
      k[j] = static_cast<float>(kv);
      v[j] = static_cast<float>(vv);
    }
    ApplyRope(o.rope_theta, t, d, k);
  }
}

// The earlier position s whose content a query at `pos` looks for: one of
// the last recent_window positions with probability recent_fraction, else
// any earlier one.
int64_t QueryTarget(const SyntheticAttentionOptions& o, int64_t pos, int64_t n, Random& rng) {
  const int64_t past = std::min(pos, n);  // positions < pos that exist
  if (past <= 1) return 0;
  if (std::uniform_real_distribution<double>(0, 1)(rng.engine) < o.recent_fraction) {
    return past - 1 -
           std::min<int64_t>(past - 1, std::uniform_int_distribution<int64_t>(
                                           0, o.recent_window - 1)(rng.engine));
  }
  return std::uniform_int_distribution<int64_t>(0, past - 1)(rng.engine);
}

// A query of head g at position pos looks for the content of an earlier s.
// Its norm budget: mean part, then the latent part scaled to the rest.
void MakeQuery(const SyntheticAttentionOptions& o, const Model& m, int32_t g, int64_t pos,
               Random& rng, float* q) {
  const int32_t d = m.d, r = m.r;
  const double mean_q = o.query_mean_fraction * o.query_norm;
  const double rest_q = std::sqrt(o.query_norm * o.query_norm - mean_q * mean_q);
  const int64_t s = QueryTarget(o, pos, m.n, rng);
  std::vector<double> target(r), mixed(r);
  for (int32_t c = 0; c < r; ++c) target[c] = m.h[s * r + c] + o.target_noise * rng.Normal();
  for (int32_t i = 0; i < r; ++i) {
    double sum = 0;
    for (int32_t j = 0; j < r; ++j) sum += m.w[g][i * r + j] * target[j];
    mixed[i] = sum;
  }
  std::vector<double> lat(d, 0.0);
  for (int32_t j = 0; j < d; ++j) {
    for (int32_t c = 0; c < r; ++c) lat[j] += m.a[j * r + c] * mixed[c];
    lat[j] += 0.3 * m.key_noise * rng.Normal();
  }
  // Normalise the latent part in expectation (E|A h|^2 = var_k * share).
  const double scale = o.query_focus * rest_q / std::sqrt(m.var_k * o.content_share * 1.25);
  for (int32_t j = 0; j < d; ++j) q[j] = static_cast<float>(mean_q * m.uq[j] + scale * lat[j]);
  ApplyRope(o.rope_theta, pos, d, q);
}

// The prefill query of every position (at t + 1) and the decode queries
// (at num_keys, num_keys + 1, ...), head by head.
void WriteQueries(const SyntheticAttentionOptions& o, const Model& m, Random& rng,
                  SyntheticAttention* out) {
  const int32_t d = m.d;
  const int64_t n = m.n;
  out->prefill_queries.resize(static_cast<size_t>(o.num_query_heads) * n * d);
  out->decode_queries.resize(static_cast<size_t>(o.num_query_heads) * o.num_decode_queries * d);
  for (int32_t g = 0; g < o.num_query_heads; ++g) {
    for (int64_t t = 0; t < n; ++t) {
      MakeQuery(o, m, g, t + 1, rng, out->prefill_queries.data() + (g * n + t) * d);
    }
    for (int64_t i = 0; i < o.num_decode_queries; ++i) {
      MakeQuery(o, m, g, n + i, rng, out->decode_queries.data() + (g * o.num_decode_queries + i) * d);
    }
  }
}

}  // namespace

absl::StatusOr<SyntheticAttention> GenerateSyntheticAttention(
    const SyntheticAttentionOptions& o) {
  if (absl::Status s = CheckOptions(o); !s.ok()) return s;
  Random rng(o.seed);
  Model m;
  m.d = o.dim;
  m.r = o.latent_rank;
  m.rn = o.nuisance_rank;
  m.n = o.num_keys;
  MeanDirections(o, rng, &m);
  KeyMaps(o, rng, &m);
  HeadAndValueMaps(o, rng, &m);
  NuisanceStates(o, rng, &m);
  ContentStates(o, rng, &m);

  SyntheticAttention out;
  out.dim = m.d;
  out.num_keys = m.n;
  out.num_query_heads = o.num_query_heads;
  out.num_decode_queries = o.num_decode_queries;
  WriteKeysAndValues(o, m, rng, &out);
  WriteQueries(o, m, rng, &out);
  return out;
}

}  // namespace kvrecall::index
