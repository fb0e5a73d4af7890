#include "ptqlab/quant/binarize.hpp"

#include <stdexcept>

namespace ptqlab {

Matrix residual_binarize_masked(const Matrix& x, const std::vector<std::uint8_t>& mask, int order, BinarizerStyle style,
                                std::vector<BinaryCoeffs>* coeffs) {
  const Eigen::Index rows = x.rows(), cols = x.cols();
  if (static_cast<Eigen::Index>(mask.size()) != rows * cols)
    throw std::invalid_argument("residual_binarize_masked: the mask does not match the matrix");
  if (order < 0) throw std::invalid_argument("residual_binarize_masked: negative order");
  Matrix out = Matrix::Zero(rows, cols);
  if (coeffs != nullptr) coeffs->assign(static_cast<std::size_t>(rows * order), BinaryCoeffs{});
  std::vector<float> v(cols), approx(cols), scratch(cols);
  std::vector<Eigen::Index> at(cols);
  for (Eigen::Index r = 0; r < rows; ++r) {
    std::ptrdiff_t n = 0;
    for (Eigen::Index c = 0; c < cols; ++c)
      if (mask[static_cast<std::size_t>(r * cols + c)] != 0) {
        v[n] = x(r, c);
        at[n++] = c;
      }
    if (n == 0) continue;
    residual_binarize(v.data(), approx.data(), n, order, style, scratch.data(),
                      coeffs != nullptr ? coeffs->data() + r * order : nullptr);
    for (std::ptrdiff_t i = 0; i < n; ++i) out(r, at[i]) = approx[i];
  }
  return out;
}

}  // namespace ptqlab
