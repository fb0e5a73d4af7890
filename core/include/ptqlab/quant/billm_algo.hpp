#pragma once
// BiLLM's numerical pieces (research/baselines.md §2; docs/methods/billm.md), header only: the
// billm and arbllm plugins and tests/test_billm.cpp compile their own copies, so nothing crosses a
// library boundary. It is in core because two methods use it (ARB-LLM refines BiLLM's binarizer),
// and it is one file over 600 lines because the pieces (salience, structural search, break-point
// search, the block loop) are one algorithm read top to bottom.
//
// Per block of `block_size` input columns, on all rows at once:
//   S  salience (§2.3): hessian w²/d_j² (code d_j = U_jj, paper d_j = [H⁻¹]_jj) or magnitude w
//   T  the search target: S (the code searches on S) or the block's weights (paper)
//   (A) structural search: columns ranked by Σ_r |S_rj|; the first k are salient, k in
//       [min_salient, max_salient]; error Σ (T − bin(T, salient) − bin(T, rest))²
//   (B) break-point search over candidates p (faithful: quantiles of |T| with the salient columns'
//       zeros included; paper: fractions of max |T| over the non-salient weights); non-salient
//       weights split into concentrated (|T| < p; paper ≤) and sparse (|T| ≥ p; paper >)
//   (C) the block's weights binarized with these masks: concentrated and sparse order 1,
//       salient order 2
//   (D) errors (w − q)/U_jj pushed to the later columns: W[:, b1:] −= E U[b0:b1, b1:]
// Every phase runs over fixed chunks of 64 rows with TBB; partial sums are merged in chunk order,
// so results do not depend on the thread count. Options::defaults(mode) gives the code's choices
// (faithful) or the paper's (research/baselines.md §4 B1-B4); each can also be set alone.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <tuple>
#include <utility>
#include <vector>

#include <Eigen/Core>
#include <tbb/blocked_range.h>
#include <tbb/parallel_for.h>
#include <tbb/partitioner.h>

#include "ptqlab/model/model.hpp"
#include "ptqlab/quant/binarize.hpp"
#include "ptqlab/quant/bits.hpp"

namespace ptqlab::billm {

using Eigen::Index;

enum class Mode { faithful, paper };
enum class Metric { hessian, magnitude };

struct Options {
  Mode mode = Mode::faithful;
  Metric metric = Metric::hessian;
  Index block_size = 128;
  int min_salient = 1;  // salient columns per block searched in (A): k in [min, max]
  int max_salient = 49;
  int search_salient_order = 2;  // orders of the two sides inside (A)
  int search_rest_order = 2;
  double split_min = 0.10;  // break-point levels: split_points values evenly spaced in [min, max]
  double split_max = 0.90;
  int split_points = 81;
  bool disable_gptq = false;  // no error propagation (the code's --disable_gptq)
  // The paper-vs-code items (research/baselines.md §4), set by defaults(mode):
  bool mean_shift = true;             // B1: μ + α·sgn(w − μ) (code) or α·sgn(w) (paper)
  bool zero_sign_is_zero = true;      // B1: sgn(0) = 0 (torch.sign) or +1 (binary codes)
  bool inverse_diagonal = false;      // B2: hessian salience w²/[H⁻¹]_jj² (paper) instead of w²/U_jj²
  bool search_weights = false;        // B3/B4: searches measure the error on W (paper), not on S
  bool max_fraction_breakpoints = false;  // B4: p = level·max|W| with |w| <= p (paper), not
                                          //     quantiles of |S| with |s| < p (code)

