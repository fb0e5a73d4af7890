#pragma once
// Blocked, TBB-parallel dense kernels for the inverse-Hessian factor (gptq.cpp): the lower
// Cholesky factor and the inverse of a lower-triangular matrix. Both split the work into fixed
// tiles of `block` rows/columns whose products are Eigen GEMM calls run as TBB tasks, so the
// thread count never changes a rounding (results are bit-identical for any number of threads)
// and there is no second thread pool. A matrix of at most `block` rows is one Eigen call (the
// unblocked algorithm), which is also the reference the blocked one is tested against.
#include <Eigen/Core>

namespace ptqlab {

template <class Scalar>
using DenseMatrix = Eigen::Matrix<Scalar, Eigen::Dynamic, Eigen::Dynamic>;

// The tile size the inverse-Hessian factor uses (gptq.cpp). 256: a 256x256x256 GEMM tile runs
// near the GEMM peak and a 4096-input factor still has 136 trailing tiles per step for the pool.
inline constexpr Eigen::Index kFactorBlock = 256;

// Overwrites the lower triangle of the symmetric `a` (only the lower triangle is read) with its
// lower Cholesky factor L (a = L Lᵀ); the strict upper triangle is left as it was. Returns false
// when `a` is not (numerically) positive definite. Right-looking blocked algorithm: factor the
// diagonal tile, solve the panel below it (tiles in parallel), update the trailing lower triangle
// (tiles in parallel; the diagonal tiles as symmetric rank-k updates).
template <class Scalar>
bool cholesky_lower_in_place(DenseMatrix<Scalar>& a, Eigen::Index block = kFactorBlock);

// L⁻¹ of the lower-triangular `l` (only its lower triangle is read); the result is lower
// triangular with zeros above the diagonal. Column chunks of `block` are independent triangular
// solves on the trailing block only (n³/3 flops in all) and run in parallel.
template <class Scalar>
DenseMatrix<Scalar> lower_triangular_inverse(const DenseMatrix<Scalar>& l, Eigen::Index block = 128);

extern template bool cholesky_lower_in_place<float>(DenseMatrix<float>&, Eigen::Index);
extern template bool cholesky_lower_in_place<double>(DenseMatrix<double>&, Eigen::Index);
extern template DenseMatrix<float> lower_triangular_inverse<float>(const DenseMatrix<float>&, Eigen::Index);
extern template DenseMatrix<double> lower_triangular_inverse<double>(const DenseMatrix<double>&, Eigen::Index);

}  // namespace ptqlab
