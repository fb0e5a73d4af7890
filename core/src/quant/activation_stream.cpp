#include "ptqlab/quant/activation_stream.hpp"

#include <cmath>
#include <stdexcept>
#include <utility>

#include "ptqlab/model/safetensors.hpp"

namespace ptqlab {

const char* stream_dtype_name(StreamDType d) {
  switch (d) {
    case StreamDType::f32: return "f32";
    case StreamDType::bf16: return "bf16";
    case StreamDType::f16: return "f16";
  }
  return "f32";
}

bool parse_stream_dtype(const std::string& s, StreamDType& out) {
  for (StreamDType d : {StreamDType::f32, StreamDType::bf16, StreamDType::f16})
    if (s == stream_dtype_name(d)) {
      out = d;
      return true;
    }
  return false;
}

std::size_t stream_dtype_bytes(StreamDType d) { return d == StreamDType::f32 ? 4 : 2; }

namespace {

float widen(StreamDType d, std::uint16_t v) { return d == StreamDType::bf16 ? bf16_to_f32(v) : f16_to_f32(v); }

// Rounds m into `out`; false when a stored value is not finite.
bool narrow(StreamDType d, const Matrix& m, std::vector<std::uint16_t>& out) {
  out.resize(static_cast<std::size_t>(m.size()));
  const float* src = m.data();
  bool finite = true;
  for (std::size_t i = 0; i < out.size(); ++i) {
    out[i] = d == StreamDType::bf16 ? f32_to_bf16(src[i]) : f32_to_f16(src[i]);
    finite = finite && std::isfinite(widen(d, out[i]));
  }
  return finite;
}

}  // namespace

void ActivationBatches::push_back(Matrix m) {
  rows_.push_back(m.rows());
  cols_.push_back(m.cols());
  if (dtype_ == StreamDType::f32) {
    f32_.push_back(std::move(m));
  } else {
    half_.emplace_back();
    narrow(dtype_, m, half_.back());
  }
}

Matrix ActivationBatches::get(std::size_t b) const { return get_rows(b, 0, rows_.at(b)); }

Matrix ActivationBatches::get_rows(std::size_t b, Eigen::Index row0, Eigen::Index n) const {
  if (row0 < 0 || n < 0 || row0 + n > rows_.at(b)) throw std::out_of_range("ActivationBatches::get_rows");
  if (dtype_ == StreamDType::f32) return f32_[b].middleRows(row0, n);
  Matrix m(n, cols_[b]);
  const std::uint16_t* src = half_[b].data() + static_cast<std::size_t>(row0 * cols_[b]);
  float* dst = m.data();
  for (Eigen::Index i = 0; i < m.size(); ++i) dst[i] = widen(dtype_, src[i]);
  return m;
}

Matrix ActivationBatches::take(std::size_t b) {
  if (dtype_ == StreamDType::f32) return std::move(f32_.at(b));
  return get(b);
}

bool ActivationBatches::put(std::size_t b, Matrix m) {
  rows_.at(b) = m.rows();
  cols_[b] = m.cols();
  if (dtype_ == StreamDType::f32) {
    const bool finite = m.allFinite();
    f32_[b] = std::move(m);
    return finite;
  }
  return narrow(dtype_, m, half_[b]);
}

std::size_t ActivationBatches::bytes() const {
  std::size_t n = 0;
  for (std::size_t b = 0; b < rows_.size(); ++b) n += static_cast<std::size_t>(rows_[b] * cols_[b]);
  return n * stream_dtype_bytes(dtype_);
}

}  // namespace ptqlab