  BinarizerStyle style() const {
    BinarizerStyle s;
    s.mean_shift = mean_shift;
    s.zero_sign_is_zero = zero_sign_is_zero;
    return s;
  }
  bool search_on_weights() const { return search_weights; }
  bool inclusive_low() const { return max_fraction_breakpoints; }  // concentrated: |T| <= p (paper), < p (code)
};

// The defaults of a mode: faithful = the code (k in 1..49, order 2 on both sides of (A), the
// mean-shifted binarizer, U_jj, searches on S, quantile break-points); paper = the paper
// (Alg. 2: k in 3..30, order 1 on both sides, α·sign(w), [H⁻¹]_jj, searches on W, fractions of
// max|W|).
inline Options defaults(Mode mode) {
  Options o;
  o.mode = mode;
  if (mode == Mode::paper) {
    o.min_salient = 3;
    o.max_salient = 30;
    o.search_salient_order = 1;
    o.search_rest_order = 1;
    o.mean_shift = false;
    o.zero_sign_is_zero = false;
    o.inverse_diagonal = true;
    o.search_weights = true;
    o.max_fraction_breakpoints = true;
  }
  return o;
}

// Orders used outside the searches (§2.4 C): concentrated, sparse, salient.
inline constexpr int kConcentratedOrder = 1, kSparseOrder = 1, kSalientOrder = 2;

// ---- parallel helpers ---------------------------------------------------------------------------

inline constexpr Index kRowChunk = 64;

inline Index row_chunks(Index rows) { return (rows + kRowChunk - 1) / kRowChunk; }

// f(chunk, r0, r1) for every fixed chunk of kRowChunk rows, in parallel.
template <class F>
void for_row_chunks(Index rows, F&& f) {
  tbb::parallel_for(
      tbb::blocked_range<Index>(0, row_chunks(rows), 1),
      [&](const tbb::blocked_range<Index>& range) {
        for (Index c = range.begin(); c < range.end(); ++c) f(c, c * kRowChunk, std::min(rows, (c + 1) * kRowChunk));
      },
      tbb::simple_partitioner());
}

// Σ over chunks of per-chunk vectors, in chunk order.
inline std::vector<double> merge_chunks(const std::vector<std::vector<double>>& parts, std::size_t n) {
  std::vector<double> total(n, 0.0);
  for (const auto& p : parts)
    for (std::size_t i = 0; i < n; ++i) total[i] += p[i];
  return total;
}

// ---- (§2.3) salience ----------------------------------------------------------------------------

// The hessian metric's per-column denominators: U_jj (the code's diag of the Cholesky factor of
// H⁻¹) or, with inverse_diagonal (the paper's formula), [H⁻¹]_jj = Σ_i U_ij² (H⁻¹ = UᵀU).
inline Eigen::VectorXf salience_denominators(const Eigen::MatrixXd& U, bool inverse_diagonal) {
  if (!inverse_diagonal) return U.diagonal().cast<float>();
  return U.colwise().squaredNorm().transpose().cast<float>();
}

// S for a block Wb (rows × nb) with the block's denominators d (nb): hessian w² / d², magnitude w.
inline void salience_matrix(const Matrix& Wb, const Eigen::VectorXf& d, Metric metric, Matrix& S) {
  S.resize(Wb.rows(), Wb.cols());
  if (metric == Metric::magnitude) {
    S = Wb;
    return;
  }
  for_row_chunks(Wb.rows(), [&](Index, Index r0, Index r1) {
    for (Index r = r0; r < r1; ++r)
      for (Index j = 0; j < Wb.cols(); ++j) {
        const float w = Wb(r, j), dj = d(j);
        S(r, j) = (w * w) / (dj * dj);
      }
  });
}
inline Matrix salience_matrix(const Matrix& Wb, const Eigen::VectorXf& d, Metric metric) {
  Matrix S;
  salience_matrix(Wb, d, metric, S);
  return S;
}

// Columns of S by descending Σ_r |S_rj| (double, chunked); ties keep the lower index first.
inline std::vector<Index> rank_columns(const Matrix& S) {
  const Index nb = S.cols();
  std::vector<std::vector<double>> parts(row_chunks(S.rows()), std::vector<double>(nb, 0.0));
  for_row_chunks(S.rows(), [&](Index c, Index r0, Index r1) {
    auto& p = parts[c];
    for (Index r = r0; r < r1; ++r)
      for (Index j = 0; j < nb; ++j) p[j] += std::fabs(S(r, j));
  });
  const auto score = merge_chunks(parts, nb);
  std::vector<Index> order(nb);
  std::iota(order.begin(), order.end(), Index{0});
  std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return score[a] > score[b]; });
  return order;
}

// The k range actually searched in a block of nb columns: [min, max] clamped to [1, nb − 1] so that
// at least one column stays non-salient (a 1-column block is salient). The code takes
// topk(·, 50), which fails on blocks narrower than 50 columns; LLaMA shapes never have those.
inline std::pair<int, int> salient_range(const Options& o, Index nb) {
  const int hi = nb <= 1 ? 1 : static_cast<int>(std::min<Index>(o.max_salient, nb - 1));
  const int lo = std::clamp(o.min_salient, 1, std::max(1, hi));
  return {lo, std::max(lo, hi)};
}

// ---- (A) structural search ----------------------------------------------------------------------

