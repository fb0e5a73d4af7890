#include "ptqlab/gptq.hpp"

#include <cmath>

#include <Eigen/Cholesky>
#include <fmt/format.h>
#include <tbb/parallel_for.h>
#include <tbb/partitioner.h>

#include "ptqlab/error.hpp"

namespace ptqlab {

using Eigen::Index;

BitCount uniform_grid_ledger(Index rows, Index cols, int bits, Index group_size, bool symmetric) {
  const Index groups_per_row = group_size > 0 ? (cols + group_size - 1) / group_size : 1;
  const double grids = static_cast<double>(groups_per_row) * static_cast<double>(rows);
  BitCount b;
  b.weights = rows * cols;
  b.payload = static_cast<double>(bits) * static_cast<double>(rows * cols);
  b.scales = 16.0 * grids;
  b.zeros = symmetric ? 0.0 : static_cast<double>(bits) * grids;
  b.paper = b.payload;
  return b;
}

namespace {

// L⁻¹ for lower-triangular L. Column j of L⁻¹ is zero above row j, so each chunk of columns is a
// triangular solve on the trailing block only (n³/3 flops in all instead of n³), and the chunks
// are independent: solved in parallel, with a fixed chunking (deterministic).
Eigen::MatrixXd lower_triangular_inverse(const Eigen::MatrixXd& L) {
  const Index n = L.rows();
  Eigen::MatrixXd inv = Eigen::MatrixXd::Zero(n, n);
  constexpr Index kChunk = 128;
  tbb::parallel_for(
      tbb::blocked_range<Index>(0, (n + kChunk - 1) / kChunk, 1),
      [&](const tbb::blocked_range<Index>& r) {
        for (Index c = r.begin(); c < r.end(); ++c) {
          const Index c0 = c * kChunk, w = std::min(kChunk, n - c0), m = n - c0;
          Eigen::MatrixXd rhs = Eigen::MatrixXd::Zero(m, w);
          rhs.topRows(w).setIdentity();
          L.bottomRightCorner(m, m).triangularView<Eigen::Lower>().solveInPlace(rhs);
          inv.block(c0, c0, m, w) = rhs;
        }
      },
      tbb::simple_partitioner());
  return inv;
}

}  // namespace

InverseHessianFactor prepare_inverse_hessian(Eigen::MatrixXd H, Matrix& weight, double percdamp,
                                             const std::string& what, int max_retries) {
  const Index n = H.rows();
  if (H.cols() != n || weight.cols() != n)
    throw Error(fmt::format("{}: Hessian is {}x{} but the weight has {} inputs", what, H.rows(), H.cols(), weight.cols()));
  if (!H.allFinite()) throw Error(fmt::format("{}: the Hessian has non-finite entries", what));
  InverseHessianFactor out;
  for (Index j = 0; j < n; ++j) {
    if (H(j, j) == 0.0) {
      H(j, j) = 1.0;
      weight.col(j).setZero();
      out.dead.push_back(j);
    }
  }
  const double mean_diag = H.diagonal().mean();
  double damp = percdamp;
  // U is computed without forming H⁻¹: with P the reversal permutation and P H P = L Lᵀ,
  // H⁻¹ = (P L⁻¹ P)ᵀ (P L⁻¹ P) and P L⁻¹ P is upper triangular with a positive diagonal, so by
  // uniqueness it is the upper Cholesky factor of H⁻¹. One factorisation and one triangular
  // inverse instead of GPTQ's chol -> cholesky_inverse -> chol (about half the flops).
  const Eigen::MatrixXd reversed = H.reverse();
  for (int attempt = 0; attempt <= max_retries; ++attempt) {
    Eigen::MatrixXd Hd = reversed;
    Hd.diagonal().array() += damp * mean_diag;
    Eigen::LLT<Eigen::MatrixXd> llt(Hd);
    if (llt.info() == Eigen::Success) {
      const Eigen::MatrixXd L = llt.matrixL();
      out.U = lower_triangular_inverse(L).reverse();
      out.U.triangularView<Eigen::StrictlyLower>().setZero();
      if (out.U.allFinite() && (out.U.diagonal().array() > 0).all()) {
        out.percdamp = damp;
        out.retries = attempt;
        return out;
      }
    }
    damp = damp > 0 ? damp * 10.0 : 1e-6;
  }
  throw Error(fmt::format("{}: the Hessian is not positive definite even with dampening {} x mean(diag H) "
                          "(after {} increases): check the calibration data for this layer",
                          what, damp / 10.0, max_retries));
}

double gptq_column_loop(Matrix& weight, const Eigen::MatrixXd& U_double, int block_size,
                        const ColumnQuantizerFactory& make, const std::vector<Index>& order) {
  const Index rows = weight.rows(), cols = weight.cols();
  if (U_double.rows() != cols) throw std::logic_error("gptq_column_loop: U does not match the weight");
  if (block_size < 1) throw Error(fmt::format("GPTQ block size must be >= 1, got {}", block_size));
  const Eigen::MatrixXf U = U_double.cast<float>();
  const bool permuted = !order.empty();

  constexpr Index kRowChunk = 64;
  const Index chunks = (rows + kRowChunk - 1) / kRowChunk;
  std::vector<double> losses(chunks, 0.0);

  tbb::parallel_for(
      tbb::blocked_range<Index>(0, chunks, 1),
      [&](const tbb::blocked_range<Index>& range) {
        for (Index chunk = range.begin(); chunk < range.end(); ++chunk) {
          const Index r0 = chunk * kRowChunk, nr = std::min(kRowChunk, rows - r0);
          // The chunk's rows, column-major, in processing order.
          MatrixCM W(nr, cols);
          for (Index k = 0; k < cols; ++k) W.col(k) = weight.block(r0, permuted ? order[k] : k, nr, 1);
          MatrixCM Q(nr, cols);
          auto quantizer = make(r0, nr);
          double loss = 0;
          Eigen::VectorXf w(nr), q(nr), e(nr);
          for (Index b0 = 0; b0 < cols; b0 += block_size) {
            const Index b1 = std::min<Index>(b0 + block_size, cols), nb = b1 - b0;
            quantizer->begin_block(b0, b1, W);
            MatrixCM Wb = W.middleCols(b0, nb);  // in-block working copy
            MatrixCM E(nr, nb);
            for (Index i = 0; i < nb; ++i) {
              w = Wb.col(i);
              const float d = U(b0 + i, b0 + i);
              quantizer->quantize_column(b0 + i, W, w, q);
              Q.col(b0 + i) = q;
              e = (w - q) / d;
              loss += (w - q).squaredNorm() / (static_cast<double>(d) * d) / 2.0;
              // w_j -= e U_ij for the later columns of the block
              if (i + 1 < nb)
                Wb.rightCols(nb - i - 1).noalias() -= e * U.block(b0 + i, b0 + i + 1, 1, nb - i - 1);
              E.col(i) = e;
            }
            if (b1 < cols) W.rightCols(cols - b1).noalias() -= E * U.block(b0, b1, nb, cols - b1);
          }
          for (Index k = 0; k < cols; ++k) weight.block(r0, permuted ? order[k] : k, nr, 1) = Q.col(k);
          losses[chunk] = loss;
        }
      },
      tbb::simple_partitioner());
  double total = 0;
  for (double l : losses) total += l;
  return total;
}

}  // namespace ptqlab
