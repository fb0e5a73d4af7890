#include "ptqlab/quant/cholesky.hpp"

#include <algorithm>

#include <Eigen/Cholesky>
#include <tbb/parallel_for.h>
#include <tbb/partitioner.h>

namespace ptqlab {

using Eigen::Index;

template <class Scalar>
bool cholesky_lower_in_place(DenseMatrix<Scalar>& a, Index block) {
  using M = DenseMatrix<Scalar>;
  const Index n = a.rows();
  for (Index k0 = 0; k0 < n; k0 += block) {
    const Index kb = std::min(block, n - k0);
    // The diagonal tile: Eigen's (serial) LLT. For n <= block this is the whole factorisation.
    Eigen::LLT<M> llt(M(a.block(k0, k0, kb, kb)));
    if (llt.info() != Eigen::Success) return false;
    a.block(k0, k0, kb, kb).template triangularView<Eigen::Lower>() = llt.matrixL();
    const Index first = k0 + kb, m = n - first;
    if (m == 0) break;
    const Index tiles = (m + block - 1) / block;
    auto tile_rows = [&](Index t) { return std::min(block, m - t * block); };

    // The panel below it: P := P L_kk⁻ᵀ, one independent solve per row tile.
    const M& ca = a;
    const auto lkk_t = ca.block(k0, k0, kb, kb).template triangularView<Eigen::Lower>().transpose();
    tbb::parallel_for(
        tbb::blocked_range<Index>(0, tiles, 1),
        [&](const tbb::blocked_range<Index>& r) {
          for (Index t = r.begin(); t < r.end(); ++t)
            lkk_t.template solveInPlace<Eigen::OnTheRight>(a.block(first + t * block, k0, tile_rows(t), kb));
        },
        tbb::simple_partitioner());

    // The trailing lower triangle: A_ij -= P_i P_jᵀ for tiles j <= i (tile index -> (i, j) row
    // by row); the diagonal tiles as symmetric rank-kb updates of their lower triangle only.
    tbb::parallel_for(
        tbb::blocked_range<Index>(0, tiles * (tiles + 1) / 2, 1),
        [&](const tbb::blocked_range<Index>& r) {
          for (Index t = r.begin(); t < r.end(); ++t) {
            Index i = 0;
            while ((i + 1) * (i + 2) / 2 <= t) ++i;
            const Index j = t - i * (i + 1) / 2;
            const Index i0 = first + i * block, j0 = first + j * block, ri = tile_rows(i), rj = tile_rows(j);
            const auto pi = ca.block(i0, k0, ri, kb);
            if (i == j) {
              a.block(i0, i0, ri, ri).template selfadjointView<Eigen::Lower>().rankUpdate(pi, Scalar(-1));
            } else {
              a.block(i0, j0, ri, rj).noalias() -= pi * ca.block(j0, k0, rj, kb).transpose();
            }
          }
        },
        tbb::simple_partitioner());
  }
  return true;
}

template <class Scalar>
DenseMatrix<Scalar> lower_triangular_inverse(const DenseMatrix<Scalar>& l, Index block) {
  using M = DenseMatrix<Scalar>;
  const Index n = l.rows();
  M inv = M::Zero(n, n);
  // Column j of L⁻¹ is zero above row j, so each chunk of columns is a triangular solve on the
  // trailing block only, independent of the other chunks.
  tbb::parallel_for(
      tbb::blocked_range<Index>(0, (n + block - 1) / block, 1),
      [&](const tbb::blocked_range<Index>& r) {
        for (Index c = r.begin(); c < r.end(); ++c) {
          const Index c0 = c * block, w = std::min(block, n - c0), m = n - c0;
          M rhs = M::Zero(m, w);
          rhs.topRows(w).setIdentity();
          l.bottomRightCorner(m, m).template triangularView<Eigen::Lower>().solveInPlace(rhs);
          inv.block(c0, c0, m, w) = rhs;
        }
      },
      tbb::simple_partitioner());
  return inv;
}

template bool cholesky_lower_in_place<float>(DenseMatrix<float>&, Index);
template bool cholesky_lower_in_place<double>(DenseMatrix<double>&, Index);
template DenseMatrix<float> lower_triangular_inverse<float>(const DenseMatrix<float>&, Index);
template DenseMatrix<double> lower_triangular_inverse<double>(const DenseMatrix<double>&, Index);

}  // namespace ptqlab