namespace detail {

// The structural search evaluates every k on every row; rows share the column order, so it runs
// "vertically": kLanes rows side by side (one SIMD lane each), so that the per-row statistics of
// a pass are independent accumulators instead of one serial chain per row.
inline constexpr int kLanes = 16;

// out[l] = Σ_{i in [i0, i1)} f(i, l), in double, over 4 interleaved partial sums (i mod 4).
template <class F>
inline void lane_sums(Index i0, Index i1, F&& f, double* out) {
  double a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
  Index i = i0;
  for (; i + 4 <= i1; i += 4)
    for (int l = 0; l < kLanes; ++l) {
      a0[l] += f(i, l);
      a1[l] += f(i + 1, l);
      a2[l] += f(i + 2, l);
      a3[l] += f(i + 3, l);
    }
  for (; i < i1; ++i)
    for (int l = 0; l < kLanes; ++l) a0[l] += f(i, l);
  for (int l = 0; l < kLanes; ++l) out[l] = (a0[l] + a1[l]) + (a2[l] + a3[l]);
}

// Per lane l: Σ_{i in [i0, i1)} (x − approx)² of the order-`order` residual binarization of the
// values X[i·kLanes + l] (the §2.2 binarizer, one set per lane). R: scratch of the same layout.
template <bool Z>
inline void lane_errors(const float* X, Index i0, Index i1, int order, bool shift, float* R, double* e) {
  using binarize_detail::step_value;
  const Index n = i1 - i0;
  if (n <= 0) {
    for (int l = 0; l < kLanes; ++l) e[l] = 0.0;
    return;
  }
  const double inv = 1.0 / static_cast<double>(n);
  double s[kLanes];
  if (order > 2) {  // rare: per lane, through the contiguous kernel
    std::vector<float> v(n), scratch(2 * n);
    BinarizerStyle style;
    style.mean_shift = shift;
    style.zero_sign_is_zero = Z;
    for (int l = 0; l < kLanes; ++l) {
      for (Index i = 0; i < n; ++i) v[i] = X[(i0 + i) * kLanes + l];
      e[l] = residual_binarize_error(v.data(), n, order, style, scratch.data());
    }
    return;
  }
  float mu1[kLanes] = {}, a1[kLanes], mu2[kLanes] = {}, a2[kLanes];
  if (shift) {
    lane_sums(i0, i1, [X](Index i, int l) { return static_cast<double>(X[i * kLanes + l]); }, s);
    for (int l = 0; l < kLanes; ++l) mu1[l] = static_cast<float>(s[l] * inv);
  }
  lane_sums(i0, i1, [X, &mu1](Index i, int l) { return static_cast<double>(std::fabs(X[i * kLanes + l] - mu1[l])); },
            s);
  for (int l = 0; l < kLanes; ++l) a1[l] = static_cast<float>(s[l] * inv);
  if (order == 1) {
    lane_sums(i0, i1, [&](Index i, int l) {
      const float x = X[i * kLanes + l], d = x - step_value<Z>(x, mu1[l], a1[l]);
      return static_cast<double>(d) * d;
    }, e);
    return;
  }
  for (Index i = i0; i < i1; ++i)
    for (int l = 0; l < kLanes; ++l) R[i * kLanes + l] = X[i * kLanes + l] - step_value<Z>(X[i * kLanes + l], mu1[l], a1[l]);
  if (shift) {
    lane_sums(i0, i1, [R](Index i, int l) { return static_cast<double>(R[i * kLanes + l]); }, s);
    for (int l = 0; l < kLanes; ++l) mu2[l] = static_cast<float>(s[l] * inv);
  }
  lane_sums(i0, i1, [R, &mu2](Index i, int l) { return static_cast<double>(std::fabs(R[i * kLanes + l] - mu2[l])); },
            s);
  for (int l = 0; l < kLanes; ++l) a2[l] = static_cast<float>(s[l] * inv);
  lane_sums(i0, i1, [&](Index i, int l) {
    const float x = X[i * kLanes + l];
    const float d = x - (step_value<Z>(x, mu1[l], a1[l]) + step_value<Z>(R[i * kLanes + l], mu2[l], a2[l]));
    return static_cast<double>(d) * d;
  }, e);
}

template <bool Z>
inline void structural_rows(const Matrix& T, const std::vector<Index>& order, Index r0, Index r1, int kmin, int kmax,
                            int sal_order, int rest_order, bool shift, std::vector<double>& err) {
  const Index nb = T.cols();
  std::vector<float> X(static_cast<std::size_t>(nb * kLanes)), R(X.size());
  double ea[kLanes], eb[kLanes];
  for (Index g0 = r0; g0 < r1; g0 += kLanes) {
    const int lanes = static_cast<int>(std::min<Index>(kLanes, r1 - g0));
    // Rows side by side, columns permuted into `order`: for every k the salient side is
    // i in [0, k) and the rest i in [k, nb).
    for (Index i = 0; i < nb; ++i)
      for (int l = 0; l < kLanes; ++l) X[i * kLanes + l] = l < lanes ? T(g0 + l, order[i]) : 0.0f;
    for (int k = kmin; k <= kmax; ++k) {
      lane_errors<Z>(X.data(), 0, k, sal_order, shift, R.data(), ea);
      lane_errors<Z>(X.data(), k, nb, rest_order, shift, R.data(), eb);
      for (int l = 0; l < lanes; ++l) err[k - kmin] += ea[l] + eb[l];
    }
  }
}

}  // namespace detail

struct SearchResult {
  int best = 0;                 // (A): k*; (B): index of p* among the candidates
  std::vector<double> errors;   // Σ of squared errors over the block per candidate (mean × rows·nb)
};

// For k in [kmin, kmax]: salient = the first k columns of `order`, the rest of the block is the
// other group; both binarized per row (orders sal_order / rest_order) on T; the error is
// Σ (T − approx)² over the block. The first minimum wins (strict <, as the code).
inline SearchResult structural_search(const Matrix& T, const std::vector<Index>& order, int kmin, int kmax,
                                      int sal_order, int rest_order, BinarizerStyle style) {
  const Index rows = T.rows(), nb = T.cols();
  const int K = kmax - kmin + 1;
  if (K < 1 || kmin < 1 || kmax > nb || sal_order < 1 || rest_order < 1)
    throw std::invalid_argument("billm structural_search: bad k range or order");
  std::vector<std::vector<double>> parts(row_chunks(rows), std::vector<double>(K, 0.0));
  for_row_chunks(rows, [&](Index c, Index r0, Index r1) {
    if (style.zero_sign_is_zero)
      detail::structural_rows<true>(T, order, r0, r1, kmin, kmax, sal_order, rest_order, style.mean_shift, parts[c]);
    else
      detail::structural_rows<false>(T, order, r0, r1, kmin, kmax, sal_order, rest_order, style.mean_shift, parts[c]);
  });
  SearchResult out;
  out.errors = merge_chunks(parts, K);
  double best = std::numeric_limits<double>::infinity();
  out.best = kmin;
  for (int i = 0; i < K; ++i)
    if (out.errors[i] < best) {
      best = out.errors[i];
      out.best = kmin + i;
    }
  return out;
}

// ---- (B) break-point candidates and search -------------------------------------------------------

// split_points levels evenly spaced in [split_min, split_max] (linspace).
inline std::vector<double> split_levels(const Options& o) {
  std::vector<double> l(o.split_points);
  for (int i = 0; i < o.split_points; ++i)
    l[i] = o.split_points == 1 ? o.split_min
                               : o.split_min + (o.split_max - o.split_min) * i / static_cast<double>(o.split_points - 1);
  return l;
}

