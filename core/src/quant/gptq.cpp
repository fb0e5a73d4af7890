#include "ptqlab/quant/gptq.hpp"

#include <cmath>
#include <iterator>

#include <fmt/format.h>
#include <tbb/parallel_for.h>
#include <tbb/partitioner.h>

#include "ptqlab/engine/plugin.hpp"
#include "ptqlab/quant/cholesky.hpp"
#include "ptqlab/support/error.hpp"

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

// The upper Cholesky factor U of (H + shift I)⁻¹ in `Scalar`, into `u` (double); false when the
// factorisation fails. With P the reversal permutation and P (H + shift I) P = L Lᵀ,
// H⁻¹ = (P L⁻¹ P)ᵀ (P L⁻¹ P) and P L⁻¹ P is upper triangular with a positive diagonal, so by
// uniqueness it is the upper Cholesky factor of H⁻¹. One factorisation and one triangular
// inverse instead of GPTQ's chol -> cholesky_inverse -> chol (about half the flops).
template <class Scalar>
bool reversed_factor(const Eigen::MatrixXd& H, double shift, Index block, Eigen::MatrixXd& u) {
  const Index n = H.rows();
  DenseMatrix<Scalar> a(n, n);
  for (Index j = 0; j < n; ++j)
    for (Index i = 0; i < n; ++i) a(i, j) = static_cast<Scalar>(i == j ? H(n - 1 - i, n - 1 - j) + shift : H(n - 1 - i, n - 1 - j));
  if (!cholesky_lower_in_place(a, block)) return false;
  DenseMatrix<Scalar> inv = lower_triangular_inverse(a);
  a = DenseMatrix<Scalar>();  // freed before the double copy: at n = 11008 the three together are 1.9 GB
  u = inv.template cast<double>().reverse();
  u.triangularView<Eigen::StrictlyLower>().setZero();
  return u.allFinite() && (u.diagonal().array() > 0).all();
}

}  // namespace

FactorPrecision factor_precision_for(Index n, const FactorOptions& options) {
  if (options.precision != FactorPrecision::automatic) return options.precision;
  return n <= options.block ? FactorPrecision::float64 : FactorPrecision::float32;
}

InverseHessianFactor prepare_inverse_hessian(const Eigen::MatrixXd& given, Matrix& weight, double percdamp,
                                             const std::string& what, int max_retries, const FactorOptions& options) {
  const Index n = given.rows();
  if (given.cols() != n || weight.cols() != n)
    throw Error(fmt::format("{}: Hessian is {}x{} but the weight has {} inputs", what, given.rows(), given.cols(),
                            weight.cols()));
  if (!given.allFinite()) throw Error(fmt::format("{}: the Hessian has non-finite entries", what));
  InverseHessianFactor out;
  for (Index j = 0; j < n; ++j) {
    if (given(j, j) == 0.0) {
      weight.col(j).setZero();
      out.dead.push_back(j);
    }
  }
  // Dead inputs get H_jj = 1 (the reference's H[dead, dead] = 1) in a copy; without any, the
  // Hessian is read in place (at n = 11008 a copy is 0.97 GB).
  Eigen::MatrixXd patched;
  if (!out.dead.empty()) {
    patched = given;
    for (const Index j : out.dead) patched(j, j) = 1.0;
  }
  const Eigen::MatrixXd& H = out.dead.empty() ? given : patched;
  const double mean_diag = H.diagonal().mean();
  const bool single = factor_precision_for(n, options) == FactorPrecision::float32;
  double damp = percdamp;
  for (int attempt = 0; attempt <= max_retries; ++attempt) {
    const bool ok = single ? reversed_factor<float>(H, damp * mean_diag, options.block, out.U)
                           : reversed_factor<double>(H, damp * mean_diag, options.block, out.U);
    if (ok) {
      out.percdamp = damp;
      out.retries = attempt;
      return out;
    }
    damp = damp > 0 ? damp * 10.0 : 1e-6;
  }
  throw Error(fmt::format("{}: the Hessian is not positive definite even with dampening {} x mean(diag H) "
                          "(after {} increases): check the calibration data for this layer",
                          what, damp / 10.0, max_retries));
}

std::shared_ptr<const InverseHessianFactor> InverseFactorCache::get(int input, const Eigen::MatrixXd& H,
                                                                  double percdamp, const std::string& what) {
  auto& slot = factors_[{input, percdamp}];
  if (!slot) {
    Matrix no_rows(0, H.cols());  // only the factor is wanted here; callers zero their own columns
    slot = std::make_shared<const InverseHessianFactor>(prepare_inverse_hessian(H, no_rows, percdamp, what));
  }
  return slot;
}

std::size_t InverseFactorCache::size() const {
  return factors_.size();
}

void InverseFactorCache::release(int input) {
  for (auto it = factors_.begin(); it != factors_.end();)
    it = it->first.first == input ? factors_.erase(it) : std::next(it);
}

std::shared_ptr<const InverseHessianFactor> inverse_hessian_factor(const LinearContext& ctx, Matrix& weight,
                                                                   double percdamp, const std::string& what) {
  if (!ctx.inverse_factor) {
    if (!ctx.hessian) throw Error(what + ": this component needs the layer's Hessian");
    return std::make_shared<const InverseHessianFactor>(prepare_inverse_hessian(ctx.hessian(), weight, percdamp, what));
  }
  auto factor = ctx.inverse_factor(percdamp, what);
  if (factor->U.rows() != weight.cols())
    throw Error(fmt::format("{}: Hessian is {}x{} but the weight has {} inputs", what, factor->U.rows(),
                            factor->U.rows(), weight.cols()));
  for (const Index j : factor->dead) weight.col(j).setZero();
  return factor;
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
