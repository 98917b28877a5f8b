#include "index/testing/synthetic_attention.h"

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

}  // namespace

absl::StatusOr<SyntheticAttention> GenerateSyntheticAttention(
    const SyntheticAttentionOptions& o) {
  if (o.num_keys < 1 || o.dim < 2 || o.dim % 2 != 0 || o.num_query_heads < 1 ||
      o.num_decode_queries < 0 || o.latent_rank < 1 || o.latent_rank > o.dim ||
      !(o.temporal_correlation >= 0 && o.temporal_correlation < 1) || !(o.student_t_dof > 2) ||
      !(o.key_mean_fraction >= 0 && o.key_mean_fraction < 1) ||
      !(o.query_mean_cos >= -1 && o.query_mean_cos <= 1) || !(o.key_norm > 0) ||
      !(o.query_norm > 0) || !(o.rope_theta > 1) || !(o.query_mean_fraction >= 0 && o.query_mean_fraction < 1) ||
      !(o.query_focus > 0) || !(o.recent_fraction >= 0 && o.recent_fraction <= 1) || o.recent_window < 1) {
    return absl::InvalidArgumentError("synthetic attention: option out of range");
  }
  const int32_t d = o.dim, r = o.latent_rank;
  if (o.nuisance_rank < 0 || r + o.nuisance_rank > d || !(o.content_share > 0) ||
      !(o.nuisance_share >= 0) || o.content_share + o.nuisance_share > 1 ||
      !(o.nuisance_correlation >= 0 && o.nuisance_correlation < 1) || o.num_topics < 1 ||
      !(o.segment_length >= 1) || !(o.topic_noise >= 0) || !(o.head_mixing >= 0) ||
      !(o.target_noise >= 0)) {
    return absl::InvalidArgumentError("synthetic attention: option out of range");
  }
  const int64_t n = o.num_keys;
  std::mt19937_64 rng(o.seed);
  std::normal_distribution<double> normal;

  // Directions: mu_k, and mu_q at the requested angle to it.
  std::vector<double> uk(d), other(d);
  RandomUnit(rng, &uk, /*slow_only=*/true);
  RandomUnit(rng, &other, /*slow_only=*/true);
  double dot = 0;
  for (int32_t j = 0; j < d; ++j) dot += other[j] * uk[j];
  double onorm = 0;
  for (int32_t j = 0; j < d; ++j) {
    other[j] -= dot * uk[j];
    onorm += other[j] * other[j];
  }
  onorm = std::sqrt(onorm);
  const double cq = o.query_mean_cos, sq = std::sqrt(std::max(0.0, 1 - cq * cq));
  std::vector<double> uq(d);
  for (int32_t j = 0; j < d; ++j) uq[j] = cq * uk[j] + sq * other[j] / onorm;

  // Key energy: a fraction f of |k|^2 in the mean; the rest split between a
  // nuisance part (U u_t, what keys mostly differ by), the content part
  // (A h_t, what queries look for) and isotropic noise. U and A span
  // orthogonal subspaces, so keys alike in the key space (nuisance) are not
  // the keys a query scores high (content): queries are out of distribution.
  const double f = o.key_mean_fraction;
  const double mean_k = f * o.key_norm;
  const double var_k = o.key_norm * o.key_norm * (1 - f * f);
  const double latent_share = o.content_share;
  const double nuisance_share = o.nuisance_share;
  const int32_t rn = o.nuisance_rank;
  // Orthonormal basis of rn + r random directions (Gram-Schmidt), avoiding
  // the slow RoPE pairs that carry the means.
  std::vector<std::vector<double>> basis;
  while (static_cast<int32_t>(basis.size()) < rn + r) {
    std::vector<double> v(d);
    RandomUnit(rng, &v);
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
  auto spectrum = [](int32_t count, int32_t c) {
    double total = 0;
    for (int32_t i = 0; i < count; ++i) total += 1.0 / (1.0 + i);
    return (1.0 / (1.0 + c)) / total;
  };
  std::vector<double> a(static_cast<size_t>(d) * r);    // A: [d, r]
  std::vector<double> un(static_cast<size_t>(d) * rn);  // U: [d, rn]
  for (int32_t c = 0; c < r; ++c) {
    const double scale = std::sqrt(var_k * latent_share * spectrum(r, c));
    for (int32_t j = 0; j < d; ++j) a[j * r + c] = basis[rn + c][j] * scale;
  }
  for (int32_t c = 0; c < rn; ++c) {
    const double scale = std::sqrt(var_k * nuisance_share * spectrum(rn, c));
    for (int32_t j = 0; j < d; ++j) un[j * rn + c] = basis[c][j] * scale;
  }
  const double key_noise =
      std::sqrt(var_k * std::max(0.0, 1 - latent_share - nuisance_share) / d);

  // Head mixings W_g (r x r, orthogonal-ish random) and the value map C.
  std::vector<std::vector<double>> w(o.num_query_heads, std::vector<double>(r * r));
  for (auto& wg : w) {
    for (int32_t i = 0; i < r; ++i) {
      for (int32_t j = 0; j < r; ++j) wg[i * r + j] = (i == j ? 1.0 : 0.0) + o.head_mixing * normal(rng) / std::sqrt(r);
    }
  }
  std::vector<double> cmat(static_cast<size_t>(d) * r);
  for (double& x : cmat) x = normal(rng) / std::sqrt(r);

  // Latent states: content h (slow) and nuisance u (fast).
  std::vector<double> h(static_cast<size_t>(n) * r);
  std::vector<double> u(static_cast<size_t>(n) * rn);
  {
    const double rho_u = o.nuisance_correlation, innov_u = std::sqrt(1 - rho_u * rho_u);
    for (int64_t t = 0; t < n; ++t) {
      for (int32_t c = 0; c < rn; ++c) {
        const double e = UnitT(rng, o.student_t_dof);
        u[t * rn + c] = t > 0 ? rho_u * u[(t - 1) * rn + c] + innov_u * e : e;
      }
    }
  }
  // Content: the context is a sequence of segments (mean length
  // segment_length), each about one of num_topics topics (unit-variance
  // Student-t vectors); within a segment the state wanders around its topic
  // with an AR(1) of amplitude topic_noise.
  {
    std::vector<double> topics(static_cast<size_t>(o.num_topics) * r);
    for (double& x : topics) x = UnitT(rng, o.student_t_dof);
    std::geometric_distribution<int64_t> length(1.0 / o.segment_length);
    std::uniform_int_distribution<int32_t> pick(0, o.num_topics - 1);
    const double rho = o.temporal_correlation, innov = std::sqrt(1 - rho * rho);
    std::vector<double> wander(r, 0.0);
    int64_t left = 0;
    int32_t topic = 0;
    for (int64_t t = 0; t < n; ++t) {
      if (left-- <= 0) {
        left = 1 + length(rng);
        topic = pick(rng);
      }
      for (int32_t c = 0; c < r; ++c) {
        wander[c] = rho * wander[c] + innov * UnitT(rng, o.student_t_dof);
        h[t * r + c] = topics[static_cast<size_t>(topic) * r + c] + o.topic_noise * wander[c];
      }
    }
  }

  SyntheticAttention out;
  out.dim = d;
  out.num_keys = n;
  out.num_query_heads = o.num_query_heads;
  out.num_decode_queries = o.num_decode_queries;
  out.keys.resize(n * d);
  out.values.resize(n * d);
  for (int64_t t = 0; t < n; ++t) {
    float* k = out.keys.data() + t * d;
    float* v = out.values.data() + t * d;
    for (int32_t j = 0; j < d; ++j) {
      double kv = mean_k * uk[j] + key_noise * normal(rng), vv = 0.3 * normal(rng);
      for (int32_t c = 0; c < r; ++c) {
        kv += a[j * r + c] * h[t * r + c];
        vv += cmat[j * r + c] * h[t * r + c];
      }
      for (int32_t c = 0; c < rn; ++c) kv += un[j * rn + c] * u[t * rn + c];
      k[j] = static_cast<float>(kv);
      v[j] = static_cast<float>(vv);
    }
    ApplyRope(o.rope_theta, t, d, k);
  }

  // A query of head g at position pos looks for the content of an earlier s.
  // Its norm budget: mean part, then the latent part scaled to the rest.
  const double mean_q = o.query_mean_fraction * o.query_norm;
  const double rest_q = std::sqrt(o.query_norm * o.query_norm - mean_q * mean_q);
  auto make_query = [&](int32_t g, int64_t pos, float* q) {
    const int64_t past = std::min(pos, n);  // positions < pos that exist
    int64_t s = 0;
    if (past > 1) {
      if (std::uniform_real_distribution<double>(0, 1)(rng) < o.recent_fraction) {
        s = past - 1 - std::min<int64_t>(
                           past - 1, std::uniform_int_distribution<int64_t>(0, o.recent_window - 1)(rng));
      } else {
        s = std::uniform_int_distribution<int64_t>(0, past - 1)(rng);
      }
    }
    std::vector<double> target(r), mixed(r);
    for (int32_t c = 0; c < r; ++c) target[c] = h[s * r + c] + o.target_noise * normal(rng);
    for (int32_t i = 0; i < r; ++i) {
      double m = 0;
      for (int32_t j = 0; j < r; ++j) m += w[g][i * r + j] * target[j];
      mixed[i] = m;
    }
    std::vector<double> lat(d, 0.0);
    double lat_norm = 0;
    for (int32_t j = 0; j < d; ++j) {
      for (int32_t c = 0; c < r; ++c) lat[j] += a[j * r + c] * mixed[c];
      lat[j] += 0.3 * key_noise * normal(rng);
      lat_norm += lat[j] * lat[j];
    }
    // Normalise the latent part in expectation (E|A h|^2 = var_k * share).
    const double scale = o.query_focus * rest_q / std::sqrt(var_k * latent_share * 1.25);
    for (int32_t j = 0; j < d; ++j) q[j] = static_cast<float>(mean_q * uq[j] + scale * lat[j]);
    ApplyRope(o.rope_theta, pos, d, q);
  };
  out.prefill_queries.resize(static_cast<size_t>(o.num_query_heads) * n * d);
  out.decode_queries.resize(static_cast<size_t>(o.num_query_heads) * o.num_decode_queries * d);
  for (int32_t g = 0; g < o.num_query_heads; ++g) {
    for (int64_t t = 0; t < n; ++t) {
      make_query(g, t + 1, out.prefill_queries.data() + (g * n + t) * d);
    }
    for (int64_t i = 0; i < o.num_decode_queries; ++i) {
      make_query(g, n + i, out.decode_queries.data() + (g * o.num_decode_queries + i) * d);
    }
  }
  return out;
}

}  // namespace kvrecall::index
