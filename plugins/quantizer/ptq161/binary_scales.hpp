#pragma once
// PTQ1.61's weight parametrization of one linear (research/ptq161.md §3.5, §4.2), as the code does:
//   salient columns j (mask): Q4 = 4-bit asymmetric per-row RTN, the row's range taken over the
//     whole row (all columns), constant during training;
//   other columns: W_bin[i,j] = r1_i * r2_j * (s_i * B_ij + mu_i), B = sign(W - mu) (sign(0) = 0),
//     mu_i frozen, s_i, r1_i, r2_j trainable.
//   init: mu_i and s_i = mean of W_ij and of |W_ij| over the non-salient, non-zero entries of row i
//     (s is NOT mean-centred); r1 = r2 = 1. With no training this is the analytic binarization.
#include <cmath>
#include <vector>

#include "ptqlab/quant/activation_channels.hpp"
#include "ptqlab/quant/gptq.hpp"

namespace ptqlab::ptq161 {

struct BinaryScales {
  Eigen::VectorXf s, r1, mu;  // per output row
  Eigen::VectorXf r2;         // per input column
  std::vector<std::uint8_t> salient;  // per input column
  Matrix q4;                  // salient part (zero on other columns)
  Matrix signs;               // B on non-salient columns (zero on salient ones)

  // `salient_range_row`: fit the 4-bit grid on the whole row (code) or on salient columns only.
  BinaryScales(const Matrix& w, std::vector<std::uint8_t> mask, int salient_bits, bool salient_range_row)
      : salient(std::move(mask)) {
    const Eigen::Index rows = w.rows(), cols = w.cols();
    s = Eigen::VectorXf::Zero(rows);
    mu = Eigen::VectorXf::Zero(rows);
    r1 = Eigen::VectorXf::Ones(rows);
    r2 = Eigen::VectorXf::Ones(cols);
    q4 = Matrix::Zero(rows, cols);
    signs = Matrix::Zero(rows, cols);
    bool any_salient = false;
    for (auto m : salient) any_salient = any_salient || m;
    if (any_salient) {
      UniformGrid grid(salient_bits, false);
      if (salient_range_row) {
        grid.fit(w);
      } else {
        Matrix only = Matrix::Zero(rows, cols);
        for (Eigen::Index j = 0; j < cols; ++j)
          if (salient[j]) only.col(j) = w.col(j);
        grid.fit(only);
      }
      for (Eigen::Index i = 0; i < rows; ++i)
        for (Eigen::Index j = 0; j < cols; ++j)
          if (salient[j]) q4(i, j) = grid.quantize(i, w(i, j));
    }
    for (Eigen::Index i = 0; i < rows; ++i) {
      double sum = 0, sum_abs = 0;
      std::int64_t n = 0;
      for (Eigen::Index j = 0; j < cols; ++j)
        if (!salient[j] && w(i, j) != 0.0f) {
          sum += w(i, j);
          sum_abs += std::abs(w(i, j));
          ++n;
        }
      mu(i) = n > 0 ? static_cast<float>(sum / n) : 0.0f;  // the code's NaN (empty row) becomes 0
      s(i) = n > 0 ? static_cast<float>(sum_abs / n) : 0.0f;
      for (Eigen::Index j = 0; j < cols; ++j)
        if (!salient[j]) {
          const float d = w(i, j) - mu(i);
          signs(i, j) = d > 0 ? 1.0f : (d < 0 ? -1.0f : 0.0f);
        }
    }
  }

  Eigen::Index salient_count() const {
    Eigen::Index k = 0;
    for (auto m : salient) k += m != 0;
    return k;
  }

  void effective(Matrix& w) const {
    w.resize(q4.rows(), q4.cols());
    for (Eigen::Index i = 0; i < w.rows(); ++i)
      for (Eigen::Index j = 0; j < w.cols(); ++j)
        w(i, j) = salient[j] ? q4(i, j) : r1(i) * r2(j) * (s(i) * signs(i, j) + mu(i));
  }

  // Chain rule over the non-salient columns (ptq161.md §5.4), with P_ij = s_i B_ij + mu_i:
  //   dL/ds_i = r1_i Σ_j G_ij r2_j B_ij,  dL/dr1_i = Σ_j G_ij r2_j P_ij,  dL/dr2_j = Σ_i G_ij r1_i P_ij
  void backward(const Matrix& g, Eigen::VectorXf& ds, Eigen::VectorXf& dr1, Eigen::VectorXf& dr2) const {
    for (Eigen::Index i = 0; i < g.rows(); ++i)
      for (Eigen::Index j = 0; j < g.cols(); ++j) {
        if (salient[j]) continue;
        const float p = s(i) * signs(i, j) + mu(i);
        ds(i) += r1(i) * g(i, j) * r2(j) * signs(i, j);
        dr1(i) += g(i, j) * r2(j) * p;
        dr2(j) += g(i, j) * r1(i) * p;
      }
  }
};

}  // namespace ptqlab::ptq161
