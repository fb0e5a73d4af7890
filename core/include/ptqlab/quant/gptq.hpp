#pragma once
// The shared core of the Hessian-based baselines (research/baselines.md §1): GPTQ's uniform grid,
// the preparation of the inverse-Hessian factor, and GPTQ's column loop with lazy block updates.
// GPTQ, PB-LLM and BiLLM plugins are built from these pieces.
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include <Eigen/Core>

#include "ptqlab/model/model.hpp"
#include "ptqlab/quant/bits.hpp"
#include "ptqlab/quant/cholesky.hpp"

namespace ptqlab {

using MatrixCM = Eigen::MatrixXf;  // column-major float: the column loops walk columns

// GPTQ's Quantizer.find_params grid, one (scale, zero) per row (§1.5):
//   asymmetric: [lo, hi] = [min(0, min w), max(0, max w)] ((-1, 1) when both are 0),
//               scale = (hi - lo) / maxq, zero = round(-lo / scale)
//   symmetric:  hi = max(|lo|, hi), lo = -hi (when lo < 0), zero = (maxq + 1) / 2
//   q(w) = scale * (clamp(round(w / scale) + zero, 0, maxq) - zero), round half to even, float32.
struct UniformGrid {
  int bits = 4;
  bool symmetric = false;
  Eigen::VectorXf scale, zero;  // per row

  UniformGrid(int bits, bool symmetric) : bits(bits), symmetric(symmetric) {}
  float maxq() const { return static_cast<float>((1u << bits) - 1u); }
  // Fits one (scale, zero) per row of `w` (rows x any columns).
  template <class Derived>
  void fit(const Eigen::MatrixBase<Derived>& w);
  float quantize(Eigen::Index row, float x) const;
};

// The bit ledger of a [rows, cols] weight on UniformGrids of `bits`, one grid per row and group of
// `group_size` input columns (-1: one per row): b bits per weight, an FP16 scale per grid, a b-bit
// integer zero point per grid unless symmetric; papers quote "W<b>" (paper = payload).
BitCount uniform_grid_ledger(Eigen::Index rows, Eigen::Index cols, int bits, Eigen::Index group_size, bool symmetric);

// The precision of the inverse-Hessian factor (docs/methods/gptq.md, "Numerics of the factor").
// automatic: float64 when the Hessian has at most FactorOptions::block inputs (one unblocked Eigen
// factorisation; costs nothing at that size), float32 above (the blocked parallel kernels at twice
// the float64 throughput; the precision the reference implementations use, torch float32).
enum class FactorPrecision { automatic, float64, float32 };
struct FactorOptions {
  FactorPrecision precision = FactorPrecision::automatic;
  Eigen::Index block = kFactorBlock;  // tile size of the blocked kernels (ptqlab/cholesky.hpp)
};
// The precision `automatic` resolves to for an n-input Hessian (the others resolve to themselves).
FactorPrecision factor_precision_for(Eigen::Index n, const FactorOptions& options = {});

// The upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU), prepared as GPTQ does (§1.3):
//   dead inputs (H_jj == 0) get H_jj = 1 and their weight columns are zeroed;
//   λ = percdamp · mean(diag H) is added to the diagonal;
//   U = the upper Cholesky factor of H⁻¹ (computed from one blocked, parallel factorisation of the
//       reversed H, see gptq.cpp; equal to GPTQ's chol -> cholesky_inverse -> chol), returned in
//       double whatever the precision it was computed in (FactorOptions).
// When a factorisation fails (H not positive definite), the dampening is multiplied by 10 and the
// factorisation retried, up to `max_retries` times; then a ptqlab::Error names `what`.
struct InverseHessianFactor {
  Eigen::MatrixXd U;                // upper triangular
  double percdamp = 0;              // the dampening that worked
  int retries = 0;                  // how many times it was increased
  std::vector<Eigen::Index> dead;   // input columns with H_jj == 0
};
InverseHessianFactor prepare_inverse_hessian(const Eigen::MatrixXd& H, Matrix& weight, double percdamp,
                                             const std::string& what, int max_retries = 6,
                                             const FactorOptions& options = {});

struct LinearContext;

// The factors of one decoder layer's inputs, each computed on first request for an (input,
// dampening) pair and then shared: 4 factorisations per layer instead of one per linear. Not
// thread-safe: the engine quantizes a layer's linears one after another.
class InverseFactorCache {
 public:
  // prepare_inverse_hessian(H, ..., percdamp, what) for input `input`, or the one already computed.
  std::shared_ptr<const InverseHessianFactor> get(int input, const Eigen::MatrixXd& H, double percdamp,
                                                  const std::string& what);
  std::size_t size() const;
  // Drops the factors of `input` (its last linear is done); holders of a shared_ptr keep theirs.
  void release(int input);

