// Fuzz target: a whole .safetensors file image (8-byte header length, JSON header, data section)
// through the same parser SafetensorsFile uses on a mapped file, then every accepted tensor
// converted to float32 as the model loader does.
#include <span>

#include "fuzz_target.hpp"
#include "ptqlab/model/safetensors.hpp"
#include "ptqlab/support/error.hpp"

PTQLAB_FUZZ_TARGET(safetensors) {
  using namespace ptqlab;
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  SafetensorsHeader header;
  try {
    header = parse_safetensors(bytes, "fuzz.safetensors");
  } catch (const Error&) {
    return 0;
  }
  // What the parser promises about an accepted table.
  PTQLAB_FUZZ_CHECK(header.data_start >= 8 && header.data_start <= size);
  const std::size_t data_size = size - header.data_start;
  for (const auto& t : header.tensors) {
    PTQLAB_FUZZ_CHECK(t.begin <= t.end && t.end <= data_size);
    PTQLAB_FUZZ_CHECK(static_cast<std::uint64_t>(t.numel()) * dtype_size(t.dtype) == t.end - t.begin);
    try {
      const auto values = tensor_to_f32(bytes.subspan(header.data_start + t.begin, t.end - t.begin), t, "fuzz.safetensors");
      PTQLAB_FUZZ_CHECK(values.size() == static_cast<std::size_t>(t.numel()));
    } catch (const Error&) {
      // NaN or Inf in the data: rejected, as it should be.
    }
  }
  return 0;
}
