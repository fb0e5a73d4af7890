#pragma once
// The bit ledger. Every quantized tensor reports what its storage costs, split by component, and
// the bits-per-weight its method's paper would quote. Both are reported side by side
// (docs/bit-accounting.md).
#include <cstdint>

namespace ptqlab {

struct BitCount {
  std::int64_t weights = 0;  // number of weights covered
  double payload = 0;        // bits of the quantized values themselves (codes, signs)
  double scales = 0;         // bits of scale factors (stored FP16 unless said otherwise)
  double zeros = 0;          // bits of zero points / offsets
  double masks = 0;          // bits of salient masks, flags, bitmaps, index lists
  double paper = 0;          // bits the method's paper convention counts for these weights

  double all_in() const { return payload + scales + zeros + masks; }
  double all_in_per_weight() const { return weights > 0 ? all_in() / static_cast<double>(weights) : 0.0; }
  double paper_per_weight() const { return weights > 0 ? paper / static_cast<double>(weights) : 0.0; }

  BitCount& operator+=(const BitCount& o) {
    weights += o.weights;
    payload += o.payload;
    scales += o.scales;
    zeros += o.zeros;
    masks += o.masks;
    paper += o.paper;
    return *this;
  }
};

}  // namespace ptqlab
