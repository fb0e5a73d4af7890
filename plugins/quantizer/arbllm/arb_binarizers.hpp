#pragma once
// ARB-LLM's per-group binarizers (research/arbllm.md §3; docs/methods/arbllm.md), header only: the
// arbllm plugin and tests/test_arbllm.cpp compile their own copies.
//
// Each binarizer takes a block X (rows × n, the block's weights or, inside the searches, its
// salience) and one group's mask M (rows × n, nonzero = member) and writes its reconstruction into
// Q at the members only (other entries are left alone, so the groups of a block can be written
// into one matrix). All of them start from BiLLM's one-shot binarizer (core binarize.hpp, shared)
// and then refine it by exact coordinate descent:
//   ARB   (order 1 / 2): per row, μ → α (→ α₂) → signs, `iterations` times (§3.2, §3.3);
//   ARB-X (order 1 / 2): ARB, then `x_iterations` sweeps of μ, α (, α₂) on the input-weighted
//                        loss eᵀ Σ_b e with the signs frozen (§3.4);
//   RC    (order 1 / 2): no μ; a row scale × a column scale per sign plane, each refitted by least
//                        squares, joint sign update for order 2 (§3.5). Column scales couple rows.
// Arithmetic: values, parameters and reconstructions are float32 as in the reference; every sum is
// accumulated in double over fixed lanes or row chunks merged in chunk order, so results do not
// depend on the thread count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "ptqlab/model/model.hpp"
#include "ptqlab/quant/billm_algo.hpp"
#include "ptqlab/quant/binarize.hpp"