 private:
  std::map<std::pair<int, double>, std::shared_ptr<const InverseHessianFactor>> factors_;
};

// The factor a linear's quantizer or mask uses at `percdamp`: the layer's shared one when the
// engine offers it (ctx.inverse_factor), else prepare_inverse_hessian on ctx.hessian(). Either way
// `weight`'s dead input columns are zeroed, exactly as prepare_inverse_hessian does. Components
// whose Hessian is their own (act-order's permuted one) call prepare_inverse_hessian instead.
std::shared_ptr<const InverseHessianFactor> inverse_hessian_factor(const LinearContext& ctx, Matrix& weight,
                                                                   double percdamp, const std::string& what);

// Quantizes one column inside GPTQ's loop. One instance per chunk of rows (rows are independent
// given U, so the loop runs row chunks in parallel); it may keep per-row state such as grids.
class ColumnQuantizer {
 public:
  virtual ~ColumnQuantizer() = default;
  // Start of a block [b0, b1): `rows` holds the chunk's weights with every earlier block's lazy
  // update applied and this block's columns as they arrived (no in-block updates yet). GPTQ
  // refits group grids from this state (gptq.py reads W, not the in-block copy).
  virtual void begin_block(Eigen::Index b0, Eigen::Index b1, const MatrixCM& rows) {}
  // Quantizes column `col` given its current values `w` (with in-block updates); writes `q`.
  virtual void quantize_column(Eigen::Index col, const MatrixCM& rows, const Eigen::VectorXf& w,
                               Eigen::VectorXf& q) = 0;
};
using ColumnQuantizerFactory = std::function<std::unique_ptr<ColumnQuantizer>(Eigen::Index row0, Eigen::Index rows)>;

// GPTQ's column loop with lazy block updates (§1.4) on `weight` ([rows, cols], in place):
//   for each block of `block_size` columns: quantize column by column, feeding each column's
//   error e = (w - q) / U_ii into the block's later columns (w_j -= e U_ij), then apply the block's
//   errors to all later columns with one GEMM.
// `order` (optional) is a column permutation (act-order): column order[k] is processed k-th; U
// must then be the factor of the permuted Hessian. Rows are split into fixed chunks of 64 run in
// parallel; the result does not depend on the thread count. Returns Σ (w - q)² / U_ii² / 2.
double gptq_column_loop(Matrix& weight, const Eigen::MatrixXd& U, int block_size, const ColumnQuantizerFactory& make,
                        const std::vector<Eigen::Index>& order = {});

// ---- template definitions -----------------------------------------------------------------------

template <class Derived>
void UniformGrid::fit(const Eigen::MatrixBase<Derived>& w) {
  const Eigen::Index rows = w.rows();
  scale.resize(rows);
  zero.resize(rows);
  const float mq = maxq();
  for (Eigen::Index r = 0; r < rows; ++r) {
    float lo = std::min(0.0f, static_cast<float>(w.row(r).minCoeff()));
    float hi = std::max(0.0f, static_cast<float>(w.row(r).maxCoeff()));
    if (symmetric) {
      hi = std::max(-lo, hi);
      if (lo < 0) lo = -hi;
    }
    if (lo == 0.0f && hi == 0.0f) {
      lo = -1.0f;
      hi = 1.0f;
    }
    scale(r) = (hi - lo) / mq;
    zero(r) = symmetric ? (mq + 1.0f) / 2.0f : std::nearbyint(-lo / scale(r));
  }
}

inline float UniformGrid::quantize(Eigen::Index row, float x) const {
  const float q = std::clamp(std::nearbyint(x / scale(row)) + zero(row), 0.0f, maxq());
  return scale(row) * (q - zero(row));
}

}  // namespace ptqlab