namespace detail {

// Puts the order statistics at the sorted, distinct positions [tb, te) (all in [lo, hi)) of a in
// place (a[t] = the t-th smallest).
template <class V>
inline void select_positions(V* a, Index lo, Index hi, const Index* tb, const Index* te) {
  while (tb != te) {
    if (hi - lo <= 1024) {
      std::sort(a + lo, a + hi);
      return;
    }
    const Index* mid = tb + (te - tb) / 2;
    std::nth_element(a + lo, a + *mid, a + hi);
    const Index m = *mid;
    select_positions(a, lo, m, tb, mid);
    lo = m + 1;
    tb = mid + 1;
  }
}

// The order statistics at the sorted, distinct positions `pos` of `keys`: the bit patterns of
// non-negative floats, whose unsigned order is their numeric order. Two-level radix selection,
// parallel and O(n): a histogram of the top 16 bits locates each position's bucket, the
// elements of the targeted buckets are gathered (fixed segments, fixed offsets) and selected
// within their bucket. Order statistics are values, so the result is independent of the schedule.
struct SelectBuffers {
  std::vector<std::vector<std::uint32_t>> hist;
  std::vector<std::uint32_t> gathered;
};

inline std::vector<std::uint32_t> select_keys(const std::vector<std::uint32_t>& keys, const std::vector<Index>& pos,
                                              SelectBuffers& buf) {
  constexpr int kBuckets = 1 << 15;  // keys >> 16 of non-negative floats (bit 31 clear)
  constexpr Index kSegment = 1 << 16;
  const Index n = static_cast<Index>(keys.size()), segments = (n + kSegment - 1) / kSegment;
  std::vector<std::uint32_t> out(pos.size());
  if (pos.empty()) return out;
  // 1. Histogram of the top 16 bits (integer counts: any merge order gives the same totals).
  auto& hist = buf.hist;
  if (static_cast<Index>(hist.size()) < segments) hist.resize(segments);
  tbb::parallel_for(Index{0}, segments, [&](Index g) {
    auto& h = hist[g];
    h.assign(kBuckets, 0);
    for (Index i = g * kSegment, e = std::min(n, i + kSegment); i < e; ++i) ++h[keys[i] >> 16];
  });
  std::vector<Index> start(kBuckets + 1, 0);
  for (int b = 0; b < kBuckets; ++b) {
    Index c = 0;
    for (Index g = 0; g < segments; ++g) c += hist[g][b];
    start[b + 1] = start[b] + c;
  }
  // 2. The bucket of every position; the targeted buckets get slots.
  std::vector<int> bucket_of(pos.size()), slot_of(kBuckets, -1);
  std::vector<int> slot_bucket;
  for (std::size_t t = 0; t < pos.size(); ++t) {
    const int b = static_cast<int>(std::upper_bound(start.begin(), start.end(), pos[t]) - start.begin()) - 1;
    bucket_of[t] = b;
    if (slot_of[b] < 0) {
      slot_of[b] = static_cast<int>(slot_bucket.size());
      slot_bucket.push_back(b);
    }
  }
  const int slots = static_cast<int>(slot_bucket.size());
  // 3. Gather the targeted buckets: offsets per (segment, slot) from the histograms, then scatter.
  std::vector<Index> slot_start(slots + 1, 0);
  for (int s = 0; s < slots; ++s) slot_start[s + 1] = slot_start[s] + (start[slot_bucket[s] + 1] - start[slot_bucket[s]]);
  std::vector<Index> offset(static_cast<std::size_t>(segments * slots));
  for (int s = 0; s < slots; ++s) {
    Index o = slot_start[s];
    for (Index g = 0; g < segments; ++g) {
      offset[g * slots + s] = o;
      o += hist[g][slot_bucket[s]];
    }
  }
  auto& gathered = buf.gathered;
  gathered.resize(static_cast<std::size_t>(slot_start[slots]));
  tbb::parallel_for(Index{0}, segments, [&](Index g) {
    Index* off = offset.data() + g * slots;
    for (Index i = g * kSegment, e = std::min(n, i + kSegment); i < e; ++i) {
      const int s = slot_of[keys[i] >> 16];
      if (s >= 0) gathered[off[s]++] = keys[i];
    }
  });
  // 4. Select inside each slot.
  tbb::parallel_for(0, slots, [&](int s) {
    const Index b0 = start[slot_bucket[s]];
    std::vector<Index> local;
    for (std::size_t t = 0; t < pos.size(); ++t)
      if (bucket_of[t] == slot_bucket[s]) local.push_back(pos[t] - b0);
    std::uint32_t* a = gathered.data() + slot_start[s];
    select_positions(a, 0, slot_start[s + 1] - slot_start[s], local.data(), local.data() + local.size());
  });
  for (std::size_t t = 0; t < pos.size(); ++t)
    out[t] = gathered[slot_start[slot_of[bucket_of[t]]] + (pos[t] - start[bucket_of[t]])];
  return out;
}

inline std::uint32_t key_of(float x) {
  std::uint32_t k;
  std::memcpy(&k, &x, sizeof k);
  return k;
}
inline float float_of(std::uint32_t k) {
  float x;
  std::memcpy(&x, &k, sizeof x);
  return x;
}

// numpy's "linear" quantiles of n = zeros + keys.size() values, `zeros` of them 0 and the rest
// given as keys (non-negative floats), see quantiles_linear.
inline std::vector<float> quantiles_of_keys(const std::vector<std::uint32_t>& keys, Index zeros,
                                            const std::vector<double>& levels, SelectBuffers& buf) {
  const Index n = static_cast<Index>(keys.size()) + zeros;
  std::vector<float> out(levels.size(), 0.0f);
  if (n == 0) return out;
  std::vector<Index> pos;
  std::vector<std::pair<Index, double>> at(levels.size());
  for (std::size_t i = 0; i < levels.size(); ++i) {
    const double h = levels[i] * static_cast<double>(n - 1);
    const Index lo = std::clamp<Index>(static_cast<Index>(std::floor(h)), 0, n - 1);
    at[i] = {lo, h - static_cast<double>(lo)};
    for (Index p : {lo, std::min(lo + 1, n - 1)})
      if (p >= zeros) pos.push_back(p - zeros);
  }
  std::sort(pos.begin(), pos.end());
  pos.erase(std::unique(pos.begin(), pos.end()), pos.end());
  const auto sel = select_keys(keys, pos, buf);
  auto stat = [&](Index p) -> double {
    if (p < zeros) return 0.0;
    return static_cast<double>(float_of(sel[std::lower_bound(pos.begin(), pos.end(), p - zeros) - pos.begin()]));
  };
  for (std::size_t i = 0; i < levels.size(); ++i) {
    const auto [lo, g] = at[i];
    const double a = stat(lo), b = stat(std::min(lo + 1, n - 1)), diff = b - a;
    out[i] = static_cast<float>(g >= 0.5 ? b - diff * (1.0 - g) : a + diff * g);
  }
  return out;
}

}  // namespace detail

