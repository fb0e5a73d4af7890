// Registers a quantizer named "rtn", which the built-in plugin already provides.
#include "ptqlab/engine/plugin.hpp"

namespace {
class Nothing : public ptqlab::Quantizer {
 public:
  ptqlab::BitCount quantize_linear(const ptqlab::LinearContext&, ptqlab::Matrix&) override { return {}; }
};
}  // namespace

PTQLAB_PLUGIN(registrar) {
  ptqlab::ComponentSchema q;
  q.name = "rtn";
  q.description = "clashes with the built-in rtn";
  registrar->add_quantizer(q, [](const ptqlab::Params&) { return std::make_unique<Nothing>(); });
}
