#pragma once
// The calibration activations a layer-wise quantization carries from one decoder layer to the next
// (docs/architecture.md, "Calibration streams"): one [rows, hidden] matrix per batch of windows,
// held in float32 (the default: exact, as in the reference code) or rounded to BF16 or F16, which
// halves their memory (4.3 GB -> 2.1 GB per stream for 128 x 2048 tokens at LLaMA-2-7B's hidden
// 4096). Reads widen to float32, so every computation on them is unchanged; only what is held
// between layers is rounded (round to nearest, ties to even; F16 overflows to +-Inf, which put()
// reports so that the engine can name the layer).
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "ptqlab/model/model.hpp"

namespace ptqlab {

enum class StreamDType { f32, bf16, f16 };

const char* stream_dtype_name(StreamDType d);                 // "f32", "bf16", "f16"
bool parse_stream_dtype(const std::string& s, StreamDType& out);  // false: not one of those
std::size_t stream_dtype_bytes(StreamDType d);                // 4 or 2

class ActivationBatches {
 public:
  explicit ActivationBatches(StreamDType dtype = StreamDType::f32) : dtype_(dtype) {}

  StreamDType dtype() const { return dtype_; }
  std::size_t size() const { return rows_.size(); }
  bool empty() const { return rows_.empty(); }
  Eigen::Index rows(std::size_t b) const { return rows_[b]; }
  Eigen::Index cols(std::size_t b) const { return cols_[b]; }

  void push_back(Matrix m);
  // Batch b in float32: a copy (float32 storage) or the widened values.
  Matrix get(std::size_t b) const;
  // Rows [row0, row0 + n) of batch b in float32.
  Matrix get_rows(std::size_t b, Eigen::Index row0, Eigen::Index n) const;
  // Batch b taken out (moved with float32 storage, widened otherwise) and put back (moved, or
  // rounded): for updating a batch in place without a copy.
  // put() returns false when a stored value is not finite (non-finite input, or F16 overflow).
  Matrix take(std::size_t b);
  bool put(std::size_t b, Matrix m);
  // Bytes held.
  std::size_t bytes() const;

 private:
  StreamDType dtype_;
  std::vector<Eigen::Index> rows_, cols_;
  std::vector<Matrix> f32_;                        // float32 storage
  std::vector<std::vector<std::uint16_t>> half_;  // BF16/F16 storage, row-major
};

}  // namespace ptqlab