// numpy.quantile(values, levels) with the default "linear" method: h = q·(n − 1), a = x[⌊h⌋],
// b = x[⌊h⌋ + 1], γ = h − ⌊h⌋, value a + (b − a)·γ, or b − (b − a)·(1 − γ) when γ >= 0.5 (numpy's
// _lerp), in double, rounded to float. `zeros` extra values equal to 0 precede `values` (which
// must be >= 0): the salient columns' zeros without materialising them.
inline std::vector<float> quantiles_linear(const std::vector<float>& values, Index zeros,
                                           const std::vector<double>& levels) {
  std::vector<std::uint32_t> keys(values.size());
  for (std::size_t i = 0; i < values.size(); ++i) keys[i] = detail::key_of(values[i] + 0.0f);  // -0 -> +0
  detail::SelectBuffers buf;
  return detail::quantiles_of_keys(keys, zeros, levels, buf);
}

// Faithful candidates: quantiles of |T| over the whole block with the salient columns set to 0
// (their zeros included, as the code's np.quantile over the flattened masked matrix).
// Buffers reused from block to block (large allocations fault their pages in every time).
struct QuantileBuffers {
  std::vector<std::uint32_t> keys;
  detail::SelectBuffers select;
};

inline std::vector<float> quantile_breakpoints(const Matrix& T, const std::vector<std::uint8_t>& salient,
                                               const std::vector<double>& levels, QuantileBuffers* buffers = nullptr) {
  QuantileBuffers local;
  QuantileBuffers& buf = buffers != nullptr ? *buffers : local;
  const Index rows = T.rows(), nb = T.cols();
  Index ns = 0;
  for (auto s : salient) ns += s != 0;
  const Index per_row = nb - ns;
  auto& keys = buf.keys;
  keys.resize(static_cast<std::size_t>(rows * per_row));
  for_row_chunks(rows, [&](Index, Index r0, Index r1) {
    for (Index r = r0; r < r1; ++r) {
      std::uint32_t* out = keys.data() + r * per_row;
      for (Index j = 0; j < nb; ++j)
        if (!salient[j]) *out++ = detail::key_of(std::fabs(T(r, j)));
    }
  });
  return detail::quantiles_of_keys(keys, rows * ns, levels, buf.select);
}

// Paper candidates (Alg. 2): level · max |T| over the non-salient weights of the block.
inline std::vector<float> max_fraction_breakpoints(const Matrix& T, const std::vector<std::uint8_t>& salient,
                                                   const std::vector<double>& levels) {
  float mx = 0.0f;
  for (Index r = 0; r < T.rows(); ++r)
    for (Index j = 0; j < T.cols(); ++j)
      if (!salient[j]) mx = std::max(mx, std::fabs(T(r, j)));
  std::vector<float> out(levels.size());
  for (std::size_t i = 0; i < levels.size(); ++i) out[i] = static_cast<float>(levels[i] * mx);
  return out;
}

// Is a non-salient value with key |t| in the concentrated group for break-point p?
inline bool concentrated(float key, float p, bool inclusive_low) { return inclusive_low ? key <= p : key < p; }