namespace ptqlab::arbllm {

using Eigen::Index;
using Mask = std::vector<std::uint8_t>;

struct Refinement {
  int iterations = 15;     // T: ARB / RC alternating iterations (hard-coded 15 in binary_arb.py)
  int x_iterations = 15;   // ARB-X input-weighted sweeps (iter2 = 15)
  double eps = 1e-8;       // ARB α and RC scale denominators
  double x_eps = 1e-10;    // ARB-X denominators
  bool x_from_init = false;  // paper (Fig. 4, §3.2): the X sweeps start from the initial
                             // binarization (no ARB stage); code: after the full ARB stage
  // Reductions used by the tests (not plugin parameters):
  bool fit_mean = true;       // false: μ ≡ 0 in ARB (a zero-mean binarizer)
  bool unit_columns = false;  // true: RC column scales frozen at 1
};

namespace detail {

inline float sgn0(float d) { return static_cast<float>(d > 0.0f) - static_cast<float>(d < 0.0f); }

// The index in [(−,−), (−,+), (+,−), (+,+)] of the pair (b₁ g₁ + b₂ g₂) closest to t, the first on
// ties (torch.argmin over the stacked candidates).
inline int closest_pair(float t, float g1, float g2) {
  const float v[4] = {-g1 - g2, -g1 + g2, g1 - g2, g1 + g2};
  int best = 0;
  float bd = std::fabs(t - v[0]);
  for (int i = 1; i < 4; ++i) {
    const float d = std::fabs(t - v[i]);
    if (d < bd) {
      bd = d;
      best = i;
    }
  }
  return best;
}
inline float pair_b1(int i) { return i < 2 ? -1.0f : 1.0f; }
inline float pair_b2(int i) { return (i == 0 || i == 2) ? -1.0f : 1.0f; }

template <class F>
inline double sum(Index n, F&& f) {
  return binarize_detail::lane_sum(static_cast<std::ptrdiff_t>(n), [&](std::ptrdiff_t i) { return f(i); });
}

}  // namespace detail

// One row's fitted ARB parameters (order 1 uses mu, a1).
struct RowFit {
  float mu = 0.0f, a1 = 0.0f, a2 = 0.0f;
};

// ARB on one row's m members v (§3.2 order 1, §3.3 order 2). b1, b2 receive the signs; q the
// reconstruction. trace (optional, T + 1 entries) accumulates Σ (v − q)² after the initialisation
// and after every iteration. With T = 0 the result is BiLLM's binarizer, operation for operation.
inline RowFit arb_row(const float* v, Index m, int order, const Refinement& s, float* b1, float* b2, float* q,
                      double* trace = nullptr) {
  using detail::sgn0;
  using detail::sum;
  RowFit f;
  if (m <= 0) return f;
  BinarizerStyle style;
  style.mean_shift = s.fit_mean;
  const double inv_m = 1.0 / static_cast<double>(m);
  const BinaryCoeffs c1 = binary_coeffs(v, m, style);  // BiLLM's first order
  for (Index i = 0; i < m; ++i) b1[i] = sgn0(v[i] - c1.mu);
  auto loss = [&](auto&& value) { return sum(m, [&](Index i) { const double e = v[i] - value(i); return e * e; }); };
  if (order == 1) {
    f.mu = c1.mu;
    f.a1 = c1.alpha;
    if (trace) trace[0] += loss([&](Index i) { return f.a1 * b1[i] + f.mu; });
    for (int t = 0; t < s.iterations; ++t) {
      if (s.fit_mean) {
        const RowFit g = f;
        f.mu = static_cast<float>(sum(m, [&](Index i) { return v[i] - g.a1 * b1[i]; }) * inv_m);
      }
      const float mu = f.mu;
      // α for the signs that produced the current residual, then the signs of the new μ.
      f.a1 = static_cast<float>(sum(m, [&](Index i) { return b1[i] * (v[i] - mu); }) /
                                (sum(m, [&](Index i) { return b1[i] * b1[i]; }) + s.eps));
      for (Index i = 0; i < m; ++i) b1[i] = sgn0(v[i] - mu);
      if (trace) trace[t + 1] += loss([&](Index i) { return f.a1 * b1[i] + f.mu; });
    }
    for (Index i = 0; i < m; ++i) q[i] = f.a1 * b1[i] + f.mu;
    return f;
  }
  if (order != 2) throw std::invalid_argument("arb_row: order must be 1 or 2");
  // BiLLM's second order on the residual r = v − q₁ (q stores r for now).
  for (Index i = 0; i < m; ++i) q[i] = v[i] - binarize_detail::step_value<true>(v[i], c1.mu, c1.alpha);
  const BinaryCoeffs c2 = binary_coeffs(q, m, style);
  for (Index i = 0; i < m; ++i) b2[i] = sgn0(q[i] - c2.mu);
  f.a1 = c1.alpha;
  f.a2 = c2.alpha;
  if (s.iterations == 0 || trace) {
    // q₁ + q₂ exactly as core binarize.hpp computes them (residual_binarize).
    for (Index i = 0; i < m; ++i)
      q[i] = (0.0f + binarize_detail::step_value<true>(v[i], c1.mu, c1.alpha)) +
             binarize_detail::step_value<true>(q[i], c2.mu, c2.alpha);
    if (trace) trace[0] += loss([&](Index i) { return q[i]; });
  }
  f.mu = c1.mu + c2.mu;  // one combined shift from here on
  if (s.iterations == 0) return f;
  for (int t = 0; t < s.iterations; ++t) {
    if (s.fit_mean) {
      const RowFit g = f;
      f.mu = static_cast<float>(sum(m, [&](Index i) { return v[i] - g.a1 * b1[i] - g.a2 * b2[i]; }) * inv_m);
    }
    const float mu = f.mu;
    const double n1 = sum(m, [&](Index i) { return b1[i] * b1[i]; }) + s.eps;
    const double n2 = sum(m, [&](Index i) { return b2[i] * b2[i]; }) + s.eps;
    const float a2_old = f.a2;
    f.a1 = static_cast<float>(sum(m, [&](Index i) { return b1[i] * (v[i] - mu - a2_old * b2[i]); }) / n1);
    const float a1 = f.a1;
    f.a2 = static_cast<float>(sum(m, [&](Index i) { return b2[i] * (v[i] - mu - a1 * b1[i]); }) / n2);
    for (Index i = 0; i < m; ++i) {
      const int k = detail::closest_pair(v[i] - mu, f.a1, f.a2);
      b1[i] = detail::pair_b1(k);
      b2[i] = detail::pair_b2(k);
    }
    if (trace) trace[t + 1] += loss([&](Index i) { return f.a1 * b1[i] + f.a2 * b2[i] + f.mu; });
  }
  for (Index i = 0; i < m; ++i) q[i] = f.a1 * b1[i] + f.a2 * b2[i] + f.mu;
  return f;
}

namespace detail {

// Gathers row r's members of M: their values into v, their columns into at; returns the count.
inline Index gather_row(const Matrix& X, const std::uint8_t* mask, Index r, float* v, Index* at) {
  const Index n = X.cols();
  const float* x = X.data() + r * n;
  const std::uint8_t* mr = mask + r * n;
  Index m = 0;
  for (Index j = 0; j < n; ++j)
    if (mr[j]) {
      v[m] = x[j];
      at[m++] = j;
    }
  return m;
}

inline void check_shapes(const Matrix& X, const Mask& M, const Matrix& Q, int order, const char* what) {
  if (static_cast<Index>(M.size()) != X.size() || Q.rows() != X.rows() || Q.cols() != X.cols())
    throw std::invalid_argument(std::string(what) + ": shapes do not match");
  if (order != 1 && order != 2) throw std::invalid_argument(std::string(what) + ": order must be 1 or 2");
}

}  // namespace detail

// ARB (method `arb`) of one group: every row independently (arb_row). trace: T + 1 entries.
inline void arb_group(const Matrix& X, const Mask& M, int order, const Refinement& s, Matrix& Q,
                      std::vector<double>* trace = nullptr) {
  detail::check_shapes(X, M, Q, order, "arb_group");
  const Index rows = X.rows(), n = X.cols();
  std::vector<std::vector<double>> parts(billm::row_chunks(rows), std::vector<double>(s.iterations + 1, 0.0));
  billm::for_row_chunks(rows, [&](Index c, Index r0, Index r1) {
    std::vector<float> v(n), b1(n), b2(n), q(n);
    std::vector<Index> at(n);
    for (Index r = r0; r < r1; ++r) {
      const Index m = detail::gather_row(X, M.data(), r, v.data(), at.data());
      arb_row(v.data(), m, order, s, b1.data(), b2.data(), q.data(), trace ? parts[c].data() : nullptr);
      for (Index i = 0; i < m; ++i) Q(r, at[i]) = q[i];
    }
  });
  if (trace) *trace = billm::merge_chunks(parts, static_cast<std::size_t>(s.iterations + 1));
}

// ARB-X (method `arb-x`) of one group (§3.4): ARB (or, with x_from_init, only its initialisation),
// then x_iterations coordinate sweeps of μ, α₁ (, α₂) minimising the row's input-weighted error
// e_rᵀ Σ e_r, e_r = (w − q) on the row's members, with the signs frozen. Σ: the block's n × n Gram
// matrix of the calibration inputs. The sweeps need only inner products of P = (M or B̃)·Σ rows
// with W̃, M, B̃, computed once (three GEMMs per row chunk, no rows × n × n tensors).
// trace_x (optional): Σ_r e_rᵀ Σ e_r after the ARB stage and after every sweep (x_iterations + 1).
inline void arbx_group(const Matrix& X, const Mask& M, int order, const Eigen::MatrixXf& Sigma, const Refinement& s,
                       Matrix& Q, std::vector<double>* trace_x = nullptr) {
  detail::check_shapes(X, M, Q, order, "arbx_group");
  const Index rows = X.rows(), n = X.cols();
  if (Sigma.rows() != n || Sigma.cols() != n) throw std::invalid_argument("arbx_group: Sigma does not match the block");
  Refinement stage = s;
  if (s.x_from_init) stage.iterations = 0;
  const int X2 = s.x_iterations + 1;
  std::vector<std::vector<double>> parts(billm::row_chunks(rows), std::vector<double>(X2, 0.0));
  billm::for_row_chunks(rows, [&](Index c, Index r0, Index r1) {
    const Index nr = r1 - r0;
    // Dense chunk matrices, zero off the mask: W̃, M, B̃₁, B̃₂.
    Eigen::MatrixXf Wt = Eigen::MatrixXf::Zero(nr, n), Mf = Wt, B1 = Wt, B2 = Wt;
    std::vector<RowFit> fit(nr);
    std::vector<float> v(n), b1(n), b2(n), q(n);
    std::vector<Index> at(n);
    for (Index i = 0; i < nr; ++i) {
      const Index m = detail::gather_row(X, M.data(), r0 + i, v.data(), at.data());
      fit[i] = arb_row(v.data(), m, order, stage, b1.data(), b2.data(), q.data());
      for (Index k = 0; k < m; ++k) {
        Wt(i, at[k]) = v[k];
        Mf(i, at[k]) = 1.0f;
        B1(i, at[k]) = b1[k];
        if (order == 2) B2(i, at[k]) = b2[k];
      }
    }
    const Eigen::MatrixXf PM = Mf * Sigma, P1 = B1 * Sigma;
    Eigen::MatrixXf P2;
    if (order == 2) P2 = B2 * Sigma;
    auto dot = [&](const Eigen::MatrixXf& P, const Eigen::MatrixXf& A, Index i) {
      double acc = 0.0;
      for (Index j = 0; j < n; ++j) acc += static_cast<double>(P(i, j)) * A(i, j);
      return acc;
    };
    for (Index i = 0; i < nr; ++i) {
      RowFit& f = fit[i];
      const double dmu = dot(PM, Mf, i) + s.x_eps, d1 = dot(P1, B1, i) + s.x_eps;
      const double mw = dot(PM, Wt, i), mb1 = dot(PM, B1, i), w1 = dot(P1, Wt, i), m1 = dot(P1, Mf, i);
      double d2 = 0, mb2 = 0, w2 = 0, m2 = 0, b12 = 0, b21 = 0;
      if (order == 2) {
        d2 = dot(P2, B2, i) + s.x_eps;
        mb2 = dot(PM, B2, i);
        w2 = dot(P2, Wt, i);
        m2 = dot(P2, Mf, i);
        b12 = dot(P1, B2, i);
        b21 = dot(P2, B1, i);
      }
      // L2 = eᵀΣe with e = w̃ − μ m − α₁ b̃₁ − α₂ b̃₂ on the members (for the trace only).
      auto l2 = [&]() {
        const double mu = f.mu, a1 = f.a1, a2 = f.a2;
        double acc = 0.0;
        for (Index j = 0; j < n; ++j) {
          if (Mf(i, j) == 0.0f) continue;
          double ej_sigma = 0.0;
          for (Index k = 0; k < n; ++k) {
            if (Mf(i, k) == 0.0f) continue;
            const double ek = Wt(i, k) - (mu + a1 * B1(i, k) + a2 * B2(i, k));
            ej_sigma += ek * Sigma(k, j);
          }
          acc += ej_sigma * (Wt(i, j) - (mu + a1 * B1(i, j) + a2 * B2(i, j)));
        }
        return acc;
      };
      if (trace_x) parts[c][0] += l2();
      for (int t = 0; t < s.x_iterations; ++t) {
        f.mu = static_cast<float>((mw - f.a1 * mb1 - f.a2 * mb2) / dmu);
        f.a1 = static_cast<float>((w1 - f.mu * m1 - f.a2 * b12) / d1);
        if (order == 2) f.a2 = static_cast<float>((w2 - f.mu * m2 - f.a1 * b21) / d2);
        if (trace_x) parts[c][t + 1] += l2();
      }
      const Index r = r0 + i;
      for (Index j = 0; j < n; ++j)
        if (M[static_cast<std::size_t>(r * n + j)]) Q(r, j) = f.a1 * B1(i, j) + f.a2 * B2(i, j) + f.mu;
    }
  });
  if (trace_x) *trace_x = billm::merge_chunks(parts, static_cast<std::size_t>(X2));
}

// The fitted RC parameters of one group: per sign plane p a row scale a[p] (rows), a column scale
// c[p] (n) and the signs B[p] (rows × n, 0 off the mask).
struct RcFit {
  std::vector<Eigen::VectorXf> a, c;
  std::vector<Matrix> B;
};

// ARB-RC (method `arb-rc`) of one group (§3.5): q = Σ_p a[p]_r c[p]_j B[p]_rj on the members.
// Initialisation (order passes on the residual, no mean): a_r = mean |x_r|, c_j = mean over the
// column's members with a_r ≠ 0 of |x_rj| / a_r, B = sgn(x). Each iteration refits, plane by plane
// against X minus the other plane, a (rows, least squares) then c (columns, with the new a); order
// 2 then picks each entry's sign pair from the four candidates. trace: T + 1 entries of Σ (x − q)².
inline RcFit rc_group(const Matrix& X, const Mask& M, int order, const Refinement& s, Matrix& Q,
                      std::vector<double>* trace = nullptr) {
  detail::check_shapes(X, M, Q, order, "rc_group");
  using detail::sgn0;
  const Index rows = X.rows(), n = X.cols();
  const std::size_t chunks = static_cast<std::size_t>(billm::row_chunks(rows));
  auto member = [&](Index r, Index j) { return M[static_cast<std::size_t>(r * n + j)] != 0; };
  RcFit fit;
  Matrix R = Matrix::Zero(rows, n);  // the residual the current plane is fitted to
  for (Index r = 0; r < rows; ++r)
    for (Index j = 0; j < n; ++j)
      if (member(r, j)) R(r, j) = X(r, j);
  // Column sums over row chunks, merged in chunk order: out_j = Σ_r f(r, j), cnt_j = Σ_r g(r, j).
  auto column_sums = [&](auto&& f, auto&& g, std::vector<double>& num, std::vector<double>& den) {
    std::vector<std::vector<double>> pn(chunks, std::vector<double>(n, 0.0)), pd = pn;
    billm::for_row_chunks(rows, [&](Index c, Index r0, Index r1) {
      for (Index r = r0; r < r1; ++r)
        for (Index j = 0; j < n; ++j)
          if (member(r, j)) {
            pn[c][j] += f(r, j);
            pd[c][j] += g(r, j);
          }
    });
    num = billm::merge_chunks(pn, n);
    den = billm::merge_chunks(pd, n);
  };
  std::vector<double> num, den;
  for (int p = 0; p < order; ++p) {
    Eigen::VectorXf a = Eigen::VectorXf::Zero(rows), c = Eigen::VectorXf::Ones(n);
    Matrix B = Matrix::Zero(rows, n);
    billm::for_row_chunks(rows, [&](Index, Index r0, Index r1) {
      for (Index r = r0; r < r1; ++r) {
        double acc = 0.0;
        Index m = 0;
        for (Index j = 0; j < n; ++j)
          if (member(r, j)) {
            acc += std::fabs(R(r, j));
            ++m;
            B(r, j) = sgn0(R(r, j));
          }
        a(r) = m > 0 ? static_cast<float>(acc / static_cast<double>(m)) : 0.0f;
      }
    });
    if (!s.unit_columns) {
      column_sums([&](Index r, Index j) { return a(r) != 0.0f ? static_cast<double>(std::fabs(R(r, j) / a(r))) : 0.0; },
                  [&](Index r, Index) { return a(r) != 0.0f ? 1.0 : 0.0; }, num, den);
      for (Index j = 0; j < n; ++j) c(j) = den[j] > 0 ? static_cast<float>(num[j] / den[j]) : 0.0f;
    }
    for (Index r = 0; r < rows; ++r)
      for (Index j = 0; j < n; ++j)
        if (member(r, j)) R(r, j) -= B(r, j) * a(r) * c(j);
    fit.a.push_back(a);
    fit.c.push_back(c);
    fit.B.push_back(std::move(B));
  }
  auto value = [&](Index r, Index j) {
    float q = 0.0f;
    for (int p = 0; p < order; ++p) q += fit.B[p](r, j) * fit.a[p](r) * fit.c[p](j);
    return q;
  };
  auto loss = [&]() {
    std::vector<std::vector<double>> pl(chunks, std::vector<double>(1, 0.0));
    billm::for_row_chunks(rows, [&](Index c, Index r0, Index r1) {
      for (Index r = r0; r < r1; ++r)
        for (Index j = 0; j < n; ++j)
          if (member(r, j)) {
            const double e = X(r, j) - value(r, j);
            pl[c][0] += e * e;
          }
    });
    return billm::merge_chunks(pl, 1)[0];
  };
  if (trace) trace->assign(s.iterations + 1, 0.0);
  if (trace) (*trace)[0] = loss();
  for (int t = 0; t < s.iterations; ++t) {
    for (int p = 0; p < order; ++p) {
      // Target: X minus the other plane (order 2), on the members.
      auto target = [&](Index r, Index j) {
        float x = X(r, j);
        for (int o = 0; o < order; ++o)
          if (o != p) x -= fit.c[o](j) * fit.a[o](r) * fit.B[o](r, j);
        return x;
      };
      Eigen::VectorXf& a = fit.a[p];
      Eigen::VectorXf& c = fit.c[p];
      const Matrix& B = fit.B[p];
      billm::for_row_chunks(rows, [&](Index, Index r0, Index r1) {
        for (Index r = r0; r < r1; ++r) {
          double nu = 0.0, de = 0.0;
          for (Index j = 0; j < n; ++j)
            if (member(r, j)) {
              const float cb = c(j) * B(r, j);
              nu += static_cast<double>(cb) * target(r, j);
              de += static_cast<double>(cb) * cb;
            }
          a(r) = static_cast<float>(nu / (de + s.eps));
        }
      });
      if (!s.unit_columns) {
        column_sums([&](Index r, Index j) { return static_cast<double>(a(r) * B(r, j)) * target(r, j); },
                    [&](Index r, Index j) {
                      const float ab = a(r) * B(r, j);
                      return static_cast<double>(ab) * ab;
                    },
                    num, den);
        for (Index j = 0; j < n; ++j) c(j) = static_cast<float>(num[j] / (den[j] + s.eps));
      }
    }
    if (order == 2) {
      billm::for_row_chunks(rows, [&](Index, Index r0, Index r1) {
        for (Index r = r0; r < r1; ++r)
          for (Index j = 0; j < n; ++j)
            if (member(r, j)) {
              const int k = detail::closest_pair(X(r, j), fit.a[0](r) * fit.c[0](j), fit.a[1](r) * fit.c[1](j));
              fit.B[0](r, j) = detail::pair_b1(k);
              fit.B[1](r, j) = detail::pair_b2(k);
            }
      });
    }
    if (trace) (*trace)[t + 1] = loss();
  }
  for (Index r = 0; r < rows; ++r)
    for (Index j = 0; j < n; ++j)
      if (member(r, j)) Q(r, j) = value(r, j);
  return fit;
}

}  // namespace ptqlab::arbllm
