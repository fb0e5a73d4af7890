#include "ptqlab/support/error.hpp"

namespace ptqlab {

Error::~Error() = default;

}  // namespace ptqlab