namespace detail {

// Per lane: the order-1 errors of the two groups U[i·kLanes + l], i < m[l] (concentrated) and
// m[l] <= i < n (sparse), summed. Explicit loops with the group as a 0/1 weight (branch-free):
// every sum has 2 interleaved partials per group and lane.
template <bool Z>
inline void split_lane_errors(const float* U, Index n, const int* m, bool shift, double* e) {
  using binarize_detail::step_value;
  float muc[kLanes] = {}, mus[kLanes] = {}, ac[kLanes], as[kLanes];
  double invc[kLanes], invs[kLanes];
  for (int l = 0; l < kLanes; ++l) {
    invc[l] = m[l] > 0 ? 1.0 / static_cast<double>(m[l]) : 0.0;
    invs[l] = n - m[l] > 0 ? 1.0 / static_cast<double>(n - m[l]) : 0.0;
  }
  double c0[kLanes], c1[kLanes], s0[kLanes], s1[kLanes];
  auto reset = [&] {
    for (int l = 0; l < kLanes; ++l) c0[l] = c1[l] = s0[l] = s1[l] = 0.0;
  };
  if (shift) {
    reset();
    for (Index i = 0; i < n; ++i) {
      const int ii = static_cast<int>(i);
      double* c = (i & 1) ? c1 : c0;
      double* s = (i & 1) ? s1 : s0;
      for (int l = 0; l < kLanes; ++l) {
        const float x = U[i * kLanes + l], w = static_cast<float>(ii < m[l]);
        c[l] += static_cast<double>(x * w);
        s[l] += static_cast<double>(x - x * w);
      }
    }
    for (int l = 0; l < kLanes; ++l) {
      muc[l] = static_cast<float>((c0[l] + c1[l]) * invc[l]);
      mus[l] = static_cast<float>((s0[l] + s1[l]) * invs[l]);
    }
  }
  reset();
  for (Index i = 0; i < n; ++i) {
    const int ii = static_cast<int>(i);
    double* c = (i & 1) ? c1 : c0;
    double* s = (i & 1) ? s1 : s0;
    for (int l = 0; l < kLanes; ++l) {
      const float x = U[i * kLanes + l], w = static_cast<float>(ii < m[l]);
      c[l] += static_cast<double>(std::fabs(x - muc[l]) * w);
      s[l] += static_cast<double>(std::fabs(x - mus[l]) * (1.0f - w));
    }
  }
  for (int l = 0; l < kLanes; ++l) {
    ac[l] = static_cast<float>((c0[l] + c1[l]) * invc[l]);
    as[l] = static_cast<float>((s0[l] + s1[l]) * invs[l]);
  }
  reset();
  for (Index i = 0; i < n; ++i) {
    const int ii = static_cast<int>(i);
    double* c = (i & 1) ? c1 : c0;
    for (int l = 0; l < kLanes; ++l) {
      const bool g = ii < m[l];
      const float x = U[i * kLanes + l];
      const float mu = g ? muc[l] : mus[l], a = g ? ac[l] : as[l];
      const float d = x - step_value<Z>(x, mu, a);
      c[l] += static_cast<double>(d) * d;
    }
  }
  for (int l = 0; l < kLanes; ++l) e[l] = c0[l] + c1[l];
}

// (B) on rows [r0, r1), kLanes rows at a time: each row's non-salient values sorted by |t| (ties
// by column), so that the concentrated group of a break-point is a prefix of length m.
template <bool Z>
inline void breakpoint_rows(const Matrix& T, const std::vector<std::uint8_t>& salient,
                            const std::vector<float>& candidates, bool inclusive_low, bool shift, Index r0, Index r1,
                            std::vector<double>& err) {
  const Index nb = T.cols();
  Index ns = 0;
  for (auto f : salient) ns += f != 0;
  const Index n = nb - ns;
  std::vector<float> U(static_cast<std::size_t>(std::max<Index>(n, 1) * kLanes)), K(U.size()),
      S(static_cast<std::size_t>(std::max<Index>(ns, 1) * kLanes)), R(S.size());
  std::vector<std::uint64_t> packed(n);
  double sal_err[kLanes], e[kLanes];
  int m[kLanes];
  for (Index g0 = r0; g0 < r1; g0 += kLanes) {
    const int lanes = static_cast<int>(std::min<Index>(kLanes, r1 - g0));
    for (int l = 0; l < kLanes; ++l) {
      if (l >= lanes) {
        for (Index i = 0; i < n; ++i) U[i * kLanes + l] = K[i * kLanes + l] = 0.0f;
        for (Index i = 0; i < ns; ++i) S[i * kLanes + l] = 0.0f;
        continue;
      }
      const float* t = T.data() + (g0 + l) * nb;
      Index a = 0, b = 0;
      for (Index j = 0; j < nb; ++j) {
        if (salient[j])
          S[(a++) * kLanes + l] = t[j];
        else
          packed[b++] = (static_cast<std::uint64_t>(key_of(std::fabs(t[j]))) << 32) | static_cast<std::uint64_t>(j);
      }
      std::sort(packed.begin(), packed.end());
      for (Index i = 0; i < n; ++i) {
        const float x = t[packed[i] & 0xffffffffu];
        U[i * kLanes + l] = x;
        K[i * kLanes + l] = std::fabs(x);
      }
    }
    lane_errors<Z>(S.data(), 0, ns, kSalientOrder, shift, R.data(), sal_err);
    for (std::size_t k = 0; k < candidates.size(); ++k) {
      // m[l] = the size of lane l's concentrated group (a vectorised count, no branches).
      const float p = candidates[k];
      std::fill(m, m + kLanes, 0);
      for (Index i = 0; i < n; ++i)
        for (int l = 0; l < kLanes; ++l)
          m[l] += static_cast<int>(inclusive_low ? K[i * kLanes + l] <= p : K[i * kLanes + l] < p);
      split_lane_errors<Z>(U.data(), n, m, shift, e);
      for (int l = 0; l < lanes; ++l) err[k] += sal_err[l] + e[l];
    }
  }
}

}  // namespace detail

// For each candidate p: non-salient weights split by |T| into concentrated and sparse (order 1
// each), salient columns order 2; error Σ (T − approx)² over the block. First minimum wins.
inline SearchResult breakpoint_search(const Matrix& T, const std::vector<std::uint8_t>& salient,
                                      const std::vector<float>& candidates, bool inclusive_low, BinarizerStyle style) {
  const std::size_t P = candidates.size();
  std::vector<std::vector<double>> parts(row_chunks(T.rows()), std::vector<double>(P, 0.0));
  for_row_chunks(T.rows(), [&](Index c, Index r0, Index r1) {
    if (style.zero_sign_is_zero)
      detail::breakpoint_rows<true>(T, salient, candidates, inclusive_low, style.mean_shift, r0, r1, parts[c]);
    else
      detail::breakpoint_rows<false>(T, salient, candidates, inclusive_low, style.mean_shift, r0, r1, parts[c]);
  });
  SearchResult out;
  out.errors = merge_chunks(parts, P);
  double best = std::numeric_limits<double>::infinity();
  out.best = 0;
  for (std::size_t k = 0; k < P; ++k)
    if (out.errors[k] < best) {
      best = out.errors[k];
      out.best = static_cast<int>(k);
    }
  return out;
}

// ---- one block: decision, binarization -----------------------------------------------------------

struct BlockDecision {
  std::vector<Index> order;             // columns by descending salience score
  int kmin = 1, kmax = 1;               // the k range searched
  SearchResult structural;              // (A): best = k*
  std::vector<std::uint8_t> salient;    // per column of the block
  std::vector<float> candidates;        // (B) break-point candidates
  SearchResult split;                   // (B): best = index of p*
  float breakpoint = 0.0f;              // p*, in the units of T
};

// (A) and (B) for one block: Wb its current weights, d the block's salience denominators.
// Returns the decision and leaves T (the search target whose |T| defines the groups) in *target
// (which is also the salience's storage; pass the same matrix from block to block to reuse it).
inline BlockDecision decide_block(const Matrix& Wb, const Eigen::VectorXf& d, const Options& o, Matrix* target,
                                  QuantileBuffers* buffers = nullptr) {
  BlockDecision dec;
  const Index nb = Wb.cols();
  Matrix local;
  Matrix& S = target != nullptr ? *target : local;
  salience_matrix(Wb, d, o.metric, S);
  dec.order = rank_columns(S);
  if (o.search_on_weights()) S = Wb;  // paper: S only ranks the columns
  const Matrix& T = S;
  std::tie(dec.kmin, dec.kmax) = salient_range(o, nb);
  dec.structural = structural_search(T, dec.order, dec.kmin, dec.kmax, o.search_salient_order, o.search_rest_order,
                                     o.style());
  dec.salient.assign(nb, 0);
  for (int i = 0; i < dec.structural.best; ++i) dec.salient[dec.order[i]] = 1;
  const auto levels = split_levels(o);
  dec.candidates = o.max_fraction_breakpoints ? max_fraction_breakpoints(T, dec.salient, levels)
                                              : quantile_breakpoints(T, dec.salient, levels, buffers);
  dec.split = breakpoint_search(T, dec.salient, dec.candidates, o.inclusive_low(), o.style());
  dec.breakpoint = dec.candidates.empty() ? 0.0f : dec.candidates[dec.split.best];
  return dec;
}

// (C) for one row: w, t the row's weights and search targets (nb each); q receives the binarized
// row. Scratch: 5·nb floats and nb indices.
inline void binarize_row(const float* w, const float* t, float* q, Index nb, const std::vector<std::uint8_t>& salient,
                         float p, bool inclusive_low, BinarizerStyle style, float* scratch, Index* at) {
  float* v = scratch;
  float* a = scratch + nb;
  float* tmp = scratch + 2 * nb;
  // Three groups, each in column order: 0 concentrated, 1 sparse, 2 salient.
  for (int g = 0; g < 3; ++g) {
    std::ptrdiff_t n = 0;
    for (Index j = 0; j < nb; ++j) {
      const int gj = salient[j] ? 2 : (concentrated(std::fabs(t[j]), p, inclusive_low) ? 0 : 1);
      if (gj == g) {
        v[n] = w[j];
        at[n++] = j;
      }
    }
    if (n == 0) continue;
    residual_binarize(v, a, n, g == 2 ? kSalientOrder : (g == 0 ? kConcentratedOrder : kSparseOrder), style, tmp);
    for (std::ptrdiff_t i = 0; i < n; ++i) q[at[i]] = a[i];
  }
}

// (C) for a whole block.
inline Matrix binarize_block(const Matrix& Wb, const Matrix& T, const std::vector<std::uint8_t>& salient, float p,
                             bool inclusive_low, BinarizerStyle style) {
  const Index nb = Wb.cols();
  Matrix Q(Wb.rows(), nb);
  for_row_chunks(Wb.rows(), [&](Index, Index r0, Index r1) {
    std::vector<float> scratch(5 * nb);
    std::vector<Index> at(nb);
    for (Index r = r0; r < r1; ++r)
      binarize_row(Wb.data() + r * nb, T.data() + r * nb, Q.data() + r * nb, nb, salient, p, inclusive_low, style,
                   scratch.data(), at.data());
  });
  return Q;
}

// ---- the block loop -----------------------------------------------------------------------------

struct BlockRecord {
  Index b0 = 0, b1 = 0;
  int salient = 0;          // k*
  float breakpoint = 0.0f;  // p*
  std::vector<std::uint8_t> salient_columns;
};

// (D) for one block [b0, b0 + nb) of W, shared with ARB-LLM (plugins/quantizer/arbllm): row chunk
// by row chunk, quantize_rows(r0, r1, Q) writes the quantized rows [r0, r1) of the block into Q
// (nr × nb), which replace them in W; unless `propagate` is false, their errors
// E = (Wb − Q)/U_jj are pushed to the later columns, W[:, b1:] −= E U[b0:b1, b1:] (no in-block
// updates). Wb: the block as it arrived; u_diag: diag U (float); Ub: scratch.
template <class QuantizeRows>
inline void compensate_block(Matrix& W, const Eigen::MatrixXd& U, const Matrix& Wb, Index b0,
                             const Eigen::VectorXf& u_diag, bool propagate, Eigen::MatrixXf& Ub,
                             QuantizeRows&& quantize_rows) {
  const Index rows = W.rows(), cols = W.cols(), nb = Wb.cols(), b1 = b0 + nb, rest = cols - b1;
  propagate = propagate && rest > 0;
  if (propagate) {
    Ub.resize(nb, rest);  // U[b0:b1, b1:] in float, column-major
    constexpr Index kColChunk = 512;
    tbb::parallel_for(
        tbb::blocked_range<Index>(0, (rest + kColChunk - 1) / kColChunk, 1),
        [&](const tbb::blocked_range<Index>& range) {
          for (Index c = range.begin(); c < range.end(); ++c) {
            const Index c0 = c * kColChunk, n = std::min(kColChunk, rest - c0);
            Ub.middleCols(c0, n) = U.block(b0, b1 + c0, nb, n).cast<float>();
          }
        },
        tbb::simple_partitioner());
  }
  for_row_chunks(rows, [&](Index, Index r0, Index r1) {
    const Index nr = r1 - r0;
    Matrix Q(nr, nb), E(nr, nb);
    quantize_rows(r0, r1, Q);
    for (Index i = 0; i < nr; ++i)
      for (Index j = 0; j < nb; ++j) E(i, j) = (Wb(r0 + i, j) - Q(i, j)) / u_diag(b0 + j);
    W.block(r0, b0, nr, nb) = Q;
    if (propagate) W.block(r0, b1, nr, rest).noalias() -= E * Ub;
  });
}

// BiLLM on W ([rows, cols], in place) with U the upper Cholesky factor of the dampened H⁻¹
// (prepare_inverse_hessian). Returns one record per block.
inline std::vector<BlockRecord> quantize_weight(Matrix& W, const Eigen::MatrixXd& U, const Options& o) {
  const Index cols = W.cols();
  if (U.rows() != cols || U.cols() != cols) throw std::invalid_argument("billm: U does not match the weight");
  if (o.block_size < 1) throw std::invalid_argument("billm: block size must be >= 1");
  const Eigen::VectorXf d_sal = salience_denominators(U, o.inverse_diagonal);
  const Eigen::VectorXf u_diag = U.diagonal().cast<float>();
  const BinarizerStyle style = o.style();
  std::vector<BlockRecord> records;
  Matrix Wb, T;
  QuantileBuffers qbuf;
  Eigen::MatrixXf Ub;
  for (Index b0 = 0; b0 < cols; b0 += o.block_size) {
    const Index b1 = std::min(b0 + o.block_size, cols), nb = b1 - b0;
    Wb = W.middleCols(b0, nb);
    const BlockDecision dec = decide_block(Wb, d_sal.segment(b0, nb), o, &T, &qbuf);
    // (C) and (D), row chunk by row chunk.
    compensate_block(W, U, Wb, b0, u_diag, !o.disable_gptq, Ub, [&](Index r0, Index r1, Matrix& Q) {
      std::vector<float> scratch(5 * nb);
      std::vector<Index> at(nb);
      for (Index r = r0; r < r1; ++r)
        binarize_row(Wb.data() + r * nb, T.data() + r * nb, Q.data() + (r - r0) * nb, nb, dec.salient,
                     dec.breakpoint, o.inclusive_low(), style, scratch.data(), at.data());
    });
    BlockRecord rec;
    rec.b0 = b0;
    rec.b1 = b1;
    rec.salient = dec.structural.best;
    rec.breakpoint = dec.breakpoint;
    rec.salient_columns = dec.salient;
    records.push_back(std::move(rec));
  }
  return records;
}

// ---- bit ledger (§2.5) ----------------------------------------------------------------------------

// paper  = 1 sign per weight + 1 more per salient weight (N_param = 2·r_sal + (1 − r_sal));
// all-in = paper signs (payload)
//        + 4 FP16 α per row per block (concentrated, sparse, salient order 1 and 2) (scales)
//        + 4 FP16 μ per row per block when the binarizer is mean-shifted (zeros)
//        + 1 bit per non-salient weight (concentrated/sparse bitmap) + 1 bit per column (the
//          per-block salient-column bitmap, nb bits per block) (masks).
inline BitCount ledger(Index rows, Index cols, Index block_size, const std::vector<int>& salient_per_block,
                       bool mean_shift) {
  BitCount b;
  const Index blocks = (cols + block_size - 1) / block_size;
  if (static_cast<Index>(salient_per_block.size()) != blocks) throw std::invalid_argument("billm ledger: blocks");
  double salient_cols = 0;
  for (int k : salient_per_block) salient_cols += k;
  const double r = static_cast<double>(rows), n = r * static_cast<double>(cols);
  b.weights = rows * cols;
  b.payload = n + r * salient_cols;
  b.scales = 16.0 * 4.0 * r * static_cast<double>(blocks);
  b.zeros = mean_shift ? 16.0 * 4.0 * r * static_cast<double>(blocks) : 0.0;
  b.masks = (n - r * salient_cols) + static_cast<double>(cols);
  b.paper = b.payload;
  return b;
}

}  // namespace ptqlab::billm
